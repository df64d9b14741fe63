"""What a payload must look like: the wire dtypes, one tensor's spec, and a schema's canonical layout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError

__all__ = ["FORMAT", "ALIGN", "DTYPES", "KINDS", "TensorSpec", "Schema", "dtype_name", "describe_differences"]

FORMAT = 1
ALIGN = 64

DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
KINDS = ("model", "update")


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of ``dtype``; raise ConfigurationError for dtypes that cannot travel."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigurationError(
            f"dtype {dtype} cannot be sent; supported dtypes are {sorted(DTYPES)}. "
            "Cast the tensor or leave it out of the state_dict."
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a payload must look like: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


class Schema:
    """The ordered set of tensors a receiver expects, with the canonical buffer layout.

    Args:
        specs: one :class:`TensorSpec` per tensor; names must be unique.
    """

    def __init__(self, specs: Iterable[TensorSpec]) -> None:
        self.specs: Tuple[TensorSpec, ...] = tuple(specs)
        self.by_name: Dict[str, TensorSpec] = {}
        for spec in self.specs:
            if spec.name in self.by_name:
                raise ConfigurationError(f"tensor name {spec.name!r} appears twice in a schema")
            dtype_name(spec.dtype)
            self.by_name[spec.name] = spec
        offsets = []
        offset = 0
        for spec in self.specs:
            offsets.append(offset)
            offset = _aligned(offset + spec.nbytes)
        self.offsets: Tuple[int, ...] = tuple(offsets)
        self.nbytes = offset
        self.sizes: Tuple[int, ...] = tuple(spec.nbytes for spec in self.specs)
        #: ``(start, end)`` of the alignment padding after each tensor that has some.
        self.padding: Tuple[Tuple[int, int], ...] = tuple(
            (offset + size, end) for offset, size, end in zip(self.offsets, self.sizes, (*self.offsets[1:], self.nbytes))
            if offset + size < end
        )
        self._strides = tuple(_contiguous_strides(spec.shape) for spec in self.specs)
        #: The header's tensor entries of a payload in this layout, as :func:`encode` writes them.
        self.entries: List[Dict[str, Any]] = [
            {"name": spec.name, "dtype": dtype_name(spec.dtype), "shape": list(spec.shape),
             "offset": offset, "nbytes": size}
            for spec, offset, size in zip(self.specs, self.offsets, self.sizes)
        ]
        self.entries_json = json.dumps(self.entries, separators=(",", ":"))
        #: How every header in this layout ends (see :func:`parse_header`).
        self.entries_suffix = b',"tensors":' + self.entries_json.encode("utf-8") + b"}"
        # The views of the last few buffers: each gloo pipe reuses its receive buffer and each
        # sender its staging buffer (the in-memory pipe hands over a fresh one per message, so it misses).
        self._views: List[Tuple[Tuple[int, int], torch.Tensor, Tuple[torch.Tensor, ...]]] = []
        # Runs of neighbouring floating tensors of one dtype: one sum checks a whole run.
        self.finite_runs: List[Tuple[int, int, torch.dtype, List[int]]] = []
        for index, (spec, offset, size) in enumerate(zip(self.specs, self.offsets, self.sizes)):
            if not spec.dtype.is_floating_point or size == 0:
                continue
            last = self.finite_runs[-1] if self.finite_runs else None
            if last is not None and last[2] == spec.dtype and last[3][-1] == index - 1:
                self.finite_runs[-1] = (last[0], offset + size, spec.dtype, last[3] + [index])
            else:
                self.finite_runs.append((offset, offset + size, spec.dtype, [index]))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "Schema":
        """Build the schema that describes ``tensors`` (name, dtype, shape), in mapping order."""
        return cls(TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items())

    def __len__(self) -> int:
        return len(self.specs)

    def views(self, buffer: torch.Tensor, cache: bool = True) -> Dict[str, torch.Tensor]:
        """Views of every tensor of this layout in ``buffer`` (``schema.nbytes`` uint8 bytes).

        With ``cache``, the views of the last three buffers are kept: receive and staging buffers are
        reused message after message.
        """
        return dict(zip(self.by_name, self.view_list(buffer, cache)))

    def view_list(self, buffer: torch.Tensor, cache: bool = True) -> Tuple[torch.Tensor, ...]:
        """Like :meth:`views`, as a tuple in the order of :attr:`specs`; ``cache=False`` for a
        buffer that is used once."""
        key = (buffer.data_ptr(), buffer.numel())
        for cached in self._views:
            if cached[0] == key:
                return cached[2]
        typed: Dict[torch.dtype, Optional[torch.Tensor]] = {}
        views = []
        for spec, offset, stride in zip(self.specs, self.offsets, self._strides):
            itemsize = spec.dtype.itemsize
            if spec.dtype not in typed:
                aligned = buffer.numel() % itemsize == 0 and buffer.storage_offset() % itemsize == 0
                typed[spec.dtype] = buffer.view(spec.dtype) if aligned else None
            whole = typed[spec.dtype]
            # One as_strided per tensor instead of a slice and two views: a third of the cost.
            views.append(_view(buffer, offset, spec) if whole is None else
                         whole.as_strided(spec.shape, stride, whole.storage_offset() + offset // itemsize))
        if not cache:
            return tuple(views)
        self._views = [(key, buffer, tuple(views)), *self._views[:2]]
        return self._views[0][2]

    def __repr__(self) -> str:
        return f"Schema({len(self.specs)} tensors, {self.nbytes} bytes)"


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _view(buffer: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    region = buffer[offset : offset + spec.nbytes]
    return region.view(spec.dtype).view(spec.shape)


def describe_differences(theirs: Mapping[str, Tuple[Any, Tuple[int, ...]]],
                         ours: Mapping[str, Tuple[Any, Tuple[int, ...]]], their_name: str, our_name: str,
                         limit: int = 4) -> str:
    """Name the first entries that differ between two ``name -> (dtype, shape)`` layouts; ``""`` if none.

    Example: ``"missing in the frontend's model: fc2.weight, fc2.bias; shapes differ: fc1.weight is
    (6, 12) in this backend and (4, 12) in the frontend's model"``.
    """
    parts = []
    missing = [n for n in ours if n not in theirs]
    extra = [n for n in theirs if n not in ours]
    if missing:
        parts.append(f"missing in {their_name}: {_first(missing, limit)}")
    if extra:
        parts.append(f"not in {our_name}: {_first(extra, limit)}")
    shapes = [n for n in ours if n in theirs and tuple(theirs[n][1]) != tuple(ours[n][1])]
    if shapes:
        parts.append("shapes differ: " + "; ".join(
            f"{n} is {tuple(ours[n][1])} in {our_name} and {tuple(theirs[n][1])} in {their_name}" for n in shapes[:limit]))
    dtypes = [n for n in ours if n in theirs and str(theirs[n][0]) != str(ours[n][0])]
    if dtypes:
        parts.append("dtypes differ: " + "; ".join(
            f"{n} is {ours[n][0]} in {our_name} and {theirs[n][0]} in {their_name}" for n in dtypes[:limit]))
    if not parts and list(theirs) != list(ours):
        parts.append(f"the same entries in another order (first at {_first_out_of_order(theirs, ours)})")
    return "; ".join(parts)


def _first(names: list, limit: int) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _first_out_of_order(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    for a, b in zip(theirs, ours):
        if a != b:
            return b
    return "the end"
