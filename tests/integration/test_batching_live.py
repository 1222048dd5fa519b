"""Dynamic batching through the real servers: concurrent requests share backend calls and
every caller still gets exactly its own rows, equal to ONNX Runtime on those rows."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateways import GatewayThread


def stats(server: GatewayThread, model: str) -> dict[str, Any]:
    url = f"http://{server.http_url}/v2/models/{model}/versions/1/stats"
    with urllib.request.urlopen(url, timeout=10) as reply:
        result: dict[str, Any] = json.load(reply)["model_stats"][0]
    return result


def test_concurrent_requests_are_batched_and_split_back(
    local_gateway: GatewayThread, repository: Path
) -> None:
    rng = np.random.default_rng(11)
    payloads = [
        rng.standard_normal((int(rng.integers(1, 4)), 16)).astype(np.float32) for _ in range(96)
    ]
    session = ort.InferenceSession(str(repository / "mlp/1/model.onnx"))
    before = stats(local_gateway, "mlp")

    def call(index: int) -> tuple[int, np.ndarray[Any, Any]]:
        x = payloads[index]
        if index % 2:
            client: Any = grpcclient.InferenceServerClient(local_gateway.grpc_url)
            tensor: Any = grpcclient.InferInput("input", list(x.shape), "FP32")
        else:
            client = httpclient.InferenceServerClient(local_gateway.http_url)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return index, client.infer("mlp", [tensor]).as_numpy("output")

    with ThreadPoolExecutor(32) as pool:
        results = dict(pool.map(call, range(len(payloads))))

    for index, x in enumerate(payloads):
        (expected,) = session.run(["output"], {"input": x})
        np.testing.assert_allclose(results[index], expected, rtol=1e-5, atol=1e-6)
    after = stats(local_gateway, "mlp")
    rows = after["inference_count"] - before["inference_count"]
    calls = after["execution_count"] - before["execution_count"]
    assert rows == sum(len(x) for x in payloads)
    assert calls < len(payloads), "32 concurrent callers never shared a backend call"
    assert max(s["batch_size"] for s in after["batch_stats"]) <= 32


def test_non_batchable_model_serves_one_request_per_call(local_gateway: GatewayThread) -> None:
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)

    def call(_: int) -> np.ndarray[Any, Any]:
        # One client per call: tritonclient's HTTP client is not safe to share across threads.
        client = httpclient.InferenceServerClient(local_gateway.http_url)
        tensor = httpclient.InferInput("x", [2, 3], "FP32")
        tensor.set_data_from_numpy(x)
        result: np.ndarray[Any, Any] = client.infer("fixed", [tensor]).as_numpy("y")
        return result

    before = stats(local_gateway, "fixed")
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(call, range(8)))
    for y in outputs:
        np.testing.assert_array_equal(y, np.maximum(x, 0))
    after = stats(local_gateway, "fixed")
    assert after["execution_count"] - before["execution_count"] == 8
    meta = httpclient.InferenceServerClient(local_gateway.http_url).get_model_metadata("fixed")
    assert meta["properties"]["max_batch_size"] == "0"
