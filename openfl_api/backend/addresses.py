"""The addresses a backend serves: one lobby per address, and the watched address file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from openfl_api.address import Address, AddressFileWatcher
from openfl_api.errors import ConfigurationError, TransportError
from openfl_api.transport.rendezvous import Lobby
from openfl_api.transport.store import open_store

__all__ = ["Addresses", "REMOVED"]

#: Why the frontends of an address removed from the watched file are told the federation ended.
REMOVED = "this address was removed from the address file"


class Addresses:
    """Hosts or opens each address's store and admits frontends there through a :class:`Lobby`.

    Args:
        token: the admission token.
        connect: how long a join may take.
        nick_name: the backend's name, told to frontends.
        log: a bound logger.
        on_admit: ``on_admit(pipe, peer)``, from a handshake thread.
        on_refuse: ``on_refuse(rank_or_None, reason)``, from a handshake thread.
    """

    def __init__(self, token: bytes, connect: timedelta, nick_name: str, log: Any,
                 on_admit: Callable[..., None], on_refuse: Callable[..., None]) -> None:
        self._token = token
        self._connect = connect
        self._nick_name = nick_name
        self.log = log
        self._on_admit = on_admit
        self._on_refuse = on_refuse
        self.lobbies: Dict[tuple, Lobby] = {}
        self._files: List[Path] = []
        self._watcher: Optional[AddressFileWatcher] = None

    def serve(self, address: Address) -> None:
        """Host or open the store of ``address`` and start admitting frontends there."""
        if address.key in self.lobbies:
            raise ConfigurationError(f"{address} is served already")
        store = open_store(address, backend=True, timeout=self._connect)
        self.lobbies[address.key] = Lobby(address, store, self._token, self._connect, on_admit=self._on_admit,
                                          on_refuse=self._on_refuse, nick_name=self._nick_name, log=self.log)
        if address.scheme == "file":
            self._files.append(Path(address.path))
        self.log.info(f"serving {address.init_method} (group {address.group_name!r}, world_size {address.world_size})")

    def watch(self, path: str, on_change: Callable[[List[Address], List[Address]], None]) -> None:
        """Serve every address in the file ``path`` and call ``on_change(added, removed)`` as it changes."""
        watcher = AddressFileWatcher(path, on_change, log=self.log)
        for address in watcher.load():
            self.serve(address)
        watcher.start()
        self._watcher = watcher
        self.log.info(f"watching address file {path}")

    def lobby(self, address: Address) -> Optional[Lobby]:
        """The lobby of ``address``, or None once it is no longer served."""
        return self.lobbies.get(address.key)

    @property
    def frontend_ranks(self) -> Dict[str, range]:
        """Per served ``init_method``: the frontend ranks its world_size allows."""
        return {lobby.address.init_method: range(1, lobby.address.world_size) for lobby in self.lobbies.values()}

    def remove(self, address: Address, reason: str) -> bool:
        """Stop serving ``address``, recording ``reason`` for its frontends; False if it was not served."""
        lobby = self.lobbies.pop(address.key, None)
        if lobby is None:
            return False
        lobby.end(reason)
        lobby.close()
        return True

    def change(self, added: List[Address], removed: List[Address]) -> None:
        """Apply a change of the watched file: serve the added addresses, close the removed ones."""
        for address in removed:
            if self.remove(address, REMOVED):
                self.log.info(f"closed {address.init_method} (group {address.group_name!r}): removed from the address file")
        for address in added:
            try:
                self.serve(address)
            except (ConfigurationError, TransportError) as exc:
                self.log.error(f"cannot serve {address} added to the address file: {exc}")

    def end(self, reason: str) -> None:
        """Record the end of the federation in every store, for frontends whose pipe broke."""
        for lobby in self.lobbies.values():
            lobby.end(reason)

    def close(self) -> None:
        """Stop watching and admitting, and remove the file stores this backend created."""
        if self._watcher is not None:
            self._watcher.stop()
        for lobby in self.lobbies.values():
            lobby.close()
        self.lobbies.clear()
        for path in self._files:
            path.unlink(missing_ok=True)
