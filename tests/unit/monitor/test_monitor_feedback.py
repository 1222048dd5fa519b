"""monitor.feedback: predictions of sampled requests scored against labels fed back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monitor_frames import record_batch

from monitor.exporters.prometheus import build_registry
from monitor.records import RecordBatch
from monitor.settings import MonitorSettings
from monitor.state import MonitorState


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
