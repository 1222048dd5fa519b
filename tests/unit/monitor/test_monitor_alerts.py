"""monitor.alerts: pending -> firing after for_s, one POST per firing, debounce, latency."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monitor_frames import record_batch
from webhooks import Webhook

from monitor.alerts import AlertManager
from monitor.profiles import build_profile
from monitor.settings import MonitorSettings, SettingsError, load_monitor_settings
from monitor.state import MonitorState


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.close()


def _monitor(
    tmp_path: Path, webhook: Webhook, **settings: Any
) -> tuple[MonitorState, AlertManager]:
    values: dict[str, Any] = {
        "state_dir": tmp_path,
        "window_s": 60,
        "webhooks": [webhook.url],
        "debounce_s": 600,
        "alerts": [{"statistic": "psi", "model": "m", "feature": "x*", "for_s": 120}],
    }
    values.update(settings)
    state = MonitorState(MonitorSettings(**values), now=0.0)
    rng = np.random.default_rng(0)
    profile = build_profile("m", 1, {"x": rng.normal(size=5000)})
    state.version("m", 1).use_profile(profile, 1000)
    return state, AlertManager(state.settings, state)


def _window(state: MonitorState, start: float, shift: float) -> None:
    x = np.random.default_rng(int(start)).normal(size=(1000, 1)) + shift
    state.apply(record_batch("m", 1, {"x": x}), now=start + 1)
    state.tick(start + 60)


def test_fires_after_for_s_and_posts_exactly_once(tmp_path: Path, webhook: Webhook) -> None:
    state, alerts = _monitor(tmp_path, webhook)
    alerts.start()
    try:
        _window(state, 0, shift=0.0)
        assert alerts.evaluate(60) == [] and alerts.active() == []
        _window(state, 60, shift=1.0)
        assert alerts.evaluate(120) == []
        (pending,) = alerts.active()
        assert not pending.firing and pending.feature == "x"
        assert alerts.evaluate(200) == []  # held 80 s of 120
        (fired,) = alerts.evaluate(240)
        assert fired.firing and fired.value > fired.threshold
        for now in (241, 250, 299):  # still firing: no more POSTs
            assert alerts.evaluate(now) == []
        webhook.wait_for(1)
        # Every notification queued so far has been posted: the one, and no other.
        alerts.stop()
        assert len(webhook.bodies) == 1
        alerts.start()
        body = webhook.bodies[0]
        assert body["alert"] == "psi" and body["status"] == "firing"
        assert (body["model"], body["version"], body["feature"]) == ("m", 1, "x")
        assert body["value"] > body["threshold"] and body["for_s"] == 120

        # Resolves, then fires again within the debounce period: no second POST...
        _window(state, 300, shift=0.0)
        alerts.evaluate(360)
        assert alerts.active() == []
        _window(state, 360, shift=1.0)
        assert len(alerts.evaluate(420)) == 0 and len(alerts.evaluate(540)) == 1
        # ...until the debounce period has passed.
        _window(state, 540, shift=0.0)
        alerts.evaluate(600)
        _window(state, 900, shift=1.0)
        alerts.evaluate(960)
        assert len(alerts.evaluate(1080)) == 1
        webhook.wait_for(2)
        alerts.stop()  # the sender has counted every notification it posted
        assert len(webhook.bodies) == 2
        assert alerts.notifications == {"sent": 2, "failed": 0, "debounced": 1}
    finally:
        alerts.stop()


def test_fixed_threshold_and_latency_rules(tmp_path: Path, webhook: Webhook) -> None:
    rules = [
        {"name": "psi_fixed", "statistic": "psi", "threshold": 10.0},
        {"statistic": "latency_p99", "threshold": 0.1, "feature": "canary"},
    ]
    state, alerts = _monitor(tmp_path, webhook, alerts=rules)
    state.apply(record_batch("m", 1, rows=50, arm="canary", total_s=0.3), now=1.0)
    state.apply(record_batch("m", 1, rows=50, arm="stable", total_s=0.3), now=1.0)
    _window(state, 0, shift=1.0)
    fired = alerts.evaluate(60)
    assert [(a.rule_name, a.feature) for a in fired] == [("latency_p99", "canary")]
    assert fired[0].value == pytest.approx(0.3, rel=0.02)


def test_rules_are_validated_with_their_key(tmp_path: Path) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text("alerts:\n  - {statistic: nope}\n")
    with pytest.raises(SettingsError, match=r"alerts\.0\.statistic"):
        load_monitor_settings(config)
    config.write_text("alerts:\n  - {statistic: psi, threshold: 0.2, for_s: 30}\nwindow_s: 5\n")
    settings = load_monitor_settings(config, metrics_port=0)
    assert settings.alerts[0].threshold == 0.2 and settings.window_s == 5
    assert settings.metrics_port == 0


def test_bracketed_feature_names_match_exactly(tmp_path: Path, webhook: Webhook) -> None:
    rules = [{"statistic": "psi", "feature": "x[0]", "threshold": 0.0}]
    state, alerts = _monitor(tmp_path, webhook, alerts=rules, webhooks=[])
    rng = np.random.default_rng(0)
    profile = build_profile("m", 1, {"x[0]": rng.normal(size=2000), "x[1]": rng.normal(size=2000)})
    state.version("m", 1).use_profile(profile, 1000)
    state.apply(record_batch("m", 1, {"x": rng.normal(size=(500, 2)) + 1}), now=1.0)
    state.tick(60)
    assert [a.feature for a in alerts.evaluate(60)] == ["x[0]"]
