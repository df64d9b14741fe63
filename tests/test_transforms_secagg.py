"""Secure aggregation's protocol in one process: a coordinator and clients on one in-memory store.

Each client runs on a thread as a frontend would; the test plays the pipe, handing each masked
update to the coordinator, and turns the coordinator as the serve loop does.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import pytest
import torch
from torch.distributed import HashStore, PrefixStore

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.logger import bind
from openfl_api.transforms import SecAgg
from openfl_api.transforms import crypto
from openfl_api.transforms.secagg import Board, Coordinator, SecAggClient, SecAggFailure, quantize
from openfl_api.transforms.secagg.board import b64

TOKEN = b"secagg-test"
WAIT = 20.0
LOG = bind("test")


class Dropped(Exception):
    """A client that leaves right after masking."""


class WrongKey(SecAggClient):
    """Seals its shares with a key other than the one it advertised."""

    def _rest(self, round_id, u1, members, client, keys, *rest):  # type: ignore[override]
        return super()._rest(round_id, u1, members, client, (crypto.KeyPair(), keys[1]), *rest)


class TamperedShares(SecAggClient):
    """Flips a byte of every unmask share it sends."""

    def unmask(self, context):  # type: ignore[override]
        held = context["held"]
        context["held"] = {d: (bytes([s[0] ^ 1]) + s[1:], bytes([b[0] ^ 1]) + b[1:]) for d, (s, b) in held.items()}
        super().unmask(context)


_inconsistent = threading.local()


class InconsistentSeed(SecAggClient):
    """Deals shares of its self-mask seed that combine to no 32-byte secret, with matching digests."""

    def _rest(self, *args, **kwargs):  # type: ignore[override]
        _inconsistent.calls = 0
        try:
            return super()._rest(*args, **kwargs)
        finally:
            del _inconsistent.calls


def split_unless_inconsistent(real):
    """``crypto.split``, except for an InconsistentSeed's second secret (its seed): shares of PRIME - 1."""

    def split(secret, holders, threshold):
        calls = getattr(_inconsistent, "calls", None)
        if calls is None:
            return real(secret, holders, threshold)
        _inconsistent.calls = calls + 1
        if calls == 0:
            return real(secret, holders, threshold)
        slope = 12345
        return {x: ((crypto.PRIME - 1 + slope * x) % crypto.PRIME).to_bytes(crypto.SHARE_BYTES, "big") for x in holders}

    return split


class SlowInboxes(Board):
    """The backend's board on a loaded machine: each inbox is written a while after the one before."""

    def put(self, key: str, value: object) -> None:
        if "/inbox/" in key:
            time.sleep(0.05)
        super().put(key, value)


