"""The Ray backend end to end: a local Ray started by the gateway, Ray Serve replicas running
ONNX Runtime, real clients; outputs compared with ONNX Runtime called directly."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings
from model_zoo import add_sub, mlp, strings, write_repository


@pytest.fixture(scope="module")
def ray_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(
        tmp_path_factory.mktemp("ray-models"),
        {
            "mlp": (mlp, {"max_batch_size": 32, "max_queue_delay_us": 2000}, [1]),
            "add_sub": (add_sub, {"max_batch_size": 8}, [1, 2]),
            "strings": (strings, {"max_batch_size": 4}, [1]),
        },
    )


@pytest.fixture(scope="module")
def ray_gateway(ray_repository: Path) -> Iterator[GatewayThread]:
    server = GatewayThread(local_settings(ray_repository, backend="ray"))
    yield server
    server.stop()
    import ray

    assert not ray.is_initialized(), "the gateway started Ray, so it must stop it"


def test_metadata_reports_the_ray_backend(ray_gateway: GatewayThread) -> None:
    client = httpclient.InferenceServerClient(ray_gateway.http_url)
    assert client.is_server_ready()
    meta = client.get_model_metadata("add_sub")
    assert meta["versions"] == ["1", "2"]
    assert meta["properties"]["backend"] == "ray"


def test_concurrent_requests_match_onnxruntime(
    ray_gateway: GatewayThread, ray_repository: Path
) -> None:
    rng = np.random.default_rng(5)
    payloads = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(64)]
    session = ort.InferenceSession(str(ray_repository / "mlp/1/model.onnx"))

    def call(index: int) -> np.ndarray[Any, Any]:
        x = payloads[index]
        if index % 2:
            client: Any = grpcclient.InferenceServerClient(ray_gateway.grpc_url)
            tensor: Any = grpcclient.InferInput("input", [1, 16], "FP32")
        else:
            client = httpclient.InferenceServerClient(ray_gateway.http_url)
            tensor = httpclient.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result: np.ndarray[Any, Any] = client.infer("mlp", [tensor]).as_numpy("output")
        return result

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(len(payloads))))
    for x, got in zip(payloads, results, strict=True):
        (expected,) = session.run(["output"], {"input": x})
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    stats = ray_gateway.gateway.models.get("mlp").batcher.stats
    assert stats.inference_count >= len(payloads)
    assert stats.execution_count < stats.inference_count, "no two requests shared a Ray call"


def test_versions_and_strings_on_ray(ray_gateway: GatewayThread) -> None:
    client = grpcclient.InferenceServerClient(ray_gateway.grpc_url)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = []
    for name in ("a", "b"):
        tensor = grpcclient.InferInput(name, [2, 4], "FP32")
        tensor.set_data_from_numpy(a)
        inputs.append(tensor)
    for version in ("1", "2"):
        result = client.infer("add_sub", inputs, model_version=version)
        np.testing.assert_array_equal(result.as_numpy("sum"), a * 2)
        assert result.get_response().model_version == version
    words = np.array([[b"ray", b"serve"]], dtype=np.object_)
    tensor = grpcclient.InferInput("text", [1, 2], "BYTES")
    tensor.set_data_from_numpy(words)
    assert client.infer("strings", [tensor]).as_numpy("echo").tolist() == words.tolist()


def test_batches_take_the_replicas_socket_and_bytes_take_serve(ray_gateway: GatewayThread) -> None:
    backend = ray_gateway.gateway.models.backend
    client = httpclient.InferenceServerClient(ray_gateway.http_url)
    x = httpclient.InferInput("input", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    before, served = backend.channel_batches, sum(backend.batches_by_replica.values())
    for _ in range(5):
        client.infer("mlp", [x])
    assert backend.channel_batches == before + 5
    words = httpclient.InferInput("text", [1, 2], "BYTES")
    words.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    client.infer("strings", [words])  # Python objects: pickled through a Serve handle
    assert backend.channel_batches == before + 5
    assert sum(backend.batches_by_replica.values()) == served + 6


def test_bad_input_leaves_ray_replicas_serving(ray_gateway: GatewayThread) -> None:
    client = httpclient.InferenceServerClient(ray_gateway.http_url)
    bad = httpclient.InferInput("input", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
    with pytest.raises(Exception, match="dimension 1 is 15"):
        client.infer("mlp", [bad])
    good = httpclient.InferInput("input", [1, 16], "FP32")
    good.set_data_from_numpy(np.zeros((1, 16), np.float32))
    assert client.infer("mlp", [good]).as_numpy("output").shape == (1, 3)
