"""Encoding tensors into a payload (one flat buffer, or pieces sent straight from the tensors) and
decoding one: every check against the schema happens before any byte is used."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload.header import MAX_NAME_CHARS, _check_identity, _header, parse_header
from openfl_api.payload.schema import DTYPES, FORMAT, Schema, TensorSpec, _view, dtype_name
from openfl_api.transport.base import Pieces

__all__ = ["Payload", "encode", "split", "FiniteScan", "decode", "on_cuda"]


@dataclass
class Payload:
    """A decoded, validated payload: the header fields and zero-copy views into the buffer.

    ``peak``: the largest magnitude of the floating tensors when the finite check found it (the
    canonical layout), else None.
    """

    kind: str
    version: int
    sender: str
    meta: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]
    peak: Optional[float] = None


def on_cuda(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether one of ``tensors`` is on a CUDA device. A host buffer that gathers them is then
    allocated page-locked (pinned): a copy from the GPU into it is one DMA transfer, where a copy
    into pageable memory goes through the driver's bounce buffer."""
    return any(t is not None and t.device.type == "cuda" for t in tensors)


def _source(tensors: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    source = tensors.get(spec.name)
    if source is None:
        raise ConfigurationError(f"tensor {spec.name!r} of the schema is missing from the tensors to encode")
    if source.dtype != spec.dtype or tuple(source.shape) != spec.shape:
        raise ConfigurationError(
            f"tensor {spec.name!r} is {source.dtype} {tuple(source.shape)} but the schema "
            f"says {spec.dtype} {spec.shape}; rebuild the schema after changing the model"
        )
    return source.detach()


def encode(
    tensors: Mapping[str, torch.Tensor],
    schema: Schema,
    *,
    kind: str,
    version: int,
    sender: str,
    meta: Optional[Mapping[str, Any]] = None,
    out: Optional[torch.Tensor] = None,
    keep_views: Optional[bool] = None,
) -> Tuple[bytes, torch.Tensor]:
    """Encode ``tensors`` laid out by ``schema`` into a header and one flat uint8 buffer.

    Args:
        tensors: a tensor for every name in ``schema``, with the schema's dtype and shape.
        schema: the layout; build it once with :meth:`Schema.from_tensors` and reuse it.
        kind: ``"model"`` (backend to frontend) or ``"update"`` (frontend to backend).
        version: the global version this payload carries or was trained from.
        sender: a printable name of the sender, for log lines.
        meta: JSON-serialisable metadata (number of samples, metrics, ...).
        out: a zeroed uint8 buffer of at least ``schema.nbytes`` bytes to fill instead of
            allocating; the padding between tensors is never written, so it stays as it was.
            Allocated here, the buffer is page-locked when a tensor is on CUDA (:func:`on_cuda`).
        keep_views: whether ``schema`` keeps its views of the buffer for the next encoding into
            it (default: when ``out`` is given); False for a buffer whose references are counted
            (:mod:`openfl_api.buffers`).

    Returns:
        ``(header_bytes, buffer)``; ``buffer`` is ``out[:schema.nbytes]`` when ``out`` is given.
    """
    _check_identity(kind, version, sender)
    buffer = _staging(schema, out, on_cuda(tensors.values()))
    sources = [_source(tensors, spec) for spec in schema.specs]
    # A fresh buffer's views are not cached: they would push out those of reused buffers.
    targets = schema.view_list(buffer, cache=out is not None if keep_views is None else keep_views)
    if sources:
        torch._foreach_copy_(list(targets), sources)  # detached sources: no autograd to switch off
    return _header(schema, kind, version, sender, meta), buffer


def split(buffer: torch.Tensor, piece_bytes: int = 4 * 1024 * 1024) -> Pieces:
    """Hand a flat payload buffer to the pipe in pieces of ``piece_bytes``, so the receiver can
    check the first pieces while the last ones are still on the wire."""
    size = buffer.numel()
    return Pieces(size, tuple((start, buffer[start : start + piece_bytes]) for start in range(0, size, piece_bytes)))


class FiniteScan:
    """Checks the floating runs of a payload in ``schema``'s layout while its pieces arrive.

    A pipe calls :meth:`progress` as pieces land; :func:`decode` given this scan then checks only
    the runs that were not complete yet. The scan assumes the canonical layout; decode uses it only
    when the header says that layout, and a run that looks non-finite is checked again exactly.

    Args:
        schema: the layout the payload should have.
        buffer: the receive buffer.
    """

    def __init__(self, schema: Schema, buffer: torch.Tensor) -> None:
        self.schema = schema
        self.buffer = buffer
        self.done = 0  # runs checked
        self.peak = 0.0  # the largest magnitude in the runs checked (NaN or inf if one is not finite)

    def progress(self, end: int) -> None:
        """Bytes ``[0, end)`` of the buffer have arrived: check the runs that lie within them."""
        runs = self.schema.finite_runs
        if self.buffer.numel() != self.schema.nbytes:
            return
        while self.done < len(runs) and runs[self.done][1] <= end:
            start, stop, dtype, _ = runs[self.done]
            self.peak = _larger(self.peak, _run_peak(self.buffer, start, stop, dtype))
            self.done += 1

    @property
    def clean(self) -> bool:
        """Every run checked so far is finite."""
        return math.isfinite(self.peak)


def _larger(a: float, b: float) -> float:
    """``max(a, b)``, NaN if either is NaN (Python's ``max`` would drop a NaN in second place)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _run_peak(buffer: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> float:
    """The largest magnitude in a run of one floating dtype: NaN or inf when a value is not finite.

    One pass that serves two ends: the finite check, and the magnitude that fixes the grid of the
    aggregator's exact sum.
    """
    low, high = torch.aminmax(buffer[start:stop].view(dtype))
    low, high = float(low), float(high)
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return max(-low, high)


def _staging(schema: Schema, out: Optional[torch.Tensor], pinned: bool) -> torch.Tensor:
    if out is None:
        buffer = torch.empty(schema.nbytes, dtype=torch.uint8, pin_memory=pinned)
        for start, end in schema.padding:  # the tensors' bytes are all written next
            buffer[start:end].zero_()
        return buffer
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < schema.nbytes:
        raise ConfigurationError(
            f"out must be a 1-D uint8 tensor of at least {schema.nbytes} bytes, "
            f"got {out.dtype} of shape {tuple(out.shape)}"
        )
    return out[: schema.nbytes]


def decode(
    header: Mapping[str, Any] | bytes,
    buffer: torch.Tensor,
    schema: Schema,
    *,
    kind: str,
    check_finite: bool = True,
    scan: Optional[FiniteScan] = None,
    reused: bool = True,
) -> Payload:
    """Validate a received payload against ``schema`` and return views into ``buffer``.

    Nothing is copied: the returned tensors are views that stay valid while ``buffer`` is not
    reused. Every check runs before the caller can touch a value. ``scan``: the
    :class:`FiniteScan` that watched ``buffer`` arrive; the runs it found finite are not read again.
    A payload in the schema's canonical layout comes back with ``peak``, the largest magnitude of
    its floating tensors, found by the same pass as the finite check.
    ``reused``: False for a buffer that comes once (an in-memory pipe's), whose views are then not
    kept in the schema's cache.

    Raises:
        PayloadError: the header is malformed, names/dtypes/shapes/sizes/offsets do not match
            the schema, the buffer size is wrong, or a floating tensor holds NaN or Inf.
    """
    fields = parse_header(header) if isinstance(header, (bytes, bytearray, memoryview)) else dict(header)
    _expect_field(fields, "format", int)
    if fields["format"] != FORMAT:
        raise PayloadError(f"payload format {fields['format']} is not supported; this build reads format {FORMAT}")
    if fields.get("kind") != kind:
        raise PayloadError(f"expected a {kind!r} payload, got kind {fields.get('kind')!r}")
    version = _expect_field(fields, "version", int)
    if version < 0:
        raise PayloadError(f"version must be >= 0, got {version}")
    sender = _expect_field(fields, "sender", str)
    meta = _expect_field(fields, "meta", dict)
    total = _expect_field(fields, "nbytes", int)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise PayloadError(f"payload buffer must be 1-D uint8, got {buffer.dtype} {tuple(buffer.shape)}")
    if total != buffer.numel():
        raise PayloadError(f"header says the buffer has {total} bytes but {buffer.numel()} arrived")
    entries = _expect_field(fields, "tensors", list)
    if total == schema.nbytes and (
        entries is schema.entries or json.dumps(entries, separators=(",", ":")) == schema.entries_json
    ):
        # The canonical layout (compared as JSON, so true is not 1): every per-entry check below
        # holds; only the values are left.
        views = schema.views(buffer, cache=reused)
        peak: Optional[float] = None
        if check_finite:
            scanned = scan is not None and scan.buffer is buffer and scan.schema is schema and scan.clean
            peak = _check_runs_finite(buffer, schema, first=scan.done if scanned else 0,
                                      peak=scan.peak if scanned else 0.0)
        return Payload(kind=kind, version=version, sender=sender, meta=meta, tensors=views, peak=peak)
    else:
        views = _check_entries(entries, buffer, schema)
        if check_finite:
            for name, view in views.items():
                if not _all_finite(view):
                    raise PayloadError(f"tensor {name!r} holds NaN or Inf values; the payload was rejected")
    return Payload(kind=kind, version=version, sender=sender, meta=meta, tensors=views)


def _check_runs_finite(buffer: torch.Tensor, schema: Schema, first: int = 0, peak: float = 0.0) -> float:
    """Check the floating tensors of a canonical payload, one pass per run of neighbours; return
    the largest magnitude among them.

    The padding inside a run is read too; zero padding changes nothing. Runs before ``first`` are
    known finite, with ``peak`` their largest magnitude.
    """
    for start, end, dtype, members in schema.finite_runs[first:]:
        run = _run_peak(buffer, start, end, dtype)
        if not math.isfinite(run):
            for index in members:
                spec = schema.specs[index]
                if not _all_finite(_view(buffer, schema.offsets[index], spec)):
                    raise PayloadError(f"tensor {spec.name!r} holds NaN or Inf values; the payload was rejected")
        peak = _larger(peak, run)
    return peak


def _expect_field(fields: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in fields:
        raise PayloadError(f"header has no {key!r} field")
    value = fields[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PayloadError(f"header field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_entries(entries: List[Any], buffer: torch.Tensor, schema: Schema) -> Dict[str, torch.Tensor]:
    if len(entries) != len(schema):
        names = {e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}
        missing = sorted(set(schema.by_name) - names)[:5]
        extra = sorted(str(n) for n in names - set(schema.by_name))[:5]
        raise PayloadError(
            f"payload has {len(entries)} tensors but {len(schema)} are expected "
            f"(missing: {missing}, unexpected: {extra})"
        )
    views: Dict[str, torch.Tensor] = {}
    spans: List[Tuple[int, int, str]] = []
    size = buffer.numel()
    for entry in entries:
        if not isinstance(entry, dict):
            raise PayloadError(f"each tensor entry must be a JSON object, got {type(entry).__name__}")
        name = _expect_field(entry, "name", str)
        spec = schema.by_name.get(name)
        if spec is None:
            raise PayloadError(f"unexpected tensor {name[:MAX_NAME_CHARS]!r}; expected names are the receiver's state_dict keys")
        if name in views:
            raise PayloadError(f"tensor {name!r} appears twice")
        dtype = _expect_field(entry, "dtype", str)
        if DTYPES.get(dtype) != spec.dtype:
            raise PayloadError(f"tensor {name!r} has dtype {dtype[:32]!r}, expected {dtype_name(spec.dtype)}")
        shape = _expect_field(entry, "shape", list)
        if shape != list(spec.shape):
            raise PayloadError(f"tensor {name!r} has shape {shape[:8]}, expected {list(spec.shape)}")
        offset = _expect_field(entry, "offset", int)
        nbytes = _expect_field(entry, "nbytes", int)
        if nbytes != spec.nbytes:
            raise PayloadError(f"tensor {name!r} declares {nbytes} bytes, its dtype and shape need {spec.nbytes}")
        itemsize = spec.dtype.itemsize
        if offset < 0 or offset % itemsize or offset + nbytes > size:
            raise PayloadError(
                f"tensor {name!r} at offset {offset} with {nbytes} bytes does not fit an aligned "
                f"place in the {size}-byte buffer"
            )
        spans.append((offset, offset + nbytes, name))
        views[name] = _view(buffer, offset, spec)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise PayloadError(f"tensors {first!r} and {second!r} overlap in the buffer")
    return views


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    # A sum is finite only if every element is; overflow can make a finite tensor's sum
    # infinite, so only a non-finite sum pays for the exact element-wise check.
    accumulate = torch.float32 if tensor.element_size() < 4 else tensor.dtype
    if math.isfinite(tensor.sum(dtype=accumulate).item()):
        return True
    return bool(torch.isfinite(tensor).all())
