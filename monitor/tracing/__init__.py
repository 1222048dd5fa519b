"""Spans from request records, tail-sampled, exported with OTLP.

The gateway never builds a span: it draws its server span's ids, returns the
``traceparent``, and puts timestamps and ids into the request records
(``turnout_contract/trace.py``, ``turnout_contract/records.py``). Here, after a record's request has
finished and its outcome is known:

    sampler.py   :class:`TailSampler` decides whether its trace is kept, and why
                 (error, slow, p99, parent, ratio; a shadow call follows its primary)
    spans.py     :class:`SpanBuilder` turns the kept records of a batch into spans: a server
                 span with route, queue and execute children, a span per backend call in a
                 trace of its own, and one per mirrored shadow call
    otlp.py      the OTLP settings and ``OTEL_*`` environment, the exporter, and
                 :class:`CountingExporter`, which counts what has left the queue
    tracer.py    :class:`Tracer` ties them: per frame and per tick, on the ingest worker
                 thread, to the SDK's ``BatchSpanProcessor`` on its own thread (a slow
                 collector costs dropped spans, never ingestion); :func:`build_tracer`
"""

from monitor.tracing.otlp import (
    CountingExporter,
    build_exporter,
    trace_protocol,
)
from monitor.tracing.otlp import trace_endpoint as trace_endpoint
from monitor.tracing.sampler import KEEP_REASONS, TailSampler
from monitor.tracing.tracer import Tracer, build_tracer

__all__ = [
    "KEEP_REASONS",
    "CountingExporter",
    "TailSampler",
    "Tracer",
    "build_exporter",
    "build_tracer",
    "trace_protocol",
]
