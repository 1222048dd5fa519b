"""Where spans go: OTLP configuration from settings and ``OTEL_*``, and the exporter.

Spans go through the SDK's ``BatchSpanProcessor`` (``OTEL_BSP_*``) to an OTLP exporter
(``OTEL_EXPORTER_OTLP_*``), over gRPC or HTTP/protobuf. The resource comes from
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, named ``turnout-gateway`` when they
leave the service unnamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from monitor.settings import MonitorSettings

__all__ = [
    "CountingExporter",
    "base_resource",
    "build_exporter",
    "queue_size",
    "trace_endpoint",
    "trace_protocol",
]

DEFAULT_SERVICE_NAME = "turnout-gateway"
DEFAULT_QUEUE_SIZE = 2048  # the SDK's default for OTEL_BSP_MAX_QUEUE_SIZE


def base_resource() -> Resource:
    """The resource the environment describes, named ``turnout-gateway`` if it names none."""
    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


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


def queue_size() -> int:
    """Spans the batch processor queues (``OTEL_BSP_MAX_QUEUE_SIZE``, else the SDK's default)."""
    return int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_QUEUE_SIZE)


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
