"""Rollout administration, transport-agnostic: start, status, pause, resume, abort, promote.

The REST and gRPC admin adapters and ``turnout rollout`` end here. Starting validates the
canary (loaded, not the stable version) and the configuration, then commits the first step
(weights and state together) as one revision; ``dry_run`` validates and answers the plan
without committing. Every action by hand is an audit entry under the caller's token name.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import ValidationError

from gateway.errors import Conflict, InvalidInput, ModelNotFound
from gateway.models import ModelTable
from gateway.rollout.config import RolloutConfig
from gateway.rollout.controller import RolloutController, commit_state, rollout_state
from gateway.rollout.state import ACTIVE, RolloutState
from gateway.routing.operations import parse_int
from gateway.routing.router import PolicyRouter
from gateway.routing.store import BasePolicyStore

__all__ = ["ROLLOUT_ACTIONS", "RolloutAdmin"]

ROLLOUT_ACTIONS = ("pause", "resume", "abort", "promote")
_OVERRIDES = ("steps", "step_seconds", "min_requests", "alpha", "pause_after_s")


def parse_config(body: dict[str, Any]) -> RolloutConfig:
    """``config`` (a mapping) with the flat overrides of the command line on top."""
    given = body.get("config") or {}
    if not isinstance(given, dict):
        raise InvalidInput("'config' must be an object (the keys of rollout.yaml)")
    merged = {**given, **{k: body[k] for k in _OVERRIDES if body.get(k) is not None}}
    try:
        return RolloutConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(f"invalid rollout config: {problems}") from None


class RolloutAdmin:
    def __init__(
        self,
        models: ModelTable,
        store: BasePolicyStore,
        router: PolicyRouter,
        controller: RolloutController,
    ) -> None:
        self.table = models
        self.store = store
        self.router = router
        self.controller = controller

    def _ready(self, model: str) -> list[int]:
        versions = self.table.versions_by_model().get(model)
        if not versions:
            raise ModelNotFound(f"model '{model}' is not served")
        return versions

    def status(self, model: str) -> dict[str, Any]:
        """The rollout document: phase, step, weights, stable, canary, every gate, reason."""
        ready = self._ready(model)
        policy = self.router.policy_for(model, ready)
        state = rollout_state(policy)
        if state is None:
            raise ModelNotFound(
                f"model '{model}' has no rollout (start one: turnout rollout start)"
            )
        return self._document(model, policy.revision, state)

    def _document(self, model: str, revision: int, state: RolloutState) -> dict[str, Any]:
        gates = self.controller.gates.get(model) if state.phase in ACTIVE else None
        live = [g.public() for g in gates] if gates is not None else state.evidence
        canary = self.controller.evidence.of(model, state.canary)
        stable = self.controller.evidence.of(model, state.stable)
        return {
            "model": model,
            "revision": revision,
            **state.public(),
            "step_elapsed_s": round(time.time() - state.step_started, 3),
            "gates": live,
            "evidence": {
                "stable": stable.summary() if stable else None,
                "canary": canary.summary() if canary else None,
            },
            "controller": self.controller.leaders.get(model),
            "config": state.config.model_dump(mode="json"),
        }

    async def start(self, model: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._start, model, body, actor)

    def _start(self, model: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        ready = self._ready(model)
        policy = self.router.policy_for(model, ready)
        current = rollout_state(policy)
        if current is not None and current.phase in ACTIVE:
            raise Conflict(
                f"model '{model}' already has a rollout of version {current.canary} "
                f"({current.phase}); abort or promote it first"
            )
        experiment = policy.experiment
        if experiment is not None and experiment.get("phase") == "running":
            raise Conflict(f"model '{model}' runs an A/B experiment; stop it first")
        canary = parse_int("canary", body.get("canary"))
        stable = policy.primary
        if canary == stable:
            raise InvalidInput(f"version {canary} is the stable version of '{model}' already")
        if canary not in ready:
            raise InvalidInput(
                f"canary version {canary} of '{model}' is not loaded (loaded: "
                f"{', '.join(map(str, ready))}); load it first"
            )
        now = time.time()
        state = RolloutState(
            stable=stable,
            canary=canary,
            started=now,
            step_started=now,
            config=parse_config(body),
            reason=f"started by {actor}",
        )
        if body.get("dry_run"):
            return {**self._document(model, policy.revision, state), "dry_run": True}
        stored = commit_state(self.store, model, None, state, "rollout_start", actor)
        return self._document(model, stored.revision, state)

    async def act(self, model: str, action: str, actor: str) -> dict[str, Any]:
        if action not in ROLLOUT_ACTIONS:
            raise InvalidInput(f"unknown rollout action '{action}' ({', '.join(ROLLOUT_ACTIONS)})")
        return await asyncio.to_thread(self._act, model, action, actor)

    def _act(self, model: str, action: str, actor: str) -> dict[str, Any]:
        ready = self._ready(model)
        state = rollout_state(self.router.policy_for(model, ready))
        if state is None or state.phase not in ACTIVE:
            phase = "none" if state is None else state.phase
            raise Conflict(f"model '{model}' has no rollout in progress (phase: {phase})")
        now = time.time()
        reason = f"{action} by {actor}"
        if action == "pause":
            new = state.model_copy(update={"phase": "paused", "reason": reason})
        elif action == "resume":
            new = state.model_copy(
                update={"phase": "progressing", "step_started": now, "reason": reason}
            )
        elif action == "abort":
            new = state.model_copy(update={"phase": "aborted", "reason": reason})
        else:
            new = state.model_copy(
                update={"phase": "promoted", "step": len(state.config.steps) - 1, "reason": reason}
            )
        stored = commit_state(self.store, model, state, new, f"rollout_{action}", actor)
        gates = self.controller.gates.get(model)
        self.controller.notify(model, action, new, [g.public() for g in gates or []])
        self.controller.wake()
        return self._document(model, stored.revision, new)
