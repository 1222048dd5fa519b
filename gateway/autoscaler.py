"""Replica autoscaling from the gateway's own queue.

With batching in the gateway, Ray Serve's autoscaler sees one batch in flight per replica
whatever the queue, so it cannot see demand. The gateway can: every second it reads each
version's batcher counters (rows arrived, batches, their sizes and times, queue waits) and
asks for the fewest replicas that keep the predicted queue delay under
``target_queue_delay_ms`` (docs/autoscaling.md has the model and its checks).

The model of a batching replica: a batch of ``b`` rows takes ``T(b) = a + s*b`` seconds
(``a`` and ``s`` fitted by least squares to the batches of the window); one replica serves
at most ``mu = B / T(B)`` rows/s at full batches (``B`` = max_batch_size). With ``c``
replicas sharing ``L`` rows/s, each runs at ``u = L / (c * mu)``; below saturation a replica
keeps up with batches of ``b* = l*a / (1 - l*s)`` rows (``l = L/c``: the rows that arrive
while the previous batch runs), and a row waits for the first of the ``c`` running batches
to end: ``W(c) = T(b*) / (c + 1)`` (within 10% of a seeded simulation of Poisson arrivals
for u in 0.3..0.9 and c in 1..4; above it below u = 0.3; 20-30% below it at u = 0.95).
Wanted: the fewest ``c`` with ``u <= 0.8`` and ``W(c) <= target``, for the window's
arrival rate or the last tick's if higher (a step shows there first). Up: when the
estimate says so, or the measured mean queue delay is over the target (then at least one
more), straight to the estimate, then ``scale_up_cooldown_s`` without another. Down: only
when fewer replicas would meet half the target at ``u <= 0.6`` and the measured delay is
under half the target, for ``scale_down_delay_s`` without a break (hysteresis). Zero: with
``min_replicas: 0``, after ``scale_to_zero_after_s`` without a request; the next request
waits at the gateway while a replica starts (``ModelTable._wake``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.batching import BatchStats
from gateway.errors import TurnoutError
from gateway.models import LoadedModel, ModelTable
from gateway.settings import AutoscalingConfig

__all__ = [
    "Autoscaler",
    "BatchCost",
    "Load",
    "Sample",
    "Scaler",
    "queue_delay_s",
    "replicas_for",
]

log = logging.getLogger(__name__)

TICK_S = 1.0
UP_UTILISATION = 0.8
"""Scale up before a replica is busier than this: Poisson bursts need the rest."""
DOWN_UTILISATION = 0.6
"""Scale down only to a count that stays below this (with half the delay target)."""
MIN_SIZE_SPREAD = 0.25
"""Batch sizes must vary by this much (variance, rows squared) to fit a cost line."""


@dataclass(frozen=True, slots=True)
class BatchCost:
    """What a batch costs a replica: ``fixed_s + per_row_s * rows`` seconds."""

    fixed_s: float
    per_row_s: float

    def seconds(self, rows: float) -> float:
        return self.fixed_s + self.per_row_s * rows

    @classmethod
    def fit(
        cls, batches: int, rows: int, rows_sq: int, busy_s: float, rows_busy_s: float
    ) -> BatchCost | None:
        """Least squares of batch time on batch size; None when the sizes barely varied
        (the line is not identifiable) or the fit is not a cost (negative parts)."""
        if batches < 3:
            return None
        spread = batches * rows_sq - rows * rows  # batches^2 x the variance of sizes
        if spread < MIN_SIZE_SPREAD * batches * batches:
            return None
        per_row = (batches * rows_busy_s - rows * busy_s) / spread
        fixed = (busy_s - per_row * rows) / batches
        if per_row <= 0 or fixed < 0:
            return None
        return cls(fixed, per_row)


def queue_delay_s(
    arrival_rows_per_s: float, replicas: int, cost: BatchCost, max_rows: int
) -> tuple[float, float]:
    """(utilisation, predicted mean queue delay) of ``replicas`` batching replicas sharing
    ``arrival_rows_per_s``; the delay is infinite at or past saturation."""
    most = max(1, max_rows)
    capacity = most / cost.seconds(most)
    per_replica = arrival_rows_per_s / replicas
    utilisation = per_replica / capacity
    if per_replica <= 0:
        return 0.0, 0.0
    if utilisation >= 1.0:
        return utilisation, math.inf
    filled = per_replica * cost.per_row_s
    rows = most if filled >= 1.0 else per_replica * cost.fixed_s / (1.0 - filled)
    rows = min(max(rows, 1.0), float(most))
    return utilisation, cost.seconds(rows) / (replicas + 1)


@dataclass(frozen=True, slots=True)
class Sample:
    """A version's batcher counters at one moment."""

    at: float
    arrived_rows: int
    served_rows: int
    busy_s: float
    batches: int
    rows_squared: int = 0
    rows_busy_s: float = 0.0
    queue_s: float = 0.0
    batched_requests: int = 0

    @classmethod
    def of(cls, stats: BatchStats, at: float) -> Sample:
        return cls(
            at, stats.arrived_rows, stats.inference_count, stats.compute_ns / 1e9,
            stats.execution_count, stats.rows_squared, stats.rows_compute_ns / 1e9,
            stats.queue_ns / 1e9, stats.batched_requests,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Load:
    """Demand, batch cost and the measured queue delay over a window."""

    arrival_rows_per_s: float
    cost: BatchCost | None
    """None when the window's batches do not pin the cost down."""
    per_row_s: float | None
    """Busy seconds per row served (the cost's upper bound when it cannot be fitted)."""
    queue_delay_s: float | None
    """The mean wait of the requests that left the queue in the window."""

    @classmethod
    def between(cls, first: Sample, last: Sample) -> Load:
        span = max(last.at - first.at, 1e-9)
        rows = last.served_rows - first.served_rows
        batches = last.batches - first.batches
        busy = last.busy_s - first.busy_s
        left = last.batched_requests - first.batched_requests
        return cls(
            arrival_rows_per_s=(last.arrived_rows - first.arrived_rows) / span,
            cost=BatchCost.fit(
                batches,
                rows,
                last.rows_squared - first.rows_squared,
                busy,
                last.rows_busy_s - first.rows_busy_s,
            ),
            per_row_s=busy / rows if rows > 0 else None,
            queue_delay_s=(last.queue_s - first.queue_s) / left if left > 0 else None,
        )


def replicas_for(
    arrival_rows_per_s: float,
    cost: BatchCost,
    max_rows: int,
    target_s: float,
    utilisation: float,
    least: int,
    most: int,
) -> int:
    """The fewest replicas in ``least..most`` (at least 1) at or under ``utilisation`` whose
    predicted queue delay is within ``target_s``; ``most`` if none is."""
    for count in range(max(1, least), most + 1):
        busy, delay = queue_delay_s(arrival_rows_per_s, count, cost, max_rows)
        if busy <= utilisation and delay <= target_s:
            return count
    return most


class Scaler:
    """One version's scaling decisions; fed a sample a tick, it answers a replica count
    when one should change."""

    def __init__(self, config: AutoscalingConfig, max_rows: int, now: float) -> None:
        self.config = config
        self.max_rows = max(1, max_rows)
        self.samples: collections.deque[Sample] = collections.deque()
        self.desired: int | None = None
        self.cost: BatchCost | None = None
        """The last batch cost the window pinned down (batch sizes vary with load)."""
        self._changed_at = -math.inf
        self._below_since: float | None = None
        self._arrival_at = now

    def decide(self, sample: Sample, replicas: int) -> int | None:
        cfg = self.config
        now = sample.at
        samples = self.samples
        if samples and sample.arrived_rows > samples[-1].arrived_rows:
            self._arrival_at = now
        samples.append(sample)
        while len(samples) > 2 and samples[1].at <= now - cfg.window_s:
            samples.popleft()
        if replicas == 0 or len(samples) < 2:
            return None  # a start from zero is the first request's (ModelTable._wake)
        if cfg.min_replicas == 0 and now - self._arrival_at >= cfg.scale_to_zero_after_s:
            return self._change(0, now)
        load = Load.between(samples[0], sample)
        if load.cost is not None:
            self.cost = load.cost
        cost = self.cost
        if cost is None and load.per_row_s is not None:
            cost = BatchCost(0.0, load.per_row_s)  # no line yet: every second a row's
        target = cfg.target_queue_delay_ms / 1e3
        least, most = cfg.min_replicas, cfg.max_replicas
        rate = load.arrival_rows_per_s
        # Up on the last tick's rate too: a step in load shows there seconds before the
        # window's average catches up (Knative's panic window, at one tick).
        surge = max(rate, Load.between(samples[-2], sample).arrival_rows_per_s)
        if surge <= 0.0:
            wanted = spare = max(1, least)
        elif cost is None:
            return None  # nothing served yet to estimate from
        else:
            wanted = replicas_for(surge, cost, self.max_rows, target, UP_UTILISATION, least, most)
            spare = (
                replicas_for(rate, cost, self.max_rows, target / 2, DOWN_UTILISATION, least, most)
                if rate > 0.0
                else max(1, least)
            )
        measured = load.queue_delay_s
        if measured is not None and measured > target:
            wanted = max(wanted, min(most, replicas + 1))  # the queue says more is needed
        self.desired = wanted
        cooled = now - self._changed_at >= cfg.scale_up_cooldown_s
        if wanted > replicas:
            self._below_since = None
            return self._change(wanted, now) if cooled else None
        calm = measured is None or measured <= target / 2
        if spare >= replicas or not calm:
            self._below_since = None
            return None
        if self._below_since is None:
            self._below_since = now
        if now - self._below_since >= cfg.scale_down_delay_s and cooled:
            return self._change(spare, now)
        return None

    def _change(self, replicas: int, now: float) -> int:
        self._changed_at = now
        self._below_since = None
        self.desired = replicas
        return replicas


class Autoscaler:
    """Ticks once a second over the loaded versions that have ``autoscaling`` and applies
    each decision through the model table (one change per version at a time)."""

    def __init__(
        self,
        models: ModelTable,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models = models
        self._tick_s = tick_s
        self._clock = clock
        self._scalers: dict[str, Scaler] = {}
        self._changing: dict[str, asyncio.Task[None]] = {}
        self.decisions: collections.Counter[tuple[str, int, str]] = collections.Counter()
        """(model, version, up/down) -> scaling decisions applied."""
        self.failures: collections.Counter[tuple[str, int]] = collections.Counter()

    def desired(self) -> dict[tuple[str, int], int]:
        """What each autoscaled version was last estimated to need."""
        wanted = {}
        for loaded in self._models.loaded():
            scaler = self._scalers.get(loaded.spec.key)
            if scaler is not None and scaler.desired is not None:
                wanted[(loaded.spec.name, loaded.spec.version)] = scaler.desired
        return wanted

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            self.tick()

    def tick(self) -> None:
        now = self._clock()
        live = set()
        for loaded in self._models.loaded():
            config = loaded.spec.config.autoscaling
            key = loaded.spec.key
            if config is None:
                continue
            live.add(key)
            scaler = self._scalers.get(key)
            if scaler is None or scaler.config is not config:
                scaler = self._scalers[key] = Scaler(config, loaded.batcher.max_batch_size, now)
            if key in self._changing or loaded.waking is not None:
                continue  # the last change is still being applied
            wanted = scaler.decide(Sample.of(loaded.batcher.stats, now), loaded.replicas)
            if wanted is not None and wanted != loaded.replicas:
                task = asyncio.get_running_loop().create_task(self._apply(loaded, wanted))
                self._changing[key] = task
        for key in list(self._scalers):
            if key not in live:
                del self._scalers[key]

    async def _apply(self, loaded: LoadedModel, replicas: int) -> None:
        spec = loaded.spec
        direction = "up" if replicas > loaded.replicas else "down"
        log.info("scaling %s %s: %d -> %d replicas", spec.key, direction, loaded.replicas, replicas)
        try:
            await self._models.scale(loaded, replicas)
        except TurnoutError as exc:
            self.failures[(spec.name, spec.version)] += 1
            log.warning("scaling %s to %d replicas failed: %s", spec.key, replicas, exc)
        else:
            self.decisions[(spec.name, spec.version, direction)] += 1
        finally:
            self._changing.pop(spec.key, None)

    async def stop(self) -> None:
        for task in list(self._changing.values()):
            task.cancel()
        await asyncio.gather(*self._changing.values(), return_exceptions=True)
