"""The payload's JSON header, and the metadata an upload carries in it, checked the same on both sides."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload.schema import FORMAT, KINDS, Schema

__all__ = ["MAX_HEADER_BYTES", "MAX_METRICS", "MAX_NAME_CHARS", "encode_header", "insert_field", "parse_header",
           "validate_meta"]

MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_METRICS = 64
MAX_NAME_CHARS = 256


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
