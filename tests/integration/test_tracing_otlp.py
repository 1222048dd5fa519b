"""Traces end to end: a real gateway (local backend) sends records to a real sidecar, which
exports spans with OTLP to real receivers (oteltest's gRPC and HTTP sinks). Checked: the
caller's trace continues (ids, parent/child tree, timings that nest, semantic-convention
attributes), the ``traceparent`` answered names the server span, tail sampling keeps errors,
slow requests and upstream-sampled traces while the ratio (0 here) drops the rest, the batch
span is linked both ways, and a shadow call is a child span of its request."""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gateways import PROMTOOL, GatewayThread, add_sub_request, local_settings, model_infer_stub
from model_zoo import add_sub, write_repository
from monitor_harness import free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from oteltest.sink import GrpcSink, HttpSink
from oteltest.sink.handler import RequestHandler

from monitor.server import MonitorServer
from monitor.settings import MonitorSettings
from turnout_contract.trace import parse_traceparent

EVENTUALLY_S = 20.0
SLOW_MS = 150.0
A = [1.0, 2.0, 3.0, 4.0]
B = [0.5, 0.5, 0.5, 0.5]
SERVER_ERROR = 2  # OTLP Status.STATUS_CODE_ERROR


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start: int
    end: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status: int
    service: str


class Collector(RequestHandler):
    """oteltest's handler interface: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def handle_logs(self, request: Any, headers: Any) -> None:
        pass

    def handle_metrics(self, request: Any, headers: Any) -> None:
        pass

    def handle_trace(self, request: ExportTraceServiceRequest, headers: Any) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    found.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            status=s.status.code,
                            service=str(resource.get("service.name")),
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, check: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + EVENTUALLY_S
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"no {what} after {EVENTUALLY_S} s; spans: {len(self.spans)}")


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


@dataclass
class Stack:
    gateway: GatewayThread
    collector: Collector
    monitor: MonitorServer
    protocol: str


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    protocol: str = request.param
    repository = write_repository(
        tmp_path_factory.mktemp("models"),
        {
            "add_sub": (add_sub, {"max_batch_size": 8, "max_queue_delay_us": 1000}, [1, 2]),
            # A lone request waits the whole delay for company: always slower than SLOW_MS.
            "lazy": (add_sub, {"max_batch_size": 8, "max_queue_delay_us": 300_000}, [1]),
        },
    )
    collector = Collector()
    port = free_port()
    logger = logging.getLogger("oteltest")
    sink: GrpcSink | HttpSink
    if protocol == "grpc":
        sink = GrpcSink(collector, logger, port=port)
        endpoint = f"http://127.0.0.1:{port}"
    else:
        sink = HttpSink(collector, logger, port=port)
        endpoint = f"http://127.0.0.1:{port}"
    sink.start()
    # Export every 100 ms rather than the SDK's default 5 s, so the test waits less.
    patch = pytest.MonkeyPatch()
    patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with tempfile.TemporaryDirectory(prefix="tto-") as tmp:
        settings = MonitorSettings(
            listen=f"unix://{tmp}/monitor.sock",
            state_dir=Path(tmp),
            metrics_port=0,
            traces="otlp",
            trace_endpoint=endpoint,
            trace_protocol=protocol,
            trace_sample_ratio=0.0,
            trace_slow_ms=SLOW_MS,
            trace_keep_above_p99=False,  # this test's requests are too few for a p99
        )
        monitor = MonitorServer(settings, tick_s=0.05)
        monitor.start()
        gateway = GatewayThread(
            local_settings(repository, monitor=True, monitor_address=f"unix://{tmp}/monitor.sock")
        )
        try:
            yield Stack(gateway, collector, monitor, protocol)
        finally:
            gateway.stop()
            monitor.stop()
            sink.stop()
            patch.undo()


def traceparent(sampled: bool) -> tuple[str, str, str]:
    trace_id = np.random.default_rng().bytes(16).hex()
    parent = np.random.default_rng().bytes(8).hex()
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", trace_id, parent


def http_infer(
    stack: Stack, model: str, header: str, body: dict[str, Any] | None = None, path: str = ""
) -> tuple[int, dict[str, str]]:
    document = body or {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": A},
            {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": B},
        ]
    }
    request = urllib.request.Request(
        f"http://{stack.gateway.http_url}{path or f'/v2/models/{model}/infer'}",
        data=json.dumps(document).encode(),
        headers={"traceparent": header, "tracestate": "vendor=abc"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def grpc_infer(stack: Stack, model: str, header: str) -> tuple[grpc.StatusCode, dict[str, str]]:
    with grpc.insecure_channel(stack.gateway.grpc_url) as channel:
        stub = model_infer_stub(channel)
        request = add_sub_request(model, A, B)
        try:
            _, call = stub.with_call(request, metadata=[("traceparent", header)], timeout=10)
        except grpc.RpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())
        return call.code(), dict(call.trailing_metadata() or ())


def answered_span(headers: dict[str, str], trace_id: str) -> str:
    """The gateway's server span id, from the ``traceparent`` it answered with."""
    answer = {k.lower(): v for k, v in headers.items()}["traceparent"]
    parsed = parse_traceparent(answer)
    assert parsed is not None, answer
    assert f"{parsed[0]:032x}" == trace_id
    return f"{parsed[1]:016x}"


