"""The OIP protobuf messages, built from protos/inference.proto into a private descriptor pool.

A private pool, not protoc's generated modules: those register ``inference.*`` in the
process-wide pool, which clashes with tritonclient's copy of the same package whenever a
program (a test, a benchmark, an app embedding turnout) imports both.
``make generate`` rebuilds ``inference.desc``; CI checks it matches the .proto file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE", "message"]

SERVICE = "inference.GRPCInferenceService"
_DESCRIPTOR_SET = Path(__file__).with_name("inference.desc")


def _load() -> dict[str, Any]:
    files = descriptor_pb2.FileDescriptorSet.FromString(_DESCRIPTOR_SET.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    classes: dict[str, Any] = message_factory.GetMessageClassesForFiles(
        [file.name for file in files], pool
    )
    return classes


_CLASSES = _load()


def message(name: str) -> Any:
    """The message class ``inference.<name>`` (e.g. ``ModelInferRequest``)."""
    return _CLASSES[f"inference.{name}"]
