"""The model repository: specs read from real ONNX files, batchability, version discovery."""

from __future__ import annotations

from pathlib import Path

import model_zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.errors import ModelNotFound
from gateway.repository import Repository, TensorSpec, parse_version
from gateway.settings import ModelConfig, ServerSettings


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=model_zoo.OPSET)
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _identity(path: Path, input_shape: list[object], output_shape: list[object]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    _save(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]), path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    return model_zoo.write_repository(
        root,
        {
            "add_sub": (model_zoo.add_sub, {"max_batch_size": 8}, [1, 2]),
            "identity": (model_zoo.identity_all_types, {}, [1]),
            "strings": (model_zoo.strings, {}, [3]),
            "fixed": (model_zoo.fixed_shape, {}, [1]),
            "mlp": (model_zoo.mlp, {}, [1]),
        },
    )


def test_specs_from_onnx(zoo: Path) -> None:
    spec = Repository(zoo, ServerSettings()).read("add_sub", 2)
    assert (spec.name, spec.version, spec.key) == ("add_sub", 2, "add_sub/2")
    assert spec.path == zoo / "add_sub" / "2" / "model.onnx"
    assert spec.inputs == (TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "FP32", (-1, 4)))
    assert spec.outputs == (
        TensorSpec("sum", "FP32", (-1, 4)),
        TensorSpec("diff", "FP32", (-1, 4)),
    )
    assert spec.config == ModelConfig(max_batch_size=8)
    assert spec.batchable


def test_every_onnx_element_type_maps_to_its_datatype(zoo: Path) -> None:
    spec = Repository(zoo, ServerSettings()).read("identity", 1)
    expected = [d for d in model_zoo.ONNX_TYPES if d != "BYTES"]
    assert spec.inputs == tuple(TensorSpec(f"in_{d}", d, (-1, 3)) for d in expected)
    assert spec.outputs == tuple(TensorSpec(f"out_{d}", d, (-1, 3)) for d in expected)
    strings = Repository(zoo, ServerSettings()).read("strings", 3)
    assert strings.inputs == (TensorSpec("text", "BYTES", (-1, 2)),)
    assert strings.outputs == (TensorSpec("echo", "BYTES", (-1, 2)),)


def test_initializers_are_not_inputs(tmp_path: Path) -> None:
    # Older exporters list weights among the graph inputs too.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    weight = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x, w], [y], initializer=[weight]
    )
    _save(graph, tmp_path / "mm" / "1" / "model.onnx")
    spec = Repository(tmp_path, ServerSettings()).read("mm", 1)
    assert spec.inputs == (TensorSpec("x", "FP32", (-1, 2)),)
    assert spec.batchable


@pytest.mark.parametrize(
    ("input_shape", "output_shape", "dims", "batchable"),
    [
        (["batch", 3], ["batch", 3], (-1, 3), True),
        ([None, 3], [None, 3], (-1, 3), True),  # unknown first dimension
        ([0, 3], [0, 3], (-1, 3), True),  # 0 is how some exporters say "unknown"
        ([2, 3], [2, 3], (2, 3), False),  # fixed shape
        (["batch", 3], [2, 3], (-1, 3), False),  # an output with a fixed first dimension
        ([3, "n"], [3, "n"], (3, -1), False),  # variable, but not the first dimension
        ([], [], (), False),  # scalars have no rows
    ],
)
def test_batchable_detection(
    tmp_path: Path,
    input_shape: list[object],
    output_shape: list[object],
    dims: tuple[int, ...],
    batchable: bool,
) -> None:
    _identity(tmp_path / "m" / "1" / "model.onnx", input_shape, output_shape)
    spec = Repository(tmp_path, ServerSettings()).read("m", 1)
    assert spec.inputs[0].shape == dims
    assert spec.batchable is batchable


def test_fixed_shape_model_is_not_batchable(zoo: Path) -> None:
    spec = Repository(zoo, ServerSettings()).read("fixed", 1)
    assert spec.inputs == (TensorSpec("x", "FP32", (2, 3)),)
    assert not spec.batchable


def test_max_batch_size_zero_disables_batching(zoo: Path) -> None:
    settings = ServerSettings(models={"add_sub": {"max_batch_size": 0}})
    spec = Repository(zoo, settings).read("add_sub", 1)
    assert spec.inputs[0].shape == (-1, 4)
    assert spec.config.max_batch_size == 0
    assert not spec.batchable