def test_a_sampled_http_request_is_a_tree_under_the_callers_span(stack: Stack) -> None:
    header, trace_id, parent = traceparent(sampled=True)
    status, headers = http_infer(stack, "add_sub", header)
    assert status == 200
    server_id = answered_span(headers, trace_id)
    spans = stack.collector.wait(
        lambda: (found := stack.collector.trace(trace_id)) and len(found) >= 4 and found,
        "spans of the sampled request",
    )
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v2/models/{model_name}/infer"]
    assert server.span_id == server_id and server.parent_id == parent
    assert server.kind == 2  # SERVER
    assert server.service == "turnout-gateway"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["url.path"] == "/v2/models/add_sub/infer"
    assert server.attributes["http.route"] == "/v2/models/{model_name}/infer"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["turnout.model"] == "add_sub"
    assert server.attributes["turnout.model.version"] == 2
    assert server.attributes["turnout.arm"] == "primary"
    assert server.attributes["turnout.policy.revision"] == 0
    assert server.attributes["turnout.sampling.reason"] == "parent"
    for name in ("turnout.route", "turnout.queue", "turnout.execute"):
        child = by_name[name]
        assert child.parent_id == server.span_id, name
        assert server.start <= child.start <= child.end <= server.end, name
    route, queue, execute = (
        by_name["turnout.route"],
        by_name["turnout.queue"],
        by_name["turnout.execute"],
    )
    assert route.end <= queue.start + 1_000 and queue.end <= execute.start + 1_000
    assert execute.attributes["turnout.batch.size"] >= 1
    assert execute.attributes["turnout.replica"] == "local/0"
    assert execute.attributes["turnout.device"] == "cpu"
    # The backend call is a span of its own trace, linked from the request and back.
    assert len(execute.links) == 1
    batch_trace, batch_span = execute.links[0]
    batch = stack.collector.wait(
        lambda: [s for s in stack.collector.trace(batch_trace) if s.span_id == batch_span],
        "the batch span",
    )[0]
    assert batch.name == "turnout.batch"
    assert (trace_id, execute.span_id) in batch.links
    assert batch.attributes["turnout.batch.size"] == execute.attributes["turnout.batch.size"]
    assert abs(batch.start - execute.start) < 1_000 and abs(batch.end - execute.end) < 1_000


def test_a_grpc_request_has_rpc_attributes_and_its_traceparent_in_the_trailers(
    stack: Stack,
) -> None:
    header, trace_id, parent = traceparent(sampled=True)
    code, trailers = grpc_infer(stack, "add_sub", header)
    assert code == grpc.StatusCode.OK
    server_id = answered_span(trailers, trace_id)
    spans = stack.collector.wait(
        lambda: [s for s in stack.collector.trace(trace_id) if s.kind == 2], "the gRPC span"
    )
    server = spans[0]
    assert server.span_id == server_id and server.parent_id == parent
    assert server.name == "inference.GRPCInferenceService/ModelInfer"
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert server.attributes["rpc.method"] == "ModelInfer"
    assert server.attributes["rpc.grpc.status_code"] == 0


