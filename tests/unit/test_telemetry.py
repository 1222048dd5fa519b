"""The record emitter (gateway/telemetry/): frames over a real Unix datagram socket, drops
counted, the sampling budget, traceparent, and frames cut to fit a datagram."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.limits import TokenBucket
from gateway.telemetry import RecordEmitter
from turnout_contract.records import (
    SERVER,
    BatchTensors,
    BatchTiming,
    RecordBatch,
    RequestRecord,
    decode_frame,
)
from turnout_contract.trace import TraceContext

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="tm-") as tmp:
        yield Path(tmp)


@pytest.fixture
def receiver(sock_dir: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "monitor.sock"))
    sock.settimeout(5)
    yield sock
    sock.close()


def address(sock_dir: Path) -> str:
    return f"unix://{sock_dir / 'monitor.sock'}"


def receive_all(sock: socket.socket, wait_s: float = 0.3) -> list[RecordBatch]:
    frames = []
    sock.settimeout(wait_s)
    while True:
        try:
            frames.append(decode_frame(sock.recv(1 << 20)))
        except TimeoutError:
            return frames


def record(
    emitter: RecordEmitter,
    inputs: dict[str, np.ndarray[Any, Any]] | None = None,
    outputs: dict[str, np.ndarray[Any, Any]] | None = None,
    **kw: Any,
) -> None:
    """Observe one record; with ``inputs``/``outputs``, the request was alone in its batch."""
    values: dict[str, Any] = {
        "model": "m",
        "version": 1,
        "revision": 3,
        "arm": "primary",
        "status": 200,
        "start_ns": time.time_ns(),
        "received": 100.0,
        "entered": 100.0002,
        "total_s": 0.004,
        "timing": BatchTiming(queue_s=0.001, batch_s=0.002, batch_size=8, enqueued=100.0005),
        "trace": TraceContext.start(kw.pop("traceparent", None)),
        "protocol": "http",
        "path": "/v2/models/m/infer",
        "error": "",
        "request_id": "",
    }
    values.update(kw)
    if inputs is not None and outputs is not None:
        rows = values.get("rows", 1)
        values["timing"].tensors = BatchTensors(inputs, outputs, rows)
    emitter.observe(RequestRecord(**values, kind=SERVER))


def test_frames_carry_the_columns_and_sampled_tensors(
    sock_dir: Path, receiver: socket.socket
) -> None:
    emitter = RecordEmitter(address(sock_dir))
    emitter.start()
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        y = x * 2
        record(emitter, rows=2, inputs={"x": x}, outputs={"y": y}, request_id="a")
        record(emitter, status=400, request_id="b", traceparent=f"00-{TRACE}-{PARENT}-01")
        record(emitter, model="other", version=2, arm="canary", revision=4)
        emitter.flush()
        frames = {(f.model, f.version): f for f in receive_all(receiver)}
    finally:
        emitter.close()
    assert set(frames) == {("m", 1), ("other", 2)}
    m = frames[("m", 1)]
    assert m.rows == 2
    assert list(m.columns["status"]) == [200, 400]
    assert list(m.columns["revision"]) == [3, 3]
    assert m.columns["arm"] == ["primary", "primary"]
    assert m.columns["request_id"] == ["a", "b"]
    assert list(m.columns["batch_size"]) == [8, 8]
    np.testing.assert_allclose(m.columns["queue_s"], [0.001, 0.001])
    np.testing.assert_allclose(m.columns["total_s"], [0.004, 0.004])
    # A request of two rows: two sampled entries naming its record, two tensor rows.
    assert list(m.sampled) == [0, 0]
    np.testing.assert_array_equal(m.inputs["x"], x)
    np.testing.assert_array_equal(m.outputs["y"], y)
    assert m.columns["trace_id"][1] == TRACE
    assert m.columns["span_id"][1] != PARENT  # the gateway's own span, a child of the caller's
    assert all(len(t) == 32 for t in m.columns["trace_id"])
    assert all(len(s) == 16 for s in m.columns["span_id"])
    assert m.columns["trace_id"][0] != m.columns["trace_id"][1]
    assert m.columns["parent_id"] == ["", PARENT]
    assert list(m.columns["trace_flags"]) == [0, 1]
    np.testing.assert_allclose(m.columns["decode_s"], [0.0002, 0.0002], rtol=1e-6)
    np.testing.assert_allclose(m.columns["enqueue_s"], [0.0005, 0.0005], rtol=1e-6)
    assert m.columns["kind"] == ["server", "server"]
    assert m.columns["protocol"] == ["http", "http"]
    assert m.columns["path"] == ["/v2/models/m/infer"] * 2
    other = frames[("other", 2)]
    assert other.columns["arm"] == ["canary"] and list(other.columns["revision"]) == [4]
    assert len(other.sampled) == 0 and other.inputs == {}
    assert emitter.frames_sent == 2 and emitter.records_sent == 3 and emitter.frames_dropped == 0


def test_the_flush_thread_sends_without_being_asked(
    sock_dir: Path, receiver: socket.socket
) -> None:
    emitter = RecordEmitter(address(sock_dir), flush_interval_s=0.02)
    emitter.start()
    try:
        record(emitter)
        frame = decode_frame(receiver.recv(1 << 20))
    finally:
        emitter.close()
    assert frame.rows == 1


def test_large_batches_are_split_into_datagrams_under_the_limit(
    sock_dir: Path, receiver: socket.socket
) -> None:
    emitter = RecordEmitter(address(sock_dir), max_frame_bytes=64 * 1024)
    emitter.start()
    rows = 300
    try:
        for i in range(rows):
            x = np.full((1, 64), i, dtype=np.float32)  # 256 bytes in, 256 out
            record(emitter, rows=1, inputs={"x": x}, outputs={"y": x}, request_id=str(i))
        emitter.flush()
        sizes = []
        receiver.settimeout(0.3)
        frames = []
        with pytest.raises(TimeoutError):
            while True:
                payload = receiver.recv(1 << 20)
                sizes.append(len(payload))
                frames.append(decode_frame(payload))
    finally:
        emitter.close()
    assert len(frames) > 1
    assert max(sizes) <= 64 * 1024
    assert sum(f.rows for f in frames) == rows
    ids = [int(i) for f in frames for i in f.columns["request_id"]]
    assert ids == list(range(rows))
    for frame in frames:
        firsts = frame.inputs["x"][:, 0]
        assert [int(v) for v in firsts] == [
            int(frame.columns["request_id"][i]) for i in frame.sampled
        ]


def test_tensors_of_different_shapes_go_in_separate_frames(
    sock_dir: Path, receiver: socket.socket
) -> None:
    emitter = RecordEmitter(address(sock_dir))
    emitter.start()
    try:
        for width in (3, 3, 5):
            x = np.ones((1, width), np.float32)
            record(emitter, rows=1, inputs={"x": x}, outputs={"y": x})
        emitter.flush()
        frames = receive_all(receiver)
    finally:
        emitter.close()
    assert [f.inputs["x"].shape for f in frames] == [(2, 3), (1, 5)]


def test_a_full_queue_drops_and_counts_without_blocking(sock_dir: Path) -> None:
    emitter = RecordEmitter(address(sock_dir), queue_size=100)  # not started: nothing drains
    started = time.perf_counter()
    for _ in range(10_000):
        record(emitter)
    elapsed = time.perf_counter() - started
    assert emitter.records_queued == 100
    assert emitter.records_dropped == 9_900
    assert elapsed < 1.0  # ~1 us a record; a blocking queue would never return


def test_no_sidecar_drops_frames_and_counts_them(sock_dir: Path) -> None:
    emitter = RecordEmitter(address(sock_dir))  # nothing bound at that path
    emitter.start()
    try:
        record(emitter)
        record(emitter, model="other")
        started = time.perf_counter()
        emitter.flush()
        assert time.perf_counter() - started < 0.5
    finally:
        emitter.close()
    assert emitter.frames_dropped == 2 and emitter.frames_sent == 0


def test_a_receiver_that_stopped_reading_costs_dropped_frames_not_time(sock_dir: Path) -> None:
    path = sock_dir / "monitor.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
        stuck.bind(str(path))
        emitter = RecordEmitter(address(sock_dir), max_frame_bytes=64 * 1024)
        emitter.start()
        try:
            x = np.ones((1, 4096), np.float32)  # 16 KiB in and out: a few records a frame
            started = time.perf_counter()
            for _ in range(20):
                for _ in range(40):
                    record(emitter, rows=1, inputs={"x": x}, outputs={"y": x})
                emitter.flush()
            assert time.perf_counter() - started < 5
        finally:
            emitter.close()
    assert emitter.frames_dropped > 0  # EAGAIN once the receive buffer is full
    assert emitter.frames_sent > 0


def test_the_sampling_budget_caps_tensor_rows(sock_dir: Path, receiver: socket.socket) -> None:
    emitter = RecordEmitter(address(sock_dir), sample_rows_per_s=10)
    emitter.start()
    try:
        x = np.ones((2, 4), np.float32)
        for _ in range(50):
            record(emitter, rows=2, inputs={"x": x}, outputs={"y": x})
        emitter.flush()
        frames = receive_all(receiver)
    finally:
        emitter.close()
    assert sum(f.rows for f in frames) == 50  # every request keeps its record
    sampled_rows = sum(len(f.sampled) for f in frames)
    assert sampled_rows == 10  # one second's budget, then nothing within the same instant
    assert emitter.rows_sampled == 10 and emitter.samples_skipped == 45


def test_zero_budget_sends_no_tensors(sock_dir: Path, receiver: socket.socket) -> None:
    emitter = RecordEmitter(address(sock_dir), sample_rows_per_s=0)
    emitter.start()
    try:
        x = np.ones((1, 4), np.float32)
        record(emitter, rows=1, inputs={"x": x}, outputs={"y": x})
        emitter.flush()
        (frame,) = receive_all(receiver)
    finally:
        emitter.close()
    assert frame.rows == 1 and len(frame.sampled) == 0


def test_token_bucket_refills_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("gateway.limits.time.monotonic", lambda: now[0])
    bucket = TokenBucket(100)
    assert bucket.take(100)
    assert not bucket.take(1)
    now[0] += 0.06
    assert bucket.take(6)
    assert not bucket.take(1)
    now[0] += 10  # saved up: one second's worth at most
    assert bucket.take(100)
    assert not bucket.take(1)


def test_frames_larger_than_estimated_are_split_and_oversize_tensors_left_out(
    sock_dir: Path, receiver: socket.socket
) -> None:
    limit = 64 * 1024
    emitter = RecordEmitter(address(sock_dir), max_frame_bytes=limit)
    emitter.start()
    try:
        small = np.ones((1, 4), np.float32)
        record(emitter, rows=1, inputs={"x": small}, outputs={"y": small}, request_id="s")
        # 16 KiB in and out each, the estimate taken from the small one; few enough frames
        # for the receive queue (net.unix.max_dgram_qlen is 10 by default).
        for i in range(6):
            big = np.full((1, 4096), i, np.float32)
            record(emitter, rows=1, inputs={"x": big}, outputs={"y": big}, request_id=str(i))
        huge = np.ones((1, 65536), np.float32)  # 256 KiB: never fits a frame
        record(emitter, rows=1, inputs={"x": huge}, outputs={"y": huge}, request_id="huge")
        emitter.flush()
        receiver.settimeout(0.3)
        payloads = []
        with pytest.raises(TimeoutError):
            while True:
                payloads.append(receiver.recv(1 << 20))
    finally:
        emitter.close()
    assert max(len(p) for p in payloads) <= limit
    frames = [decode_frame(p) for p in payloads]
    ids = [i for f in frames for i in f.columns["request_id"]]
    assert ids == ["s", *(str(i) for i in range(6)), "huge"]
    sampled = {f.columns["request_id"][i] for f in frames for i in f.sampled}
    assert sampled == {"s", *(str(i) for i in range(6))}  # all but the huge one
    assert emitter.samples_oversize == 1 and emitter.frames_dropped == 0


def test_a_call_is_sampled_once_for_all_its_requests_and_its_rows_travel_once(
    sock_dir: Path, receiver: socket.socket
) -> None:
    emitter = RecordEmitter(address(sock_dir), sample_rows_per_s=6)
    emitter.start()
    try:
        x = np.arange(10, dtype=np.float32).reshape(5, 2)
        shared = BatchTensors({"x": x}, {"y": x * 2}, 5)
        for i, (row, rows, status) in enumerate(((0, 1, 200), (1, 2, 504), (3, 2, 200))):
            timing = BatchTiming(batch_size=5, batch_id=9, row=row, tensors=shared)
            ok = status == 200
            record(emitter, timing=timing, rows=rows if ok else 0, status=status, request_id=str(i))
        # A second call of 5 rows finds the budget spent (6 rows a second): not sampled.
        other = BatchTensors({"x": x}, {"y": x}, 5)
        record(emitter, timing=BatchTiming(batch_size=5, row=0, tensors=other), rows=5)
        emitter.flush()
        (frame,) = receive_all(receiver)
    finally:
        emitter.close()
    assert frame.rows == 4
    # The rows of the two successful requests, from one part; the timed-out one's left out.
    assert frame.sampled.tolist() == [0, 2, 2]
    np.testing.assert_array_equal(frame.inputs["x"], x[[0, 3, 4]])
    np.testing.assert_array_equal(frame.outputs["y"], x[[0, 3, 4]] * 2)
    assert emitter.rows_sampled == 3 and emitter.samples_skipped == 1
