"""monitor.state: windows, cumulative view, latency per arm, slow statistics, first-N
references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from monitor_frames import record_batch

from monitor.profiles import build_profile, load_profile
from monitor.settings import MonitorSettings
from monitor.state import MonitorState


def _state(tmp_path: Path, **settings: object) -> MonitorState:
    values: dict[str, object] = {"state_dir": tmp_path, "window_s": 60, "slow_cadence_s": 300}
    values.update(settings)
    return MonitorState(MonitorSettings(**values), now=0.0)  # type: ignore[arg-type]


def _profiled(tmp_path: Path, **settings: object) -> MonitorState:
    rng = np.random.default_rng(0)
    state = _state(tmp_path, **settings)
    reference = {
        "x[0]": rng.normal(size=5000),
        "x[1]": rng.normal(size=5000),
        "output:y": rng.integers(0, 3, 5000),
    }
    profile = build_profile("m", 1, reference)
    state.version("m", 1).use_profile(profile, state.settings.slow_sample_size)
    return state


def _traffic(rng: np.random.Generator, rows: int, shift: float = 0.0, **kw: object) -> object:
    x = rng.normal(size=(rows, 2)) + np.array([shift, 0.0])
    y = rng.integers(0, 3, rows)
    return record_batch("m", 1, {"x": x}, {"y": y}, **kw)  # type: ignore[arg-type]


def test_window_statistics_see_a_shift_and_reset(tmp_path: Path) -> None:
    state = _profiled(tmp_path)
    rng = np.random.default_rng(1)
    state.apply(_traffic(rng, 1000), now=10.0)  # type: ignore[arg-type]
    assert not state.tick(59.0)
    assert state.tick(60.0)
    version = state.versions[("m", 1)]
    x0 = version.features["x[0]"]
    assert 0 < x0.last_window["psi"] < state.threshold(version, "x[0]", "psi")  # type: ignore[operator]
    assert set(version.features["output:y"].last_window) == {"psi", "js", "chi2_cramers_v", "linf"}
    assert x0.window.sum() == 0 and x0.cumulative.sum() == 1000

    state.apply(_traffic(rng, 1000, shift=1.0), now=70.0)  # type: ignore[arg-type]
    state.tick(120.0)
    assert x0.last_window["psi"] > state.threshold(version, "x[0]", "psi")  # type: ignore[operator]
    assert version.features["x[1]"].last_window["psi"] < state.threshold(version, "x[1]", "psi")  # type: ignore[operator]
    assert 0 < x0.cumulative_stats["psi"] < x0.last_window["psi"]  # half the rows drifted

    state.tick(180.0)  # an empty window has no statistics
    assert x0.last_window == {}


def test_small_windows_are_skipped(tmp_path: Path) -> None:
    state = _profiled(tmp_path, min_window_rows=100)
    state.apply(_traffic(np.random.default_rng(2), 50), now=1.0)  # type: ignore[arg-type]
    state.tick(60.0)
    assert state.versions[("m", 1)].features["x[0]"].last_window == {}


def test_slow_statistics_on_their_cadence(tmp_path: Path) -> None:
    state = _profiled(tmp_path, slow_sample_size=1000)
    rng = np.random.default_rng(3)
    for i in range(5):  # 2,500 values: only the most recent 1,000 count
        state.apply(_traffic(rng, 500, shift=0.0 if i < 3 else 2.0), now=1.0 + i)  # type: ignore[arg-type]
    x0 = state.versions[("m", 1)].features["x[0]"]
    state.tick(299.0)
    assert x0.slow == {}
    state.tick(300.0)
    assert set(x0.slow) == {"ks", "wasserstein"}
    assert x0.slow["wasserstein"] > 1.5  # all recent values shifted by 2 sigma
    assert "ks" not in state.versions[("m", 1)].features["output:y"].slow  # categorical


def test_latency_per_arm_with_statuses_and_exemplars(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.apply(record_batch("m", 1, rows=100, arm="stable", total_s=0.010), now=1.0)
    state.apply(record_batch("m", 1, rows=100, arm="canary", total_s=0.200, status=503), now=2.0)
    state.apply(record_batch("m", 1, rows=10, arm="canary", total_s=0.200, traced=False), now=3.0)
    version = state.versions[("m", 1)]
    stable, canary = version.arms["stable"], version.arms["canary"]
    assert abs(stable.cumulative_quantiles("total")[2] - 0.010) < 0.0002  # type: ignore[index]
    assert abs(canary.cumulative_quantiles("total")[0] - 0.200) < 0.004  # type: ignore[index]
    assert canary.statuses == {503: 100, 200: 10}
    assert int(stable.buckets.sum()) == 100 and int(canary.buckets.sum()) == 110
    exemplar = canary.exemplars[8]  # le=0.25: the last traced request in that bucket
    assert exemplar is not None and len(exemplar.trace_id) == 32 and exemplar.timestamp == 2.0
    state.tick(60.0)
    assert set(stable.last_window) == {"total", "queue", "batch"}
    document = state.snapshot()
    canary_doc = document["models"]["m"]["1"]["latency"]["canary"]
    assert canary_doc["requests"] == 110 and canary_doc["errors"] == 100
    assert set(canary_doc["window"]) == {"p50", "p90", "p99", "p999"}
    assert document["models"]["m"]["1"]["reference"] is None


def test_first_requests_become_the_reference(tmp_path: Path) -> None:
    state = _state(tmp_path, reference_first_n=1000)
    rng = np.random.default_rng(4)
    state.apply(_traffic(rng, 600), now=1.0)  # type: ignore[arg-type]
    assert state.versions[("m", 1)].profile is None
    state.apply(_traffic(rng, 600), now=2.0)  # type: ignore[arg-type]
    profile = state.versions[("m", 1)].profile
    assert profile is not None and profile.rows == 1200
    assert set(profile.features) == {"x[0]", "x[1]", "output:y"}
    stored = load_profile(tmp_path / "profiles", "m", 1)
    assert stored is not None and stored.rows == 1200
    state.apply(_traffic(rng, 500, shift=1.0), now=3.0)  # type: ignore[arg-type]
    state.tick(60.0)
    assert state.versions[("m", 1)].features["x[0]"].last_window["psi"] > 0.1


def test_stored_profile_is_found_and_thresholds_overridden(tmp_path: Path) -> None:
    from monitor.profiles import save_profile

    rng = np.random.default_rng(5)
    save_profile(build_profile("m", 1, {"x[0]": rng.normal(size=1000)}), tmp_path / "profiles")
    state = _state(tmp_path, thresholds={"m": {"x[0]": {"psi": 0.5}}})
    state.apply(_traffic(rng, 100), now=1.0)  # type: ignore[arg-type]
    version = state.versions[("m", 1)]
    assert version.profile is not None and set(version.features) == {"x[0]"}
    assert state.threshold(version, "x[0]", "psi") == 0.5
    assert (
        state.threshold(version, "x[0]", "js") == version.profile.features["x[0]"].thresholds["js"]
    )


_REFERENCE = build_profile(
    "m", 1, {"x": np.random.default_rng(9).normal(size=1000), "c": np.arange(1000) % 4}
)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    gaps=st.lists(st.floats(0.0, 90.0), min_size=12, max_size=12),
)
def test_windows_partition_the_stream(sizes: list[int], gaps: list[float]) -> None:
    """However frames fall into windows, the cumulative view is the whole stream's."""
    state = MonitorState(MonitorSettings(state_dir=Path("/nonexistent"), window_s=60), now=0.0)
    state.version("m", 1).use_profile(_REFERENCE, 100)
    rng = np.random.default_rng(len(sizes))
    now, xs, cs, seen_in_windows = 0.0, [], [], 0
    x_state = state.versions[("m", 1)].features["x"]
    for size, gap in zip(sizes, gaps, strict=False):
        x = rng.normal(size=size) * 3
        c = rng.integers(0, 6, size)
        xs.append(x)
        cs.append(c)
        now += gap
        pending = int(x_state.window.sum())
        if state.tick(now):
            seen_in_windows += pending
        state.apply(record_batch("m", 1, {"x": x, "c": c}), now=now)
    seen_in_windows += int(x_state.window.sum())
    stream_x, stream_c = np.concatenate(xs), np.concatenate(cs)
    assert x_state.cumulative.tolist() == _REFERENCE.features["x"].bins.counts(stream_x).tolist()  # type: ignore[union-attr]
    c_counts = np.zeros_like(_REFERENCE.features["c"].ref_counts)
    _REFERENCE.features["c"].count(stream_c, c_counts)
    assert state.versions[("m", 1)].features["c"].cumulative.tolist() == c_counts.tolist()
    assert seen_in_windows == stream_x.size
    assert state.versions[("m", 1)].arms["stable"].cumulative["total"].count == stream_x.size
