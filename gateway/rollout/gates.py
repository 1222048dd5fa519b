"""The gates: each turns the evidence of one step into ``pass``, ``fail`` or ``hold``.

Canary against the live stable version over the same window (the current step):

    error_rate    mSPRT on the difference of 5xx rates; fail: proven above stable + margin,
                  pass: proven below it
    latency_pQ    exceedance test: the share of canary requests slower than stable's
                  quantile Q + margin_ms; fail: proven above 1 - Q, pass: proven below
                  1 - Q + slack
    drift         mSPRT per output column on the difference of means, in units of stable's
                  standard deviation (Bonferroni over columns)
    accuracy      mSPRT on the difference of accuracies from label feedback (the sidecar's
                  counts); skipped without labels unless required
    guards        absolute: error rate proven above max_error_rate, p99 proven above the
                  ceiling; the trip-wire (k failed canary requests in a row) fails at once

Formulas and guarantees: gateway/rollout/statistics.py and docs/rollouts.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gateway.rollout import statistics as stats
from gateway.rollout.config import RolloutConfig
from gateway.rollout.evidence import VersionEvidence

__all__ = ["Accuracy", "GateResult", "InputDrift", "evaluate"]

Verdict = Literal["pass", "fail", "hold"]
_VERDICT: dict[stats.Decision, Verdict] = {
    stats.Decision.WORSE: "fail",
    stats.Decision.NO_WORSE: "pass",
    stats.Decision.UNDECIDED: "hold",
}


@dataclass(frozen=True, slots=True)
class Accuracy:
    """Labelled and correct predictions of one version (the sidecar's feedback counts)."""

    labelled: int
    correct: int


@dataclass(frozen=True, slots=True)
class InputDrift:
    """One version's features against its reference profile, as the sidecar last saw them."""

    evaluated: bool
    """Every feature has drift statistics of a closed window."""
    drifted: dict[str, list[str]]
    """Feature -> the statistics above their thresholds (empty: none drifted)."""


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    statistic: str
    """Which test decided (and its value in ``evidence``)."""
    decision: Verdict
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "statistic": self.statistic,
            "decision": self.decision,
            "detail": self.detail,
            "evidence": self.evidence,
        }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def evaluate(
    config: RolloutConfig,
    stable: VersionEvidence,
    canary: VersionEvidence,
    accuracy: tuple[Accuracy, Accuracy] | None = None,
    *,
    labels_available: bool = True,
    input_drift: tuple[InputDrift | None, InputDrift | None] | None = None,
) -> list[GateResult]:
    """Every enabled gate's verdict on the current step (guards first)."""
    results = [*_guards(config, canary)]
    if config.error_rate.enabled:
        results.append(_error_rate(config, stable, canary))
    if config.latency.enabled:
        results.extend(_latency(config, stable, canary))
    if config.drift.enabled:
        results.append(_drift(config, stable, canary))
    if config.input_drift.enabled and input_drift is not None:
        stable_inputs, canary_inputs = input_drift
        if canary_inputs is not None:
            results.append(_input_drift(stable_inputs, canary_inputs))
    if config.accuracy.enabled:
        gate = _accuracy(config, accuracy, labels_available)
        if gate is not None:
            results.append(gate)
    return results


def _guards(config: RolloutConfig, canary: VersionEvidence) -> list[GateResult]:
    guards = config.guards
    run = canary.longest_failure_run
    tripped = run >= guards.consecutive_failures
    results = [
        GateResult(
            "trip_wire",
            "consecutive_failures",
            "fail" if tripped else "pass",
            f"{run} failed canary requests in a row (limit {guards.consecutive_failures})",
            {"longest_failure_run": run, "limit": guards.consecutive_failures},
        )
    ]
    test = stats.exceedance_rate(
        canary.errors, canary.requests, guards.max_error_rate, alpha=config.alpha
    )
    results.append(
        GateResult(
            "max_error_rate",
            "beta_binomial_exceedance",
            "fail" if test.decision is stats.Decision.WORSE else "pass",
            f"canary error rate {test.estimate:.4f} against the ceiling {guards.max_error_rate}",
            {
                "errors": canary.errors,
                "requests": canary.requests,
                "log_ratio": _round(test.statistic),
            },
        )
    )
    if guards.p99_ceiling_ms is not None:
        slower = canary.slower_than(guards.p99_ceiling_ms / 1e3)
        ceiling = stats.latency_exceedance(
            slower, canary.successes, quantile=0.99, alpha=config.alpha
        )
        results.append(
            GateResult(
                "p99_ceiling",
                "beta_binomial_exceedance",
                "fail" if ceiling.decision is stats.Decision.WORSE else "pass",
                f"{slower} of {canary.successes} canary requests above {guards.p99_ceiling_ms} ms",
                {
                    "slower": slower,
                    "successes": canary.successes,
                    "log_ratio": _round(ceiling.statistic),
                },
            )
        )
    return results


