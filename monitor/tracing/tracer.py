"""The Tracer: ties the sampler, the span builder and the span processor together.

Per frame it asks the :class:`~monitor.tracing.sampler.TailSampler` which records are kept,
has the :class:`~monitor.tracing.spans.SpanBuilder` turn them into spans, and hands those to
the processor, dropping whole requests while the exporter is too far behind. Shadow records
are decided a second later than the rest, so that their primary request's decision is known
(the tracer remembers kept trace ids for a while). Spans go through the SDK's
``BatchSpanProcessor`` to the OTLP exporter (``monitor/tracing/otlp.py``), on their own
thread: a slow collector costs dropped spans, never ingestion.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link

from monitor.settings import MonitorSettings
from monitor.state import QUANTILES, MonitorState
from monitor.tracing.otlp import (
    CountingExporter,
    base_resource,
    build_exporter,
    queue_size,
    trace_endpoint,
)
from monitor.tracing.sampler import KEEP_REASONS, TailSampler
from monitor.tracing.spans import MAX_SPANS_PER_REQUEST, SpanBuilder
from turnout_contract.records import RecordBatch

__all__ = ["Tracer", "build_tracer"]

log = logging.getLogger("turnout.monitor")

SHADOW_DECISION_DELAY_S = 1.0
KEPT_TRACE_MEMORY_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0
_P99 = QUANTILES.index(0.99)


class Tracer:
    """Turns the kept records of each frame into spans and hands them to ``processor``.

    Called from the ingest worker thread only (``add`` per frame, ``tick`` per tick).
    """

    def __init__(
        self,
        settings: MonitorSettings,
        state: MonitorState,
        processor: SpanProcessor,
        exporter: SpanExporter | None = None,
        capacity: int | None = None,
    ) -> None:
        self.state = state
        self.sampler = TailSampler(settings)
        self.processor = processor
        self.exporter = exporter
        """The processor's exporter, shut down to cut retries short when stopping."""
        self.capacity = capacity
        """Spans the processor queues; beyond it (counted by a ``CountingExporter``) kept
        requests are dropped whole and counted in ``traces_dropped``."""
        self.traces_dropped = 0
        self.records_seen = 0
        self.kept: dict[str, int] = dict.fromkeys(KEEP_REASONS, 0)
        self.spans = 0
        self.builder = SpanBuilder(base_resource())
        """Turns kept records into spans; holds the span ids, resources and batches sent."""
        self._kept_traces: dict[str, float] = {}
        """Trace id -> when its request was kept, oldest first: shadow calls look here."""
        self._pending_shadows: collections.deque[tuple[float, RecordBatch, int]] = (
            collections.deque()
        )

    # -- per frame and per tick ----------------------------------------------------------

    def add(self, batch: RecordBatch, now: float) -> None:
        n = batch.rows
        if not n:
            return
        self.records_seen += n
        reasons = self.sampler.reasons(batch)
        kinds = batch.columns["kind"]
        builder = self.builder
        resource = builder.resource(batch)
        links: dict[int, list[Link]] = {}
        for index, reason in enumerate(reasons):
            if kinds[index] == "shadow":
                if reason is None:
                    self._pending_shadows.append((now, batch, index))
                elif self._keep(reason):
                    self._emit(builder.shadow_spans(batch, index, resource, reason, links))
                continue
            if reason is None or not self._keep(reason):
                continue
            trace_id = batch.columns["trace_id"][index]
            self._kept_traces.pop(trace_id, None)  # re-inserted last: the dict stays in time order
            self._kept_traces[trace_id] = now
            self._emit(builder.request_spans(batch, index, resource, reason, links))
        self._emit(builder.batch_spans(batch, resource, links))

    def tick(self, now: float) -> None:
        self._refresh_p99()
        builder = self.builder
        pending = self._pending_shadows
        by_batch: dict[int, tuple[RecordBatch, dict[int, list[Link]]]] = {}
        while pending and pending[0][0] <= now - SHADOW_DECISION_DELAY_S:
            _, batch, index = pending.popleft()
            if batch.columns["trace_id"][index] not in self._kept_traces:
                continue
            if not self._keep("trace"):
                continue
            _, links = by_batch.setdefault(id(batch), (batch, {}))
            self._emit(builder.shadow_spans(batch, index, builder.resource(batch), "trace", links))
        for batch, links in by_batch.values():
            self._emit(builder.batch_spans(batch, builder.resource(batch), links))
        kept = self._kept_traces
        horizon = now - KEPT_TRACE_MEMORY_S
        while kept:  # oldest first: stops at the first fresh one, so O(what expired)
            oldest = next(iter(kept))
            if kept[oldest] >= horizon:
                break
            del kept[oldest]

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Export what is queued, waiting at most ``timeout_s`` for a slow or absent collector
        (the SDK would retry each batch for up to its export timeout)."""
        stopping = threading.Thread(target=self.processor.shutdown, daemon=True)
        stopping.start()
        stopping.join(timeout_s)
        if stopping.is_alive() and self.exporter is not None:
            log.warning("spans not exported within %.0f s of stopping: dropped", timeout_s)
            self.exporter.shutdown()  # ends the retry loop; the processor then returns
            stopping.join(timeout_s)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.processor.force_flush(int(timeout_s * 1000))

    # -- decisions -----------------------------------------------------------------------

    def _keep(self, reason: str) -> bool:
        """Count a kept request; False when the exporter is too far behind to take its spans.

        Dropping here, before building anything, spares the CPU and the SDK's warning per
        span it drops from a full queue.
        """
        self.kept[reason] += 1
        exporter = self.exporter
        if (
            isinstance(exporter, CountingExporter)
            and self.capacity
            and self.spans - exporter.finished > self.capacity - MAX_SPANS_PER_REQUEST
        ):
            self.traces_dropped += 1
            return False
        return True

    def _refresh_p99(self) -> None:
        p99: dict[tuple[str, int, str], float] = {}
        with self.state.lock:
            for (model, version), state in self.state.versions.items():
                for arm, latency in state.arms.items():
                    window = latency.last_window.get("total")
                    if window is not None:
                        p99[(model, version, arm)] = window[_P99]
                    else:
                        quantiles = latency.cumulative_quantiles("total")
                        if quantiles is not None and latency.cumulative["total"].count >= 100:
                            p99[(model, version, arm)] = quantiles[_P99]
        self.sampler.p99 = p99

    # -- spans ---------------------------------------------------------------------------

    def _emit(self, spans: Iterator[ReadableSpan]) -> None:
        for span in spans:
            self.processor.on_end(span)
            self.spans += 1


def build_tracer(settings: MonitorSettings, state: MonitorState) -> Tracer | None:
    """The tracer the settings ask for; None when traces are off (or nowhere to send them)."""
    if settings.traces == "none":
        return None
    if settings.traces == "auto" and trace_endpoint(settings) is None:
        return None
    exporter = CountingExporter(build_exporter(settings))
    capacity = queue_size()
    processor = BatchSpanProcessor(exporter, max_queue_size=capacity)
    return Tracer(settings, state, processor, exporter, capacity)
