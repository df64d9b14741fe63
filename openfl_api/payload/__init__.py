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


from openfl_api.payload.codec import FiniteScan, Payload, decode, encode, on_cuda, split
from openfl_api.payload.header import (
    MAX_HEADER_BYTES, MAX_METRICS, MAX_NAME_CHARS, encode_header, insert_field, parse_header, validate_meta,
)
from openfl_api.payload.schema import (
    ALIGN, DTYPES, FORMAT, KINDS, Schema, TensorSpec, describe_differences, dtype_name,
)

__all__ = [
    "FORMAT",
    "ALIGN",
    "DTYPES",
    "KINDS",
    "MAX_HEADER_BYTES",
    "MAX_METRICS",
    "MAX_NAME_CHARS",
    "TensorSpec",
    "Schema",
    "Payload",
    "dtype_name",
    "describe_differences",
    "encode",
    "split",
    "on_cuda",
    "FiniteScan",
    "decode",
    "encode_header",
    "insert_field",
    "parse_header",
    "validate_meta",
]
