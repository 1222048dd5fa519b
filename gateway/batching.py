"""The edge batcher: requests for one (model, version) are stacked into one backend call.

Triton's knobs, Triton's meaning: a batch is dispatched when it reaches ``max_batch_size``
(or a preferred size), or when its oldest request has waited ``max_queue_delay_us``. While
every replica slot is busy requests keep queueing, so under load batches fill by
themselves and the delay only matters when the server is idle.

Rows are stacked along the first dimension and split back by offset. Requests whose inner
shapes or dtypes differ cannot share a call; they wait for the next batch, in order. A call
that succeeded leaves its stacked inputs and outputs in one
:class:`turnout_contract.records.BatchTensors`, which the timing of every request it carried
points to (with the request's first row): the record emitter samples tensors per call.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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
from gateway.precise_timer import PreciseTimer
from gateway.settings import ModelConfig
from turnout_contract.records import BatchTensors, BatchTiming, Placement, Tensors

__all__ = ["BatchAnswer", "BatchStats", "BatchTiming", "Batcher", "RunBatch", "Tensors"]

log = logging.getLogger(__name__)

BatchAnswer = Tensors | tuple[Tensors, Placement]
"""A backend call answers with the outputs, or the outputs and where they were computed."""
RunBatch = Callable[[Tensors], Awaitable[BatchAnswer]]
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
    timeout_s: float = 0.0


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
    arrived_rows: int = 0  # rows queued (the autoscaler's arrival rate)
    rows_squared: int = 0  # sum of rows^2 over successful batches: with rows_compute_ns,
    rows_compute_ns: int = 0  # sum of rows x ns, a least-squares fit of time against size
    batched_requests: int = 0  # requests that left the queue in a batch (queue_ns's count)


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
        self._batch_axis = batchable
        self._batchable = batchable and config.max_batch_size > 0
        self._max_rows = config.max_batch_size if self._batchable else 1
        self._delay_s = config.max_queue_delay_us / 1e6 if self._batchable else 0.0
        self._preferred = sorted(set(config.preferred_batch_sizes)) if self._batchable else []
        self._max_queue = config.max_queue_size
        self._per_replica = config.max_inflight_batches or DEFAULT_INFLIGHT_BATCHES
        self._replicas = max(1, replicas)  # scaled to zero: the one its arrival starts
        self._slots_total = max(1, replicas * self._per_replica)
        self.default_timeout_s = config.default_timeout_us / 1e6
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._batch_s = float("inf")  # a batch's time, a moving average (unknown: long)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Dispatches a batch whose delay is over. Precise: the delay is often under the
        # loop's millisecond, which a plain loop timer would spin on.
        self._timer: PreciseTimer | None = None
        self._dispatch_due = False
        self._batch_tasks: set[asyncio.Task[None]] = set()
        # One timer for every request's deadline, not one each: (deadline, seq, request),
        # answered heads popped as requests arrive (they end roughly in order), and the
        # timer re-armed only for an earlier deadline than it waits for.
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._deadline_seq = itertools.count()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = float("inf")

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

    def set_replicas(self, replicas: int) -> None:
        """The version now has ``replicas`` (scaled): as many batches may be in flight; with
        none, one, which waits for the replica that its arrival starts."""
        self._replicas = max(1, replicas)  # scaled to zero: the one its arrival starts
        self._slots_total = max(1, replicas * self._per_replica)
        if self._loop is not None:
            self._dispatch()

    def full(self) -> bool:
        """No room in the queue: a request now would be refused (those that timed out
        while queued hold no place)."""
        if len(self._queue) < self._max_queue:
            return False
        self._drop_expired()
        return len(self._queue) >= self._max_queue

    def room(self) -> int:
        """Requests the queue would take now (those that timed out while queued hold no
        place)."""
        room = self._max_queue - len(self._queue)
        if room <= 0:
            self._drop_expired()
            room = self._max_queue - len(self._queue)
        return max(room, 0)

    def start(self) -> None:
        # Timers and batch tasks belong to the loop that runs the servers.
        self._loop = asyncio.get_running_loop()

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
        if self._closed or self._loop is None:
            raise ServerShuttingDown(f"model '{self.name}' is shutting down")
        if self._batchable and rows > self._max_rows:
            raise InvalidInput(
                f"batch of {rows} rows exceeds max_batch_size {self._max_rows} "
                f"of model '{self.name}'"
            )
        if self.full():
            raise QueueFull(
                f"model '{self.name}' queue is full ({self._max_queue} requests waiting)"
            )
        enqueued = time.perf_counter()
        pending = _Pending(
            inputs=inputs,
            rows=rows,
            signature=tuple((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()),
            future=self._loop.create_future(),
            enqueued=enqueued,
            timing=timing,
        )
        if timing is not None:
            timing.enqueued = enqueued
        self._queue.append(pending)
        self._queued_rows += rows
        self.stats.arrived_rows += rows
        if not self._dispatch_due:
            # At the end of this loop turn, so requests that arrived together batch together.
            self._dispatch_due = True
            self._loop.call_soon(self._dispatch)
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        pending.timeout_s = timeout
        deadline = enqueued + timeout
        deadlines = self._deadlines
        heapq.heappush(deadlines, (deadline, next(self._deadline_seq), pending))
        while deadlines[0][2].future.done():  # answered, or its waiter gone
            heapq.heappop(deadlines)
        if deadline < self._deadline_at:
            self._arm_deadline(deadline)
        # The deadline sets the future's exception (DeadlineExceeded): awaiting the future
        # alone costs no timer per request (asyncio.timeout arms and cancels one each).
        return await pending.future

    def _arm_deadline(self, deadline: float) -> None:
        assert self._loop is not None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_at = deadline
        delay = max(0.0, deadline - time.perf_counter())
        self._deadline_timer = self._loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """Fail every request whose deadline has passed (queued or in a running batch: the
        batch's answer for it is dropped), then wait for the next deadline."""
        self._deadline_timer = None
        self._deadline_at = float("inf")
        deadlines = self._deadlines
        now = time.perf_counter()
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].future.done()):
            _, _, pending = heapq.heappop(deadlines)
            if not pending.future.done():
                pending.future.set_exception(
                    DeadlineExceeded(
                        f"request to model '{self.name}' timed out after "
                        f"{pending.timeout_s * 1e3:.3g} ms"
                    )
                )
        if deadlines:
            self._arm_deadline(deadlines[0][0])

    def _drop_expired(self) -> None:
        """Forget requests that timed out while queued, so they hold no place in the queue."""
        live = [p for p in self._queue if not p.future.done()]
        self._queue.clear()
        self._queue.extend(live)
        self._queued_rows = sum(p.rows for p in live)

    def _dispatch(self) -> None:
        """Start every batch that may start now: a replica slot is free and the batch is full
        enough, or its oldest request has waited ``max_queue_delay_us`` (and, when every
        replica runs a batch that takes less than that delay, one has ended).

        A replica's spare slots (``max_inflight_batches``) then take full batches only. A
        partial batch's fixed work (the bench's MLP: 92 us at one row, 127 us at four) is
        wasted when a running batch would end within the delay its requests were allowed
        anyway: under a crowd of 256 clients the MLP's batches of 4 carried 2.9-3.1
        rows on average, 3.6-3.8 with this (``max_queue_size: 8``, batches on the loop's
        thread). A slow model's partial batch still takes a spare slot, so its wait stays
        bounded by the delay.

        Called when a batch ends, right there rather than by a task woken for it: under
        overload every loop turn is shared with new arrivals, so a freed slot is filled in
        the same turn instead of one turn later. Arrivals call it at the end of their turn.
        """
        assert self._loop is not None
        self._dispatch_due = False
        while self._queue and self._inflight < self._slots_total:
            if self._batchable and not self._closed and not self._full_enough():
                if self._inflight >= self._replicas and self._batch_s <= self._delay_s:
                    # Every replica runs a batch that ends sooner than a queue delay: the
                    # next end dispatches again, with whatever arrived meanwhile.
                    return
                due = self._queue[0].enqueued + self._delay_s
                if due > time.perf_counter():
                    self._wake_at(due)
                    return
            batch = self._take_batch()
            if batch:
                self._start(batch)

    def _wake_at(self, due: float) -> None:
        if self._timer is None:
            assert self._loop is not None
            self._timer = PreciseTimer(self._loop, self._dispatch)
        elif self._timer.due is not None and self._timer.due <= due:
            return
        self._timer.arm(due)

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

    def _start(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        self._inflight += 1
        task = self._loop.create_task(self._execute(batch))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        inputs = _stack(batch)
        try:
            answer = await self._run_batch(inputs)
        except Exception as exc:
            self._finish(batch, started, inputs, None, exc)
        else:
            self._finish(batch, started, inputs, answer, None)

    def _finish(
        self,
        batch: list[_Pending],
        started: float,
        inputs: Tensors,
        answer: BatchAnswer | None,
        error: BaseException | None,
    ) -> None:
        """Answer the batch's requests (or fail them), count it, and start the next one."""
        rows = sum(p.rows for p in batch)
        placement: Placement | None = None
        tensors: BatchTensors | None = None
        try:
            if error is not None:
                raise error
            assert answer is not None
            if isinstance(answer, tuple):
                outputs, placement = answer
            else:
                outputs = answer
            self._deliver(batch, rows, outputs)
            tensors = self._tensors(inputs, outputs, rows)
        except TurnoutError as exc:
            self.stats.failed_batches += 1
            self._fail(batch, exc)
        except Exception as exc:
            self.stats.failed_batches += 1
            log.error("batch of %d rows for %s failed", rows, self.name, exc_info=exc)
            self._fail(batch, BackendError(f"model '{self.name}' failed: {exc}"))
        else:
            # As in Triton's statistics, executions and their rows count only when they succeed.
            stats = self.stats
            stats.execution_count += 1
            stats.inference_count += rows
            took_ns = int((time.perf_counter() - started) * 1e9)
            took_s = took_ns / 1e9
            known = self._batch_s
            self._batch_s = took_s if known == float("inf") else known + 0.2 * (took_s - known)
            stats.compute_ns += took_ns
            stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1
            stats.rows_squared += rows * rows
            stats.rows_compute_ns += rows * took_ns
        finally:
            finished = time.perf_counter()
            queue_ns = 0
            batch_id = 0
            row = 0
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
                    timing.row = row
                    timing.tensors = tensors
                row += p.rows
            self.stats.queue_ns += queue_ns
            self.stats.batched_requests += len(batch)
            self._inflight -= 1
            self._dispatch()

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

    def _tensors(self, inputs: Tensors, outputs: Tensors, rows: int) -> BatchTensors | None:
        """The call's tensors for its records: a model without a batch axis gets its one
        request's tensors as one row; outputs that do not have a row per input row, none."""
        if not self._batch_axis:
            return BatchTensors(
                {k: v[None] for k, v in inputs.items()}, {k: v[None] for k, v in outputs.items()}, 1
            )
        for value in outputs.values():
            if value.ndim == 0 or value.shape[0] != rows:
                return None
        return BatchTensors(inputs, outputs, rows)

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
        if self._loop is not None:
            self._dispatch()  # closed: what is queued goes without waiting to fill
        deadline = time.monotonic() + drain_timeout_s
        while (self._queue or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(
                    ServerShuttingDown(f"model '{self.name}' shut down before the request ran")
                )
        self._queue.clear()


def _stack(batch: list[_Pending]) -> Tensors:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
