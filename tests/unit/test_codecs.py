"""OIP datatypes <-> numpy: raw bytes, JSON data and the errors that name the tensor."""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.codecs import (
    DATATYPES,
    datatype_from_onnx,
    decode_bytes_elements,
    decode_json_data,
    decode_raw,
    element_count,
    encode_bytes_elements,
    encode_json_data,
    encode_raw,
    validate_shape,
)
from gateway.errors import InvalidInput

BF16 = np.dtype(ml_dtypes.bfloat16)

# One sample per datatype, with values at the edges of each type's range.
SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 128, 254]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 32768, 9]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 2**31, 9]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 2**63, 2**63 + 5]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [1, -1, 5]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [1, -1, 5]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [1, -1, 5]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -1, 5]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504.0], [1e-3, 0.0, -0.0]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38], [1e-30, np.inf, -np.inf]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.25, 1.7e308], [5e-324, np.pi, -np.e]], dtype=np.float64),
    "BF16": np.array([[0.5, -1.25, 2.0**127], [1.0, 0.0, -2.0]], dtype=BF16),
    "BYTES": np.array([[b"", b"a", b"hello"], [b"\x00\xff", "h\u00e9".encode(), b"x" * 300]]),
}
SAMPLES["BYTES"] = SAMPLES["BYTES"].astype(np.object_)


def test_samples_cover_every_datatype() -> None:
    assert set(SAMPLES) == set(DATATYPES)
    assert list(DATATYPES) == [
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BF16", "BYTES",
    ]  # fmt: skip


def _assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], datatype: str) -> None:
    assert got.shape == want.shape
    assert got.dtype == DATATYPES[datatype].dtype
    if datatype == "BF16":
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    elif datatype == "BYTES":
        assert got.ravel().tolist() == want.ravel().tolist()
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_round_trip(datatype: str) -> None:
    values = SAMPLES[datatype]
    raw = encode_raw(values, datatype)
    decoded = decode_raw("x", datatype, values.shape, raw)
    _assert_same(decoded, values, datatype)


@pytest.mark.parametrize("datatype", [d for d in SAMPLES if d != "BYTES"])
def test_raw_is_little_endian_row_major(datatype: str) -> None:
    values = SAMPLES[datatype]
    dtype = DATATYPES[datatype].dtype
    raw = encode_raw(values, datatype)
    assert len(raw) == values.size * dtype.itemsize
    assert raw == values.astype(dtype.newbyteorder("<")).tobytes(order="C")
    # A column-major or big-endian input encodes to the same bytes.
    assert encode_raw(np.asfortranarray(values), datatype) == raw
    if dtype.itemsize > 1 and datatype != "BF16":
        assert encode_raw(values.astype(dtype.newbyteorder(">")), datatype) == raw


def test_raw_known_bytes() -> None:
    assert encode_raw(np.array([1, 2], dtype=np.int32), "INT32") == b"\x01\0\0\0\x02\0\0\0"
    assert encode_raw(np.array([True, False]), "BOOL") == b"\x01\x00"
    assert encode_raw(np.array([1.0], dtype=BF16), "BF16") == b"\x80\x3f"
    assert encode_raw(np.array([1.0], dtype=np.float16), "FP16") == b"\x00\x3c"
    assert encode_raw(np.array([2**64 - 1], dtype=np.uint64), "UINT64") == b"\xff" * 8
    decoded = decode_raw("x", "UINT64", (1,), b"\x00" * 7 + b"\x80")
    assert decoded.tolist() == [2**63]


