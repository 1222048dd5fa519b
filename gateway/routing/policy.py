"""Traffic policies: pure, seeded routing decisions for one model.

A policy is weights over versions (summing to 100) plus an optional blue-green standby,
an optional shadow, whether requests may name a version, injected faults per version
(``turnout traffic fault``), and the state of an automated rollout when one runs
(``gateway/rollout/``), which is stored here so it shares the policy's revision. Decisions
are a pure function of (policy, routing key or random draw), so tests can check them
statistically.

Sticky assignment hashes (model, key) to a point in [0, 100). Versions own consecutive
ranges in ascending version order, so the newest version owns the top of the range: raising
its weight only extends its range downward, moving keys *into* it and never out of it.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Decision", "Fault", "ShadowPolicy", "TrafficPolicy", "key_point", "route"]


class ShadowPolicy(BaseModel):
    """Mirror ``percent`` of requests to ``version``; its answers are compared, then dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    percent: float = Field(gt=0, le=100)


class Fault(BaseModel):
    """Faults injected into one version's requests (testing rollouts and clients): a share
    answered with an error, a share delayed before batching."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    abort_percent: float = Field(default=0.0, ge=0, le=100)
    """Share of requests answered ``abort_status`` without running the model."""
    abort_status: Literal[500, 503] = 500
    """500 (INTERNAL) or 503 (UNAVAILABLE)."""
    delay_ms: float = Field(default=0.0, ge=0, le=60_000)
    """Added before the request is queued."""
    delay_percent: float = Field(default=100.0, ge=0, le=100)
    """Share of requests delayed by ``delay_ms``."""


class TrafficPolicy(BaseModel):
    """One model's routing rules at one revision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    revision: int = Field(default=0, ge=0)
    weights: dict[int, int]
    """Version -> share of traffic in percent; the shares sum to 100."""
    standby: int | None = Field(default=None, ge=1)
    """Blue-green: the warm version that ``switch`` makes active."""
    allow_explicit_version: bool = True
    shadow: ShadowPolicy | None = None
    faults: dict[int, Fault] = Field(default_factory=dict)
    """Version -> faults injected into its requests."""
    rollout: dict[str, Any] | None = None
    """The automated rollout's state (``gateway.rollout.state.RolloutState`` as JSON), or
    None when no rollout was started since the last manual change."""
    experiment: dict[str, Any] | None = None
    """The A/B experiment's state (``gateway.rollout.experiment.ExperimentState``), or None."""

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[int, int]) -> dict[int, int]:
        if not weights:
            raise ValueError("weights must name at least one version")
        for version, weight in weights.items():
            if version < 1:
                raise ValueError(f"version {version} is not a positive integer")
            if weight < 0:
                raise ValueError(f"weight of version {version} is negative ({weight})")
        total = sum(weights.values())
        if total != 100:
            raise ValueError(f"weights must sum to 100, they sum to {total}")
        return {v: w for v, w in sorted(weights.items()) if w > 0} or weights

    @model_validator(mode="after")
    def _check_standby(self) -> TrafficPolicy:
        if self.standby is not None:
            if len(self.active_versions) != 1:
                raise ValueError("blue-green needs exactly one active version at weight 100")
            if self.standby in self.weights and self.weights[self.standby] > 0:
                raise ValueError(f"standby version {self.standby} is also the active one")
        return self

    # Derived fields are computed once per policy object: a policy never changes, and a new
    # revision is a new object, so the hot path reads them for free.

    @cached_property
    def active_versions(self) -> list[int]:
        return [v for v, w in self.weights.items() if w > 0]

    @cached_property
    def edges(self) -> list[float]:
        """Upper ends of the active versions' ranges in [0, 100), ascending."""
        edges: list[float] = []
        edge = 0.0
        for version in self.active_versions:
            edge += self.weights[version]
            edges.append(edge)
        return edges

    @property
    def kind(self) -> str:
        if self.standby is not None:
            return "blue-green"
        return "canary" if len(self.active_versions) > 1 else "single"

    @cached_property
    def primary(self) -> int:
        """The version with the largest share (the lowest version on ties)."""
        return max(self.active_versions, key=lambda v: (self.weights[v], -v))

    def versions_in_use(self) -> set[int]:
        """Versions this policy may send traffic to (unload is refused for these)."""
        used = set(self.active_versions)
        if self.standby is not None:
            used.add(self.standby)
        if self.shadow is not None:
            used.add(self.shadow.version)
        return used

    def public(self) -> dict[str, Any]:
        """JSON form for the admin API and the CLI."""
        return {
            "model": self.model,
            "revision": self.revision,
            "kind": self.kind,
            "weights": {str(v): w for v, w in self.weights.items()},
            "standby": self.standby,
            "allow_explicit_version": self.allow_explicit_version,
            "shadow": self.shadow.model_dump() if self.shadow else None,
            "faults": {str(v): f.model_dump() for v, f in self.faults.items()},
            "rollout": self.rollout,
            "experiment": self.experiment,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    version: int
    arm: str  # "primary", "canary" or "explicit"
    revision: int
    shadow: int | None = None
    """The version this request is mirrored to, or None."""
    fault: Fault | None = None
    """Faults injected into this request's version, or None."""


def key_point(model: str, key: str) -> float:
    """A stable point in [0, 100) for (model, key)."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


def route(policy: TrafficPolicy, point: float, shadow: int | None = None) -> Decision:
    """The version owning ``point`` in [0, 100) under ``policy``'s weights."""
    versions = policy.active_versions
    chosen = versions[min(bisect.bisect_right(policy.edges, point), len(versions) - 1)]
    arm = "primary" if chosen == policy.primary else "canary"
    faults = policy.faults
    return Decision(chosen, arm, policy.revision, shadow, faults.get(chosen) if faults else None)
