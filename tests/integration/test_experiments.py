"""A/B experiments end to end: a real gateway feeding a real sidecar, sticky arms by routing
key, accuracy and rewards fed back through the gateway, per-arm statistics with an
always-valid interval and a sample-ratio check, stop with a winner; bad input refused."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import model_zoo
import pytest
from gateways import EVENTUALLY_S, GatewayThread, local_settings, running

from monitor.server import MonitorServer
from monitor.settings import MonitorSettings

MODEL = "add_sub"
TOKEN = "e" * 24
TOKENS = [{"name": "ops", "token": TOKEN, "role": "admin"}]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GatewayThread]:
    build = model_zoo.by_version({1: model_zoo.add_sub, 2: model_zoo.add_sub_shifted})
    repo = model_zoo.write_repository(tmp_path / "models", {MODEL: (build, {}, [1, 2])})
    folder = Path(tempfile.mkdtemp(prefix="tex-"))
    sidecar = MonitorServer(
        MonitorSettings(state_dir=folder, metrics_port=0, prediction_outputs={MODEL: "sum"}),
        tick_s=0.05,
    )
    sidecar.start()
    settings = local_settings(
        repo,
        admin_tokens=TOKENS,
        monitor=True,
        monitor_address=f"unix://{sidecar.settings.socket_file()}",
        monitor_http=sidecar.url,
    )
    try:
        with running(settings) as gateway:
            yield gateway
    finally:
        sidecar.stop()
        shutil.rmtree(folder, ignore_errors=True)


def call(gateway: GatewayThread, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    host, port = gateway.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    connection.request(method, path, json.dumps(body) if body is not None else None, headers)
    reply = connection.getresponse()
    document = json.loads(reply.read())
    connection.close()
    return reply.status, document


def infer(gateway: GatewayThread, user: str, request_id: str) -> str:
    body = {
        "id": request_id,
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [3, 1, 2, 0]},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]},
        ],
    }
    host, port = gateway.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(
        "POST", f"/v2/models/{MODEL}/infer", json.dumps(body), {"x-turnout-routing-key": user}
    )
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return str(answer["model_version"])


def recorded(gateway: GatewayThread, count: int) -> None:
    """Wait until the sidecar holds ``count`` records of the model (their predictions are
    what feedback is matched against)."""
    url = f"{gateway.gateway.settings.monitor_http}/status/{MODEL}"
    deadline = time.monotonic() + EVENTUALLY_S
    while True:
        with urllib.request.urlopen(url, timeout=10) as reply:
            versions = json.loads(reply.read())["models"].get(MODEL, {})
        if sum(v["requests"] for v in versions.values()) >= count:
            return
        assert time.monotonic() < deadline, versions
        time.sleep(0.05)


def test_an_experiment_measures_each_arm_and_stops_with_a_winner(stack: GatewayThread) -> None:
    status, started = call(
        stack, "POST", f"/admin/v1/models/{MODEL}/experiment", {"arms": [1, 2], "split": [50, 50]}
    )
    assert status == 200, started
    assert (started["phase"], started["weights"]) == ("running", {"1": 50, "2": 50})
    served: dict[str, str] = {}
    labels = []
    for i in range(240):
        user = f"user-{i % 60}"
        version = infer(stack, user, f"r{i}")
        assert served.setdefault(user, version) == version  # sticky by routing key
        # The true class is 0 (a's largest feature); reward 1 when the answer is right.
        labels.append({"id": f"r{i}", "reward": 1.0 if version == "1" else 0.0})
    recorded(stack, 240)
    status, fed = call(stack, "POST", f"/v2/models/{MODEL}/feedback", {"labels": labels})
    assert status == 200 and fed["matched"] > 200, fed
    status, state = call(stack, "GET", f"/admin/v1/models/{MODEL}/experiment")
    assert status == 200 and state["metric"] == "accuracy"
    control, treatment = state["arms"]
    assert control["assigned"] + treatment["assigned"] == 240
    assert state["srm"]["decision"] == "undecided"
    call(stack, "POST", f"/admin/v1/models/{MODEL}/experiment/stop", {"winner": 1})
    # A reward experiment on the same arms reads the rewards fed from here on.
    status, rewarded = call(
        stack, "POST", f"/admin/v1/models/{MODEL}/experiment", {"arms": [1, 2], "metric": "reward"}
    )
    assert status == 200, rewarded
    labels = []
    for i in range(400):
        version = infer(stack, f"u{i}", f"w{i}")
        labels.append({"id": f"w{i}", "reward": 1.0 if version == "1" else 0.2})
    recorded(stack, 640)
    call(stack, "POST", f"/v2/models/{MODEL}/feedback", {"labels": labels})
    status, state = call(stack, "GET", f"/admin/v1/models/{MODEL}/experiment")
    control, treatment = state["arms"]
    assert control["reward"] == pytest.approx(1.0) and treatment["reward"] == pytest.approx(0.2)
    assert treatment["lift"]["decision"] == "loser"
    assert treatment["lift"]["always_valid_ci"][1] < 0
    assert state["decision"] == "control wins"
    status, stopped = call(stack, "POST", f"/admin/v1/models/{MODEL}/experiment/stop", {})
    assert (stopped["phase"], stopped["weights"], stopped["winner"]) == ("stopped", {"1": 100}, 1)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"arms": [1]}, 400, "arms"),
        ({"arms": [1, 9]}, 400, "not loaded"),
        ({"arms": [1, 2], "split": [60, 30]}, 400, "sum to 100"),
        ({"arms": [1, 2], "metric": "clicks"}, 400, "metric"),
        ({"arms": "x"}, 400, "arms"),
    ],
)
def test_bad_experiments_are_refused_naming_the_field(
    stack: GatewayThread, body: dict[str, Any], status: int, message: str
) -> None:
    got, document = call(stack, "POST", f"/admin/v1/models/{MODEL}/experiment", body)
    assert got == status and message in document["error"], document