def _error_rate(
    config: RolloutConfig, stable: VersionEvidence, canary: VersionEvidence
) -> GateResult:
    gate = config.error_rate

    def test_at(margin: float) -> stats.DifferenceResult:
        return stats.error_rate_difference(
            canary.errors,
            canary.requests,
            stable.errors,
            stable.requests,
            tau=gate.tau,
            margin=margin,
            alpha=config.alpha,
            min_n=min(config.min_requests, 30),
        )

    # One confidence sequence, read at two margins: fail above ``margin``, pass below
    # ``tolerance`` (the bounds do not depend on the margin).
    test = test_at(gate.margin)
    if test.decision is stats.Decision.WORSE:
        verdict: Verdict = "fail"
    else:
        verdict = "pass" if test_at(gate.tolerance).decision is stats.Decision.NO_WORSE else "hold"
    return GateResult(
        "error_rate",
        "msprt_difference",
        verdict,
        f"canary - stable error rate {test.estimate:+.4f}, always-valid bounds "
        f"[{test.lower:+.4f}, {test.upper:+.4f}] (fail above {gate.margin}, pass below "
        f"{gate.tolerance})",
        {
            "canary": {"errors": canary.errors, "requests": canary.requests},
            "stable": {"errors": stable.errors, "requests": stable.requests},
            "difference": _round(test.estimate),
            "lower": _round(test.lower),
            "upper": _round(test.upper),
            "log_lambda": _round(test.statistic),
        },
    )


def _latency(
    config: RolloutConfig, stable: VersionEvidence, canary: VersionEvidence
) -> list[GateResult]:
    gate = config.latency
    results = []
    for q in gate.quantiles:
        name = f"latency_p{q * 100:g}"
        reference = stable.quantile_s(q)
        if reference is None or stable.successes < 30:
            results.append(
                GateResult(name, "beta_binomial_exceedance", "hold", "no stable latencies yet")
            )
            continue
        threshold = reference + gate.margin_ms / 1e3
        slower = canary.slower_than(threshold)
        test = stats.latency_exceedance(
            slower, canary.successes, quantile=q, slack=gate.slack, alpha=config.alpha, min_n=20
        )
        canary_q = canary.quantile_s(q)
        results.append(
            GateResult(
                name,
                "beta_binomial_exceedance",
                _VERDICT[test.decision],
                f"{slower} of {canary.successes} canary requests slower than stable's "
                f"p{q * 100:g} {reference * 1e3:.2f} ms + {gate.margin_ms} ms "
                f"(allowed share {1 - q:.3f})",
                {
                    "stable_ms": _round(reference * 1e3, 3),
                    "canary_ms": None if canary_q is None else _round(canary_q * 1e3, 3),
                    "threshold_ms": _round(threshold * 1e3, 3),
                    "slower": slower,
                    "successes": canary.successes,
                    "log_ratio": _round(test.statistic),
                    "no_worse_log_ratio": _round(test.no_worse_statistic),
                },
            )
        )
    return results


