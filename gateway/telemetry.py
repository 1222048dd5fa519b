"""Request records for the monitor sidecar: a bounded queue, columnar frames, Unix datagrams.

The hot path (:meth:`RecordEmitter.record`) appends one tuple to a bounded deque and
returns; a full queue drops the record and counts it. A flush thread wakes every
``flush_interval_s``, groups what was queued by (model, version), builds
:class:`monitor.records.RecordBatch` frames of at most ``max_frame_bytes`` and sends each
with one non-blocking ``sendto`` on a Unix datagram socket. A sidecar that is missing,
refusing or behind costs one failed system call per frame: the frame is dropped and
counted, never retried, and requests are served exactly as without a monitor.

Input and output tensors ride along for sampled requests: every successful request while
the token bucket of ``sample_rows_per_s`` rows allows it. A sampled request with ``r`` rows
adds ``r`` entries to the frame's ``sampled`` indices (each naming the request's record)
and ``r`` rows to every tensor, so features stay aligned with their request's columns.

Ids and timings come from the request's :class:`gateway.tracing.TraceContext` and the
batcher's :class:`gateway.batching.BatchTiming`; both objects ride in the queued record and
are read into columns by the flush thread, so the hot path formats nothing. Offsets
(``decode_s``, ``enqueue_s``) and ``total_s`` count from the transport taking the request
up; ``start_ns`` is that moment on the wall clock. The sidecar turns them into spans.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np

from gateway.batching import BatchTiming
from gateway.tracing import TraceContext
from monitor.records import RecordBatch, encode_frame

__all__ = [
    "DEFAULT_SOCKET_NAME",
    "RecordEmitter",
    "TokenBucket",
    "socket_path",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET_NAME = "monitor.sock"
MAX_FRAME_BYTES = 192 * 1024  # the default Unix datagram limit is ~208 KiB (wmem_default)
_SEND_BUFFER_BYTES = 4 * 1024 * 1024  # the kernel caps it at net.core.wmem_max
_ROW_OVERHEAD_BYTES = 256  # numeric columns + ids + msgpack framing, per record
_DROPPED_SEND_ERRNOS = {
    errno.ENOENT,
    errno.ECONNREFUSED,
    errno.EAGAIN,
    errno.EWOULDBLOCK,
    errno.ENOBUFS,
    errno.EMSGSIZE,
    errno.ENOTCONN,
}

Tensors = dict[str, np.ndarray[Any, Any]]
SERVER, SHADOW = "server", "shadow"
# One queued record: model, version, revision, arm, status, start_ns, received, entered,
# total_s, timing, trace, kind, protocol, path, error, request_id, inputs, outputs, rows.
# ``received``/``entered``: perf_counter() when the transport / the data plane took it up.
_Record = tuple[
    str,
    int,
    int,
    str,
    int,
    int,
    float,
    float,
    float,
    BatchTiming | None,
    TraceContext,
    str,
    str,
    str,
    str,
    str,
    Tensors | None,
    Tensors | None,
    int,
]
_INPUTS: Final = 16
_OUTPUTS: Final = 17
_ROWS: Final = 18
_NO_TIMING = BatchTiming()


def socket_path(address: str) -> Path:
    """The file of a ``unix:///path`` address."""
    if not address.startswith("unix://") or len(address) == len("unix://"):
        raise ValueError(f"{address!r} is not a unix:///path address")
    return Path(address[len("unix://") :])


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` (one second's worth) saved up."""

    __slots__ = ("_last", "_tokens", "capacity", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self._tokens = self.capacity
        self._last = time.monotonic()

    def take(self, amount: int) -> bool:
        if self.rate <= 0:
            return False
        now = time.monotonic()
        tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        self._tokens = tokens
        return False


class RecordEmitter:
    """Queue request records on the hot path; a thread ships them to the sidecar.

    Counters (read by the gateway's metrics): ``records_queued``, ``records_dropped``
    (queue full), ``rows_sampled``, ``samples_skipped`` (sampling budget spent),
    ``samples_oversize`` (one request's tensors exceed a datagram; its record goes without),
    ``frames_sent``, ``frames_dropped`` (sidecar absent, refusing or full; frame too big),
    ``records_sent``, ``records_unsent`` (in frames that were dropped).
    """

    def __init__(
        self,
        address: str,
        *,
        queue_size: int = 65536,
        sample_rows_per_s: float = 10000.0,
        flush_interval_s: float = 0.05,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.address = address
        self.path = str(socket_path(address))
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_frame_bytes = max_frame_bytes
        self._queue: collections.deque[_Record] = collections.deque()
        self._bucket = TokenBucket(sample_rows_per_s)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self.records_queued = 0
        self.records_dropped = 0
        self._source = f"{socket.gethostname()}:{os.getpid()}"
        self.rows_sampled = 0
        self.samples_skipped = 0
        self.samples_oversize = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.records_sent = 0
        self.records_unsent = 0
        self._last_send_error: int | None = -1  # log each new kind of failure once

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # the kernel's default still works
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        self._socket = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="turnout-records", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the flush thread after one last flush; records queued later are kept."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.flush()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- hot path --------------------------------------------------------------------------

    def record(
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
        protocol: str,
        path: str,
        error: str,
        request_id: str,
        rows: int = 0,
        inputs: Tensors | None = None,
        outputs: Tensors | None = None,
    ) -> None:
        """Queue one request's record; O(1), never blocks, never raises.

        ``inputs``/``outputs`` (first axis: the request's ``rows``) are kept only when the
        sampling budget allows; the caller passes them for successful requests. ``timing``
        and ``trace`` are read at flush time: the caller must not change them afterwards.
        """
        if len(self._queue) >= self.queue_size:
            self.records_dropped += 1
            return
        if inputs is not None and outputs is not None and rows > 0:
            if self._bucket.take(rows):
                self.rows_sampled += rows
            else:
                self.samples_skipped += 1
                inputs = outputs = None
        else:
            inputs = outputs = None
        self._queue.append(
            (
                model,
                version,
                revision,
                arm,
                status,
                start_ns,
                received,
                entered,
                total_s,
                timing,
                trace,
                SERVER,
                protocol,
                path,
                error,
                request_id,
                inputs,
                outputs,
                rows,
            )
        )
        self.records_queued += 1

    def record_shadow(
        self,
        model: str,
        version: int,
        status: int,
        received: float,
        start_ns: int,
        total_s: float,
        timing: BatchTiming | None,
        trace: TraceContext,
        error: str,
    ) -> None:
        """Queue the record of a mirrored call; ``trace`` is a child of the primary's span."""
        if len(self._queue) >= self.queue_size:
            self.records_dropped += 1
            return
        self._queue.append(
            (
                model,
                version,
                0,
                SHADOW,
                status,
                start_ns,
                received,
                received,
                total_s,
                timing,
                trace,
                SHADOW,
                "",
                "",
                error,
                "",
                None,
                None,
                0,
            )
        )
        self.records_queued += 1

    # -- flush thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:  # telemetry must never take anything down; log and go on
                log.exception("flushing request records failed")

    def flush(self) -> None:
        """Send what is queued now, one or more frames per (model, version)."""
        with self._flush_lock:
            queue = self._queue
            pending = len(queue)
            if not pending:
                return
            groups: dict[tuple[str, int], list[_Record]] = {}
            for _ in range(pending):
                item = queue.popleft()
                group = groups.get((item[0], item[1]))
                if group is None:
                    groups[(item[0], item[1])] = group = []
                group.append(item)
            for (model, version), records in groups.items():
                for chunk in self._chunks(records):
                    self._send(model, version, chunk)

    def _chunks(self, records: list[_Record]) -> Iterable[list[_Record]]:
        """Runs of records whose frame should stay under ``max_frame_bytes``.

        Sizes are estimated from the first sampled request's bytes per row (a model's rows
        are alike); ``_send`` splits a run whose frame came out larger anyway.
        """
        budget = self.max_frame_bytes - 4096  # room for the frame's own keys
        row_bytes = 0
        for record in records:
            inputs, outputs = record[_INPUTS], record[_OUTPUTS]
            if inputs is not None and outputs is not None:
                tensor_bytes = _tensor_bytes(inputs) + _tensor_bytes(outputs)
                row_bytes = tensor_bytes // max(record[_ROWS], 1)
                break
        chunk: list[_Record] = []
        size = 0
        for record in records:
            cost = _ROW_OVERHEAD_BYTES + len(record[13]) + len(record[14]) + len(record[15])
            if record[_INPUTS] is not None:
                cost += row_bytes * record[_ROWS]
            if chunk and size + cost > budget:
                yield chunk
                chunk, size = [], 0
            chunk.append(record)
            size += cost
        if chunk:
            yield chunk

    def _counters(self) -> dict[str, Any]:
        """Cumulative drop counters, carried by every frame so the sidecar can export them."""
        return {
            "source": self._source,
            "records_dropped": self.records_dropped,
            "frames_dropped": self.frames_dropped,
            "samples_skipped": self.samples_skipped,
        }

    def _send(self, model: str, version: int, records: list[_Record]) -> None:
        try:
            batch = _batch(model, version, records)
            batch.emitter = self._counters()
            frame = encode_frame(batch)
        except ValueError:
            # Sampled tensors whose inner shapes differ (variable dimensions) cannot stack:
            # send each run of alike shapes on its own.
            runs = _runs_of_alike_shapes(records)
            if len(runs) > 1:
                for run in runs:
                    self._send(model, version, run)
                return
            log.exception("encoding %d records of %s:%d failed", len(records), model, version)
            self.frames_dropped += 1
            self.records_unsent += len(records)
            return
        except Exception:
            log.exception("encoding %d records of %s:%d failed", len(records), model, version)
            self.frames_dropped += 1
            self.records_unsent += len(records)
            return
        if len(frame) > self.max_frame_bytes:
            if len(records) > 1:
                half = len(records) // 2
                self._send(model, version, records[:half])
                self._send(model, version, records[half:])
            elif records[0][_INPUTS] is not None:
                # One request's tensors alone exceed a datagram: send its record without.
                self.samples_oversize += 1
                self._send(model, version, [(*records[0][:_INPUTS], None, None, records[0][_ROWS])])
            else:
                self.frames_dropped += 1
                self.records_unsent += 1
            return
        sock = self._socket
        if sock is None:
            self.frames_dropped += 1
            self.records_unsent += len(records)
            return
        try:
            sock.sendto(frame, self.path)
        except OSError as exc:
            self.frames_dropped += 1
            self.records_unsent += len(records)
            if exc.errno not in _DROPPED_SEND_ERRNOS and exc.errno != self._last_send_error:
                log.warning("sending records to %s failed: %s", self.address, exc)
            self._last_send_error = exc.errno
            return
        self.frames_sent += 1
        self.records_sent += len(records)


def _runs_of_alike_shapes(records: list[_Record]) -> list[list[_Record]]:
    runs: list[list[_Record]] = [[]]
    signature: tuple[Any, ...] | None = None
    for record in records:
        inputs, outputs = record[_INPUTS], record[_OUTPUTS]
        if inputs is not None and outputs is not None:
            record_signature = _signature(inputs, outputs)
            if signature is not None and record_signature != signature and runs[-1]:
                runs.append([])
            signature = record_signature
        runs[-1].append(record)
    return runs


def _tensor_bytes(tensors: Tensors) -> int:
    total = 0
    for value in tensors.values():
        if value.dtype == np.object_:
            total += sum(len(v) if isinstance(v, bytes | str) else 16 for v in value.flat)
            total += 4 * value.size
        else:
            total += value.nbytes
    return total


def _signature(inputs: Tensors, outputs: Tensors) -> tuple[Any, ...]:
    return (
        tuple((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()),
        tuple((k, v.dtype.str, v.shape[1:]) for k, v in outputs.items()),
    )


def _batch(model: str, version: int, records: list[_Record]) -> RecordBatch:
    # Column-wise, with as few container objects per record as possible: every one the
    # flush allocates is work for the garbage collector of a process with a large heap.
    (
        _,
        _,
        revision,
        arm,
        status,
        start_ns,
        received,
        entered,
        total_s,
        timings,
        traces,
        kind,
        protocol,
        path,
        error,
        request_ids,
        inputs_column,
        outputs_column,
        rows_column,
    ) = zip(*records, strict=True)
    n = len(records)
    enqueue_s = [0.0] * n
    batch = [_NO_TIMING] * n
    replica = [""] * n
    device = [""] * n
    for index, timing in enumerate(timings):
        if timing is not None:
            batch[index] = timing
            if timing.enqueued:
                enqueue_s[index] = timing.enqueued - received[index]
            placement = timing.placement
            if placement is not None:
                replica[index] = placement.replica
                device[index] = placement.device
    columns: dict[str, Any] = {
        "revision": np.array(revision, np.int64),
        "arm": arm,
        "status": np.array(status, np.int16),
        "start_ns": np.array(start_ns, np.int64),
        "decode_s": np.subtract(entered, received, dtype=np.float64),
        "enqueue_s": np.array(enqueue_s, np.float64),
        "queue_s": np.array([t.queue_s for t in batch], np.float64),
        "batch_s": np.array([t.batch_s for t in batch], np.float64),
        "total_s": np.array(total_s, np.float64),
        "batch_size": np.array([t.batch_size for t in batch], np.int32),
        "batch_id": np.array([t.batch_id for t in batch], np.uint64),
        "trace_flags": np.array([t.flags for t in traces], np.uint8),
        "trace_id": [f"{t.trace_id:032x}" for t in traces],
        "span_id": [f"{t.span_id:016x}" for t in traces],
        "parent_id": [f"{t.parent_span_id:016x}" if t.parent_span_id else "" for t in traces],
        "tracestate": [t.state for t in traces],
        "kind": kind,
        "protocol": protocol,
        "path": path,
        "error": error,
        "replica": replica,
        "device": device,
        "request_id": request_ids,
    }
    sampled = [i for i in range(n) if inputs_column[i] is not None]
    if sampled:
        first_inputs, first_outputs = inputs_column[sampled[0]], outputs_column[sampled[0]]
        assert first_inputs is not None and first_outputs is not None
        inputs = {name: _stack([inputs_column[i][name] for i in sampled]) for name in first_inputs}
        outputs = {
            name: _stack([outputs_column[i][name] for i in sampled]) for name in first_outputs
        }
        indices = np.repeat(np.asarray(sampled, np.int64), [rows_column[i] for i in sampled])
    else:
        inputs, outputs, indices = {}, {}, np.zeros(0, np.int64)
    return RecordBatch(
        model=model,
        version=version,
        columns=columns,
        sampled=indices,
        inputs=inputs,
        outputs=outputs,
    )


def _stack(values: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    return values[0] if len(values) == 1 else np.concatenate(values)
