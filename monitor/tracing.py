"""Spans from request records, tail-sampled, exported with OTLP.

The gateway never builds a span: it draws its server span's ids, returns the
``traceparent``, and puts timestamps and ids into the request records
(``gateway/tracing.py``, ``monitor/records.py``). Here, after a record's request has
finished and its outcome is known, :class:`TailSampler` decides whether its trace is kept:

    error      every request answered with a status other than 200
    slow       total time >= ``trace_slow_ms``
    p99        total time above the version and arm's p99 (last window, else cumulative),
               the slowest first, within a budget of 1% of the records
    parent     the caller's ``traceparent`` had the sampled flag (``trace_keep_sampled_parents``)
    ratio      the rest, by trace id: its low 64 bits below ``trace_sample_ratio`` * 2^64, so
               every service sampling by ratio on the same id agrees

A kept request becomes this tree (times from the record; kinds per OpenTelemetry)::

    server span (SERVER)          POST /v2/models/{model_name}/infer
                                  or inference.GRPCInferenceService/ModelInfer
    ├── turnout.route             decoded request -> queued: version choice, validation
    ├── turnout.queue             queued -> its batch started
    └── turnout.execute           the backend call that carried it; links to:
    turnout.batch (own trace)     that call once, with batch size, replica and device, and
                                  links back to every kept request it served
    turnout.shadow                a mirrored call to the shadow version, child of the server span

The batch span lives in a trace of its own (its id is the batch id, zero-padded to 128 bits
as with 64-bit trace ids) because one call serves requests of many traces. Shadow records are
decided a second later than the rest, so that their primary request's decision is known.
Spans go through the SDK's ``BatchSpanProcessor`` (``OTEL_BSP_*``) to an OTLP exporter
(``OTEL_EXPORTER_OTLP_*``), on their own thread: a slow collector costs dropped spans, never
ingestion.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from turnout_contract.records import RecordBatch
from monitor.settings import MonitorSettings
from monitor.state import QUANTILES, MonitorState

__all__ = [
    "GRPC_CODES",
    "KEEP_REASONS",
    "CountingExporter",
    "TailSampler",
    "Tracer",
    "build_exporter",
    "build_tracer",
    "trace_protocol",
]

log = logging.getLogger("turnout.monitor")

KEEP_REASONS = ("error", "slow", "p99", "parent", "ratio", "trace")
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_METHOD = "ModelInfer"
DEFAULT_SERVICE_NAME = "turnout-gateway"
SHADOW_DECISION_DELAY_S = 1.0
KEPT_TRACE_MEMORY_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0
DEFAULT_QUEUE_SIZE = 2048  # the SDK's default for OTEL_BSP_MAX_QUEUE_SIZE
MAX_SPANS_PER_REQUEST = 5  # server, route, queue, execute, and its share of a batch span
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_P99 = QUANTILES.index(0.99)
_UNSET = Status(StatusCode.UNSET)
_SCOPE = InstrumentationScope("turnout.monitor", "0.1.0")

#: The gateway's HTTP-style statuses as gRPC status codes (docs/errors.md).
GRPC_CODES = {
    200: 0,
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    409: 9,
    413: 8,
    429: 8,
    500: 13,
    503: 14,
    504: 4,
}
#: gRPC codes a server span reports as errors (OpenTelemetry's RPC conventions).
_GRPC_SERVER_ERRORS = {2, 4, 12, 13, 14, 15}

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
P99_SHARE = 0.01
P99_BURST = 50.0


class TailSampler:
    """Per record: keep its trace or not, and why (see the module docstring)."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.slow_s = settings.trace_slow_ms / 1e3
        ratio = settings.trace_sample_ratio
        self.all = ratio >= 1.0
        self.threshold = np.uint64(min(int(ratio * 2.0**64), 2**64 - 1))
        self.keep_above_p99 = settings.trace_keep_above_p99
        self.keep_sampled_parents = settings.trace_keep_sampled_parents
        self.p99: dict[tuple[str, int, str], float] = {}
        """(model, version, arm) -> p99 of total time; refreshed by the tracer's tick."""
        self._p99_tokens = P99_BURST

    def reasons(self, batch: RecordBatch) -> list[str | None]:
        """Why each record's trace is kept (one of ``KEEP_REASONS``), or None."""
        columns = batch.columns
        n = batch.rows
        status = np.asarray(columns["status"])
        total = np.asarray(columns["total_s"])
        error = status != 200
        slow = total >= self.slow_s
        if self.keep_above_p99 and self.p99:
            key = (batch.model, batch.version)
            limits = np.array([self.p99.get((*key, arm), math.inf) for arm in columns["arm"]])
            above = self._slowest_within_budget(total, (total > limits) & ~error & ~slow)
        else:
            above = np.zeros(n, np.bool_)
        if self.keep_sampled_parents:
            parent = (np.asarray(columns["trace_flags"]) & 1).astype(np.bool_)
        else:
            parent = np.zeros(n, np.bool_)
        ratio = self.by_ratio(columns["trace_id"])
        choices: list[tuple[BoolArray, str]] = [
            (error, "error"),
            (slow, "slow"),
            (above, "p99"),
            (parent, "parent"),
            (ratio, "ratio"),
        ]
        reasons: list[str | None] = [None] * n
        for mask, reason in reversed(choices):  # the first reason that holds wins
            for index in np.flatnonzero(mask).tolist():
                reasons[index] = reason
        return reasons

    def _slowest_within_budget(self, total: FloatArray, candidates: BoolArray) -> BoolArray:
        """The slowest of ``candidates``, at most 1% of the records seen over time.

        A p99 from the last window lags the traffic: when latency rises, far more than 1%
        exceed it. The budget keeps the rule to its share (each record adds 0.01 of a
        token, up to ``P99_BURST`` saved), and spends it on the slowest first.
        """
        self._p99_tokens = min(self._p99_tokens + P99_SHARE * len(total), P99_BURST)
        found = np.flatnonzero(candidates)
        allowed = int(self._p99_tokens)
        if len(found) > allowed:
            found = found[np.argsort(-total[found], kind="stable")[:allowed]]
            candidates = np.zeros(len(total), np.bool_)
            candidates[found] = True
        self._p99_tokens -= len(found)
        return candidates

    def by_ratio(self, trace_ids: list[str]) -> BoolArray:
        if self.all:
            return np.ones(len(trace_ids), np.bool_)
        if not self.threshold:
            return np.zeros(len(trace_ids), np.bool_)
        low = np.fromiter((int(t[16:32] or "0", 16) for t in trace_ids), np.uint64, len(trace_ids))
        result: BoolArray = low < self.threshold
        return result


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
        self._base_resource = _base_resource()
        self._resources: dict[str, Resource] = {}
        self._kept_traces: dict[str, float] = {}
        """Trace id -> when its request was kept, oldest first: shadow calls look here."""
        self._pending_shadows: collections.deque[tuple[float, RecordBatch, int]] = (
            collections.deque()
        )
        self._batches_sent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ids = random.Random()

    # -- per frame and per tick ----------------------------------------------------------

    def add(self, batch: RecordBatch, now: float) -> None:
        n = batch.rows
        if not n:
            return
        self.records_seen += n
        reasons = self.sampler.reasons(batch)
        kinds = batch.columns["kind"]
        resource = self._resource(batch)
        links: dict[int, list[Link]] = {}
        for index, reason in enumerate(reasons):
            if kinds[index] == "shadow":
                if reason is None:
                    self._pending_shadows.append((now, batch, index))
                elif self._keep(reason):
                    self._emit(self._shadow_spans(batch, index, resource, reason, links))
                continue
            if reason is None or not self._keep(reason):
                continue
            trace_id = batch.columns["trace_id"][index]
            self._kept_traces.pop(trace_id, None)  # re-inserted last: the dict stays in time order
            self._kept_traces[trace_id] = now
            self._emit(self._request_spans(batch, index, resource, reason, links))
        self._emit(self._batch_spans(batch, resource, links))

    def tick(self, now: float) -> None:
        self._refresh_p99()
        pending = self._pending_shadows
        by_batch: dict[int, tuple[RecordBatch, dict[int, list[Link]]]] = {}
        while pending and pending[0][0] <= now - SHADOW_DECISION_DELAY_S:
            _, batch, index = pending.popleft()
            if batch.columns["trace_id"][index] not in self._kept_traces:
                continue
            if not self._keep("trace"):
                continue
            _, links = by_batch.setdefault(id(batch), (batch, {}))
            self._emit(self._shadow_spans(batch, index, self._resource(batch), "trace", links))
        for batch, links in by_batch.values():
            self._emit(self._batch_spans(batch, self._resource(batch), links))
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

    def _resource(self, batch: RecordBatch) -> Resource:
        source = str(batch.emitter.get("source", ""))
        resource = self._resources.get(source)
        if resource is None:
            resource = self._base_resource
            if source:
                resource = resource.merge(Resource({SERVICE_INSTANCE_ID: source}))
            self._resources[source] = resource
        return resource

    def _span_id(self) -> int:
        return self._ids.getrandbits(64) or 1

    def _request_spans(
        self,
        batch: RecordBatch,
        i: int,
        resource: Resource,
        reason: str,
        links: dict[int, list[Link]],
    ) -> Iterator[ReadableSpan]:
        c = batch.columns
        trace_id = int(c["trace_id"][i], 16)
        status = int(c["status"][i])
        start = int(c["start_ns"][i])
        end = start + _ns(c["total_s"][i])
        tracestate = c["tracestate"][i]
        server = SpanContext(
            trace_id,
            int(c["span_id"][i], 16),
            is_remote=False,
            trace_flags=_SAMPLED,
            trace_state=TraceState.from_header([tracestate]) if tracestate else None,
        )
        parent_hex = c["parent_id"][i]
        parent = (
            SpanContext(trace_id, int(parent_hex, 16), is_remote=True, trace_flags=_SAMPLED)
            if parent_hex
            else None
        )
        common: dict[str, Any] = {
            "turnout.model": batch.model,
            "turnout.model.version": batch.version,
            "turnout.arm": c["arm"][i],
            "turnout.policy.revision": int(c["revision"][i]),
        }
        protocol = c["protocol"][i]
        attributes = dict(common)
        error = c["error"][i]
        if protocol == "grpc":
            code = GRPC_CODES.get(status, 2)
            name = f"{GRPC_SERVICE}/{GRPC_METHOD}"
            attributes.update(
                {
                    "rpc.system": "grpc",
                    "rpc.service": GRPC_SERVICE,
                    "rpc.method": GRPC_METHOD,
                    "rpc.grpc.status_code": code,
                }
            )
            failed = code in _GRPC_SERVER_ERRORS
        else:
            path = c["path"][i]
            route = (
                "/v2/models/{model_name}/versions/{model_version}/infer"
                if "/versions/" in path
                else "/v2/models/{model_name}/infer"
            )
            name = f"POST {route}"
            attributes.update(
                {
                    "http.request.method": "POST",
                    "http.route": route,
                    "url.path": path,
                    "url.scheme": "http",
                    "http.response.status_code": status,
                }
            )
            failed = status >= 500
        if failed:
            attributes["error.type"] = str(status)
        request_id = c["request_id"][i]
        if request_id:
            attributes["turnout.request.id"] = request_id
        attributes["turnout.sampling.reason"] = reason
        yield ReadableSpan(
            name,
            context=server,
            parent=parent,
            resource=resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, error or None) if failed else _UNSET,
            start_time=start,
            end_time=end,
            instrumentation_scope=_SCOPE,
        )
        enqueue = _ns(c["enqueue_s"][i])
        routed_end = start + enqueue if enqueue else end
        unqueued_error = error if status != 200 else ""
        decoded = start + _ns(c["decode_s"][i])
        yield self._child(
            "turnout.route", server, resource, decoded, routed_end, common,
            "" if enqueue else unqueued_error,
        )  # fmt: skip
        if not enqueue:
            return
        rows = int(c["batch_size"][i])
        queue_end = start + enqueue + _ns(c["queue_s"][i]) if rows else end
        yield self._child(
            "turnout.queue", server, resource, start + enqueue, queue_end, {},
            "" if rows else unqueued_error,
        )  # fmt: skip
        if not rows:
            return
        batch_id = int(c["batch_id"][i])
        execute = {  # model and version are the parent's: each attribute costs encoding time
            "turnout.batch.size": rows,
            "turnout.replica": c["replica"][i],
            "turnout.device": c["device"][i],
        }
        context = SpanContext(trace_id, self._span_id(), is_remote=False, trace_flags=_SAMPLED)
        link = [Link(_batch_context(batch_id))] if batch_id else []
        yield ReadableSpan(
            "turnout.execute",
            context=context,
            parent=server,
            resource=resource,
            attributes=execute,
            links=link,
            status=Status(StatusCode.ERROR, error) if status != 200 else _UNSET,
            start_time=queue_end,
            end_time=queue_end + _ns(c["batch_s"][i]),
            instrumentation_scope=_SCOPE,
        )
        if batch_id:
            links.setdefault(batch_id, []).append(Link(context))

    def _shadow_spans(
        self,
        batch: RecordBatch,
        i: int,
        resource: Resource,
        reason: str,
        links: dict[int, list[Link]],
    ) -> Iterator[ReadableSpan]:
        c = batch.columns
        trace_id = int(c["trace_id"][i], 16)
        status = int(c["status"][i])
        start = int(c["start_ns"][i])
        context = SpanContext(
            trace_id, int(c["span_id"][i], 16), is_remote=False, trace_flags=_SAMPLED
        )
        parent_hex = c["parent_id"][i]
        parent = (
            SpanContext(trace_id, int(parent_hex, 16), is_remote=False, trace_flags=_SAMPLED)
            if parent_hex
            else None
        )
        batch_id = int(c["batch_id"][i])
        attributes: dict[str, Any] = {
            "turnout.model": batch.model,
            "turnout.model.version": batch.version,
            "turnout.arm": "shadow",
            "turnout.status_code": status,
            "turnout.batch.size": int(c["batch_size"][i]),
            "turnout.queue.seconds": float(c["queue_s"][i]),
            "turnout.replica": c["replica"][i],
            "turnout.device": c["device"][i],
            "turnout.sampling.reason": reason,
        }
        error = c["error"][i]
        yield ReadableSpan(
            "turnout.shadow",
            context=context,
            parent=parent,
            resource=resource,
            attributes=attributes,
            links=[Link(_batch_context(batch_id))] if batch_id else [],
            kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, error) if status != 200 else _UNSET,
            start_time=start,
            end_time=start + _ns(c["total_s"][i]),
            instrumentation_scope=_SCOPE,
        )
        if batch_id:
            links.setdefault(batch_id, []).append(Link(context))

    def _batch_spans(
        self, batch: RecordBatch, resource: Resource, links: dict[int, list[Link]]
    ) -> Iterator[ReadableSpan]:
        """One span per backend call that served a kept request, unless already sent."""
        if not links:
            return
        c = batch.columns
        wanted = set(links)
        sent = self._batches_sent
        for i, batch_id in enumerate(np.asarray(c["batch_id"]).tolist()):
            if batch_id not in wanted:
                continue
            wanted.discard(batch_id)
            if batch_id in sent:
                continue
            sent[batch_id] = None
            if len(sent) > 100_000:
                sent.popitem(last=False)
            start = int(c["start_ns"][i]) + _ns(c["enqueue_s"][i]) + _ns(c["queue_s"][i])
            yield ReadableSpan(
                "turnout.batch",
                context=_batch_context(batch_id),
                resource=resource,
                attributes={
                    "turnout.model": batch.model,
                    "turnout.model.version": batch.version,
                    "turnout.batch.size": int(c["batch_size"][i]),
                    "turnout.replica": c["replica"][i],
                    "turnout.device": c["device"][i],
                },
                links=links[batch_id],
                kind=SpanKind.INTERNAL,
                start_time=start,
                end_time=start + _ns(c["batch_s"][i]),
                instrumentation_scope=_SCOPE,
            )

    def _child(
        self,
        name: str,
        parent: SpanContext,
        resource: Resource,
        start: int,
        end: int,
        attributes: dict[str, Any],
        error: str,
    ) -> ReadableSpan:
        context = SpanContext(
            parent.trace_id, self._span_id(), is_remote=False, trace_flags=_SAMPLED
        )
        return ReadableSpan(
            name,
            context=context,
            parent=parent,
            resource=resource,
            attributes=attributes,
            status=Status(StatusCode.ERROR, error) if error else _UNSET,
            start_time=start,
            end_time=max(start, end),
            instrumentation_scope=_SCOPE,
        )


