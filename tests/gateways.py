"""A real gateway for tests, and what tests share about it and its tools.

The gateway runs on its own event loop in a background thread with real HTTP and gRPC
servers on loopback ports, so tests can drive it with real (blocking) clients.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway.backends.base import ReplicaBackend
from gateway.grpc.messages import message
from gateway.server import Gateway
from gateway.settings import ServerSettings

T = TypeVar("T")

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
"""Debian's promtool (``make test`` installs the prometheus package)."""
EVENTUALLY_S = 10.0
"""A bound on waiting for background work (a flush, a poll), not a timing assertion."""


def model_infer_stub(channel: grpc.Channel) -> Any:
    """ModelInfer on a raw channel (``with_call`` gives the trailing metadata)."""
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=message("ModelInferRequest").SerializeToString,
        response_deserializer=message("ModelInferResponse").FromString,
    )


def add_sub_request(model: str, a: list[float], b: list[float]) -> Any:
    """A ModelInferRequest of one FP32 row for add_sub-shaped models (inputs a and b)."""
    request = message("ModelInferRequest")(model_name=model)
    for name, data in (("a", a), ("b", b)):
        request.inputs.add(name=name, datatype="FP32", shape=[1, len(data)],
                           contents={"fp32_contents": data})  # fmt: skip
    return request


class GatewayThread:
    """A real gateway on a private uvloop loop in a daemon thread."""

    def __init__(self, settings: ServerSettings, backend: ReplicaBackend | None = None) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway(settings, backend)
        self.call(self.gateway.start(), timeout=180)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    def stop(self) -> None:
        self.call(self.gateway.stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def local_settings(repository: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "model_repository": repository,
        # A private state dir per gateway: policies persist there and must not leak across tests.
        "state_dir": Path(tempfile.mkdtemp(prefix="turnout-state-")),
        "backend": "local",
        "http_port": 0,
        "grpc_port": 0,
        "max_request_bytes": 256 * 1024,
        "drain_timeout_s": 5.0,
        # No request records and no sidecar child unless a test asks for them.
        "monitor": False,
    }
    values.update(overrides)
    return ServerSettings(**values)


@contextmanager
def running(
    settings: ServerSettings, backend: ReplicaBackend | None = None
) -> Iterator[GatewayThread]:
    """A gateway serving ``settings`` for the ``with`` block (the one fixture factory)."""
    server = GatewayThread(settings, backend)
    try:
        yield server
    finally:
        server.stop()


def until(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """Wait for ``condition`` from a test's thread; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)
