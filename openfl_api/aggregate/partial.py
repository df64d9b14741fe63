"""Exact partial sums between backends: what a middle node (an edge) uploads to its parent.

A root that averages its leaves sums ``w_k * x_k`` in an :class:`~openfl_api.aggregate.exact.ExactSum`:
each term is rounded once, on a grid fixed by the term alone, and added in integers. An edge that
uploaded the float32 mean of its children would round again, so the root's model would differ
from the flat federation's. An edge therefore uploads its children's sum exactly, as the
:class:`ExactSum` holds it, and the parent merges it in integers: the parent's sum then has the
same bits as if every leaf had uploaded to it directly, at any depth and in any order.

On the wire a partial sum is three named upload extras (:meth:`PartialSums.extra_layout`):

- ``extra/partial/planes``, int64 ``(planes, N)``: up to ``planes`` integer sums per segment of
  the exact sum (segment 0: the floating tensors, one flat buffer; then each integer or bool
  tensor), each segment's ``N_s`` elements side by side (``N = sum N_s``);
- ``extra/partial/levels``, int64 ``(planes, segments, 2)``: for plane ``p`` of segment ``s``,
  the level and the number of terms it holds (0 terms: the plane is unused);
- ``extra/partial/weights``, float64 ``(pieces,)``: the children's total weight, exactly, as
  nonnegative float64 pieces (their exact sum is the exact sum of the weights), so the root's
  ``math.fsum`` of every weight is the flat federation's.

A plain upload (a leaf that uploads straight to a root that also has edges) carries these extras
as zeros and is added as usual. A partial sum accepted with a weight other than 1 (an
asynchronous parent's staleness factor) cannot be scaled exactly: its mean is then added as one
upload with that weight, which is not bit for bit the flat federation's result.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.aggregate.base import Aggregator, check_layout
from openfl_api.aggregate.exact import GRID_BITS, MAX_TERMS, ExactSum
from openfl_api.errors import ConfigurationError
from openfl_api.logger import bind

_log = bind("backend")
#: The levels a finite float64 term can have (its largest magnitude lies in [2**-1074, 2**1024)).
_LEVELS = (-1074 // 8, 1024 // 8)

__all__ = ["PartialSums", "weight_pieces", "PLANES", "LEVELS", "WEIGHTS"]

PLANES = "extra/partial/planes"
LEVELS = "extra/partial/levels"
WEIGHTS = "extra/partial/weights"


def weight_pieces(weights: Sequence[float]) -> List[float]:
    """Nonnegative float64 pieces whose exact sum is the exact sum of ``weights`` (each >= 0).

    The largest float not above what is left, then again on the rest: a handful of pieces for
    any weights, one for integer sample counts.
    """
    rest = sum((Fraction(w) for w in weights), Fraction(0))
    pieces: List[float] = []
    while rest:
        piece = float(rest)
        if Fraction(piece) > rest:
            piece = math.nextafter(piece, 0.0)
        pieces.append(piece)
        rest -= Fraction(piece)
    return pieces or [0.0]


class PartialSums:
    """Wraps an aggregator so that uploads may also be exact partial sums of a middle node's
    children; on a middle node's side toward its parent, stages them for the upload.

    The wrapped aggregator must be a plain :class:`~openfl_api.aggregate.base.Aggregator` (the
    average aggregators), with no optimizer state or per-parameter extras: a partial sum carries
    the weighted sum of the model's entries and nothing else.

    Args:
        aggregator: the aggregator whose sum the partial sums are merged into.
        state_dict: the model's ``state_dict``, in the order given to ``set_state_dict``.
        planes: levels per segment a partial sum may use; children whose uploads differ in
            magnitude by more than ``2**(8 * planes)`` need more.
        pieces: float64 pieces of the total weight.

    Raises:
        ConfigurationError: the aggregator is not a plain one, or an argument is out of range.
    """

    steps_server = False

    def __init__(self, aggregator: Aggregator, state_dict: Mapping[str, torch.Tensor], planes: int = 4,
                 pieces: int = 8) -> None:
        if not isinstance(aggregator, Aggregator) or type(aggregator).add is not Aggregator.add \
                or getattr(aggregator, "extra_layout", None) is not None:
            raise ConfigurationError(
                f"PartialSums wraps a plain Aggregator (AverageAggregator, NaiveAggregator), got "
                f"{type(aggregator).__name__}; strategies with server steps or extras do not merge exact partial sums")
        if aggregator.state_keys or aggregator.upload_keys:
            raise ConfigurationError("PartialSums needs an aggregator without state_keys or upload_keys; a partial "
                                     f"sum carries the model's entries only, got {aggregator.state_keys!r}, "
                                     f"{aggregator.upload_keys!r}")
        for label, value in (("planes", planes), ("pieces", pieces)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"PartialSums({label}=...) must be an int >= 1, got {value!r}")
        self.inner = aggregator
        self.planes, self.pieces = planes, pieces
        self._layout = {name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for name, t in state_dict.items()}
        floating = sum(_size(t) for t in self._layout.values() if t.is_floating_point() or t.is_complex())
        self.segment_sizes = [floating, *(_size(t) for t in self._layout.values()
                                          if not (t.is_floating_point() or t.is_complex()))]
        self._staged: Optional[Dict[str, torch.Tensor]] = None
        #: Partial sums left out because they did not hold (logged as errors).
        self.refused = 0
        self._left_out = False

    # ----------------------------------------------------------------- what the API reads
    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def extra_layout(self) -> Tuple[Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]]:
        """No download extras; the partial sum's three upload extras."""
        total = sum(self.segment_sizes)
        return {}, {PLANES: (torch.int64, (self.planes, total)),
                    LEVELS: (torch.int64, (self.planes, len(self.segment_sizes), 2)),
                    WEIGHTS: (torch.float64, (self.pieces,))}

    def download_extras(self) -> Dict[str, torch.Tensor]:
        return {}

    def receive_extras(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Nothing comes down with the model."""

    # ----------------------------------------------------------------- the middle node's side
    def stage(self, segments: Sequence[Dict[int, Tuple[np.ndarray, int]]], weights: Sequence[float]) -> None:
        """Attach an exact sum (:meth:`ExactSum.segments`) and its terms' weights to the next upload.

        Raises:
            ConfigurationError: the sum has another layout, uses more levels than ``planes`` in a
                segment, or its weight needs more than ``pieces`` pieces.
        """
        if len(segments) != len(self.segment_sizes):
            raise ConfigurationError(f"the partial sum has {len(segments)} segments, the model {len(self.segment_sizes)}")
        planes = torch.zeros(self.planes, sum(self.segment_sizes), dtype=torch.int64)
        levels = torch.zeros(self.planes, len(self.segment_sizes), 2, dtype=torch.int64)
        start = 0
        for s, (size, used) in enumerate(zip(self.segment_sizes, segments)):
            if len(used) > self.planes:
                raise ConfigurationError(
                    f"the children's uploads span {len(used)} magnitude levels in segment {s}, more than "
                    f"planes={self.planes}; build PartialSums(..., planes={len(used)}) on every rank")
            for p, (level, (exact, terms)) in enumerate(sorted(used.items())):
                planes[p, start:start + size] = torch.from_numpy(exact)
                levels[p, s, 0], levels[p, s, 1] = level, terms
            start += size
        pieces = weight_pieces(weights)
        if len(pieces) > self.pieces:
            raise ConfigurationError(f"the children's total weight needs {len(pieces)} float64 pieces, more than "
                                     f"pieces={self.pieces}; build PartialSums(..., pieces={len(pieces)}) on every rank")
        self._staged = {PLANES: planes, LEVELS: levels,
                        WEIGHTS: torch.tensor(pieces + [0.0] * (self.pieces - len(pieces)), dtype=torch.float64)}

    def frontend_extras(self) -> Dict[str, torch.Tensor]:
        """The staged partial sum, handed over; zeros (a plain upload) when none is staged."""
        staged, self._staged = self._staged, None
        if staged is not None:
            return staged
        return {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in self.extra_layout()[1].items()}

    # ----------------------------------------------------------------- the parent's side
    def add(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float = 1.0,
            peak: Optional[float] = None) -> None:
        """Merge a partial sum exactly, or add a plain upload as the wrapped aggregator does."""
        model = {name: x for name, x in tensors.items() if name not in (PLANES, LEVELS, WEIGHTS)}
        levels = tensors[LEVELS]
        if not bool((levels[..., 1] > 0).any()):
            self.inner.add(model, num_samples, weight, peak)
            return
        try:
            segments = self._segments(tensors[PLANES], levels)
            pieces = self._pieces(tensors[WEIGHTS])
        except ValueError as exc:  # nothing of it is merged: the global model stays as the valid uploads make it
            self._refuse(f"left out a partial sum that does not hold: {exc}")
            return
        inner = self.inner
        if weight != 1.0:
            self._add_mean(segments, pieces, num_samples, weight)
            return
        if inner._count:
            check_layout(inner, self._layout)
        else:
            inner._allocate(self._layout)
            inner._sum.zero_()
        try:
            inner._sum.merge_(segments)
        except OverflowError as exc:
            self._refuse(f"left out a partial sum: {exc}")
            return
        inner._count += len(pieces)
        inner._weights.extend(pieces)

    def _refuse(self, reason: str) -> None:
        _log.error(reason)
        self.refused += 1
        self._left_out = True

    def aggregate(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The wrapped aggregator's result; the current model when every upload of the version was
        a partial sum left out (the version then keeps its model)."""
        left_out, self._left_out = self._left_out, False
        if not self.inner.count and left_out:
            _log.error("every upload of this version was a partial sum that was left out; the model stays as it was")
            return {name: current[name].detach().clone() for name in self._layout}
        return self.inner.aggregate(current)

    def reset(self) -> None:
        self._left_out = False
        self.inner.reset()

    def _segments(self, planes: torch.Tensor, levels: torch.Tensor) -> List[Dict[int, Tuple[np.ndarray, int]]]:
        """The exact sums of an upload's planes, checked: levels a float64 term can have, at most
        :data:`MAX_TERMS` terms, each level once per segment, unused planes zero, and every integer
        within what its terms can sum to (``2**42`` each), so no merge can overflow.

        Raises:
            ValueError: the planes do not hold.
        """
        segments: List[Dict[int, Tuple[np.ndarray, int]]] = []
        start = 0
        table = levels.tolist()
        for s, size in enumerate(self.segment_sizes):
            used: Dict[int, Tuple[np.ndarray, int]] = {}
            for p in range(self.planes):
                level, terms = table[p][s]
                plane = planes[p, start:start + size]
                if not 0 <= terms <= MAX_TERMS or not _LEVELS[0] <= level <= _LEVELS[1] or level in used:
                    raise ValueError(f"plane {p} of segment {s} has level {level} and {terms} terms; levels lie in "
                                     f"{list(_LEVELS)}, once per segment, with 0 to {MAX_TERMS} terms")
                bound = terms << GRID_BITS
                if bool((plane.abs() > bound).any()) or bool((plane == torch.iinfo(torch.int64).min).any()):
                    raise ValueError(f"plane {p} of segment {s} holds integers beyond {terms} terms of at most 2**{GRID_BITS}")
                if terms:
                    used[level] = (plane.numpy().copy(), terms)
            segments.append(used)
            start += size
        return segments

    def _pieces(self, weights: torch.Tensor) -> List[float]:
        pieces = [float(w) for w in weights.tolist()]
        if not all(math.isfinite(w) and w >= 0 for w in pieces) or not math.fsum(pieces) > 0:
            raise ValueError(f"its weight pieces must be finite, >= 0 and sum to more than 0, got {pieces[:4]}")
        return [w for w in pieces if w]

    def _add_mean(self, segments: List[Dict[int, Tuple[np.ndarray, int]]], pieces: List[float], num_samples: int,
                  weight: float) -> None:
        """A partial sum weighted by another factor: its mean, added as one upload."""
        shapes = [tuple(t.shape) for t in self._layout.values()]
        floating = [t.is_floating_point() or t.is_complex() for t in self._layout.values()]
        complex_ = [t.is_complex() for t in self._layout.values()]
        values = ExactSum(shapes, floating, complex_).merge_(segments).value()
        total = math.fsum(pieces)
        mean = {name: (torch.view_as_complex(v) if t.is_complex() else v).div(total).to(t.dtype)
                for (name, t), v in zip(self._layout.items(), values)}
        self.inner.add(mean, num_samples, weight)


def _size(t: torch.Tensor) -> int:
    return math.prod(t.shape) * (2 if t.is_complex() else 1)
