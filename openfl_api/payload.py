"""Payload: a small JSON header plus one contiguous byte buffer holding every tensor.

Nothing on the wire is pickled. The header names each tensor with its dtype, shape, byte offset
and size; the buffer holds the raw bytes, each tensor starting at a 64-byte boundary so the
receiver can view it in place. The receiver checks the header against a :class:`Schema` (names,
dtypes, shapes, sizes, offsets, finite values) before it copies anything anywhere: a payload is
either valid as a whole or rejected with a :class:`~openfl_api.errors.PayloadError`.

Header (JSON object)::

    {"format": 1, "kind": "model" | "update", "version": 3, "sender": "rank1",
     "nbytes": 4096, "meta": {...},
     "tensors": [{"name": "0.weight", "dtype": "float32", "shape": [2, 3], "offset": 0,
                  "nbytes": 24}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.transport.base import Pieces

__all__ = [
    "FORMAT",
    "ALIGN",
    "MAX_HEADER_BYTES",
    "TensorSpec",
    "Schema",
    "Payload",
    "encode",
    "encode_pieces",
    "PIECE_BYTES",
    "split",
    "FiniteScan",
    "decode",
    "encode_header",
    "insert_field",
    "parse_header",
    "validate_meta",
]

FORMAT = 1
ALIGN = 64
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_METRICS = 64
MAX_NAME_CHARS = 256

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


@dataclass
class Payload:
    """A decoded, validated payload: the header fields and zero-copy views into the buffer."""

    kind: str
    version: int
    sender: str
    meta: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Serialise a header dictionary to compact JSON bytes."""
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")


def insert_field(header: bytes, key: str, value: Any) -> bytes:
    """Return an encoded header with ``key`` set to ``value``, placed ahead of its tensor list.

    The tensor list stays last, so a receiver's :func:`parse_header` keeps its fast path, and the
    rest of the header is not parsed and encoded again. ``key`` must not be in the header yet.
    """
    cut = header.rfind(b',"tensors":')
    if cut < 0:
        fields = parse_header(header)
        fields[key] = value
        return encode_header(fields)
    item = json.dumps(key) + ":" + json.dumps(value, separators=(",", ":"), allow_nan=False)
    return header[:cut] + b"," + item.encode("utf-8") + header[cut:]


def parse_header(raw: bytes, limit: int = MAX_HEADER_BYTES, schema: Optional["Schema"] = None) -> Dict[str, Any]:
    """Parse untrusted JSON header bytes into a dictionary, or raise PayloadError.

    With ``schema``, a header that ends with that schema's canonical ``"tensors"`` list (as
    :func:`encode` writes it) is parsed without the list, and ``"tensors"`` is then
    ``schema.entries`` itself: what a full parse gives, since the last of duplicate JSON keys wins.
    """
    if len(raw) > limit:
        raise PayloadError(f"header is {len(raw)} bytes; at most {limit} are allowed")
    raw = bytes(raw)
    if schema is not None and raw.endswith(schema.entries_suffix):
        head = raw[: -len(schema.entries_suffix)]
        if not head.rstrip().endswith(b"{"):  # '{,"tensors":...}' is not JSON: let the full parse say so
            fields = parse_header(head + b"}", limit)
            fields["tensors"] = schema.entries
            return fields
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"header is not valid UTF-8 JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise PayloadError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _check_identity(kind: str, version: int, sender: str) -> None:
    if kind not in KINDS:
        raise ConfigurationError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigurationError(f"version must be an integer >= 0, got {version!r}")
    if not isinstance(sender, str):
        raise ConfigurationError(f"sender must be a str, got {type(sender).__name__}")


