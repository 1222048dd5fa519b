"""Protobuf messages built from committed descriptor sets, each in its own private pool.

A private pool, not protoc's generated modules: those register ``inference.*`` in the
process-wide pool, which clashes with tritonclient's copy of the same package whenever a
program (a test, a benchmark, an app embedding turnout) imports both.
``make generate`` rebuilds the descriptor sets (``inference.desc`` here, the admin API's
``gateway/admin/traffic.desc``, label feedback's ``gateway/feedback.desc``); CI checks
they match the .proto files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE", "load_messages", "message"]

SERVICE = "inference.GRPCInferenceService"
_DESCRIPTOR_SET = Path(__file__).with_name("inference.desc")


def load_messages(descriptor_set: Path) -> dict[str, Any]:
    """Every message class of a descriptor set (built with ``--include_imports``), by full
    name, from a fresh pool that no other code shares."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    classes: dict[str, Any] = message_factory.GetMessageClassesForFiles(
        [file.name for file in files], pool
    )
    return classes


_CLASSES = load_messages(_DESCRIPTOR_SET)


def message(name: str) -> Any:
    """The message class ``inference.<name>`` (e.g. ``ModelInferRequest``)."""
    return _CLASSES[f"inference.{name}"]