def run_round(vectors: Sequence[torch.Tensor], weights: Optional[Sequence[int]] = None, drop: Sequence[int] = (),
              kinds: Optional[Dict[int, type]] = None, neighbours: Optional[int] = None, bits: int = 16,
              threshold: float = 0.5, board: type = Board) -> dict:
    """One synchronous round; returns the coordinator, what each client masked and sent, and errors."""
    n = len(vectors)
    weights = list(weights or [1] * n)
    store = PrefixStore(f"t-{uuid.uuid4().hex[:8]}", HashStore())
    run = uuid.uuid4().hex[:8]
    # No stage needs its deadline to pass: a dropped client leaves the connected list, as its closed
    # pipe does in the serve loop. A deadline shorter than a loaded machine's stalls would drop clients.
    transform = SecAgg(clip_range=1.0, bits=bits, threshold=threshold, neighbours=neighbours,
                       deadline=timedelta(seconds=WAIT / 2))
    coordinator = Coordinator(transform, board([store], run, TOKEN), run, vectors[0].numel(), 1.0, LOG, False)
    coordinator.open(0)
    names = [f"c{i}" for i in range(n)]
    uploads: "queue.SimpleQueue" = queue.SimpleQueue()
    sent: Dict[str, np.ndarray] = {}
    levels: Dict[str, np.ndarray] = {}
    errors: List[BaseException] = []
    gone: Set[str] = set()

    def client(i: int) -> None:
        kind = (kinds or {}).get(i, SecAggClient)
        agent = kind(transform, Board([store], run, TOKEN), run, LOG, timedelta(seconds=WAIT), timedelta(seconds=5))
        if i in drop:
            def leave(context):
                raise Dropped()
            agent.after_masking = leave
        try:
            levels[names[i]], _ = quantize(vectors[i], 1.0, bits, torch.Generator().manual_seed(i))
            result = agent.masked(levels[names[i]], weights[i], names[i], 0, 1.0)
            if result is None:
                return
            words, context = result
            sent[names[i]] = words.copy()
            uploads.put((names[i], words, weights[i]))
            agent.unmask(context)
        except Dropped:
            gone.add(names[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT
    failure = None
    while time.monotonic() < deadline:
        while True:
            try:
                name, words, weight = uploads.get_nowait()
            except queue.Empty:
                break
            coordinator.admit(name)
            coordinator.deposit(name, torch.from_numpy(words.view(np.int32)), weight)
        try:
            if coordinator.tick([name for name in names if name not in gone], None):
                break
        except SecAggFailure as exc:
            failure = exc
            break
        time.sleep(0.005)
    for thread in threads:
        thread.join(WAIT)
    return {"coordinator": coordinator, "sent": sent, "levels": levels, "errors": errors, "failure": failure,
            "transform": transform, "weights": dict(zip(names, weights))}


def updates(n: int, d: int = 2000, seed: int = 0) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(d, generator=generator) * 1.6 - 0.8 for _ in range(n)]


def check_sum(outcome: dict, vectors: Sequence[torch.Tensor], survivors: Sequence[int]) -> None:
    total, weight = outcome["coordinator"].result
    w = outcome["weights"]
    plain = sum(w[f"c{i}"] * vectors[i].double() for i in survivors)
    assert weight == sum(w[f"c{i}"] for i in survivors)
    step = outcome["transform"].step(1.0)
    # Stochastic rounding moves each coordinate by less than one step per client.
    assert float((total - plain).abs().max()) < weight * step
    assert float(((total - plain) / weight).abs().max()) < step


def test_unmasked_sum_equals_the_plain_sum_within_the_quantization_step() -> None:
    vectors = updates(5)
    outcome = run_round(vectors, weights=[3, 1, 4, 1, 5])
    assert outcome["errors"] == [] and outcome["failure"] is None
    check_sum(outcome, vectors, range(5))


def test_the_unmasked_sum_of_levels_is_exact() -> None:
    vectors = updates(4, d=500, seed=3)
    outcome = run_round(vectors, weights=[2, 7, 1, 3], bits=8)
    words = outcome["coordinator"].result[0]
    levels = sum(outcome["weights"][name] * level.astype(np.float64) for name, level in outcome["levels"].items())
    step = outcome["transform"].step(1.0)
    assert torch.equal(words, torch.from_numpy(levels * step - 1.0 * sum(outcome["weights"].values())))


def test_what_the_backend_receives_is_independent_of_the_update() -> None:
    d = 20000
    extreme = [torch.full((d,), -1.0), torch.full((d,), 1.0), torch.full((d,), -1.0)]
    outcome = run_round(extreme)
    uniform = np.linspace(0, 1, d, endpoint=False)
    for name, level in outcome["levels"].items():
        words = outcome["sent"][name].astype(np.float64)
        # The update's levels are constant; what was sent is spread uniformly over the ring ...
        assert np.unique(level).size == 1
        assert np.abs(np.sort(words / 2**32) - uniform).max() < 0.02  # Kolmogorov-Smirnov distance
        # ... and is not the update: no more words equal to it than chance allows.
        assert np.mean(words == level) < 1e-3
    first = outcome["sent"]["c0"].astype(np.float64)
    second = outcome["sent"]["c1"].astype(np.float64)
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.05  # opposite updates, unrelated masked words
    check_sum(outcome, extreme, range(3))


@pytest.mark.parametrize("drop", [[2], [0, 5]], ids=["one of six", "two of six"])
def test_frontends_dropping_after_masking_still_give_the_right_sum(drop: List[int]) -> None:
    vectors = updates(6, seed=1)
    outcome = run_round(vectors, weights=[1, 2, 3, 4, 5, 6], drop=drop)
    assert outcome["errors"] == [] and outcome["failure"] is None
    assert sorted(outcome["coordinator"].deposited) == [f"c{i}" for i in range(6) if i not in drop]
    check_sum(outcome, vectors, [i for i in range(6) if i not in drop])


def test_members_read_their_inboxes_only_once_the_backend_wrote_every_one() -> None:
    vectors = updates(4, seed=8)
    outcome = run_round(vectors, board=SlowInboxes)
    assert outcome["errors"] == [] and outcome["failure"] is None
    check_sum(outcome, vectors, range(4))


def test_secagg_plus_masks_with_neighbours_only_and_recovers_a_dropout() -> None:
    vectors = updates(6, seed=2)
    outcome = run_round(vectors, neighbours=2, drop=[3])
    coordinator = outcome["coordinator"]
    assert all(len(others) == 2 for others in coordinator.graph.values())
    assert coordinator.t == 2  # more than half of the 3 holders: two neighbours and itself
    check_sum(outcome, vectors, [0, 1, 2, 4, 5])


def test_a_share_sealed_with_a_wrong_key_is_refused_and_the_sum_is_right_without_its_dealer() -> None:
    vectors = updates(5, seed=4)
    outcome = run_round(vectors, kinds={1: WrongKey})
    coordinator = outcome["coordinator"]
    assert "c1" not in coordinator.masking
    assert [client for client, _ in coordinator.refused] == ["c1"]
    assert "failed authentication" in coordinator.refused[0][1]
    check_sum(outcome, vectors, [0, 2, 3, 4])


def test_a_tampered_unmask_share_is_refused_and_counted_and_the_rest_rebuild_the_sum() -> None:
    vectors = updates(6, seed=5)
    outcome = run_round(vectors, kinds={4: TamperedShares})
    refused = outcome["coordinator"].refused
    assert refused and all(client == "c4" and "tampered" in reason for client, reason in refused)
    check_sum(outcome, vectors, range(6))


def test_too_many_tampered_shares_fail_the_round_loudly_and_tell_the_clients() -> None:
    vectors = updates(4, seed=6)
    outcome = run_round(vectors, kinds={0: TamperedShares, 1: TamperedShares}, threshold=0.75)
    assert isinstance(outcome["failure"], SecAggFailure)
    assert "valid shares" in str(outcome["failure"])
    assert outcome["coordinator"].result is None
    board = outcome["coordinator"].board
    assert board.has("0/failed")


def test_shares_that_combine_to_no_secret_fail_the_round_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "split", split_unless_inconsistent(crypto.split))
    outcome = run_round(updates(3, seed=7), kinds={1: InconsistentSeed}, threshold=0.5)
    assert isinstance(outcome["failure"], SecAggFailure), outcome["failure"]
    assert "c1's self-mask seed" in str(outcome["failure"]) and "32-byte" in str(outcome["failure"])
    assert outcome["coordinator"].result is None


