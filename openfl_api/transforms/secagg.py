"""Secure aggregation: the backend learns the sum of the updates of a round, not one of them.

Bonawitz et al., 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning"),
with SecAgg+'s sparse neighbour graph as an option (Bell et al., 2020). Each frontend quantizes
its update to the ring of 32-bit integers and adds masks that cancel in the sum: a pairwise mask
per neighbour from X25519 key agreement, and a self mask; both masks' seeds are Shamir-shared with
the neighbours, so the backend can remove the pairwise masks of a frontend that drops after
masking (from shares of its key) and the self masks of the survivors (from shares of their
seeds), never both for one frontend.

The rounds run over the address's store (the control plane), under
``transforms/<run>/secagg/<round>/``; every value is JSON with an HMAC under the admission token.
The masked update itself travels as the upload's payload (``wire/masked``, int32). See
``docs/privacy.rst`` for the message table.

Synchronous mode: one round per version, with every client connected (or expected by
:class:`~openfl_api.ClientSampling`). Asynchronous mode: one round per buffer of ``cohort``
frontends, the first that are ready to upload, whatever version they trained from (FedBuff's
buffer; staleness weights the buffer through the mixing weight).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from openfl_api.errors import ConfigurationError, OpenFLError, PayloadError
from openfl_api.payload import TensorSpec
from openfl_api.transforms import crypto
from openfl_api.transforms.base import Stage, Transform, check_int, check_number
from openfl_api.transforms.layout import WIRE

__all__ = ["SecAgg", "Board", "SecAggClient", "Coordinator", "quantize", "dequantize_sum", "neighbours_of",
           "SecAggFailure", "FederationEnded"]

MASKED = f"{WIRE}masked"
#: Seconds between a waiting frontend's checks whether the backend recorded the end of the federation.
ENDED_EVERY = 0.5
RING = 2**32
_INFO = "openfl_api/secagg/v1"


class SecAggFailure(OpenFLError, RuntimeError):
    """A secure-aggregation round cannot give the sum (too few shares, a bad share, ...)."""


class FederationEnded(Exception):
    """The federation ended while a frontend waited on a round (not an error)."""


class SecAgg(Transform):
    """Secure aggregation of the uploads of each round (see the module docstring).

    Args:
        clip_range: each coordinate of an update is clamped to ``[-clip_range, clip_range]`` before
            it is quantized; None takes the bound of a :class:`~openfl_api.transforms.Clip` before
            it (a clipped update has no coordinate above its norm bound).
        bits: quantization levels ``2**bits``, in ``[1, 24]``; the step is
            ``2 * clip_range / (2**bits - 1)``. The weighted sum of a round must fit the 32-bit
            ring: ``sum of weights * (2**bits - 1) < 2**32`` (checked when a round's members are known).
        threshold: a dealer's secrets are rebuilt from more than ``threshold`` of its share holders
            (``t = floor(threshold * holders) + 1``), in ``[0.5, 1)``: a majority at least.
        neighbours: None: every member masks with every other (SecAgg). An even number ``k``: each
            member masks with ``k`` neighbours on a ring over the members in a random order that the
            backend draws (SecAgg+); shares are held by the neighbours and the member itself.
        deadline: how long a stage waits for the members that have not answered (the key stage
            counts from the first key of the round) before it goes on with those that did.
        min_clients: the fewest members a round goes on with, >= 2.
        cohort: asynchronous mode: members per round (the FedBuff buffer size), >= 2. Synchronous
            mode: None, every connected client (or every client a sampling step expects).
    """

    stage = Stage.MASK

    def __init__(self, clip_range: Optional[float] = None, bits: int = 16, threshold: float = 0.5,
                 neighbours: Optional[int] = None, deadline: timedelta = timedelta(seconds=60),
                 min_clients: int = 2, cohort: Optional[int] = None) -> None:
        crypto.require()
        self.clip_range = None if clip_range is None else check_number("SecAgg", "clip_range", clip_range, 0.0,
                                                                       low_open=True)
        self.bits = check_int("SecAgg", "bits", bits, 1, 24)
        self.threshold = check_number("SecAgg", "threshold", threshold, 0.5, 1.0, high_open=True)
        if neighbours is not None:
            neighbours = check_int("SecAgg", "neighbours", neighbours, 2)
            if neighbours % 2:
                raise ConfigurationError(f"SecAgg(neighbours=...) must be even (half on each side of a member in the "
                                         f"ring), got {neighbours}")
        self.neighbours = neighbours
        if not isinstance(deadline, timedelta) or deadline <= timedelta(0):
            raise ConfigurationError(f"SecAgg(deadline=...) must be a positive datetime.timedelta; got {deadline!r}")
        self.deadline = deadline
        self.min_clients = check_int("SecAgg", "min_clients", min_clients, 2)
        self.cohort = None if cohort is None else check_int("SecAgg", "cohort", cohort, 2)

    def config(self) -> Dict[str, Any]:
        return {"clip_range": self.clip_range, "bits": self.bits, "threshold": self.threshold,
                "neighbours": self.neighbours, "deadline": self.deadline.total_seconds(),
                "min_clients": self.min_clients, "cohort": self.cohort}

    def specs(self, size: int) -> List[TensorSpec]:
        return [TensorSpec(MASKED, torch.int32, (size,))]

    def step(self, clip_range: float) -> float:
        """The quantization step for ``clip_range``."""
        return 2 * clip_range / (2**self.bits - 1)

    def holders_threshold(self, holders: int) -> int:
        return min(holders, math.floor(self.threshold * holders) + 1)


# --------------------------------------------------------------------------------------- quantization
def quantize(vector: torch.Tensor, clip_range: float, bits: int, generator: torch.Generator) -> Tuple[np.ndarray, int]:
    """Stochastic rounding of ``clamp(x, -c, c) + c`` to multiples of the step: uint32 levels in
    ``[0, 2**bits - 1]``, unbiased for coordinates within the range; returns ``(levels, clamped count)``."""
    step = 2 * clip_range / (2**bits - 1)
    clamped = int((vector.abs() > clip_range).sum())
    scaled = (vector.to(torch.float64).clamp(-clip_range, clip_range) + clip_range) / step
    low = scaled.floor()
    up = torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - low)
    levels = (low + up.to(torch.float64)).clamp_(0, 2**bits - 1)
    return levels.numpy().astype(np.uint32), clamped


def dequantize_sum(total: np.ndarray, weight: int, clip_range: float, bits: int) -> torch.Tensor:
    """The weighted sum of updates from the unmasked sum of weighted levels (float64)."""
    step = 2 * clip_range / (2**bits - 1)
    return torch.from_numpy(total.astype(np.float64) * step - clip_range * weight)


# --------------------------------------------------------------------------------------- the graph
def neighbours_of(members: Sequence[str], neighbours: Optional[int], seed: Optional[str]) -> Dict[str, List[str]]:
    """Each member's neighbours: all the others (SecAgg), or ``neighbours`` on a ring over the
    members shuffled by ``seed`` (SecAgg+)."""
    members = list(members)
    if neighbours is None or neighbours >= len(members) - 1:
        return {m: [o for o in members if o != m] for m in members}
    rng = np.random.default_rng(np.frombuffer(bytes.fromhex(seed), dtype=np.uint32))
    order = [members[i] for i in rng.permutation(len(members))]
    half = neighbours // 2
    n = len(order)
    out: Dict[str, List[str]] = {}
    for i, m in enumerate(order):
        out[m] = [order[(i + d) % n] for d in range(-half, half + 1) if d != 0]
    return out


# --------------------------------------------------------------------------------------- the board
class Board:
    """Signed JSON values on a store under ``transforms/<run>/secagg/``, with the bytes counted.

    Args:
        stores: the stores to write to (the backend serves several addresses) and read from.
        run: the backend's run id (fresh per backend start, so an old file store never confuses).
        token: the admission token (the HMAC key).
    """

    def __init__(self, stores: Sequence[Any], run: str, token: bytes) -> None:
        self.stores = list(stores)
        self.prefix = f"transforms/{run}/secagg/"
        self.token = token
        self.sent = 0
        self.received = 0

    def put(self, key: str, value: Any) -> None:
        full = self.prefix + key
        body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
        raw = json.dumps({"v": body.decode("utf-8"), "mac": crypto.mac(self.token, full, body)}).encode("utf-8")
        for store in self.stores:
            store.set(full, raw)
            self.sent += len(raw)

    def append(self, stage: str, value: Any, store: Any = None) -> None:
        """Write ``value`` to the next free slot of ``stage`` (``<stage>/<n>``)."""
        target = store if store is not None else self.stores[0]
        slot = target.add(self.prefix + f"{stage}/n", 1) - 1
        one = Board([target], "", self.token)
        one.prefix = self.prefix
        one.put(f"{stage}/{slot}", value)
        self.sent += one.sent

    def has(self, key: str, store: Any = None) -> bool:
        return (store if store is not None else self.stores[0]).check([self.prefix + key])

    def get(self, key: str, store: Any = None) -> Any:
        """The value at ``key``; raise SecAggFailure if its HMAC does not check (altered or foreign)."""
        full = self.prefix + key
        raw = (store if store is not None else self.stores[0]).get(full)
        self.received += len(raw)
        try:
            outer = json.loads(raw.decode("utf-8"))
            body = outer["v"].encode("utf-8")
            tag = outer["mac"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SecAggFailure(f"store value {full!r} is not a signed JSON value") from None
        if not isinstance(tag, str) or not crypto.check_mac(self.token, full, body, tag):
            raise SecAggFailure(f"store value {full!r} failed its HMAC check (altered, or written without the "
                                "admission token)")
        return json.loads(body.decode("utf-8"))

    def count(self, stage: str, store: Any) -> int:
        return int(store.add(self.prefix + f"{stage}/n", 0))

    def wait(self, keys: Sequence[str], timeout: timedelta, what: str, log: Any, interval: timedelta,
             ended: Callable[[], Any] = lambda: None) -> str:
        """Wait up to ``timeout`` for the first of ``keys``; return it, logging while it lasts.

        Raises:
            FederationEnded: ``ended()`` says the backend recorded the end of the federation.
            SecAggFailure: ``timeout`` ran out.
        """
        from openfl_api.waiting import logged

        deadline = time.monotonic() + timeout.total_seconds()
        delay, asked = 0.002, time.monotonic()
        with logged(log, interval, what):
            while True:
                for key in keys:
                    if self.has(key):
                        return key
                if time.monotonic() - asked >= ENDED_EVERY:  # asking may open a store connection: not too often
                    asked = time.monotonic()
                    if ended():
                        raise FederationEnded()
                if time.monotonic() >= deadline:
                    raise SecAggFailure(f"waited {timeout} for {what}")
                time.sleep(delay)
                delay = min(2 * delay, 0.05)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise SecAggFailure("a binary field is not base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggFailure("a binary field is not base64 text") from None


def _pair_info(run: str, round_id: str, a: int, b: int) -> str:
    return f"{_INFO}/mask/{run}/{round_id}/{min(a, b)}-{max(a, b)}"


def _self_info(run: str, round_id: str, x: int) -> str:
    return f"{_INFO}/self/{run}/{round_id}/{x}"


def _share_context(run: str, round_id: str, dealer: int, holder: int, which: str) -> str:
    return f"{run}/{round_id}/{dealer}/{holder}/{which}"


# --------------------------------------------------------------------------------------- frontend
class SecAggClient:
    """One frontend's part in the rounds: keys, shares, the masked update, the unmask shares.

    Args:
        transform: the :class:`SecAgg` settings.
        board: the board on this frontend's store.
        run: the backend's run id.
        log: a bound logger.
        timeout: the longest wait for the backend's next stage.
        interval: how often a wait that lasts is logged.
    """

    def __init__(self, transform: SecAgg, board: Board, run: str, log: Any, timeout: timedelta,
                 interval: timedelta) -> None:
        self.transform, self.board, self.run, self.log = transform, board, run, log
        self.timeout, self.interval = timeout, interval
        #: test hook: called with the round's context once the masked update is computed.
        self.after_masking: Callable[[Dict[str, Any]], None] = lambda context: None
        #: whether the backend recorded the end of the federation (the frontend's store check)
        self.ended: Callable[[], Any] = lambda: None
        self.joined: Set[str] = set()  # rounds this client advertised keys in

    def _next_round(self, round_id: str) -> None:
        """Wait until the backend opens a round other than ``round_id``."""
        from openfl_api.waiting import logged

        deadline = time.monotonic() + self.timeout.total_seconds()
        with logged(self.log, self.interval, f"the secure-aggregation round after {round_id}"):
            asked = time.monotonic()
            while str(self.board.get("open")["round"]) == round_id:
                if time.monotonic() - asked >= ENDED_EVERY:
                    asked = time.monotonic()
                    if self.ended():
                        raise FederationEnded()
                if time.monotonic() >= deadline:
                    raise SecAggFailure(f"waited {self.timeout} for the secure-aggregation round after {round_id}")
                time.sleep(0.01)

    def _wait(self, round_id: str, key: str, what: str) -> None:
        found = self.board.wait([f"{round_id}/{key}", f"{round_id}/failed"], self.timeout,
                                f"secure aggregation round {round_id}: {what}", self.log, self.interval, self.ended)
        if found.endswith("/failed"):
            reason = self.board.get(f"{round_id}/failed").get("reason", "")
            raise SecAggFailure(f"the backend ended secure-aggregation round {round_id}: {reason}")

    def masked(self, levels: np.ndarray, weight: int, client: str, version: Optional[int],
               clip_range: float) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
        """Take part in the rounds up to the masked update of ``levels`` (uint32) with ``weight``.

        ``version``: synchronous mode, the version the update was trained from (a round of a later
        version means this update is stale); None in asynchronous mode (join the open round, or the
        next one if it closed without this client).

        Returns:
            ``(masked uint32 words, context)``, or None with the reason in ``self.skipped`` when
            this update takes no part (stale, or the key stage closed without it).
        """
        board = self.board
        self.skipped = ""
        while True:
            board_open = board.wait(["open"], self.timeout, "the backend to open a secure-aggregation round",
                                    self.log, self.interval, self.ended)
            opened = board.get(board_open)
            round_id, round_version = str(opened["round"]), int(opened["version"])
            if version is not None and round_version > version:
                self.skipped = (f"stale: trained from version {version} but secure aggregation is at version "
                                f"{round_version}")
                return None
            closed = round_id in self.joined or board.has(f"{round_id}/U1")
            if version is not None and closed and round_version == version:
                self.skipped = f"the key stage of secure aggregation round {round_id} closed without this client"
                return None
            if (version is not None and round_version < version) or closed:
                self._next_round(round_id)  # asynchronous: a buffer this client is in, or that filled
                continue
            self.joined.add(round_id)
            keys = crypto.KeyPair(), crypto.KeyPair()
            board.append(f"{round_id}/keys", {"client": client, "c": _b64(keys[0].public), "s": _b64(keys[1].public),
                                              "w": int(weight)})
            self._wait(round_id, "U1", "the members of the round (U1)")
            u1 = board.get(f"{round_id}/U1")
            members = {m[0]: m for m in u1["members"]}
            if client not in members:
                if version is None:
                    continue  # the buffer filled without this client: join the next round
                self.skipped = f"the key stage of secure aggregation round {round_id} closed without this client"
                return None
            return self._rest(round_id, u1, members, client, keys, levels, weight, clip_range)

    def _rest(self, round_id: str, u1: Dict[str, Any], members: Dict[str, list], client: str,
              keys: Tuple[crypto.KeyPair, crypto.KeyPair], levels: np.ndarray, weight: int,
              clip_range: float) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
        board, run = self.board, self.run
        if u1.get("clip_range") != clip_range or u1.get("bits") != self.transform.bits:
            raise SecAggFailure(f"round {round_id} uses clip_range {u1.get('clip_range')} and bits {u1.get('bits')}, "
                                f"this frontend {clip_range} and {self.transform.bits}")
        graph = neighbours_of(sorted(members), u1.get("neighbours"), u1.get("graph"))
        mine = graph[client]
        x_of = {m: int(members[m][1]) for m in members}
        holders = [client, *mine]
        t = int(u1["t"])
        seed_b = os.urandom(32)
        s_shares = crypto.split(keys[1].private, [x_of[h] for h in holders], t)
        b_shares = crypto.split(seed_b, [x_of[h] for h in holders], t)
        sealed, digests = {}, {}
        for holder in holders:
            x = x_of[holder]
            key = crypto.derive(keys[0].agree(_unb64(members[holder][2])), f"{_INFO}/share/{run}/{round_id}/{x_of[client]}->{x}")
            aad = f"{run}|{round_id}|{x_of[client]}|{x}".encode()
            sealed[holder] = _b64(crypto.seal(key, s_shares[x] + b_shares[x], aad))
            digests[holder] = {
                "s": crypto.share_digest(_share_context(run, round_id, x_of[client], x, "s"), s_shares[x]),
                "b": crypto.share_digest(_share_context(run, round_id, x_of[client], x, "b"), b_shares[x]),
            }
        board.append(f"{round_id}/shares", {"client": client, "sealed": sealed, "digests": digests,
                                            "commit": hashlib.sha256(seed_b).hexdigest()})
        self._wait(round_id, "U2", "the share holders of the round (U2)")
        u2 = board.get(f"{round_id}/U2")
        if client not in u2["members"]:
            self.skipped = f"secure aggregation round {round_id} went on without this client's shares"
            return None
        inbox = board.get(f"{round_id}/inbox/{x_of[client]}") if board.has(f"{round_id}/inbox/{x_of[client]}") else {}
        held: Dict[str, Tuple[bytes, bytes]] = {}
        bad: List[str] = []
        for dealer, text in inbox.items():
            if dealer not in members:
                continue
            x = x_of[dealer]
            key = crypto.derive(keys[0].agree(_unb64(members[dealer][2])), f"{_INFO}/share/{run}/{round_id}/{x}->{x_of[client]}")
            try:
                plain = crypto.open_sealed(key, _unb64(text), f"{run}|{round_id}|{x}|{x_of[client]}".encode())
            except Exception:  # cryptography's InvalidTag, or garbage that is no ciphertext
                bad.append(dealer)
                continue
            held[dealer] = (plain[:crypto.SHARE_BYTES], plain[crypto.SHARE_BYTES:])
        if bad:
            self.log.warning(f"secure aggregation round {round_id}: shares from {sorted(bad)} failed authentication "
                             "(altered, or sealed with a wrong key); the backend is told")
        board.append(f"{round_id}/checked", {"client": client, "bad": sorted(bad)})
        self._wait(round_id, "masking", "the members that mask (after the share check)")
        masking = board.get(f"{round_id}/masking")["members"]
        if client not in masking:
            self.skipped = f"secure aggregation round {round_id} refused this client: {masking and 'see the backend log'}"
            return None
        size = levels.size
        y = levels * np.uint32(weight)
        y += crypto.mask(crypto.derive(seed_b, _self_info(run, round_id, x_of[client])), size)
        for other in mine:
            if other not in masking:
                continue
            pair = crypto.derive(keys[1].agree(_unb64(members[other][3])), _pair_info(run, round_id, x_of[client], x_of[other]))
            words = crypto.mask(pair, size)
            if x_of[client] > x_of[other]:
                y += words
            else:
                y -= words
        context = {"round": round_id, "client": client, "held": held, "masking": masking, "x_of": x_of,
                   "members": members}
        self.after_masking(context)
        return y, context

    def unmask(self, context: Dict[str, Any]) -> None:
        """After an accepted masked upload: send the shares the backend needs to unmask the sum."""
        round_id, client = context["round"], context["client"]
        self._wait(round_id, "U3", "the members whose masked update arrived (U3)")
        survivors = set(self.board.get(f"{round_id}/U3")["members"])
        if client not in survivors:
            return
        masking = set(context["masking"])
        if not survivors <= masking:
            raise SecAggFailure(f"round {round_id}: U3 names clients that were not allowed to mask; refusing to unmask")
        b_out = {d: shares[1].hex() for d, shares in context["held"].items() if d in survivors}
        s_out = {d: shares[0].hex() for d, shares in context["held"].items() if d in masking - survivors}
        self.board.append(f"{round_id}/unmask", {"client": client, "b": b_out, "s": s_out})


# --------------------------------------------------------------------------------------- backend
KEYS, SHARES, CHECK, MASKED_STAGE, UNMASK, READY, FAILED = "keys", "shares", "check", "masked", "unmask", "ready", "failed"


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
        """Open the next round, for ``version`` (synchronous) or the next buffer (asynchronous)."""
        self._reset()
        self.counter += 1
        self.round_id = str(version) if not self.asynchronous else f"b{self.counter}"
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

    def fail(self, reason: str) -> None:
        """End the round: nothing of it is aggregated; frontends waiting on it are told."""
        self.stage = FAILED
        self.board.put(f"{self.round_id}/failed", {"reason": reason})
        raise SecAggFailure(f"secure aggregation round {self.round_id} failed: {reason}")

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
        chosen = sorted(self.keys)
        if self.asynchronous and self.transform.cohort is not None:
            chosen = chosen[:self.transform.cohort]
        weight = sum(int(self.keys[c]["w"]) for c in chosen)
        if weight * (2**self.transform.bits - 1) >= RING:
            self.fail(f"the weighted sum of {len(chosen)} members (total weight {weight}) could wrap the 32-bit ring at "
                      f"bits={self.transform.bits}: lower bits or the weights (num_samples)")
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
                          f"{self.transform.deadline}; min_clients={self.transform.min_clients}")
            return
        u2 = sorted(self.shares)
        self.board.put(f"{self.round_id}/U2", {"members": u2})
        for holder in u2:
            inbox = {dealer: self.shares[dealer]["sealed"][holder] for dealer in u2
                     if holder in self.shares[dealer]["sealed"] and dealer != holder}
            own = self.shares[holder]["sealed"].get(holder)
            if own is not None:
                inbox[holder] = own
            self.board.put(f"{self.round_id}/inbox/{self.members[holder][1]}", inbox)
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
                      f"{self.transform.min_clients}")
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
                          f"{self.transform.deadline}; min_clients={self.transform.min_clients}")
            return
        dropped = sorted(set(self.masking) - set(self.deposited))
        if dropped:
            self.log.warning(f"secure aggregation round {self.round_id}: {dropped} dropped after masking; their masks "
                             "are removed from the sum with the survivors' shares")
        self.board.put(f"{self.round_id}/U3", {"members": sorted(self.deposited)})
        self._next(UNMASK)

    def _valid_shares(self, dealer: str, which: str) -> Dict[int, bytes]:
        """The shares of ``dealer``'s secret ``which`` ("s" or "b") that survivors sent and that
        match the digests the dealer published; a share that does not is refused and counted."""
        x_of = {m: v[1] for m, v in self.members.items()}
        digests = self.shares[dealer].get("digests", {})
        valid: Dict[int, bytes] = {}
        for holder, value in self.unmasks.items():
            text = value.get(which, {}).get(dealer)
            if text is None:
                continue
            try:
                share = bytes.fromhex(text)
            except (TypeError, ValueError):
                share = b""
            context = _share_context(self.run, self.round_id, x_of[dealer], x_of[holder], which)
            expected = digests.get(holder, {}).get(which)
            if len(share) != crypto.SHARE_BYTES or expected is None or crypto.share_digest(context, share) != expected:
                reason = (f"secure aggregation round {self.round_id}: {holder} sent a share of {dealer}'s "
                          f"{'key' if which == 's' else 'seed'} that does not match the dealer's digest (tampered); refused")
                self.log.warning(reason)
                self.refused.append((holder, reason))
                continue
            valid[x_of[holder]] = share
        return valid

    def _unmask(self) -> None:
        survivors = set(self.deposited)
        for value in self._slots("unmask"):
            client = value["client"]
            if client in survivors and client not in self.unmasks and isinstance(value.get("b"), dict) \
                    and isinstance(value.get("s"), dict):
                self.unmasks[client] = value
        if len(self.unmasks) < len(survivors) and not self._late():
            return
        dropped = [c for c in self.masking if c not in survivors]
        words = self.sum.copy()
        run, round_id = self.run, self.round_id
        x_of = {m: v[1] for m, v in self.members.items()}
        for dealer in sorted(survivors):
            shares = self._valid_shares(dealer, "b")
            if len(shares) < self.t:
                self.fail(f"{len(shares)} valid shares of {dealer}'s self-mask seed came back, {self.t} are needed")
            seed = crypto.combine(dict(list(shares.items())[:self.t]))
            if hashlib.sha256(seed).hexdigest() != self.shares[dealer].get("commit"):
                self.fail(f"the shares of {dealer}'s self-mask seed rebuild a seed that does not match its commitment")
            words -= crypto.mask(crypto.derive(seed, _self_info(run, round_id, x_of[dealer])), self.size)
        for dealer in dropped:
            shares = self._valid_shares(dealer, "s")
            if len(shares) < self.t:
                self.fail(f"{len(shares)} valid shares of dropped {dealer}'s mask key came back, {self.t} are needed")
            key = crypto.KeyPair(crypto.combine(dict(list(shares.items())[:self.t])))
            if _b64(key.public) != self.members[dealer][3]:
                self.fail(f"the shares of dropped {dealer}'s mask key rebuild a key that is not the one it advertised")
            for other in self.graph[dealer]:
                if other not in survivors:
                    continue
                pair = crypto.derive(key.agree(_unb64(self.members[other][3])), _pair_info(run, round_id, x_of[other], x_of[dealer]))
                mask_words = crypto.mask(pair, self.size)
                if x_of[other] > x_of[dealer]:
                    words -= mask_words
                else:
                    words += mask_words
        weight = sum(self.deposited.values())
        self.result = (dequantize_sum(words, weight, self.clip_range, self.transform.bits), weight)
        self.control_bytes[round_id] = self.board.sent + self.board.received - self._traffic
        self._next(READY)
