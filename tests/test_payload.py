"""Tests of openfl_api.payload: the wire layout, round trips, and every way a payload is rejected."""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import (
    ALIGN,
    DTYPES,
    FORMAT,
    MAX_HEADER_BYTES,
    FiniteScan,
    Payload,
    Schema,
    TensorSpec,
    decode,
    encode,
    encode_header,
    insert_field,
    parse_header,
    split,
    validate_meta,
)

# --- helpers -----------------------------------------------------------------------------------


def sample(dtype: torch.dtype, shape: Tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic values of ``dtype`` that use the whole of its range worth testing."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    low, high = (0, 256) if dtype == torch.uint8 else (-100, 100)
    if dtype == torch.int64:
        low, high = -(2**40), 2**40  # values that do not fit 32 bits must survive too
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def two_tensors() -> Dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7, 8], dtype=torch.int64)}


def encoded(tensors: Dict[str, torch.Tensor] | None = None, kind: str = "model") -> Tuple[Dict[str, Any], torch.Tensor, Schema]:
    """Encode ``tensors`` (default: two_tensors) and return the header as a dict, the buffer and the schema."""
    tensors = two_tensors() if tensors is None else tensors
    schema = Schema.from_tensors(tensors)
    header, buffer = encode(tensors, schema, kind=kind, version=3, sender="rank1", meta={"num_samples": 4})
    return json.loads(header), buffer, schema


def decode_dict(header: Dict[str, Any], buffer: torch.Tensor, schema: Schema, kind: str = "model") -> Payload:
    return decode(encode_header(header), buffer, schema, kind=kind)


def entry(header: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next(e for e in header["tensors"] if e["name"] == name)


# --- round trips -------------------------------------------------------------------------------

SHAPES = [(2, 3), (), (0,), (3, 0, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"shape{list(s)}")
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_dtype_and_shape_round_trips_bit_for_bit(dtype_name: str, shape: Tuple[int, ...]) -> None:
    tensor = sample(DTYPES[dtype_name], shape)
    schema = Schema.from_tensors({"t": tensor})
    header, buffer = encode({"t": tensor}, schema, kind="update", version=0, sender="s")
    received = decode(header, buffer, schema, kind="update").tensors["t"]
    assert received.dtype == tensor.dtype and received.shape == tensor.shape
    assert torch.equal(received, tensor)


def test_a_payload_of_every_dtype_round_trips_in_one_buffer() -> None:
    tensors = {name: sample(dtype, (3, 5), seed=i) for i, (name, dtype) in enumerate(sorted(DTYPES.items()))}
    schema = Schema.from_tensors(tensors)
    header, buffer = encode(tensors, schema, kind="model", version=1, sender="backend")
    received = decode(header, buffer, schema, kind="model").tensors
    assert list(received) == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(received[name], tensor), name


def test_header_fields_round_trip() -> None:
    tensors = two_tensors()
    schema = Schema.from_tensors(tensors)
    header, buffer = encode(tensors, schema, kind="update", version=7, sender="rank2", meta={"num_samples": 9})
    payload = decode(header, buffer, schema, kind="update")
    assert (payload.kind, payload.version, payload.sender, payload.meta) == ("update", 7, "rank2", {"num_samples": 9})


def test_an_empty_schema_round_trips() -> None:
    schema = Schema([])
    header, buffer = encode({}, schema, kind="model", version=0, sender="s")
    assert buffer.numel() == 0
    assert decode(header, buffer, schema, kind="model").tensors == {}


def test_decoded_tensors_are_views_into_the_buffer() -> None:
    header, buffer, schema = encoded()
    payload = decode_dict(header, buffer, schema)
    assert payload.tensors["b"].data_ptr() == buffer.data_ptr() + entry(header, "b")["offset"]


def test_decode_accepts_a_header_already_parsed_to_a_dict() -> None:
    header, buffer, schema = encoded()
    assert torch.equal(decode(header, buffer, schema, kind="model").tensors["w"], two_tensors()["w"])


# --- layout ------------------------------------------------------------------------------------


def test_header_json_layout() -> None:
    header, buffer, _ = encoded()
    assert header == {
        "format": FORMAT,
        "kind": "model",
        "version": 3,
        "sender": "rank1",
        "nbytes": 128,
        "meta": {"num_samples": 4},
        "tensors": [
            {"name": "w", "dtype": "float32", "shape": [2, 3], "offset": 0, "nbytes": 24},
            {"name": "b", "dtype": "int64", "shape": [2], "offset": 64, "nbytes": 16},
        ],
    }


def test_header_bytes_are_compact_utf8_json() -> None:
    tensors = two_tensors()
    schema = Schema.from_tensors(tensors)
    raw, _ = encode(tensors, schema, kind="model", version=3, sender="rank1")
    assert raw == encode_header(json.loads(raw)) and b" " not in raw


def test_buffer_is_flat_uint8_of_the_schema_size() -> None:
    _, buffer, schema = encoded()
    assert (buffer.dtype, tuple(buffer.shape)) == (torch.uint8, (schema.nbytes,))


def test_every_offset_is_64_byte_aligned_and_in_schema_order() -> None:
    shapes = [(1,), (3,), (17,), (), (0,), (5, 5), (2,)]
    dtypes = [torch.uint8, torch.float16, torch.float64, torch.int32, torch.bool, torch.bfloat16, torch.int8]
    tensors = {f"t{i}": torch.zeros(shape, dtype=dtype) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))}
    header, buffer, schema = encoded(tensors)
    offsets = [e["offset"] for e in header["tensors"]]
    assert [o % ALIGN for o in offsets] == [0] * len(offsets)
    assert offsets == list(schema.offsets) == sorted(offsets)
    assert header["nbytes"] % ALIGN == 0


