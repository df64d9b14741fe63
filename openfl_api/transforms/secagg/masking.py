"""The arithmetic of masking: levels in the 32-bit ring, the neighbour graph, the masks.

A frontend uploads ``weight * levels + self mask + sum of its pairwise masks`` (mod ``2**32``);
a pairwise mask is added by the member with the larger share index and subtracted by the other,
so the pair's masks cancel in the sum. The backend removes the survivors' self masks, and adds
in a dropped member's place the pairwise masks it would have added.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.transforms import crypto

__all__ = ["RING", "quantize", "dequantize_sum", "neighbours_of", "share_context", "share_info", "self_mask",
           "add_pair_mask_", "weight_of"]

RING = 2**32
_INFO = "openfl_api/secagg/v1"


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


def share_context(run: str, round_id: str, dealer: int, holder: int, which: str) -> str:
    """What a share's digest binds: the round, its dealer and holder (share indices), ``which``
    secret ("s": the mask key, "b": the self-mask seed)."""
    return f"{run}/{round_id}/{dealer}/{holder}/{which}"


def share_info(run: str, round_id: str, dealer: int, holder: int) -> str:
    """The key-derivation label of the key that seals ``dealer``'s shares for ``holder``."""
    return f"{_INFO}/share/{run}/{round_id}/{dealer}->{holder}"


def self_mask(seed: bytes, run: str, round_id: str, x: int, size: int) -> np.ndarray:
    """The self mask of the member with share index ``x`` (uint32 words) from its seed."""
    return crypto.mask(crypto.derive(seed, f"{_INFO}/self/{run}/{round_id}/{x}"), size)


def add_pair_mask_(words: np.ndarray, secret: bytes, run: str, round_id: str, own: int, other: int) -> None:
    """Add, in place, the pairwise mask that member ``own`` applies for its pair with ``other``
    (share indices), from the pair's X25519 ``secret``: added by the larger index, subtracted by
    the smaller, so the two cancel in the sum."""
    label = f"{_INFO}/mask/{run}/{round_id}/{min(own, other)}-{max(own, other)}"
    mask = crypto.mask(crypto.derive(secret, label), words.size)
    if own > other:
        words += mask
    else:
        words -= mask


def weight_of(aggregator: Any, num_samples: int) -> int:
    """The integer weight an upload carries in a round's sum: 1 under a uniform mean
    (``NaiveAggregator``), its ``num_samples`` otherwise."""
    from openfl_api.aggregate import NaiveAggregator

    return 1 if isinstance(aggregator, NaiveAggregator) else int(num_samples)
