"""monitor.feedback: predictions of sampled requests scored against labels fed back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from monitor_frames import record_batch
from prometheus_client.exposition import generate_latest

from monitor.exporters.prometheus import build_registry
from monitor.settings import MonitorSettings
from monitor.state import MonitorState
from turnout_contract.records import RecordBatch


def _classified(labels: list[int], scores: bool = False) -> RecordBatch:
    predicted = np.array(labels, np.int64)
    outputs = {"probabilities": np.eye(3)[predicted]} if scores else {"label": predicted}
    batch = record_batch("m", 2, {"x": np.zeros((len(labels), 2))}, outputs)
    batch.columns["request_id"] = [f"r{i}" for i in range(len(labels))]
    return batch


def test_accuracy_from_feedback_by_request_or_trace_id(tmp_path: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=tmp_path))
    batch = _classified([0, 1, 2, 1])
    state.apply(batch, now=1.0)
    log = state.predictions
    assert log.feedback({"model": "m", "request_id": "r0", "labels": 0})
    assert log.feedback({"model": "m", "request_id": "r1", "label": 1})
    assert log.feedback({"model": "m", "trace_id": batch.columns["trace_id"][2], "labels": [0]})
    # Each request counts once, whichever of its ids comes back.
    assert not log.feedback({"model": "m", "request_id": "r2", "labels": 0})
    assert not log.feedback({"model": "m", "request_id": "nope", "labels": 0})
    assert not log.feedback({"model": "other", "request_id": "r3", "labels": 0})
    accuracy = log.accuracy[("m", 2)]
    assert (accuracy.labelled, accuracy.correct, log.unmatched) == (3, 2, 3)

    document = state.snapshot()
    assert document["models"]["m"]["2"]["accuracy"] == {
        "labelled": 3,
        "correct": 2,
        "ratio": pytest.approx(2 / 3),
    }
    registry = build_registry(state)
    labels = {"model": "m", "version": "2"}
    assert registry.get_sample_value("turnout_accuracy_ratio", labels) == pytest.approx(2 / 3)
    assert (
        registry.get_sample_value(
            "turnout_monitor_feedback_rows_total", {**labels, "outcome": "incorrect"}
        )
        == 1
    )
    assert registry.get_sample_value("turnout_monitor_feedback_unmatched_total") == 3


def test_scores_are_read_as_argmax_and_rows_must_match(tmp_path: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=tmp_path))
    batch = _classified([2, 0], scores=True)
    # One request of two rows: both sampled rows belong to record 0.
    batch.sampled = np.array([0, 0], np.int64)
    state.apply(batch, now=1.0)
    with pytest.raises(ValueError, match="2 rows"):
        state.predictions.feedback({"model": "m", "request_id": "r0", "labels": [2]})
    assert state.predictions.feedback({"model": "m", "request_id": "r0", "labels": [2, 1]})
    accuracy = state.predictions.accuracy[("m", 2)]
    assert (accuracy.labelled, accuracy.correct) == (2, 1)


def test_capacity_bounds_what_is_remembered(tmp_path: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=tmp_path, feedback_capacity=4))
    batch = _classified([0, 1, 2, 1])  # 4 requests, 2 keys each: only the last 2 kept
    state.apply(batch, now=1.0)
    assert not state.predictions.feedback({"model": "m", "request_id": "r0", "labels": 0})
    assert state.predictions.feedback({"model": "m", "request_id": "r3", "labels": 1})


def _regressed(predicted: list[float], column: bool = False) -> RecordBatch:
    values = np.array(predicted, np.float32)
    outputs = {"y": values[:, None] if column else values}
    batch = record_batch("r", 1, {"x": np.zeros((len(predicted), 2))}, outputs)
    batch.columns["request_id"] = [f"r{i}" for i in range(len(predicted))]
    return batch


def test_regression_mae_and_rmse_match_numpy(tmp_path: Path) -> None:
    predicted = [1.5, 2.25, -3.0, 10.0, 0.5]
    labels = [1.0, 3, -2.5, 7.5, 0.5]  # an integer label among floats is still regression
    state = MonitorState(MonitorSettings(state_dir=tmp_path))
    state.apply(_regressed(predicted, column=True), now=1.0)
    for i, label in enumerate(labels):
        assert state.predictions.feedback({"model": "r", "request_id": f"r{i}", "labels": label})
    errors = np.array(predicted, np.float32).astype(np.float64) - np.array(labels, np.float64)
    found = state.predictions.errors[("r", 1)]
    assert found.labelled == 5
    assert found.mae == pytest.approx(np.mean(np.abs(errors)))
    assert found.rmse == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert ("r", 1) not in state.predictions.accuracy

    document = state.snapshot()["models"]["r"]["1"]
    assert document["accuracy"] is None
    assert document["regression"] == {
        "labelled": 5,
        "mae": pytest.approx(np.mean(np.abs(errors))),
        "rmse": pytest.approx(np.sqrt(np.mean(errors**2))),
    }
    registry = build_registry(state)
    labels_ = {"model": "r", "version": "1"}
    assert registry.get_sample_value("turnout_feedback_mae", labels_) == pytest.approx(
        np.mean(np.abs(errors))
    )
    assert registry.get_sample_value("turnout_feedback_rmse", labels_) == pytest.approx(
        np.sqrt(np.mean(errors**2))
    )
    assert registry.get_sample_value("turnout_accuracy_ratio", labels_) is None
    promtool = shutil.which("promtool")
    if promtool is not None:  # the gauges keep promtool silent
        text = generate_latest(registry)
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
        )
        assert result.stdout == b"" and result.stderr == b"", result.stdout + result.stderr
        assert b'turnout_feedback_rmse{model="r",version="1"}' in text


def test_regression_window_is_bounded_by_capacity(tmp_path: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=tmp_path, feedback_capacity=4))
    state.apply(_regressed([0.5, 1.5, 2.5, 3.5]), now=1.0)  # only r2, r3 still kept
    log = state.predictions
    assert not log.feedback({"model": "r", "request_id": "r0", "labels": 100.0})
    assert not log.feedback({"model": "r", "request_id": "r1", "labels": 100.0})
    assert log.feedback({"model": "r", "request_id": "r2", "labels": 2.0})
    assert log.feedback({"model": "r", "request_id": "r3", "labels": 5.0})
    errors = np.array([0.5, -1.5])
    found = log.errors[("r", 1)]
    assert (found.labelled, log.unmatched) == (2, 2)
    assert found.mae == pytest.approx(np.mean(np.abs(errors)))
    assert found.rmse == pytest.approx(np.sqrt(np.mean(errors**2)))


def test_configured_task_and_classification_unchanged(tmp_path: Path) -> None:
    # Whole-number float predictions with integer labels: inferred classification.
    state = MonitorState(MonitorSettings(state_dir=tmp_path))
    state.apply(_regressed([1.0, 0.0]), now=1.0)
    assert state.predictions.feedback({"model": "r", "request_id": "r0", "labels": 1})
    assert state.predictions.feedback({"model": "r", "request_id": "r1", "labels": 1})
    accuracy = state.predictions.accuracy[("r", 1)]
    assert (accuracy.labelled, accuracy.correct) == (2, 1)
    assert state.predictions.errors == {}
    assert state.snapshot()["models"]["r"]["1"]["regression"] is None

    # The same, configured as a regression; integer outputs are read as numbers.
    settings = MonitorSettings(state_dir=tmp_path, tasks={"r": "regression", "m": "regression"})
    state = MonitorState(settings)
    state.apply(_regressed([1.0, 0.0]), now=1.0)
    state.apply(_classified([2, 1]), now=1.0)
    assert state.predictions.feedback({"model": "r", "request_id": "r0", "labels": 1})
    assert state.predictions.feedback({"model": "r", "request_id": "r1", "labels": 1})
    assert state.predictions.feedback({"model": "m", "request_id": "r0", "labels": 4})
    with pytest.raises(ValueError, match="finite numbers"):
        state.predictions.feedback({"model": "m", "request_id": "r1", "labels": "a"})
    assert state.predictions.feedback({"model": "m", "request_id": "r1", "labels": 1.0})
    assert state.predictions.errors[("r", 1)].mae == pytest.approx(0.5)
    assert state.predictions.errors[("r", 1)].rmse == pytest.approx(np.sqrt(0.5))
    assert state.predictions.errors[("m", 2)].mae == pytest.approx(1.0)
    assert state.predictions.accuracy == {}

    # Configured classification keeps accuracy even for fractional float outputs.
    state = MonitorState(MonitorSettings(state_dir=tmp_path, tasks={"r": "classification"}))
    state.apply(_regressed([1.5]), now=1.0)
    assert state.predictions.feedback({"model": "r", "request_id": "r0", "labels": 1.5})
    assert state.predictions.accuracy[("r", 1)].correct == 1
    assert state.predictions.errors == {}