def _drift(config: RolloutConfig, stable: VersionEvidence, canary: VersionEvidence) -> GateResult:
    gate = config.drift
    stable_moments, canary_moments = stable.output_moments(), canary.output_moments()
    if stable_moments is None or canary_moments is None:
        return GateResult("drift", "msprt_difference", "hold", "no outputs compared yet")
    n_s, mean_s, var_s = stable_moments
    n_c, mean_c, var_c = canary_moments
    columns = min(len(mean_s), len(mean_c))
    alpha = config.alpha / columns  # Bonferroni over columns
    verdicts: list[Verdict] = []
    worst: dict[str, Any] = {}
    worst_gap = -1.0
    for j in range(columns):
        scale = float(np.sqrt(var_s[j])) or 1.0
        canary_j = stats.SampleSummary(n_c, float(mean_c[j]) / scale, float(var_c[j]) / scale**2)
        stable_j = stats.SampleSummary(n_s, float(mean_s[j]) / scale, float(var_s[j]) / scale**2)
        # The mSPRT is one-sided (canary above); a shift down is the same drift, so the
        # mirrored test (stable above) runs too.
        test, mirrored = (
            stats.mean_difference(
                first, second, tau=gate.tau_sd, margin=gate.margin_sd, alpha=alpha, min_n=30
            )
            for first, second in ((canary_j, stable_j), (stable_j, canary_j))
        )
        if stats.Decision.WORSE in (test.decision, mirrored.decision):
            verdicts.append("fail")
        elif test.decision is mirrored.decision is stats.Decision.NO_WORSE:
            verdicts.append("pass")
        else:
            verdicts.append("hold")
        gap = abs(test.estimate)
        if gap > worst_gap:
            worst_gap = gap
            worst = {
                "column": j,
                "difference_sd": _round(test.estimate),
                "bounds_sd": [_round(-mirrored.upper), _round(test.upper)],
            }
    decision: Verdict = (
        "fail" if "fail" in verdicts else "pass" if all(v == "pass" for v in verdicts) else "hold"
    )
    return GateResult(
        "drift",
        "msprt_difference",
        decision,
        f"largest shift of the canary's output means: {worst_gap:.3f} stable sd "
        f"(margin {gate.margin_sd}, {columns} column{'s' if columns != 1 else ''})",
        {"rows": {"canary": n_c, "stable": n_s}, "columns": columns, "worst": worst},
    )


def _input_drift(stable: InputDrift | None, canary: InputDrift) -> GateResult:
    # Features drifted for the canary but not for the stable version: its own inputs changed
    # no more than stable's, so the drift comes with the canary (its callers, its traffic).
    own = {
        name: statistics
        for name, statistics in canary.drifted.items()
        if stable is None or name not in stable.drifted
    }
    if own:
        decision: Verdict = "fail"
        detail = "canary inputs drifted from its reference: " + ", ".join(
            f"{name} ({'/'.join(s)})" for name, s in sorted(own.items())
        )
    elif canary.evaluated:
        decision, detail = "pass", "no canary feature drifted beyond its reference threshold"
    else:
        decision, detail = "hold", "no closed drift window of the canary yet"
    return GateResult(
        "input_drift",
        "reference_thresholds",
        decision,
        detail,
        {"drifted": own, "evaluated": canary.evaluated},
    )


def _accuracy(
    config: RolloutConfig,
    accuracy: tuple[Accuracy, Accuracy] | None,
    labels_available: bool,
) -> GateResult | None:
    gate = config.accuracy
    if accuracy is None or accuracy[0].labelled == 0 or accuracy[1].labelled == 0:
        if not gate.required:
            return None
        reason = "no labels yet" if labels_available else "the monitor sidecar cannot be reached"
        return GateResult("accuracy", "msprt_difference", "hold", reason)
    stable, canary = accuracy
    # Errors, not accuracy: "worse" is a higher rate of wrong answers.
    test = stats.error_rate_difference(
        canary.labelled - canary.correct,
        canary.labelled,
        stable.labelled - stable.correct,
        stable.labelled,
        tau=gate.tau,
        margin=gate.margin,
        alpha=config.alpha,
        min_n=30,
    )
    return GateResult(
        "accuracy",
        "msprt_difference",
        _VERDICT[test.decision],
        f"canary - stable accuracy {-test.estimate:+.4f} over {canary.labelled} / "
        f"{stable.labelled} labels (margin {gate.margin})",
        {
            "canary": {"labelled": canary.labelled, "correct": canary.correct},
            "stable": {"labelled": stable.labelled, "correct": stable.correct},
            "difference": _round(-test.estimate),
            "lower": _round(-test.upper),
            "upper": _round(-test.lower),
        },
    )
