"""What a request leaves behind (:class:`RequestRecord`) and the frame that carries records.

The gateway builds one :class:`RequestRecord` per request (and one per mirrored shadow
call) once its outcome is known, hands it to its observers (metrics, the record emitter),
and the emitter turns queued records into columns with :meth:`RecordBatch.from_records`:
the schema below is written once, here.

A record holds scalars only. Tensors are recorded per backend call: the batcher keeps the
call's stacked inputs and outputs in one :class:`BatchTensors`, which every request it
carried points to from its :class:`BatchTiming` (with the request's first row in it). A
frame carries each call's tensors once, as a part: the rows of the calls its sampled
records came from, and ``sampled`` names the record of each row.

One frame carries the requests of one (model, version) that the gateway collected since its
last flush, column by column, so the sidecar can feed numpy arrays straight into its
kernels. Frames are msgpack maps; arrays travel as raw little-endian bytes with their dtype
and shape. A frame fits one Unix datagram (the gateway splits larger batches).

Frame layout (``FORMAT_VERSION`` 3)::

    {"v": 3, "model": str, "version": int,
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
        "request_id": [str]},   # a text column whose rows all agree: {"all": str}
     "tensors": [{"inputs": {name: array [rows, ...]},      # one part per backend call
                  "outputs": {name: array [rows, ...]}}],   # (the rows the frame needs)
     "sampled": int64 [rows of all parts, in order]: the record (0..n-1) each row belongs
                to; -1: a row of the call whose request has no record here (it failed, or
                its record went in another frame),
     "emitter": {"source": str, counter: int, ...}}   # optional: the gateway's cumulative
                                                      # drop counters, which the sidecar
                                                      # exports (frames it never got included)

:func:`decode_frame` joins the parts and keeps the rows that belong to a record of the
frame, in record order, so a decoded :class:`RecordBatch` is what version 2 carried
(which it still reads): ``inputs``/``outputs`` with one row per entry of ``sampled``.

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
    "BatchTensors",
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


class BatchTensors:
    """One successful backend call's inputs and outputs, first axis its ``rows``.

    Built once per call by the batcher and shared by the timings of every request the call
    carried (a model without a batch axis gets one: its tensors as one row). ``sample`` is
    the record emitter's: whether the call's rows ride along to the monitor (None: not
    decided yet), decided once per call against its sampling budget.
    """

    __slots__ = ("inputs", "outputs", "rows", "sample")

    def __init__(self, inputs: Tensors, outputs: Tensors, rows: int) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.sample: bool | None = None

    def __repr__(self) -> str:
        return f"BatchTensors(rows={self.rows}, inputs={list(self.inputs)})"


@dataclass(slots=True)
class BatchTiming:
    """Where one request's time went; filled by the batcher when its batch ends."""

    queue_s: float = 0.0  # from submit until its batch started
    batch_s: float = 0.0  # the backend call that carried it
    batch_size: int = 0  # rows in that call (0: it never reached one)
    enqueued: float = 0.0  # perf_counter() when it was queued (0: never queued)
    batch_id: int = 0  # the call's id, shared by every request it carried (trace links)
    placement: Placement | None = None  # the replica that ran it, when the backend says
    row: int = 0  # the request's first row in its call
    tensors: BatchTensors | None = None  # the call's tensors, when it succeeded


_NO_TIMING: Final = BatchTiming()


