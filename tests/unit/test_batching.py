"""The edge batcher against a fake ``run_batch`` that records every call it gets.

Requests are submitted as tasks in one go, so they are all queued before the dispatcher
runs; grouping is then deterministic and the tests assert it, never durations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from unittest import mock

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.batching import Batcher, Tensors
from gateway.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    QueueFull,
    ServerShuttingDown,
)
from gateway.settings import ModelConfig
from turnout_contract.records import BatchTiming

LONG_DELAY_US = 30_000_000  # a batch that waits this long fails the test by timeout


class FakeModel:
    """A ``run_batch`` double: ``y = 2x`` row by row; records batch sizes and concurrency."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.seen: list[Tensors] = []
        self.active = 0
        self.max_active = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: BaseException | None = None
        self.drop_rows = 0

    async def __call__(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        self.batches.append(int(x.shape[0]))
        self.seen.append(inputs)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)  # a real backend always yields at least once
            if self.error is not None:
                raise self.error
            return {"y": x[: len(x) - self.drop_rows] * 2, "first": x[:, 0].copy()}
        finally:
            self.active -= 1

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


def rows_of(*ids: int, width: int = 3, dtype: Any = np.float32) -> Tensors:
    """A request whose row ``i`` is filled with ``ids[i]``, so rows are recognisable."""
    return {"x": np.repeat(np.array(ids, dtype=dtype)[:, None], width, axis=1)}


def check_answer(request: Tensors, answer: Tensors) -> None:
    """The answer holds exactly this request's rows, in order."""
    np.testing.assert_array_equal(answer["y"], request["x"] * 2)
    np.testing.assert_array_equal(answer["first"], request["x"][:, 0])


async def until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def settle(turns: int = 20) -> None:
    """Let every ready task run a few times."""
    for _ in range(turns):
        await asyncio.sleep(0)


