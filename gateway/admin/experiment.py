"""A/B experiment administration, transport-agnostic: start, status, stop.

Starting sets the model's weights to the split (one revision, with the experiment's state
in the policy) and records the sidecar's feedback counts as the baseline; the status reads
assignments from the gateway's own evidence and outcomes from the sidecar, and answers
per arm n, the metric, the lift over the control with its always-valid interval, the
sample-ratio-mismatch test and a decision; stopping sends everything to the winner (or
back to the control).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import ValidationError

from gateway.errors import Conflict, InvalidInput, ModelNotFound
from gateway.models import ModelTable
from gateway.rollout.controller import RolloutController, rollout_state
from gateway.rollout.experiment import ArmOutcome, ExperimentState, evaluate_experiment
from gateway.rollout.labels import SidecarFeedback
from gateway.rollout.state import ACTIVE
from gateway.routing.operations import parse_int
from gateway.routing.policy import TrafficPolicy
from gateway.routing.router import PolicyRouter
from gateway.routing.store import BasePolicyStore

__all__ = ["ExperimentAdmin", "experiment_state"]


def experiment_state(policy: TrafficPolicy | None) -> ExperimentState | None:
    if policy is None or policy.experiment is None:
        return None
    return ExperimentState.model_validate(policy.experiment)


def _ints(field: str, value: Any) -> list[int]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"'{field}' must be a list of integers, e.g. [1, 2]")
    return [parse_int(field, v) for v in value]


class ExperimentAdmin:
    def __init__(
        self,
        models: ModelTable,
        store: BasePolicyStore,
        router: PolicyRouter,
        controller: RolloutController,
        feedback: SidecarFeedback | None,
    ) -> None:
        self.table = models
        self.store = store
        self.router = router
        self.controller = controller
        self.feedback = feedback

    def _policy(self, model: str) -> tuple[TrafficPolicy, list[int]]:
        ready = self.table.versions_by_model().get(model)
        if not ready:
            raise ModelNotFound(f"model '{model}' is not served")
        return self.router.policy_for(model, ready), ready

    async def status(self, model: str) -> dict[str, Any]:
        policy, _ = self._policy(model)
        state = experiment_state(policy)
        if state is None:
            raise ModelNotFound(f"model '{model}' has no experiment (turnout experiment start)")
        if self.feedback is not None:
            await self.feedback.refresh(model)
        return self._document(model, policy.revision, state)

    def _document(self, model: str, revision: int, state: ExperimentState) -> dict[str, Any]:
        assigned = []
        for version in state.arms:
            evidence = self.controller.evidence.of(model, version)
            assigned.append(evidence.requests if evidence else 0)
        outcomes = [self._outcome(model, state, v) for v in state.arms]
        return {
            "model": model,
            "revision": revision,
            **state.model_dump(mode="json", exclude={"baseline"}),
            "weights": {str(v): w for v, w in state.weights().items()},
            "feedback": "unavailable"
            if self.feedback is None or not self.feedback.reachable
            else "ok",
            **evaluate_experiment(state, assigned, outcomes),
        }

    def _outcome(self, model: str, state: ExperimentState, version: int) -> ArmOutcome | None:
        if self.feedback is None:
            return None
        base = state.baseline.get(str(version), {})
        if state.metric == "accuracy":
            counts = self.feedback.counts(model, version)
            if counts is None:
                return None
            labelled = counts.labelled - int(base.get("labelled", 0))
            correct = counts.correct - int(base.get("correct", 0))
            mean = correct / labelled if labelled else 0.0
            return ArmOutcome(labelled, mean, mean * (1 - mean), successes=correct)
        reward = self.feedback.reward(model, version)
        if reward is None:
            return None
        n, mean, variance = reward
        total, squares = _sums(n, mean, variance)
        n -= int(base.get("n", 0))
        total -= base.get("total", 0.0)
        squares -= base.get("squares", 0.0)
        if n <= 0:
            return ArmOutcome(0, 0.0, 0.0)
        mean = total / n
        variance = max(squares / n - mean**2, 0.0) * n / (n - 1) if n > 1 else 0.0
        return ArmOutcome(n, mean, variance)

    async def start(self, model: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        policy, ready = self._policy(model)
        if self.feedback is not None:
            await self.feedback.refresh(model)
        return await asyncio.to_thread(self._start, model, policy, ready, body, actor)

    def _start(
        self,
        model: str,
        policy: TrafficPolicy,
        ready: list[int],
        body: dict[str, Any],
        actor: str,
    ) -> dict[str, Any]:
        rollout = rollout_state(policy)
        if rollout is not None and rollout.phase in ACTIVE:
            raise Conflict(f"model '{model}' has a rollout in progress; end it first")
        current = experiment_state(policy)
        if current is not None and current.phase == "running":
            raise Conflict(f"model '{model}' already runs an experiment; stop it first")
        arms = _ints("arms", body.get("arms"))
        missing = [v for v in arms if v not in ready]
        if missing:
            raise InvalidInput(f"arm version(s) {missing} of '{model}' are not loaded")
        split = _ints("split", body["split"]) if body.get("split") else _even(len(arms))
        baseline = {str(v): self._counts(model, v) for v in arms}
        try:
            state = ExperimentState(
                arms=arms,
                split=split,
                metric=body.get("metric", "accuracy"),
                alpha=body.get("alpha", 0.05),
                started=time.time(),
                baseline=baseline,
                reason=f"started by {actor}",
                **{k: body[k] for k in ("tau", "equivalence_margin") if k in body},
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'experiment'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidInput(f"invalid experiment: {problems}") from None
        stored = self._commit(model, state, "experiment_start", actor)
        return self._document(model, stored.revision, state)

    def _counts(self, model: str, version: int) -> dict[str, float]:
        if self.feedback is None:
            return {}
        counts = self.feedback.counts(model, version)
        reward = self.feedback.reward(model, version)
        baseline: dict[str, float] = {}
        if counts is not None:
            baseline.update(labelled=counts.labelled, correct=counts.correct)
        if reward is not None:
            total, squares = _sums(*reward)
            baseline.update(n=reward[0], total=total, squares=squares)
        return baseline

    async def stop(self, model: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._stop, model, body, actor)

    def _stop(self, model: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        policy, _ = self._policy(model)
        state = experiment_state(policy)
        if state is None or state.phase != "running":
            raise Conflict(f"model '{model}' runs no experiment")
        winner = body.get("winner")
        winner = state.arms[0] if winner is None else parse_int("winner", winner)
        if winner not in state.arms:
            raise InvalidInput(f"winner {winner} is not an arm ({state.arms})")
        new = state.model_copy(
            update={"phase": "stopped", "winner": winner, "reason": f"stopped by {actor}"}
        )
        stored = self._commit(model, new, "experiment_stop", actor)
        return self._document(model, stored.revision, new)

    def _commit(
        self, model: str, state: ExperimentState, operation: str, actor: str
    ) -> TrafficPolicy:
        def change(current: TrafficPolicy | None, history: list[dict[str, Any]]) -> dict[str, Any]:
            base = current or self.router.policy_for(model, self.table.versions_by_model()[model])
            fields = base.model_dump(exclude={"model", "revision"})
            fields["weights"] = state.weights()
            fields["standby"] = None
            fields["experiment"] = state.model_dump(mode="json")
            return fields

        default = self.router.policy_for(model, self.table.versions_by_model()[model])
        policy = self.store.update(model, operation, change, actor=actor, default=default)
        self.controller.wake()
        return policy


def _even(arms: int) -> list[int]:
    split = [100 // arms] * arms
    split[0] += 100 - sum(split)
    return split


def _sums(n: int, mean: float, variance: float) -> tuple[float, float]:
    total = n * mean
    squares = (variance * (n - 1) + n * mean**2) if n > 1 else n * mean**2
    return total, squares
