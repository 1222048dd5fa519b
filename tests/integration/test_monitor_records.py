"""Request records from a real gateway (local backend) to a test socket standing in for the
monitor sidecar: real tritonclient requests over HTTP and gRPC, and every column checked
against what the client sent and got back."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateways import EVENTUALLY_S, GatewayThread, local_settings, running
from tritonclient.utils import InferenceServerException

from turnout_contract.records import RecordBatch, decode_frame

MODEL = "add_sub"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


class Sink:
    """A bound Unix datagram socket collecting decoded frames."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.frames: list[RecordBatch] = []

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def rows(self) -> list[dict[str, Any]]:
        """One dict per record, with its sampled tensors (``None`` when not sampled)."""
        out = []
        for frame in self.frames:
            for i in range(frame.rows):
                row: dict[str, Any] = {k: v[i] for k, v in frame.columns.items()}
                row["model"], row["version"] = frame.model, frame.version
                picked = np.flatnonzero(frame.sampled == i)
                row["inputs"] = (
                    {k: v[picked] for k, v in frame.inputs.items()} if len(picked) else None
                )
                row["outputs"] = (
                    {k: v[picked] for k, v in frame.outputs.items()} if len(picked) else None
                )
                out.append(row)
        return out

    def wait_for(self, request_ids: set[str]) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + EVENTUALLY_S
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.frames.append(decode_frame(self.sock.recv(1 << 20)))
            found = {r["request_id"]: r for r in self.rows() if r["request_id"] in request_ids}
            if set(found) == request_ids:
                return found
        raise AssertionError(f"records missing for {request_ids - set(found)}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with tempfile.TemporaryDirectory(prefix="tmr-") as tmp:
        receiver = Sink(Path(tmp) / "monitor.sock")
        yield receiver
        receiver.close()


@pytest.fixture(scope="module")
def gateway(repository: Path, sink: Sink) -> Iterator[GatewayThread]:
    settings = local_settings(repository, monitor=True, monitor_address=sink.address)
    with running(settings) as server:
        # Half of add_sub's traffic to each version: records must name the arm that served.
        server.call(server.gateway.admin.apply(MODEL, "set", {"weights": {"1": 50, "2": 50}}, "t"))
        yield server


def add_sub_inputs(module: Any, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[Any]:
    tensors = []
    for name, value in (("a", a), ("b", b)):
        tensor = module.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_requests_produce_records_with_columns_and_sampled_tensors(
    gateway: GatewayThread, sink: Sink
) -> None:
    rng = np.random.default_rng(0)
    http = httpclient.InferenceServerClient(gateway.http_url)
    grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
    sent: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], Any]] = {}
    for i in range(16):
        rows = 1 + i % 3
        a = rng.standard_normal((rows, 4)).astype(np.float32)
        b = rng.standard_normal((rows, 4)).astype(np.float32)
        rid = f"req-{i}"
        if i % 2:
            result = grpc.infer(
                MODEL,
                add_sub_inputs(grpcclient, a, b),
                request_id=rid,
                headers={"x-turnout-routing-key": rid, "traceparent": TRACEPARENT},
            )
        else:
            result = http.infer(
                MODEL,
                add_sub_inputs(httpclient, a, b),
                request_id=rid,
                headers={"x-turnout-routing-key": rid, "traceparent": TRACEPARENT},
            )
        sent[rid] = (a, b, result)
    records = sink.wait_for(set(sent))
    versions = set()
    for rid, (a, b, result) in sent.items():
        record = records[rid]
        response = result.get_response()
        version = int(
            response["model_version"] if isinstance(response, dict) else response.model_version
        )
        assert record["model"] == MODEL
        assert record["version"] == version
        versions.add(version)
        assert record["revision"] == 1
        assert record["arm"] in ("primary", "canary")
        assert record["status"] == 200
        assert record["total_s"] > 0 and record["batch_s"] > 0 and record["queue_s"] >= 0
        assert record["total_s"] >= record["batch_s"]
        assert record["batch_size"] >= len(a)
        assert record["trace_id"] == TRACE
        assert abs(record["start_ns"] - time.time_ns()) < 60e9
        np.testing.assert_array_equal(record["inputs"]["a"], a)
        np.testing.assert_array_equal(record["inputs"]["b"], b)
        np.testing.assert_array_equal(record["outputs"]["sum"], result.as_numpy("sum"))
        np.testing.assert_array_equal(record["outputs"]["diff"], result.as_numpy("diff"))
    assert versions == {1, 2}  # both arms served and were recorded as such
    arms = {records[rid]["version"]: records[rid]["arm"] for rid in sent}
    assert arms[1] != arms[2]