Factory = Callable[..., tuple[Batcher, FakeModel]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    built: list[tuple[Batcher, FakeModel]] = []

    def factory(
        *, batchable: bool = True, replicas: int = 1, **knobs: Any
    ) -> tuple[Batcher, FakeModel]:
        model = FakeModel()
        knobs.setdefault("max_queue_delay_us", LONG_DELAY_US)
        batcher = Batcher(
            "m/1", model, ModelConfig(**knobs), batchable=batchable, replicas=replicas
        )
        batcher.start()
        built.append((batcher, model))
        return batcher, model

    yield factory
    for batcher, model in built:
        model.release()
        await batcher.close(drain_timeout_s=2)


def submit_all(batcher: Batcher, requests: list[Tensors], **kw: Any) -> list[asyncio.Task[Tensors]]:
    return [asyncio.create_task(batcher.submit(r, len(r["x"]), **kw)) for r in requests]


async def answers(tasks: list[asyncio.Task[Tensors]], limit_s: float = 5.0) -> list[Tensors]:
    return list(await asyncio.wait_for(asyncio.gather(*tasks), limit_s))


# -- grouping -------------------------------------------------------------------------------


async def test_concurrent_requests_share_one_call(make: Factory) -> None:
    batcher, model = make(max_batch_size=4)
    requests = [rows_of(i) for i in range(4)]
    results = await answers(submit_all(batcher, requests))
    assert model.batches == [4]
    np.testing.assert_array_equal(model.seen[0]["x"][:, 0], [0, 1, 2, 3])
    for request, answer in zip(requests, results, strict=True):
        check_answer(request, answer)


async def test_batches_are_capped_at_max_batch_size(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=1000)
    requests = [rows_of(i) for i in range(10)]
    results = await answers(submit_all(batcher, requests))
    assert model.batches == [4, 4, 2]
    stacked = np.concatenate([seen["x"][:, 0] for seen in model.seen])
    np.testing.assert_array_equal(stacked, np.arange(10))  # first come, first served
    for request, answer in zip(requests, results, strict=True):
        check_answer(request, answer)


async def test_multi_row_requests_get_their_own_rows(make: Factory) -> None:
    batcher, model = make(max_batch_size=8)
    requests = [rows_of(1, 2, 3), rows_of(4), rows_of(5, 6), rows_of(7, 8)]
    results = await answers(submit_all(batcher, requests))
    assert model.batches == [8]
    for request, answer in zip(requests, results, strict=True):
        assert answer["y"].shape == (len(request["x"]), 3)
        check_answer(request, answer)


async def test_request_that_does_not_fit_waits_for_the_next_batch(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=1000)
    requests = [rows_of(1, 2, 3), rows_of(4, 5), rows_of(6, 7)]
    results = await answers(submit_all(batcher, requests))
    assert model.batches == [3, 4]
    for request, answer in zip(requests, results, strict=True):
        check_answer(request, answer)


async def test_request_over_max_batch_size_is_invalid(make: Factory) -> None:
    batcher, model = make(max_batch_size=2)
    with pytest.raises(
        InvalidInput, match="batch of 3 rows exceeds max_batch_size 2 of model 'm/1'"
    ):
        await batcher.submit(rows_of(1, 2, 3), 3)
    assert model.batches == []


async def test_preferred_batch_size_dispatches_at_once(make: Factory) -> None:
    batcher, model = make(max_batch_size=8, preferred_batch_sizes=[2, 4])
    requests = [rows_of(i) for i in range(2)]
    results = await answers(submit_all(batcher, requests))  # not the 30 s delay
    assert model.batches == [2]
    for request, answer in zip(requests, results, strict=True):
        check_answer(request, answer)

    # Five queued rows: the largest preferred size goes now, the rest waits for company.
    requests = [rows_of(i) for i in range(10, 15)]
    tasks = submit_all(batcher, requests)
    await until(lambda: sum(t.done() for t in tasks) == 4)
    await settle()
    assert model.batches == [2, 4]
    assert not tasks[4].done()
    await batcher.close()  # draining dispatches what waits without the delay
    results = await answers(tasks)
    assert model.batches == [2, 4, 1]
    for request, answer in zip(requests, results, strict=True):
        check_answer(request, answer)


async def test_lone_request_waits_out_the_queue_delay(make: Factory) -> None:
    delay_s = 0.2
    batcher, model = make(max_batch_size=4, max_queue_delay_us=int(delay_s * 1e6))
    started = time.perf_counter()
    first = asyncio.create_task(batcher.submit(rows_of(1), 1))
    await settle()
    assert model.batches == []  # still waiting for company
    second = asyncio.create_task(batcher.submit(rows_of(2), 1))
    results = await answers([first, second])
    assert time.perf_counter() - started >= delay_s
    assert model.batches == [2]  # the late one joined the waiting batch
    check_answer(rows_of(1), results[0])
    check_answer(rows_of(2), results[1])


async def test_zero_delay_dispatches_alone(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0)
    result = await asyncio.wait_for(batcher.submit(rows_of(9), 1), 5)
    assert model.batches == [1]
    check_answer(rows_of(9), result)


@pytest.mark.parametrize(
    ("batchable", "max_batch_size"), [(False, 8), (True, 0)], ids=["not-batchable", "max-0"]
)
async def test_unbatched_model_gets_one_call_per_request(
    make: Factory, batchable: bool, max_batch_size: int
) -> None:
    batcher, model = make(batchable=batchable, max_batch_size=max_batch_size)
    assert batcher.max_batch_size == 0
    # Fixed-shape inputs: the first dimension is not a batch and may exceed max_batch_size.
    requests = [rows_of(i, i + 10) for i in range(3)]
    tasks = [asyncio.create_task(batcher.submit(r, 1)) for r in requests]
    results = await answers(tasks)
    assert model.batches == [2, 2, 2]
    for request, seen, answer in zip(requests, model.seen, results, strict=True):
        assert seen["x"] is request["x"]  # passed through, not stacked
        check_answer(request, answer)


async def test_different_inner_shapes_are_not_stacked(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=1000)
    requests = [
        rows_of(1),
        rows_of(2, width=5),
        rows_of(3),
        rows_of(4, dtype=np.float64),
        rows_of(5),
        rows_of(6, width=5),
    ]
    results = await answers(submit_all(batcher, requests))
    assert model.batches == [3, 2, 1]
    assert [s["x"][:, 0].tolist() for s in model.seen] == [[1, 3, 5], [2, 6], [4]]
    assert [s["x"].shape[1] for s in model.seen] == [3, 5, 3]
    assert model.seen[2]["x"].dtype == np.float64
    for request, answer in zip(requests, results, strict=True):
        assert answer["y"].dtype == request["x"].dtype
        check_answer(request, answer)


# -- back-pressure and deadlines ------------------------------------------------------------


async def test_queue_full_is_refused_at_once(make: Factory) -> None:
    batcher, model = make(max_batch_size=1, max_queue_size=2, max_inflight_batches=1)
    model.hold()
    running = asyncio.create_task(batcher.submit(rows_of(0), 1))
    await until(lambda: model.batches == [1])
    queued = submit_all(batcher, [rows_of(1), rows_of(2)])
    await settle()
    assert batcher.queue_depth == 2
    with pytest.raises(QueueFull, match=r"model 'm/1' queue is full \(2 requests waiting\)"):
        await batcher.submit(rows_of(3), 1)
    model.release()
    results = await answers([running, *queued])
    for i, answer in enumerate(results):
        check_answer(rows_of(i), answer)
    assert model.batches == [1, 1, 1]


async def test_expired_requests_do_not_fill_the_queue(make: Factory) -> None:
    batcher, model = make(max_batch_size=1, max_queue_size=1, max_inflight_batches=1)
    model.hold()
    running = asyncio.create_task(batcher.submit(rows_of(0), 1))
    await until(lambda: model.batches == [1])
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows_of(1), 1, timeout_s=0.01)
    # Nothing live waits: the next request is queued, not refused with 429.
    queued = asyncio.create_task(batcher.submit(rows_of(2), 1))
    await settle()
    assert batcher.queue_depth == 1
    model.release()
    results = await answers([running, queued])
    check_answer(rows_of(0), results[0])
    check_answer(rows_of(2), results[1])
    assert [s["x"][0, 0] for s in model.seen] == [0, 2]


