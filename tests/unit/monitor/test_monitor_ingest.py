"""The sidecar end to end in-process: real frames over a real Unix datagram socket, then
/metrics and /status over HTTP, and ``turnout monitor status``."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monitor_frames import record_batch

from monitor.ingest import Ingest
from monitor.profiles import build_profile, save_profile
from monitor.server import MonitorServer
from monitor.settings import MonitorSettings
from monitor.state import MonitorState
from turnout.cli import main
from turnout_contract.records import encode_frame


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="tm-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sidecar(short_dir: Path) -> Iterator[MonitorServer]:
    rng = np.random.default_rng(0)
    reference = {"x[0]": rng.normal(size=2500), "x[1]": rng.normal(size=2500)}
    save_profile(build_profile("m", 1, reference), short_dir / "profiles")
    settings = MonitorSettings(
        state_dir=short_dir, metrics_port=0, window_s=0.5, slow_cadence_s=0.5, min_window_rows=30
    )
    server = MonitorServer(settings, tick_s=0.05)
    server.start()
    yield server
    server.stop()


def _send(path: Path, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, str(path))


def _get(url: str, accept: str = "") -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def _status(server: MonitorServer) -> dict[str, Any]:
    return json.loads(_get(f"{server.url}/status")[1])  # type: ignore[no-any-return]


def _until(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _psi(server: MonitorServer) -> float | None:
    found = _status(server)["models"].get("m", {}).get("1", {}).get("features", {})
    value: float | None = found.get("x[0]", {}).get("window", {}).get("psi")
    return value


def test_frames_over_the_socket_reach_metrics_and_status(sidecar: MonitorServer) -> None:
    socket_file = sidecar.settings.socket_file()
    assert socket_file.is_socket()
    rng = np.random.default_rng(1)
    calm = record_batch("m", 1, {"x": rng.normal(size=(500, 2))}, total_s=0.02)
    _send(socket_file, encode_frame(calm))
    _send(socket_file, b"not a frame")
    # Windows last 0.5 s: read each window's value while it is the last one.
    calm_psi = _until(lambda: _psi(sidecar))
    _until(lambda: _status(sidecar)["frames"]["invalid"] == 1)
    threshold = _status(sidecar)["models"]["m"]["1"]["features"]["x[0]"]["thresholds"]["psi"]
    assert calm_psi < threshold

    drifted = record_batch(
        "m", 1, {"x": rng.normal(size=(500, 2)) + np.array([1.0, 0.0])}, total_s=0.02
    )
    _send(socket_file, encode_frame(drifted))
    _until(lambda: (_psi(sidecar) or 0) > threshold)
    document = _status(sidecar)
    assert document["frames"] == {"received": 3, "dropped": 0, "invalid": 1}
    assert document["records"] == 1000

    content_type, text = _get(f"{sidecar.url}/metrics")
    assert content_type.startswith("text/plain")
    series = 'turnout_monitor_request_duration_seconds_count{arm="stable",model="m",version="1"}'
    assert f"{series} 1000.0" in text
    assert "turnout_monitor_frames_invalid_total 1.0" in text
    content_type, text = _get(f"{sidecar.url}/metrics", accept="application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert '# {trace_id="' in text and text.endswith("# EOF\n")

    with urllib.request.urlopen(f"{sidecar.url}/status/m", timeout=10) as response:
        assert list(json.loads(response.read())["models"]) == ["m"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{sidecar.url}/status/nope", timeout=10)
    assert missing.value.code == 404


def test_status_command_prints_a_table_and_json(
    sidecar: MonitorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    batch = record_batch("m", 1, {"x": rng.normal(size=(300, 2))}, arm="canary", total_s=0.05)
    _send(sidecar.settings.socket_file(), encode_frame(batch))
    _until(lambda: _psi(sidecar) is not None)
    assert main(["monitor", "status", "m", "--url", sidecar.url]) == 0
    table = capsys.readouterr().out
    assert "x[0]" in table and "psi" in table and "canary" in table
    assert main(["monitor", "status", "--json", "--url", sidecar.url]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["models"]["m"]["1"]["latency"]["canary"]["requests"] == 300
    assert main(["monitor", "status", "--url", "http://127.0.0.1:9"]) == 1


def test_a_full_queue_drops_and_counts(short_dir: Path) -> None:
    state = MonitorState(MonitorSettings(state_dir=short_dir))
    ingest = Ingest(state, short_dir / "q.sock", queue_size=1, tick_s=0.05)
    release = threading.Event()
    handled: list[bytes] = []

    def slow_handle(payload: bytes, now: float) -> None:
        release.wait(10)
        handled.append(payload)

    ingest.handle = slow_handle  # type: ignore[method-assign]
    ingest.start()
    try:
        for i in range(20):
            _send(short_dir / "q.sock", b"frame %d" % i)
        _until(lambda: state.frames_received == 20)
        release.set()
        _until(lambda: len(handled) + state.frames_dropped == 20)
        assert state.frames_dropped >= 17  # one in the worker, one queued, the rest dropped
    finally:
        release.set()
        ingest.stop()
    assert not (short_dir / "q.sock").exists()


def test_feedback_over_http_gives_accuracy(
    sidecar: MonitorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = record_batch("m", 1, {"x": np.zeros((4, 2))}, {"label": np.array([1, 0, 1, 1])})
    batch.columns["request_id"] = ["a", "b", "c", "d"]
    _send(sidecar.settings.socket_file(), encode_frame(batch))
    _until(lambda: _status(sidecar)["records"] == 4)

    def post(body: object) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{sidecar.url}/feedback",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    labels = [{"model": "m", "request_id": r, "labels": 1} for r in ("a", "b", "c", "zz")]
    assert post(labels) == (200, {"matched": 3, "unmatched": 1})
    code, answer = post({"model": "m"})
    assert code == 400 and "feedback needs" in answer["error"]
    accuracy = _status(sidecar)["models"]["m"]["1"]["accuracy"]
    assert accuracy["labelled"] == 3 and accuracy["correct"] == 2
    assert main(["monitor", "status", "--url", sidecar.url]) == 0
    assert "0.6667 of 3" in capsys.readouterr().out


def test_malformed_frames_are_counted_never_raised(short_dir: Path) -> None:
    import msgpack

    state = MonitorState(MonitorSettings(state_dir=short_dir))
    ingest = Ingest(state, short_dir / "unused.sock")
    valid = encode_frame(record_batch("m", 1, {"x": np.ones((3, 2))}))
    frame = msgpack.unpackb(valid)
    frame["n"] = 5  # columns of 3 rows
    wrong_count = msgpack.packb(frame, use_bin_type=True)
    frame = msgpack.unpackb(valid)
    frame["columns"]["total_s"]["dtype"] = "<f4"  # 3 float64s read as 6 float32s
    wrong_dtype = msgpack.packb(frame, use_bin_type=True)
    frame = msgpack.unpackb(valid)
    frame["sampled"]["data"] = np.array([7, 8, 9], np.int64).tobytes()  # out of range
    bad_sampled = msgpack.packb(frame, use_bin_type=True)
    payloads = [b"", b"\x00", msgpack.packb({"v": 1}), valid[:-7], wrong_count, wrong_dtype]
    for payload in [*payloads, bad_sampled]:
        ingest.handle(payload, now=1.0)
    assert state.frames_invalid >= len(payloads)
    ingest.handle(valid, now=1.0)
    assert state.records >= 3