def test_padding_between_tensors_is_zero() -> None:
    _, buffer, _ = encoded()
    assert int(buffer[24:64].count_nonzero()) == 0


def test_schema_nbytes_counts_aligned_slots() -> None:
    schema = Schema([TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.int64, (2,))])
    assert (schema.offsets, schema.nbytes) == ((0, 64), 128)


def test_schema_padding_lists_every_gap_a_fresh_buffer_must_zero() -> None:
    schema = Schema([TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.int64, (2,)),
                     TensorSpec("c", torch.float32, (16,))])
    assert schema.padding == ((24, 64), (80, 128))


# --- out= --------------------------------------------------------------------------------------


def test_encode_fills_the_given_out_buffer_in_place() -> None:
    tensors = two_tensors()
    schema = Schema.from_tensors(tensors)
    out = torch.full((schema.nbytes + 100,), 0xAB, dtype=torch.uint8)
    _, buffer = encode(tensors, schema, kind="model", version=0, sender="s", out=out)
    assert (buffer.data_ptr(), buffer.numel()) == (out.data_ptr(), schema.nbytes)


def test_a_reused_out_buffer_carries_the_new_values() -> None:
    schema = Schema.from_tensors(two_tensors())
    out = torch.empty(schema.nbytes, dtype=torch.uint8)
    encode(two_tensors(), schema, kind="model", version=0, sender="s", out=out)
    second = {"w": torch.full((2, 3), -1.5), "b": torch.tensor([-3, 2**40])}
    header, buffer = encode(second, schema, kind="model", version=1, sender="s", out=out)
    received = decode(header, buffer, schema, kind="model").tensors
    assert torch.equal(received["w"], second["w"]) and torch.equal(received["b"], second["b"])


@pytest.mark.parametrize(
    "out",
    [torch.empty(127, dtype=torch.uint8), torch.empty(128, dtype=torch.int8), torch.empty(2, 128, dtype=torch.uint8)],
    ids=["too-small", "not-uint8", "not-1d"],
)
def test_encode_rejects_an_unusable_out_buffer(out: torch.Tensor) -> None:
    schema = Schema.from_tensors(two_tensors())
    with pytest.raises(ConfigurationError, match="out must be a 1-D uint8 tensor of at least 128 bytes"):
        encode(two_tensors(), schema, kind="model", version=0, sender="s", out=out)


# --- encode and schema errors ------------------------------------------------------------------


def test_encode_rejects_an_unknown_kind() -> None:
    with pytest.raises(ConfigurationError, match="kind must be one of"):
        encode(two_tensors(), Schema.from_tensors(two_tensors()), kind="gradient", version=0, sender="s")


def test_encode_rejects_a_tensor_missing_from_the_schema_names() -> None:
    schema = Schema.from_tensors(two_tensors())
    with pytest.raises(ConfigurationError, match="tensor 'b' of the schema is missing"):
        encode({"w": two_tensors()["w"]}, schema, kind="model", version=0, sender="s")


def test_encode_rejects_a_tensor_that_no_longer_matches_the_schema() -> None:
    schema = Schema.from_tensors(two_tensors())
    changed = dict(two_tensors(), w=torch.zeros(3, 2))
    with pytest.raises(ConfigurationError, match="rebuild the schema"):
        encode(changed, schema, kind="model", version=0, sender="s")


def test_schema_rejects_a_duplicated_name() -> None:
    with pytest.raises(ConfigurationError, match="tensor name 'a' appears twice"):
        Schema([TensorSpec("a", torch.float32, (1,)), TensorSpec("a", torch.float32, (2,))])