class RequestRecord:
    """One answered request (or mirrored call), as observers see it and the monitor stores it.

    Built once per request with positional arguments in the order of ``__slots__`` (the hot
    path: a slotted object costs one allocation, like the tuple it replaces). ``timing`` and
    ``trace`` are read when records are turned into columns: nobody changes them after.
    ``version`` is -1 when no version was chosen (unknown model, refused selection) and 0
    when the chosen one is not loaded; only records with ``version >= 0`` reach the monitor.
    A record holds no tensors of its own: a request that succeeded (``rows`` > 0) finds its
    rows in its batch's (:meth:`outputs`); ``sampled`` is set by the record emitter when
    they ride along to the monitor.
    """

    __slots__ = (
        "arm",
        "entered",
        "error",
        "kind",
        "model",
        "path",
        "protocol",
        "received",
        "request_id",
        "revision",
        "rows",
        "sampled",
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
        """The request's rows in its batch's tensors; 0 when it has none there (it failed,
        or it is a shadow call, whose rows the monitor does not sample)."""
        self.sampled = False
        """Set by the record emitter: its rows go to the monitor with the record."""

    def batch_tensors(self) -> BatchTensors | None:
        """The tensors of the backend call that answered it (None: it has no rows there)."""
        timing = self.timing
        if self.rows <= 0 or self.status != 200 or timing is None:
            return None
        return timing.tensors

    def outputs(self) -> Tensors | None:
        """The request's own rows of its batch's outputs (views), or None."""
        tensors = self.batch_tensors()
        if tensors is None:
            return None
        assert self.timing is not None
        row = self.timing.row
        end = row + self.rows
        return {name: value[row:end] for name, value in tensors.outputs.items()}

    def __repr__(self) -> str:
        return (
            f"RequestRecord({self.model!r}, {self.version}, {self.kind}, status={self.status}, "
            f"total_s={self.total_s:.6f})"
        )


FORMAT_VERSION = 3
READABLE_VERSIONS: Final = (2, 3)
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

_SignatureKey = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True)
class RecordBatch:
    """The records of one (model, version) as columns, and the tensor rows sampled with them.

    ``inputs``/``outputs`` hold one row per entry of ``sampled`` (the record it belongs to).
    A batch built by :meth:`from_records` holds its tensors as ``parts`` instead (each
    backend call's rows, not joined; ``sampled`` has one entry per row of the parts, -1
    for rows of no record here): :func:`encode_frame` sends them as they are.
    """

    model: str
    version: int
    columns: dict[str, Any]
    sampled: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.int64))
    inputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    outputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    emitter: dict[str, Any] = field(default_factory=dict)
    """The sending gateway's ``source`` id and cumulative counters (records_dropped, ...)."""
    parts: list[tuple[Tensors, Tensors]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.columns["total_s"])

    @classmethod
    def from_records(
        cls, model: str, version: int, records: Sequence[RequestRecord]
    ) -> RecordBatch:
        """The columns of ``records`` (all of one model and version) and their batches' rows.

        Column-wise, with as few container objects per record as possible: every one this
        allocates is work for the garbage collector of a process with a large heap. Each
        backend call that a sampled record came from is one part: the slice of its rows
        from the first to the last row the records here need (views). Raises ValueError
        when the parts' inner shapes or dtypes differ (they could not be joined).
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
        picked = [i for i in range(n) if records[i].sampled and batch[i].tensors is not None]
        if not picked:
            return cls(model, version, columns)
        # Per backend call: the rows the records here need, [low, high). A call's records
        # mostly come one after the other, so the last call is checked first.
        spans: dict[int, list[Any]] = {}
        current: BatchTensors | None = None
        span: list[Any] = []
        for index in picked:
            tensors = batch[index].tensors
            low = batch[index].row
            high = low + records[index].rows
            if tensors is not current:
                current = tensors
                found = spans.get(id(tensors))
                if found is None:
                    spans[id(tensors)] = span = [tensors, low, high, 0]
                    continue
                span = found
            if low < span[1]:
                span[1] = low
            if high > span[2]:
                span[2] = high
        parts: list[tuple[Tensors, Tensors]] = []
        signature: _SignatureKey | None = None
        offset = 0
        for span in spans.values():
            tensors, low, high = span[0], span[1], span[2]
            span[3] = offset - low  # a row of the frame = the call's row + this
            part = (
                {k: v[low:high] for k, v in tensors.inputs.items()},
                {k: v[low:high] for k, v in tensors.outputs.items()},
            )
            part_signature = _signature(part)
            if signature is None:
                signature = part_signature
            elif part_signature != signature:
                raise ValueError("sampled tensors differ in names, dtypes or inner shapes")
            parts.append(part)
            offset += high - low
        counts = np.array([records[i].rows for i in picked], np.int64)
        starts = np.array([batch[i].row + spans[id(batch[i].tensors)][3] for i in picked], np.int64)
        frame_rows = np.full(offset, -1, np.int64)
        before = np.cumsum(counts) - counts
        positions = np.repeat(starts - before, counts) + np.arange(int(counts.sum()))
        frame_rows[positions] = np.repeat(np.array(picked, np.int64), counts)
        return cls(model, version, columns, frame_rows, parts=parts)


def _signature(part: tuple[Tensors, Tensors]) -> _SignatureKey:
    return tuple((k, v.dtype.str, v.shape[1:]) for tensors in part for k, v in tensors.items())


def _pack_array(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    if array.dtype == np.object_:  # BYTES tensors: a list of bytes
        return {"dtype": "bytes", "shape": list(array.shape), "items": list(array.ravel())}
    contiguous = np.ascontiguousarray(array)
    return {
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
        # The array's own memory, packed without an intermediate bytes copy.
        "data": contiguous.reshape(-1).view(np.uint8).data,
    }


def _unpack_array(packed: dict[str, Any], *, copy: bool = True) -> np.ndarray[Any, Any]:
    if packed["dtype"] == "bytes":
        out = np.empty(len(packed["items"]), dtype=np.object_)
        out[:] = packed["items"]
        return out.reshape(packed["shape"])
    array = np.frombuffer(packed["data"], dtype=np.dtype(packed["dtype"]))
    # A writable copy, not a read-only view of the datagram: numba compiles a separate
    # specialisation for read-only arrays, which warm_up() does not cover.
    return (array.copy() if copy else array).reshape(packed["shape"])


def encode_frame(batch: RecordBatch) -> bytes:
    """One frame; columns the batch lacks go as zeros and empty strings."""
    columns: dict[str, Any] = {}
    rows = batch.rows
    given = batch.columns
    for name, dtype in NUMERIC_COLUMNS.items():
        value = given[name] if name in given else np.zeros(rows, dtype)
        columns[name] = _pack_array(np.asarray(value, dtype=dtype))
    for name in TEXT_COLUMNS:
        text = given.get(name)
        if text is None:
            text = [""] * rows
        elif not isinstance(text, list) or (text and not isinstance(text[0], str)):
            text = [str(v) for v in text]
        if len(text) > 1 and text.count(text[0]) == len(text):
            columns[name] = {"all": text[0]}  # most are: one arm, path, replica, no error
        else:
            columns[name] = text
    parts = batch.parts
    if not parts and (batch.inputs or batch.outputs):
        parts = [(batch.inputs, batch.outputs)]
    frame = {
        "v": FORMAT_VERSION,
        "model": batch.model,
        "version": batch.version,
        "n": rows,
        "columns": columns,
        "tensors": [
            {
                "inputs": {k: _pack_array(v) for k, v in inputs.items()},
                "outputs": {k: _pack_array(v) for k, v in outputs.items()},
            }
            for inputs, outputs in parts
        ],
        "sampled": _pack_array(np.asarray(batch.sampled, dtype=np.int64)),
        "emitter": batch.emitter,
    }
    encoded: bytes = msgpack.packb(frame, use_bin_type=True)
    return encoded


def _join(parts: list[dict[str, Any]], key: str) -> Tensors:
    """One tensor per name from the parts' packed arrays (one copy, from the datagram)."""
    if not parts:
        return {}
    if len(parts) == 1:
        return {k: _unpack_array(v) for k, v in parts[0][key].items()}
    names = list(parts[0][key])
    if any(list(part[key]) != names for part in parts):
        raise ValueError("tensor parts disagree on their names")
    return {
        name: np.concatenate([_unpack_array(part[key][name], copy=False) for part in parts])
        for name in names
    }


