"""Replicas on two Ray nodes (ray.cluster_utils.Cluster simulates them on one machine):
the gateway joins the cluster, and both nodes' replicas serve batches."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings
from model_zoo import mlp, write_repository

from gateway.backends.ray_serve import RayBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace="turnout", log_to_driver=False)
    yield nodes
    # Not serve.shutdown(): the gateway's handles lived on its event loop, closed by now;
    # the Serve controller goes with the cluster.
    ray.shutdown()
    nodes.shutdown()


def test_replicas_on_both_nodes_serve(cluster: Any, tmp_path: Path) -> None:
    # One CPU per node and one CPU per replica: two replicas must land on two nodes.
    repository = write_repository(
        tmp_path,
        {
            "mlp": (
                mlp,
                {"max_batch_size": 4, "num_replicas": 2, "num_cpus": 1, "max_inflight_batches": 1},
                [1],
            )
        },
    )
    backend = RayBackend(address=cluster.address)
    server = GatewayThread(local_settings(repository, backend="ray"), backend=backend)
    try:
        x = np.ones((1, 16), np.float32)

        def call(_: int) -> tuple[int, ...]:
            # One client per call: tritonclient's HTTP client is not thread-safe.
            client = httpclient.InferenceServerClient(server.http_url)
            tensor = httpclient.InferInput("input", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            shape: tuple[int, ...] = client.infer("mlp", [tensor]).as_numpy("output").shape
            return shape

        with ThreadPoolExecutor(16) as pool:
            shapes = list(pool.map(call, range(200)))
        assert shapes == [(1, 3)] * 200
        nodes = {replica.split("/")[0] for replica in backend.batches_by_replica}
        assert len(nodes) == 2, f"batches were served only by {backend.batches_by_replica}"
    finally:
        server.stop()