def test_concurrent_requests_record_their_shared_batch(gateway: GatewayThread, sink: Sink) -> None:
    a = np.ones((1, 4), np.float32)

    def call(index: int) -> None:
        client = httpclient.InferenceServerClient(gateway.http_url)
        inputs = add_sub_inputs(httpclient, a, a)
        client.infer(MODEL, inputs, request_id=f"c-{index}", model_version="2")

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(call, range(48)))
    records = sink.wait_for({f"c-{i}" for i in range(48)})
    assert all(r["arm"] == "explicit" and r["version"] == 2 for r in records.values())
    sizes = [int(r["batch_size"]) for r in records.values()]
    assert max(sizes) > 1, "24 concurrent callers never shared a backend call"
    assert max(sizes) <= 8  # add_sub's max_batch_size


def test_a_model_without_a_batch_axis_is_sampled_as_one_row(
    gateway: GatewayThread, sink: Sink
) -> None:
    client = httpclient.InferenceServerClient(gateway.http_url)
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    tensor = httpclient.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("fixed", [tensor], request_id="fixed-1")
    record = sink.wait_for({"fixed-1"})["fixed-1"]
    assert record["batch_size"] == 1
    np.testing.assert_array_equal(record["inputs"]["x"], x[None])
    np.testing.assert_array_equal(record["outputs"]["y"], result.as_numpy("y")[None])


def test_errors_are_recorded_with_their_status(gateway: GatewayThread, sink: Sink) -> None:
    http = httpclient.InferenceServerClient(gateway.http_url)
    grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
    a = np.ones((1, 4), np.float32)
    wrong = add_sub_inputs(httpclient, a, a)[:1]  # input 'b' missing
    with pytest.raises(InferenceServerException):
        http.infer(MODEL, wrong, request_id="bad-http")
    with pytest.raises(InferenceServerException):
        grpc.infer(MODEL, add_sub_inputs(grpcclient, a, a)[:1], request_id="bad-grpc")
    with pytest.raises(InferenceServerException):
        http.infer(MODEL, add_sub_inputs(httpclient, a, a), model_version="7", request_id="no-v7")
    records = sink.wait_for({"bad-http", "bad-grpc", "no-v7"})
    assert records["bad-http"]["status"] == 400 and records["bad-grpc"]["status"] == 400
    assert records["bad-http"]["inputs"] is None  # failed requests carry no tensors
    assert records["bad-http"]["version"] in (1, 2) and records["bad-http"]["revision"] == 1
    assert records["bad-http"]["batch_size"] == 0  # never reached a batch
    assert records["no-v7"]["status"] == 404 and records["no-v7"]["version"] == 0
    emitter = gateway.gateway.emitter
    assert emitter is not None and emitter.records_dropped == 0 and emitter.frames_dropped == 0


def test_without_a_sidecar_the_gateway_serves_exactly_as_before(repository: Path) -> None:
    missing = f"unix://{tempfile.gettempdir()}/turnout-no-sidecar-{time.time_ns()}.sock"
    with_monitor = GatewayThread(local_settings(repository, monitor=True, monitor_address=missing))
    without = GatewayThread(local_settings(repository))
    try:
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        answers = []
        for server in (with_monitor, without):
            client = httpclient.InferenceServerClient(server.http_url)
            result = client.infer(MODEL, add_sub_inputs(httpclient, a, a), model_version="1")
            answers.append((result.as_numpy("sum"), result.as_numpy("diff")))
            with pytest.raises(InferenceServerException, match="missing input"):
                client.infer(MODEL, add_sub_inputs(httpclient, a, a)[:1])
        for got, want in zip(answers[0], answers[1], strict=True):
            np.testing.assert_array_equal(got, want)
        emitter = with_monitor.gateway.emitter
        assert emitter is not None and without.gateway.emitter is None
        assert with_monitor.gateway.monitor is None  # an address given: no child started
        deadline = time.monotonic() + EVENTUALLY_S
        while emitter.frames_dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert emitter.frames_dropped >= 1 and emitter.frames_sent == 0
    finally:
        with_monitor.stop()
        without.stop()


def test_the_gateway_supervises_its_sidecar(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNOUT_MONITOR_METRICS_PORT", "0")  # never collide with a real one
    server = GatewayThread(local_settings(repository, monitor=True))
    second = None
    try:
        supervisor = server.gateway.monitor
        state_dir = server.gateway.settings.state_dir
        assert supervisor is not None
        port = server.gateway.monitor_http.rsplit(":", 1)[1]
        assert supervisor.command[-4:] == [
            "--listen", f"unix://{state_dir}/monitor.sock", "--metrics-port", port,
        ]  # fmt: skip
        deadline = time.monotonic() + EVENTUALLY_S * 3
        while not (state_dir / "monitor.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (state_dir / "monitor.sock").exists(), "the sidecar never bound its socket"
        first = supervisor.process
        assert first is not None and first.poll() is None
        first.kill()  # the sidecar dies: restarted, and the gateway serves meanwhile
        client = httpclient.InferenceServerClient(server.http_url)
        a = np.ones((1, 4), np.float32)
        client.infer(MODEL, add_sub_inputs(httpclient, a, a))
        while supervisor.starts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        second = supervisor.process
        assert supervisor.starts >= 2 and second is not None and second is not first
        assert second.poll() is None
    finally:
        server.stop()
    assert second is not None and second.poll() is not None  # terminated with the gateway
