"""Real clients against a real gateway (local backend): tritonclient over gRPC, HTTP binary
and HTTP JSON; every output is compared with ONNX Runtime called directly on the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateways import GatewayThread

PROTOCOLS = ["grpc", "http-binary", "http-json"]


def client_for(protocol: str, server: GatewayThread) -> Any:
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(server.grpc_url)
    return httpclient.InferenceServerClient(server.http_url, concurrency=8)


def make_input(protocol: str, name: str, array: np.ndarray[Any, Any], datatype: str) -> Any:
    module = grpcclient if protocol == "grpc" else httpclient
    tensor = module.InferInput(name, list(array.shape), datatype)
    if protocol == "grpc":
        tensor.set_data_from_numpy(array)
    else:
        # tritonclient sends BF16 only in binary, even in an otherwise JSON request.
        tensor.set_data_from_numpy(
            array, binary_data=protocol == "http-binary" or datatype == "BF16"
        )
    return tensor


def requested(protocol: str, names: list[str]) -> list[Any]:
    if protocol == "grpc":
        return [grpcclient.InferRequestedOutput(n) for n in names]
    binary = protocol == "http-binary"
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]


def ort_reference(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_server_metadata(local_gateway: GatewayThread, protocol: str) -> None:
    client = client_for(protocol, local_gateway)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    if protocol == "grpc":
        name, extensions = meta.name, list(meta.extensions)
    else:
        name, extensions = meta["name"], meta["extensions"]
    assert name == "turnout"
    assert "binary_tensor_data" in extensions
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")


@pytest.mark.parametrize("protocol", ["grpc", "http-json"])
def test_model_metadata(local_gateway: GatewayThread, protocol: str) -> None:
    client = client_for(protocol, local_gateway)
    meta = client.get_model_metadata("add_sub")
    if protocol == "grpc":
        versions = list(meta.versions)
        inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
        platform = meta.platform
    else:
        versions = meta["versions"]
        inputs = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
        platform = meta["platform"]
    assert versions == ["1", "2"]
    assert platform == "onnxruntime_onnx"
    assert inputs == [("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 4])]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_add_sub_matches_onnxruntime(
    local_gateway: GatewayThread, repository: Path, protocol: str
) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    client = client_for(protocol, local_gateway)
    result = client.infer(
        "add_sub",
        [make_input(protocol, "a", a, "FP32"), make_input(protocol, "b", b, "FP32")],
        outputs=requested(protocol, ["sum", "diff"]),
        request_id="req-42",
    )
    expected = ort_reference(repository / "add_sub/2/model.onnx", {"a": a, "b": b})
    np.testing.assert_array_equal(result.as_numpy("sum"), expected["sum"])
    np.testing.assert_array_equal(result.as_numpy("diff"), expected["diff"])
    response = result.get_response()
    if protocol == "grpc":
        assert (response.model_version, response.id) == ("2", "req-42")
    else:
        assert (response["model_version"], response["id"]) == ("2", "req-42")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_explicit_version_and_output_subset(local_gateway: GatewayThread, protocol: str) -> None:
    a = np.ones((1, 4), np.float32)
    client = client_for(protocol, local_gateway)
    result = client.infer(
        "add_sub",
        [make_input(protocol, "a", a, "FP32"), make_input(protocol, "b", a * 2, "FP32")],
        model_version="1",
        outputs=requested(protocol, ["diff"]),
    )
    np.testing.assert_array_equal(result.as_numpy("diff"), -a)
    assert result.as_numpy("sum") is None
    version = (
        result.get_response().model_version
        if protocol == "grpc"
        else (result.get_response()["model_version"])
    )
    assert version == "1"


def _all_types_feeds(rows: int) -> dict[str, tuple[np.ndarray[Any, Any], str]]:
    rng = np.random.default_rng(3)
    feeds: dict[str, tuple[np.ndarray[Any, Any], str]] = {}
    for dt, dtype in [
        ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16),
        ("INT32", np.int32), ("INT64", np.int64),
    ]:  # fmt: skip
        info = np.iinfo(dtype)
        feeds[dt] = (rng.integers(info.min, info.max, (rows, 3), dtype=dtype, endpoint=True), dt)
    feeds["BOOL"] = (rng.integers(0, 2, (rows, 3)).astype(bool), "BOOL")
    feeds["FP16"] = (rng.standard_normal((rows, 3)).astype(np.float16), "FP16")
    feeds["FP32"] = (rng.standard_normal((rows, 3)).astype(np.float32), "FP32")
    feeds["FP64"] = (rng.standard_normal((rows, 3)), "FP64")
    bf16 = (rng.integers(-64, 64, (rows, 3)) / 2).astype(ml_dtypes.bfloat16)
    feeds["BF16"] = (bf16, "BF16")
    return feeds


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_datatype_round_trips(local_gateway: GatewayThread, protocol: str) -> None:
    feeds = _all_types_feeds(rows=2)
    client = client_for(protocol, local_gateway)
    inputs = [make_input(protocol, f"in_{dt}", arr, dt) for dt, (arr, _) in feeds.items()]
    result = client.infer(
        "identity", inputs, outputs=requested(protocol, [f"out_{dt}" for dt in feeds])
    )
    for dt, (arr, _) in feeds.items():
        np.testing.assert_array_equal(result.as_numpy(f"out_{dt}"), arr, err_msg=dt)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytes_round_trip(local_gateway: GatewayThread, protocol: str) -> None:
    words = np.array([[b"alpha", "\u00e9t\u00e9".encode()], [b"", b"x" * 300]], dtype=np.object_)
    client = client_for(protocol, local_gateway)
    result = client.infer(
        "strings",
        [make_input(protocol, "text", words, "BYTES")],
        outputs=requested(protocol, ["echo"]),
    )
    echoed = result.as_numpy("echo")
    # tritonclient returns JSON strings as str, binary ones as bytes.
    assert [[v if isinstance(v, bytes) else v.encode() for v in row] for row in echoed] == (
        words.tolist()
    )
