"""The span builder: one RecordBatch's kept records as ReadableSpans.

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
as with 64-bit trace ids) because one call serves requests of many traces.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from turnout_contract.records import RecordBatch
from turnout_contract.status import GRPC_SERVER_ERRORS, grpc_code

__all__ = ["MAX_SPANS_PER_REQUEST", "SpanBuilder"]

GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_METHOD = "ModelInfer"
MAX_SPANS_PER_REQUEST = 5  # server, route, queue, execute, and its share of a batch span
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_SCOPE = InstrumentationScope("turnout.monitor", "0.1.0")


class SpanBuilder:
    """Spans for the records of one batch at a time; ``links`` (batch id -> links to the
    requests it served) carries what a batch's ``batch_spans`` needs from the request and
    shadow spans built before it.

    Holds the span-id generator, the resource per emitting process and the batch ids whose
    span was already sent.
    """

    def __init__(self, base_resource: Resource) -> None:
        self._base_resource = base_resource
        self._resources: dict[str, Resource] = {}
        self._batches_sent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ids = random.Random()

    def resource(self, batch: RecordBatch) -> Resource:
        """The base resource, with the emitting process as ``service.instance.id``."""
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

    def request_spans(
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
            code = grpc_code(status)
            name = f"{GRPC_SERVICE}/{GRPC_METHOD}"
            attributes.update(
                {
                    "rpc.system": "grpc",
                    "rpc.service": GRPC_SERVICE,
                    "rpc.method": GRPC_METHOD,
                    "rpc.grpc.status_code": code,
                }
            )
            failed = code in GRPC_SERVER_ERRORS
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

    def shadow_spans(
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

    def batch_spans(
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
