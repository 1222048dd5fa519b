"""Tensors recorded per backend call: frames carry each call's rows once, and the sidecar
sees exactly what it saw when every request carried its own rows (seeded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from monitor.profiles import build_profile
from monitor.settings import MonitorSettings
from monitor.state import MonitorState
from turnout_contract.records import (
    SERVER,
    BatchTensors,
    BatchTiming,
    RecordBatch,
    RequestRecord,
    decode_frame,
    encode_frame,
)
from turnout_contract.trace import TraceContext

Array = np.ndarray[Any, Any]


def _record(index: int, timing: BatchTiming, rows: int, status: int = 200) -> RequestRecord:
    record = RequestRecord(
        "m", 1, 1, "primary", status, 0, 1.0, 1.0, 0.001 * (index + 1), timing,
        TraceContext.start(), SERVER, "http", "/v2/models/m/infer", "", f"r{index}",
        rows if status == 200 else 0,
    )  # fmt: skip
    record.sampled = record.batch_tensors() is not None  # as the emitter samples
    return record


def _traffic(
    seed: int, calls: int, shift: float = 0.0, first: int = 0
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """The same requests twice: in shared backend calls, and each alone with its own rows.

    Requests of 1-3 rows, 1-6 to a call; about one in eight times out while its call runs
    (its rows are in the call, it has none of its own).
    """
    rng = np.random.default_rng(seed)
    batched: list[RequestRecord] = []
    alone: list[RequestRecord] = []
    index = first
    for call in range(calls):
        sizes = rng.integers(1, 4, rng.integers(1, 7)).tolist()
        rows = sum(sizes)
        x = rng.normal(size=(rows, 2)) + np.array([shift, 0.0])
        y = rng.integers(0, 3, rows)
        shared = BatchTensors({"x": x}, {"y": y}, rows)
        row = 0
        for size in sizes:
            status = 504 if rng.random() < 0.125 else 200
            timing = BatchTiming(batch_size=rows, batch_id=call + 1, row=row, tensors=shared)
            batched.append(_record(index, timing, size, status))
            own = BatchTensors({"x": x[row : row + size].copy()}, {"y": y[row : row + size]}, size)
            timing = BatchTiming(batch_size=rows, batch_id=call + 1, tensors=own)
            alone.append(_record(index, timing, size, status))
            row += size
            index += 1
    return batched, alone


def _frames(records: list[RequestRecord], cut: int) -> list[RecordBatch]:
    """Decoded frames of the records, cut in two at ``cut`` (mid-call: a call's records are
    then in two frames)."""
    pieces = [records[:cut], records[cut:]]
    return [decode_frame(encode_frame(RecordBatch.from_records("m", 1, p))) for p in pieces if p]


def test_a_frame_carries_each_calls_rows_once_and_decodes_to_the_records_rows() -> None:
    batched, alone = _traffic(seed=7, calls=12)
    encoded = RecordBatch.from_records("m", 1, batched)
    # One part per call, and no more rows than the calls had.
    assert len(encoded.parts) == 12
    assert len(encoded.sampled) == sum(len(p[0]["x"]) for p in encoded.parts)
    assert len(encoded.sampled) <= sum(t.batch_size for r in batched if (t := r.timing))
    got = decode_frame(encode_frame(encoded))
    want = decode_frame(encode_frame(RecordBatch.from_records("m", 1, alone)))
    np.testing.assert_array_equal(got.sampled, want.sampled)
    np.testing.assert_array_equal(got.inputs["x"], want.inputs["x"])
    np.testing.assert_array_equal(got.outputs["y"], want.outputs["y"])
    ok = [i for i, r in enumerate(batched) if r.status == 200]
    assert sorted(set(got.sampled.tolist())) == ok  # the timed-out requests' rows left out
    assert got.columns["request_id"] == [r.request_id for r in batched]


def test_a_call_split_across_frames_sends_each_frame_only_the_rows_it_needs() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    shared = BatchTensors({"x": x}, {"y": x[:, :1]}, 6)
    records = [
        _record(i, BatchTiming(batch_size=6, row=2 * i, tensors=shared), 2) for i in range(3)
    ]
    first, second = (RecordBatch.from_records("m", 1, p) for p in (records[:2], records[2:]))
    assert [len(p[0]["x"]) for p in first.parts] == [4]  # rows 0-3
    assert [len(p[0]["x"]) for p in second.parts] == [2]  # rows 4-5
    np.testing.assert_array_equal(decode_frame(encode_frame(second)).inputs["x"], x[4:])


def test_sidecar_statistics_from_call_records_equal_those_from_per_request_records(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    reference = {
        "x[0]": rng.normal(size=5000),
        "x[1]": rng.normal(size=5000),
        "output:y": rng.integers(0, 3, 5000),
    }
    profile = build_profile("m", 1, reference)
    states = []
    for label in ("batched", "alone"):
        settings = MonitorSettings(
            state_dir=tmp_path / label, window_s=60, slow_sample_size=500, min_window_rows=10
        )
        state = MonitorState(settings, now=0.0)
        state.version("m", 1).use_profile(profile, settings.slow_sample_size)
        states.append(state)
    requests: list[RequestRecord] = []
    for seed, shift, now in ((1, 0.0, 10.0), (2, 0.7, 70.0)):
        batched, alone = _traffic(seed, calls=40, shift=shift, first=len(requests))
        requests += batched
        cut = len(batched) // 2 + 1
        for state, records in zip(states, (batched, alone), strict=True):
            for frame in _frames(records, cut):
                state.apply(frame, now)
            state.tick(now + 50.0)
    for state in states:
        state.run_slow()
    got, want = (s.versions[("m", 1)] for s in states)
    assert got.sampled == want.sampled > 0 and got.requests == want.requests
    for name in ("x[0]", "x[1]", "output:y"):
        a, b = got.features[name], want.features[name]
        np.testing.assert_array_equal(a.cumulative, b.cumulative)
        assert a.last_window == b.last_window and a.last_window
        assert a.cumulative_stats == b.cumulative_stats
        assert a.slow == b.slow
    assert got.features["x[0]"].last_window["psi"] > got.features["x[1]"].last_window["psi"]
    # Accuracy: every request's label, the prediction taken from its call's rows.
    for state in states:
        for i, record in enumerate(requests):
            labels = [(i + j) % 3 for j in range(max(record.rows, 1))]
            state.predictions.feedback({"model": "m", "request_id": f"r{i}", "labels": labels})
    accuracy = [s.predictions.accuracy[("m", 1)] for s in states]
    assert accuracy[0].labelled == accuracy[1].labelled > 0
    assert accuracy[0].correct == accuracy[1].correct


def test_version_2_frames_are_still_read() -> None:
    def packed(array: Array) -> dict[str, Any]:
        return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}

    record = RecordBatch.from_records("m", 1, [_record(0, BatchTiming(), 0)])
    current = msgpack.unpackb(encode_frame(record))
    x = np.ones((2, 3), np.float32)
    frame = {
        **current,
        "v": 2,
        "sampled": packed(np.array([0, 0], np.int64)),
        "inputs": {"x": packed(x)},
        "outputs": {"y": packed(x[:, 0])},
    }
    del frame["tensors"]
    batch = decode_frame(msgpack.packb(frame, use_bin_type=True))
    assert batch.rows == 1 and batch.sampled.tolist() == [0, 0]
    np.testing.assert_array_equal(batch.inputs["x"], x)