def test_bytes_wire_form() -> None:
    values = np.array([b"ab", b"", "\u00e9"], dtype=np.object_)
    expected = b"\x02\0\0\0ab" + b"\0\0\0\0" + b"\x02\0\0\0\xc3\xa9"
    assert encode_bytes_elements(values) == expected
    assert encode_raw(values, "BYTES") == expected
    assert decode_bytes_elements("x", expected) == [b"ab", b"", "\u00e9".encode()]
    assert decode_bytes_elements("x", memoryview(expected)) == [b"ab", b"", b"\xc3\xa9"]
    assert decode_bytes_elements("x", b"") == []


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_json_round_trip(datatype: str) -> None:
    values = SAMPLES[datatype]
    if datatype == "BYTES":  # JSON carries text: only UTF-8 elements survive it
        values = np.array([[b"", b"a"], ["h\u00e9".encode(), b"\x00z"]], dtype=np.object_)
    data = encode_json_data(values, datatype)
    assert len(data) == values.size
    decoded = decode_json_data("x", datatype, values.shape, data)
    _assert_same(decoded, values, datatype)


def test_json_values_are_plain_python() -> None:
    assert encode_json_data(SAMPLES["UINT64"], "UINT64") == [
        0, 1, 2**64 - 1, 7, 2**63, 2**63 + 5,
    ]  # fmt: skip
    assert encode_json_data(SAMPLES["BOOL"], "BOOL") == [True, False, True, False, False, True]
    assert encode_json_data(SAMPLES["BF16"], "BF16") == [0.5, -1.25, 2.0**127, 1.0, 0.0, -2.0]
    assert encode_json_data(np.array([0.5, 65504], dtype=np.float16), "FP16") == [0.5, 65504.0]
    assert encode_json_data(SAMPLES["BYTES"], "BYTES")[:5] == [
        "",
        "a",
        "hello",
        "\x00\ufffd",
        "h\u00e9",
    ]
    for datatype in SAMPLES:
        data = encode_json_data(SAMPLES[datatype], datatype)
        assert all(type(v) in (bool, int, float, str) for v in data), datatype