async def test_request_expired_in_queue_never_runs(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0, max_inflight_batches=1)
    model.hold()
    running = asyncio.create_task(batcher.submit(rows_of(1), 1))
    await until(lambda: model.batches == [1])
    with pytest.raises(DeadlineExceeded, match=r"request to model 'm/1' timed out after 20 ms"):
        await batcher.submit(rows_of(2), 1, timeout_s=0.02)
    model.release()
    check_answer(rows_of(1), (await answers([running]))[0])
    later = await asyncio.wait_for(batcher.submit(rows_of(3), 1), 5)
    check_answer(rows_of(3), later)
    assert [s["x"][0, 0] for s in model.seen] == [1, 3]  # row 2 never reached the model


async def test_request_timing_out_while_running(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0)
    model.hold()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows_of(1), 1, timeout_s=0.02)
    assert model.batches == [1]
    model.release()
    result = await asyncio.wait_for(batcher.submit(rows_of(2), 1), 5)
    check_answer(rows_of(2), result)


async def test_an_earlier_deadline_arriving_later_fires_first(make: Factory) -> None:
    """One timer serves every deadline: a short one submitted after a long one is not
    held back by it, and the long one still succeeds."""
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0)
    model.hold()
    long = asyncio.create_task(batcher.submit(rows_of(1), 1, timeout_s=5.0))
    await until(lambda: model.batches == [1])
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="timed out after 20 ms"):
        await batcher.submit(rows_of(2), 1, timeout_s=0.02)
    assert time.monotonic() - started < 1.0
    model.release()
    check_answer(rows_of(1), (await answers([long]))[0])


async def test_answered_requests_leave_the_deadline_heap(make: Factory) -> None:
    """Requests answered long before their deadline do not pile up (each holds its
    tensors): the heap keeps about the requests still waiting."""
    batcher, _ = make(max_batch_size=4, max_queue_delay_us=0)
    for i in range(200):
        check_answer(rows_of(i), await batcher.submit(rows_of(i), 1, timeout_s=30.0))
    assert len(batcher._deadlines) <= 2


async def test_default_timeout_comes_from_the_config(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0, default_timeout_us=20_000)
    assert batcher.default_timeout_s == 0.02
    model.hold()
    with pytest.raises(DeadlineExceeded, match=r"timed out after 20 ms"):
        await batcher.submit(rows_of(1), 1)


# -- failures -------------------------------------------------------------------------------


async def test_turnout_error_fails_every_request_of_the_batch(make: Factory) -> None:
    batcher, model = make(max_batch_size=3, max_queue_delay_us=1000)
    error = ModelNotReady("replica went away")
    model.error = error
    tasks = submit_all(batcher, [rows_of(i) for i in range(3)])
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert outcomes == [error, error, error]
    assert model.batches == [3]

    model.error = None  # the batcher keeps serving
    requests = [rows_of(i) for i in range(3, 6)]
    for request, answer in zip(requests, await answers(submit_all(batcher, requests)), strict=True):
        check_answer(request, answer)
    assert model.batches == [3, 3]


