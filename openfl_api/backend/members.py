"""Who takes part: the frontends admitted on the backend's addresses, as they join and leave."""

from __future__ import annotations

from typing import Any, Dict, Optional

from openfl_api.address import Address
from openfl_api.backend.addresses import CHANGED, REMOVED, Addresses
from openfl_api.backend.worker import AddressChange, Joined, Worker
from openfl_api.step import Event
from openfl_api.transport.base import Pipe
from openfl_api.transport.rendezvous import Peer

__all__ = ["Members"]


class Members:
    """The served addresses and the frontends connected on them.

    Args:
        server: the :class:`~openfl_api.backend.server.Server` (its loop posts and handles the events).
        token: the admission token.
    """

    def __init__(self, server: Any, token: bytes) -> None:
        self.server = server
        self.workers: Dict[int, Worker] = {}
        self.addresses = Addresses(token, server.timeouts.connect, server.nick_name, server.log,
                                   on_admit=self._admit, on_refuse=self._refuse,
                                   on_opened=lambda address, store: server.post(
                                       AddressChange(opened=[(address, store)]), force=True),
                                   protect_wire=server.protect_wire)

    def serve(self, address: Address) -> None:
        """Host or open the store of ``address`` and start admitting frontends there."""
        self.addresses.serve(address)

    def watch(self, path: str) -> None:
        """Serve every address in the file ``path`` and follow its changes while running."""
        self.addresses.watch(path, lambda added, removed, changed: self.server.post(
            AddressChange(added, removed, changed), force=True))

    def _admit(self, pipe: Pipe, peer: Peer) -> None:
        """From a handshake thread: a frontend was admitted; its worker starts once the loop knows."""
        lobby = self.addresses.lobby(peer.address)
        if lobby is None:  # the address was removed while the frontend joined
            pipe.close()
            return
        worker = Worker(self.server, pipe, peer, lobby)
        self.server.post(Joined(worker), force=True)
        worker.start()

    def _refuse(self, rank: Optional[int], reason: str) -> None:
        self.server.ledger.refuse(reason)
        self.server.log.warning(f"refused a frontend (rank {rank}): {reason}")

    def joined(self, worker: Worker, fire: bool = True) -> None:
        """In a turn: record a join and fire ``on_join`` (not once the loop ended)."""
        self.workers[id(worker)] = worker
        try:
            if fire:
                self.server.exchange.epoch += 1
                peer = worker.peer
                self.server.log.info(f"rank {peer.rank} ({peer.nick_name}) joined on {peer.address.init_method}")
                self.server.fire(Event.ON_JOIN, peer)
        finally:
            worker.joined.set()

    def left(self, worker: Worker, reason: str) -> None:
        """In a turn: forget a frontend whose pipe closed and fire ``on_leave`` (not once the loop ended)."""
        if self.workers.pop(id(worker), None) is None:
            return
        server = self.server
        server.exchange.leave(worker)
        if worker.refused:
            reason = "refused (see above)"
        level = "INFO" if reason in ("said goodbye", "address removed", "address changed", "refused (see above)") \
            else "WARNING"
        server.log.log(level, f"rank {worker.peer.rank} ({worker.peer.nick_name}) left: {reason}")
        if not server.ended:
            server.fire(Event.ON_LEAVE, worker.peer)

    def change(self, change: AddressChange) -> None:
        """In a turn: the address file changed. Frontends of a removed address are told the
        federation ended; those of a changed one are told to join again (``code="changed"``)."""
        ending = {a.key: (REMOVED, "ended") for a in change.removed if self.addresses.lobby(a) is not None}
        ending.update({old.key: (CHANGED, "changed") for old, _ in change.changed
                       if self.addresses.lobby(old) is not None})
        for worker in list(self.workers.values()):
            if worker.peer.address.key in ending:
                worker.closing = True
                worker.ending = ending[worker.peer.address.key]
                self.server.exchange.answer_held(worker, *worker.ending)
        self.addresses.change(change.added, change.removed, change.changed)
        for address, store in change.opened:
            self.addresses.opened(address, store)

    def close(self, drained: bool, drain: Any) -> None:
        """Close the pipes of frontends still connected and every address; after an interrupt
        (``drained`` False) the pipes are left to the process's exit."""
        for worker in self.workers.values():
            worker.closing = True
            if drained:
                self.server.log.warning(f"rank {worker.peer.rank} did not leave within {drain}; closing its pipe")
                worker.pipe.close()
        if drained:
            for worker in self.workers.values():
                worker.join(self.server.timeouts.tick * 20)
        self.workers.clear()
        self.addresses.close()
