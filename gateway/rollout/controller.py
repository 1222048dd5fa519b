"""The rollout controller: evaluates every gate a few times a second and acts on them.

One :class:`RolloutController` runs in every gateway. Each keeps evidence for the models
under a rollout (its own traffic) and reports gate verdicts; only the holder of a model's
lease in the policy store acts, so exactly one controller drives a model however many
gateways share the store (a holder that dies stops renewing and another takes over after
``lease_ttl_s``). Each tick, per model with an active rollout:

1. a new evidence window when the stored step changed (every gateway sees the same step);
2. the gates (``gates.evaluate``) on the window's stable and canary evidence;
3. for the lease holder, the decision: any ``fail`` rolls back at once; every gate ``pass``
   with ``min_requests`` canary requests and ``step_seconds`` elapsed advances (at the last
   step: promotes); otherwise the rollout holds, and pauses after ``pause_after_s``;
4. a decision is a compare-and-set of the policy (weights + state), an audit entry with the
   evidence, a webhook, and a counted metric.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidInput, RevisionConflict
from gateway.rollout.evidence import Evidence, VersionEvidence
from gateway.rollout.gates import Accuracy, GateResult, evaluate
from gateway.rollout.labels import SidecarFeedback
from gateway.rollout.state import ACTIVE, RolloutState
from gateway.routing.policy import TrafficPolicy
from gateway.routing.store import BasePolicyStore
from turnout_contract.webhooks import WebhookSender

__all__ = ["ACTIONS", "Decision", "RolloutController", "decide"]

log = logging.getLogger(__name__)

ACTIONS = ("advance", "promote", "rollback", "pause")


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    """One of ACTIONS."""
    reason: str


def decide(
    state: RolloutState,
    gates: list[GateResult],
    canary: VersionEvidence,
    now: float,
) -> Decision | None:
    """What the gates ask for now; None: hold (pure, so tests can drive it)."""
    failed = [g for g in gates if g.decision == "fail"]
    if failed:
        return Decision("rollback", "; ".join(f"{g.name}: {g.detail}" for g in failed))
    if state.phase != "progressing":
        return None
    config = state.config
    elapsed = now - state.step_started
    holding = [g for g in gates if g.decision == "hold"]
    if not holding and canary.requests >= config.min_requests and elapsed >= config.step_seconds:
        last = state.step + 1 >= len(config.steps) - 1
        action = "promote" if last else "advance"
        return Decision(
            action,
            f"step {state.step + 1} ({state.weight}%) passed every gate with "
            f"{canary.requests} canary requests in {elapsed:.1f} s",
        )
    if elapsed >= config.pause_after_s:
        waiting = ", ".join(f"{g.name} ({g.detail})" for g in holding) or (
            f"only {canary.requests} of {config.min_requests} canary requests"
        )
        return Decision("pause", f"no decision after {elapsed:.0f} s: waiting for {waiting}")
    return None


class RolloutController:
    def __init__(
        self,
        store: BasePolicyStore,
        evidence: Evidence,
        *,
        accuracy: SidecarFeedback | None = None,
        lease_ttl_s: float = 3.0,
        tick_s: float = 0.25,
        clock: Any = time.time,
    ) -> None:
        self.store = store
        self.evidence = evidence
        self.accuracy = accuracy
        self.lease_ttl_s = lease_ttl_s
        self.tick_s = tick_s
        self.clock = clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.gates: dict[str, list[GateResult]] = {}
        """The latest verdicts per model (this gateway's evidence)."""
        self.leaders: dict[str, str] = {}
        """Who holds each model's lease, as last seen."""
        self.decisions: collections.Counter[tuple[str, str]] = collections.Counter()
        """(model, action) -> decisions this gateway took."""
        self._windows: dict[str, tuple[int, float, str]] = {}
        self._accuracy_base: dict[tuple[str, int], Accuracy] = {}
        self._webhooks = WebhookSender([], name="turnout-rollout-webhooks")
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Tick until cancelled; a tripped wire wakes it early."""
        self._webhooks.start()  # URLs come with each rollout's decisions
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    log.exception("rollout controller tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_s)
                self._wake.clear()
        finally:
            self._webhooks.stop()

    def wake(self) -> None:
        self._wake.set()

    # -- one tick --------------------------------------------------------------------------

    async def tick(self) -> None:
        for model, policy in self.store.all().items():
            state = rollout_state(policy)
            if state is not None and state.phase in ACTIVE:
                try:
                    await self._tick_model(model, policy, state)
                except Exception:
                    # One model's failure is logged each tick; every other model's rollout
                    # goes on (one raising model had stopped every rollout's ticks).
                    log.exception("rollout of '%s': the tick failed", model)
                continue
            experiment = policy.experiment
            if experiment is not None and experiment.get("phase") == "running":
                # Assignment counts for the sample-ratio test: one window per experiment.
                window = (-1, float(experiment["started"]), "experiment")
                if self._windows.get(model) != window:
                    self._windows[model] = window
                    self.evidence.watch(model, [int(v) for v in experiment["arms"]])
                continue
            if self._windows.pop(model, None) is not None:
                self.evidence.forget(model)

    async def _tick_model(self, model: str, policy: TrafficPolicy, state: RolloutState) -> None:
        window = (state.step, state.step_started, state.phase)
        if self._windows.get(model) != window:
            self._windows[model] = window
            self.evidence.watch(model, [state.stable, state.canary])
            self._accuracy_base.pop((model, state.stable), None)
            self._accuracy_base.pop((model, state.canary), None)
        stable = self.evidence.of(model, state.stable)
        canary = self.evidence.of(model, state.canary)
        if stable is None or canary is None:
            return
        accuracy = await self._accuracy(model, state)
        labels = self.accuracy is not None and self.accuracy.reachable
        profiles = None
        if self.accuracy is not None:
            source = self.accuracy
            profiles = (
                source.input_drift(model, state.stable),
                source.input_drift(model, state.canary),
            )
        gates = evaluate(
            state.config,
            stable,
            canary,
            accuracy,
            labels_available=labels,
            input_drift=profiles,
        )
        self.gates[model] = gates
        if state.dry_run:
            return
        decision = decide(state, gates, canary, self.clock())
        if decision is None:
            return
        leader = await asyncio.to_thread(
            self.store.acquire_lease, f"rollout:{model}", self.holder, self.lease_ttl_s
        )
        self.leaders[model] = leader
        if leader != self.holder:
            return
        await self._act(model, policy, state, decision, gates)

    async def _accuracy(self, model: str, state: RolloutState) -> tuple[Accuracy, Accuracy] | None:
        source = self.accuracy
        if source is None or not (
            state.config.accuracy.enabled or state.config.input_drift.enabled
        ):
            return None
        await source.refresh(model)
        counts = []
        for version in (state.stable, state.canary):
            now = source.counts(model, version)
            if now is None:
                return None
            base = self._accuracy_base.setdefault((model, version), now)
            counts.append(Accuracy(now.labelled - base.labelled, now.correct - base.correct))
        return counts[0], counts[1]

    # -- acting ------------------------------------------------------------------------------

    async def _act(
        self,
        model: str,
        policy: TrafficPolicy,
        state: RolloutState,
        decision: Decision,
        gates: list[GateResult],
    ) -> None:
        now = self.clock()
        evidence = [g.public() for g in gates]
        if decision.action == "rollback":
            new = state.model_copy(
                update={"phase": "rolled_back", "reason": decision.reason, "evidence": evidence}
            )
        elif decision.action == "promote":
            new = state.model_copy(
                update={
                    "phase": "promoted",
                    "step": len(state.config.steps) - 1,
                    "step_started": now,
                    "reason": decision.reason,
                    "evidence": evidence,
                }
            )
        elif decision.action == "advance":
            new = state.model_copy(
                update={
                    "step": state.step + 1,
                    "step_started": now,
                    "reason": decision.reason,
                    "evidence": evidence,
                }
            )
        else:
            new = state.model_copy(
                update={"phase": "paused", "reason": decision.reason, "evidence": evidence}
            )
        try:
            await asyncio.to_thread(
                commit_state, self.store, model, state, new, f"rollout_{decision.action}",
                f"turnout rollout controller ({self.holder})",
            )  # fmt: skip
        except (RevisionConflict, InvalidInput) as exc:
            log.info("rollout of '%s' changed before %s: %s", model, decision.action, exc)
            return
        self.decisions[(model, decision.action)] += 1
        log.warning(
            "rollout %s: %s (canary %d, stable %d): %s",
            model, decision.action, state.canary, state.stable, decision.reason,
        )  # fmt: skip
        self.notify(model, decision.action, new, evidence)

    def notify(
        self, model: str, action: str, state: RolloutState, gates: list[dict[str, Any]]
    ) -> None:
        """POST a decision (the controller's or one by hand) to the rollout's webhooks."""
        if state.config.webhooks:
            self._webhooks.post(
                {"model": model, "action": action, **state.public(), "gates": gates,
                 "time": self.clock()},
                state.config.webhooks,
            )  # fmt: skip


def rollout_state(policy: TrafficPolicy | None) -> RolloutState | None:
    if policy is None or policy.rollout is None:
        return None
    return RolloutState.model_validate(policy.rollout)


def commit_state(
    store: BasePolicyStore,
    model: str,
    expected: RolloutState | None,
    new: RolloutState,
    operation: str,
    actor: str,
) -> TrafficPolicy:
    """Store ``new`` with its weights, if the stored rollout is still ``expected``."""

    def change(current: TrafficPolicy | None, history: list[dict[str, Any]]) -> dict[str, Any]:
        if current is None:
            raise InvalidInput(f"model '{model}' has no traffic policy")
        stored = rollout_state(current)
        if expected is not None and stored != expected:
            raise RevisionConflict(f"the rollout of '{model}' changed meanwhile")
        fields = current.model_dump(exclude={"model", "revision"})
        fields["weights"] = new.weights()
        fields["standby"] = None
        fields["rollout"] = new.model_dump(mode="json")
        return fields

    return store.update(model, operation, change, actor=actor)
