"""monitor.exporters.prometheus: families, labels, exemplars, and promtool's verdict."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from monitor_frames import record_batch
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from monitor.alerts import AlertManager
from monitor.exporters.prometheus import build_registry
from monitor.profiles import build_profile
from monitor.settings import MonitorSettings
from monitor.state import MonitorState

LABELS = {"model": "m", "version": "1"}


@pytest.fixture
def state(tmp_path: Path) -> MonitorState:
    settings = MonitorSettings(
        state_dir=tmp_path,
        window_s=60,
        slow_cadence_s=60,
        alerts=[{"statistic": "psi", "threshold": "reference"}],  # type: ignore[list-item]
    )
    monitor = MonitorState(settings, now=0.0)
    rng = np.random.default_rng(0)
    reference = {"x": rng.normal(size=5000), "output:y": rng.integers(0, 3, 5000)}
    monitor.version("m", 1).use_profile(build_profile("m", 1, reference), 1000)
    return monitor


def _window(state: MonitorState, now: float, shift: float, rows: int = 1000) -> None:
    rng = np.random.default_rng(int(now))
    x = rng.normal(size=(rows, 1)) + shift
    y = rng.integers(0, 3, rows)
    total = rng.exponential(0.02, rows)
    state.apply(record_batch("m", 1, {"x": x}, {"y": y}, total_s=total), now=now + 1)
    state.tick(now + 60)


def _psi(registry: CollectorRegistry, feature: str) -> float | None:
    return registry.get_sample_value(
        "turnout_drift_psi", {**LABELS, "feature": feature, "window": "last"}
    )


def test_psi_gauge_crosses_its_threshold_when_the_stream_drifts(state: MonitorState) -> None:
    registry = build_registry(state)
    _window(state, 0, shift=0.0)
    threshold = registry.get_sample_value(
        "turnout_drift_threshold", {**LABELS, "feature": "x", "statistic": "psi"}
    )
    assert threshold is not None and threshold > 0
    calm = _psi(registry, "x")
    assert calm is not None and calm < threshold
    _window(state, 60, shift=0.8)
    drifted = _psi(registry, "x")
    assert drifted is not None and drifted > threshold
    cumulative = registry.get_sample_value(
        "turnout_drift_psi", {**LABELS, "feature": "x", "window": "cumulative"}
    )
    assert cumulative is not None and calm < cumulative < drifted
    # Outputs are features too, under output:<name>; categorical ones get Cramer's V.
    assert _psi(registry, "output:y") is not None
    assert (
        registry.get_sample_value(
            "turnout_drift_chi2_cramers_v", {**LABELS, "feature": "output:y", "window": "last"}
        )
        is not None
    )
    for statistic in ("ks", "wasserstein"):
        value = registry.get_sample_value(
            f"turnout_drift_{statistic}", {**LABELS, "feature": "x", "window": "recent"}
        )
        assert value is not None and value > 0


def test_latency_histogram_quantiles_and_counters(state: MonitorState) -> None:
    _window(state, 0, shift=0.0)
    registry = build_registry(state)
    arm = {**LABELS, "arm": "stable"}
    assert registry.get_sample_value("turnout_monitor_request_duration_seconds_count", arm) == 1000
    inf = {**arm, "le": "+Inf"}
    assert registry.get_sample_value("turnout_monitor_request_duration_seconds_bucket", inf) == 1000
    total = registry.get_sample_value("turnout_monitor_request_duration_seconds_sum", arm)
    assert total is not None and 10 < total < 30  # 1000 x ~20 ms
    for window in ("last", "cumulative"):
        p99 = registry.get_sample_value(
            "turnout_request_latency_quantile_seconds",
            {**arm, "stage": "total", "percentile": "p99", "window": window},
        )
        assert p99 is not None and 0.05 < p99 < 0.15
    assert (
        registry.get_sample_value("turnout_monitor_requests_total", {**arm, "code": "200"}) == 1000
    )
    assert registry.get_sample_value("turnout_request_success_ratio", arm) == 1.0
    assert registry.get_sample_value("turnout_monitor_frames_dropped_total") == 0
    assert registry.get_sample_value("turnout_monitor_frames_invalid_total") == 0
    assert registry.get_sample_value("turnout_monitor_reference_rows", LABELS) == 5000


def test_openmetrics_carries_trace_id_exemplars(state: MonitorState) -> None:
    _window(state, 0, shift=0.0)
    text = generate_openmetrics(build_registry(state)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = [
        s
        for s in families["turnout_monitor_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    exemplars = [s.exemplar for s in buckets if s.exemplar is not None]
    assert exemplars, "no exemplar on any bucket"
    for exemplar in exemplars:
        assert set(exemplar.labels) == {"trace_id"} and len(exemplar.labels["trace_id"]) == 32
    assert text.endswith("# EOF\n")


def test_alert_states_are_exported(state: MonitorState) -> None:
    alerts = AlertManager(state.settings, state)
    registry = build_registry(state, alerts)
    _window(state, 0, shift=2.0)
    alerts.evaluate(61.0)
    assert (
        registry.get_sample_value(
            "turnout_alert_firing", {"alert": "psi", **LABELS, "feature": "x"}
        )
        == 1.0
    )


def test_promtool_check_metrics_is_silent(state: MonitorState, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    alerts = AlertManager(state.settings, state)
    _window(state, 0, shift=2.0)
    alerts.evaluate(61.0)
    text = generate_latest(build_registry(state, alerts))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.stdout == b"" and result.stderr == b"", (result.stdout + result.stderr).decode()
    assert result.returncode == 0


def test_gateway_drop_counters_travel_in_frames_and_sum_over_gateways(
    state: MonitorState,
) -> None:
    from turnout_contract.records import decode_frame, encode_frame

    registry = build_registry(state)
    x = np.zeros((2, 1))
    for source, dropped, frames in (("a:1", 5, 1), ("a:1", 3, 0), ("b:2", 7, 2)):
        batch = record_batch("m", 1, {"x": x}, {"y": np.zeros(2, np.int64)})
        batch.emitter = {"source": source, "records_dropped": dropped, "frames_dropped": frames}
        # Through the wire format, as the gateway sends them; a late frame with a smaller
        # cumulative count (a:1 -> 3) must not lower the total.
        state.apply(decode_frame(encode_frame(batch)), now=1.0)
    assert registry.get_sample_value("turnout_gateway_records_dropped_total") == 5 + 7
    assert registry.get_sample_value("turnout_gateway_frames_dropped_total") == 1 + 2
