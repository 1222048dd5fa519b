"""Small ONNX models built with onnx.helper, and a repository writer, for the tests."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

# OIP datatype -> ONNX element type, for the identity model covering every datatype.
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def add_sub(path: Path, width: int = 4) -> None:
    """sum = a + b, diff = a - b; FP32 [batch, width]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", width])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", width])
    diff = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", width])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
    ]
    _save(helper.make_graph(nodes, "add_sub", [a, b], [total, diff]), path)


def identity_all_types(path: Path, width: int = 3) -> None:
    """One input ``in_<DT>`` and one output ``out_<DT>`` per OIP datatype but BYTES."""
    inputs, outputs, nodes = [], [], []
    for name, elem in ONNX_TYPES.items():
        if name == "BYTES":
            continue
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", width]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", width]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    _save(helper.make_graph(nodes, "identity_all", inputs, outputs), path)


def strings(path: Path) -> None:
    """BYTES [batch, 2] -> the same strings (ONNX Runtime string tensors end to end)."""
    x = helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])
    y = helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 2])
    node = helper.make_node("Identity", ["text"], ["echo"])
    _save(helper.make_graph([node], "strings", [x], [y]), path)


def fixed_shape(path: Path) -> None:
    """Not batchable: Relu over FP32 [2, 3] exactly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed", [x], [y]), path)


def mlp(path: Path, features: int = 16, hidden: int = 32, classes: int = 3, seed: int = 0) -> None:
    """A small ReLU MLP, FP32 [batch, features] -> [batch, classes], seeded weights."""
    rng = np.random.default_rng(seed)
    sizes = [features, hidden, hidden, classes]
    inits, nodes, current = [], [], "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        out = "output" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}" if out != "output" else out])
        )
        if out != "output":
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        current = out
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])
    _save(helper.make_graph(nodes, "mlp", [x], [y], initializer=inits), path)


def slow(path: Path, width: int = 512, depth: int = 400) -> None:
    """FP32 [batch, width] through ``depth`` MatMuls sharing one weight: milliseconds per row."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, current = [], "x"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, "w"], [out]))
        current = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph(
        nodes, "slow", [x], [y], initializer=[numpy_helper.from_array(w, "w")]
    )
    _save(graph, path)


def write_repository(root: Path, models: dict[str, tuple[Any, dict[str, Any], list[int]]]) -> Path:
    """``models``: name -> (builder, config.yaml contents, versions)."""
    for name, (builder, config, versions) in models.items():
        for version in versions:
            builder(root / name / str(version) / "model.onnx")
        if config:
            (root / name / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def standard_repository(root: Path) -> Path:
    return write_repository(
        root,
        {
            "add_sub": (add_sub, {"max_batch_size": 8, "max_queue_delay_us": 2000}, [1, 2]),
            "identity": (identity_all_types, {"max_batch_size": 16}, [1]),
            "strings": (strings, {"max_batch_size": 16}, [1]),
            "fixed": (fixed_shape, {}, [1]),
            "mlp": (mlp, {"max_batch_size": 32, "max_queue_delay_us": 2000}, [1]),
            "slow": (
                slow,
                # A slow model on a worker (``inline_max_us: 0``), 5-6 ms a row: longer than
                # a deadline timer's granularity (about a millisecond on either side), so a
                # call queued behind another always outlives a tiny deadline.
                {
                    "max_batch_size": 1,
                    "max_queue_size": 2,
                    "max_inflight_batches": 1,
                    "inline_max_us": 0,
                },
                [1],
            ),
        },
    )


def add_sub_shifted(path: Path, width: int = 4) -> None:
    """Like add_sub, but sum = a + b + 1: a version that answers differently."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", width])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", width])
    diff = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", width])
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    nodes = [
        helper.make_node("Add", ["a", "b"], ["plain"]),
        helper.make_node("Add", ["plain", "one"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
    ]
    graph = helper.make_graph(nodes, "add_sub_shifted", [a, b], [total, diff], [one])
    _save(graph, path)


def add_sub_flaky(path: Path, width: int = 4, table: int = 10) -> None:
    """Like add_sub, but ONNX Runtime fails on inputs whose a[:, 0] is 10 or more: a
    real broken model (a Gather whose index comes from the input runs out of bounds)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", width])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", width])
    diff = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", width])
    initializers = [
        numpy_helper.from_array(np.zeros((table,), np.float32), "table"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([1], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("Slice", ["a", "start", "end", "axis"], ["first"]),
        helper.make_node("Floor", ["first"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["looked_up"], axis=0),
        helper.make_node("Add", ["a", "b"], ["plain"]),
        helper.make_node("Add", ["plain", "looked_up"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
    ]
    graph = helper.make_graph(nodes, "add_sub_flaky", [a, b], [total, diff], initializers)
    _save(graph, path)


def by_version(builders: dict[int, Any]) -> Any:
    """A repository builder that picks the model by the version directory it writes."""

    def build(path: Path) -> None:
        builders[int(path.parent.name)](path)

    return build
