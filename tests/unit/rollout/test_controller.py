"""The rollout's pieces without a server: evidence per version, every gate's verdict on
known evidence, the controller's decision rule, the configuration's validation, the lease."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.rollout import controller as controller_module
from gateway.rollout.config import RolloutConfig
from gateway.rollout.controller import RolloutController, decide
from gateway.rollout.evidence import Evidence, VersionEvidence
from gateway.rollout.gates import Accuracy, InputDrift, evaluate
from gateway.rollout.state import ACTIVE, RolloutState
from gateway.routing.store import PolicyStore
from turnout_contract.records import SERVER, BatchTensors, BatchTiming, RequestRecord
from turnout_contract.trace import TraceContext


def record(
    version: int, status: int = 200, total_s: float = 0.002, y: float = 0.0
) -> RequestRecord:
    # The request's one row, in a batch it shared with another request.
    outputs = {"y": np.array([[-9.0, -9.0], [y, y]], np.float32)}
    tensors = BatchTensors({"x": np.zeros((2, 1), np.float32)}, outputs, 2)
    timing = BatchTiming(batch_size=2, row=1, tensors=tensors)
    return RequestRecord(
        "m", version, 1, "primary", status, 0, 0.0, 0.0, total_s, timing, TraceContext.start(),
        SERVER, "http", "", "", "", 1 if status == 200 else 0,
    )  # fmt: skip


def filled(n: int, errors: int = 0, total_s: float = 0.002, y: float = 0.0) -> VersionEvidence:
    evidence = VersionEvidence()
    rng = np.random.default_rng(n + errors)
    for i in range(n):
        failed = i < errors
        value = y + float(rng.normal(0, 1))
        latency = total_s * float(rng.uniform(0.8, 1.2))
        evidence.add(record(1, 500 if failed else 200, latency, value))
    return evidence


def verdicts(
    config: RolloutConfig, stable: VersionEvidence, canary: VersionEvidence
) -> dict[str, str]:
    return {g.name: g.decision for g in evaluate(config, stable, canary)}


def test_evidence_counts_errors_runs_latency_and_outputs() -> None:
    evidence = Evidence()
    evidence.watch("m", [1, 2])
    failures: list[int] = []
    evidence.on_failure = lambda: failures.append(1)
    for status in (200, 500, 503, 500, 200, 400):
        evidence.observe(record(2, status, 0.01, y=3.0))
    evidence.observe(record(7))  # not watched: ignored
    canary = evidence.of("m", 2)
    assert canary is not None
    assert (canary.requests, canary.errors, canary.longest_failure_run) == (6, 3, 3)
    assert canary.failure_run == 0 and len(failures) == 3
    assert canary.successes == 2
    p50 = canary.quantile_s(0.5)
    assert p50 is not None and 0.0099 <= p50 <= 0.0103  # 2% buckets
    assert canary.slower_than(0.005) == 2 and canary.slower_than(0.02) == 0
    moments = canary.output_moments()
    assert moments is not None and moments[0] == 2
    np.testing.assert_allclose(moments[1], [3.0, 3.0])


def test_healthy_evidence_passes_every_gate() -> None:
    config = RolloutConfig(error_rate={"tolerance": 0.02})
    found = verdicts(config, filled(3000), filled(400))
    assert found == {
        "trip_wire": "pass",
        "max_error_rate": "pass",
        "error_rate": "pass",
        "latency_p50": "pass",
        "latency_p99": "pass",
        "drift": "pass",
    }


def test_each_kind_of_bad_canary_fails_its_gate() -> None:
    config = RolloutConfig()
    stable = filled(3000)
    assert verdicts(config, stable, filled(400, errors=40))["error_rate"] == "fail"
    assert verdicts(config, stable, filled(200, total_s=0.04))["latency_p50"] == "fail"
    assert verdicts(config, stable, filled(400, y=1.0))["drift"] == "fail"
    assert verdicts(config, stable, filled(400, y=-1.0))["drift"] == "fail"  # either way
    tripped = filled(50)
    for _ in range(5):
        tripped.add(record(1, 500))
    assert verdicts(config, stable, tripped)["trip_wire"] == "fail"


def test_a_ceiling_of_half_or_more_is_evaluated_not_raised() -> None:
    """Every ceiling the config accepts evaluates: the exceedance test's "no worse" null sat
    at twice the ceiling, so from 0.5 up each evaluation raised and the rollout never moved."""
    stable = filled(3000)
    for ceiling in (0.5, 0.8, 0.99):
        config = RolloutConfig(guards={"max_error_rate": ceiling})
        assert verdicts(config, stable, filled(400, errors=40))["max_error_rate"] == "pass"
    assert (
        verdicts(RolloutConfig(guards={"max_error_rate": 0.5}), stable, filled(400, errors=360))[
            "max_error_rate"
        ]
        == "fail"
    )
    slow = RolloutConfig(latency={"quantiles": [0.5], "slack": 0.45})
    assert verdicts(slow, stable, filled(200, total_s=0.04))["latency_p50"] == "fail"


@pytest.mark.parametrize(
    ("section", "value", "named"),
    [
        ("guards", {"max_error_rate": 1.0}, "max_error_rate"),
        ("latency", {"quantiles": [0.5, 0.99], "slack": 0.5}, "slack"),
        ("alpha", 0.5, "alpha"),
    ],
)
def test_a_gate_that_could_not_be_evaluated_is_refused_with_its_field(
    section: str, value: object, named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        RolloutConfig.model_validate({section: value})


def test_little_evidence_holds() -> None:
    found = verdicts(RolloutConfig(), filled(3000), filled(5))
    assert found["error_rate"] == "hold" and found["drift"] == "hold"
    assert verdicts(RolloutConfig(), filled(5), filled(5))["latency_p50"] == "hold"


def test_accuracy_counts_decide_and_missing_labels_skip_or_hold() -> None:
    config = RolloutConfig()
    worse = (Accuracy(2000, 1900), Accuracy(400, 300))
    gates = {g.name: g for g in evaluate(config, filled(300), filled(300), worse)}
    assert gates["accuracy"].decision == "fail"
    assert gates["accuracy"].evidence["difference"] == pytest.approx(0.75 - 0.95)
    assert "accuracy" not in {g.name for g in evaluate(config, filled(300), filled(300))}
    required = RolloutConfig(accuracy={"required": True})
    held = {g.name: g for g in evaluate(required, filled(300), filled(300), labels_available=False)}
    assert held["accuracy"].decision == "hold" and "cannot be reached" in held["accuracy"].detail


def test_input_drift_fails_on_the_canary_s_own_drift_only() -> None:
    config = RolloutConfig()
    clean = InputDrift(evaluated=True, drifted={})
    drifted = InputDrift(evaluated=True, drifted={"x[0]": ["psi"]})
    found = {
        g.name: g for g in evaluate(config, filled(300), filled(300), input_drift=(clean, drifted))
    }
    assert found["input_drift"].decision == "fail" and "x[0] (psi)" in found["input_drift"].detail
    both = {
        g.name: g
        for g in evaluate(config, filled(300), filled(300), input_drift=(drifted, drifted))
    }
    assert both["input_drift"].decision == "pass"  # the stable's inputs drifted alike
    waiting = InputDrift(evaluated=False, drifted={})
    held = {
        g.name: g for g in evaluate(config, filled(300), filled(300), input_drift=(None, waiting))
    }
    assert held["input_drift"].decision == "hold"
    assert "input_drift" not in {g.name for g in evaluate(config, filled(300), filled(300))}


def state(**fields: object) -> RolloutState:
    now = time.time()
    values: dict[str, object] = {"stable": 1, "canary": 2, "started": now, "step_started": now - 60}
    values.update(fields)
    return RolloutState.model_validate(values)


def test_decide_rolls_back_advances_promotes_holds_and_pauses() -> None:
    config = RolloutConfig(steps=[10, 50, 100], step_seconds=30, min_requests=100)
    stable, healthy = filled(3000), filled(400)
    gates = evaluate(config, stable, healthy)
    now = time.time()
    first = decide(state(config=config), gates, healthy, now)
    assert first is not None and first.action == "advance"
    last = decide(state(config=config, step=1), gates, healthy, now)
    assert last is not None and last.action == "promote"
    young = decide(state(config=config, step_started=now), gates, healthy, now)
    assert young is None  # step_seconds not reached
    bad = filled(400, errors=60)
    worse = decide(state(config=config), evaluate(config, stable, bad), bad, now)
    assert worse is not None and worse.action == "rollback" and "error_rate" in worse.reason
    few = filled(5)
    waited = state(config=config.model_copy(update={"pause_after_s": 10}))
    paused = decide(waited, evaluate(config, stable, few), few, now)
    assert paused is not None and paused.action == "pause" and "waiting for" in paused.reason


def test_config_validation_names_the_field() -> None:
    assert RolloutConfig(steps=[5, 25]).steps == [5, 25, 100]
    for steps in ([], [50, 20], [0, 100], [150]):
        with pytest.raises(ValidationError, match="steps"):
            RolloutConfig(steps=steps)
    with pytest.raises(ValidationError, match="quantiles"):
        RolloutConfig(latency={"quantiles": [1.5]})
    with pytest.raises(ValidationError, match="extra"):
        RolloutConfig(error_rate={"margins": 0.1})


def test_state_weights_follow_the_phase() -> None:
    rolling = state(config=RolloutConfig(steps=[10, 100]))
    assert rolling.weights() == {1: 90, 2: 10}
    assert rolling.model_copy(update={"phase": "promoted"}).weights() == {2: 100}
    assert rolling.model_copy(update={"phase": "rolled_back"}).weights() == {1: 100}


def test_one_lease_holder_until_it_expires(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    other = PolicyStore(tmp_path)
    assert store.acquire_lease("rollout:m", "a", 0.3) == "a"
    assert other.acquire_lease("rollout:m", "b", 0.3) == "a"
    assert store.acquire_lease("rollout:m", "a", 0.3) == "a"  # renewed
    time.sleep(0.35)  # the holder stopped renewing: its lease runs out
    assert other.acquire_lease("rollout:m", "b", 0.3) == "b"
    assert other.acquire_lease("rollout:other", "b", 0.3) == "b"


async def test_one_model_whose_tick_fails_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Store:
        def all(self) -> dict[str, object]:
            return {"broken": object(), "fine": object()}

    active = state()
    assert active.phase in ACTIVE
    monkeypatch.setattr(controller_module, "rollout_state", lambda policy: active)
    controller = RolloutController(Store(), Evidence())  # type: ignore[arg-type]
    ticked: list[str] = []

    async def tick_model(model: str, policy: object, state: RolloutState) -> None:
        ticked.append(model)
        if model == "broken":
            raise ValueError("a gate could not be evaluated")

    monkeypatch.setattr(controller, "_tick_model", tick_model)
    await controller.tick()
    assert ticked == ["broken", "fine"]
    assert "rollout of 'broken': the tick failed" in caplog.text


@st.composite
def configs(draw: st.DrawFn) -> RolloutConfig:
    """Any rollout config the schema accepts, with extreme values likelier than usual."""

    def unit(*, low: float = 0.0, high: float = 1.0, lows: bool = True) -> float:
        return draw(st.floats(low, high, exclude_min=not lows, exclude_max=high < 1.0 or not lows))

    quantiles = draw(st.lists(st.floats(0.001, 1 - 1e-6), min_size=1, max_size=3))
    return RolloutConfig.model_validate(
        {
            "alpha": draw(st.floats(1e-9, 0.5, exclude_max=True)),
            "error_rate": {
                "margin": unit(),
                "tolerance": unit(lows=False),
                "tau": draw(st.floats(1e-9, 1e6)),
            },
            "latency": {
                "quantiles": quantiles,
                "margin_ms": draw(st.floats(0, 1e6)),
                "slack": draw(st.floats(0, min(min(quantiles) - 0.001, 0.5))),
            },
            "drift": {
                "margin_sd": draw(st.floats(1e-9, 1e6)),
                "tau_sd": draw(st.floats(1e-9, 1e6)),
            },
            "accuracy": {"margin": unit(), "tau": draw(st.floats(1e-9, 1e6))},
            "guards": {
                "max_error_rate": draw(st.floats(1e-9, 0.99)),
                "p99_ceiling_ms": draw(st.none() | st.floats(1e-6, 1e6)),
                "consecutive_failures": draw(st.integers(1, 1000)),
            },
        }
    )


EVIDENCE = {
    "none": lambda: VersionEvidence(),
    "few": lambda: filled(3, errors=1),
    "healthy": lambda: filled(400),
    "failing": lambda: filled(200, errors=200),
    "slow": lambda: filled(300, total_s=0.5),
    "drifted": lambda: filled(300, y=5.0),
}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    config=configs(),
    stable=st.sampled_from(sorted(EVIDENCE)),
    canary=st.sampled_from(sorted(EVIDENCE)),
    accuracy=st.none() | st.tuples(st.integers(0, 500), st.integers(0, 500)),
)
def test_every_config_the_schema_accepts_evaluates_without_raising(
    config: RolloutConfig, stable: str, canary: str, accuracy: tuple[int, int] | None
) -> None:
    """A config that passed validation must never make a gate raise at evaluation: that
    stalls the rollout (a ceiling of 0.5 or more once did, on every tick)."""
    counts = None
    if accuracy is not None:
        counts = (Accuracy(500, accuracy[0]), Accuracy(500, accuracy[1]))
    gates = evaluate(config, EVIDENCE[stable](), EVIDENCE[canary](), counts)
    assert {g.decision for g in gates} <= {"pass", "hold", "fail"}
    assert [g.name for g in gates][:2] == ["trip_wire", "max_error_rate"]
