"""OIP datatypes <-> numpy arrays, for JSON data, raw bytes and gRPC typed contents.

Every decoder validates what it is given and raises :class:`InvalidInput` naming the tensor
and the problem; the transports call these and never touch numpy dtypes themselves.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from gateway.errors import InvalidInput

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "DataType",
    "datatype_from_onnx",
    "decode_bytes_elements",
    "decode_json_data",
    "decode_raw",
    "element_count",
    "encode_bytes_elements",
    "encode_json_data",
    "encode_raw",
    "validate_shape",
]


@dataclass(frozen=True, slots=True)
class DataType:
    """One OIP datatype: its numpy dtype, ONNX name and gRPC ``InferTensorContents`` field."""

    name: str
    dtype: np.dtype[Any]
    onnx_name: str
    contents_field: str | None  # None: travels only as raw bytes (FP16, BF16)
    kinds: str  # numpy kinds accepted from JSON numbers

    @property
    def itemsize(self) -> int:
        return int(self.dtype.itemsize)


def _dt(name: str, dtype: Any, onnx: str, field: str | None, kinds: str) -> DataType:
    return DataType(name, np.dtype(dtype), onnx, field, kinds)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, "bool", "bool_contents", "b"),
        _dt("UINT8", "<u1", "uint8", "uint_contents", "iu"),
        _dt("UINT16", "<u2", "uint16", "uint_contents", "iu"),
        _dt("UINT32", "<u4", "uint32", "uint_contents", "iu"),
        _dt("UINT64", "<u8", "uint64", "uint64_contents", "iu"),
        _dt("INT8", "<i1", "int8", "int_contents", "iu"),
        _dt("INT16", "<i2", "int16", "int_contents", "iu"),
        _dt("INT32", "<i4", "int32", "int_contents", "iu"),
        _dt("INT64", "<i8", "int64", "int64_contents", "iu"),
        _dt("FP16", "<f2", "float16", None, "iuf"),
        _dt("FP32", "<f4", "float", "fp32_contents", "iuf"),
        _dt("FP64", "<f8", "double", "fp64_contents", "iuf"),
        _dt("BF16", ml_dtypes.bfloat16, "bfloat16", None, "iuf"),
        _dt("BYTES", np.object_, "string", "bytes_contents", ""),
    )
}

_BY_ONNX = {d.onnx_name: d.name for d in DATATYPES.values()}
# JSON numbers are doubles; these types overflow to inf beyond their largest magnitude.
_NARROW_FLOATS: dict[str, float] = {
    name: float(ml_dtypes.finfo(DATATYPES[name].dtype).max)  # type: ignore[no-untyped-call]
    for name in ("FP16", "BF16", "FP32")
}

MAX_RANK = 32
MAX_ELEMENTS = 2**40
"""Most elements the non-zero dimensions of one tensor's shape may multiply to: far beyond
any request body, and far below numpy's limit (a shape like [0, 2**40, 2**40] holds no
element, yet numpy refuses to build it)."""
"""Most dimensions a tensor may have: numpy 1's limit (numpy 2 allows 64)."""


def datatype_from_onnx(onnx_type: str) -> str:
    """Map ONNX Runtime's ``tensor(float)`` (or plain ``float``) to ``FP32``."""
    inner = onnx_type.removeprefix("tensor(").removesuffix(")")
    try:
        return _BY_ONNX[inner]
    except KeyError:
        raise ValueError(
            f"ONNX type {onnx_type!r} has no Open Inference Protocol datatype"
        ) from None


def lookup(tensor: str, datatype: str) -> DataType:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidInput(
            f"input '{tensor}': unknown datatype '{datatype}' "
            f"(expected one of {', '.join(DATATYPES)})"
        ) from None


