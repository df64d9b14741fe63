"""The backend's part in secure aggregation: forms rounds, relays shares, unmasks the sum."""

from __future__ import annotations

import secrets
import time
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.errors import PayloadError
from openfl_api.transforms.secagg.board import Board
from openfl_api.transforms.secagg.masking import RING, dequantize_sum, neighbours_of
from openfl_api.transforms.secagg.recovery import Round, unmasked
from openfl_api.transforms.secagg.settings import SecAgg, SecAggFailure

__all__ = ["Coordinator"]

KEYS, SHARES, CHECK, MASKED_STAGE, UNMASK, READY, FAILED = "keys", "shares", "check", "masked", "unmask", "ready", "failed"

# What a failed round's line advises when members were late or gone.
_LATE = ("if these members are slow rather than gone, raise SecAgg(deadline=...); a member that left takes no "
         "part in the next round")


class Coordinator:
    """The backend's part: forms each round's members, relays shares, sums the masked updates,
    rebuilds what the survivors' shares allow and unmasks the sum.

    Driven by the serve loop (:meth:`tick` every turn); never blocks it.

    Args:
        transform: the settings.
        board: the board over every served address's store.
        run: this backend start's run id.
        size: coordinates of the update vector.
        clip_range: the quantization range.
        log: a bound logger.
        asynchronous: whether rounds are buffers of ``cohort`` frontends.
    """

    def __init__(self, transform: SecAgg, board: Board, run: str, size: int, clip_range: float, log: Any,
                 asynchronous: bool) -> None:
        self.transform, self.board, self.run, self.size, self.clip_range, self.log = (
            transform, board, run, size, clip_range, log)
        self.asynchronous = asynchronous
        self.counter = 0
        self.round_id = ""
        self.version = -1
        self.again = 0  # synchronous mode: rounds opened again for the current version
        self.stage = ""
        self.refused: List[Tuple[str, str]] = []  # (client, reason) to count in the ledger
        self.result: Optional[Tuple[torch.Tensor, int]] = None  # (weighted sum of updates, total weight)
        self.control_bytes: Dict[str, int] = {}  # round -> store bytes
        self._reset()

    def _reset(self) -> None:
        self.keys: Dict[str, Dict[str, Any]] = {}
        self.first_key: Optional[float] = None
        self.stage_start = time.monotonic()
        self.members: Dict[str, list] = {}
        self.shares: Dict[str, Dict[str, Any]] = {}
        self.checked: Dict[str, List[str]] = {}
        self.masking: List[str] = []
        self.deposited: Dict[str, int] = {}  # client -> weight
        self.sum = np.zeros(self.size, dtype=np.uint32)
        self.unmasks: Dict[str, Dict[str, Any]] = {}
        self._read: Dict[Tuple[int, str], int] = {}
        self.t = 0
        self.graph: Dict[str, List[str]] = {}

    # ------------------------------------------------------------------ rounds
    def open(self, version: int) -> None:
        """Open the next round, for ``version`` (synchronous) or the next buffer (asynchronous).

        Synchronous rounds are named by their version; a round opened again for the same version
        (the one before failed) gets the next free ``<version>.<n>``."""
        self._reset()
        self.counter += 1
        if self.asynchronous:
            self.round_id = f"b{self.counter}"
        else:
            self.again = self.again + 1 if version == self.version else 0
            self.round_id = str(version) if self.again == 0 else f"{version}.{self.again}"
        self.version = version
        self.stage = KEYS
        self.result = None
        self._traffic = self.board.sent + self.board.received
        self.board.put("open", {"round": self.round_id, "version": version})

    def _slots(self, stage: str) -> List[Dict[str, Any]]:
        """New values of ``stage`` on every store since the last call."""
        found = []
        for index, store in enumerate(self.board.stores):
            key = (index, stage)
            have = self._read.get(key, 0)
            total = self.board.count(f"{self.round_id}/{stage}", store)
            for slot in range(have, total):
                try:
                    found.append(self.board.get(f"{self.round_id}/{stage}/{slot}", store))
                except SecAggFailure as exc:
                    self.log.warning(f"secure aggregation round {self.round_id}: ignored a {stage} value: {exc}")
            self._read[key] = total
        return [v for v in found if isinstance(v, dict) and isinstance(v.get("client"), str)]

    def _late(self) -> bool:
        return time.monotonic() - self.stage_start >= self.transform.deadline.total_seconds()

    def _next(self, stage: str) -> None:
        self.stage, self.stage_start = stage, time.monotonic()

    def fail(self, reason: str, culprits: Sequence[str] = (), fix: str = "") -> NoReturn:
        """End the round: nothing of it is aggregated; frontends waiting on it are told.

        ``culprits``: the members that made it fail; ``fix``: what would keep it from failing."""
        self.stage = FAILED
        self.board.put(f"{self.round_id}/failed", {"reason": reason})
        raise SecAggFailure(f"secure aggregation round {self.round_id} failed: {reason}", culprits, fix)

    def tick(self, connected: Sequence[str], expected: Optional[Sequence[str]], needed: int = 0) -> bool:
        """Advance the round as far as what arrived allows; True once its sum is ready.

        ``needed``: synchronous mode, the uploads the aggregation steps need (``AggregateCount``'s
        count): the key stage waits for that many members too, until its deadline.
        """
        stage = self.stage
        if stage == KEYS:
            self._keys(connected, expected, needed)
        elif stage == SHARES:
            self._shares()
        elif stage == CHECK:
            self._check()
        elif stage == MASKED_STAGE:
            self._masked_stage(connected)
        elif stage == UNMASK:
            self._unmask()
        return self.stage == READY

    def _keys(self, connected: Sequence[str], expected: Optional[Sequence[str]], needed: int = 0) -> None:
        for value in self._slots("keys"):
            client = value["client"]
            if client in self.keys or not {"c", "s", "w"} <= set(value):
                continue
            self.keys[client] = value
            if self.first_key is None:
                self.first_key = time.monotonic()
        if self.asynchronous:
            wanted = self.transform.cohort or len(connected)
            full = len(self.keys) >= wanted
        else:
            wanted = len(expected) if expected is not None else len(connected)
            pool = set(expected) if expected is not None else set(connected)
            full = len(self.keys) >= max(wanted, needed, self.transform.min_clients) and pool <= set(self.keys)
        late = self.first_key is not None and time.monotonic() - self.first_key >= self.transform.deadline.total_seconds()
        if not (full or (late and len(self.keys) >= self.transform.min_clients)):
            return
        chosen = list(self.keys)  # in the order their keys came
        if self.asynchronous and self.transform.cohort is not None:
            chosen = chosen[:self.transform.cohort]  # FedBuff's buffer: the first to come; the others join the next
        chosen = sorted(chosen)
        weight = sum(int(self.keys[c]["w"]) for c in chosen)
        if weight * (2**self.transform.bits - 1) >= RING:
            self.fail(f"the weighted sum of {len(chosen)} members (total weight {weight}) could wrap the 32-bit ring at "
                      f"bits={self.transform.bits}", fix="lower SecAgg(bits=...) or the weights (num_samples)")
        self.members = {c: [c, i + 1, self.keys[c]["c"], self.keys[c]["s"], int(self.keys[c]["w"])]
                        for i, c in enumerate(chosen)}
        seed = secrets.token_hex(16) if self.transform.neighbours is not None else None
        self.graph = neighbours_of(chosen, self.transform.neighbours, seed)
        holders = len(next(iter(self.graph.values()))) + 1
        self.t = self.transform.holders_threshold(holders)
        self.board.put(f"{self.round_id}/U1", {"members": list(self.members.values()), "t": self.t,
                                               "neighbours": self.transform.neighbours, "graph": seed,
                                               "clip_range": self.clip_range, "bits": self.transform.bits})
        self.log.info(f"secure aggregation round {self.round_id}: {len(chosen)} members, shares {self.t} of {holders}")
        self._next(SHARES)

    def _shares(self) -> None:
        for value in self._slots("shares"):
            client = value["client"]
            if client in self.members and client not in self.shares and isinstance(value.get("sealed"), dict):
                self.shares[client] = value
        if len(self.shares) < len(self.members) and not (self._late() and len(self.shares) >= self.transform.min_clients):
            if self._late():
                self.fail(f"only {len(self.shares)} of {len(self.members)} members sent their shares within "
                          f"{self.transform.deadline}; min_clients={self.transform.min_clients}",
                          [c for c in self.members if c not in self.shares], _LATE)
            return
        u2 = sorted(self.shares)
        for holder in u2:
            inbox = {dealer: self.shares[dealer]["sealed"][holder] for dealer in u2
                     if holder in self.shares[dealer]["sealed"] and dealer != holder}
            own = self.shares[holder]["sealed"].get(holder)
            if own is not None:
                inbox[holder] = own
            self.board.put(f"{self.round_id}/inbox/{self.members[holder][1]}", inbox)
        # U2 tells the members that their inboxes are complete: a member reads its inbox once it sees U2.
        self.board.put(f"{self.round_id}/U2", {"members": u2})
        self._next(CHECK)

    def _check(self) -> None:
        u2 = set(self.shares)
        for value in self._slots("checked"):
            client = value["client"]
            if client in u2 and client not in self.checked and isinstance(value.get("bad"), list):
                self.checked[client] = [str(b) for b in value["bad"]]
        if len(self.checked) < len(u2) and not self._late():
            return
        # A dealer is refused when most of its holders that checked found its shares bad; one holder
        # alone (itself with a wrong key, or lying) cannot get an honest dealer refused.
        accused = set()
        for dealer in sorted(u2):
            holders = [h for h in self.graph[dealer] if h in self.checked]
            accusers = sorted(h for h in holders if dealer in self.checked[h])
            if accusers and 2 * len(accusers) > len(holders):
                accused.add(dealer)
                reason = (f"secure aggregation round {self.round_id}: shares of {dealer} failed authentication at "
                          f"{accusers} of its {len(holders)} holders (altered, or sealed with a wrong key); refused "
                          "from the round")
                self.log.warning(reason)
                self.refused.append((dealer, reason))
        self.masking = sorted(c for c in self.checked if c not in accused)
        if len(self.masking) < self.transform.min_clients:
            self.fail(f"only {len(self.masking)} members may mask after the share check; min_clients="
                      f"{self.transform.min_clients}", sorted(accused | (u2 - set(self.checked))),
                      "check the frontends whose shares failed authentication (logged above); " + _LATE)
        self.board.put(f"{self.round_id}/masking", {"members": self.masking})
        self._next(MASKED_STAGE)

    def admit(self, client: str) -> None:
        """Check that a masked upload of ``client`` belongs to the open round's masked stage."""
        if self.stage != MASKED_STAGE:
            raise PayloadError(f"a masked upload came while secure aggregation round {self.round_id or '-'} is at its "
                               f"{self.stage or 'start'} stage; it counts only in the masked-input stage")
        if client not in self.masking:
            raise PayloadError(f"client {client} is not a member of secure aggregation round {self.round_id}")
        if client in self.deposited:
            raise PayloadError(f"client {client} sent a second masked upload in round {self.round_id}")

    def deposit(self, client: str, masked: torch.Tensor, weight: int) -> None:
        """Add one masked upload (int32 words, read as uint32) to the round's sum."""
        if weight != self.members[client][4]:
            raise PayloadError(f"client {client} advertised weight {self.members[client][4]} but uploaded with {weight}")
        np.add(self.sum, masked.numpy().view(np.uint32), out=self.sum)
        self.deposited[client] = weight

    def _masked_stage(self, connected: Sequence[str] = ()) -> None:
        # A member whose pipe closed will not upload: the stage need not wait for it.
        waiting = [c for c in self.masking if c not in self.deposited and (not connected or c in connected)]
        if waiting and not self._late():
            return
        if len(self.deposited) < self.transform.min_clients:
            if self._late():
                self.fail(f"only {len(self.deposited)} of {len(self.masking)} masked updates arrived within "
                          f"{self.transform.deadline}; min_clients={self.transform.min_clients}",
                          [c for c in self.masking if c not in self.deposited], _LATE)
            return
        dropped = sorted(set(self.masking) - set(self.deposited))
        if dropped:
            self.log.warning(f"secure aggregation round {self.round_id}: {dropped} dropped after masking; their masks "
                             "are removed from the sum with the survivors' shares")
        self.board.put(f"{self.round_id}/U3", {"members": sorted(self.deposited)})
        self._next(UNMASK)

    def _refuse(self, holder: str, reason: str) -> None:
        self.log.warning(reason)
        self.refused.append((holder, reason))

    def _unmask(self) -> None:
        survivors = set(self.deposited)
        for value in self._slots("unmask"):
            client = value["client"]
            if client in survivors and client not in self.unmasks and isinstance(value.get("b"), dict) \
                    and isinstance(value.get("s"), dict):
                self.unmasks[client] = value
        if len(self.unmasks) < len(survivors) and not self._late():
            return
        done = Round(self.run, self.round_id, self.members, self.graph, self.t, self.shares, self.masking,
                     sorted(survivors), self.unmasks)
        try:
            words = unmasked(self.sum, done, self._refuse)
        except SecAggFailure as exc:
            self.fail(str(exc), exc.culprits, exc.fix)
        weight = sum(self.deposited.values())
        self.result = (dequantize_sum(words, weight, self.clip_range, self.transform.bits), weight)
        self.control_bytes[self.round_id] = self.board.sent + self.board.received - self._traffic
        self._next(READY)

