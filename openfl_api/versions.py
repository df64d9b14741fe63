"""The version rules of a backend as pure bookkeeping: judge an upload, accept it, advance.

- The global ``version`` starts at 0 (or a resumed checkpoint's) and grows by one per aggregation.
- Synchronous mode: an upload trained from version ``tag`` is accepted when ``tag`` equals the
  global version and its client has no accepted upload for that version yet. Otherwise it is
  discarded as *stale* (``tag`` below), *future* (``tag`` above) or *duplicate*.
- Asynchronous mode: an upload is accepted while its staleness ``version - tag`` is within
  ``max_staleness``, with the weight ``staleness(d)``; a future tag is discarded.

Nothing here touches a tensor, a pipe or a thread: the backend asks, these objects answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from openfl_api.asynchronous import Asynchronous

__all__ = ["Verdict", "Versions", "client_order"]


def client_order(client: str) -> Tuple[int, int, str]:
    """Natural order of client ids: numbers by value (``"2"`` before ``"10"``), then names.

    The backend lists clients in this order, and sampling draws from them in this order.
    """
    return (0, int(client), "") if client.isascii() and client.isdigit() else (1, 0, client)


@dataclass(frozen=True)
class Verdict:
    """What the version rules say of one upload.

    Attributes:
        accepted: whether it may go into the version's aggregate.
        reason: why it was discarded; starts with the kind (``"stale"``, ``"future"``,
            ``"duplicate"``, ``"too stale"``) followed by a colon.
        weight: the staleness weight in ``(0, 1]`` (asynchronous mode), 1.0 otherwise.
    """

    accepted: bool
    reason: str = ""
    weight: float = 1.0

    @property
    def kind(self) -> str:
        """The kind of discard (the reason up to its colon), or ``""`` when accepted."""
        return self.reason.split(":")[0]


class Versions:
    """The global version, the uploads accepted for it, and the rules that judge new ones.

    Args:
        asynchronous: the asynchronous settings, or None for synchronous mode.
    """

    def __init__(self, asynchronous: Optional[Asynchronous] = None) -> None:
        self.asynchronous = asynchronous
        self.version = 0
        #: uploads accepted for the current version
        self.accepted = 0
        #: client id -> the version of its last accepted upload
        self.uploaded: Dict[str, int] = {}
        # Asynchronous mode: the sums of staleness-weighted and of plain aggregation weights, and
        # each accepted upload's (client, weighted, plain) in arrival order, so that one can be withdrawn.
        self._weighted = 0.0
        self._plain = 0.0
        self._weights: List[Tuple[str, float, float]] = []

    def judge(self, tag: int, client: str) -> Verdict:
        """Apply the version rule to an upload trained from version ``tag`` by ``client``."""
        version = self.version
        if tag > version:
            return Verdict(False, f"future: trained from version {tag} but the global version is only {version}")
        staleness = version - tag
        if self.asynchronous is not None:
            bound = self.asynchronous.max_staleness
            if bound is not None and staleness > bound:
                return Verdict(False, f"too stale: trained from version {tag}, {staleness} versions behind the "
                                      f"global version {version}; max_staleness is {bound}")
            return Verdict(True, weight=self.asynchronous.weight(staleness))
        if tag < version:
            return Verdict(False, f"stale: trained from version {tag} but the global version is {version}")
        if self.uploaded.get(client) == version:
            return Verdict(False, f"duplicate: client {client} has an accepted upload for version {version} already")
        return Verdict(True)

    def accept(self, client: str, weighted: float, plain: float) -> None:
        """Count an accepted upload of ``client``; ``weighted`` and ``plain`` are its aggregation
        weight with and without the staleness factor (they set the asynchronous mixing weight)."""
        self.uploaded[client] = self.version
        self.accepted += 1
        self._weighted += weighted
        self._plain += plain
        self._weights.append((client, weighted, plain))

    def withdraw(self, clients: Iterable[str]) -> int:
        """Take back the accepted uploads of ``clients`` for the current version (their secure
        aggregation round failed); returns how many were taken back. Their clients may upload for
        the version again."""
        gone = set(clients)
        kept = [entry for entry in self._weights if entry[0] not in gone]
        count = len(self._weights) - len(kept)
        if count == 0:
            return 0
        self._weights = kept
        self.accepted -= count
        self._weighted = sum(entry[1] for entry in kept) + 0.0  # added in arrival order, as accept() does
        self._plain = sum(entry[2] for entry in kept) + 0.0
        for client in gone:
            if self.uploaded.get(client) == self.version:
                del self.uploaded[client]
        return count

    def mixing(self) -> Optional[float]:
        """Asynchronous mode: the weight ``alpha * mean staleness weight`` in ``[0, 1]`` with which
        the aggregate is mixed into the global model; None in synchronous mode."""
        if self.asynchronous is None:
            return None
        mean = self._weighted / self._plain if self._plain > 0 else 1.0
        return min(max(self.asynchronous.alpha * mean, 0.0), 1.0)

    def advance(self) -> int:
        """Start the next version; return how many uploads the finished one accepted."""
        count = self.accepted
        self.accepted = 0
        self._weighted = self._plain = 0.0
        self._weights = []
        self.version += 1
        return count

    def took_part(self, clients: Iterable[str]) -> bool:
        """Whether any of ``clients`` has an accepted upload for the current version."""
        return any(self.uploaded.get(c) == self.version for c in clients)

    def uploaded_now(self) -> Dict[str, int]:
        """The clients with an accepted upload for the current version."""
        return {c: v for c, v in self.uploaded.items() if v == self.version}

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint needs to continue the current version exactly."""
        return {"version": self.version, "accepted": self.accepted, "uploaded": self.uploaded_now(),
                "mix": [self._weighted, self._plain]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.accepted = int(state["accepted"])
        self.uploaded = {str(c): int(v) for c, v in state["uploaded"].items()}
        self._weighted, self._plain = (float(x) for x in state["mix"])
