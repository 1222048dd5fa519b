"""The silent monitoring trap, closed: `turnout monitor profile` reads the model's input
names (from the repository, or the running gateway) and refuses a profile that matches no
feature; a profile that matches nothing live is shown in the status and a metric."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import model_zoo
import numpy as np
from monitor_frames import record_batch
from prometheus_client import CollectorRegistry

from monitor.exporters.prometheus import MonitorCollector
from monitor.profiles import build_profile
from monitor.settings import MonitorSettings
from monitor.state import MonitorState


def profile(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnout.cli", "monitor", "profile", "add_sub", "1", *extra,
         "--profiles-dir", str(tmp_path / "profiles"),
         "--model-repository", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=120,
        env={"TURNOUT_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_profile_takes_the_model_s_input_names_and_refuses_a_mismatch(
    tmp_path: Path,
) -> None:
    model_zoo.write_repository(tmp_path / "models", {"add_sub": (model_zoo.add_sub, {}, [1])})
    data = tmp_path / "reference.npy"
    np.save(data, np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32))
    several = profile(tmp_path, "--data", str(data))
    assert several.returncode == 1 and "has inputs a, b: pass --input" in several.stderr
    wrong = profile(tmp_path, "--data", str(data), "--input", "x")
    assert wrong.returncode == 1 and "match none of add_sub/1's inputs" in wrong.stderr
    assert not (tmp_path / "profiles" / "add_sub").exists()  # nothing stored
    right = profile(tmp_path, "--data", str(data), "--input", "a")
    assert right.returncode == 0, right.stderr
    assert (tmp_path / "profiles" / "add_sub" / "1" / "profile.json").exists()


def test_a_profile_matching_no_live_feature_is_shown_and_counted(tmp_path: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=tmp_path, metrics_port=0), now=0.0)
    rng = np.random.default_rng(1)
    reference = {f"input[{j}]": rng.normal(size=2000) for j in range(4)}
    state.version("m", 1).use_profile(build_profile("m", 1, reference), 1000)
    state.apply(record_batch("m", 1, {"x": rng.normal(size=(50, 4))}), now=1.0)
    described = state.snapshot("m")["models"]["m"]["1"]["reference"]
    assert described["matches_nothing"] is True
    assert described["unmatched_features"][:2] == ["x[0]", "x[1]"]
    registry = CollectorRegistry()
    registry.register(MonitorCollector(state))
    labels = {"model": "m", "version": "1"}
    assert registry.get_sample_value("turnout_monitor_profile_unmatched", labels) == 1.0
    state.apply(record_batch("m", 1, {"input": rng.normal(size=(50, 4))}), now=2.0)
    assert state.snapshot("m")["models"]["m"]["1"]["reference"]["matches_nothing"] is False
    assert registry.get_sample_value("turnout_monitor_profile_unmatched", labels) == 0.0
