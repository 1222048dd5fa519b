"""The wire format between the gateway and the monitor sidecar: columnar record batches.

One frame carries the requests of one (model, version) that the gateway collected since its
last flush, column by column, so the sidecar can feed numpy arrays straight into its
kernels. Frames are msgpack maps; arrays travel as raw little-endian bytes with their dtype
and shape. A frame fits one Unix datagram (the gateway splits larger batches).

Frame layout (``FORMAT_VERSION`` 2)::

    {"v": 2, "model": str, "version": int,
     "n": rows,
     "columns": {               # one entry per request, all of length n
        "revision": int64, "arm": [str], "status": int16 (HTTP-style code),
        "start_ns": int64 (wall clock when the transport took the request up),
        "decode_s": float64 (offset: the data plane took it up),
        "enqueue_s": float64 (offset: queued for its batch; 0: never queued),
        "queue_s": float64, "batch_s": float64 (durations), "total_s": float64,
        "batch_size": int32 (rows in its backend call; 0: none),
        "batch_id": uint64 (the backend call, shared by the requests it carried; 0: none),
        "trace_flags": uint8, "trace_id": [str hex32], "span_id": [str hex16],
        "parent_id": [str hex16 or ""], "tracestate": [str],
        "kind": ["server" | "shadow"], "protocol": ["http" | "grpc" | ""],
        "path": [str], "error": [str], "replica": [str], "device": [str],
        "request_id": [str]},
     "sampled": int64 row indices whose tensors are included (subset of 0..n-1),
     "inputs":  {name: array [len(sampled), ...]},     # features of sampled rows
     "outputs": {name: array [len(sampled), ...]},
     "emitter": {"source": str, counter: int, ...}}   # optional: the gateway's cumulative
                                                      # drop counters, which the sidecar
                                                      # exports (frames it never got included)

A ``shadow`` record is the mirrored call to a shadow version: its span's parent is the
primary request's server span, and its arm is ``shadow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = ["FORMAT_VERSION", "RecordBatch", "decode_frame", "encode_frame"]

FORMAT_VERSION = 2
NUMERIC_COLUMNS = {
    "revision": np.int64,
    "status": np.int16,
    "start_ns": np.int64,
    "decode_s": np.float64,
    "enqueue_s": np.float64,
    "queue_s": np.float64,
    "batch_s": np.float64,
    "total_s": np.float64,
    "batch_size": np.int32,
    "batch_id": np.uint64,
    "trace_flags": np.uint8,
}
TEXT_COLUMNS = (
    "arm",
    "trace_id",
    "span_id",
    "parent_id",
    "tracestate",
    "kind",
    "protocol",
    "path",
    "error",
    "replica",
    "device",
    "request_id",
)


@dataclass(slots=True)
class RecordBatch:
    model: str
    version: int
    columns: dict[str, Any]
    sampled: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.int64))
    inputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    outputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    emitter: dict[str, Any] = field(default_factory=dict)
    """The sending gateway's ``source`` id and cumulative counters (records_dropped, ...)."""

    @property
    def rows(self) -> int:
        return len(self.columns["total_s"])


def _pack_array(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    if array.dtype == np.object_:  # BYTES tensors: a list of bytes
        return {"dtype": "bytes", "shape": list(array.shape), "items": list(array.ravel())}
    contiguous = np.ascontiguousarray(array)
    return {
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
        "data": contiguous.tobytes(),
    }


def _unpack_array(packed: dict[str, Any]) -> np.ndarray[Any, Any]:
    if packed["dtype"] == "bytes":
        out = np.empty(len(packed["items"]), dtype=np.object_)
        out[:] = packed["items"]
        return out.reshape(packed["shape"])
    # A writable copy, not a read-only view of the datagram: numba compiles a separate
    # specialisation for read-only arrays, which warm_up() does not cover.
    array = np.frombuffer(packed["data"], dtype=np.dtype(packed["dtype"])).copy()
    return array.reshape(packed["shape"])


def encode_frame(batch: RecordBatch) -> bytes:
    """One frame; columns the batch lacks go as zeros and empty strings."""
    columns: dict[str, Any] = {}
    rows = batch.rows
    given = batch.columns
    for name, dtype in NUMERIC_COLUMNS.items():
        value = given[name] if name in given else np.zeros(rows, dtype)
        columns[name] = _pack_array(np.asarray(value, dtype=dtype))
    for name in TEXT_COLUMNS:
        columns[name] = [str(v) for v in given[name]] if name in given else [""] * rows
    frame = {
        "v": FORMAT_VERSION,
        "model": batch.model,
        "version": batch.version,
        "n": batch.rows,
        "columns": columns,
        "sampled": _pack_array(np.asarray(batch.sampled, dtype=np.int64)),
        "inputs": {k: _pack_array(v) for k, v in batch.inputs.items()},
        "outputs": {k: _pack_array(v) for k, v in batch.outputs.items()},
        "emitter": batch.emitter,
    }
    encoded: bytes = msgpack.packb(frame, use_bin_type=True)
    return encoded


def decode_frame(payload: bytes) -> RecordBatch:
    """Parse one frame; raises ValueError on anything malformed (the sidecar counts and drops)."""
    try:
        frame = msgpack.unpackb(payload, raw=False)
        if frame.get("v") != FORMAT_VERSION:
            raise ValueError(f"unsupported record format {frame.get('v')!r}")
        raw_columns = frame["columns"]
        columns: dict[str, Any] = {
            name: _unpack_array(raw_columns[name]) for name in NUMERIC_COLUMNS
        }
        for name in TEXT_COLUMNS:
            columns[name] = list(raw_columns[name])
        rows = int(frame["n"])
        if any(len(v) != rows for v in columns.values()):
            raise ValueError("record columns disagree on the row count")
        return RecordBatch(
            model=str(frame["model"]),
            version=int(frame["version"]),
            columns=columns,
            sampled=_unpack_array(frame["sampled"]),
            inputs={k: _unpack_array(v) for k, v in frame["inputs"].items()},
            outputs={k: _unpack_array(v) for k, v in frame["outputs"].items()},
            emitter=dict(frame.get("emitter") or {}),
        )
    except (KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed record frame: {exc}") from exc
