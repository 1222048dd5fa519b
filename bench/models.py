"""The benchmarks' ONNX models, built with onnx.helper, and their turnout model repositories.

- ``mlp``: an MLP 256 -> 1024 -> 1024 -> 10 (bench.serving, bench.monitor_cost,
  bench.tracing_cost);
- ``rollout``: ``y = x + version`` in two versions, so every answer names the version that
  computed it (bench.rollout, tests/e2e/test_zero_downtime.py).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

MODEL_NAME = "mlp"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
INPUT_DIM = 256
OUTPUT_DIM = 10
LAYERS = (INPUT_DIM, 1024, 1024, OUTPUT_DIM)

# turnout's per-model config; a plain dict so a benchmark variant can override any key.
DEFAULT_CONFIG: dict[str, Any] = {
    "max_batch_size": 64,
    "max_queue_delay_us": 500,
    "max_queue_size": 4096,
    "num_replicas": 1,
    "intra_op_threads": 1,
}


def build_mlp(path: Path, seed: int = 0, layers: tuple[int, ...] = LAYERS) -> None:
    """Write the MLP 256 -> 1024 -> 1024 -> 10 (ReLU between layers; ``layers`` changes the
    hidden widths) as ONNX to `path`."""
    rng = np.random.default_rng(seed)
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = INPUT_NAME
    last = len(layers) - 2
    for i, (fan_in, fan_out) in enumerate(pairwise(layers)):
        # Scale 1/sqrt(fan_in) keeps activations O(1) through the stack, so outputs stay finite.
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(bias, f"b{i}"),
        ]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        out = OUTPUT_NAME if i == last else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"act{i}"]))
            current = f"act{i}"
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", INPUT_DIM])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", OUTPUT_DIM])],
        initializers,
    )
    save_model(graph, path)


def save_model(graph: onnx.GraphProto, path: Path) -> None:
    """Check ``graph`` as a model and write it to ``path``."""
    # Opset 17 / IR 8 load in every onnxruntime release turnout supports.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_repository(
    root: Path,
    max_batch_size: int = DEFAULT_CONFIG["max_batch_size"],
    max_queue_delay_us: int = DEFAULT_CONFIG["max_queue_delay_us"],
    seed: int = 0,
    layers: tuple[int, ...] = LAYERS,
    **overrides: Any,
) -> Path:
    """Write `root/mlp/1/model.onnx` and `root/mlp/config.yaml`; return `root`.

    `overrides` replace or add turnout config keys (e.g. num_replicas=2).
    """
    model_dir = root / MODEL_NAME
    build_mlp(model_dir / "1" / "model.onnx", seed=seed, layers=layers)
    config = {
        **DEFAULT_CONFIG,
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": max_queue_delay_us,
        **overrides,
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


# ------------------------------------------------------------------ rollout: y = x + version

ROLLOUT_MODEL_NAME = "rollout"
ROLLOUT_VERSIONS = (1, 2)
ROLLOUT_WIDTH = 4
ROLLOUT_CONFIG: dict[str, Any] = {
    "max_batch_size": 16,
    "max_queue_delay_us": 500,
    "max_queue_size": 4096,
}


def build_add_model(path: Path, version: int) -> None:
    """``y = x + version``, FP32 [batch, ROLLOUT_WIDTH]: an answer names its version."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ROLLOUT_WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ROLLOUT_WIDTH])
    offset = numpy_helper.from_array(np.full(ROLLOUT_WIDTH, version, dtype=np.float32), "offset")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["y"])], ROLLOUT_MODEL_NAME, [x], [y], [offset]
    )
    save_model(graph, path)


def build_rollout_repository(root: Path, **config: Any) -> Path:
    """Write ``root/rollout/{1,2}/model.onnx`` and its config.yaml; return ``root``."""
    for version in ROLLOUT_VERSIONS:
        build_add_model(root / ROLLOUT_MODEL_NAME / str(version) / "model.onnx", version)
    (root / ROLLOUT_MODEL_NAME / "config.yaml").write_text(
        yaml.safe_dump({**ROLLOUT_CONFIG, **config})
    )
    return root


# ---------------------------------------------------- rollout safety: scores = x @ W + shift

SCORER_MODEL_NAME = "scorer"
SCORER_WIDTH = 4
SCORER_VERSIONS = {1: "stable", 2: "healthy", 3: "shifted", 4: "permuted"}
"""Version -> what it answers: 1 and 2 the identity (a sample's class is its largest
feature), 3 the identity + 0.5 (shifted outputs, same classes), 4 the features rotated
(same output distribution, wrong classes: lower accuracy only)."""


def build_scorer(path: Path, version: int) -> None:
    """``scores = x @ W + shift`` for ``version`` (see SCORER_VERSIONS), FP32 [batch, 4]."""
    weight = np.eye(SCORER_WIDTH, dtype=np.float32)
    if version == 4:
        weight = np.roll(weight, 1, axis=1)
    shift = np.full(SCORER_WIDTH, 0.5 if version == 3 else 0.0, np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SCORER_WIDTH])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", SCORER_WIDTH])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["product"]),
            helper.make_node("Add", ["product", "shift"], ["scores"]),
        ],
        SCORER_MODEL_NAME,
        [x],
        [scores],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(shift, "shift")],
    )
    save_model(graph, path)


def build_scorer_repository(root: Path, **config: Any) -> Path:
    """Write every SCORER_VERSIONS version of ``root/scorer`` and its config.yaml."""
    for version in SCORER_VERSIONS:
        build_scorer(root / SCORER_MODEL_NAME / str(version) / "model.onnx", version)
    (root / SCORER_MODEL_NAME / "config.yaml").write_text(
        yaml.safe_dump({**ROLLOUT_CONFIG, **config})
    )
    return root
