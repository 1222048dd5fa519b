"""The Ray Serve deployment that hosts one ONNX Runtime session per replica.

Imported inside Ray workers, so it depends only on ONNX Runtime code, never on the gateway.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from gateway.backends._onnx import OnnxSession

__all__ = ["OnnxReplica", "ReplicaReply"]

ReplicaReply = tuple[dict[str, np.ndarray[Any, Any]], str, str]


class OnnxReplica:
    """One batch per call; several calls may overlap (ONNX Runtime releases the GIL)."""

    def __init__(
        self, path: str, device: str, intra_op_threads: int, inter_op_threads: int
    ) -> None:
        import ray

        self.session = OnnxSession(
            path,
            device=device,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        context = ray.get_runtime_context()
        # Returned with every batch so the gateway can tell which replica and node served it.
        self.identity = f"{context.get_node_id()[:12]}/{os.getpid()}"

    async def __call__(self, inputs: dict[str, np.ndarray[Any, Any]]) -> ReplicaReply:
        outputs = await asyncio.to_thread(self.session.run, inputs)
        return outputs, self.identity, self.session.device

    def check_health(self) -> None:
        """Serve's periodic health check: a live session is all a replica needs."""