async def test_plain_exception_becomes_backend_error(make: Factory) -> None:
    batcher, model = make(max_batch_size=2)
    model.error = RuntimeError("kaboom")
    tasks = submit_all(batcher, [rows_of(1), rows_of(2)])
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    for outcome in outcomes:
        assert isinstance(outcome, BackendError)
        assert outcome.message == "model 'm/1' failed: kaboom"

    model.error = None
    requests = [rows_of(3), rows_of(4)]
    for request, answer in zip(requests, await answers(submit_all(batcher, requests)), strict=True):
        check_answer(request, answer)


async def test_wrong_output_rows_fail_the_whole_batch(make: Factory) -> None:
    batcher, model = make(max_batch_size=3)
    model.drop_rows = 1
    tasks = submit_all(batcher, [rows_of(1), rows_of(2, 3)])
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(batcher.submit(rows_of(9), 1)))  # next batch
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks[:2], return_exceptions=True), 5)
    for outcome in outcomes:
        assert isinstance(outcome, BackendError)
        assert outcome.message == "model 'm/1' output 'y' has 2 rows for a batch of 3"
    assert model.batches[0] == 3
    model.drop_rows = 0
    await batcher.close()
    check_answer(rows_of(9), await tasks[2])


async def test_wrong_output_rows_fail_a_lone_request_too(make: Factory) -> None:
    # Whether a request shares its batch depends on load; the outcome must not.
    batcher, model = make(max_batch_size=4, max_queue_delay_us=0)
    model.drop_rows = 1
    with pytest.raises(BackendError, match="output 'y' has 1 rows for a batch of 2"):
        await batcher.submit(rows_of(1, 2), 2)


async def test_unbatched_outputs_pass_through_whatever_their_rows(make: Factory) -> None:
    batcher, model = make(batchable=False)
    model.drop_rows = 1
    result = await asyncio.wait_for(batcher.submit(rows_of(1, 2), 1), 5)
    np.testing.assert_array_equal(result["y"], rows_of(1)["x"] * 2)


# -- concurrency and shutdown ---------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "inflight"), [(1, 1), (1, 2), (2, 3)])
async def test_inflight_batches_are_capped(make: Factory, replicas: int, inflight: int) -> None:
    batcher, model = make(max_batch_size=1, max_inflight_batches=inflight, replicas=replicas)
    slots = replicas * inflight
    model.hold()
    requests = [rows_of(i) for i in range(slots + 3)]
    tasks = submit_all(batcher, requests)
    await until(lambda: model.active == slots)
    await settle()
    assert model.active == slots
    assert batcher.inflight_batches == slots
    assert batcher.queue_depth == 3
    model.release()
    for request, answer in zip(requests, await answers(tasks), strict=True):
        check_answer(request, answer)
    assert model.max_active == slots
    assert model.batches == [1] * (slots + 3)
    assert batcher.inflight_batches == 0


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_partial_batch_waits_while_every_replica_runs_one(
    make: Factory, replicas: int
) -> None:
    """With every replica running a batch, of a model whose batches take less than the
    queue delay, requests left over past their delay do not take a spare slot as a batch of
    their own: they wait for a running batch to end, joined by those that arrive meanwhile.
    A full batch still takes the spare slot at once."""
    batcher, model = make(
        max_batch_size=4, max_inflight_batches=2, replicas=replicas, max_queue_delay_us=20_000
    )
    await answers(submit_all(batcher, [rows_of(i) for i in range(4)]))  # a fast batch
    model.batches.clear()
    model.hold()
    running = submit_all(batcher, [rows_of(i) for i in range(4 * replicas)])
    await until(lambda: model.active == replicas)
    leftovers = submit_all(batcher, [rows_of(10), rows_of(11)])
    await asyncio.sleep(0.1)  # 5 queue delays
    assert model.active == replicas and batcher.queue_depth == 2
    later = submit_all(batcher, [rows_of(12), rows_of(13)])  # now a full batch: it goes
    await until(lambda: model.active == replicas + 1)
    assert model.batches == [4] * (replicas + 1) and batcher.queue_depth == 0
    model.release()
    await answers(running + leftovers + later)


