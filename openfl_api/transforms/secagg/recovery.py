"""The end of a round: rebuild the secrets the survivors' shares allow and remove the masks from the sum."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np

from openfl_api.transforms import crypto
from openfl_api.transforms.secagg.board import b64, unb64
from openfl_api.transforms.secagg.masking import add_pair_mask_, self_mask
from openfl_api.transforms.secagg.settings import SecAggFailure
from openfl_api.transforms.secagg.shares import checked, combine

__all__ = ["Round", "unmasked"]

# What a failed round's line advises, by the kind of failure.
MISSING = ("a member named whose share came back tampered (logged above) is faulty or malicious: check or remove "
           "that frontend; one that sent none was late (raise SecAgg(deadline=...)); when too few holders were left, "
           "lower SecAgg(threshold=...) or use more members per round")
FAULTY = "the member named dealt shares or a commitment that do not agree: check that frontend (faulty or malicious)"


@dataclass
class Round:
    """What the backend knows of a round once its unmask shares came back.

    Attributes:
        run, round_id: the names the masks and shares are bound to.
        members: member -> ``[id, x, sealing key, mask key, weight]`` (U1).
        graph: member -> the members it masks with.
        t: shares that rebuild a secret.
        dealt: member -> its shares value (``digests``, ``commit``).
        masking: the members allowed to mask.
        survivors: the members whose masked upload arrived (U3).
        unmasks: survivor -> its unmask value (``b``: seed shares, ``s``: mask-key shares).
    """

    run: str
    round_id: str
    members: Mapping[str, list]
    graph: Mapping[str, List[str]]
    t: int
    dealt: Mapping[str, Mapping[str, Any]]
    masking: Sequence[str]
    survivors: Sequence[str]
    unmasks: Mapping[str, Mapping[str, Any]]


def unmasked(words: np.ndarray, done: Round, refuse: Callable[[str, str], None]) -> np.ndarray:
    """``words`` (the sum of the masked uploads, uint32) without the masks: each survivor's self
    mask, rebuilt from its seed's shares, and the pairwise masks of each member that dropped after
    masking, rebuilt from its mask key's shares. A share that does not match its dealer's digest is
    passed to ``refuse(holder, reason)`` and left out.

    Raises:
        SecAggFailure: a secret cannot be rebuilt or does not match what its dealer advertised
            (``culprits`` and ``fix`` say who and what to do).
    """
    survivors = set(done.survivors)
    x_of = {m: v[1] for m, v in done.members.items()}
    words = words.copy()

    def valid(dealer: str, which: str, what: str) -> Dict[int, bytes]:
        shares, bad = checked(done.unmasks, dealer, which, x_of, done.dealt[dealer].get("digests", {}), done.run,
                              done.round_id)
        for holder in bad:
            refuse(holder, f"secure aggregation round {done.round_id}: {holder} sent a share of {dealer}'s "
                           f"{'key' if which == 's' else 'seed'} that does not match the dealer's digest (tampered); "
                           "refused")
        if len(shares) < done.t:
            missing = [h for h in [dealer, *done.graph[dealer]] if h in survivors and x_of[h] not in shares]
            why = f"; no valid one came from {missing}" if missing else "; too few of its holders were left"
            raise SecAggFailure(f"{len(shares)} valid shares of {what} came back, {done.t} are needed{why}", missing,
                                MISSING)
        return shares

    def rebuild(shares: Dict[int, bytes], dealer: str, what: str) -> bytes:
        secret = combine(shares, done.t)
        if secret is None:
            raise SecAggFailure(f"the shares of {what} combine to no 32-byte secret: its dealer dealt inconsistent "
                                "shares", [dealer], FAULTY)
        return secret

    for dealer in sorted(survivors):
        what = f"{dealer}'s self-mask seed"
        seed = rebuild(valid(dealer, "b", what), dealer, what)
        if hashlib.sha256(seed).hexdigest() != done.dealt[dealer].get("commit"):
            raise SecAggFailure(f"the shares of {what} rebuild a seed that does not match its commitment", [dealer],
                                FAULTY)
        words -= self_mask(seed, done.run, done.round_id, x_of[dealer], words.size)
    for dealer in [c for c in done.masking if c not in survivors]:
        what = f"dropped {dealer}'s mask key"
        key = crypto.KeyPair(rebuild(valid(dealer, "s", what), dealer, what))
        if b64(key.public) != done.members[dealer][3]:
            raise SecAggFailure(f"the shares of {what} rebuild a key that is not the one it advertised", [dealer],
                                FAULTY)
        for other in done.graph[dealer]:
            if other in survivors:  # what the dropped member would have added for this pair
                add_pair_mask_(words, key.agree(unb64(done.members[other][3])), done.run, done.round_id, x_of[dealer],
                               x_of[other])
    return words
