"""Who takes part: a frontend's first request registers its clients and is checked, or refused.

:class:`Admission` is the part of :class:`~openfl_api.backend.exchange.Exchange` that registers
the client ids a frontend hosts, checks that its model and upload chain are the backend's, refuses
it with the reason (the frontend raises ``ConfigurationError`` for a model mismatch,
``AdmissionError`` otherwise), and forgets a frontend that left.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from openfl_api.backend.model import GlobalModel
from openfl_api.backend.worker import Worker, end_message
from openfl_api.payload import describe_differences, dtype_name
from openfl_api.step import Transfer

__all__ = ["Admission", "MAX_CLIENTS"]

MAX_CLIENTS = 100_000


class Admission:
    """The part of :class:`~openfl_api.backend.exchange.Exchange` that admits frontends.

    Expects ``server``, ``log``, ``model``, ``clients``, ``waiting``, ``epoch`` and ``transforms``
    on the object.
    """

    server: Any
    log: Any
    model: Optional[GlobalModel]
    clients: Dict[str, Worker]
    waiting: List[Tuple[Worker, Transfer]]
    epoch: int
    transforms: Any

    def register(self, worker: Worker, header: Dict[str, Any]) -> Optional[Tuple[str, str]]:
        """Record the client ids a frontend hosts and check its model (its first request).

        Returns:
            ``(reason, code)`` if the frontend is refused, else None.
        """
        if worker.clients is not None:
            return None
        mismatch = self._model_mismatch(worker, header.get("schema"))
        if mismatch is not None:
            return mismatch, "mismatch"
        # Upload transforms: the chain the frontend declares must be the backend's.
        if self.transforms is not None:
            mismatch = self.transforms.mismatch(header.get("transforms"))
        elif header.get("transforms") is not None:
            mismatch = "it declares upload transforms and the backend none; declare the same on every rank"
        if mismatch is not None:
            return mismatch, "mismatch"
        named = header.get("clients")
        if named is None:
            clients: Tuple[str, ...] = (worker.label,)
        else:
            if (not isinstance(named, list) or not 0 < len(named) <= MAX_CLIENTS
                    or not all(isinstance(c, str) and 0 < len(c) <= 64 and c.isprintable() for c in named)
                    or len(set(named)) != len(named)):
                return (f"'clients' must list 1 to {MAX_CLIENTS} distinct printable ids of at most 64 characters, "
                        f"got {str(named)[:80]}"), "refused"
            clients = tuple(named)
            worker.hosts_many = True
        taken = [c for c in clients if c in self.clients]
        if taken:
            owner = self.clients[taken[0]]
            return (f"client id {taken[0]!r} is hosted by {owner.label} already; give each frontend its own "
                    "client ids"), "refused"
        worker.clients = clients
        for client in clients:
            self.clients[client] = worker
        self.epoch += 1
        if worker.hosts_many:
            self.log.info(f"{worker.label} hosts {len(clients)} clients")
        return None

    def _model_mismatch(self, worker: Worker, schema: Any) -> Optional[str]:
        if schema is None:
            return None
        if not isinstance(schema, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(e[2], list) for e in schema
        ):
            return "its first request carries a malformed 'schema'; it must list [name, dtype, shape] per tensor"
        theirs = {name: (dtype, tuple(shape)) for name, dtype, shape in schema}
        ours = {s.name: (dtype_name(s.dtype), s.shape) for s in self.model.state.upload_schema.specs}
        differences = describe_differences(theirs, ours, "the frontend's model", "the backend's")
        if not differences:
            return None
        return (f"its model does not match the backend's: {differences}. Build the same model, with the same "
                "aggregator and optimizer state, on every rank")

    def leave(self, worker: Worker) -> None:
        """Forget a frontend that left: its clients and its held download."""
        for client in worker.clients or ():
            if self.clients.get(client) is worker:
                del self.clients[client]
                self.epoch += 1
        for item in [w for w in self.waiting if w[0] is worker]:
            self.waiting.remove(item)
            self.server.ledger.add(worker.label, "pending", -1)
        self.epoch += 1

    def refuse(self, worker: Worker, reason: str, code: str = "refused") -> None:
        """Close a frontend's pipe after telling it why."""
        level = "ERROR" if code == "mismatch" else "WARNING"
        self.log.log(level, f"refused {worker.label} ({worker.peer.nick_name}): {reason}")
        self.server.ledger.refuse(f"{worker.label}: {reason}")
        worker.closing = True
        worker.refused = True
        worker.reply(end_message(f"refused: {reason}", code))
