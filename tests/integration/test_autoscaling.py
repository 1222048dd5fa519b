"""Autoscaling on a real gateway (local backend: the replicas are ONNX Runtime sessions):
load makes it scale up, quiet makes it scale down and then to zero, and the first request
after that is answered once a replica has started, counted as a cold start."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings, until
from model_zoo import mlp, write_repository

from gateway.models import LoadedModel

SCALING = {
    "min_replicas": 0,
    "max_replicas": 2,
    # A target no single session meets under load from 16 threads: it must ask for two.
    "target_queue_delay_ms": 0.01,
    "window_s": 2.0,
    "scale_up_cooldown_s": 0.0,
    "scale_down_delay_s": 1.0,
    "scale_to_zero_after_s": 3.0,
}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    repository = write_repository(
        tmp_path, {"mlp": (mlp, {"max_batch_size": 8, "autoscaling": SCALING}, [1])}
    )
    server = GatewayThread(local_settings(repository))
    yield server
    server.stop()


def _infer(server: GatewayThread) -> list[int]:
    client = httpclient.InferenceServerClient(server.http_url)
    x = httpclient.InferInput("input", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    shape: list[int] = list(client.infer("mlp", [x]).as_numpy("output").shape)
    return shape


def _metric(server: GatewayThread, name: str) -> float | None:
    url = f"http://{server.http_url}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + "{") and 'model="mlp"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_load_scales_up_quiet_scales_down_to_zero_and_a_request_starts_it(
    gateway: GatewayThread,
) -> None:
    loaded: LoadedModel = gateway.gateway.models.get("mlp")
    scaler = gateway.gateway.autoscaler
    stop = threading.Event()
    failures: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                _infer(gateway)
            except BaseException as exc:  # every request must succeed while it scales
                failures.append(exc)
                return

    workers = [threading.Thread(target=hammer) for _ in range(16)]
    for worker in workers:
        worker.start()
    try:
        until(lambda: loaded.replicas == 2, "a scale-up to 2 under load")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == []
    until(lambda: scaler.decisions[("mlp", 1, "up")] >= 1, "the scale-up counted")
    assert _metric(gateway, "turnout_replicas") == 2
    until(lambda: loaded.replicas == 0, "a scale-down to zero once quiet")
    until(lambda: scaler.decisions[("mlp", 1, "down")] >= 1, "the scale-down counted")
    assert _metric(gateway, "turnout_replicas") == 0
    assert loaded.cold_starts == 0

    assert _infer(gateway) == [1, 3]  # waits at the gateway while a session starts
    assert loaded.replicas == 1
    assert loaded.cold_starts == 1
    assert _metric(gateway, "turnout_cold_starts_total") == 1
    started = _metric(gateway, "turnout_cold_start_seconds")
    assert started is not None and started > 0