def test_a_store_value_altered_without_the_token_is_refused() -> None:
    store = PrefixStore("x", HashStore())
    board = Board([store], "run", TOKEN)
    board.put("0/U1", {"members": []})
    raw = store.get("transforms/run/secagg/0/U1").replace(b"[]", b"[1]")
    store.set("transforms/run/secagg/0/U1", raw)
    with pytest.raises(SecAggFailure, match="failed its HMAC check"):
        board.get("0/U1")
    board.put("0/U2", {"members": []})
    with pytest.raises(SecAggFailure, match="failed its HMAC check"):
        Board([store], "run", b"another token").get("0/U2")


def test_a_round_whose_weighted_sum_could_wrap_the_ring_is_refused() -> None:
    outcome = run_round(updates(2, d=10), weights=[40000, 40000], bits=16)
    assert isinstance(outcome["failure"], SecAggFailure)
    assert "wrap the 32-bit ring" in str(outcome["failure"])


def test_masked_uploads_outside_the_masked_stage_are_refused() -> None:
    store = PrefixStore("y", HashStore())
    coordinator = Coordinator(SecAgg(clip_range=1.0), Board([store], "r", TOKEN), "r", 4, 1.0, LOG, False)
    coordinator.open(0)
    with pytest.raises(PayloadError, match="masked-input stage"):
        coordinator.admit("c0")


def test_an_asynchronous_round_takes_the_first_cohort_members_whose_keys_came() -> None:
    store = PrefixStore("z", HashStore())
    board = Board([store], "r", TOKEN)
    coordinator = Coordinator(SecAgg(clip_range=1.0, cohort=2), board, "r", 4, 1.0, LOG, True)
    coordinator.open(0)
    for client in ("c3", "c1", "c2"):
        key = crypto.KeyPair().public
        board.append("b1/keys", {"client": client, "c": b64(key), "s": b64(key), "w": 1})
    coordinator.tick(["c1", "c2", "c3"], None)
    assert sorted(coordinator.members) == ["c1", "c3"]  # c2 came last: it joins the next buffer


def test_shamir_rebuilds_from_any_threshold_shares_and_not_from_fewer() -> None:
    secret = bytes(range(32))
    shares = crypto.split(secret, [1, 2, 3, 4, 5], 3)
    assert crypto.combine({x: shares[x] for x in (1, 3, 5)}) == secret
    assert crypto.combine({x: shares[x] for x in (2, 4, 5)}) == secret
    with pytest.raises(ValueError):
        if crypto.combine({x: shares[x] for x in (1, 2)}) == secret:
            raise AssertionError("two of three shares rebuilt the secret")
        raise ValueError("garbage, as it should be")


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), r"SecAgg\(bits=...\) must be an int in \[1, 24\]"),
    (dict(threshold=0.4), r"SecAgg\(threshold=...\) must be a finite number in \[0.5, 1.0\)"),
    (dict(neighbours=3), r"SecAgg\(neighbours=...\) must be even"),
    (dict(deadline=5), r"SecAgg\(deadline=...\) must be a positive datetime.timedelta"),
    (dict(min_clients=1), r"SecAgg\(min_clients=...\) must be an int >= 2"),
    (dict(clip_range=0.0), r"SecAgg\(clip_range=...\) must be a finite number in \(0.0"),
])
def test_secagg_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        SecAgg(**kwargs)