def test_json_nested_data_is_row_major() -> None:
    decoded = decode_json_data("x", "INT32", (2, 3), [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(decoded, np.arange(1, 7, dtype=np.int32).reshape(2, 3))
    flat = decode_json_data("x", "INT32", (2, 3), [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(flat, decoded)
    strings = decode_json_data("s", "BYTES", (2, 1), [["a"], ["b"]])
    assert strings.shape == (2, 1)
    assert strings.ravel().tolist() == [b"a", b"b"]


def test_json_scalar_data_for_one_element() -> None:
    assert decode_json_data("x", "FP32", (1,), 2.5).tolist() == [2.5]
    assert decode_json_data("x", "BYTES", (), "hi").tolist() == b"hi"


def test_json_integers_above_int64_for_uint64() -> None:
    data = [2**64 - 1, 2**63, 0]
    decoded = decode_json_data("u", "UINT64", (3,), data)
    assert decoded.dtype == np.uint64
    assert decoded.tolist() == data
    mixed = decode_json_data("u", "UINT64", (2,), [2**63 + 1, 1])
    assert mixed.tolist() == [2**63 + 1, 1]


def test_json_float_datatypes_accept_integers() -> None:
    for datatype in ("FP16", "FP32", "FP64", "BF16"):
        decoded = decode_json_data("f", datatype, (2,), [1, 2])
        assert decoded.dtype == DATATYPES[datatype].dtype
        assert decoded.astype(np.float64).tolist() == [1.0, 2.0]


# -- decode errors name the tensor ----------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", (2, 2), [1.0, 2.0, 3.0], r"shape \[2, 2\] needs 4 elements, data has 3"),
        ("BYTES", (3,), ["a", "b"], r"shape \[3\] needs 3 elements, data has 2"),
        ("INT32", (4,), [[1, 2], [3]], "ragged"),
        ("FP32", (3,), [[1.0], [2.0, 3.0]], "ragged"),
        ("INT32", (2,), [1.5, 2], "INT32 data must be integers"),
        ("INT64", (2,), [1, "2"], "INT64 data must be integers"),
        ("FP32", (2,), ["a", "b"], "FP32 data must be numbers"),
        ("FP32", (1,), [None], "FP32 data must be numbers"),
        ("BOOL", (2,), [1, 0], "BOOL data must be booleans"),
        ("UINT8", (2,), [True, False], "UINT8 data must be integers"),
        ("BYTES", (2,), ["a", 1], "BYTES data must be strings"),
        ("INT8", (2,), [127, 128], r"out of range for INT8 \[-128, 127\]"),
        ("INT8", (1,), [-129], "out of range for INT8"),
        ("UINT8", (1,), [-1], "out of range for UINT8"),
        ("UINT16", (1,), [65536], "out of range for UINT16"),
        ("INT32", (1,), [2**31], "out of range for INT32"),
        ("INT64", (1,), [2**63], "out of range for INT64"),
        ("INT64", (2,), [2**63, -1], "out of range for INT64"),
        ("UINT64", (1,), [2**64], "out of range for UINT64"),
        ("UINT64", (2,), [2**63, -1], "out of range for UINT64"),
        ("UINT64", (2,), [2**64, 1.5], "UINT64 data must be integers"),
        ("NOPE", (1,), [1], "unknown datatype 'NOPE'"),
    ],
)
def test_json_decode_errors(datatype: str, shape: tuple[int, ...], data: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=rf"input 'tensor_a': .*{message}"):
        decode_json_data("tensor_a", datatype, shape, data)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", (2,), b"\0" * 7, r"shape \[2\] of FP32 needs 8 bytes, got 7"),
        ("INT64", (1, 2), b"\0" * 24, r"shape \[1, 2\] of INT64 needs 16 bytes, got 24"),
        ("BOOL", (3,), b"\1\0", r"shape \[3\] of BOOL needs 3 bytes, got 2"),
        ("BYTES", (2,), b"\1\0\0\0a", r"shape \[2\] needs 2 elements, data has 1"),
        ("BYTES", (1,), b"\1\0", "truncated BYTES element length at 0"),
        ("BYTES", (2,), b"\1\0\0\0a\5\0", "truncated BYTES element length at 5"),
        ("BYTES", (1,), b"\5\0\0\0abc", "BYTES element of 5 bytes runs past the data"),
        ("FP8", (1,), b"\0", "unknown datatype 'FP8'"),
    ],
)
def test_raw_decode_errors(datatype: str, shape: tuple[int, ...], raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=rf"input 'tensor_b': {message}"):
        decode_raw("tensor_b", datatype, shape, raw)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("3", "shape must be a list of integers, got '3'"),
        ([2, 1.0], r"shape must be a list of integers, got \[2, 1.0\]"),
        ([True, 2], "shape must be a list of integers"),
        ([2, "3"], "shape must be a list of integers"),
        (None, "shape must be a list of integers, got None"),
        ([2, -1], r"shape \[2, -1\] has a negative dimension"),
    ],
)
def test_validate_shape_errors(shape: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=rf"input 'tensor_c': {message}"):
        validate_shape("tensor_c", shape)


def test_validate_shape_accepts_lists_tuples_and_empty() -> None:
    assert validate_shape("x", [2, 0, 3]) == (2, 0, 3)
    assert validate_shape("x", (4,)) == (4,)
    assert validate_shape("x", []) == ()


def test_element_count() -> None:
    assert element_count(()) == 1
    assert element_count((2, 3, 4)) == 24
    assert element_count((5, 0)) == 0


def test_empty_tensors_decode() -> None:
    assert decode_raw("x", "FP32", (0, 4), b"").shape == (0, 4)
    assert decode_raw("x", "BYTES", (0,), b"").shape == (0,)
    assert decode_json_data("x", "INT8", (0, 2), []).shape == (0, 2)
    assert decode_json_data("x", "BYTES", (0,), []).shape == (0,)


# -- datatype_from_onnx -----------------------------------------------------------------------

ONNX_TABLE = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float": "FP32",
    "double": "FP64",
    "bfloat16": "BF16",
    "string": "BYTES",
}