@pytest.mark.parametrize(
    ("replicas", "measured", "delay_us"),
    [(1, False, 1000), (2, True, 20_000)],
    ids=["slow-model", "idle-replica"],
)
async def test_a_partial_batch_takes_a_spare_slot(
    make: Factory, replicas: int, measured: bool, delay_us: int
) -> None:
    """A model whose batches take longer than the queue delay (here: not measured yet, so
    taken as long): waiting for one to end would hold requests past the delay they were
    allowed. Or two replicas, one busy: the other takes a partial batch once its delay is
    over, however fast the batches are."""
    batcher, model = make(
        max_batch_size=4, max_inflight_batches=2, replicas=replicas, max_queue_delay_us=delay_us
    )
    if measured:
        await answers(submit_all(batcher, [rows_of(i) for i in range(4)]))  # a fast batch
        model.batches.clear()
    model.hold()
    running = submit_all(batcher, [rows_of(i) for i in range(4)])
    await until(lambda: model.active == 1)
    leftover = submit_all(batcher, [rows_of(10)])
    await until(lambda: model.active == 2)
    assert model.batches == [4, 1]
    model.release()
    await answers(running + leftover)


async def test_close_drains_then_refuses(make: Factory) -> None:
    batcher, model = make(max_batch_size=2, max_inflight_batches=1)
    model.hold()
    requests = [rows_of(i) for i in range(5)]
    tasks = submit_all(batcher, requests)
    await until(lambda: model.batches == [2])
    closing = asyncio.create_task(batcher.close())
    await settle()
    with pytest.raises(ServerShuttingDown, match="model 'm/1' is shutting down"):
        await batcher.submit(rows_of(9), 1)
    assert not closing.done()
    model.release()
    for request, answer in zip(requests, await answers(tasks), strict=True):
        check_answer(request, answer)
    await asyncio.wait_for(closing, 5)
    assert model.batches == [2, 2, 1]
    with pytest.raises(ServerShuttingDown):
        await batcher.submit(rows_of(10), 1)


async def test_close_past_its_drain_timeout_fails_the_queued(make: Factory) -> None:
    batcher, model = make(max_batch_size=1, max_inflight_batches=1)
    model.hold()
    running = asyncio.create_task(batcher.submit(rows_of(0), 1))
    await until(lambda: model.batches == [1])
    queued = asyncio.create_task(batcher.submit(rows_of(1), 1))
    await settle()
    await batcher.close(drain_timeout_s=0.01)
    with pytest.raises(ServerShuttingDown, match="model 'm/1' shut down before the request ran"):
        await queued
    model.release()
    check_answer(rows_of(0), await asyncio.wait_for(running, 5))  # in flight: still answered
    assert model.batches == [1]


async def test_submit_before_start_is_refused() -> None:
    batcher = Batcher("m/1", FakeModel(), ModelConfig(), batchable=True, replicas=1)
    with pytest.raises(ServerShuttingDown):
        await batcher.submit(rows_of(1), 1)


# -- statistics -----------------------------------------------------------------------------


async def test_stats_count_rows_calls_and_batch_sizes(make: Factory) -> None:
    batcher, model = make(max_batch_size=4, max_queue_delay_us=1000)
    await answers(submit_all(batcher, [rows_of(1, 2), rows_of(3), rows_of(4)]))
    await answers(submit_all(batcher, [rows_of(5, 6, 7), rows_of(8, 9)]))
    await answers(submit_all(batcher, [rows_of(10)]))
    assert model.batches == [4, 3, 2, 1]
    stats = batcher.stats
    assert stats.inference_count == 10
    assert stats.execution_count == 4
    assert stats.batch_sizes == {4: 1, 3: 1, 2: 1, 1: 1}
    assert stats.success_count == 6
    assert stats.fail_count == 0
    assert stats.compute_ns > 0
    assert stats.queue_ns > 0


async def test_stats_count_failures_apart(make: Factory) -> None:
    batcher, model = make(max_batch_size=2)
    await answers(submit_all(batcher, [rows_of(1), rows_of(2)]))
    model.error = RuntimeError("kaboom")
    tasks = submit_all(batcher, [rows_of(3), rows_of(4)])
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    stats = batcher.stats
    assert (stats.success_count, stats.fail_count) == (2, 2)
    # As in Triton's statistics extension, counts of executions are of successful ones.
    assert (stats.inference_count, stats.execution_count) == (2, 1)
    assert stats.batch_sizes == {2: 1}


