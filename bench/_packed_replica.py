"""bench.ray_packing's packed layout: one Serve replica process hosting several model versions.

Imported inside the Ray worker, so it imports what gateway/backends/_ray_replica.py imports
and nothing more (the benchmark's own modules would add rich, grpc and friends to the
process whose memory it measures). Each version gets an ONNX Runtime session and a Unix
socket of its own, the same ReplicaSocket the product's replicas open, so both layouts are
driven through the same client code.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.backends._onnx import OnnxSession
from gateway.backends._ray_replica import ReplicaSocket

__all__ = ["PackedReplica"]


class PackedReplica:
    """``models``: (model file, socket directory) per version, in one process."""

    def __init__(self, models: list[tuple[str, str]], intra_op_threads: int) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
        self.identity = f"{node}/{os.getpid()}"
        self._sockets: list[ReplicaSocket] = []
        for path, directory in models:
            session = OnnxSession(path, intra_op_threads=intra_op_threads, inter_op_threads=1)
            meta = {"replica": self.identity, "device": session.device}
            opened = ReplicaSocket.open(Path(directory), session, meta)
            if opened is None:
                raise RuntimeError(f"no socket in {directory}")
            self._sockets.append(opened)

    def check_health(self) -> None:
        """Serve's health check: the sessions live as long as the process."""

    def __del__(self) -> None:
        for opened in self._sockets:
            opened.close()
