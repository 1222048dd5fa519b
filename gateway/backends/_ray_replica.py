"""The Ray Serve deployment that hosts one ONNX Runtime session per replica.

Imported inside Ray workers, so it depends only on ONNX Runtime code, never on the gateway.

Besides Serve's handle calls, a replica answers batches on a Unix socket in a directory the
gateway names: a gateway on the same node sends batches there as frames (gateway/backends/
_wire.py), which costs tens of microseconds where a Serve call costs milliseconds of CPU.
Serve still places, health-checks, restarts and scales the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gateway.backends import _wire
from gateway.backends._onnx import OnnxSession
from gateway.errors import InvalidInput, TurnoutError

__all__ = ["OnnxReplica", "ReplicaReply", "ReplicaSocket"]

log = logging.getLogger(__name__)

ReplicaReply = tuple[dict[str, np.ndarray[Any, Any]], str, str]


class _ChannelServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, each running one batch at a time: ONNX Runtime releases
    the GIL, and the gateway opens no more connections than it has batches in flight."""

    daemon_threads = True
    owner: ReplicaSocket


class _Batches(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        owner: ReplicaSocket = self.server.owner  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        owner.connections.add(sock)
        try:
            self._serve(owner, sock)
        finally:
            owner.connections.discard(sock)

    @staticmethod
    def _serve(owner: ReplicaSocket, sock: socket.socket) -> None:
        while not owner.closing:
            try:
                request = _wire.receive(sock)
            except (OSError, ValueError):
                return
            if request is None:
                return
            _, inputs = request
            try:
                reply = _wire.encode(owner.meta, owner.session.run(inputs))
            except TurnoutError as exc:
                kind = "invalid" if isinstance(exc, InvalidInput) else "backend"
                reply = _wire.encode({"error": exc.message, "kind": kind}, {})
            try:
                _wire.send(sock, reply)
            except OSError:
                return


class ReplicaSocket:
    """A replica's Unix socket, ``<directory>/<pid>.sock``, answering batches on threads."""

    def __init__(self, session: OnnxSession, meta: dict[str, str], path: Path) -> None:
        self.session = session
        self.meta = meta
        """Sent with every reply: which replica and device computed it."""
        self.path = path
        self.closing = False
        self.connections: set[socket.socket] = set()
        path.unlink(missing_ok=True)  # a previous process with this pid left it
        self._server = _ChannelServer(str(path), _Batches)
        os.chmod(path, 0o600)
        self._server.owner = self
        threading.Thread(
            target=self._server.serve_forever, name="turnout-channel", daemon=True
        ).start()

    @classmethod
    def open(
        cls, directory: Path, session: OnnxSession, meta: dict[str, str]
    ) -> ReplicaSocket | None:
        """The socket, or None (logged) where it cannot be made: Serve calls still work."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return cls(session, meta, directory / f"{os.getpid()}.sock")
        except OSError as exc:
            log.warning("replica %s serves through Ray only: %s", meta.get("replica"), exc)
            return None

    def close(self) -> None:
        """No new connections; each open one ends after the batch it is running (the
        gateway sends its next batch elsewhere)."""
        self.closing = True
        self._server.shutdown()
        self._server.server_close()
        for sock in list(self.connections):
            # A batch being run is still answered; a connection waiting for one sees the end.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.path.unlink()


class OnnxReplica:
    """One batch per call; several calls may overlap (ONNX Runtime releases the GIL)."""

    def __init__(
        self,
        path: str,
        device: str,
        intra_op_threads: int,
        inter_op_threads: int,
        channel_dir: str | None = None,
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
        meta = {"replica": self.identity, "device": self.session.device}
        self._socket = (
            ReplicaSocket.open(Path(channel_dir), self.session, meta) if channel_dir else None
        )

    async def __call__(self, inputs: dict[str, np.ndarray[Any, Any]]) -> ReplicaReply:
        outputs = await asyncio.to_thread(self.session.run, inputs)
        return outputs, self.identity, self.session.device

    def check_health(self) -> None:
        """Serve's periodic health check: a live session is all a replica needs."""

    def __del__(self) -> None:
        # Serve calls this when it stops the replica.
        if self._socket is not None:
            self._socket.close()
