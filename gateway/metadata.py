"""Server and model metadata (OIP), and Triton's statistics extension, from the model table."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.errors import ModelNotFound
from gateway.models import ModelTable
from gateway.repository import TensorSpec

__all__ = ["model_metadata", "server_metadata", "statistics"]

SERVER_NAME = "turnout"
EXTENSIONS = ("binary_tensor_data", "statistics")
PLATFORM = "onnxruntime_onnx"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(models: ModelTable, name: str, version: str = "") -> dict[str, Any]:
    model = models.get(name, version)
    spec = model.spec

    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {
        "name": name,
        "versions": [str(v) for v in models.versions[name]] if not version else [str(spec.version)],
        "platform": PLATFORM,
        "inputs": tensors(spec.inputs),
        "outputs": tensors(spec.outputs),
        "properties": {
            **models.backend.describe(spec),
            "max_batch_size": str(model.batcher.max_batch_size),
        },
    }


def statistics(models: ModelTable, name: str = "", version: str = "") -> list[dict[str, Any]]:
    """Triton's statistics extension: counts and cumulative durations per version."""
    chosen = (
        [models.get(name, version)]
        if name and version
        else [m for m in models.loaded() if not name or m.spec.name == name]
    )
    if name and not chosen:
        raise ModelNotFound(f"model '{name}' is not served (known: {models.known()})")
    result = []
    for model in chosen:
        s = model.batcher.stats
        result.append(
            {
                "name": model.spec.name,
                "version": str(model.spec.version),
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": {"count": s.success_count},
                    "fail": {"count": s.fail_count},
                    "queue": {"count": s.success_count + s.fail_count, "ns": s.queue_ns},
                    "compute_infer": {"count": s.execution_count, "ns": s.compute_ns},
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": {"count": count}}
                    for size, count in sorted(s.batch_sizes.items())
                ],
            }
        )
    return result
