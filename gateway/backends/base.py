"""The replica backend interface: load a model version, run one stacked batch, unload."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gateway.repository import ModelSpec
from turnout_contract.records import Placement

__all__ = ["Placement", "ReplicaBackend"]

Tensors = dict[str, np.ndarray[Any, Any]]


class ReplicaBackend(ABC):
    """Runs ONNX models somewhere; the batcher calls ``infer`` once per batch."""

    name: str
    default_inflight_batches: int = 2
    """``max_inflight_batches`` for models whose config leaves it unset."""

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Acquire what the backend needs (threads, a Ray connection)."""

    @abstractmethod
    async def load(self, spec: ModelSpec) -> None:
        """Make ``spec`` ready to serve; raise a TurnoutError with a clear cause if it can't."""

    @abstractmethod
    async def unload(self, spec: ModelSpec) -> None:
        """Release the replicas of ``spec`` (callers drain its batcher first)."""

    @abstractmethod
    async def infer(self, spec: ModelSpec, inputs: Tensors) -> tuple[Tensors, Placement]:
        """Run one batch; every output of the model and the replica that computed them."""

    @abstractmethod
    async def scale(self, spec: ModelSpec, replicas: int) -> None:
        """Run ``spec`` on ``replicas`` replicas (0: none until scaled again), keeping the
        ones that serve; raise a TurnoutError with the cause if it can't."""

    @abstractmethod
    def describe(self, spec: ModelSpec) -> dict[str, str]:
        """Facts for model metadata ``properties`` (backend, device, replicas)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release everything; called once at shutdown."""
