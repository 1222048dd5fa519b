"""The autoscaler's model of batching replicas against known values and a seeded
simulation, and its decisions on a fake clock: one step per change of load, hysteresis on
the way down, scale to zero, and seeded noisy load that must not make it oscillate."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from gateway.autoscaler import BatchCost, Load, Sample, Scaler, queue_delay_s, replicas_for
from gateway.settings import AutoscalingConfig, ModelConfig

COST = BatchCost(fixed_s=0.004, per_row_s=0.0003)  # T(32) = 13.6 ms: 2,353 rows/s a replica


def simulate(rate: float, replicas: int, cost: BatchCost, max_rows: int, seed: int) -> float:
    """Mean queue wait of Poisson arrivals at ``replicas`` greedy batching servers sharing
    one queue (each takes up to ``max_rows`` waiting rows when it frees)."""
    rng = np.random.default_rng(seed)
    seconds = 20_000 / rate
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2)))
    arrivals = arrivals[arrivals < seconds]
    free = [0.0] * replicas
    queue: collections.deque[float] = collections.deque()
    waits: list[float] = []
    i = 0
    while i < len(arrivals) or queue:
        soonest = min(free)
        server = free.index(soonest)
        if queue and (i == len(arrivals) or soonest <= arrivals[i]):
            start = max(soonest, queue[0])
            while i < len(arrivals) and arrivals[i] <= start:
                queue.append(arrivals[i])
                i += 1
            rows = min(len(queue), max_rows)
            waits.extend(start - queue.popleft() for _ in range(rows))
            free[server] = start + cost.seconds(rows)
        else:
            queue.append(arrivals[i])
            i += 1
    return float(np.mean(waits))


def test_the_predicted_wait_by_hand() -> None:
    utilisation, wait = queue_delay_s(1000.0, 1, COST, 32)
    assert utilisation == pytest.approx(1000 / (32 / 0.0136))
    rows = 1000 * 0.004 / (1 - 1000 * 0.0003)  # 5.71: what arrives while a batch runs
    assert wait == pytest.approx((0.004 + 0.0003 * rows) / 2)
    _, shared = queue_delay_s(2000.0, 2, COST, 32)
    assert shared == pytest.approx((0.004 + 0.0003 * rows) / 3)  # the first of two to end
    assert queue_delay_s(2400.0, 1, COST, 32)[1] == math.inf  # past 2,353 rows/s
    assert queue_delay_s(0.0, 1, COST, 32) == (0.0, 0.0)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("utilisation", [0.3, 0.5, 0.8])
def test_the_prediction_is_within_10_percent_of_a_seeded_simulation(
    replicas: int, utilisation: float
) -> None:
    rate = utilisation * replicas * 32 / COST.seconds(32)
    _, predicted = queue_delay_s(rate, replicas, COST, 32)
    assert predicted == pytest.approx(simulate(rate, replicas, COST, 32, seed=3), rel=0.1)


def test_at_low_load_the_prediction_errs_high() -> None:
    rate = 0.1 * 2 * 32 / COST.seconds(32)
    assert queue_delay_s(rate, 2, COST, 32)[1] > simulate(rate, 2, COST, 32, seed=4)


def test_a_cost_line_is_fitted_from_the_batch_sums() -> None:
    sizes = [1, 2, 4, 8, 16, 32, 5, 7]
    times = [COST.seconds(b) for b in sizes]
    fitted = BatchCost.fit(
        len(sizes), sum(sizes), sum(b * b for b in sizes), sum(times),
        sum(b * t for b, t in zip(sizes, times, strict=True)),
    )  # fmt: skip
    assert fitted is not None
    assert fitted.fixed_s == pytest.approx(0.004)
    assert fitted.per_row_s == pytest.approx(0.0003)
    # Ten batches of 8 rows: one size, no slope to fit.
    assert BatchCost.fit(10, 80, 640, 10 * COST.seconds(8), 80 * COST.seconds(8)) is None


def test_the_fewest_replicas_under_the_utilisation_cap_and_the_target() -> None:
    assert replicas_for(1000.0, COST, 32, 0.010, 0.8, 1, 8) == 1  # u = 0.42
    assert replicas_for(3000.0, COST, 32, 0.010, 0.8, 1, 8) == 2  # u = 0.64 on two
    assert replicas_for(3000.0, COST, 32, 0.010, 0.6, 1, 8) == 3  # u = 0.42 on three
    # The wait decides: on four, batches of 3.9 rows take 5.2 ms, the first of four ends
    # after 1.03 ms on average; on five, 4.9 ms batches, 0.81 ms.
    assert replicas_for(3000.0, COST, 32, 0.001, 0.8, 1, 8) == 5
    assert replicas_for(3000.0, COST, 32, 0.010, 0.8, 1, 1) == 1  # capped at max_replicas
    assert replicas_for(100.0, COST, 32, 0.010, 0.8, 3, 8) == 3  # never below min_replicas


def test_a_load_is_read_from_two_samples() -> None:
    first = Sample(10.0, 100, 90, 1.0, 9, 900, 10.0, 0.5, 90)
    last = Sample(15.0, 600, 590, 1.5, 59, 5900, 15.0, 1.0, 590)
    load = Load.between(first, last)
    assert load.arrival_rows_per_s == pytest.approx(100.0)
    assert load.per_row_s == pytest.approx(0.001)
    assert load.queue_delay_s == pytest.approx(0.001)
    assert load.cost is None  # every batch held 10 rows


def test_settings_refuse_a_start_outside_the_range() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        ModelConfig(num_replicas=3, autoscaling={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(ValueError, match="below min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    ModelConfig(num_replicas=1, autoscaling={"min_replicas": 0, "max_replicas": 2})


# -- decisions on a fake clock ----------------------------------------------------------------


class Feed:
    """Batcher counters grown as ``replicas`` batching replicas with cost ``COST`` would
    grow them at ``rate`` rows/s: batches of the size the model predicts (alternating one
    row either side, as real sizes vary), and the wait it predicts (ten times the target
    when saturated, where the queue grows)."""

    def __init__(self) -> None:
        self.at = 0.0
        self.arrived = self.served = self.batches = self.rows_sq = self.left = 0
        self.busy = self.rows_busy = self.queued = 0.0

    def advance(self, rate: float, replicas: int) -> Sample:
        self.at += 1.0
        rows = round(rate)
        self.arrived += rows
        if rows and replicas:
            per = rate / replicas
            filled = per * COST.per_row_s
            size = 32.0 if filled >= 1 else min(32.0, max(1.0, per * COST.fixed_s / (1 - filled)))
            _, wait = queue_delay_s(rate, replicas, COST, 32)
            for batch in (max(1, round(size) - 1), round(size) + 1):
                count = rows // (2 * batch)
                self.batches += count
                self.served += count * batch
                self.rows_sq += count * batch * batch
                self.busy += count * COST.seconds(batch)
                self.rows_busy += count * batch * COST.seconds(batch)
            self.left += rows
            self.queued += rows * (wait if math.isfinite(wait) else 0.2)
        return Sample(
            self.at, self.arrived, self.served, self.busy, self.batches, self.rows_sq,
            self.rows_busy, self.queued, self.left,
        )  # fmt: skip


def run(scaler: Scaler, feed: Feed, replicas: int, rates: list[float]) -> tuple[int, list[int]]:
    changes = []
    for rate in rates:
        wanted = scaler.decide(feed.advance(rate, replicas), replicas)
        if wanted is not None:
            changes.append(wanted)
            replicas = wanted
    return replicas, changes


def config(**overrides: float) -> AutoscalingConfig:
    values = {"min_replicas": 1, "max_replicas": 4, "target_queue_delay_ms": 10.0}
    values.update(overrides)
    return AutoscalingConfig.model_validate(values)


def scaler(**overrides: float) -> Scaler:
    return Scaler(config(**overrides), max_rows=32, now=0.0)


def test_a_3x_step_is_one_change_up_and_steady_load_none() -> None:
    one, feed = scaler(), Feed()
    replicas, changes = run(one, feed, 1, [1000.0] * 30)
    assert (replicas, changes) == (1, [])  # u = 0.42 on one replica
    replicas, changes = run(one, feed, replicas, [3000.0] * 60)
    assert changes == [2]  # straight to what 3,000 rows/s needs, then nothing more


def test_a_queue_over_the_target_asks_for_one_more_than_the_model() -> None:
    one, feed = scaler(), Feed()
    assert one.decide(feed.advance(1000.0, 1), 1) is None  # one sample: no window yet
    sample = feed.advance(1000.0, 1)
    # The model says one replica is enough (u = 0.42, 2.9 ms); the queue measured 20 ms
    # (something it does not see: a slow replica, a busy machine): one more.
    slow = Sample(
        sample.at, sample.arrived_rows, sample.served_rows, sample.busy_s, sample.batches,
        sample.rows_squared, sample.rows_busy_s, sample.queue_s + 1000 * 0.02,
        sample.batched_requests,
    )  # fmt: skip
    assert one.decide(slow, 1) == 2


def test_scaling_down_waits_for_headroom_to_last() -> None:
    one, feed = scaler(scale_down_delay_s=30.0), Feed()
    replicas, _ = run(one, feed, 1, [3000.0] * 10)
    assert replicas == 2
    replicas, changes = run(one, feed, replicas, [600.0] * 20)
    assert changes == []  # less load, but not yet for scale_down_delay_s
    replicas, changes = run(one, feed, replicas, [600.0] * 30)
    assert changes == [1]
    # A burst that interrupts the headroom starts the wait again.
    two, feed2 = scaler(scale_down_delay_s=30.0), Feed()
    replicas, _ = run(two, feed2, 1, [3000.0] * 10)
    replicas, changes = run(two, feed2, replicas, [600.0] * 20 + [2500.0] * 6 + [600.0] * 20)
    assert changes == []


def test_an_idle_version_scales_to_zero_only_when_allowed() -> None:
    zero, feed = scaler(min_replicas=0, scale_to_zero_after_s=60.0), Feed()
    replicas, changes = run(zero, feed, 1, [100.0] * 5 + [0.0] * 58)
    assert changes == []
    replicas, changes = run(zero, feed, replicas, [0.0] * 3)
    assert (replicas, changes) == (0, [0])
    assert zero.decide(feed.advance(0.0, 0), 0) is None  # the next request starts it
    kept = scaler(min_replicas=1, scale_to_zero_after_s=60.0)
    assert run(kept, Feed(), 1, [0.0] * 200) == (1, [])


def test_seeded_noisy_load_does_not_make_it_oscillate() -> None:
    rng = np.random.default_rng(7)
    noisy, feed = scaler(scale_down_delay_s=30.0), Feed()
    # Poisson arrivals per second: 120 s one replica serves, 120 s at 3x, 120 s back.
    rates = [float(r) for r in rng.poisson(1000, 120)]
    replicas, changes = run(noisy, feed, 1, rates)
    assert changes == []
    rates = [float(r) for r in rng.poisson(3000, 120)]
    replicas, changes = run(noisy, feed, replicas, rates)
    assert changes == [2]
    rates = [float(r) for r in rng.poisson(1000, 120)]
    replicas, changes = run(noisy, feed, replicas, rates)
    assert changes == [1]


def test_a_step_is_answered_on_the_first_tick_that_shows_it() -> None:
    quick, feed = scaler(window_s=5.0), Feed()
    assert run(quick, feed, 1, [1000.0] * 30) == (1, [])
    # The window's mean is still ~1,400 rows/s (one replica's); the last tick's is 3,000.
    assert quick.decide(feed.advance(3000.0, 1), 1) == 2
