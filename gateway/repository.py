"""The model repository: ``DIR/<model>/<version>/model.onnx`` plus ``DIR/<model>/config.yaml``.

Tensor names, datatypes and shapes come from the ONNX graph itself; a symbolic or unknown
first dimension on every input and output marks a model the batcher may stack rows for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from gateway.codecs import datatype_from_onnx
from gateway.errors import InvalidInput, ModelNotFound
from gateway.settings import ModelConfig, ServerSettings, load_model_config
from turnout_contract.names import check_model_name, contained, is_model_name

__all__ = ["ModelSpec", "Repository", "TensorSpec", "parse_version"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: int
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: ModelConfig

    @property
    def batchable(self) -> bool:
        """Rows of several requests may be stacked along the first dimension."""
        if self.config.max_batch_size == 0:
            return False
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def parse_version(model: str, version: str | int) -> int:
    """OIP versions are strings; turnout's are positive integers, as in Triton."""
    if isinstance(version, int):
        return version
    if version.isascii() and version.isdigit() and int(version) > 0:
        return int(version)
    raise ModelNotFound(f"model '{model}' has no version '{version}' (versions are integers >= 1)")


def _canonical_version(name: str) -> bool:
    """``3`` is a version folder; ``03``, ``0`` and ``v3`` are not (Triton's rule)."""
    return name.isascii() and name.isdigit() and name == str(int(name)) and int(name) > 0


def _tensor_specs(values: list[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        elem = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type)  # "TensorProto.FLOAT"
        datatype = datatype_from_onnx(_ONNX_ELEM_NAMES.get(elem, elem))
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor_type.shape.dim
        )
        specs.append(TensorSpec(value.name, datatype, dims))
    return tuple(specs)


# onnx names its element types after TensorProto; ONNX Runtime (and our table) after C types.
_ONNX_ELEM_NAMES = {
    "TensorProto.FLOAT": "float",
    "TensorProto.DOUBLE": "double",
    "TensorProto.FLOAT16": "float16",
    "TensorProto.BFLOAT16": "bfloat16",
    "TensorProto.BOOL": "bool",
    "TensorProto.STRING": "string",
    **{f"TensorProto.{t.upper()}": t for t in ("int8", "int16", "int32", "int64")},
    **{f"TensorProto.{t.upper()}": t for t in ("uint8", "uint16", "uint32", "uint64")},
}


def read_model_spec(name: str, version: int, path: Path, config: ModelConfig) -> ModelSpec:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    return ModelSpec(
        name=name,
        version=version,
        path=path,
        inputs=_tensor_specs(inputs),
        outputs=_tensor_specs(list(graph.output)),
        config=config,
    )


class Repository:
    """Finds models and versions on disk; reading is cheap (no ONNX Runtime session)."""

    def __init__(self, root: Path, settings: ServerSettings) -> None:
        self.root = root
        self._settings = settings

    def model_names(self) -> list[str]:
        """Directories with a valid model name and at least one version (others are logged)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        names = []
        for entry in self.root.iterdir():
            if not entry.is_dir():
                continue
            if not is_model_name(entry.name):
                log.warning("ignoring %s: not a valid model name", entry)
                continue
            if self.versions_on_disk(entry.name):
                names.append(entry.name)
        return sorted(names)

    def model_dir(self, model: str) -> Path:
        """The model's directory: a valid name, resolved inside the repository."""
        try:
            return contained(self.root, check_model_name(model))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def versions_on_disk(self, model: str) -> list[int]:
        model_dir = self.model_dir(model)
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in model_dir.iterdir()
            if p.is_dir() and _canonical_version(p.name) and (p / MODEL_FILE).is_file()
        )

    def read(self, model: str, version: int) -> ModelSpec:
        model_dir = self.model_dir(model)
        path = model_dir / str(version) / MODEL_FILE
        if not path.is_file():
            raise ModelNotFound(f"model '{model}' version {version} is not in the repository")
        config = load_model_config(model_dir, self._settings)
        return read_model_spec(model, version, path, config)

    def read_all(self) -> list[ModelSpec]:
        return [
            self.read(model, version)
            for model in self.model_names()
            for version in self.versions_on_disk(model)
        ]
