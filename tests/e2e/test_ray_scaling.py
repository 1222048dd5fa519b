"""Scaling a version's Serve replicas in place on a real local Ray: up and down keep the
replicas that serve (Serve sees a change of count, not of code), zero deletes the
application, and the next request starts it again while it waits at the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings, until
from model_zoo import add_sub, write_repository
from test_ray_capacity import replica_processes

from gateway.backends.channel import channel_dir
from gateway.models import LoadedModel

# The autoscaler stays out of the way: these tests scale by hand through the model table.
SCALING = {"min_replicas": 0, "max_replicas": 2, "scale_to_zero_after_s": 3600}
REPLICAS = "ServeReplica:turnout-add_sub-v1"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    import ray

    repository = write_repository(
        tmp_path_factory.mktemp("ray-scaling"),
        {"add_sub": (add_sub, {"max_batch_size": 4, "autoscaling": SCALING}, [1])},
    )
    ray.init(num_cpus=2, include_dashboard=False)
    server = GatewayThread(local_settings(repository, backend="ray"))
    yield server
    server.stop()
    ray.shutdown()


def _add(server: GatewayThread) -> list[list[float]]:
    client = httpclient.InferenceServerClient(server.http_url)
    inputs = [httpclient.InferInput(n, [1, 4], "FP32") for n in ("a", "b")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    result: list[list[float]] = client.infer("add_sub", inputs).as_numpy("sum").tolist()
    return result


def test_scaling_up_and_down_keeps_the_serving_replicas(gateway: GatewayThread) -> None:
    loaded: LoadedModel = gateway.gateway.models.get("add_sub")
    backend = gateway.gateway.models.backend
    (first,) = replica_processes(REPLICAS)
    gateway.call(gateway.gateway.models.scale(loaded, 2))
    assert loaded.replicas == 2
    until(lambda: len(replica_processes(REPLICAS)) == 2, "a second replica")
    assert first in replica_processes(REPLICAS)  # kept, not replaced
    (second,) = set(replica_processes(REPLICAS)) - {first}
    sockets = channel_dir("turnout", "turnout-add_sub-v1")
    until(lambda: (sockets / f"{second}.sock").exists(), "the new replica's socket")

    def served_by_both() -> bool:
        assert _add(gateway) == [[2.0] * 4]
        pids = {key.rsplit("/", 1)[1] for key in backend.batches_by_replica}
        return {str(first), str(second)} <= pids

    until(served_by_both, "batches on both replicas")
    assert backend._reserved["add_sub/1"]["CPU"] == pytest.approx(0.5)

    gateway.call(gateway.gateway.models.scale(loaded, 1))
    until(lambda: len(replica_processes(REPLICAS)) == 1, "one replica stopped")
    assert replica_processes(REPLICAS)[0] in (first, second)
    assert _add(gateway) == [[2.0] * 4]
    assert backend._reserved["add_sub/1"]["CPU"] == pytest.approx(0.25)


def test_zero_deletes_the_application_and_a_request_starts_it(gateway: GatewayThread) -> None:
    from ray import serve

    loaded: LoadedModel = gateway.gateway.models.get("add_sub")
    gateway.call(gateway.gateway.models.scale(loaded, 0))
    assert loaded.replicas == 0
    assert "turnout-add_sub-v1" not in serve.status().applications
    until(lambda: not replica_processes(REPLICAS), "the replicas gone")
    assert "add_sub/1" not in gateway.gateway.models.backend._reserved

    assert _add(gateway) == [[2.0] * 4]  # waited at the gateway for a cold start
    assert loaded.replicas == 1
    assert loaded.cold_starts == 1
    assert loaded.cold_start_s > 0
    assert len(replica_processes(REPLICAS)) == 1
