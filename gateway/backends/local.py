"""The in-process backend: ONNX Runtime sessions on a thread pool inside the gateway.

For single machines, edge boxes and fast tests. ONNX Runtime releases the GIL while it
computes, so the event loop keeps serving while batches run.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from gateway.backends._onnx import OnnxSession
from gateway.backends.base import Placement, ReplicaBackend, Tensors
from gateway.errors import BackendError, ModelNotReady
from gateway.repository import ModelSpec

__all__ = ["LocalBackend"]


class _Replicas:
    def __init__(self, sessions: list[OnnxSession]) -> None:
        self.sessions = sessions
        placed = [(s, Placement(f"local/{i}", s.device)) for i, s in enumerate(sessions)]
        self._next: Iterator[tuple[OnnxSession, Placement]] = itertools.cycle(placed)

    def pick(self) -> tuple[OnnxSession, Placement]:
        return next(self._next)


class LocalBackend(ReplicaBackend):
    name = "local"

    def __init__(self, max_workers: int | None = None) -> None:
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._models: dict[str, _Replicas] = {}

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_workers or 8, thread_name_prefix="turnout-ort"
        )

    async def load(self, spec: ModelSpec) -> None:
        self._models[spec.key] = _Replicas(await self._sessions(spec, spec.config.num_replicas))

    async def _sessions(self, spec: ModelSpec, count: int) -> list[OnnxSession]:
        cfg = spec.config

        def build() -> list[OnnxSession]:
            return [
                OnnxSession(
                    str(spec.path),
                    device=cfg.device,
                    intra_op_threads=cfg.intra_op_threads,
                    inter_op_threads=cfg.inter_op_threads,
                )
                for _ in range(count)
            ]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, build)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"model '{spec.key}' failed to load: {exc}") from exc

    async def scale(self, spec: ModelSpec, replicas: int) -> None:
        current = self._models.get(spec.key)
        sessions = current.sessions if current is not None else []
        if replicas > len(sessions):
            sessions = sessions + await self._sessions(spec, replicas - len(sessions))
        self._models[spec.key] = _Replicas(sessions[:replicas])

    async def unload(self, spec: ModelSpec) -> None:
        self._models.pop(spec.key, None)

    async def infer(self, spec: ModelSpec, inputs: Tensors) -> tuple[Tensors, Placement]:
        replicas = self._models.get(spec.key)
        if replicas is None:
            raise ModelNotReady(f"model '{spec.name}' version {spec.version} is not loaded")
        if not replicas.sessions:
            raise ModelNotReady(f"model '{spec.name}' version {spec.version} has no replicas")
        session, placement = replicas.pick()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, session.run, inputs), placement

    def describe(self, spec: ModelSpec) -> dict[str, str]:
        replicas = self._models.get(spec.key)
        device = replicas.sessions[0].device if replicas else spec.config.device
        count = len(replicas.sessions) if replicas else 0
        return {"backend": self.name, "device": device, "replicas": str(count)}

    async def close(self) -> None:
        self._models.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
