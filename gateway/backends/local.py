"""The in-process backend: ONNX Runtime sessions on a thread pool inside the gateway.

For single machines, edge boxes and fast tests. ONNX Runtime releases the GIL while it
computes, so the event loop keeps serving while batches run.

A batch that computes in less than the model's ``inline_max_us`` runs on the event loop's
own thread instead. Handing it to a worker costs two GIL handoffs (the worker starts the
call, and takes the GIL back when ONNX Runtime is done), and on a busy loop each waits
for the loop thread to let go, up to Python's 5 ms switch interval: a batch of a small MLP
that computes in 0.13 ms came back after 1.5 ms at capacity and 3 ms under overload,
so two batches in flight bounded the model far below what its thread could do. What a
batch costs is measured, not guessed: the CPU time of its thread (``time.thread_time``,
which a wait for the GIL does not count) by batch size, so a model whose bigger batches
are slow runs those on a worker.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from gateway.backends._onnx import OnnxSession
from gateway.backends.base import Placement, ReplicaBackend, Tensors
from gateway.errors import BackendError, ModelNotReady
from gateway.repository import ModelSpec

__all__ = ["LocalBackend"]


class _Replicas:
    def __init__(
        self, sessions: list[OnnxSession], inline_max_s: float, costs: dict[int, float]
    ) -> None:
        self.sessions = sessions
        placed = [(s, Placement(f"local/{i}", s.device)) for i, s in enumerate(sessions)]
        self._next: Iterator[tuple[OnnxSession, Placement]] = itertools.cycle(placed)
        self.inline_max_s = inline_max_s
        self.costs = costs
        """A batch's CPU seconds by size class (``rows.bit_length()``), a moving average."""

    def pick(self) -> tuple[OnnxSession, Placement]:
        return next(self._next)

    def inline(self, rows: int) -> bool:
        """Run a batch of ``rows`` on the loop's thread: batches of its size class are
        known to compute in less than ``inline_max_s`` (unknown: a worker measures one)."""
        return self.costs.get(rows.bit_length(), math.inf) < self.inline_max_s

    def run(self, session: OnnxSession, inputs: Tensors, rows: int) -> Tensors:
        started = time.thread_time()
        outputs = session.run(inputs)
        spent = time.thread_time() - started
        size = rows.bit_length()
        known = self.costs.get(size)
        self.costs[size] = spent if known is None else known + 0.2 * (spent - known)
        return outputs


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
        sessions = await self._sessions(spec, spec.config.num_replicas)
        self._models[spec.key] = _Replicas(sessions, _inline_max_s(spec, sessions), {})

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
        costs = current.costs if current is not None else {}
        self._models[spec.key] = _Replicas(
            sessions[:replicas], _inline_max_s(spec, sessions), costs
        )

    async def unload(self, spec: ModelSpec) -> None:
        self._models.pop(spec.key, None)

    async def infer(self, spec: ModelSpec, inputs: Tensors) -> tuple[Tensors, Placement]:
        replicas = self._models.get(spec.key)
        if replicas is None:
            raise ModelNotReady(f"model '{spec.name}' version {spec.version} is not loaded")
        if not replicas.sessions:
            raise ModelNotReady(f"model '{spec.name}' version {spec.version} has no replicas")
        session, placement = replicas.pick()
        rows = _rows(inputs)
        if replicas.inline(rows):
            return replicas.run(session, inputs, rows), placement
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, replicas.run, session, inputs, rows)
        return outputs, placement

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


def _inline_max_s(spec: ModelSpec, sessions: list[OnnxSession]) -> float:
    """Batches below this many CPU seconds may run on the loop's thread. Not on CUDA (a
    call waits on the device) nor with several ONNX Runtime threads (the calling thread's
    CPU time would not be the batch's wall time)."""
    on_cpu = all(s.device == "cpu" for s in sessions)
    if not on_cpu or spec.config.intra_op_threads != 1:
        return 0.0
    return spec.config.inline_max_us / 1e6


def _rows(inputs: Tensors) -> int:
    for value in inputs.values():
        return int(value.shape[0]) if value.ndim else 1
    return 1
