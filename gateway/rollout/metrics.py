"""The rollouts' Prometheus families, built at scrape time from the controller and store.

turnout_rollout_phase{model,phase}               1 for the rollout's current phase
turnout_rollout_step{model}                      index of the current step (0-based)
turnout_rollout_canary_weight{model}             the canary's weight in percent
turnout_rollout_gate_decision{model,gate}        1 pass, 0 hold, -1 fail (this gateway)
turnout_rollout_gate_statistic{model,gate}       the gate's test statistic (log ratio)
turnout_rollout_decisions_total{model,action}    advance, promote, rollback, pause taken
                                                 by this gateway's controller
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.rollout.controller import ACTIONS, RolloutController, rollout_state
from gateway.rollout.state import Phase
from gateway.routing.store import BasePolicyStore

__all__ = ["RolloutCollector"]

PHASES: tuple[Phase, ...] = ("progressing", "paused", "promoted", "rolled_back", "aborted")
_DECISION = {"pass": 1, "hold": 0, "fail": -1}
_STATISTIC_KEYS = ("log_lambda", "log_ratio", "longest_failure_run")


class RolloutCollector(Collector):
    def __init__(self, store: BasePolicyStore, controller: RolloutController) -> None:
        self.store = store
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "turnout_rollout_phase", "1 for each rollout's current phase", labels=["model", "phase"]
        )
        step = GaugeMetricFamily("turnout_rollout_step", "Current step (0-based)", labels=["model"])
        weight = GaugeMetricFamily(
            "turnout_rollout_canary_weight", "Canary weight in percent", labels=["model"]
        )
        for model, policy in sorted(self.store.all().items()):
            state = rollout_state(policy)
            if state is None:
                continue
            for name in PHASES:
                phase.add_metric([model, name], 1 if state.phase == name else 0)
            step.add_metric([model], state.step)
            weight.add_metric([model], state.weights().get(state.canary, 0))
        yield from (phase, step, weight)
        decision = GaugeMetricFamily(
            "turnout_rollout_gate_decision",
            "Each gate's verdict on this gateway's evidence: 1 pass, 0 hold, -1 fail",
            labels=["model", "gate"],
        )
        statistic = GaugeMetricFamily(
            "turnout_rollout_gate_statistic",
            "Each gate's test statistic (log likelihood or mixture ratio)",
            labels=["model", "gate"],
        )
        for model, gates in sorted(list(self.controller.gates.items())):
            for gate in gates:
                decision.add_metric([model, gate.name], _DECISION[gate.decision])
                value = next(
                    (gate.evidence[k] for k in _STATISTIC_KEYS if gate.evidence.get(k) is not None),
                    None,
                )
                if value is not None:
                    statistic.add_metric([model, gate.name], float(value))
        yield from (decision, statistic)
        decisions = CounterMetricFamily(
            "turnout_rollout_decisions",
            "Decisions this gateway's rollout controller took, by action",
            labels=["model", "action"],
        )
        for (model, action), count in sorted(list(self.controller.decisions.items())):
            if action in ACTIONS:
                decisions.add_metric([model, action], count)
        yield decisions
