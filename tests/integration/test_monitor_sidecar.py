"""`turnout monitor` as users run it: build a profile from a file, start the sidecar
process, send it real frames over its socket, scrape it, ask its status, stop it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monitor_frames import record_batch
from monitor_harness import run_sidecar

from turnout_contract.records import encode_frame


@pytest.fixture
def state_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tms-"))  # short: Unix socket paths are limited
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _turnout(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"TURNOUT_MONITOR_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "turnout.cli", "monitor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_profile_serve_scrape_status(state_dir: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "x[0]": rng.normal(size=3000),
            "x[1]": rng.normal(5.0, 2.0, size=3000),
            "output:label": rng.integers(0, 3, 3000),
        }
    )
    frame.to_parquet(state_dir / "reference.parquet")
    built = _turnout("profile", "iris", "1", "--data", str(state_dir / "reference.parquet"),
                     state_dir=state_dir)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "2 numerical and 1 categorical" in built.stdout
    assert (state_dir / "profiles" / "iris" / "1" / "profile.json").exists()

    config = (
        "window_s: 1\nslow_cadence_s: 1\n"
        "alerts:\n  - {statistic: psi, model: iris, feature: 'x*', for_s: 0}\n"
    )
    with run_sidecar(state_dir, config) as (base, socket_file):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for _ in range(3):
                x = np.column_stack([rng.normal(size=400) + 1.5, rng.normal(5.0, 2.0, 400)])
                labels = {"label": rng.integers(0, 3, 400)}
                batch = record_batch("iris", 1, {"x": x}, labels, arm="canary", total_s=0.015)
                sock.sendto(encode_frame(batch), str(socket_file))

        deadline = time.monotonic() + 30
        document: dict = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{base}/status", timeout=10) as response:
                document = json.loads(response.read())
            alerts = document.get("alerts", [])
            if any(a["feature"] == "x[0]" and a["status"] == "firing" for a in alerts):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no alert fired: {document}")
        assert document["records"] == 1200

        request = urllib.request.Request(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            metrics = response.read().decode()
        assert 'turnout_alert_firing{alert="psi",feature="x[0]",model="iris",version="1"} 1' in (
            metrics
        )
        assert '# {trace_id="' in metrics

        status = _turnout("status", "iris", "--json", "--url", base, state_dir=state_dir)
        assert status.returncode == 0, status.stderr
        version = json.loads(status.stdout)["models"]["iris"]["1"]
        assert set(version["features"]) == {"x[0]", "x[1]", "output:label"}
        assert version["latency"]["canary"]["requests"] == 1200
    assert not socket_file.exists()


def test_a_real_gateway_feeds_the_sidecar(repository: Path, state_dir: Path) -> None:
    """Gateway (local backend) -> Unix datagrams -> sidecar: per-arm latency, the first
    requests as reference, then drift when the inputs shift."""
    import tritonclient.http as httpclient
    from gateways import GatewayThread, local_settings

    from monitor.server import MonitorServer
    from monitor.settings import MonitorSettings

    settings = MonitorSettings(
        state_dir=state_dir, metrics_port=0, window_s=1, reference_first_n=400
    )
    sidecar = MonitorServer(settings, tick_s=0.05)
    sidecar.start()
    address = f"unix://{settings.socket_file()}"
    gateway = GatewayThread(local_settings(repository, monitor=True, monitor_address=address))
    try:
        admin = gateway.gateway.admin
        gateway.call(admin.apply("add_sub", "set", {"weights": {"1": 50, "2": 50}}, "t"))
        client = httpclient.InferenceServerClient(gateway.http_url)
        rng = np.random.default_rng(0)

        def infer(shift: float, requests: int) -> None:
            for _ in range(requests):
                tensors = []
                for name in ("a", "b"):
                    value = (rng.normal(size=(4, 4)) + shift).astype(np.float32)
                    tensor = httpclient.InferInput(name, [4, 4], "FP32")
                    tensor.set_data_from_numpy(value)
                    tensors.append(tensor)
                client.infer("add_sub", tensors)

        infer(0.0, 300)  # 1,200 rows over two versions: both get a reference
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            document = sidecar.status("add_sub")
            versions = document["models"].get("add_sub", {})
            complete = sum(v["requests"] for v in versions.values()) == 300
            if complete and len(versions) == 2 and all(v["reference"] for v in versions.values()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no references: {document}")
        one = versions["1"]
        assert "a[0]" in one["features"] and "output:sum[3]" in one["features"]
        arms = {arm for v in versions.values() for arm in v["latency"]}
        assert arms == {"primary", "canary"}

        infer(3.0, 150)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            features = sidecar.status("add_sub")["models"]["add_sub"]["1"]["features"]
            if "psi" in features["a[0]"]["drifted"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no drift seen: {features['a[0]']}")
        assert sidecar.state.frames_invalid == 0 and sidecar.state.frames_dropped == 0
    finally:
        gateway.stop()
        sidecar.stop()