def test_schema_rejects_a_dtype_that_cannot_travel() -> None:
    with pytest.raises(ConfigurationError, match="dtype torch.complex64 cannot be sent"):
        Schema([TensorSpec("a", torch.complex64, (1,))])


# --- decode: tensor entries --------------------------------------------------------------------


def test_decode_rejects_a_wrong_shape() -> None:
    header, buffer, schema = encoded()
    entry(header, "w")["shape"] = [3, 2]
    with pytest.raises(PayloadError, match=r"tensor 'w' has shape \[3, 2\], expected \[2, 3\]"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_wrong_dtype() -> None:
    header, buffer, schema = encoded()
    entry(header, "w")["dtype"] = "int32"
    with pytest.raises(PayloadError, match="tensor 'w' has dtype 'int32', expected float32"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_an_unknown_dtype_name() -> None:
    header, buffer, schema = encoded()
    entry(header, "w")["dtype"] = "complex64"
    with pytest.raises(PayloadError, match="tensor 'w' has dtype 'complex64', expected float32"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_wrong_declared_tensor_size() -> None:
    header, buffer, schema = encoded()
    entry(header, "w")["nbytes"] = 20
    with pytest.raises(PayloadError, match="tensor 'w' declares 20 bytes, its dtype and shape need 24"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("size", [127, 129, 192], ids=["short", "one-more", "longer"])
def test_decode_rejects_a_buffer_whose_size_differs_from_the_header(size: int) -> None:
    header, buffer, schema = encoded()
    other = torch.zeros(size, dtype=torch.uint8)
    other[: min(size, 128)] = buffer[: min(size, 128)]
    with pytest.raises(PayloadError, match=f"header says the buffer has 128 bytes but {size} arrived"):
        decode_dict(header, other, schema)


def test_decode_rejects_a_header_total_that_differs_from_the_buffer() -> None:
    header, buffer, schema = encoded()
    header["nbytes"] = 192
    with pytest.raises(PayloadError, match="header says the buffer has 192 bytes but 128 arrived"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("buffer", [torch.zeros(32, dtype=torch.float32), torch.zeros(2, 64, dtype=torch.uint8)],
                         ids=["float32", "2-d"])
def test_decode_rejects_a_buffer_that_is_not_flat_uint8(buffer: torch.Tensor) -> None:
    header, _, schema = encoded()
    with pytest.raises(PayloadError, match="payload buffer must be 1-D uint8"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("offset", [120, 128, 10**12], ids=["runs-past-end", "at-end", "far-out"])
def test_decode_rejects_an_offset_out_of_range(offset: int) -> None:
    header, buffer, schema = encoded()
    entry(header, "b")["offset"] = offset
    with pytest.raises(PayloadError, match=f"tensor 'b' at offset {offset} with 16 bytes does not fit"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_negative_offset() -> None:
    header, buffer, schema = encoded()
    entry(header, "b")["offset"] = -8
    with pytest.raises(PayloadError, match="tensor 'b' at offset -8 with 16 bytes does not fit"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_an_offset_misaligned_for_the_dtype() -> None:
    header, buffer, schema = encoded()
    entry(header, "b")["offset"] = 68  # inside the buffer, but not a multiple of int64's 8 bytes
    with pytest.raises(PayloadError, match="tensor 'b' at offset 68 with 16 bytes does not fit an aligned place"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_overlapping_tensors() -> None:
    header, buffer, schema = encoded()
    entry(header, "b")["offset"] = 16  # float 'w' spans bytes 0..24
    with pytest.raises(PayloadError, match="tensors 'w' and 'b' overlap in the buffer"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_missing_tensor() -> None:
    header, buffer, schema = encoded()
    header["tensors"] = [entry(header, "w")]
    with pytest.raises(PayloadError, match=r"payload has 1 tensors but 2 are expected \(missing: \['b'\], unexpected: \[\]\)"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_an_extra_tensor() -> None:
    header, buffer, schema = encoded()
    header["tensors"].append(dict(entry(header, "b"), name="c", offset=128))
    with pytest.raises(PayloadError, match=r"payload has 3 tensors but 2 are expected \(missing: \[\], unexpected: \['c'\]\)"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_an_unexpected_tensor_in_place_of_an_expected_one() -> None:
    header, buffer, schema = encoded()
    entry(header, "b")["name"] = "c"
    with pytest.raises(PayloadError, match="unexpected tensor 'c'; expected names are the receiver's state_dict keys"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_duplicated_tensor() -> None:
    tensors = {"a": torch.ones(4), "b": torch.ones(4)}
    header, buffer, schema = encoded(tensors)
    header["tensors"] = [entry(header, "a"), dict(entry(header, "b"), name="a")]
    with pytest.raises(PayloadError, match="tensor 'a' appears twice"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_tensor_entry_that_is_not_an_object() -> None:
    header, buffer, schema = encoded()
    header["tensors"][1] = ["b", "int64"]
    with pytest.raises(PayloadError, match="each tensor entry must be a JSON object, got list"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_a_tensor_entry_without_a_field() -> None:
    header, buffer, schema = encoded()
    del entry(header, "b")["offset"]
    with pytest.raises(PayloadError, match="header has no 'offset' field"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("name", [["b"], {"b": 1}, 3, None], ids=["list", "object", "int", "null"])
def test_a_wrong_tensor_count_with_a_non_string_name_is_a_payload_error(name: Any) -> None:
    header, buffer, schema = encoded()
    header["tensors"] = [dict(entry(header, "w"), name=name)]
    with pytest.raises(PayloadError, match="payload has 1 tensors but 2 are expected"):
        decode_dict(header, buffer, schema)


# --- decode: values ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_decode_rejects_a_non_finite_value(dtype: torch.dtype, bad: float) -> None:
    values = torch.ones(2, 8, dtype=dtype)
    values[1, 5] = bad
    header, buffer, schema = encoded({"w": values})
    with pytest.raises(PayloadError, match="tensor 'w' holds NaN or Inf values; the payload was rejected"):
        decode_dict(header, buffer, schema)


def test_decode_without_check_finite_accepts_nan() -> None:
    header, buffer, schema = encoded({"w": torch.tensor([1.0, float("nan")])})
    payload = decode(encode_header(header), buffer, schema, kind="model", check_finite=False)
    assert torch.isnan(payload.tensors["w"][1])


@pytest.mark.parametrize(
    "dtype,value", [(torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float16, 65504.0), (torch.float64, 1.7e308)],
    ids=str,
)
def test_huge_finite_values_whose_sum_overflows_are_accepted(dtype: torch.dtype, value: float) -> None:
    values = torch.full((1000,), value, dtype=dtype)
    header, buffer, schema = encoded({"w": values})
    assert torch.equal(decode_dict(header, buffer, schema).tensors["w"], values)


def test_opposite_huge_values_with_one_nan_are_rejected() -> None:
    values = torch.full((10,), 3e38)
    values[::2] = -3e38
    values[3] = float("nan")
    header, buffer, schema = encoded({"w": values})
    with pytest.raises(PayloadError, match="holds NaN or Inf"):
        decode_dict(header, buffer, schema)


def test_integer_tensors_are_not_checked_for_finiteness() -> None:
    header, buffer, schema = encoded({"n": torch.tensor([2**62, -(2**62)], dtype=torch.int64)})
    assert decode_dict(header, buffer, schema).tensors["n"].tolist() == [2**62, -(2**62)]


# --- decode: header bytes and top-level fields -------------------------------------------------


def test_decode_rejects_header_bytes_that_are_not_utf8() -> None:
    _, buffer, schema = encoded()
    with pytest.raises(PayloadError, match="header is not valid UTF-8 JSON \\(UnicodeDecodeError"):
        decode(b"\xff\xfe{}", buffer, schema, kind="model")


def test_decode_rejects_header_bytes_that_are_not_json() -> None:
    _, buffer, schema = encoded()
    with pytest.raises(PayloadError, match="header is not valid UTF-8 JSON \\(JSONDecodeError"):
        decode(b'{"format": 1,', buffer, schema, kind="model")


@pytest.mark.parametrize("raw,got", [(b"[1, 2]", "list"), (b'"model"', "str"), (b"null", "NoneType"), (b"3", "int")])
def test_decode_rejects_a_header_that_is_not_a_json_object(raw: bytes, got: str) -> None:
    _, buffer, schema = encoded()
    with pytest.raises(PayloadError, match=f"header must be a JSON object, got {got}"):
        decode(raw, buffer, schema, kind="model")


@pytest.mark.parametrize("opening", [b"[", b'{"a":'], ids=["lists", "objects"])
def test_decode_rejects_deeply_nested_json(opening: bytes) -> None:
    _, buffer, schema = encoded()
    with pytest.raises(PayloadError, match="header is not valid UTF-8 JSON \\(RecursionError"):
        decode(opening * 100_000, buffer, schema, kind="model")


def test_decode_rejects_a_header_over_the_size_limit() -> None:
    header, buffer, schema = encoded()
    raw = encode_header(header)
    raw += b" " * (MAX_HEADER_BYTES + 1 - len(raw))  # valid JSON, one byte too long
    with pytest.raises(PayloadError, match=f"header is {MAX_HEADER_BYTES + 1} bytes; at most {MAX_HEADER_BYTES} are allowed"):
        decode(raw, buffer, schema, kind="model")


def test_parse_header_honours_a_smaller_limit() -> None:
    with pytest.raises(PayloadError, match="header is 11 bytes; at most 10 are allowed"):
        parse_header(b'{"a": "bc"}', limit=10)


def test_parse_header_accepts_memoryview_and_bytearray() -> None:
    assert parse_header(memoryview(b'{"a": 1}')) == parse_header(bytearray(b'{"a": 1}')) == {"a": 1}


def test_decode_rejects_another_format() -> None:
    header, buffer, schema = encoded()
    header["format"] = FORMAT + 1
    with pytest.raises(PayloadError, match=f"payload format {FORMAT + 1} is not supported; this build reads format {FORMAT}"):
        decode_dict(header, buffer, schema)


def test_decode_rejects_the_other_kind() -> None:
    header, buffer, schema = encoded(kind="model")
    with pytest.raises(PayloadError, match="expected a 'update' payload, got kind 'model'"):
        decode_dict(header, buffer, schema, kind="update")


def test_decode_rejects_a_negative_version() -> None:
    header, buffer, schema = encoded()
    header["version"] = -1
    with pytest.raises(PayloadError, match="version must be >= 0, got -1"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("field", ["format", "version", "nbytes"])
def test_decode_rejects_a_bool_where_a_header_int_is_expected(field: str) -> None:
    header, buffer, schema = encoded()
    header[field] = True
    with pytest.raises(PayloadError, match=f"header field '{field}' must be int, got bool"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("field", ["offset", "nbytes"])
def test_decode_rejects_a_bool_where_a_tensor_int_is_expected(field: str) -> None:
    header, buffer, schema = encoded({"one": torch.zeros((), dtype=torch.uint8)})
    header["tensors"][0][field] = True
    with pytest.raises(PayloadError, match=f"header field '{field}' must be int, got bool"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize(
    "field,value,kind",
    [("version", 3.0, "float"), ("version", "3", "str"), ("sender", 1, "int"), ("meta", [], "list"),
     ("nbytes", None, "NoneType"), ("tensors", {}, "dict"), ("format", "1", "str")],
)
def test_decode_rejects_a_header_field_of_the_wrong_type(field: str, value: Any, kind: str) -> None:
    header, buffer, schema = encoded()
    header[field] = value
    with pytest.raises(PayloadError, match=f"header field '{field}' must be \\w+, got {kind}"):
        decode_dict(header, buffer, schema)


@pytest.mark.parametrize("field", ["format", "version", "sender", "meta", "nbytes", "tensors"])
def test_decode_rejects_a_header_without_a_field(field: str) -> None:
    header, buffer, schema = encoded()
    del header[field]
    with pytest.raises(PayloadError, match=f"header has no '{field}' field"):
        decode_dict(header, buffer, schema)


# --- validate_meta -----------------------------------------------------------------------------


def test_validate_meta_returns_samples_and_float_metrics() -> None:
    clean = validate_meta({"num_samples": 4, "metrics": {"loss": 0.5, "correct": 3}})
    assert clean == {"num_samples": 4, "metrics": {"loss": 0.5, "correct": 3.0}}
    assert isinstance(clean["metrics"]["correct"], float)


def test_validate_meta_defaults_metrics_to_empty() -> None:
    assert validate_meta({"num_samples": 1}) == {"num_samples": 1, "metrics": {}}


@pytest.mark.parametrize("num_samples", [1, 2**53])
def test_validate_meta_accepts_the_ends_of_the_num_samples_range(num_samples: int) -> None:
    assert validate_meta({"num_samples": num_samples})["num_samples"] == num_samples


@pytest.mark.parametrize("num_samples", [None, 0, -1, 2**53 + 1, True, 4.0, "4"],
                         ids=["missing", "zero", "negative", "over", "bool", "float", "str"])
def test_validate_meta_rejects_a_bad_num_samples(num_samples: Any) -> None:
    meta = {} if num_samples is None else {"num_samples": num_samples}
    with pytest.raises(PayloadError, match=r"meta 'num_samples' must be an integer in \[1, 2\*\*53\]"):
        validate_meta(meta)


@pytest.mark.parametrize("metrics", [[], "loss", None, {f"m{i}": 0.0 for i in range(65)}],
                         ids=["list", "str", "null", "65-entries"])
def test_validate_meta_rejects_bad_metrics(metrics: Any) -> None:
    with pytest.raises(PayloadError, match="meta 'metrics' must be a dict of at most 64 str to finite numbers"):
        validate_meta({"num_samples": 1, "metrics": metrics})


def test_validate_meta_accepts_64_metrics() -> None:
    assert len(validate_meta({"num_samples": 1, "metrics": {f"m{i}": 0.0 for i in range(64)}})["metrics"]) == 64


@pytest.mark.parametrize("name", ["x" * 257, "a\nb", "tab\there", "\x00"], ids=["long", "newline", "tab", "nul"])
def test_validate_meta_rejects_a_bad_metric_name(name: str) -> None:
    with pytest.raises(PayloadError, match="must be a printable str of at most 256 characters"):
        validate_meta({"num_samples": 1, "metrics": {name: 1.0}})


def test_validate_meta_accepts_a_256_character_metric_name() -> None:
    assert list(validate_meta({"num_samples": 1, "metrics": {"x" * 256: 1.0}})["metrics"]) == ["x" * 256]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), True, "0.5", None, [1.0], 10**400],
                         ids=["nan", "+inf", "-inf", "bool", "str", "null", "list", "huge-int"])
def test_validate_meta_rejects_a_bad_metric_value(value: Any) -> None:
    with pytest.raises(PayloadError, match="metric 'loss' must be a finite number"):
        validate_meta({"num_samples": 1, "metrics": {"loss": value}})


def test_the_frontend_checks_upload_arguments_with_the_backends_check_and_names_the_argument() -> None:
    from openfl_api.errors import ConfigurationError
    from openfl_api.frontend import check_upload_meta

    with pytest.raises(ConfigurationError, match=r"upload\(num_samples=...\) must be an integer in \[1, 2\*\*53\]"):
        check_upload_meta(0, {})
    with pytest.raises(ConfigurationError, match=r"upload\(metrics=...\): metric 'loss' must be a finite number"):
        check_upload_meta(1, {"loss": float("nan")})
    assert check_upload_meta(2, {"loss": torch.tensor(0.5)}) == {"num_samples": 2, "metrics": {"loss": 0.5}}


# --- fuzzing -----------------------------------------------------------------------------------

FUZZ_TENSORS = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, 2], dtype=torch.int64),
    "h": torch.tensor([0.5, 1.5, 2.5], dtype=torch.bfloat16),
    "flag": torch.tensor(True),
}
FUZZ_SCHEMA = Schema.from_tensors(FUZZ_TENSORS)
FUZZ_HEADER = json.loads(encode(FUZZ_TENSORS, FUZZ_SCHEMA, kind="model", version=1, sender="s")[0])
FIELDS = sorted(set(FUZZ_HEADER) | set(FUZZ_HEADER["tensors"][0]))

# Generating recursive strategies is slow; two levels of nesting reach every branch of decode.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 64, 128, FUZZ_SCHEMA.nbytes, -1, 0.5, 2.0, -1e300, "", "\udcff", "é" * 3]),
    st.sampled_from(["model", "update", "w", "b", "h", "flag", "float32", "bool", "int64", "bfloat16"]),
)
json_flat = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=4),
    st.dictionaries(st.sampled_from(FIELDS), json_scalars, max_size=5),
)
json_values = st.one_of(
    json_flat,
    st.lists(json_flat, max_size=5),
    st.dictionaries(st.sampled_from(FIELDS), json_flat, max_size=7),
)
# Lists that look like tensor entries, with any values, in any number.
entry_lists = st.lists(st.dictionaries(st.sampled_from(FIELDS), json_flat, min_size=1, max_size=5), max_size=5)


def must_decode_or_refuse(raw: bytes, buffer: torch.Tensor) -> None:
    """Decoding may succeed or raise PayloadError; any other exception fails the test."""
    try:
        payload = decode(raw, buffer, FUZZ_SCHEMA, kind="model")
    except PayloadError:
        return
    assert list(payload.tensors) == list(FUZZ_SCHEMA.by_name)


def as_buffer(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


@st.composite
def flipped_headers(draw: st.DrawFn) -> bytes:
    raw = bytearray(encode_header(FUZZ_HEADER))
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        flipped_headers(),
        st.just(encode_header(FUZZ_HEADER)),
    ),
    data=st.one_of(st.binary(min_size=FUZZ_SCHEMA.nbytes, max_size=FUZZ_SCHEMA.nbytes), st.binary(max_size=400)),
)
def test_fuzzed_header_bytes_and_buffer_decode_or_raise_payload_error(raw: bytes, data: bytes) -> None:
    must_decode_or_refuse(raw, as_buffer(data))


PATHS = [(field,) for field in FUZZ_HEADER] + [
    ("tensors", index, *field) for index in range(len(FUZZ_TENSORS)) for field in [()] + [(f,) for f in FUZZ_HEADER["tensors"][0]]
]
DELETE = object()
mutations = st.one_of(
    st.tuples(st.sampled_from(PATHS), st.one_of(st.just(DELETE), json_values)),
    st.tuples(st.just(("tensors",)), entry_lists),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=mutations, data=st.binary(min_size=FUZZ_SCHEMA.nbytes, max_size=FUZZ_SCHEMA.nbytes))
def test_a_valid_header_with_one_field_mutated_decodes_or_raises_payload_error(mutation: tuple, data: bytes) -> None:
    path, value = mutation
    header = copy.deepcopy(FUZZ_HEADER)
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    must_decode_or_refuse(encode_header(header), as_buffer(data))


# --- pieces, the canonical fast path and the scan while receiving ---------------------------


def mixed_tensors() -> Dict[str, torch.Tensor]:
    """A large contiguous tensor, a large non-contiguous one, small ones of several dtypes."""
    big = 256 * 1024 // 4 + 5  # tensors of 256 KiB and more
    return {
        "small": sample(torch.float32, (3, 5), seed=1),
        "count": torch.tensor(12, dtype=torch.int64),
        "big": sample(torch.float32, (big,), seed=2),
        "big_t": sample(torch.float32, (big // 64 + 1, 64), seed=3).t(),
        "half": sample(torch.float16, (7,), seed=4),
        "tail": sample(torch.float32, (big,), seed=5),
    }


def test_split_covers_the_buffer_in_order() -> None:
    buffer = torch.arange(10, dtype=torch.uint8)
    pieces = split(buffer, piece_bytes=4)
    assert [(offset, piece.tolist()) for offset, piece in pieces.pieces] == [
        (0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])
    ]


def test_a_payload_in_another_valid_layout_still_decodes() -> None:
    header, buffer, schema = encoded()
    # Same tensors, listed in the other order: not the canonical layout, so every entry is checked.
    header["tensors"].reverse()
    payload = decode_dict(header, buffer, schema)
    assert torch.equal(payload.tensors["w"], two_tensors()["w"]) and torch.equal(payload.tensors["b"], two_tensors()["b"])


@pytest.mark.parametrize("name", ["small", "big", "half", "tail"])
def test_a_non_finite_value_is_named_on_the_canonical_path(name: str) -> None:
    tensors = mixed_tensors()
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] = float("inf")
    header, buffer, schema = encoded(tensors, kind="update")
    with pytest.raises(PayloadError, match=f"tensor '{name}' holds NaN or Inf"):
        decode_dict(header, buffer, schema, kind="update")


def test_runs_the_scan_found_finite_are_not_summed_again() -> None:
    header, buffer, schema = encoded(mixed_tensors(), kind="update")
    scan = FiniteScan(schema, buffer)
    scan.progress(buffer.numel())
    # Spoil a value after the scan: decode trusts the scan for every run it saw.
    schema.views(buffer)["small"].view(-1)[0] = float("nan")
    decode(encode_header(header), buffer, schema, kind="update", scan=scan)


def test_runs_the_scan_had_not_reached_are_checked_by_decode() -> None:
    header, buffer, schema = encoded(mixed_tensors(), kind="update")
    scan = FiniteScan(schema, buffer)
    scan.progress(schema.offsets[2])  # only the runs before "big" had arrived
    schema.views(buffer)["tail"].view(-1)[0] = float("nan")
    with pytest.raises(PayloadError, match="tensor 'tail' holds NaN or Inf"):
        decode(encode_header(header), buffer, schema, kind="update", scan=scan)


def test_a_scan_that_saw_a_non_finite_value_leads_decode_to_the_tensor() -> None:
    tensors = mixed_tensors()
    tensors["small"] = tensors["small"].clone()
    tensors["small"][0, 0] = float("nan")
    header, buffer, schema = encoded(tensors, kind="update")
    scan = FiniteScan(schema, buffer)
    scan.progress(buffer.numel())
    with pytest.raises(PayloadError, match="tensor 'small' holds NaN or Inf"):
        decode(encode_header(header), buffer, schema, kind="update", scan=scan)


def test_a_canonical_header_parses_to_what_a_full_parse_gives() -> None:
    tensors = mixed_tensors()
    schema = Schema.from_tensors(tensors)
    raw, _ = encode(tensors, schema, kind="update", version=4, sender="r", meta={"num_samples": 2})
    fast = parse_header(raw, schema=schema)
    assert fast["tensors"] is schema.entries
    assert fast == parse_header(raw)


def test_a_malformed_header_with_the_canonical_ending_is_still_refused() -> None:
    schema = Schema.from_tensors(mixed_tensors())
    with pytest.raises(PayloadError, match="not valid UTF-8 JSON"):
        parse_header(b"{" + schema.entries_suffix, schema=schema)


def test_the_last_of_two_tensor_lists_counts_as_in_a_full_parse() -> None:
    tensors = mixed_tensors()
    schema = Schema.from_tensors(tensors)
    raw, _ = encode(tensors, schema, kind="update", version=4, sender="r")
    doubled = raw[:1] + b'"tensors":[],' + raw[1:]
    assert parse_header(doubled, schema=schema) == parse_header(doubled)


@pytest.mark.parametrize("start", [0, 8], ids=["buffer at 0", "buffer at 8 in its storage"])
def test_schema_views_are_the_views_a_slice_gives(start: int) -> None:
    specs = [TensorSpec("a", torch.float32, (3, 4)), TensorSpec("b", torch.int64, ()),
             TensorSpec("c", torch.float16, (5,)), TensorSpec("d", torch.float32, (0, 3)),
             TensorSpec("e", torch.bool, (2, 2, 2))]
    schema = Schema(specs)
    buffer = torch.zeros(start + schema.nbytes, dtype=torch.uint8)[start:]
    views = schema.views(buffer)
    for spec, offset in zip(schema.specs, schema.offsets):
        expected = buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)
        got = views[spec.name]
        assert (got.dtype, got.shape, got.stride(), got.data_ptr()) == (
            expected.dtype, expected.shape, expected.stride(), expected.data_ptr())


def test_a_field_inserted_into_an_encoded_header_keeps_the_canonical_ending() -> None:
    tensors = mixed_tensors()
    schema = Schema.from_tensors(tensors)
    raw, _ = encode(tensors, schema, kind="model", version=2, sender="backend")
    inserted = insert_field(raw, "clients", ["3", "10"])
    assert parse_header(inserted) == {**parse_header(raw), "clients": ["3", "10"]}
    assert parse_header(inserted, schema=schema)["tensors"] is schema.entries


def test_decode_finds_the_largest_magnitude_of_the_floating_tensors_in_the_finite_check() -> None:
    tensors = mixed_tensors()
    header, buffer, schema = encoded(tensors, kind="update")
    expected = max(float(t.abs().max()) for t in tensors.values() if t.is_floating_point())
    assert decode(encode_header(header), buffer, schema, kind="update").peak == expected
    scan = FiniteScan(schema, buffer)
    scan.progress(buffer.numel())
    assert decode(encode_header(header), buffer, schema, kind="update", scan=scan).peak == expected


# --- spare encoding buffers ------------------------------------------------------------------
def test_a_retired_buffer_comes_back_only_once_nothing_refers_to_its_memory() -> None:
    from openfl_api.buffers import Spares

    layout = object()
    spares = Spares()
    buffer = torch.zeros(64, dtype=torch.uint8)
    address = buffer.data_ptr()
    piece = buffer[8:16]  # as a download queued or in flight holds it
    spares.give(layout, buffer)
    assert spares.take(layout, 64, pinned=False) is None  # the tensor itself is still named here
    del buffer
    assert spares.take(layout, 64, pinned=False) is None  # a view of it is alive
    del piece
    assert spares.take(object(), 64, pinned=False) is None  # another layout
    assert spares.take(layout, 32, pinned=False) is None  # another size
    assert spares.take(layout, 64, pinned=False).data_ptr() == address
    assert spares.take(layout, 64, pinned=False) is None  # handed out once


def test_the_next_versions_encoding_leaves_a_download_still_holding_the_last_one_intact() -> None:
    from openfl_api import aggregate
    from openfl_api.backend.model import GlobalModel
    from openfl_api.state import SharedState

    net = torch.nn.Linear(300, 200)
    state = SharedState(net.state_dict(keep_vars=True), aggregate.AverageAggregator(net.parameters()), None)
    model = GlobalModel(state, None, "backend")
    header, held = model.encoded(1)  # a download of version 1 still on its way holds its pieces
    before = held.flat().clone()
    new = {name: torch.full_like(t, 2.0) for name, t in state.model.items()}
    model.step(new, None)
    _, pieces = model.encoded(2)
    assert torch.equal(held.flat(), before)
    assert pieces.pieces[0][1].data_ptr() != held.pieces[0][1].data_ptr()
    second = pieces.pieces[0][1].data_ptr()
    del held, pieces
    model.step({name: torch.full_like(t, 3.0) for name, t in state.model.items()}, None)
    header, third = model.encoded(3)  # nothing holds version 2 any longer: its buffer is written again
    assert third.pieces[0][1].data_ptr() == second
    values = decode(header, third.flat(), state.download_schema, kind="model").tensors
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in values.values())
