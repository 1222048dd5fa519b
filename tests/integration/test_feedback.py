"""Label feedback end to end: a real gateway (local backend) feeding a real sidecar, labels
sent through the gateway over HTTP and gRPC, accuracy per version in the sidecar's status;
bad bodies answer 400 naming the field, an unreachable sidecar 503."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings, running

from gateway.feedback import _CLASSES, PACKAGE, SERVICE
from monitor.server import MonitorServer
from monitor.settings import MonitorSettings

MODEL = "add_sub"
_Request = _CLASSES[f"{PACKAGE}.SendFeedbackRequest"]
_Response = _CLASSES[f"{PACKAGE}.SendFeedbackResponse"]


@pytest.fixture(scope="module")
def sidecar() -> Iterator[MonitorServer]:
    folder = Path(tempfile.mkdtemp(prefix="tfb-"))  # short: Unix socket paths are limited
    settings = MonitorSettings(
        state_dir=folder, metrics_port=0, window_s=1, prediction_outputs={MODEL: "sum"}
    )
    server = MonitorServer(settings, tick_s=0.05)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(repository: Path, sidecar: MonitorServer) -> Iterator[GatewayThread]:
    address = f"unix://{sidecar.settings.socket_file()}"
    settings = local_settings(
        repository, monitor=True, monitor_address=address, monitor_http=sidecar.url
    )
    with running(settings) as server:
        server.call(server.gateway.admin.apply(MODEL, "set", {"weights": {"1": 50, "2": 50}}, "t"))
        yield server


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _feedback(gateway: GatewayThread, body: Any, model: str = MODEL) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _post(f"http://{gateway.http_url}/v2/models/{model}/feedback", raw)


def _send_grpc(gateway: GatewayThread, model: str, labels: list[tuple[str, Any]]) -> Any:
    request = _Request(model=model)
    for key, value in labels:
        entry = request.labels.add(id=key)
        if isinstance(value, list):
            for item in value:
                entry.label.list_value.values.add().number_value = item
        else:
            entry.label.number_value = value
    return _call_send_feedback(gateway, request)


def _call_send_feedback(gateway: GatewayThread, request: Any) -> Any:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/SendFeedback",
            request_serializer=_Request.SerializeToString,
            response_deserializer=_Response.FromString,
        )
        return call(request, timeout=30)


def _inputs(module: Any, rows: int, rng: np.random.Generator) -> list[Any]:
    tensors = []
    for name in ("a", "b"):
        tensor = module.InferInput(name, [rows, 4], "FP32")
        tensor.set_data_from_numpy(rng.standard_normal((rows, 4)).astype(np.float32))
        tensors.append(tensor)
    return tensors


def test_labels_through_the_gateway_give_accuracy_per_version(
    gateway: GatewayThread, sidecar: MonitorServer
) -> None:
    rng = np.random.default_rng(0)
    http = httpclient.InferenceServerClient(gateway.http_url)
    grpc_client = grpcclient.InferenceServerClient(gateway.grpc_url)
    predicted: dict[str, tuple[int, list[int]]] = {}  # id -> (version, argmax of sum per row)
    for i in range(24):
        rid = f"fb-{i}"
        rows = 1 + i % 2
        if i % 3:
            result: Any = http.infer(MODEL, _inputs(httpclient, rows, rng), request_id=rid)
            version = int(result.get_response()["model_version"])
        else:
            result = grpc_client.infer(MODEL, _inputs(grpcclient, rows, rng), request_id=rid)
            version = int(result.get_response().model_version)
        predicted[rid] = (version, np.argmax(result.as_numpy("sum"), axis=1).tolist())

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        versions = sidecar.status(MODEL)["models"].get(MODEL, {})
        if sum(v["requests"] for v in versions.values()) == 24:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"records missing: {sidecar.status(MODEL)}")

    # Even requests labelled right, odd ones wrong; half over HTTP, half over gRPC.
    expected: dict[int, list[int]] = {}  # version -> [labelled, correct]
    labels: list[tuple[str, list[int]]] = []
    for i, (rid, (version, rows)) in enumerate(predicted.items()):
        truth = rows if i % 2 == 0 else [(p + 1) % 4 for p in rows]
        labels.append((rid, truth))
        counts = expected.setdefault(version, [0, 0])
        counts[0] += len(rows)
        counts[1] += len(rows) if i % 2 == 0 else 0
    assert len(expected) == 2, "both versions served traffic"

    status, answer = _feedback(
        gateway,
        {"labels": [{"id": rid, "label": truth} for rid, truth in labels[:12]]
         + [{"id": "never-seen", "label": 1}]},
    )  # fmt: skip
    assert status == 200, answer
    assert answer == {"matched": 12, "unmatched": 1}
    reply = _send_grpc(
        gateway, MODEL, [(rid, [float(t) for t in truth]) for rid, truth in labels[12:]]
    )
    assert (reply.matched, reply.unmatched) == (12, 0)

    models = sidecar.status(MODEL)["models"][MODEL]
    for version, (labelled, correct) in expected.items():
        accuracy = models[str(version)]["accuracy"]
        assert accuracy["labelled"] == labelled and accuracy["correct"] == correct, accuracy
        assert accuracy["ratio"] == pytest.approx(correct / labelled)

    # A label already scored is not counted twice.
    status, answer = _feedback(gateway, {"labels": [{"id": labels[0][0], "label": labels[0][1]}]})
    assert (status, answer) == (200, {"matched": 0, "unmatched": 1})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "JSON"),
        ([], "labels"),
        ({}, "'labels'"),
        ({"labels": []}, "'labels'"),
        ({"labels": ["x"]}, "'labels[0]'"),
        ({"labels": [{"label": 1}]}, "'labels[0].id'"),
        ({"labels": [{"id": "a", "label": 1}, {"id": "b"}]}, "'labels[1].label'"),
        ({"labels": [{"id": "a", "label": True}]}, "'labels[0].label'"),
        ({"labels": [{"id": "a", "label": {"x": 1}}]}, "'labels[0].label'"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(gateway: GatewayThread, body: Any, field: str) -> None:
    status, answer = _feedback(gateway, body)
    assert status == 400, answer
    assert field in answer["error"]


def test_unknown_model_and_bad_grpc_requests(gateway: GatewayThread) -> None:
    status, answer = _feedback(gateway, {"labels": [{"id": "a", "label": 1}]}, model="nope")
    assert status == 404 and "nope" in answer["error"]
    with pytest.raises(grpc.RpcError) as error:
        _send_grpc(gateway, "nope", [("a", 1.0)])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        _send_grpc(gateway, MODEL, [])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'labels'" in str(error.value.details())
    with pytest.raises(grpc.RpcError) as error:
        _send_grpc(gateway, MODEL, [("", 1.0)])
    assert "'labels[0].id'" in str(error.value.details())


def test_sidecar_down_is_503(repository: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = GatewayThread(local_settings(repository, monitor_http=f"http://127.0.0.1:{port}"))
    try:
        status, answer = _feedback(gateway, {"labels": [{"id": "a", "label": 1}]})
        assert status == 503, answer
        assert "monitor sidecar" in answer["error"] and "cannot be reached" in answer["error"]
        with pytest.raises(grpc.RpcError) as error:
            _send_grpc(gateway, MODEL, [("a", 1.0)])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # Inference is unaffected.
        with urllib.request.urlopen(f"http://{gateway.http_url}/v2/health/ready") as response:
            assert response.status == 200
    finally:
        gateway.stop()


def test_rewards_over_grpc_reach_the_sidecar(
    gateway: GatewayThread, sidecar: MonitorServer
) -> None:
    http = httpclient.InferenceServerClient(gateway.http_url)
    rng = np.random.default_rng(3)
    result: Any = http.infer(MODEL, _inputs(httpclient, 1, rng), request_id="rw-1")
    version = result.get_response()["model_version"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = _send_rewards(gateway, [("rw-1", 0.75), ("rw-unknown", 1.0)])
        if reply.matched:  # once the sidecar holds the request's record
            break
        time.sleep(0.05)
    assert (reply.matched, reply.unmatched) == (1, 1)
    reward = sidecar.status(MODEL)["models"][MODEL][version]["reward"]
    assert reward is not None and reward["n"] >= 1 and reward["mean"] == pytest.approx(0.75)


def _send_rewards(gateway: GatewayThread, rewards: list[tuple[str, float]]) -> Any:
    request = _Request(model=MODEL)
    for key, value in rewards:
        request.labels.add(id=key, reward=value)
    return _call_send_feedback(gateway, request)
