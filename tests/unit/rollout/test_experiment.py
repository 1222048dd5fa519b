"""The experiment's state and statistics on known counts: winner, loser, no difference,
keep running, and a sample-ratio mismatch that overrides them."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


@st.composite
def experiments(draw: st.DrawFn) -> ExperimentState:
    """Any experiment the schema accepts: 2-4 arms, any split, alpha, tau and margin."""
    arms = draw(st.integers(2, 4))
    cuts = sorted(draw(st.sets(st.integers(1, 99), min_size=arms - 1, max_size=arms - 1)))
    split = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
    return state(
        arms=list(range(1, arms + 1)),
        split=split,
        alpha=draw(st.floats(1e-9, 0.5, exclude_max=True)),
        tau=draw(st.floats(1e-9, 1e6)),
        equivalence_margin=draw(st.floats(0, 1e3)),
    )


@st.composite
def outcomes(draw: st.DrawFn) -> ArmOutcome | None:
    n = draw(st.integers(0, 5000))
    if draw(st.booleans()):  # labels: a share of correct answers
        return rate(draw(st.integers(0, n)), n) if n else draw(st.none() | st.just(rate(0, 1)))
    mean = draw(st.floats(-1e6, 1e6))
    return draw(st.none()) if n == 0 else ArmOutcome(n, mean, draw(st.floats(0, 1e6)))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(experiment=experiments(), data=st.data())
def test_every_experiment_the_schema_accepts_evaluates_without_raising(
    experiment: ExperimentState, data: st.DataObject
) -> None:
    """Whatever was accepted at the start, and whatever feedback arrives, the status reads
    a decision instead of raising (a raise would break every read of the experiment)."""
    arms = len(experiment.arms)
    assigned = data.draw(st.lists(st.integers(0, 100_000), min_size=arms, max_size=arms))
    found = data.draw(st.lists(outcomes(), min_size=arms, max_size=arms))
    result = evaluate_experiment(experiment, assigned, found)
    assert len(result["arms"]) == arms
    assert result["decision"] in {
        "sample_ratio_mismatch",
        "keep_running",
        "control wins",
        "no_difference",
    } or result["decision"].startswith("winner: ")
