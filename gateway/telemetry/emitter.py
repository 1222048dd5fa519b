"""The record emitter: observes request records on the hot path, ships them from a thread.

Ids and timings come from the record's :class:`turnout_contract.trace.TraceContext` and the
batcher's :class:`turnout_contract.records.BatchTiming`; both ride in the queued record and
are read into columns by the flush thread, so the hot path formats nothing. Tensors are
sampled per backend call: the first record of a call decides, against the sampling budget,
whether the call's rows ride along (:class:`turnout_contract.records.BatchTensors`), and a
frame carries each call's rows once, however many of its requests it holds.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from typing import Any

from gateway.limits import TokenBucket
from gateway.telemetry.datagram import DatagramSocket
from gateway.telemetry.frames import MAX_FRAME_BYTES, chunks, runs_of_alike_shapes
from turnout_contract.records import RecordBatch, RequestRecord, encode_frame

__all__ = ["RecordEmitter"]

log = logging.getLogger(__name__)


class RecordEmitter:
    """Queue request records on the hot path; a thread ships them to the sidecar.

    Counters (read by the gateway's metrics): ``records_queued``, ``records_dropped``
    (queue full), ``rows_sampled``, ``samples_skipped`` (requests whose batch found the
    sampling budget spent), ``samples_oversize`` (one request's rows exceed a datagram; its
    record goes without),
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
        self._socket = DatagramSocket(address)
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_frame_bytes = max_frame_bytes
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._bucket = TokenBucket(sample_rows_per_s)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._source = f"{socket.gethostname()}:{os.getpid()}"
        self.records_queued = 0
        self.records_dropped = 0
        self.rows_sampled = 0
        self.samples_skipped = 0
        self.samples_oversize = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.records_sent = 0
        self.records_unsent = 0

    @property
    def path(self) -> str:
        return self._socket.path

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._socket.open()
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
        self._socket.close()

    # -- hot path --------------------------------------------------------------------------

    def observe(self, record: RequestRecord) -> None:
        """Queue one record; O(1), never blocks, never raises.

        Records with no version chosen (``version < 0``) are not the monitor's business.
        A successful request's rows are sampled when its backend call's are: the first of
        the call's records to arrive takes the call's rows from the sampling budget.
        """
        if record.version < 0:
            return
        if len(self._queue) >= self.queue_size:
            self.records_dropped += 1
            return
        tensors = record.batch_tensors()
        if tensors is not None:
            sample = tensors.sample
            if sample is None:
                sample = tensors.sample = self._bucket.take(tensors.rows)
            if sample:
                record.sampled = True
                self.rows_sampled += record.rows
            else:
                self.samples_skipped += 1
        self._queue.append(record)
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
            groups: dict[tuple[str, int], list[RequestRecord]] = {}
            for _ in range(pending):
                record = queue.popleft()
                key = (record.model, record.version)
                group = groups.get(key)
                if group is None:
                    groups[key] = group = []
                group.append(record)
            for (model, version), records in groups.items():
                for chunk in chunks(records, self.max_frame_bytes):
                    self._send(model, version, chunk)

    def _counters(self) -> dict[str, Any]:
        """Cumulative drop counters, carried by every frame so the sidecar can export them."""
        return {
            "source": self._source,
            "records_dropped": self.records_dropped,
            "frames_dropped": self.frames_dropped,
            "samples_skipped": self.samples_skipped,
        }

    def _unsent(self, records: list[RequestRecord]) -> None:
        self.frames_dropped += 1
        self.records_unsent += len(records)

    def _send(self, model: str, version: int, records: list[RequestRecord]) -> None:
        try:
            batch = RecordBatch.from_records(model, version, records)
            batch.emitter = self._counters()
            frame = encode_frame(batch)
        except ValueError:
            # Sampled tensors whose inner shapes differ (variable dimensions) cannot stack:
            # send each run of alike shapes on its own.
            runs = runs_of_alike_shapes(records)
            if len(runs) > 1:
                for run in runs:
                    self._send(model, version, run)
                return
            log.exception("encoding %d records of %s:%d failed", len(records), model, version)
            self._unsent(records)
            return
        except Exception:
            log.exception("encoding %d records of %s:%d failed", len(records), model, version)
            self._unsent(records)
            return
        if len(frame) > self.max_frame_bytes:
            if len(records) > 1:
                half = len(records) // 2
                self._send(model, version, records[:half])
                self._send(model, version, records[half:])
            elif records[0].sampled:
                # One request's rows alone exceed a datagram: send its record without.
                self.samples_oversize += 1
                records[0].sampled = False
                self._send(model, version, records)
            else:
                self._unsent(records)
            return
        if not self._socket.send(frame):
            self._unsent(records)
            return
        self.frames_sent += 1
        self.records_sent += len(records)