def _header(schema: Schema, kind: str, version: int, sender: str, meta: Optional[Mapping[str, Any]]) -> bytes:
    head = encode_header({
        "format": FORMAT,
        "kind": kind,
        "version": int(version),
        "sender": sender,
        "nbytes": schema.nbytes,
        "meta": dict(meta or {}),
    })
    # The tensor entries are the same for every payload of a schema: splice in their JSON.
    return head[:-1] + schema.entries_suffix


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

    Returns:
        ``(header_bytes, buffer)``; ``buffer`` is ``out[:schema.nbytes]`` when ``out`` is given.
    """
    _check_identity(kind, version, sender)
    buffer = _staging(schema, out)
    sources = [_source(tensors, spec) for spec in schema.specs]
    # A fresh buffer's views are not cached: they would push out those of reused buffers.
    targets = schema.view_list(buffer, cache=out is not None)
    if sources:
        torch._foreach_copy_(list(targets), sources)  # detached sources: no autograd to switch off
    return _header(schema, kind, version, sender, meta), buffer


#: Tensors of at least this many bytes travel as their own piece, straight from their memory.
PIECE_BYTES = 256 * 1024


def encode_pieces(
    tensors: Mapping[str, torch.Tensor],
    schema: Schema,
    *,
    kind: str,
    version: int,
    sender: str,
    meta: Optional[Mapping[str, Any]] = None,
    out: Optional[torch.Tensor] = None,
) -> Tuple[bytes, Pieces]:
    """Encode like :func:`encode`, but hand large tensors to the pipe as they are.

    A contiguous CPU tensor of at least :data:`PIECE_BYTES` becomes its own piece of the payload
    (no copy); smaller or non-contiguous ones are copied into ``out`` (zeroed, reused across
    calls) and neighbouring ones travel as one piece. The receiver gets the same flat buffer as
    from :func:`encode`. The tensors must not change until the pipe has sent them.

    Returns:
        ``(header_bytes, pieces)``.
    """
    _check_identity(kind, version, sender)
    staging = _staging(schema, out)
    pieces: List[Tuple[int, torch.Tensor]] = []
    run: Optional[List[int]] = None  # [start, end) of the staging bytes gathered since the last own piece
    targets: List[torch.Tensor] = []
    sources: List[torch.Tensor] = []
    for spec, offset, size, target in zip(schema.specs, schema.offsets, schema.sizes, schema.view_list(staging)):
        source = _source(tensors, spec)
        if size >= PIECE_BYTES and source.device.type == "cpu" and source.is_contiguous():
            if run is not None:
                pieces.append((run[0], staging[run[0] : run[1]]))
                run = None
            pieces.append((offset, source.reshape(-1).view(torch.uint8)))
            continue
        if size == 0:
            continue
        targets.append(target)
        sources.append(source)
        run = [offset, offset + size] if run is None else [run[0], offset + size]
    if run is not None:
        pieces.append((run[0], staging[run[0] : run[1]]))
    if targets:
        torch._foreach_copy_(targets, sources)  # one call for all the small (detached) tensors
    return _header(schema, kind, version, sender, meta), Pieces(schema.nbytes, tuple(pieces))


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
        self.clean = True  # every checked run summed to a finite number

    def progress(self, end: int) -> None:
        """Bytes ``[0, end)`` of the buffer have arrived: check the runs that lie within them."""
        runs = self.schema.finite_runs
        if self.buffer.numel() != self.schema.nbytes:
            return
        while self.done < len(runs) and runs[self.done][1] <= end:
            start, stop, dtype, _ = runs[self.done]
            self.clean = self.clean and _run_sum_finite(self.buffer, start, stop, dtype)
            self.done += 1


def _run_sum_finite(buffer: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> bool:
    accumulate = torch.float32 if dtype.itemsize < 4 else dtype
    return math.isfinite(buffer[start:stop].view(dtype).sum(dtype=accumulate).item())


def _staging(schema: Schema, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        buffer = torch.empty(schema.nbytes, dtype=torch.uint8)
        for start, end in schema.padding:  # the tensors' bytes are all written next
            buffer[start:end].zero_()
        return buffer
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < schema.nbytes:
        raise ConfigurationError(
            f"out must be a 1-D uint8 tensor of at least {schema.nbytes} bytes, "
            f"got {out.dtype} of shape {tuple(out.shape)}"
        )
    return out[: schema.nbytes]


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _view(buffer: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    region = buffer[offset : offset + spec.nbytes]
    return region.view(spec.dtype).view(spec.shape)


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
    :class:`FiniteScan` that watched ``buffer`` arrive; the runs it found finite are not summed again.
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
        if check_finite:
            scanned = scan is not None and scan.buffer is buffer and scan.schema is schema and scan.clean
            _check_runs_finite(buffer, schema, first=scan.done if scanned else 0)
    else:
        views = _check_entries(entries, buffer, schema)
        if check_finite:
            for name, view in views.items():
                if not _all_finite(view):
                    raise PayloadError(f"tensor {name!r} holds NaN or Inf values; the payload was rejected")
    return Payload(kind=kind, version=version, sender=sender, meta=meta, tensors=views)


def _check_runs_finite(buffer: torch.Tensor, schema: Schema, first: int = 0) -> None:
    """Check the floating tensors of a canonical payload, one sum per run of neighbours.

    The padding inside a run is summed too; zero padding changes nothing, and any other padding at
    worst sends the run to the exact, per-tensor check. Runs before ``first`` are known finite.
    """
    for start, end, dtype, members in schema.finite_runs[first:]:
        if _run_sum_finite(buffer, start, end, dtype):
            continue
        for index in members:
            spec = schema.specs[index]
            if not _all_finite(_view(buffer, schema.offsets[index], spec)):
                raise PayloadError(f"tensor {spec.name!r} holds NaN or Inf values; the payload was rejected")


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


def validate_meta(meta: Mapping[str, Any], error: type = PayloadError, where: str = "meta") -> Dict[str, Any]:
    """Check upload metadata: ``num_samples`` and a flat ``metrics`` dictionary.

    The one check of both sides: the frontend runs it on ``upload()``'s arguments
    (``error=ConfigurationError, where="upload"``), the backend on what a peer sent.

    Returns:
        ``{"num_samples": int, "metrics": {str: float}}``.

    Raises:
        error: a field is missing, of the wrong type, out of range, or not finite.
    """
    label = (lambda name: f"upload({name}=...)") if where == "upload" else (lambda name: f"{where} {name!r}")
    num_samples = meta.get("num_samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or not 1 <= num_samples <= 2**53:
        raise error(f"{label('num_samples')} must be an integer in [1, 2**53], got {num_samples!r}"[:200])
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS:
        raise error(f"{label('metrics')} must be a dict of at most {MAX_METRICS} str to finite numbers, "
                    f"got {type(metrics).__name__}"[:200])
    clean: Dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > MAX_NAME_CHARS or not key.isprintable():
            raise error(f"{label('metrics')}: metric name {str(key)[:40]!r} must be a printable str of at most "
                        f"{MAX_NAME_CHARS} characters")
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise error(f"{label('metrics')}: metric {key!r} must be a finite number, got {str(value)[:40]}")
        clean[key] = number
    return {"num_samples": num_samples, "metrics": clean}
