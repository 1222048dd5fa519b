"""Replica autoscaling from the gateway's own queue.

With batching in the gateway, Ray Serve's autoscaler sees one batch in flight per replica
whatever the queue, so it cannot see demand. The gateway can: every second it reads each
version's batcher counters (rows arrived, rows served, busy time, batches) and asks for the
fewest replicas whose predicted queue delay meets ``target_queue_delay_ms``.

The estimate (docs/autoscaling.md): rows arrive at rate L; a replica serves a row in
``s_row`` busy seconds (busy time over rows served, at the batch sizes seen), so ``c``
replicas run at utilisation u = L * s_row / c. A row waits, by Sakasegawa's approximation
of the M/M/c queue, ``Wq(c) = u ** (sqrt(2 (c + 1)) - 1) / (c (1 - u)) * S`` with ``S``
the mean batch time; exact for c = 1 (u / (1 - u) * S). Up: at once to the estimate (one
step, not +1 at a time), then ``scale_up_cooldown_s`` without another. Down: only when
fewer replicas would meet half the target, for ``scale_down_delay_s`` without a break
(hysteresis). Zero: with ``min_replicas: 0``, after ``scale_to_zero_after_s`` without a
request; the next request waits at the gateway while a replica starts
(``ModelTable._wake``).
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

__all__ = ["Autoscaler", "Load", "Sample", "Scaler", "queue_delay_s", "replicas_for"]

log = logging.getLogger(__name__)

TICK_S = 1.0


def queue_delay_s(utilisation: float, replicas: int, service_s: float) -> float:
    """Mean wait in an M/M/c queue by Sakasegawa's approximation (infinite at utilisation >= 1)."""
    if utilisation >= 1.0:
        return math.inf
    if utilisation <= 0.0:
        return 0.0
    power = math.sqrt(2.0 * (replicas + 1)) - 1.0
    return float(utilisation**power / (replicas * (1.0 - utilisation)) * service_s)


@dataclass(frozen=True, slots=True)
class Sample:
    """A version's batcher counters at one moment."""

    at: float
    arrived_rows: int
    served_rows: int
    busy_s: float
    batches: int

    @classmethod
    def of(cls, stats: BatchStats, at: float) -> Sample:
        return cls(
            at, stats.arrived_rows, stats.inference_count, stats.compute_ns / 1e9,
            stats.execution_count,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Load:
    """Demand and service over a window: what the estimate needs."""

    arrival_rows_per_s: float
    row_service_s: float | None
    """Busy seconds per row served; None when nothing was served."""
    batch_service_s: float | None

    @classmethod
    def between(cls, first: Sample, last: Sample) -> Load:
        span = max(last.at - first.at, 1e-9)
        rows = last.served_rows - first.served_rows
        batches = last.batches - first.batches
        busy = last.busy_s - first.busy_s
        return cls(
            arrival_rows_per_s=(last.arrived_rows - first.arrived_rows) / span,
            row_service_s=busy / rows if rows > 0 else None,
            batch_service_s=busy / batches if batches > 0 else None,
        )


def replicas_for(load: Load, target_s: float, least: int, most: int) -> int | None:
    """The fewest replicas in ``least..most`` whose predicted wait is within ``target_s``
    (``most`` if none is); None when the window served nothing to estimate from."""
    least = max(1, least)
    if load.arrival_rows_per_s <= 0.0:
        return least
    if load.row_service_s is None or load.batch_service_s is None:
        return None
    work = load.arrival_rows_per_s * load.row_service_s  # busy replicas needed
    for count in range(least, most + 1):
        if queue_delay_s(work / count, count, load.batch_service_s) <= target_s:
            return count
    return most


class Scaler:
    """One version's scaling decisions; fed a sample a tick, it answers a replica count
    when one should change."""

    def __init__(self, config: AutoscalingConfig, now: float) -> None:
        self.config = config
        self.samples: collections.deque[Sample] = collections.deque()
        self.desired: int | None = None
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
        target = cfg.target_queue_delay_ms / 1e3
        wanted = replicas_for(load, target, cfg.min_replicas, cfg.max_replicas)
        if wanted is None:
            return None
        self.desired = wanted
        cooled = now - self._changed_at >= cfg.scale_up_cooldown_s
        if wanted > replicas:
            self._below_since = None
            return self._change(wanted, now) if cooled else None
        spare = replicas_for(load, target / 2, cfg.min_replicas, cfg.max_replicas)
        if spare is None or spare >= replicas:
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
                scaler = self._scalers[key] = Scaler(config, now)
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
