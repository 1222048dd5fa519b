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

__all__ = ["OnnxReplica", "ReplicaReply"]

log = logging.getLogger(__name__)

ReplicaReply = tuple[dict[str, np.ndarray[Any, Any]], str, str]


class _ChannelServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, each running one batch at a time: ONNX Runtime releases
    the GIL, and the gateway opens no more connections than it has batches in flight."""

    daemon_threads = True
    replica: OnnxReplica


class _Batches(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        replica: OnnxReplica = self.server.replica  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        while not replica.closing:
            try:
                request = _wire.receive(sock)
            except (OSError, ValueError):
                return
            if request is None:
                return
            _, inputs = request
            try:
                reply = _wire.encode(replica.meta, replica.session.run(inputs))
            except TurnoutError as exc:
                kind = "invalid" if isinstance(exc, InvalidInput) else "backend"
                reply = _wire.encode({"error": exc.message, "kind": kind}, {})
            try:
                _wire.send(sock, reply)
            except OSError:
                return


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
        self.meta = {"replica": self.identity, "device": self.session.device}
        self.closing = False
        self._channel: _ChannelServer | None = None
        self._socket_path: Path | None = None
        if channel_dir is not None:
            self._open_channel(Path(channel_dir))

    def _open_channel(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = directory / f"{os.getpid()}.sock"
            path.unlink(missing_ok=True)  # a previous process with this pid left it
            server = _ChannelServer(str(path), _Batches)
            os.chmod(path, 0o600)
        except OSError as exc:  # the gateway falls back to Serve calls
            log.warning("replica %s serves through Ray only: %s", self.identity, exc)
            return
        server.replica = self
        self._channel, self._socket_path = server, path
        threading.Thread(target=server.serve_forever, name="turnout-channel", daemon=True).start()

    async def __call__(self, inputs: dict[str, np.ndarray[Any, Any]]) -> ReplicaReply:
        outputs = await asyncio.to_thread(self.session.run, inputs)
        return outputs, self.identity, self.session.device

    def check_health(self) -> None:
        """Serve's periodic health check: a live session is all a replica needs."""

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: no new connections, and each open one
        # ends after the batch it is running (the gateway sends its next batch elsewhere).
        self.closing = True
        if self._channel is not None:
            self._channel.shutdown()
            self._channel.server_close()
        if self._socket_path is not None:
            with contextlib.suppress(OSError):
                self._socket_path.unlink()
