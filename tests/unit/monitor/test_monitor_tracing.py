"""The sidecar's tail sampler and span builder, with the SDK's in-memory exporter standing in
for a collector (the OTLP path itself: tests/integration/test_tracing_otlp.py)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from monitor.settings import MonitorSettings
from monitor.state import MonitorState
from monitor.tracing import (
    CountingExporter,
    TailSampler,
    Tracer,
    build_tracer,
    trace_protocol,
)
from turnout_contract.records import RecordBatch, decode_frame, encode_frame

START_NS = 1_800_000_000_000_000_000


def frame(n: int, model: str = "m", version: int = 1, **columns: Any) -> RecordBatch:
    """A decoded frame of ``n`` successful 10 ms requests, with ``columns`` replaced."""
    values: dict[str, Any] = {
        "arm": ["primary"] * n,
        "status": np.full(n, 200, np.int16),
        "start_ns": np.full(n, START_NS, np.int64),
        "decode_s": np.full(n, 0.0001),
        "enqueue_s": np.full(n, 0.0002),
        "queue_s": np.full(n, 0.001),
        "batch_s": np.full(n, 0.008),
        "total_s": np.full(n, 0.01),
        "batch_size": np.full(n, 4, np.int32),
        "batch_id": np.arange(1, n + 1, dtype=np.uint64),
        "trace_id": [secrets.token_hex(16) for _ in range(n)],
        "span_id": [secrets.token_hex(8) for _ in range(n)],
        "kind": ["server"] * n,
        "protocol": ["http"] * n,
        "path": [f"/v2/models/{model}/infer"] * n,
        "replica": ["local/0"] * n,
        "device": ["cpu"] * n,
    }
    values.update(columns)
    return decode_frame(encode_frame(RecordBatch(model, version, values)))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    memory.shutdown()


def tracer_for(exporter: InMemorySpanExporter, **settings: Any) -> Tracer:
    values: dict[str, Any] = {"trace_sample_ratio": 0.0, "trace_keep_above_p99": False}
    values.update(settings)
    config = MonitorSettings(**values)
    return Tracer(config, MonitorState(config), SimpleSpanProcessor(exporter))


def test_reasons_follow_their_priority() -> None:
    sampler = TailSampler(MonitorSettings(trace_sample_ratio=0.0, trace_slow_ms=100))
    batch = frame(
        5,
        status=np.array([500, 200, 200, 200, 429], np.int16),
        total_s=np.array([0.2, 0.2, 0.01, 0.01, 0.01]),
        trace_flags=np.array([1, 1, 1, 0, 0], np.uint8),
    )
    assert sampler.reasons(batch) == ["error", "slow", "parent", None, "error"]
    sampler.p99 = {("m", 1, "primary"): 0.005}
    assert sampler.reasons(batch)[3] == "p99"


def test_the_ratio_keeps_its_share_and_agrees_for_the_same_trace() -> None:
    sampler = TailSampler(MonitorSettings(trace_sample_ratio=0.1))
    trace_ids = [secrets.token_hex(16) for _ in range(50_000)]
    kept = sampler.by_ratio(trace_ids)
    assert abs(kept.mean() - 0.1) < 0.01  # binomial sd is 0.0013
    np.testing.assert_array_equal(kept, sampler.by_ratio(trace_ids))
    assert TailSampler(MonitorSettings(trace_sample_ratio=1.0)).by_ratio(trace_ids).all()
    assert not TailSampler(MonitorSettings(trace_sample_ratio=0.0)).by_ratio(trace_ids).any()


def test_a_kept_request_is_a_server_span_with_children_and_a_linked_batch(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = tracer_for(exporter)
    parent = secrets.token_hex(8)
    batch = frame(
        2,
        status=np.array([200, 503], np.int16),
        parent_id=[parent, ""],
        trace_flags=np.array([1, 0], np.uint8),
        tracestate=["vendor=abc", ""],
        batch_id=np.array([7, 7], np.uint64),
        protocol=["http", "grpc"],
        error=["", "model 'm' is shutting down"],
    )
    tracer.add(batch, now=0.0)
    spans = exporter.get_finished_spans()
    by_trace: dict[int, list[Any]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    first = {s.name: s for s in by_trace[int(batch.columns["trace_id"][0], 16)]}
    server = first["POST /v2/models/{model_name}/infer"]
    assert server.parent is not None and server.parent.span_id == int(parent, 16)
    assert server.context.span_id == int(batch.columns["span_id"][0], 16)
    assert server.context.trace_state.get("vendor") == "abc"
    assert server.start_time == START_NS and server.end_time == START_NS + 10_000_000
    route, queue, execute = first["turnout.route"], first["turnout.queue"], first["turnout.execute"]
    assert (route.start_time, route.end_time) == (START_NS + 100_000, START_NS + 200_000)
    assert (queue.start_time, queue.end_time) == (START_NS + 200_000, START_NS + 1_200_000)
    assert (execute.start_time, execute.end_time) == (START_NS + 1_200_000, START_NS + 9_200_000)
    second = {s.name: s for s in by_trace[int(batch.columns["trace_id"][1], 16)]}
    failed = second["inference.GRPCInferenceService/ModelInfer"]
    assert failed.attributes is not None
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed.attributes["error.type"] == "503"
    assert failed.status.description == "model 'm' is shutting down"
    # One backend call carried both: one batch span, linked from both execute spans.
    batches = [s for s in spans if s.name == "turnout.batch"]
    assert len(batches) == 1
    assert {link.context.span_id for link in batches[0].links} == {
        execute.context.span_id,
        second["turnout.execute"].context.span_id,
    }
    assert execute.links[0].context.span_id == batches[0].context.span_id == 7
    assert tracer.kept["parent"] == 1 and tracer.kept["error"] == 1
    # The same batch in a later frame is not exported twice.
    tracer.add(frame(1, batch_id=np.array([7], np.uint64), trace_flags=np.ones(1, np.uint8)), 0.0)
    assert len([s for s in exporter.get_finished_spans() if s.name == "turnout.batch"]) == 1


def test_requests_that_never_reached_a_batch_end_their_tree_early(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = tracer_for(exporter)
    refused = frame(
        2,
        status=np.array([400, 504], np.int16),
        enqueue_s=np.array([0.0, 0.0002]),
        batch_size=np.zeros(2, np.int32),
        batch_id=np.zeros(2, np.uint64),
        error=["input 'a' is missing", "timed out"],
    )
    tracer.add(refused, 0.0)
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == sorted(
        ["POST /v2/models/{model_name}/infer"] * 2
        + ["turnout.route"] * 2
        + ["turnout.queue"]  # only the one that was queued, until its timeout
    )
    queue = next(s for s in exporter.get_finished_spans() if s.name == "turnout.queue")
    assert queue.end_time == START_NS + 10_000_000 and queue.status.description == "timed out"


def test_shadow_spans_follow_their_primary_decision(exporter: InMemorySpanExporter) -> None:
    tracer = tracer_for(exporter)
    primary = frame(2, status=np.array([500, 200], np.int16))  # the first is kept: an error
    shadow = frame(
        2,
        version=2,
        kind=["shadow"] * 2,
        arm=["shadow"] * 2,
        trace_id=primary.columns["trace_id"],
        parent_id=primary.columns["span_id"],
        protocol=["", ""],
        path=["", ""],
        batch_id=np.array([90, 91], np.uint64),
    )
    tracer.add(shadow, now=10.0)  # the shadow's record may come first: it waits
    tracer.add(primary, now=10.1)
    tracer.tick(10.5)
    assert not [s for s in exporter.get_finished_spans() if s.name == "turnout.shadow"]
    tracer.tick(11.5)
    shadows = [s for s in exporter.get_finished_spans() if s.name == "turnout.shadow"]
    assert len(shadows) == 1
    assert shadows[0].context.trace_id == int(primary.columns["trace_id"][0], 16)
    assert shadows[0].parent is not None
    assert shadows[0].parent.span_id == int(primary.columns["span_id"][0], 16)
    assert shadows[0].attributes is not None
    assert shadows[0].attributes["turnout.model.version"] == 2
    batch = [s for s in exporter.get_finished_spans() if s.name == "turnout.batch"]
    assert {s.context.span_id for s in batch} >= {90}
    assert 91 not in {s.context.span_id for s in batch}
    assert tracer.kept["trace"] == 1
    # Kept traces are remembered for 30 s, no longer: a shadow record later than that is not.
    tracer.tick(45.0)
    late = frame(
        1,
        version=2,
        kind=["shadow"],
        arm=["shadow"],
        trace_id=primary.columns["trace_id"][:1],
        parent_id=primary.columns["span_id"][:1],
        batch_id=np.array([92], np.uint64),
    )
    tracer.add(late, now=45.0)
    tracer.tick(46.5)
    assert tracer.kept["trace"] == 1


def test_the_p99_of_the_last_window_keeps_outliers(exporter: InMemorySpanExporter) -> None:
    tracer = tracer_for(exporter, trace_keep_above_p99=True)
    totals = np.r_[np.full(990, 0.01), np.full(10, 0.05)]
    history = frame(1000, total_s=totals)
    tracer.state.apply(history, 0.0)
    tracer.tick(0.0)
    p99 = tracer.sampler.p99[("m", 1, "primary")]
    assert 0.009 < p99 < 0.052
    tracer.add(frame(2, total_s=np.array([0.005, 0.2])), 1.0)
    kept = {s.attributes["turnout.sampling.reason"] for s in exporter.get_finished_spans()
            if s.attributes and "turnout.sampling.reason" in s.attributes}  # fmt: skip
    assert kept == {"p99"}
    assert tracer.kept["p99"] == 1


def test_protocol_and_endpoint_come_from_settings_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = MonitorSettings()
    assert trace_protocol(settings) == "http/protobuf"
    assert build_tracer(settings, MonitorState(settings)) is None  # auto, and nowhere to send
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert trace_protocol(settings) == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert trace_protocol(settings) == "http/protobuf"
    assert trace_protocol(MonitorSettings(trace_protocol="grpc")) == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        trace_protocol(settings)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    tracer = build_tracer(settings, MonitorState(settings))
    assert tracer is not None
    tracer.shutdown()
    assert build_tracer(MonitorSettings(traces="none"), MonitorState(settings)) is None


def test_the_p99_rule_keeps_the_slowest_within_one_percent() -> None:
    sampler = TailSampler(MonitorSettings(trace_sample_ratio=0.0, trace_slow_ms=1000))
    sampler.p99 = {("m", 1, "primary"): 0.01}
    rng = np.random.default_rng(3)
    kept = 0
    slowest_kept = []
    for _ in range(100):  # latency rose: half the requests are above the old p99
        totals = rng.uniform(0.005, 0.015, 1000)
        reasons = sampler.reasons(frame(1000, total_s=totals))
        chosen = [i for i, r in enumerate(reasons) if r == "p99"]
        kept += len(chosen)
        slowest_kept.append(set(chosen) == set(np.argsort(-totals)[: len(chosen)].tolist()))
    assert kept <= 0.01 * 100 * 1000 + 50  # the share, plus the burst saved at the start
    assert kept >= 0.009 * 100 * 1000
    assert all(slowest_kept)


class StuckExporter(SpanExporter):
    """A collector that never answers until the exporter is shut down."""

    def __init__(self) -> None:
        self.exporting = threading.Event()
        self.released = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.exporting.set()
        self.released.wait(120)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.released.set()


def test_stopping_does_not_wait_on_a_collector_that_never_answers() -> None:
    settings = MonitorSettings(trace_sample_ratio=1.0)
    stuck = StuckExporter()
    processor = BatchSpanProcessor(stuck, schedule_delay_millis=10)
    tracer = Tracer(settings, MonitorState(settings), processor, stuck)
    tracer.add(frame(10), 0.0)
    assert stuck.exporting.wait(10)
    tracer.shutdown(timeout_s=0.1)
    # The export in progress was cut short by shutting the exporter down.
    assert stuck.released.is_set()


def test_a_backlogged_exporter_drops_whole_requests_before_the_queue_overflows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = MonitorSettings(trace_sample_ratio=1.0)
    stuck = StuckExporter()
    counting = CountingExporter(stuck)
    capacity = 40
    processor = BatchSpanProcessor(
        counting, max_queue_size=capacity, max_export_batch_size=8, schedule_delay_millis=10
    )
    tracer = Tracer(settings, MonitorState(settings), processor, counting, capacity)
    try:
        tracer.add(frame(2), 0.0)
        assert stuck.exporting.wait(10)  # the first batch of spans is stuck in export
        for _ in range(10):
            tracer.add(frame(5), 0.0)
        assert tracer.traces_dropped > 0
        assert tracer.kept["ratio"] == 2 + 50
        # Never more waiting than the queue holds: the SDK dropped nothing (and said nothing).
        assert tracer.spans - counting.finished <= capacity + 8
        assert "Queue full" not in caplog.text
    finally:
        tracer.shutdown(timeout_s=0.1)