def test_config_comes_from_the_model_folder_and_settings(zoo: Path) -> None:
    settings = ServerSettings(
        model_defaults={"max_queue_size": 7}, models={"mlp": {"num_replicas": 2}}
    )
    repository = Repository(zoo, settings)
    mlp = repository.read("mlp", 1)
    assert (mlp.config.max_queue_size, mlp.config.num_replicas, mlp.config.max_batch_size) == (
        7,
        2,
        64,
    )
    add_sub = repository.read("add_sub", 1)
    assert (add_sub.config.max_queue_size, add_sub.config.max_batch_size) == (7, 8)


# -- discovery --------------------------------------------------------------------------------


def test_model_names_and_versions(zoo: Path) -> None:
    repository = Repository(zoo, ServerSettings())
    assert repository.model_names() == ["add_sub", "fixed", "identity", "mlp", "strings"]
    assert repository.versions_on_disk("add_sub") == [1, 2]
    assert repository.versions_on_disk("strings") == [3]
    assert repository.versions_on_disk("nope") == []
    assert [s.key for s in repository.read_all()] == [
        "add_sub/1",
        "add_sub/2",
        "fixed/1",
        "identity/1",
        "mlp/1",
        "strings/3",
    ]


def test_version_discovery_ignores_what_is_not_a_version(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for version in ("1", "10", "2"):
        _identity(model / version / "model.onnx", ["n", 1], ["n", 1])
    for odd in ("latest", "1.5", "-3", "0", "v4"):
        _identity(model / odd / "model.onnx", ["n", 1], ["n", 1])
    (model / "7").mkdir()  # no model.onnx
    (model / "8").mkdir()
    (model / "8" / "model.pt").write_bytes(b"")
    (model / "9").write_bytes(b"a file, not a folder")
    (model / "11").mkdir()
    (model / "11" / "model.onnx").mkdir()  # a folder named model.onnx
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.yaml").write_text("max_batch_size: 2\n")
    (tmp_path / "README.md").write_text("not a model")
    repository = Repository(tmp_path, ServerSettings())
    assert repository.versions_on_disk("m") == [1, 2, 10]  # numeric order
    assert repository.model_names() == ["m"]
    assert [s.version for s in repository.read_all()] == [1, 2, 10]


def test_reading_what_is_not_there(zoo: Path, tmp_path: Path) -> None:
    repository = Repository(zoo, ServerSettings())
    with pytest.raises(ModelNotFound, match="model 'add_sub' version 3 is not in the repository"):
        repository.read("add_sub", 3)
    with pytest.raises(ModelNotFound, match="model 'ghost' version 1 is not in the repository"):
        repository.read("ghost", 1)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Repository(tmp_path / "missing", ServerSettings()).model_names()


def test_zero_padded_version_folder_is_not_a_version(tmp_path: Path) -> None:
    # As in Triton, a version folder is the canonical decimal form: "04" is ignored.
    _identity(tmp_path / "m" / "04" / "model.onnx", ["n", 1], ["n", 1])
    _identity(tmp_path / "m" / "5" / "model.onnx", ["n", 1], ["n", 1])
    repository = Repository(tmp_path, ServerSettings())
    assert repository.versions_on_disk("m") == [5]
    assert [spec.version for spec in repository.read_all()] == [5]


@pytest.mark.parametrize(("version", "number"), [("1", 1), ("12", 12), ("007", 7), (3, 3)])
def test_parse_version(version: str | int, number: int) -> None:
    assert parse_version("m", version) == number


@pytest.mark.parametrize("version", ["0", "-1", "1.0", "abc", "", " 1", "v2", "1e3"])
def test_parse_version_errors(version: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        parse_version("m", version)
    assert str(caught.value) == (
        f"model 'm' has no version '{version}' (versions are integers >= 1)"
    )
    assert caught.value.http_status == 404


def test_parse_version_superscript_digit() -> None:
    with pytest.raises(ModelNotFound):
        parse_version("m", "\u00b2")


async def test_unset_inflight_batches_take_the_backends_default(tmp_path: Path) -> None:
    """Local keeps two batches in flight per replica, Ray one; a config value wins."""
    from gateway.backends.local import LocalBackend
    from gateway.models import ModelTable

    model_zoo.write_repository(
        tmp_path,
        {
            "unset": (model_zoo.add_sub, {"max_batch_size": 4}, [1]),
            "set": (model_zoo.add_sub, {"max_batch_size": 4, "max_inflight_batches": 3}, [1]),
        },
    )

    class OneInFlight(LocalBackend):
        default_inflight_batches = 1

    for backend, unset_gets in ((LocalBackend(), 2), (OneInFlight(), 1)):
        models = ModelTable(Repository(tmp_path, ServerSettings()), backend)
        await models.start()
        try:
            configs = {m.spec.name: m.spec.config for m in models.loaded()}
            assert configs["unset"].max_inflight_batches == unset_gets
            assert configs["set"].max_inflight_batches == 3
        finally:
            await models.stop()