def test_batcher_fills_per_request_timing() -> None:
    async def scenario() -> list[BatchTiming]:
        async def run_batch(inputs: Tensors) -> Tensors:
            await asyncio.sleep(0.02)
            return {"y": inputs["x"] * 2}

        config = ModelConfig(max_batch_size=8, max_queue_delay_us=20_000)
        batcher = Batcher("m", run_batch, config, batchable=True, replicas=1)
        batcher.start()
        timings = [BatchTiming() for _ in range(3)]
        x = np.ones((1, 2), np.float32)
        results = await asyncio.gather(
            batcher.submit({"x": x}, 1, None, timings[0]),
            batcher.submit({"x": np.ones((2, 2), np.float32)}, 2, None, timings[1]),
            batcher.submit({"x": x}, 1, None, timings[2]),
            batcher.submit({"x": x}, 1),  # no timing: the old call still works
        )
        assert [r["y"].shape[0] for r in results] == [1, 2, 1, 1]
        await batcher.close(1)
        return timings

    timings = asyncio.run(scenario())
    for timing in timings:
        assert timing.batch_size == 5
        assert timing.batch_s >= 0.015
        assert 0 < timing.queue_s < 1


def test_a_partial_batch_waits_without_spinning_the_loop() -> None:
    """On uvloop, whose timers round to whole milliseconds, a lone request's 400 us wait is
    one arming of the batcher's timer: dispatch runs at the arrival's turn and when due, not
    on every turn in between (a loop timer re-armed for the rest spun it ~40-100 times)."""

    async def main() -> None:
        model = FakeModel()
        config = ModelConfig(max_batch_size=4, max_queue_delay_us=400)
        batcher = Batcher("m/1", model, config, batchable=True, replicas=1)
        batcher.start()
        dispatch = mock.Mock(wraps=batcher._dispatch)  # counts, and dispatches
        batcher._dispatch = dispatch  # type: ignore[method-assign]
        started = time.perf_counter()
        result = await asyncio.wait_for(batcher.submit(rows_of(5), 1), 5)
        check_answer(rows_of(5), result)
        assert model.batches == [1]
        assert time.perf_counter() - started >= 400e-6
        assert dispatch.call_count <= 3  # arrival, timer, the batch's end
        await batcher.close(drain_timeout_s=2)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@st.composite
def batching_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Any per-model batching knobs the schema accepts, small enough to run quickly."""
    max_batch = draw(st.integers(0, 8))
    preferred = draw(st.lists(st.integers(1, max(max_batch, 1)), max_size=3)) if max_batch else []
    return {
        "max_batch_size": max_batch,
        "preferred_batch_sizes": preferred,
        "max_queue_delay_us": draw(st.sampled_from([0, 100, 500, 2000])),
        "max_queue_size": draw(st.integers(1, 12)),
        "max_inflight_batches": draw(st.none() | st.integers(1, 3)),
    }


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    knobs=batching_configs(),
    batchable=st.booleans(),
    replicas=st.integers(1, 3),
    requests=st.lists(
        st.tuples(st.integers(1, 10), st.sampled_from([2, 3]), st.booleans(), st.booleans()),
        min_size=1,
        max_size=30,
    ),
)
def test_any_config_answers_every_request_with_its_rows_or_a_clear_refusal(
    knobs: dict[str, Any],
    batchable: bool,
    replicas: int,
    requests: list[tuple[int, int, bool, bool]],
) -> None:
    """Whatever the knobs and whatever arrives (rows, inner widths that cannot share a call,
    arrivals together or a turn apart, some with a deadline already short), every request
    ends: its own rows doubled, or InvalidInput (more rows than a batch), QueueFull or
    DeadlineExceeded. No batch passes ``max_batch_size`` rows; unbatched, a call carries one
    request."""

    async def main() -> None:
        model = FakeModel()
        config = ModelConfig(**knobs)
        batcher = Batcher("m/1", model, config, batchable=batchable, replicas=replicas)
        batcher.start()
        tasks: list[tuple[Tensors, asyncio.Task[Tensors]]] = []
        for i, (rows, width, later, short) in enumerate(requests):
            if later:
                await asyncio.sleep(0)
            request = rows_of(*range(i * 10, i * 10 + rows), width=width)
            timeout = 1e-4 if short else None
            tasks.append((request, asyncio.create_task(batcher.submit(request, rows, timeout))))
        await asyncio.wait([t for _, t in tasks], timeout=10)
        for request, task in tasks:
            assert task.done(), "a request never ended"
            error = task.exception()
            if error is None:
                check_answer(request, task.result())
            else:
                assert isinstance(error, InvalidInput | QueueFull | DeadlineExceeded), error
        for call in model.seen:
            owners = {int(v) // 10 for v in call["x"][:, 0]}  # request i's rows are i*10+
            if batchable and config.max_batch_size:
                assert len(call["x"]) <= config.max_batch_size
            else:
                assert len(owners) == 1  # one request per call
        await batcher.close(drain_timeout_s=2)
        assert batcher.queue_depth == 0

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