def decode_frame(payload: bytes) -> RecordBatch:
    """Parse one frame; raises ValueError on anything malformed (the sidecar counts and drops).

    The rows of a part that belong to no record of the frame are left out, and the rest
    put in record order.
    """
    try:
        frame = msgpack.unpackb(payload, raw=False)
        version = frame.get("v")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported record format {version!r}")
        raw_columns = frame["columns"]
        columns: dict[str, Any] = {
            name: _unpack_array(raw_columns[name]) for name in NUMERIC_COLUMNS
        }
        rows = int(frame["n"])
        for name in TEXT_COLUMNS:
            text = raw_columns[name]
            columns[name] = [str(text["all"])] * rows if isinstance(text, dict) else list(text)
        if any(len(v) != rows for v in columns.values()):
            raise ValueError("record columns disagree on the row count")
        parts = (
            list(frame["tensors"])
            if version == 3
            else [{"inputs": frame["inputs"], "outputs": frame["outputs"]}]
        )
        inputs, outputs = _join(parts, "inputs"), _join(parts, "outputs")
        sampled = _unpack_array(frame["sampled"])
        if any(len(v) != len(sampled) for v in (*inputs.values(), *outputs.values())):
            raise ValueError("sampled rows and tensor rows disagree")
        if sampled.size and int(sampled.max()) >= rows:
            raise ValueError("a sampled row names a record the frame does not hold")
        keep = sampled >= 0
        if not keep.all():
            sampled = sampled[keep]
            inputs = {k: v[keep] for k, v in inputs.items()}
            outputs = {k: v[keep] for k, v in outputs.items()}
        if sampled.size > 1 and bool((sampled[1:] < sampled[:-1]).any()):
            order = np.argsort(sampled, kind="stable")
            sampled = sampled[order]
            inputs = {k: v[order] for k, v in inputs.items()}
            outputs = {k: v[order] for k, v in outputs.items()}
        return RecordBatch(
            model=str(frame["model"]),
            version=int(frame["version"]),
            columns=columns,
            sampled=sampled,
            inputs=inputs,
            outputs=outputs,
            emitter=dict(frame.get("emitter") or {}),
        )
    except (KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed record frame: {exc}") from exc
