"""Alert rules over the drift and latency statistics, and their webhook notifications.

Each rule (``monitor.settings.AlertRule``) is matched against every (model, version,
feature) it names; for latency rules the "feature" is the arm. Per match, a small state
machine runs on each tick::

    inactive --value > threshold--> pending --held for for_s--> firing
        ^                              |                           |
        +-------- value <= threshold --+---------------------------+

The transition to firing POSTs one JSON document to each configured webhook, from a
background thread (a slow webhook never delays ingestion), unless the same alert was
notified less than ``debounce_s`` ago: an alert flapping around its threshold notifies
once per debounce period. Values are those of the last closed window (KS and Wasserstein:
the last slow run), so a condition changes at most once a window.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from monitor.settings import LATENCY_STATISTICS, AlertRule, MonitorSettings
from monitor.state import QUANTILES, MonitorState
from turnout_contract.webhooks import WebhookSender

__all__ = ["ActiveAlert", "AlertManager"]

log = logging.getLogger("turnout.monitor")

_LATENCY_INDEX = dict(zip(LATENCY_STATISTICS, range(len(QUANTILES)), strict=True))


@dataclass(eq=False)
class ActiveAlert:
    rule_name: str
    statistic: str
    model: str
    version: int
    feature: str
    value: float
    threshold: float
    since: float
    for_s: float = 0.0
    firing: bool = False
    fired_at: float | None = None

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.rule_name, self.model, self.version, self.feature)

    def document(self) -> dict[str, Any]:
        return {
            "alert": self.rule_name,
            "status": "firing" if self.firing else "pending",
            "statistic": self.statistic,
            "model": self.model,
            "version": self.version,
            "feature": self.feature,
            "value": self.value,
            "threshold": self.threshold,
            "for_s": self.for_s,
            "since": self.since,
            "fired_at": self.fired_at,
        }


def _rule_names(rules: list[AlertRule]) -> list[str]:
    names: list[str] = []
    for rule in rules:
        base = rule.name or rule.statistic
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


class AlertManager:
    """Evaluates the rules against the state; ``evaluate(now)`` on every tick."""

    def __init__(self, settings: MonitorSettings, state: MonitorState) -> None:
        self.settings = settings
        self.state = state
        self.rules = list(zip(_rule_names(settings.alerts), settings.alerts, strict=True))
        self._active: dict[tuple[str, str, int, str], ActiveAlert] = {}
        self._last_sent: dict[tuple[str, str, int, str], float] = {}
        self._lock = threading.Lock()
        self.debounced = 0
        self._sender = WebhookSender(settings.webhooks, name="turnout-monitor-webhooks")

    @property
    def notifications(self) -> dict[str, int]:
        """Webhook POSTs by outcome: sent, failed, debounced (held back by ``debounce_s``)."""
        return {**self._sender.counts, "debounced": self.debounced}

    def start(self) -> None:
        if self.settings.webhooks:
            self._sender.start()

    def stop(self) -> None:
        """Post what is queued, then stop sending."""
        self._sender.stop()

    def active(self) -> list[ActiveAlert]:
        with self._lock:
            return list(self._active.values())

    def _matches(self) -> Iterator[tuple[str, AlertRule, str, int, str, float, float]]:
        """(name, rule, model, version, feature, value, threshold) whose value is known."""
        for name, rule in self.rules:
            if rule.statistic in _LATENCY_INDEX:
                if rule.threshold == "reference":
                    continue  # latency has no reference threshold
                index = _LATENCY_INDEX[rule.statistic]
                for state in self.state.versions.values():
                    if not _match(rule, state.model, state.version):
                        continue
                    for arm, latency in state.arms.items():
                        quantiles = latency.last_window.get("total")
                        if quantiles is None or not _matches(arm, rule.feature):
                            continue
                        yield (
                            name,
                            rule,
                            state.model,
                            state.version,
                            arm,
                            quantiles[index],
                            float(rule.threshold),
                        )
                continue
            for state, feature, statistic, value in self.state.drift_values():
                if statistic != rule.statistic or not _match(rule, state.model, state.version):
                    continue
                if not _matches(feature, rule.feature):
                    continue
                if rule.threshold == "reference":
                    threshold = self.state.threshold(state, feature, statistic)
                    if threshold is None:
                        continue
                else:
                    threshold = float(rule.threshold)
                yield name, rule, state.model, state.version, feature, value, threshold

    def evaluate(self, now: float) -> list[ActiveAlert]:
        """Advance every alert's state to ``now``; returns the alerts that began firing."""
        with self.state.lock:
            matches = list(self._matches())
        fired: list[ActiveAlert] = []
        with self._lock:
            seen: set[tuple[str, str, int, str]] = set()
            for name, rule, model, version, feature, value, threshold in matches:
                if not value > threshold:
                    continue
                key = (name, model, version, feature)
                seen.add(key)
                alert = self._active.get(key)
                if alert is None:
                    alert = ActiveAlert(
                        name, rule.statistic, model, version, feature, value, threshold, now,
                        rule.for_s,
                    )  # fmt: skip
                    self._active[key] = alert
                alert.value, alert.threshold = value, threshold
                if not alert.firing and now - alert.since >= rule.for_s:
                    alert.firing, alert.fired_at = True, now
                    fired.append(alert)
            for key in set(self._active) - seen:
                del self._active[key]  # resolved
            to_send: list[dict[str, Any]] = []
            for alert in fired:
                log.warning(
                    "alert %s firing: %s/%s %s %s=%.4g > %.4g",
                    alert.rule_name,
                    alert.model,
                    alert.version,
                    alert.feature,
                    alert.statistic,
                    alert.value,
                    alert.threshold,
                )
                last = self._last_sent.get(alert.key)
                if last is not None and now - last < self.settings.debounce_s:
                    self.debounced += 1
                    continue
                self._last_sent[alert.key] = now
                to_send.append(alert.document())
        for document in to_send:
            self._sender.post(document)
        return fired


def _matches(name: str, pattern: str) -> bool:
    # Exact names first: feature names hold brackets, which patterns read as character sets.
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _match(rule: AlertRule, model: str, version: int) -> bool:
    return _matches(model, rule.model) and _matches(str(version), rule.version)
