"""A/B experiments: sticky arms, per-arm outcomes from feedback, always-valid lift and SRM.

An experiment splits a model's traffic over its arms (versions) by the policy's weights, so
a routing key (``x-turnout-routing-key``) keeps each user on one arm (today's sticky
mechanism). Outcomes come back as label feedback to the sidecar: accuracy (a label per
request) or a numeric ``reward``. Every arm is compared with the control (the first arm)
with the always-valid confidence sequence of the difference of means (mSPRT, Bonferroni
over the treatment arms), and the assignment counts are checked against the split with the
sequential sample-ratio-mismatch test; peeking at any time keeps both error rates.
Formulas: gateway/rollout/statistics.py and docs/rollout-statistics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.rollout import statistics as stats

__all__ = ["ArmOutcome", "ExperimentState", "evaluate_experiment"]

Metric = Literal["accuracy", "reward"]


class ExperimentState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: Literal["running", "stopped"] = "running"
    arms: list[int] = Field(min_length=2)
    """Versions; the first is the control."""
    split: list[int]
    """Percent of traffic per arm, summing to 100."""
    metric: Metric = "accuracy"
    alpha: float = Field(default=0.05, gt=0, lt=0.5)  # as the sequential tests need
    tau: float = Field(default=0.05, gt=0)
    """Mixing scale of the lift's mSPRT: about the smallest difference worth finding fast."""
    equivalence_margin: float = Field(default=0.01, ge=0)
    """"No difference" once every arm's interval lies within +- this."""
    started: float
    winner: int | None = None
    reason: str = ""
    baseline: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Per arm, the sidecar's cumulative feedback counts when the experiment started
    (labelled, correct, n, total, squares): outcomes count from there."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentState:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError("arms must be distinct versions")
        if len(self.split) != len(self.arms):
            raise ValueError(f"split needs one share per arm ({len(self.arms)})")
        if any(s <= 0 for s in self.split) or sum(self.split) != 100:
            raise ValueError(f"split must be positive and sum to 100, it sums to {sum(self.split)}")
        return self

    def weights(self) -> dict[int, int]:
        if self.phase == "stopped" and self.winner is not None:
            return {self.winner: 100}
        return dict(zip(self.arms, self.split, strict=True))


@dataclass(frozen=True, slots=True)
class ArmOutcome:
    """One arm's feedback: ``n`` scored requests, their mean metric and its variance."""

    n: int
    mean: float
    variance: float
    successes: int | None = None


def evaluate_experiment(
    state: ExperimentState, assigned: list[int], outcomes: list[ArmOutcome | None]
) -> dict[str, Any]:
    """The experiment's statistics: per arm n, metric and lift; SRM; a decision."""
    srm = stats.sample_ratio_mismatch(
        assigned, [s / 100 for s in state.split], alpha=state.alpha
    ) if sum(assigned) else None  # fmt: skip
    arms: list[dict[str, Any]] = []
    control = outcomes[0]
    lifts: dict[str, stats.LiftResult] = {}
    if control is not None and all(o is not None for o in outcomes[1:]):
        summaries = [_summary(o) for o in outcomes if o is not None]
        treatments = {str(v): summaries[i + 1] for i, v in enumerate(state.arms[1:])}
        for result in stats.ab_lift(
            summaries[0],
            treatments,
            tau=state.tau,
            alpha=state.alpha,
            equivalence_margin=state.equivalence_margin,
        ):
            lifts[result.arm] = result
    for i, version in enumerate(state.arms):
        outcome = outcomes[i]
        lift = lifts.get(str(version))
        arms.append(
            {
                "version": version,
                "control": i == 0,
                "share": state.split[i],
                "assigned": assigned[i],
                "n": outcome.n if outcome else 0,
                state.metric: None if outcome is None or not outcome.n else round(outcome.mean, 6),
                "lift": None
                if lift is None
                else {
                    "difference": round(lift.difference, 6),
                    "always_valid_ci": [round(lift.lower, 6), round(lift.upper, 6)],
                    "relative": None
                    if lift.relative_lift is None
                    else round(lift.relative_lift, 6),
                    "decision": str(lift.decision),
                },
            }
        )
    decisions = {str(r.decision) for r in lifts.values()}
    if srm is not None and srm.decision is stats.SrmDecision.MISMATCH:
        decision = "sample_ratio_mismatch"
    elif "winner" in decisions:
        best = max(lifts.values(), key=lambda r: r.difference)
        decision = (
            f"winner: version {best.arm}" if str(best.decision) == "winner" else "keep_running"
        )
    elif lifts and decisions <= {"no_difference", "loser"}:
        decision = (
            "control wins" if "loser" in decisions and len(decisions) == 1 else "no_difference"
        )
    else:
        decision = "keep_running"
    return {
        "arms": arms,
        "srm": None
        if srm is None
        else {
            "log_bayes_factor": round(srm.log_bayes_factor, 4),
            "observed_shares": [round(s, 4) for s in srm.observed_shares],
            "decision": str(srm.decision),
        },
        "decision": decision,
    }


def _summary(outcome: ArmOutcome) -> stats.SampleSummary:
    if outcome.successes is not None:
        return stats.SampleSummary.bernoulli(outcome.successes, outcome.n)
    return stats.SampleSummary(outcome.n, outcome.mean, outcome.variance)
