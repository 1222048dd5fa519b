"""bench.autoscale's reading of a run, from made-up series: seconds above the target after
the step, replica changes per phase, and the verdicts."""

from __future__ import annotations

from typing import Any

from bench.autoscale import analyse, changes, verdicts


def second(t: int, p99: float, sent: int = 100, ok: int = 100) -> dict[str, Any]:
    return {"t": t, "sent": sent, "ok": ok, "p50_ms": p99 / 2, "p99_ms": p99}


def test_a_run_that_scales_once_each_way_passes() -> None:
    series = [second(t, 20.0) for t in range(0, 10)]
    series += [
        second(10, 500.0),
        second(11, 300.0, ok=90),
        *(second(t, 30.0) for t in range(12, 20)),
    ]
    series += [second(t, 20.0) for t in range(20, 30)]
    samples = [(0.5 * i, 1) for i in range(22)] + [(11.0 + 0.5 * i, 2) for i in range(30)]
    samples += [(26.0 + 0.5 * i, 1) for i in range(8)]
    result = analyse(series, samples, (10.0, 10.0, 10.0), target_p99_ms=100.0)
    assert result["seconds_above_target_after_step"] == 2
    assert result["above_target_seconds"] == [10, 11]
    assert result["scaled_up_after_s"] == 1.0
    assert result["scaled_down_after_s"] == 6.0
    assert result["replicas_at_end"] == 1
    assert [ok for _, ok, _ in verdicts(result)] == [True, True, True]


def test_flapping_and_a_long_tail_fail() -> None:
    samples = [(1.0, 1), (11.0, 2), (12.0, 1), (13.0, 2), (25.0, 2)]
    assert changes(samples, 10.0, 20.0) == [
        {"t": 11.0, "from": 1, "to": 2},
        {"t": 12.0, "from": 2, "to": 1},
        {"t": 13.0, "from": 1, "to": 2},
    ]
    series = [second(t, 400.0) for t in range(10, 22)]
    result = analyse(series, samples, (10.0, 10.0, 10.0), target_p99_ms=100.0)
    assert result["seconds_above_target_after_step"] == 10
    assert [ok for _, ok, _ in verdicts(result)] == [True, False, False]
