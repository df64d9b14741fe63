"""An order-free running sum: ``sum_k w_k * x_k`` whose bits do not depend on the order of the adds.

Floating-point addition is not associative, so a float accumulator gives different bits when
three or more uploads arrive in another order. :class:`ExactSum` adds in integers instead, where
addition is exact (fixed point at data-independent levels, after Demmel and Nguyen's
pre-rounding for reproducible summation). For each tensor ``x`` of an upload with weight ``w``:

1. its *level* ``L`` is fixed by the term's own largest magnitude ``m = max|w * x|``: the
   smallest ``L`` with ``m < 2**(8 * L)``. Levels are absolute powers of two, so they depend on
   the term alone;
2. ``w * x`` is formed in float64 and rounded to the level's grid ``2**(8 * L - 42)``, one
   rounding that depends on the term alone (so ``|q| <= 2**42``);
3. ``q`` is added to the level's int64 accumulator, where addition is exact for up to ``2**20``
   terms;
4. :meth:`value` converts each level's integer sum to float64 once and adds the levels in a fixed
   order (ascending ``L``).

Every integer sum is exact and every rounding depends on one term only, so the result is the
same, bit for bit, for any order of the adds. Error against the exact ``sum_k w_k x_k``, per
coordinate: at most ``2**-34 * m_k`` for each term ``k`` (``m_k`` the largest ``|w_k x_k|`` of its
tensor), plus float64 roundings (``2**-52`` relative), well below a final rounding to float32.

The floating tensors of an upload share one flat int64 sum per level, added a chunk of 64 Ki
elements of that flat layout at a time (a model of up to 512 Ki floating values is one chunk):
``magic + t * 2**f`` is formed in a float64 scratch that stays in the cache (the "magic number"
``1.5 * 2**52`` rounds ``t * 2**f`` to an integer held in the low bits of the float64) and its bits
are added to the level's int64 sum; :meth:`value` reads the sums back a chunk at a time too, and
:meth:`means` divides and rounds each chunk to its tensor's dtype as it is read. Integer and bool
tensors (``num_batches_tracked``) are summed apart, each at its own level, so a counter never
coarsens the grid of the weights.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.aggregate.functional import finish_mean

__all__ = ["ExactSum", "GRID_BITS", "LEVEL_BITS", "MAX_TERMS"]

LEVEL_BITS = 8  # levels are 2**8 apart
GRID_BITS = 42  # a term is rounded to 2**-42 of its level's bound: |q| <= 2**42
MAX_TERMS = 1 << 20  # terms per level before an int64 sum could overflow (2**42 * 2**20 < 2**63)
_MAGIC = 1.5 * 2.0**52
_CHUNK = 1 << 16  # elements per step of a pass over a level sum (512 KiB of int64)
_ONE_CHUNK = 1 << 19  # up to this many floating elements (4 MiB of float64), an upload is one chunk
_MAGIC_BITS = int(np.array(_MAGIC, dtype=np.float64).view(np.int64))


def _level(bound: float) -> int:
    """The smallest ``L`` with ``bound < 2**(LEVEL_BITS * L)``, for ``bound > 0``."""
    exponent = math.frexp(bound)[1]  # bound < 2**exponent
    return -((-exponent) // LEVEL_BITS)


def _real(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, on the CPU, with a complex tensor as pairs of reals."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    return torch.view_as_real(x) if x.is_complex() else x


def _peak(x: torch.Tensor) -> float:
    """The largest magnitude in ``x`` (a real tensor; 0 when empty)."""
    if x.numel() == 0:
        return 0.0
    if x.dtype == torch.bool:
        return float(bool(x.any()))
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


def _offset(terms: int) -> np.int64:
    """What ``terms`` deposits add to each element besides their integers: ``terms`` magic numbers'
    bits, modulo ``2**64`` as int64 addition wraps."""
    offset = (terms * _MAGIC_BITS) % (1 << 64)
    return np.int64(offset - (1 << 64) if offset >= 1 << 63 else offset)


class _Levels:
    """The int64 sums of one flat layout, one per level in use, and how many terms each took."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sums: Dict[int, np.ndarray] = {}
        self.terms: Dict[int, int] = {}

    def zero_(self) -> None:
        self.terms = {level: 0 for level in self.sums}

    def take(self, level: int) -> np.ndarray:
        """``level``'s int64 sum, counted as taking one more term, which the caller adds to every
        element (as magic-rounded bits: each deposit carries ``_MAGIC_BITS`` per element)."""
        terms = self.terms.get(level, 0)
        if terms >= MAX_TERMS:
            raise OverflowError(f"an exact sum takes at most {MAX_TERMS} terms of one magnitude; aggregate sooner")
        total = self.sums.get(level)
        if total is None:
            total = self.sums[level] = np.zeros(self.size, dtype=np.int64)
        elif terms == 0:
            total.fill(0)
        self.terms[level] = terms + 1
        return total

    def deposit(self, level: int, magic_bits: np.ndarray) -> None:
        """Add a float64 buffer of magic-rounded terms (as int64 bits) to ``level``'s sum."""
        total = self.take(level)
        np.add(total, magic_bits, out=total)  # wraps

    def value(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The sum as a float64 array (``out`` if given, else a fresh one): per element, the levels'
        values added from the lowest level up (the first one written, not added to 0.0: the same bits)."""
        if out is None:
            out = np.empty(self.size, dtype=np.float64)
        for _ in self.chunks(out):
            pass
        return out

    def chunks(self, out: Optional[np.ndarray] = None) -> Iterator[Tuple[int, int, np.ndarray]]:
        """The sum read a chunk at a time: ``(start, end, float64 values of start..end)``. The values
        go into ``out[start:end]``, or with no ``out`` into a scratch array that the next chunk
        overwrites (it stays in the cache: one pass over the sums instead of a pass per step)."""
        used = [(level, _offset(self.terms[level]), math.ldexp(1.0, LEVEL_BITS * level - GRID_BITS))
                for level in sorted(self.sums) if self.terms.get(level, 0)]
        chunk = min(_CHUNK, self.size)
        scratch = np.empty(chunk, dtype=np.float64) if out is None else None
        exact = np.empty(chunk, dtype=np.int64)
        scaled = np.empty(chunk, dtype=np.float64) if len(used) > 1 else None
        for start in range(0, self.size, max(chunk, 1)):
            end = min(start + chunk, self.size)
            n = end - start
            target = scratch[:n] if out is None else out[start:end]
            if not used:
                target.fill(0.0)
            for index, (level, offset, scale) in enumerate(used):
                np.subtract(self.sums[level][start:end], offset, out=exact[:n])  # wraps back to the integer sum
                # int64 -> float64, then an exact power-of-two scale in place (numpy's mixed-type
                # multiply gives the same bits through a slower buffered loop).
                into = target if index == 0 else scaled[:n]
                into[...] = exact[:n]
                np.multiply(into, scale, out=into)
                if index > 0:
                    np.add(target, into, out=target)
            yield start, end, target

    def exact(self) -> Dict[int, Tuple[np.ndarray, int]]:
        """Each level in use: ``(its integer sum without the magic offsets, its term count)``."""
        out = {}
        for level in sorted(self.sums):
            terms = self.terms.get(level, 0)
            if terms:
                out[level] = (np.subtract(self.sums[level], _offset(terms)), terms)
        return out

    def merge(self, level: int, exact: np.ndarray, terms: int) -> None:
        """Add another sum's level (:meth:`exact`): the same bits as adding its terms here."""
        held = self.terms.get(level, 0)
        if held + terms > MAX_TERMS:
            raise OverflowError(f"an exact sum takes at most {MAX_TERMS} terms of one magnitude; aggregate sooner")
        total = self.sums.get(level)
        if total is None:
            total = self.sums[level] = np.zeros(self.size, dtype=np.int64)
        elif held == 0:
            total.fill(0)
        np.add(total, exact, out=total)
        np.add(total, _offset(terms), out=total)  # wraps, as the deposits of those terms would
        self.terms[level] = held + terms

    def state_dict(self) -> Dict[str, Any]:
        used = [level for level in sorted(self.sums) if self.terms.get(level, 0)]
        return {"sums": {str(level): torch.from_numpy(self.sums[level].copy()) for level in used},
                "terms": {str(level): self.terms[level] for level in used}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sums = {int(level): total.numpy().astype(np.int64).copy() for level, total in state["sums"].items()}
        self.terms = {int(level): int(count) for level, count in state["terms"].items()}
        if any(total.size != self.size for total in self.sums.values()):
            raise ValueError("the saved exact sum has another layout")


class ExactSum:
    """A running sum of ``weight * tensors`` (one upload: a list of tensors of fixed shapes), exact
    in any order of the adds.

    Args:
        shapes: the shape of each tensor of an upload.
        complex_: which of them are complex (summed as pairs of reals).
        floating: which of them are floating or complex (summed together); the others (integer,
            bool) are summed one by one.
    """

    def __init__(self, shapes: Sequence[Tuple[int, ...]], floating: Optional[Sequence[bool]] = None,
                 complex_: Optional[Sequence[bool]] = None) -> None:
        self.shapes = [tuple(shape) for shape in shapes]
        count = len(self.shapes)
        self.complex = list(complex_) if complex_ is not None else [False] * count
        self.floating = list(floating) if floating is not None else [True] * count
        self._sizes = [math.prod(s) * (2 if c else 1) for s, c in zip(self.shapes, self.complex)]
        self._float = [i for i in range(count) if self.floating[i]]
        self._other = [i for i in range(count) if not self.floating[i]]
        self._offsets: Dict[int, int] = {}
        size = 0
        for i in self._float:
            self._offsets[i] = size
            size += self._sizes[i]
        # magic + w * x * 2**f is formed a chunk of the flat layout at a time in this scratch, which
        # stays in the cache; a chunk holds the parts of every tensor it overlaps.
        # A small model is one chunk: fewer, larger operations cost less than the cache they miss.
        chunk = size if size <= _ONE_CHUNK else _CHUNK
        self._scratch = torch.empty(chunk, dtype=torch.float64)
        self._scratch_bits = self._scratch.numpy().view(np.int64)
        # (start, end, [(tensor i, from, to, its part of the scratch)])
        self._chunks: List[Tuple[int, int, List[Tuple[int, int, int, torch.Tensor]]]] = []
        for start in range(0, size, max(chunk, 1)):
            end = min(start + chunk, size)
            self._chunks.append((start, end, [(i, low, high, self._scratch[self._offsets[i] + low - start:
                                                                          self._offsets[i] + high - start])
                                              for i, low, high in self._parts(start, end)]))
        self._magic_one = torch.tensor([_MAGIC], dtype=torch.float64)
        self._levels = _Levels(size)
        self._value: Optional[np.ndarray] = None  # value(reuse=True)'s buffer
        self._read_parts: Optional[List[List[Tuple[int, int, int]]]] = None  # what means() copies, per chunk
        self._singles = {i: _Levels(self._sizes[i]) for i in self._other}

    def zero_(self) -> "ExactSum":
        """Forget every term; the level buffers are kept for reuse."""
        self._levels.zero_()
        for single in self._singles.values():
            single.zero_()
        return self

    def add_(self, tensors: Sequence[torch.Tensor], weight: float, peak: Optional[float] = None) -> "ExactSum":
        """Add ``weight * tensors`` (finite tensors of :attr:`shapes`; ``weight`` finite and ``>= 0``).

        Args:
            peak: the largest magnitude of the floating tensors, when known (a receiver's finite
                check finds it): they then share one level, the upload's, and no pass looks for
                each tensor's; the error bound is then relative to the upload's largest magnitude.
        """
        if weight == 0.0:
            return self
        real = [_real(x) for x in tensors]
        groups: Dict[int, List[int]] = {}
        if peak is not None and not any(self.complex):
            if peak * weight > 0.0 and self._float:
                groups[_level(peak * weight)] = self._float
        else:
            for i in self._float:
                bound = _peak(real[i]) * weight
                if bound > 0.0:
                    groups.setdefault(_level(bound), []).append(i)
        for level, members in sorted(groups.items()):
            # magic + w * x * 2**f in float64 (scaling by a power of two is exact; a one-element
            # float64 tensor makes the sum float64); |w * x * 2**f| <= 2**42 < 2**51, so the float64
            # holds the rounded integer in its low bits, added to the level's int64 sum as such.
            # Tensors of other levels add the magic number alone, an integer 0. A narrower x is
            # first copied into the scratch (exactly) and the sum formed there: what torch's mixed-
            # dtype add does through a temporary of its own, the same kernel on the same float64s.
            scale = math.ldexp(weight, GRID_BITS - LEVEL_BITS * level)
            total = self._levels.take(level)
            flat = {i: real[i].reshape(-1) for i in members}
            for start, end, parts in self._chunks:
                for i, low, high, into in parts:
                    if i in flat:
                        part = flat[i] if high - low == self._sizes[i] else flat[i][low:high]
                        if part.dtype != torch.float64:
                            part = into.copy_(part)
                        torch.add(self._magic_one, part, alpha=scale, out=into)
                    else:
                        into.fill_(_MAGIC)
                np.add(total[start:end], self._scratch_bits[:end - start], out=total[start:end])  # wraps
        for i in self._other:
            x = real[i].reshape(-1).to(torch.float64)
            bound = _peak(x) * weight
            if bound > 0.0:
                level = _level(bound)
                work = torch.full_like(x, _MAGIC).add_(x, alpha=math.ldexp(weight, GRID_BITS - LEVEL_BITS * level))
                self._singles[i].deposit(level, work.numpy().view(np.int64))
        return self

    def value(self, reuse: bool = False) -> List[torch.Tensor]:
        """The sums as float64 tensors of :attr:`shapes` (a complex tensor's sum comes as pairs of
        reals, a trailing dimension of 2).

        Args:
            reuse: write them into a buffer this sum keeps, which the next ``value(reuse=True)``
                overwrites (for a caller that is done with them by then: a fresh buffer of the
                model's size costs its page faults on every call); False: fresh tensors.
        """
        if reuse:
            if self._value is None:
                self._value = np.empty(self._levels.size, dtype=np.float64)
            flat = torch.from_numpy(self._levels.value(self._value))
        else:
            flat = torch.from_numpy(self._levels.value())
        out = []
        for i, (shape, is_complex) in enumerate(zip(self.shapes, self.complex)):
            values = flat[self._offsets[i]:self._offsets[i] + self._sizes[i]] if i in self._offsets \
                else torch.from_numpy(self._singles[i].value())
            out.append(values.view(*shape, 2) if is_complex else values.view(shape))
        return out

    def means(self, total_weight: float, dtypes: Sequence[torch.dtype]) -> List[torch.Tensor]:
        """``finish_mean(value()[i], total_weight, dtypes[i])`` for every tensor, with its bits, in
        fresh tensors. The floating tensors are read out of the integer sums, divided and rounded to
        their dtype a chunk at a time: no float64 copy of the whole sum is written and read again.

        Raises:
            ValueError: a tensor is complex (read those through :meth:`value`).
        """
        if any(self.complex):
            raise ValueError("means() takes real tensors only; read complex sums through value()")
        out: List[Optional[torch.Tensor]] = [None] * len(self.shapes)
        flat: Dict[int, torch.Tensor] = {}
        for i in self._float:
            out[i] = torch.empty(self.shapes[i], dtype=dtypes[i])
            flat[i] = out[i].view(-1)
        if self._read_parts is None:
            self._read_parts = self._parts_of_chunks()
        for (start, end, values), parts in zip(self._levels.chunks(), self._read_parts):
            chunk = torch.from_numpy(values)
            torch.div(chunk, total_weight, out=chunk)  # in float64, as finish_mean divides the sum
            for i, low, high in parts:  # rounded to the tensor's dtype as it is stored
                at = self._offsets[i] - start
                flat[i][low:high].copy_(chunk[at + low:at + high])
        for i in self._other:
            out[i] = finish_mean(torch.from_numpy(self._singles[i].value()).view(self.shapes[i]), total_weight,
                                 dtypes[i])
        return out

    def _parts_of_chunks(self) -> List[List[Tuple[int, int, int]]]:
        """For each chunk :meth:`_Levels.chunks` reads, :meth:`_parts` of it."""
        size, chunk = self._levels.size, min(_CHUNK, self._levels.size)
        return [self._parts(start, min(start + chunk, size)) for start in range(0, size, max(chunk, 1))]

    def _parts(self, start: int, end: int) -> List[Tuple[int, int, int]]:
        """The floating tensors that elements ``start..end`` of the flat layout overlap: ``(tensor
        i, first element, end)``, counted within the tensor."""
        parts = []
        for i in self._float:
            low, high = max(start, self._offsets[i]), min(end, self._offsets[i] + self._sizes[i])
            if high > low:
                parts.append((i, low - self._offsets[i], high - self._offsets[i]))
        return parts

    def segments(self) -> List[Dict[int, Tuple[np.ndarray, int]]]:
        """The exact integer sums, segment by segment: first the floating tensors (one flat
        buffer), then each integer or bool tensor; per segment ``{level: (int64 sums, terms)}``.
        :meth:`merge_` of them into an empty sum of the same shapes gives the same bits as the
        adds that made them (:mod:`openfl_api.aggregate.partial` sends them between backends)."""
        return [self._levels.exact(), *(self._singles[i].exact() for i in self._other)]

    @property
    def segment_sizes(self) -> List[int]:
        """The number of int64 elements of each segment of :meth:`segments`."""
        return [self._levels.size, *(self._sizes[i] for i in self._other)]

    def merge_(self, segments: Sequence[Dict[int, Tuple[np.ndarray, int]]]) -> "ExactSum":
        """Add the exact sums of another :class:`ExactSum` of the same shapes (its :meth:`segments`):
        every integer addition is exact, so this equals adding that sum's terms here, in any order."""
        parts = [self._levels, *(self._singles[i] for i in self._other)]
        if len(segments) != len(parts):
            raise ValueError(f"merge_ needs {len(parts)} segments (this sum's layout), got {len(segments)}")
        for part, levels in zip(parts, segments):  # all checked before anything is added
            for level, (exact, terms) in levels.items():
                if exact.shape != (part.size,):
                    raise ValueError(f"a merged level holds {exact.shape[0]} elements where this sum has {part.size}")
                if part.terms.get(int(level), 0) + int(terms) > MAX_TERMS:
                    raise OverflowError(f"an exact sum takes at most {MAX_TERMS} terms of one magnitude; aggregate sooner")
        for part, levels in zip(parts, segments):
            for level, (exact, terms) in levels.items():
                part.merge(int(level), exact, int(terms))
        return self

    def state_dict(self) -> Dict[str, Any]:
        """The level sums (int64 tensors) and term counts, for a checkpoint."""
        return {"levels": self._levels.state_dict(),
                "singles": {str(i): single.state_dict() for i, single in self._singles.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._levels.load_state_dict(state["levels"])
        for i, saved in state["singles"].items():
            self._singles[int(i)].load_state_dict(saved)
