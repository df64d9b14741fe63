"""An order-free running sum: ``sum_k w_k * x_k`` whose bits do not depend on the order of the adds.

Floating-point addition is not associative, so a float accumulator gives different bits when
three or more uploads arrive in another order. :class:`ExactSum` adds in integers instead, where
addition is exact (fixed point with data-independent levels, after Demmel and Nguyen's
pre-rounding for reproducible summation):

1. Each term ``t = w * x`` is formed in float64 (one rounding, the same whatever the order).
2. Its *level* ``L`` is fixed by the term's own largest magnitude ``m``: the smallest ``L`` with
   ``m < 2**(8 * L)``. Levels are absolute powers of two, so they depend on the term alone.
3. The term is rounded to the level's grid ``2**(8 * L - 42)`` (so ``|q| <= 2**42``) and added to
   the level's int64 accumulator, which is exact for up to ``2**20`` terms.
4. :meth:`value` converts each level's integer sum to float64 once and adds the levels in a fixed
   order (ascending ``L``).

Every integer sum is exact and every rounding depends on one term only, so the result is the same,
bit for bit, for any order of the adds. Error against the exact ``sum_k w_k x_k``, per coordinate:
at most ``2**-34 * m_k`` for each term ``k`` (``m_k`` the largest ``|w_k x_k|`` of its tensor) plus
float64 roundings (``2**-53`` relative), well below the final rounding to float32 (``2**-24``).

Rounding a float64 ``t * 2**f`` to an integer uses the "magic number" trick: adding
``1.5 * 2**52`` leaves the integer in the low bits of the float64's representation, so the whole
term is one multiply, one add and one integer add, without a float-to-int conversion.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["ExactSum", "GRID_BITS", "LEVEL_BITS", "MAX_TERMS"]

LEVEL_BITS = 8  # levels are 2**8 apart
GRID_BITS = 42  # a term is rounded to 2**-42 of its level's bound: |q| <= 2**42
MAX_TERMS = 1 << 20  # terms per level before an int64 sum could overflow (2**42 * 2**20 < 2**63)
_MAGIC = 1.5 * 2.0**52
_MAGIC_BITS = int(np.array(_MAGIC, dtype=np.float64).view(np.int64))


def _level(bound: float) -> int:
    """The smallest ``L`` with ``bound < 2**(LEVEL_BITS * L)``, for ``bound > 0``."""
    exponent = math.frexp(bound)[1]  # bound < 2**exponent
    return -((-exponent) // LEVEL_BITS)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a flat CPU tensor of a real dtype (complex as pairs of reals)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.is_complex():
        x = torch.view_as_real(x)
    return x.reshape(-1)


def _peak(x: torch.Tensor) -> float:
    """The largest magnitude in ``x`` (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0.0
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.dtype == torch.bool:
        return float(bool(x.any()))
    low, high = torch.aminmax(x.detach())
    return max(-float(low), float(high))


class ExactSum:
    """A running sum of ``weight * x`` for tensors of one shape, exact in any order of the adds.

    Args:
        shape: the shape of the tensors added.
    """

    def __init__(self, shape: Tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self._levels: Dict[int, np.ndarray] = {}  # level -> int64 sum (wrapping; see value())
        self._terms: Dict[int, int] = {}  # level -> terms added since the last zero_()

    def zero_(self) -> "ExactSum":
        """Forget every term; the level buffers are kept for reuse."""
        self._terms = {level: 0 for level in self._levels}
        return self

    def add_(self, x: torch.Tensor, weight: float, scratch: Optional[torch.Tensor] = None) -> "ExactSum":
        """Add ``weight * x``.

        Args:
            x: a tensor of :attr:`shape`, finite (any real dtype, bool, or complex).
            weight: a finite weight ``>= 0``.
            scratch: a flat float64 CPU tensor of at least ``x.numel()`` elements (twice that for
                complex) to work in; the sum allocates one when it is missing or too small.
        """
        bound = _peak(x) * weight
        if bound == 0.0:
            return self
        level = _level(bound)
        terms = self._terms.get(level, 0)
        if terms >= MAX_TERMS:
            raise OverflowError(f"an exact sum takes at most {MAX_TERMS} terms of one magnitude; aggregate sooner")
        flat = _flat(x)
        size = flat.numel()
        if scratch is None or scratch.numel() < size:
            scratch = torch.empty(size, dtype=torch.float64)
        work = scratch[:size]
        # t * 2**f in float64 (scaling by a power of two is exact), rounded to an integer by the
        # magic number, |t * 2**f| <= 2**42 < 2**51: the same bits whatever the order of the adds.
        work.copy_(flat).mul_(math.ldexp(weight, GRID_BITS - LEVEL_BITS * level)).add_(_MAGIC)
        total = self._levels.get(level)
        if total is None or total.size != size:
            total = self._levels[level] = np.zeros(size, dtype=np.int64)
        elif terms == 0:
            total.fill(0)
        np.add(total, work.numpy().view(np.int64), out=total)  # wraps; each add carries _MAGIC_BITS
        self._terms[level] = terms + 1
        return self

    def value(self) -> torch.Tensor:
        """The sum as a fresh float64 tensor (complex128 is not rebuilt: real and imaginary parts
        come as a trailing dimension of 2 when complex tensors were added)."""
        out = np.zeros(next((a.size for a in self._levels.values()), self.numel), dtype=np.float64)
        for level in sorted(self._levels):
            terms = self._terms.get(level, 0)
            if not terms:
                continue
            offset = (terms * _MAGIC_BITS) % (1 << 64)
            exact = np.subtract(self._levels[level], np.int64(offset - (1 << 64) if offset >= 1 << 63 else offset))
            out += exact.astype(np.float64) * math.ldexp(1.0, LEVEL_BITS * level - GRID_BITS)
        result = torch.from_numpy(out)
        return result.reshape(self.shape) if result.numel() == self.numel else result.reshape(*self.shape, 2)

    def state_dict(self) -> Dict[str, Any]:
        """The level sums (int64 tensors) and term counts, for a checkpoint."""
        used = [level for level in sorted(self._levels) if self._terms.get(level, 0)]
        return {"levels": {str(level): torch.from_numpy(self._levels[level].copy()) for level in used},
                "terms": {str(level): self._terms[level] for level in used}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._levels = {int(level): total.numpy().astype(np.int64).copy() for level, total in state["levels"].items()}
        self._terms = {int(level): int(count) for level, count in state["terms"].items()}