def test_errors_and_slow_requests_are_kept_the_rest_dropped(stack: Stack) -> None:
    dropped_header, dropped_trace, _ = traceparent(sampled=False)
    assert http_infer(stack, "add_sub", dropped_header)[0] == 200
    error_header, error_trace, _ = traceparent(sampled=False)
    bad = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4], "data": A}]}
    status, headers = http_infer(stack, "add_sub", error_header, bad)
    assert status == 400
    answered_span(headers, error_trace)  # errors answer with the traceparent too
    slow_header, slow_trace, _ = traceparent(sampled=False)
    started = time.monotonic()
    assert http_infer(stack, "lazy", slow_header)[0] == 200
    assert time.monotonic() - started >= SLOW_MS / 1e3
    grpc_slow_header, grpc_slow_trace, _ = traceparent(sampled=False)
    code, _ = grpc_infer(stack, "lazy", grpc_slow_header)
    assert code == grpc.StatusCode.OK

    error = stack.collector.wait(
        lambda: [s for s in stack.collector.trace(error_trace) if s.kind == 2], "the error span"
    )[0]
    assert error.attributes["http.response.status_code"] == 400
    assert error.attributes["turnout.sampling.reason"] == "error"
    assert error.status != SERVER_ERROR  # a 4xx is the client's error, not the server's
    route = [s for s in stack.collector.trace(error_trace) if s.name == "turnout.route"]
    assert route and route[0].status == SERVER_ERROR  # where it failed: validation
    slow = stack.collector.wait(
        lambda: [s for s in stack.collector.trace(slow_trace) if s.kind == 2], "the slow span"
    )[0]
    assert slow.attributes["turnout.sampling.reason"] == "slow"
    assert slow.end - slow.start >= SLOW_MS * 1e6
    queue = next(s for s in stack.collector.trace(slow_trace) if s.name == "turnout.queue")
    assert queue.end - queue.start >= 0.8 * SLOW_MS * 1e6  # the wait is where the time went
    stack.collector.wait(lambda: stack.collector.trace(grpc_slow_trace), "the slow gRPC span")
    # Everything sent so far has been decided: the unsampled, fast, successful one was not kept.
    assert stack.monitor.tracer is not None
    assert stack.monitor.tracer.force_flush()
    assert stack.collector.trace(dropped_trace) == []
    kept = stack.monitor.tracer.kept
    assert kept["error"] >= 1 and kept["slow"] >= 2 and kept["ratio"] == 0


def test_a_shadow_call_is_a_child_of_its_request(stack: Stack) -> None:
    gateway = stack.gateway.gateway
    stack.gateway.call(
        gateway.admin.apply("add_sub", "shadow", {"version": 1, "percent": 100}, "test")
    )
    try:
        header, trace_id, _ = traceparent(sampled=True)
        status, headers = http_infer(stack, "add_sub", header)
        assert status == 200
        server_id = answered_span(headers, trace_id)
        shadow = stack.collector.wait(
            lambda: [s for s in stack.collector.trace(trace_id) if s.name == "turnout.shadow"],
            "the shadow span",
        )[0]
        assert shadow.parent_id == server_id
        assert shadow.attributes["turnout.model.version"] == 1
        assert shadow.attributes["turnout.arm"] == "shadow"
        assert len(shadow.links) == 1  # to the shadow version's backend call
    finally:
        stack.gateway.call(gateway.admin.apply("add_sub", "clear_shadow", {}, "test"))


def test_a_grpc_error_carries_the_traceparent_in_its_trailers(stack: Stack) -> None:
    header, trace_id, _ = traceparent(sampled=False)
    code, trailers = grpc_infer(stack, "no_such_model", header)
    assert code == grpc.StatusCode.NOT_FOUND
    answered_span(trailers, trace_id)


@pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool missing (apt-get install prometheus)"
)
def test_the_sidecars_metrics_with_tracing_on_satisfy_promtool(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.monitor.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "turnout_monitor_traces_kept_total" in text and "turnout_monitor_spans_total" in text
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout + result.stderr
    )
