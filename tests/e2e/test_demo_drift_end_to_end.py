"""The demo model end to end: a gateway (local backend) serves breast_cancer, sends its request
records to a real `turnout monitor` sidecar holding a reference profile built by the real CLI
from the breast-cancer data, and a real Prometheus server scrapes the sidecar every second.
Replaying the data keeps the PSI gauge of ``features[0]`` under its threshold gauge; replaying
a drifted copy (``features[0]`` scaled by 1.5) takes it over, and the webhook gets exactly one
firing alert."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from gateways import GatewayThread, local_settings
from monitor_harness import PROMETHEUS, WAIT_S, Webhook, query, run_prometheus, run_sidecar

from gateway.demo import FEATURES, MODEL, build_demo_models, demo_rows

pytestmark = pytest.mark.slow

VERSION = 2
FEATURE = "features[0]"
SCALE = 1.5
ROWS_PER_REQUEST = 50  # under the demo model's max_batch_size (64)
PSI = f'turnout_drift_psi{{model="{MODEL}",version="{VERSION}",feature="{FEATURE}",window="last"}}'
THRESHOLD = (
    f'turnout_drift_threshold{{model="{MODEL}",version="{VERSION}",feature="{FEATURE}",'
    'statistic="psi"}'
)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tmp-"))  # short: Unix socket paths are limited
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.stop()


@pytest.fixture
def models(state_dir: Path) -> Path:
    """The demo models, and the reference profile of breast_cancer/2 built by the real CLI."""
    repository = state_dir / "models"
    build_demo_models(repository)
    data = state_dir / "reference.npy"
    np.save(data, demo_rows())
    built = subprocess.run(
        [sys.executable, "-m", "turnout.cli", "monitor", "profile", MODEL, str(VERSION),
         "--data", str(data), "--input", "features",
         "--profiles-dir", str(state_dir / "profiles")],
        capture_output=True, text=True, timeout=120,
        env={"TURNOUT_MONITOR_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert (state_dir / "profiles" / MODEL / str(VERSION) / "profile.json").exists()
    return repository


@pytest.fixture
def sidecar(state_dir: Path, webhook: Webhook, models: Path) -> Iterator[tuple[str, Path]]:
    """A `turnout monitor` process with one PSI alert on features[0]; yields its metrics base
    URL and records socket."""
    config = (
        "window_s: 1\n"
        "debounce_s: 300\n"
        "alerts:\n"
        f"  - {{statistic: psi, model: {MODEL}, feature: '{FEATURE}', threshold: reference,"
        " for_s: 2}\n"
        f"webhooks: ['{webhook.url}']\n"
    )
    with run_sidecar(state_dir, config) as running:
        yield running


@pytest.fixture
def prometheus(sidecar: tuple[str, Path], state_dir: Path) -> Iterator[str]:
    if not Path(PROMETHEUS).exists():
        pytest.skip("no prometheus binary (Debian package `prometheus`)")
    with run_prometheus(sidecar[0], state_dir) as base:
        yield base


@pytest.fixture
def gateway(models: Path, sidecar: tuple[str, Path], state_dir: Path) -> Iterator[GatewayThread]:
    """The gateway serving the demo models, sending its records to the sidecar."""
    server = GatewayThread(
        local_settings(
            models,
            state_dir=state_dir / "gateway",
            monitor=True,
            monitor_address=f"unix://{sidecar[1]}",
        )
    )
    yield server
    server.stop()


def test_demo_model_drift_reaches_prometheus_and_one_alert_is_sent(
    gateway: GatewayThread, prometheus: str, webhook: Webhook
) -> None:
    rows = demo_rows()
    rng = np.random.default_rng(0)
    client = httpclient.InferenceServerClient(gateway.http_url)

    def replay(scale: float, seconds: float) -> None:
        """~400 rows a second (windows of 1 s) drawn from the data, features[0] scaled."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(2):
                x = rows[rng.integers(0, len(rows), ROWS_PER_REQUEST)].copy()
                x[:, 0] *= scale
                tensor = httpclient.InferInput("features", [ROWS_PER_REQUEST, FEATURES], "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer(MODEL, [tensor], model_version=str(VERSION))
                assert result.as_numpy("probabilities").shape == (ROWS_PER_REQUEST, 2)
            time.sleep(0.25)

    try:
        # The data itself until Prometheus has scraped both gauges: no drift, nothing sent.
        deadline = time.monotonic() + WAIT_S
        psi = threshold = None
        while psi is None or threshold is None:
            assert time.monotonic() < deadline, f"Prometheus never scraped: {psi=} {threshold=}"
            replay(1.0, 1.0)
            psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
        for _ in range(3):
            replay(1.0, 1.0)
            psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
            assert psi is not None and threshold is not None
            assert psi < threshold, f"the data drifted from itself: psi {psi} >= {threshold}"
        print(f"normal: psi {psi:.4g}, threshold {threshold:.4g}")
        assert webhook.received == []

        # The drifted copy: the gauge crosses the threshold gauge in Prometheus, one alert.
        deadline = time.monotonic() + WAIT_S
        while True:
            assert time.monotonic() < deadline, f"no drift in Prometheus: {psi} vs {threshold}"
            replay(SCALE, 1.0)
            psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
            if psi is not None and threshold is not None and psi > threshold:
                print(f"drifted: psi {psi:.4g}, threshold {threshold:.4g}")
                break
        while not webhook.received:
            assert time.monotonic() < deadline, "the webhook got nothing"
            replay(SCALE, 1.0)
        replay(SCALE, 3.0)  # still drifting: firing, but no second POST
        firing = (
            f'turnout_alert_firing{{alert="psi",model="{MODEL}",version="{VERSION}",'
            f'feature="{FEATURE}"}}'
        )
        while query(prometheus, firing) != 1.0:
            assert time.monotonic() < deadline, f"not firing in Prometheus: {firing}"
            replay(SCALE, 1.0)
    finally:
        client.close()
    assert len(webhook.received) == 1, webhook.received
    alert: dict[str, Any] = webhook.received[0]
    assert alert["status"] == "firing"
    assert (alert["statistic"], alert["model"], alert["version"], alert["feature"]) == (
        "psi", MODEL, VERSION, FEATURE
    )  # fmt: skip
    assert alert["threshold"] == pytest.approx(threshold)
    assert alert["value"] > alert["threshold"]