def validate_shape(tensor: str, shape: Any) -> tuple[int, ...]:
    """A request's shape: a list of at most MAX_RANK non-negative integers."""
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidInput(f"input '{tensor}': shape must be a list of integers, got {shape!r}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(
            f"input '{tensor}': shape has rank {len(shape)}, more than the {MAX_RANK} "
            "dimensions supported"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{tensor}': shape {list(shape)} has a negative dimension")
    spanned = 1
    for dim in shape:
        spanned *= dim or 1
        if spanned > MAX_ELEMENTS:
            raise InvalidInput(
                f"input '{tensor}': shape {list(shape)} spans more than {MAX_ELEMENTS} elements"
            )
    return tuple(shape)


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _check_int_range(tensor: str, values: np.ndarray[Any, Any], dtype: DataType) -> None:
    if values.size == 0 or dtype.dtype.kind not in "iu":
        return
    info = np.iinfo(dtype.dtype)
    low, high = values.min(), values.max()
    if low < info.min or high > info.max:
        raise InvalidInput(
            f"input '{tensor}': values out of range for {dtype.name} "
            f"[{info.min}, {info.max}]: min {low}, max {high}"
        )


def decode_json_data(
    tensor: str, datatype: str, shape: tuple[int, ...], data: Any, *, booleans: bool = True
) -> np.ndarray[Any, Any]:
    """JSON ``data`` (flat or nested, row-major) -> array of ``shape``. ``booleans=False``:
    the document is known to hold no JSON boolean (its text has no ``true``/``false``)."""
    dtype = lookup(tensor, datatype)
    expected = element_count(shape)
    if not isinstance(data, list):
        data = [data]
    if dtype.name == "BYTES":
        flat = _flatten(tensor, data)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input '{tensor}': BYTES data must be strings")
        if len(flat) != expected:
            raise _length_mismatch(tensor, shape, expected, len(flat))
        out = np.empty(expected, dtype=np.object_)
        out[:] = [v.encode() for v in flat]
        return out.reshape(shape)
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInput(
            f"input '{tensor}': data is ragged; nested lists must be rectangular"
        ) from None
    if values.dtype.kind in "fO" and dtype.dtype.kind in "iu":
        values = _wide_integers(tensor, data, dtype)
    elif (
        booleans
        and values.dtype.kind in "iuf"
        and dtype.kinds != "b"
        and _has_booleans(data, values.ndim)
    ):
        raise InvalidInput(f"input '{tensor}': {datatype} data must be {_wanted(dtype)}")
    if values.size and values.dtype.kind not in dtype.kinds:
        raise InvalidInput(f"input '{tensor}': {datatype} data must be {_wanted(dtype)}")
    if values.size != expected:
        raise _length_mismatch(tensor, shape, expected, values.size)
    _check_int_range(tensor, values, dtype)
    with np.errstate(over="ignore"):
        out = values.astype(dtype.dtype, copy=False)
    # inf and nan pass through; a finite number that became inf was beyond the type's range.
    overflow = datatype in _NARROW_FLOATS and not np.isfinite(out).all()
    if overflow and (np.isinf(out) & np.isfinite(values)).any():
        raise InvalidInput(
            f"input '{tensor}': values out of range for {datatype} "
            f"(largest magnitude {_NARROW_FLOATS[datatype]:g})"
        )
    return out.reshape(shape)


def _wanted(dtype: DataType) -> str:
    return "booleans" if dtype.kinds == "b" else "numbers" if "f" in dtype.kinds else "integers"


def _has_booleans(data: list[Any], depth: int) -> bool:
    """Whether JSON true/false hide among numbers: numpy reads [1, true] as [1, 1]."""
    flat: Iterable[Any] = data
    for _ in range(depth - 1):  # numpy found ``data`` rectangular, ``depth`` lists deep
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _wide_integers(tensor: str, data: list[Any], dtype: DataType) -> np.ndarray[Any, Any]:
    """Integers beyond int64 (UINT64's upper half) make numpy fall back to floats or objects."""
    flat = _flatten(tensor, data)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidInput(f"input '{tensor}': {dtype.name} data must be integers")
    info = np.iinfo(dtype.dtype)
    if any(v < info.min or v > info.max for v in flat):
        raise InvalidInput(
            f"input '{tensor}': values out of range for {dtype.name} [{info.min}, {info.max}]"
        )
    return np.array(flat, dtype=dtype.dtype)


def _flatten(tensor: str, data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _length_mismatch(tensor: str, shape: Sequence[int], expected: int, got: int) -> InvalidInput:
    return InvalidInput(
        f"input '{tensor}': shape {list(shape)} needs {expected} elements, data has {got}"
    )


def decode_raw(
    tensor: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview
) -> np.ndarray[Any, Any]:
    """Little-endian row-major bytes -> array of ``shape`` (zero-copy for numeric types)."""
    dtype = lookup(tensor, datatype)
    expected = element_count(shape)
    if dtype.name == "BYTES":
        elements = decode_bytes_elements(tensor, raw)
        if len(elements) != expected:
            raise _length_mismatch(tensor, shape, expected, len(elements))
        out = np.empty(expected, dtype=np.object_)
        out[:] = elements
        return out.reshape(shape)
    if len(raw) != expected * dtype.itemsize:
        raise InvalidInput(
            f"input '{tensor}': shape {list(shape)} of {datatype} needs "
            f"{expected * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape)


def decode_bytes_elements(tensor: str, raw: bytes | memoryview) -> list[bytes]:
    """BYTES wire form: each element is a 4-byte little-endian length and that many bytes."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"input '{tensor}': truncated BYTES element length at {offset}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input '{tensor}': BYTES element of {length} bytes runs past the data"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def encode_bytes_elements(values: np.ndarray[Any, Any]) -> bytes:
    parts: list[bytes] = []
    for value in values.ravel():
        item = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(struct.pack("<I", len(item)))
        parts.append(item)
    return b"".join(parts)


def encode_raw(values: np.ndarray[Any, Any], datatype: str) -> bytes:
    """Array -> little-endian row-major bytes (BYTES: length-prefixed elements)."""
    if datatype == "BYTES":
        return encode_bytes_elements(values)
    dtype = DATATYPES[datatype].dtype
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def encode_json_data(values: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    """Array -> flat JSON list; BYTES elements become UTF-8 strings."""
    if datatype == "BYTES":
        return [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in values.ravel()
        ]
    if datatype in ("FP16", "BF16"):
        values = values.astype(np.float32)
    flat: list[Any] = values.ravel().tolist()
    return flat
