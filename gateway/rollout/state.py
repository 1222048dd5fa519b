"""A rollout's state machine, stored with the traffic policy (one revision per transition).

::

    progressing ──(every gate proves "no worse" at the last step)──► promoted
        │  ▲  └──(any gate proves "worse", a guard trips)──────────► rolled_back
        ▼  │
      paused ──(resume)                      abort (by hand) ─────► aborted

A transition is a compare-and-set of the policy (weights and this state together), so a
restarted gateway resumes where the rollout was, and every transition is in the audit log
with the evidence that caused it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.rollout.config import RolloutConfig

__all__ = ["ACTIVE", "FINAL", "Phase", "RolloutState"]

Phase = Literal["progressing", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE: tuple[Phase, ...] = ("progressing", "paused")
FINAL: tuple[Phase, ...] = ("promoted", "rolled_back", "aborted")


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: Phase = "progressing"
    stable: int = Field(ge=1)
    canary: int = Field(ge=1)
    step: int = Field(default=0, ge=0)
    """Index into ``config.steps``."""
    started: float
    """Wall clock when the rollout started."""
    step_started: float
    """Wall clock when the current step started."""
    reason: str = ""
    """Why the rollout is where it is (the last decision, with its evidence in words)."""
    dry_run: bool = False
    """Gates are evaluated and reported; traffic never moves by itself."""
    config: RolloutConfig = RolloutConfig()
    evidence: list[dict[str, Any]] = Field(default_factory=list)
    """Every gate's verdict and evidence at the last decision."""

    @property
    def weight(self) -> int:
        """The canary's weight at the current step."""
        return self.config.steps[min(self.step, len(self.config.steps) - 1)]

    def weights(self) -> dict[int, int]:
        if self.phase == "promoted":
            return {self.canary: 100}
        if self.phase in ("rolled_back", "aborted"):
            return {self.stable: 100}
        canary = self.weight
        return (
            {self.stable: 100 - canary, self.canary: canary} if canary < 100 else {self.canary: 100}
        )

    def public(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "stable": self.stable,
            "canary": self.canary,
            "step": self.step,
            "steps": self.config.steps,
            "weights": {str(v): w for v, w in self.weights().items()},
            "started": self.started,
            "step_started": self.step_started,
            "reason": self.reason,
            "dry_run": self.dry_run,
        }
