"""One ONNX Runtime session: provider choice, and BYTES/BF16 runs against ONNX Runtime direct."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import model_zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gateway.backends._onnx import OnnxSession, select_providers
from gateway.codecs import DATATYPES
from gateway.errors import BackendError, InvalidInput

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
BF16 = np.dtype(ml_dtypes.bfloat16)
_ONNX_BFLOAT16 = 16


# -- providers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("cpu", [CPU], [CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
        ("cuda", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(device: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(device, available=available) == expected


def test_cuda_without_cuda_is_an_error() -> None:
    with pytest.raises(BackendError) as caught:
        select_providers("cuda", available=["AzureExecutionProvider", CPU])
    message = str(caught.value)
    assert "no CUDAExecutionProvider" in message
    assert "(available: AzureExecutionProvider, CPUExecutionProvider)" in message


def test_providers_of_this_machine() -> None:
    assert select_providers("auto") == ([CUDA, CPU] if HAS_CUDA else [CPU])
    assert select_providers("cpu") == [CPU]
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            select_providers("cuda")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_session_with_cuda_fails_at_load(tmp_path: Path) -> None:
    model_zoo.add_sub(tmp_path / "model.onnx")
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        OnnxSession(str(tmp_path / "model.onnx"), device="cuda")


# -- runs -------------------------------------------------------------------------------------


def reference_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=[CPU])


def sample(datatype: str, rows: int, width: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    dtype = DATATYPES[datatype].dtype
    if datatype == "BOOL":
        return rng.random((rows, width)) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, (rows, width), dtype=dtype, endpoint=True)
    return (rng.standard_normal((rows, width)) * 100).astype(dtype)


def test_identity_of_every_datatype_matches_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "identity.onnx"
    model_zoo.identity_all_types(path, width=3)
    rng = np.random.default_rng(7)
    datatypes = [d for d in model_zoo.ONNX_TYPES if d != "BYTES"]
    inputs = {f"in_{d}": sample(d, 4, 3, rng) for d in datatypes}

    session = OnnxSession(str(path))
    assert (session.device, session.providers) == ("cpu", [CPU])
    got = session.run(inputs)
    assert list(got) == [f"out_{d}" for d in datatypes]

    # ONNX Runtime direct, handed BF16 as bits with its type, as it requires.
    reference = reference_session(path)
    feed = {
        name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), _ONNX_BFLOAT16)
        if value.dtype == BF16
        else ort.OrtValue.ortvalue_from_numpy(value)
        for name, value in inputs.items()
    }
    names = [f"out_{d}" for d in datatypes if d != "BF16"]
    expected = dict(zip(names, reference.run_with_ort_values(names, feed), strict=True))
    for name in names:
        want = expected[name].numpy()
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)
    assert got["out_BF16"].dtype == BF16
    assert got["out_BF16"].shape == (4, 3)
    np.testing.assert_array_equal(
        got["out_BF16"].view(np.uint16), inputs["in_BF16"].view(np.uint16)
    )


def _bf16_model(path: Path) -> None:
    """x BF16 -> (float32 copy, 2x in BF16): BF16 in and out around a real computation."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 4])
    as_f32 = helper.make_tensor_value_info("as_f32", TensorProto.FLOAT, ["batch", 4])
    doubled = helper.make_tensor_value_info("doubled", TensorProto.BFLOAT16, ["batch", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Cast", ["x"], ["as_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_f32", "two"], ["times2"]),
        helper.make_node("Cast", ["times2"], ["doubled"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(nodes, "bf16", [x], [as_f32, doubled], initializer=[two])
    model = helper.make_model(graph, opset_imports=model_zoo.OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_bf16_computation_matches_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "bf16.onnx"
    _bf16_model(path)
    x = np.array([[0.5, -1.25, 1.0e38, 1e-3], [7.0, -0.0, 255.0, 1.0 / 3.0]], dtype=BF16)
    got = OnnxSession(str(path)).run({"x": x})

    reference = reference_session(path)
    feed = {"x": ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(np.uint16), _ONNX_BFLOAT16)}
    (as_f32,) = reference.run_with_ort_values(["as_f32"], feed)
    np.testing.assert_array_equal(got["as_f32"], as_f32.numpy())
    np.testing.assert_array_equal(got["as_f32"], x.astype(np.float32))
    assert got["doubled"].dtype == BF16
    np.testing.assert_array_equal(
        got["doubled"].view(np.uint16), (x.astype(np.float32) * 2).astype(BF16).view(np.uint16)
    )


def test_bytes_run_matches_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "strings.onnx"
    model_zoo.strings(path)
    text = np.array([[b"hello", b""], ["h\u00e9".encode(), b"x" * 1000]], dtype=np.object_)
    got = OnnxSession(str(path)).run({"text": text})

    expected = reference_session(path).run(
        ["echo"], {"text": np.array([["hello", ""], ["h\u00e9", "x" * 1000]], dtype=np.object_)}
    )[0]
    assert got["echo"].shape == (2, 2)
    assert got["echo"].tolist() == expected.tolist() == [["hello", ""], ["h\u00e9", "x" * 1000]]


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "strings.onnx"
    model_zoo.strings(path)
    text = np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_)
    with pytest.raises(InvalidInput, match="input 'text': BYTES element is not valid UTF-8"):
        OnnxSession(str(path)).run({"text": text})


def test_mlp_matches_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    model_zoo.mlp(path)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    got = OnnxSession(str(path)).run({"input": x})
    (expected,) = reference_session(path).run(["output"], {"input": x})
    assert got["output"].shape == (5, 3)
    np.testing.assert_array_equal(got["output"], expected)


def test_runtime_failure_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    model_zoo.fixed_shape(path)
    session = OnnxSession(str(path))
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x})["y"], np.maximum(x, 0))
    with pytest.raises(BackendError, match="ONNX Runtime failed: "):
        session.run({"x": np.zeros((3, 3), dtype=np.float32)})
