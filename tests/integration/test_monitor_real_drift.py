"""Real data: river's bundled WaterFlow and TrumpApproval streams drift (first 30% as the
reference, last 30% as live traffic); Bananas and Shuttle do not.

The reference is profiled with ``monitor.profiles.build_profile`` and stored where the
sidecar looks for it; the last 30% goes through ``MonitorState`` as one decoded record
batch, exactly as the sidecar's worker applies a frame, then a window closes and the slow
statistics run, and the sidecar's own status says which features drifted. The thresholds
are the reference-derived ones (mean + 3 sigma over reference chunks), never tuned here.

Features: each dataset's numeric features as a float ``[rows, k]`` tensor ``x``, and the
target as river gives it as the output ``y`` (float for WaterFlow and TrumpApproval, so
numerical; bool / int labels for Bananas and Shuttle, so categorical). Time stamps are left
out: WaterFlow's ``Time`` is a datetime, and TrumpApproval's ``ordinal_date`` is a
monotonic day counter that "drifts" by construction, which would prove nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monitor_frames import record_batch

from monitor.profiles import build_profile, features_of, save_profile
from monitor.settings import MonitorSettings
from monitor.state import MonitorState

datasets = pytest.importorskip("river.datasets")

SHARE = 0.3
#: Monotonic time-stamp features, not data (see the module docstring).
TIME_FEATURES = {"Time", "ordinal_date"}


def _load(name: str) -> tuple[list[str], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """River's bundled dataset ``name`` as (feature names, float features, targets)."""
    dataset = getattr(datasets, name)()
    path = Path(getattr(dataset, "path", ""))
    if not path.exists():
        pytest.skip(f"river's {name} is not bundled here (would need a download)")
    rows, targets = [], []
    for x, y in dataset:
        rows.append(x)
        targets.append(y)
    names = [
        key
        for key, value in rows[0].items()
        if key not in TIME_FEATURES and isinstance(value, (int, float))
    ]
    features = np.array([[float(x[key]) for key in names] for x in rows], dtype=np.float64)
    return names, features.reshape(len(rows), len(names)), np.asarray(targets)


def _drift(name: str, tmp_path: Path) -> dict[str, Any]:
    """The sidecar's view of the last 30% against a profile of the first 30%: per feature,
    its statistics (window and slow), thresholds and the statistics that drifted."""
    _, x, y = _load(name)
    n = len(y)
    k = int(n * SHARE)
    assert k >= 100, f"{name}: only {n} rows"
    inputs = {"x": x[:k]} if x.shape[1] else {}
    profile = build_profile(name.lower(), 1, features_of(inputs, {"y": y[:k]}))
    settings = MonitorSettings(state_dir=tmp_path, min_window_rows=30, slow_sample_size=k)
    save_profile(profile, settings.profiles_path())
    state = MonitorState(settings)
    inputs = {"x": x[-k:]} if x.shape[1] else {}
    batch = record_batch(name.lower(), 1, inputs, {"y": y[-k:]}, traced=False, total_s=0.01)
    state.apply(batch, time.time())
    state.close_window()
    state.run_slow()
    document = state.snapshot(name.lower())
    features: dict[str, Any] = document["models"][name.lower()]["1"]["features"]
    assert set(features) == set(profile.features)
    for feature in features.values():
        assert feature["window"], f"{name}: no window statistics: {feature}"
    return features


def _report(name: str, features: dict[str, Any]) -> str:
    lines = [name]
    for feature, found in features.items():
        values = {**found["window"], **found["recent"]}
        shown = ", ".join(
            f"{s}={v:.4g}/{found['thresholds'][s]:.4g}" for s, v in sorted(values.items())
        )
        lines.append(f"  {feature} ({found['kind']}): {shown}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["WaterFlow", "TrumpApproval"])
def test_drifting_streams_are_flagged(name: str, tmp_path: Path) -> None:
    features = _drift(name, tmp_path)
    print(_report(name, features))
    over = {
        feature: (found["window"]["psi"], found["thresholds"]["psi"])
        for feature, found in features.items()
        if "psi" in found["drifted"]
    }
    assert over, f"no feature's PSI above its threshold:\n{_report(name, features)}"
    for value, threshold in over.values():
        assert value > threshold


@pytest.mark.parametrize("name", ["Bananas", "Shuttle"])
def test_stationary_streams_are_not_flagged(name: str, tmp_path: Path) -> None:
    features = _drift(name, tmp_path)
    print(_report(name, features))
    drifted = {feature: found["drifted"] for feature, found in features.items() if found["drifted"]}
    assert not drifted, f"{drifted}\n{_report(name, features)}"