@pytest.mark.parametrize(("onnx_type", "datatype"), ONNX_TABLE.items())
def test_datatype_from_onnx(onnx_type: str, datatype: str) -> None:
    assert datatype_from_onnx(f"tensor({onnx_type})") == datatype
    assert datatype_from_onnx(onnx_type) == datatype
    assert DATATYPES[datatype].onnx_name == onnx_type


@pytest.mark.parametrize("onnx_type", ["tensor(complex64)", "float8e4m3fn", "seq(tensor(float))"])
def test_datatype_from_onnx_unknown(onnx_type: str) -> None:
    with pytest.raises(ValueError, match="has no Open Inference Protocol datatype"):
        datatype_from_onnx(onnx_type)


def test_grpc_contents_fields() -> None:
    fields = {name: d.contents_field for name, d in DATATYPES.items()}
    assert fields == {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP16": None,
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BF16": None,
        "BYTES": "bytes_contents",
    }


# -- properties -------------------------------------------------------------------------------

_NUMERIC = [d for d in DATATYPES if d not in ("BYTES", "BF16")]


@st.composite
def _tensors(draw: st.DrawFn) -> tuple[str, np.ndarray[Any, Any]]:
    datatype = draw(st.sampled_from([*_NUMERIC, "BF16", "BYTES"]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    if datatype == "BYTES":
        items = draw(
            st.lists(
                st.binary(max_size=20), min_size=element_count(shape), max_size=element_count(shape)
            )
        )
        values = np.empty(len(items), dtype=np.object_)
        values[:] = items
        return datatype, values.reshape(shape)
    if datatype == "BF16":  # hypothesis has no bfloat16: draw its bit patterns
        bits = draw(hnp.arrays(np.uint16, shape))
        return datatype, bits.view(BF16)
    return datatype, draw(hnp.arrays(DATATYPES[datatype].dtype, shape))


@settings(max_examples=200, deadline=None)
@given(_tensors())
def test_raw_round_trip_property(tensor: tuple[str, np.ndarray[Any, Any]]) -> None:
    datatype, values = tensor
    raw = encode_raw(values, datatype)
    decoded = decode_raw("x", datatype, values.shape, raw)
    assert decoded.shape == values.shape
    if datatype == "BYTES":
        assert decoded.ravel().tolist() == values.ravel().tolist()
    else:
        assert len(raw) == values.size * DATATYPES[datatype].itemsize
        assert decoded.dtype == values.dtype
        assert decoded.tobytes() == values.tobytes()  # bit-exact, NaN payloads included


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_bytes_elements_round_trip_property(items: list[bytes]) -> None:
    values = np.empty(len(items), dtype=np.object_)
    values[:] = items
    encoded = encode_bytes_elements(values)
    assert len(encoded) == sum(4 + len(i) for i in items)
    assert decode_bytes_elements("x", encoded) == items
    if items:  # any truncation is caught, never silently dropped
        with pytest.raises(InvalidInput, match="input 'x': "):
            decode_bytes_elements("x", encoded[:-1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=10))
def test_uint64_json_property(values: list[int]) -> None:
    decoded = decode_json_data("u", "UINT64", (len(values),), values)
    assert decoded.tolist() == values
    assert encode_json_data(decoded, "UINT64") == values
    raw = encode_raw(decoded, "UINT64")
    assert list(struct.unpack(f"<{len(values)}Q", raw)) == values


def test_a_shape_spanning_too_many_elements_is_refused_even_when_empty() -> None:
    # Found by bench/fuzz.py: zero elements, yet numpy cannot build [0, 2**40, 2**40].
    with pytest.raises(InvalidInput, match="spans more than"):
        validate_shape("a", [0, 2**40, 2**40])
    with pytest.raises(InvalidInput, match="spans more than"):
        validate_shape("a", [2**21, 2**20])
    assert validate_shape("a", [0, 2**20, 2**20]) == (0, 2**20, 2**20)
