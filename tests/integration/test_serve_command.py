"""`turnout serve` as users run it: a real process, the ready line, and a clean drain on
SIGTERM with requests still in flight."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.model_zoo import slow, write_repository


def _start(repository: Path, state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    config = state_dir / "turnout.yaml"
    config.write_text(f"state_dir: {state_dir}\n")
    command = [sys.executable, "-m", "turnout.cli", "serve", "--backend", "local"]
    command += ["--model-repository", str(repository), "--config", str(config)]
    command += ["--http-port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "ready" in line, line
    match = re.search(r"http://([\d.]+:\d+)", line)
    assert match, line
    return process, match.group(1)


def _in_flight(address: str, model: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf'^turnout_requests_in_flight{{model="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def draining(tmp_path: Path) -> Path:
    """One model, one call at a time, 64 rows a call: about 100 ms a call on 2 cores, so
    two calls are in the gateway together long enough to see."""
    config = {"max_batch_size": 64, "max_queue_size": 2, "max_inflight_batches": 1}
    return write_repository(
        tmp_path / "models", {"slow": (slow, {**config, "inline_max_us": 0}, [1])}
    )


def test_ready_line_then_sigterm_drains_in_flight(draining: Path, tmp_path: Path) -> None:
    process, address = _start(draining, tmp_path)
    try:
        address_file = json.loads((tmp_path / "gateway.json").read_text())
        assert address_file["http"] == f"http://{address}"
        results: list[Any] = []

        def slow_request() -> None:
            client = httpclient.InferenceServerClient(address, network_timeout=60)
            tensor = httpclient.InferInput("x", [64, 512], "FP32")
            tensor.set_data_from_numpy(np.ones((64, 512), np.float32))
            try:
                results.append(client.infer("slow", [tensor]).as_numpy("y").shape)
            except Exception as exc:  # recorded, then asserted on below
                results.append(exc)

        # The model runs one call at a time: SIGTERM comes once both are in the gateway
        # (one running, one queued), and both must still be answered. Not before: the
        # gateway stops accepting at once, so a request still connecting is refused.
        threads = [threading.Thread(target=slow_request) for _ in range(2)]
        for thread in threads:
            thread.start()
        with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=10) as reply:
            assert reply.status == 200
        deadline = time.monotonic() + 30
        while _in_flight(address, "slow") < 2:
            assert not results, f"a request ended before both were in the gateway: {results}"
            assert time.monotonic() < deadline, "the two requests never reached the gateway"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
        assert results == [(64, 512), (64, 512)]
        assert process.stdout is not None
        assert "turnout stopped" in process.stdout.read()
        assert not (tmp_path / "gateway.json").exists()
    finally:
        if process.poll() is None:
            process.kill()


def test_bad_model_config_fails_start_with_a_clear_message(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"
    (model_dir / "1").mkdir(parents=True)
    from model_zoo import add_sub

    add_sub(model_dir / "1" / "model.onnx")
    (model_dir / "config.yaml").write_text("max_batch_size: -3\n")
    command = [sys.executable, "-m", "turnout.cli", "serve", "--backend", "local"]
    command += ["--model-repository", str(tmp_path / "models"), "--http-port", "0"]
    result = subprocess.run(
        [*command, "--grpc-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"XDG_STATE_HOME": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "max_batch_size" in result.stderr
    assert "greater than or equal to 0" in result.stderr
