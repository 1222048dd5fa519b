"""The edge batcher: requests for one (model, version) are stacked into one backend call.

Triton's knobs, Triton's meaning: a batch is dispatched when it reaches ``max_batch_size``
(or a preferred size), or when its oldest request has waited ``max_queue_delay_us``. While
every replica slot is busy requests keep queueing, so under load batches fill by
themselves and the delay only matters when the server is idle.

Rows are stacked along the first dimension and split back by offset. Requests whose inner
shapes or dtypes differ cannot share a call; they wait for the next batch, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidInput,
    QueueFull,
    ServerShuttingDown,
    TurnoutError,
)
from gateway.settings import ModelConfig
from turnout_contract.records import BatchTiming, Placement, Tensors

__all__ = ["BatchStats", "BatchTiming", "Batcher", "RunBatch", "Tensors"]

log = logging.getLogger(__name__)

# A backend call answers with the outputs, or the outputs and where they were computed.
RunBatch = Callable[[Tensors], Awaitable[Tensors | tuple[Tensors, Placement]]]
_random_bits = random.getrandbits
DEFAULT_INFLIGHT_BATCHES = 2  # when neither the model's config nor its backend says


@dataclass(slots=True)
class _Pending:
    inputs: Tensors
    rows: int
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    future: asyncio.Future[Tensors]
    enqueued: float
    timing: BatchTiming | None = None


@dataclass(slots=True)
class BatchStats:
    """Counters in the shape of Triton's statistics extension."""

    inference_count: int = 0  # rows served by successful backend calls
    execution_count: int = 0  # successful backend calls
    success_count: int = 0  # requests answered
    fail_count: int = 0
    queue_ns: int = 0  # summed over requests
    compute_ns: int = 0  # summed over successful batches
    batch_sizes: dict[int, int] = field(default_factory=dict)
    failed_batches: int = 0  # backend calls that raised


