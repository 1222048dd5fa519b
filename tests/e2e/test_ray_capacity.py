"""Ray placement, bounded: a small repository fits a small machine with default settings;
replicas that cannot fit are refused before Ray is asked; a load whose replicas do not start
in time fails with a message naming the model, the resources asked and the resources free,
and leaves nothing behind. A real local Ray started by the gateway (2 CPUs in CI)."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings
from model_zoo import add_sub, write_repository

from gateway.backends.channel import channel_dir
from gateway.errors import BackendError

VERSIONS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(
        tmp_path_factory.mktemp("ray-capacity"),
        {"add_sub": (add_sub, {"max_batch_size": 4}, VERSIONS)},
    )


@pytest.fixture(scope="module")
def gateway(repository: Path) -> Iterator[GatewayThread]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)  # the machine the issue was found on
    server = GatewayThread(local_settings(repository, backend="ray"))
    yield server
    server.stop()
    ray.shutdown()


def test_five_versions_with_default_settings_load_on_two_cpus(gateway: GatewayThread) -> None:
    client = httpclient.InferenceServerClient(gateway.http_url)
    assert client.is_server_ready()
    for version in VERSIONS:
        a = np.ones((1, 4), np.float32)
        inputs = [httpclient.InferInput(n, [1, 4], "FP32") for n in ("a", "b")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        result = client.infer("add_sub", inputs, model_version=str(version))
        assert result.as_numpy("sum").tolist() == [[2.0] * 4]
    backend = gateway.gateway.models.backend
    assert sum(r["CPU"] for r in backend._reserved.values()) == pytest.approx(1.25)


def test_a_second_gateway_shares_the_applications_and_stopping_it_takes_none_away(
    gateway: GatewayThread, repository: Path
) -> None:
    second = GatewayThread(local_settings(repository, backend="ray"))
    try:
        # All five versions already run: loading them again needs no free CPU.
        assert httpclient.InferenceServerClient(second.http_url).is_server_ready()
        assert _add(second, 5) == [[2.0] * 4]
    finally:
        second.stop()
    for version in VERSIONS:
        assert _add(gateway, version) == [[2.0] * 4]


def _add(server: GatewayThread, version: int) -> list[list[float]]:
    client = httpclient.InferenceServerClient(server.http_url)
    inputs = [httpclient.InferInput(n, [1, 4], "FP32") for n in ("a", "b")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    result: list[list[float]] = (
        client.infer("add_sub", inputs, model_version=str(version)).as_numpy("sum").tolist()
    )
    return result


def test_replicas_that_cannot_fit_are_refused_before_ray_is_asked(
    gateway: GatewayThread, repository: Path
) -> None:
    add_sub(repository / "add_sub" / "6" / "model.onnx")
    spec = gateway.gateway.models.repository.read("add_sub", 6)
    greedy = dataclasses.replace(spec, config=spec.config.model_copy(update={"num_cpus": 1.0}))
    with pytest.raises(BackendError) as refused:
        gateway.call(gateway.gateway.models.load(greedy))
    message = str(refused.value)
    assert "model 'add_sub/6' needs 1 CPU for 1 replica(s)" in message
    assert "0.75 CPU free of 2 CPU" in message  # 5 x 0.25 already asked for
    assert "add_sub/6" not in gateway.gateway.models.backend._reserved


def test_a_load_that_does_not_start_in_time_fails_and_leaves_nothing(
    gateway: GatewayThread, repository: Path
) -> None:
    from ray import serve

    add_sub(repository / "add_sub" / "7" / "model.onnx")
    spec = gateway.gateway.models.repository.read("add_sub", 7)
    backend = gateway.gateway.models.backend
    backend.load_timeout_s = 0.2  # a replica takes seconds to start: this one cannot make it
    try:
        with pytest.raises(BackendError) as failed:
            gateway.call(gateway.gateway.models.load(spec))
    finally:
        backend.load_timeout_s = 120.0
    message = str(failed.value)
    assert "model 'add_sub/7': its 1 Ray replica(s) did not start within 0.2 s" in message
    assert "they ask 0.25 CPU" in message and "free of 2 CPU" in message
    assert "add_sub/7" not in backend._reserved
    assert 7 not in gateway.gateway.models.versions["add_sub"]
    gateway.call(gateway.gateway.models.load(spec))  # with time enough, the same load works
    assert "turnout-add_sub-v7" in serve.status().applications
    gateway.call(gateway.gateway.models.unload("add_sub", 7))


def test_a_replica_killed_under_load_fails_no_request(
    gateway: GatewayThread, repository: Path
) -> None:
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    add_sub(repository / "add_sub" / "8" / "model.onnx")
    spec = gateway.gateway.models.repository.read("add_sub", 8)
    pair = spec.config.model_copy(update={"num_replicas": 2, "num_cpus": 0.1})
    gateway.call(gateway.gateway.models.load(dataclasses.replace(spec, config=pair)))
    replicas = replica_processes("ServeReplica:turnout-add_sub-v8")
    assert len(replicas) == 2
    backend = gateway.gateway.models.backend
    sockets = channel_dir("turnout", "turnout-add_sub-v8")
    assert sorted(int(p.stem) for p in sockets.glob("*.sock")) == replicas
    sent = backend.channel_batches

    def call(index: int) -> list[list[float]]:
        client = httpclient.InferenceServerClient(gateway.http_url)
        a = np.full((1, 4), float(index), np.float32)
        inputs = [httpclient.InferInput(n, [1, 4], "FP32") for n in ("a", "b")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        answer: list[list[float]] = (
            client.infer("add_sub", inputs, model_version="8").as_numpy("sum").tolist()
        )
        return answer

    try:
        with ThreadPoolExecutor(8) as pool:
            first = [pool.submit(call, i) for i in range(200)]
            os.kill(replicas[0], signal.SIGKILL)  # while those are in flight
            later = [pool.submit(call, i) for i in range(200, 400)]
            answers = [f.result() for f in first + later]  # any failure raises here
        assert answers == [[[2.0 * i] * 4] for i in range(400)]
        assert backend.channel_batches > sent  # over the replicas' sockets, not Serve
        # Serve starts a replacement, which opens its socket; the gateway finds it.
        deadline = time.monotonic() + 120
        while len(replica_processes("ServeReplica:turnout-add_sub-v8")) < 2:
            assert time.monotonic() < deadline, "Serve did not replace the killed replica"
            time.sleep(0.5)
        (replacement,) = set(replica_processes("ServeReplica:turnout-add_sub-v8")) - {replicas[1]}
        while not (sockets / f"{replacement}.sock").exists():
            assert time.monotonic() < deadline, "the replacement opened no socket"
            time.sleep(0.2)
        served_by = collections.Counter[str]()
        while not any(key.endswith(f"/{replacement}") for key in served_by):
            assert time.monotonic() < deadline, f"the replacement served nothing: {served_by}"
            call(0)
            served_by = backend.batches_by_replica
    finally:
        gateway.call(gateway.gateway.models.unload("add_sub", 8))


def replica_processes(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if fragment in cmdline:
                found.append(int(entry.name))
    return sorted(found)
