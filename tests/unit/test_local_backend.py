"""The in-process backend: which thread runs a batch (the loop's own, once a batch of its
size is measured to be cheap; else a worker), and that the answer is the same either way."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import model_zoo
import numpy as np
import pytest

from gateway.backends import local
from gateway.backends._onnx import OnnxSession
from gateway.backends.local import LocalBackend
from gateway.repository import ModelSpec, Repository
from gateway.settings import ServerSettings


@pytest.fixture
def threads_run_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of every ``OnnxSession.run``, in order."""
    seen: list[int] = []
    real = OnnxSession.run

    def run(self: OnnxSession, inputs: dict[str, Any]) -> dict[str, Any]:
        seen.append(threading.get_ident())
        return real(self, inputs)

    monkeypatch.setattr(OnnxSession, "run", run)
    return seen


@contextlib.asynccontextmanager
async def _backend(root: Path, **config: Any) -> AsyncIterator[tuple[LocalBackend, ModelSpec]]:
    """A started backend with ``add_sub`` version 1 loaded under ``config``."""
    model_zoo.write_repository(root, {"add_sub": (model_zoo.add_sub, config, [1])})
    spec = Repository(root, ServerSettings()).read("add_sub", 1)
    backend = LocalBackend()
    await backend.start()
    try:
        await backend.load(spec)
        yield backend, spec
    finally:
        await backend.close()


def _inputs(rows: int) -> dict[str, np.ndarray[Any, Any]]:
    a = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return {"a": a, "b": np.ones_like(a)}


async def test_a_cheap_batch_runs_on_the_loop_thread_once_a_worker_measured_it(
    tmp_path: Path, threads_run_on: list[int]
) -> None:
    async with _backend(tmp_path) as (backend, spec):
        loop_thread = threading.get_ident()
        answers = [(await backend.infer(spec, _inputs(2)))[0] for _ in range(3)]
        assert threads_run_on[0] != loop_thread  # unknown cost: a worker measures it
        assert threads_run_on[1:] == [loop_thread, loop_thread]
        for outputs in answers:  # the same answer on either thread
            np.testing.assert_array_equal(outputs["sum"], _inputs(2)["a"] + 1)
            np.testing.assert_array_equal(outputs["diff"], _inputs(2)["a"] - 1)


async def test_a_batch_size_not_yet_measured_goes_to_a_worker_first(
    tmp_path: Path, threads_run_on: list[int]
) -> None:
    async with _backend(tmp_path) as (backend, spec):
        loop_thread = threading.get_ident()
        for _ in range(2):
            await backend.infer(spec, _inputs(1))
        for _ in range(2):
            await backend.infer(spec, _inputs(8))  # another size class (8..15 rows)
        assert threads_run_on[0] != loop_thread and threads_run_on[1] == loop_thread
        assert threads_run_on[2] != loop_thread and threads_run_on[3] == loop_thread


@pytest.mark.parametrize("inline_max_us", [0, 1])
async def test_batches_over_the_limit_stay_on_workers(
    tmp_path: Path, threads_run_on: list[int], inline_max_us: int
) -> None:
    """0 turns it off; 1 us is less than any batch costs."""
    async with _backend(tmp_path, inline_max_us=inline_max_us) as (backend, spec):
        for _ in range(4):
            await backend.infer(spec, _inputs(2))
        assert len(threads_run_on) == 4
        assert threading.get_ident() not in threads_run_on


async def test_several_onnx_runtime_threads_never_run_on_the_loop(
    tmp_path: Path, threads_run_on: list[int]
) -> None:
    """The calling thread's CPU time would not be the batch's wall time."""
    async with _backend(tmp_path, intra_op_threads=2) as (backend, spec):
        for _ in range(3):
            await backend.infer(spec, _inputs(2))
        assert threading.get_ident() not in threads_run_on


def test_the_cost_of_a_size_class_is_a_moving_average() -> None:
    replicas = local._Replicas([], inline_max_s=1e-3, costs={})
    assert not replicas.inline(4)  # never measured
    replicas.costs[(4).bit_length()] = 0.5e-3
    assert replicas.inline(4) and replicas.inline(7)  # one class: 4..7 rows
    assert not replicas.inline(8)
    replicas.costs[(4).bit_length()] = 2e-3
    assert not replicas.inline(4)