class Batcher:
    """Queue, batch and dispatch requests for one model version.

    Built on the running event loop (``start``); ``submit`` is the only call on the hot path.
    """

    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        config: ModelConfig,
        *,
        batchable: bool,
        replicas: int,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._batchable = batchable and config.max_batch_size > 0
        self._max_rows = config.max_batch_size if self._batchable else 1
        self._delay_s = config.max_queue_delay_us / 1e6 if self._batchable else 0.0
        self._preferred = sorted(set(config.preferred_batch_sizes)) if self._batchable else []
        self._max_queue = config.max_queue_size
        per_replica = config.max_inflight_batches or DEFAULT_INFLIGHT_BATCHES
        self._slots_total = max(1, replicas * per_replica)
        self.default_timeout_s = config.default_timeout_us / 1e6
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()

    @property
    def max_batch_size(self) -> int:
        return self._max_rows if self._batchable else 0

    @property
    def max_queue_size(self) -> int:
        return self._max_queue

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def inflight_batches(self) -> int:
        return self._inflight

    def start(self) -> None:
        # Events and tasks belong to the loop that runs the servers, so build them there.
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(
            self._dispatch_loop(), name=f"batcher:{self.name}"
        )

    async def submit(
        self,
        inputs: Tensors,
        rows: int,
        timeout_s: float | None = None,
        timing: BatchTiming | None = None,
    ) -> Tensors:
        """Queue one request's tensors and wait for its share of the batch's outputs.

        ``timing``, when given, is filled in when the request's batch ends (success or not).
        """
        if self._closed or self._wakeup is None:
            raise ServerShuttingDown(f"model '{self.name}' is shutting down")
        if self._batchable and rows > self._max_rows:
            raise InvalidInput(
                f"batch of {rows} rows exceeds max_batch_size {self._max_rows} "
                f"of model '{self.name}'"
            )
        if len(self._queue) >= self._max_queue:
            self._drop_expired()
        if len(self._queue) >= self._max_queue:
            raise QueueFull(
                f"model '{self.name}' queue is full ({self._max_queue} requests waiting)"
            )
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        pending = _Pending(
            inputs=inputs,
            rows=rows,
            signature=tuple((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()),
            future=loop.create_future(),
            enqueued=enqueued,
            timing=timing,
        )
        if timing is not None:
            timing.enqueued = enqueued
        self._queue.append(pending)
        self._queued_rows += rows
        self._wakeup.set()
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            # wait_for cancelled the future: the dispatcher skips it, or drops its result.
            raise DeadlineExceeded(
                f"request to model '{self.name}' timed out after {timeout * 1e3:.3g} ms"
            ) from None

    def _drop_expired(self) -> None:
        """Forget requests that timed out while queued, so they hold no place in the queue."""
        live = [p for p in self._queue if not p.future.done()]
        self._queue.clear()
        self._queue.extend(live)
        self._queued_rows = sum(p.rows for p in live)

    async def _dispatch_loop(self) -> None:
        assert self._wakeup is not None and self._slot_freed is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            while self._inflight >= self._slots_total:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            await self._wait_to_fill()
            batch = self._take_batch()
            if not batch:
                continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _wait_to_fill(self) -> None:
        """Wait until the batch is full, a preferred size is reached, or the delay is over."""
        assert self._wakeup is not None
        if not self._batchable:
            return
        deadline = self._queue[0].enqueued + self._delay_s
        while not self._closed and not self._full_enough():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _full_enough(self) -> bool:
        rows = self._queued_rows
        if rows >= self._max_rows:
            return True
        return (bool(self._preferred) and rows >= self._preferred[-1]) or rows in self._preferred

    def _take_batch(self) -> list[_Pending]:
        limit = self._max_rows
        if self._preferred and self._queued_rows < self._max_rows:
            fitting = [p for p in self._preferred if p <= self._queued_rows]
            if fitting:
                limit = fitting[-1]
        batch: list[_Pending] = []
        deferred: list[_Pending] = []
        rows = 0
        signature = None
        queue = self._queue
        while queue:
            pending = queue[0]
            if pending.future.done():  # timed out while waiting
                queue.popleft()
                self._queued_rows -= pending.rows
                continue
            if batch and rows + pending.rows > limit:
                break
            queue.popleft()
            self._queued_rows -= pending.rows
            if signature is None:
                signature = pending.signature
            elif pending.signature != signature:
                deferred.append(pending)
                continue
            batch.append(pending)
            rows += pending.rows
            if not self._batchable:
                break
        for pending in reversed(deferred):
            queue.appendleft(pending)
            self._queued_rows += pending.rows
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        rows = sum(p.rows for p in batch)
        placement: Placement | None = None
        try:
            if len(batch) == 1:
                stacked = batch[0].inputs
            else:
                stacked = {
                    name: np.concatenate([p.inputs[name] for p in batch])
                    for name in batch[0].inputs
                }
            answer = await self._run_batch(stacked)
            if isinstance(answer, tuple):
                outputs, placement = answer
            else:
                outputs = answer
            self._deliver(batch, rows, outputs)
        except TurnoutError as exc:
            self.stats.failed_batches += 1
            self._fail(batch, exc)
        except Exception as exc:
            self.stats.failed_batches += 1
            log.exception("batch of %d rows for %s failed", rows, self.name)
            self._fail(batch, BackendError(f"model '{self.name}' failed: {exc}"))
        else:
            # As in Triton's statistics, executions and their rows count only when they succeed.
            stats = self.stats
            stats.execution_count += 1
            stats.inference_count += rows
            stats.compute_ns += int((time.perf_counter() - started) * 1e9)
            stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1
        finally:
            finished = time.perf_counter()
            queue_ns = 0
            batch_id = 0
            for p in batch:
                queue_ns += int((started - p.enqueued) * 1e9)
                timing = p.timing
                if timing is not None:
                    if not batch_id:
                        batch_id = _random_bits(64) or 1
                    timing.queue_s = started - p.enqueued
                    timing.batch_s = finished - started
                    timing.batch_size = rows
                    timing.batch_id = batch_id
                    timing.placement = placement
            self.stats.queue_ns += queue_ns
            self._inflight -= 1
            assert self._slot_freed is not None
            self._slot_freed.set()

    def _deliver(self, batch: list[_Pending], rows: int, outputs: Tensors) -> None:
        # Checked for a lone request too: whether it had company must not change its outcome.
        if self._batchable:
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != rows:
                    raise BackendError(
                        f"model '{self.name}' output '{name}' has "
                        f"{value.shape[0] if value.ndim else 0} rows for a batch of {rows}"
                    )
        if len(batch) == 1:
            self._resolve(batch[0], outputs)
            return
        offset = 0
        for pending in batch:
            end = offset + pending.rows
            self._resolve(pending, {name: value[offset:end] for name, value in outputs.items()})
            offset = end

    def _resolve(self, pending: _Pending, outputs: Tensors) -> None:
        if not pending.future.done():
            pending.future.set_result(outputs)
            self.stats.success_count += 1

    def _fail(self, batch: list[_Pending], exc: TurnoutError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)
                self.stats.fail_count += 1

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let queued and in-flight ones finish, then stop."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        deadline = time.monotonic() + drain_timeout_s
        while (self._queue or self._batch_tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(
                    ServerShuttingDown(f"model '{self.name}' shut down before the request ran")
                )
        self._queue.clear()
