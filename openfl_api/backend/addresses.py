"""The addresses a backend serves: one lobby per address, and the watched address file.

A changed entry (same ``init_method`` and ``group_name``, another ``world_size``, say) is closed
and served again on the same store, so its port is never given up; its frontends are told to
join again. An address whose port is still taken (an entry removed and added back while the old
store's last connections close) is hosted again with retries, from a thread of its own.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch.distributed import Store

from openfl_api.address import Address, AddressFileWatcher
from openfl_api.errors import ConfigurationError, TransportError
from openfl_api.transport.rendezvous import Lobby
from openfl_api.transport.store import open_store
from openfl_api.waiting import seconds

__all__ = ["Addresses", "REMOVED", "CHANGED"]

#: Why the frontends of an address removed from the watched file are told the federation ended.
REMOVED = "this address was removed from the address file"
#: Why the frontends of an entry changed in the watched file are told to join again.
CHANGED = "this address's entry changed in the address file; join again"


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
                 on_admit: Callable[..., None], on_refuse: Callable[..., None],
                 on_opened: Callable[[Address, Store], None] = lambda address, store: None,
                 protect_wire: Optional[bool] = None) -> None:
        self._token = token
        self._connect = connect
        self._nick_name = nick_name
        self.log = log
        self._on_admit = on_admit
        self._on_refuse = on_refuse
        self._on_opened = on_opened
        self._protect_wire = protect_wire
        self.lobbies: Dict[tuple, Lobby] = {}
        self._files: List[Path] = []
        self._watcher: Optional[AddressFileWatcher] = None
        self._closed = threading.Event()

    def serve(self, address: Address, store: Optional[Store] = None) -> None:
        """Host or open the store of ``address`` (or use ``store``, opened already) and start
        admitting frontends there."""
        if address.key in self.lobbies:
            raise ConfigurationError(f"{address} is served already")
        if store is None:
            store = open_store(address, backend=True, timeout=self._connect)
        # Registered before it opens: a frontend admitted at once must find its lobby (on_admit).
        lobby = self.lobbies[address.key] = Lobby(
            address, store, self._token, self._connect, on_admit=self._on_admit, on_refuse=self._on_refuse,
            nick_name=self._nick_name, log=self.log, protect_wire=self._protect_wire, start=False)
        try:
            lobby.start()
        except BaseException:
            del self.lobbies[address.key]  # a lobby that never opened is not served
            raise
        if address.scheme == "file":
            self._files.append(Path(address.path))
        self.log.info(f"serving {address.init_method} (group {address.group_name!r}, world_size {address.world_size}, "
                      f"wire {lobby.wire})")

    def watch(self, path: str, on_change: Callable[..., None]) -> None:
        """Serve every address in the file ``path`` and call ``on_change(added, removed, changed)``
        as it changes."""
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

    def change(self, added: List[Address], removed: List[Address],
               changed: List[Tuple[Address, Address]] = ()) -> None:
        """Apply a change of the watched file: close the removed addresses, close and serve again
        the changed ones (on the same store), serve the added ones (with retries while the port is
        still taken)."""
        for address in removed:
            if self.remove(address, REMOVED):
                self.log.info(f"closed {address.init_method} (group {address.group_name!r}): removed from the address file")
        for old, new in changed:
            lobby = self.lobbies.pop(old.key, None)
            if lobby is None:
                added = [*added, new]
                continue
            lobby.close()
            self.log.info(f"changed {old.init_method} (group {old.group_name!r}) in the address file: "
                          f"{_differences(old, new)}; serving it again, its frontends join again")
            try:
                self.serve(new, store=lobby.store)
            except (ConfigurationError, TransportError) as exc:
                self.log.error(f"cannot serve {new} changed in the address file: {exc}")
        for address in added:
            try:
                self.serve(address)
            except TransportError as exc:
                if "EADDRINUSE" not in str(exc):
                    self.log.error(f"cannot serve {address} added to the address file: {exc}")
                    continue
                threading.Thread(target=self._reopen, args=(address,), name="openfl-reopen", daemon=True).start()
            except ConfigurationError as exc:
                self.log.error(f"cannot serve {address} added to the address file: {exc}")

    def _reopen(self, address: Address) -> None:
        """From a thread of its own: host the store of ``address`` once its port is free again
        (a store closed a moment ago keeps it while its last connections close), then hand it to
        the serve loop through ``on_opened``."""
        deadline = time.monotonic() + self._connect.total_seconds()
        delay, attempt = 0.2, 0
        while not self._closed.is_set():
            attempt += 1
            left = deadline - time.monotonic()
            try:
                store = open_store(address, backend=True, timeout=timedelta(seconds=max(1.0, min(left, 10.0))))
            except (TransportError, ConfigurationError) as exc:
                if left <= 0 or "EADDRINUSE" not in str(exc):
                    self.log.error(f"cannot serve {address} added to the address file: {exc}")
                    return
                self.log.info(f"cannot serve {address.init_method} yet: its port is still in use; attempt {attempt}, "
                              f"trying again in {delay:.1f} s, giving up in {seconds(left)}")
                self._closed.wait(delay)
                delay = min(2 * delay, 5.0)
                continue
            self._on_opened(address, store)
            return

    def opened(self, address: Address, store: Store) -> None:
        """In a turn: serve ``address`` on the store :meth:`_reopen` hosted."""
        try:
            self.serve(address, store=store)
        except ConfigurationError as exc:
            self.log.error(f"cannot serve {address}: {exc}")

    def end(self, reason: str) -> None:
        """Record the end of the federation in every store, for frontends whose pipe broke."""
        for lobby in self.lobbies.values():
            lobby.end(reason)

    def close(self) -> None:
        """Stop watching and admitting, and remove the file stores this backend created."""
        self._closed.set()
        if self._watcher is not None:
            self._watcher.stop()
        for lobby in self.lobbies.values():
            lobby.close()
        self.lobbies.clear()
        for path in self._files:
            path.unlink(missing_ok=True)


def _differences(old: Address, new: Address) -> str:
    """``"world_size 3 -> 4"``: the fields of an address-file entry that changed."""
    parts = [f"{name} {before} -> {after}" for name, before, after in
             ((name, getattr(old, name), getattr(new, name)) for name in ("world_size", "rank", "backend"))
             if before != after]
    return ", ".join(parts) or "no field"
