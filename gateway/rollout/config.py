"""A rollout's configuration: its steps, how long each lasts, and every gate's margins.

Given per rollout (``turnout rollout start ... --config rollout.yaml``, or the REST body's
``config``), on top of defaults that suit a small model at a few hundred requests a second.
Stored with the rollout's state in the traffic policy, so every gateway and a restarted one
apply the same rules. Formulas and guarantees: docs/rollouts.md.
"""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AccuracyGate",
    "DriftGate",
    "ErrorRateGate",
    "Guards",
    "InputDriftGate",
    "LatencyGate",
    "RolloutConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorRateGate(_Section):
    """Canary error rate against the stable version's (mSPRT on the difference)."""

    enabled: bool = True
    margin: float = Field(default=0.0, ge=0, le=1)
    """Rolled back when the canary's error rate is proven above stable's + ``margin`` (0: any
    proven increase)."""
    tolerance: float = Field(default=0.01, gt=0, le=1)
    """A step advances only when the canary's error rate is proven below stable's +
    ``tolerance``."""
    tau: float = Field(default=0.04, gt=0)
    """Mixing scale of the mSPRT: the size of a difference it detects fastest."""


class LatencyGate(_Section):
    """Canary latency quantiles against the stable version's, with a margin."""

    enabled: bool = True
    quantiles: list[float] = Field(default_factory=lambda: [0.5, 0.99])
    margin_ms: float = Field(default=10.0, ge=0)
    """Added to the stable version's quantile before comparing."""
    slack: float = Field(default=0.04, ge=0, le=0.5)
    """"No worse" needs the share above that threshold proven below ``1 - q + slack``."""

    @field_validator("quantiles")
    @classmethod
    def _check_quantiles(cls, quantiles: list[float]) -> list[float]:
        if not quantiles or any(not 0 < q < 1 for q in quantiles):
            raise ValueError("quantiles must be in (0, 1)")
        return quantiles

    @model_validator(mode="after")
    def _check_slack(self) -> LatencyGate:
        # "No worse" tests the share above the threshold against 1 - q + slack, a rate
        # that must stay under 1 for every quantile (by a margin rounding cannot eat).
        q = min(self.quantiles)
        if (1.0 - q) + self.slack > 0.999:
            raise ValueError(
                f"slack ({self.slack}) must be at most the smallest quantile ({q}) less 0.001"
            )
        return self


class DriftGate(_Section):
    """Prediction drift: the canary's output means against the stable version's."""

    enabled: bool = True
    margin_sd: float = Field(default=0.5, gt=0)
    """Rolled back when a column's mean differs by more than this many stable standard
    deviations (proven); "no worse" when every column is proven within it."""
    tau_sd: float = Field(default=0.5, gt=0)


class InputDriftGate(_Section):
    """Input drift of the canary's features against its reference profile (the sidecar's
    drift statistics over its windows), compared with the stable version's."""

    enabled: bool = True
    """Evaluated only for a canary with a reference profile in the sidecar."""


class AccuracyGate(_Section):
    """Accuracy from label feedback (the sidecar's counts), canary against stable."""

    enabled: bool = True
    margin: float = Field(default=0.05, ge=0, le=1)
    tau: float = Field(default=0.05, gt=0)
    required: bool = False
    """Hold the rollout until labels arrive; otherwise the gate is skipped without labels."""


class Guards(_Section):
    """Absolute limits, whatever the stable version does."""

    max_error_rate: float = Field(default=0.2, gt=0, le=0.99)
    """The ceiling on the canary's error rate, proven above it to roll back (at most 0.99:
    no rate can be proven above 1, and the test's prior degenerates next to it)."""
    p99_ceiling_ms: float | None = Field(default=None, gt=0)
    consecutive_failures: int = Field(default=5, ge=1)
    """The trip-wire: this many failed canary requests in a row roll back at once."""


class RolloutConfig(_Section):
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    """Canary weight of each step, in percent, ascending; the last is 100 (promotion)."""
    step_seconds: float = Field(default=30.0, ge=0)
    """Shortest time a step lasts."""
    min_requests: int = Field(default=200, ge=1)
    """Fewest canary requests a step needs before it may advance."""
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    """Error rate of each sequential test, valid under continuous monitoring (below 0.5,
    which the tests need: a larger one would make every evaluation raise)."""
    pause_after_s: float = Field(default=300.0, gt=0)
    """A step that cannot decide (no traffic, no labels) this long is paused with a reason."""
    tick_s: float = Field(default=0.25, gt=0, le=5)
    """How often the gates are evaluated."""
    error_rate: ErrorRateGate = ErrorRateGate()
    latency: LatencyGate = LatencyGate()
    drift: DriftGate = DriftGate()
    input_drift: InputDriftGate = InputDriftGate()
    accuracy: AccuracyGate = AccuracyGate()
    guards: Guards = Guards()
    webhooks: list[str] = Field(default_factory=list)
    """URLs each decision (advance, promote, roll back, pause) is POSTed to as JSON."""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 < s <= 100 for s in steps):
            raise ValueError("steps must be percentages in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must be ascending")
        if steps[-1] != 100:
            steps = [*steps, 100]
        return steps
