"""The autoscaler's estimate against known queueing values, and its decisions on a fake
clock: one step per change of load, hysteresis on the way down, scale to zero, and a seeded
simulation of noisy load that must not make it oscillate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.autoscaler import Load, Sample, Scaler, queue_delay_s, replicas_for
from gateway.settings import AutoscalingConfig, ModelConfig


def erlang_c_wait(utilisation: float, servers: int, service_s: float) -> float:
    """Exact mean wait of M/M/c (Erlang C)."""
    a = utilisation * servers
    top = a**servers / math.factorial(servers) / (1 - utilisation)
    bottom = sum(a**k / math.factorial(k) for k in range(servers)) + top
    return top / bottom * service_s / (servers * (1 - utilisation))


@pytest.mark.parametrize("utilisation", [0.1, 0.5, 0.8, 0.95])
def test_one_replica_is_the_exact_m_m_1_wait(utilisation: float) -> None:
    assert queue_delay_s(utilisation, 1, 0.01) == pytest.approx(
        utilisation / (1 - utilisation) * 0.01
    )
    assert queue_delay_s(utilisation, 1, 0.01) == pytest.approx(erlang_c_wait(utilisation, 1, 0.01))


@pytest.mark.parametrize("servers", [2, 3, 4, 8])
@pytest.mark.parametrize("utilisation", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_several_replicas_are_near_erlang_c_and_never_far_below(
    servers: int, utilisation: float
) -> None:
    approx = queue_delay_s(utilisation, servers, 0.01)
    exact = erlang_c_wait(utilisation, servers, 0.01)
    assert approx >= 0.97 * exact  # errs towards more replicas, not fewer
    if utilisation >= 0.8:  # where scaling decisions are made
        assert approx == pytest.approx(exact, rel=0.12)


def test_a_saturated_queue_waits_forever_and_an_empty_one_not_at_all() -> None:
    assert queue_delay_s(1.0, 2, 0.01) == math.inf
    assert queue_delay_s(1.3, 2, 0.01) == math.inf
    assert queue_delay_s(0.0, 2, 0.01) == 0.0


def test_the_fewest_replicas_that_meet_the_target() -> None:
    # 1,500 rows/s at 1 ms of busy time a row: 1.5 replicas' worth of work, batches of 10 ms.
    load = Load(arrival_rows_per_s=1500, row_service_s=0.001, batch_service_s=0.01)
    assert replicas_for(load, 0.020, 1, 8) == 2  # u = 0.75: Wq ~ 0.0129 s
    assert replicas_for(load, 0.005, 1, 8) == 3  # u = 0.5: Wq ~ 0.0019 s
    assert replicas_for(load, 0.005, 1, 2) == 2  # capped at max_replicas
    assert replicas_for(load, 0.020, 4, 8) == 4  # never below min_replicas
    idle = Load(arrival_rows_per_s=0, row_service_s=None, batch_service_s=None)
    assert replicas_for(idle, 0.020, 0, 8) == 1
    unknown = Load(arrival_rows_per_s=100, row_service_s=None, batch_service_s=None)
    assert replicas_for(unknown, 0.020, 1, 8) is None


def test_a_load_is_read_from_two_samples() -> None:
    first = Sample(at=10.0, arrived_rows=100, served_rows=90, busy_s=1.0, batches=9)
    last = Sample(at=15.0, arrived_rows=600, served_rows=590, busy_s=1.5, batches=59)
    load = Load.between(first, last)
    assert load.arrival_rows_per_s == pytest.approx(100.0)
    assert load.row_service_s == pytest.approx(0.001)
    assert load.batch_service_s == pytest.approx(0.01)


def test_settings_refuse_a_start_outside_the_range() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        ModelConfig(num_replicas=3, autoscaling={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(ValueError, match="below min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    ModelConfig(num_replicas=1, autoscaling={"min_replicas": 0, "max_replicas": 2})


# -- decisions on a fake clock ----------------------------------------------------------------


class Feed:
    """Batcher counters grown as a replica set serving ``rate`` rows/s would grow them:
    busy time ``row_s`` a row, batches of ``batch`` rows."""

    def __init__(self, row_s: float = 0.001, batch: int = 10) -> None:
        self.at = 0.0
        self.arrived = self.served = self.batches = 0
        self.busy = 0.0
        self.row_s, self.batch = row_s, batch

    def advance(self, rate: float, seconds: float = 1.0) -> Sample:
        self.at += seconds
        rows = round(rate * seconds)
        self.arrived += rows
        self.served += rows
        self.busy += rows * self.row_s
        self.batches += -(-rows // self.batch)
        return Sample(self.at, self.arrived, self.served, self.busy, self.batches)


def run(scaler: Scaler, feed: Feed, replicas: int, rates: list[float]) -> tuple[int, list[int]]:
    changes = []
    for rate in rates:
        wanted = scaler.decide(feed.advance(rate), replicas)
        if wanted is not None:
            changes.append(wanted)
            replicas = wanted
    return replicas, changes


def config(**overrides: float) -> AutoscalingConfig:
    values = {"min_replicas": 1, "max_replicas": 4, "target_queue_delay_ms": 20.0}
    values.update(overrides)
    return AutoscalingConfig.model_validate(values)


def test_a_3x_step_is_one_change_up_and_steady_load_none() -> None:
    scaler, feed = Scaler(config(), now=0.0), Feed()
    replicas, changes = run(scaler, feed, 1, [500.0] * 30)
    assert (replicas, changes) == (1, [])  # u = 0.5 on one replica: Wq 10 ms
    replicas, changes = run(scaler, feed, replicas, [1500.0] * 60)
    assert changes == [2]  # straight to what 1,500 rows/s needs, then nothing more


def test_scaling_down_waits_for_headroom_to_last() -> None:
    scaler, feed = Scaler(config(scale_down_delay_s=30.0), now=0.0), Feed()
    replicas, _ = run(scaler, feed, 1, [1500.0] * 10)
    assert replicas == 2
    replicas, changes = run(scaler, feed, replicas, [300.0] * 20)
    assert changes == []  # less load, but not yet for scale_down_delay_s
    replicas, changes = run(scaler, feed, replicas, [300.0] * 30)
    assert changes == [1]
    # A burst that interrupts the headroom restarts the wait.
    scaler2, feed2 = Scaler(config(scale_down_delay_s=30.0), now=0.0), Feed()
    replicas, _ = run(scaler2, feed2, 1, [1500.0] * 10)
    load = [300.0] * 20 + [1200.0] * 6 + [300.0] * 20
    replicas, changes = run(scaler2, feed2, replicas, load)
    assert changes == []


def test_an_idle_version_scales_to_zero_only_when_allowed() -> None:
    scaler, feed = Scaler(config(min_replicas=0, scale_to_zero_after_s=60.0), now=0.0), Feed()
    replicas, changes = run(scaler, feed, 1, [100.0] * 5 + [0.0] * 58)
    assert changes == []
    replicas, changes = run(scaler, feed, replicas, [0.0] * 3)
    assert (replicas, changes) == (0, [0])
    assert scaler.decide(feed.advance(0.0), 0) is None  # the next request starts it
    kept = Scaler(config(min_replicas=1, scale_to_zero_after_s=60.0), now=0.0)
    assert run(kept, Feed(), 1, [0.0] * 200) == (1, [])


def test_seeded_noisy_load_does_not_make_it_oscillate() -> None:
    rng = np.random.default_rng(7)
    scaler, feed = Scaler(config(scale_down_delay_s=30.0), now=0.0), Feed()
    # Poisson arrivals per second: 120 s that one replica serves within the target, 120 s
    # at 3x, then 120 s at a load one replica serves within half of it.
    rates = [float(r) for r in rng.poisson(500, 120)]
    replicas, changes = run(scaler, feed, 1, rates)
    assert changes == []
    rates = [float(r) for r in rng.poisson(1500, 120)]
    replicas, changes = run(scaler, feed, replicas, rates)
    assert changes == [2]
    rates = [float(r) for r in rng.poisson(300, 120)]
    replicas, changes = run(scaler, feed, replicas, rates)
    assert changes == [1]