def _ns(seconds: Any) -> int:
    return int(float(seconds) * 1e9)


def _batch_context(batch_id: int) -> SpanContext:
    # A 64-bit id padded to 128 bits, as 64-bit trace ids are carried in W3C trace context.
    return SpanContext(batch_id, batch_id, is_remote=False, trace_flags=_SAMPLED)


def _base_resource() -> Resource:
    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


# -- configuration ---------------------------------------------------------------------


def trace_endpoint(settings: MonitorSettings) -> str | None:
    """The OTLP endpoint configured for traces, if any (setting, then environment)."""
    return (
        settings.trace_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def trace_protocol(settings: MonitorSettings) -> str:
    protocol = (
        settings.trace_protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTLP protocol {protocol!r} is not supported (grpc, http/protobuf)")
    return protocol


def build_exporter(settings: MonitorSettings) -> SpanExporter:
    """An OTLP span exporter; what settings leave open comes from ``OTEL_EXPORTER_OTLP_*``."""
    protocol = trace_protocol(settings)
    endpoint = settings.trace_endpoint
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # a base URL, as OTEL_..._ENDPOINT
    return HttpExporter(endpoint=endpoint)


def build_tracer(settings: MonitorSettings, state: MonitorState) -> Tracer | None:
    """The tracer the settings ask for; None when traces are off (or nowhere to send them)."""
    if settings.traces == "none":
        return None
    if settings.traces == "auto" and trace_endpoint(settings) is None:
        return None
    exporter = CountingExporter(build_exporter(settings))
    capacity = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_QUEUE_SIZE)
    processor = BatchSpanProcessor(exporter, max_queue_size=capacity)
    return Tracer(settings, state, processor, exporter, capacity)


class CountingExporter(SpanExporter):
    """Passes spans on to ``inner`` and counts those it is done with (sent or failed), so the
    tracer knows how many wait in the processor's queue."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.finished = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.inner.export(spans)
        finally:
            self.finished += len(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
