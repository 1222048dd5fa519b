"""What a request leaves behind (:class:`RequestRecord`) and the frame that carries records.

The gateway builds one :class:`RequestRecord` per request (and one per mirrored shadow
call) once its outcome is known, hands it to its observers (metrics, the record emitter),
and the emitter turns queued records into columns with :meth:`RecordBatch.from_records`:
the schema below is written once, here.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np

from turnout_contract.trace import TraceContext

__all__ = [
    "FORMAT_VERSION",
    "NUMERIC_COLUMNS",
    "SERVER",
    "SHADOW",
    "TEXT_COLUMNS",
    "BatchTiming",
    "Placement",
    "RecordBatch",
    "RequestRecord",
    "Tensors",
    "decode_frame",
    "encode_frame",
]

Tensors = dict[str, np.ndarray[Any, Any]]
SERVER: Final = "server"
"""A request's own record."""
SHADOW: Final = "shadow"
"""The record of a call mirrored to a shadow version (its arm is ``shadow`` too)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a batch ran: the replica (``node/pid`` on Ray, ``local/N`` in process) and device."""

    replica: str
    device: str


@dataclass(slots=True)
class BatchTiming:
    """Where one request's time went; filled by the batcher when its batch ends."""

    queue_s: float = 0.0  # from submit until its batch started
    batch_s: float = 0.0  # the backend call that carried it
    batch_size: int = 0  # rows in that call (0: it never reached one)
    enqueued: float = 0.0  # perf_counter() when it was queued (0: never queued)
    batch_id: int = 0  # the call's id, shared by every request it carried (trace links)
    placement: Placement | None = None  # the replica that ran it, when the backend says


_NO_TIMING: Final = BatchTiming()


class RequestRecord:
    """One answered request (or mirrored call), as observers see it and the monitor stores it.

    Built once per request with positional arguments in the order of ``__slots__`` (the hot
    path: a slotted object costs one allocation, like the tuple it replaces). ``timing`` and
    ``trace`` are read when records are turned into columns: nobody changes them after.
    ``version`` is -1 when no version was chosen (unknown model, refused selection) and 0
    when the chosen one is not loaded; only records with ``version >= 0`` reach the monitor.
    ``inputs``/``outputs`` (first axis: the request's ``rows``) are set for successful
    requests; the emitter keeps them only while its sampling budget allows.
    """

    __slots__ = (
        "arm",
        "entered",
        "error",
        "inputs",
        "kind",
        "model",
        "outputs",
        "path",
        "protocol",
        "received",
        "request_id",
        "revision",
        "rows",
        "start_ns",
        "status",
        "timing",
        "total_s",
        "trace",
        "version",
    )

    def __init__(
        self,
        model: str,
        version: int,
        revision: int,
        arm: str,
        status: int,
        start_ns: int,
        received: float,
        entered: float,
        total_s: float,
        timing: BatchTiming | None,
        trace: TraceContext,
        kind: str,
        protocol: str,
        path: str,
        error: str,
        request_id: str,
        rows: int = 0,
        inputs: Tensors | None = None,
        outputs: Tensors | None = None,
    ) -> None:
        self.model = model
        self.version = version
        """-1: no version chosen; 0: the chosen version is not loaded."""
        self.revision = revision
        """The traffic policy revision it was routed under."""
        self.arm = arm
        """primary, canary, explicit or shadow ("" when not routed)."""
        self.status = status
        """HTTP-style status (``turnout_contract.status``)."""
        self.start_ns = start_ns
        """Wall clock when the transport took the request up."""
        self.received = received
        """``perf_counter()`` when the transport took it up."""
        self.entered = entered
        """``perf_counter()`` when the data plane took it up."""
        self.total_s = total_s
        self.timing = timing
        self.trace = trace
        self.kind = kind
        """:data:`SERVER` or :data:`SHADOW`."""
        self.protocol = protocol
        """``http``, ``grpc`` or "" (shadow calls)."""
        self.path = path
        self.error = error
        self.request_id = request_id
        self.rows = rows
        self.inputs = inputs
        self.outputs = outputs

    def __repr__(self) -> str:
        return (
            f"RequestRecord({self.model!r}, {self.version}, {self.kind}, status={self.status}, "
            f"total_s={self.total_s:.6f})"
        )


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

    @classmethod
    def from_records(
        cls, model: str, version: int, records: Sequence[RequestRecord]
    ) -> RecordBatch:
        """The columns of ``records`` (all of one model and version) and their sampled tensors.

        Column-wise, with as few container objects per record as possible: every one this
        allocates is work for the garbage collector of a process with a large heap. Raises
        ValueError when sampled tensors of different inner shapes cannot be stacked.
        """
        n = len(records)
        enqueue_s = [0.0] * n
        batch = [_NO_TIMING] * n
        replica = [""] * n
        device = [""] * n
        for index, record in enumerate(records):
            timing = record.timing
            if timing is not None:
                batch[index] = timing
                if timing.enqueued:
                    enqueue_s[index] = timing.enqueued - record.received
                placement = timing.placement
                if placement is not None:
                    replica[index] = placement.replica
                    device[index] = placement.device
        traces = [r.trace for r in records]
        columns: dict[str, Any] = {
            "revision": np.array([r.revision for r in records], np.int64),
            "arm": [r.arm for r in records],
            "status": np.array([r.status for r in records], np.int16),
            "start_ns": np.array([r.start_ns for r in records], np.int64),
            "decode_s": np.array([r.entered - r.received for r in records], np.float64),
            "enqueue_s": np.array(enqueue_s, np.float64),
            "queue_s": np.array([t.queue_s for t in batch], np.float64),
            "batch_s": np.array([t.batch_s for t in batch], np.float64),
            "total_s": np.array([r.total_s for r in records], np.float64),
            "batch_size": np.array([t.batch_size for t in batch], np.int32),
            "batch_id": np.array([t.batch_id for t in batch], np.uint64),
            "trace_flags": np.array([t.flags for t in traces], np.uint8),
            "trace_id": [f"{t.trace_id:032x}" for t in traces],
            "span_id": [f"{t.span_id:016x}" for t in traces],
            "parent_id": [f"{t.parent_span_id:016x}" if t.parent_span_id else "" for t in traces],
            "tracestate": [t.state for t in traces],
            "kind": [r.kind for r in records],
            "protocol": [r.protocol for r in records],
            "path": [r.path for r in records],
            "error": [r.error for r in records],
            "replica": replica,
            "device": device,
            "request_id": [r.request_id for r in records],
        }
        sampled = [i for i in range(n) if records[i].inputs is not None]
        if sampled:
            first = records[sampled[0]]
            assert first.inputs is not None and first.outputs is not None
            inputs = {
                k: _stack([_tensor(records[i].inputs, k) for i in sampled]) for k in first.inputs
            }
            outputs = {
                k: _stack([_tensor(records[i].outputs, k) for i in sampled]) for k in first.outputs
            }
            indices = np.repeat(np.asarray(sampled, np.int64), [records[i].rows for i in sampled])
        else:
            inputs, outputs, indices = {}, {}, np.zeros(0, np.int64)
        return cls(model, version, columns, indices, inputs, outputs)


def _tensor(tensors: Tensors | None, name: str) -> np.ndarray[Any, Any]:
    assert tensors is not None
    return tensors[name]


def _stack(values: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    return values[0] if len(values) == 1 else np.concatenate(values)


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
