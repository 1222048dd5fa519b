"""The experiment's state and statistics on known counts: winner, loser, no difference,
keep running, and a sample-ratio mismatch that overrides them."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from gateway.rollout.experiment import ArmOutcome, ExperimentState, evaluate_experiment


def state(**fields: object) -> ExperimentState:
    values: dict[str, object] = {"arms": [1, 2], "split": [50, 50], "started": time.time()}
    values.update(fields)
    return ExperimentState.model_validate(values)


def rate(correct: int, n: int) -> ArmOutcome:
    mean = correct / n
    return ArmOutcome(n, mean, mean * (1 - mean), successes=correct)


def test_a_clearly_better_arm_wins_and_a_worse_one_loses() -> None:
    found = evaluate_experiment(state(), [5000, 5000], [rate(3000, 5000), rate(3600, 5000)])
    assert found["decision"] == "winner: version 2"
    lift = found["arms"][1]["lift"]
    assert lift["decision"] == "winner" and lift["always_valid_ci"][0] > 0
    assert lift["relative"] == pytest.approx(0.2, rel=1e-6)
    worse = evaluate_experiment(state(), [5000, 5000], [rate(3600, 5000), rate(3000, 5000)])
    assert worse["decision"] == "control wins"


def test_equal_arms_keep_running_then_show_no_difference() -> None:
    early = evaluate_experiment(state(), [100, 100], [rate(60, 100), rate(60, 100)])
    assert early["decision"] == "keep_running"
    wide = state(equivalence_margin=0.05)
    late = evaluate_experiment(wide, [90000, 90000], [rate(54000, 90000), rate(54000, 90000)])
    assert late["decision"] == "no_difference"


def test_a_sample_ratio_mismatch_overrides_the_lift() -> None:
    found = evaluate_experiment(state(), [6000, 4000], [rate(3000, 5000), rate(3600, 5000)])
    assert found["srm"]["decision"] == "mismatch"
    assert found["decision"] == "sample_ratio_mismatch"


def test_missing_feedback_gives_no_lift() -> None:
    found = evaluate_experiment(state(metric="reward"), [10, 10], [None, None])
    assert found["arms"][1]["lift"] is None and found["decision"] == "keep_running"


def test_the_state_validates_arms_and_split() -> None:
    assert state(arms=[1, 2, 3], split=[34, 33, 33]).weights() == {1: 34, 2: 33, 3: 33}
    assert state(phase="stopped", winner=2).weights() == {2: 100}
    for fields in ({"arms": [1, 1]}, {"split": [50]}, {"split": [70, 40]}, {"arms": [1]}):
        with pytest.raises(ValidationError):
            state(**fields)
    # An alpha the sequential tests cannot take is refused up front, not at every evaluation.
    with pytest.raises(ValidationError, match="alpha"):
        state(alpha=0.5)
    high = state(alpha=0.49)
    assert evaluate_experiment(high, [100, 100], [rate(80, 100), rate(90, 100)])["decision"]
