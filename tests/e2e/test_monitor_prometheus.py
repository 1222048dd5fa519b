"""The sidecar as operators run it: a real `turnout monitor` process scraped every second by
a real Prometheus server, with an alert webhook. Normal traffic first, then traffic whose
``x[0]`` drifts: Prometheus's query API must show the PSI gauge crossing the threshold
gauge, and the webhook must get exactly one firing alert."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from monitor_frames import record_batch
from monitor_harness import PROMETHEUS, WAIT_S, Webhook, query, run_prometheus, run_sidecar

from monitor.profiles import build_profile, features_of, save_profile
from turnout_contract.records import encode_frame

pytestmark = pytest.mark.slow

MODEL = "iris"
PSI = 'turnout_drift_psi{model="iris",version="1",feature="x[0]",window="last"}'
THRESHOLD = 'turnout_drift_threshold{model="iris",version="1",feature="x[0]",statistic="psi"}'


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
def sidecar(state_dir: Path, webhook: Webhook) -> Iterator[tuple[str, Path]]:
    """A `turnout monitor` process with a profile of iris/1 and one PSI alert on x[0];
    yields its metrics base URL and records socket."""
    rng = np.random.default_rng(0)
    reference = np.column_stack([rng.normal(size=3000), rng.normal(5.0, 2.0, 3000)])
    save_profile(build_profile(MODEL, 1, features_of({"x": reference}, {})),
                 state_dir / "profiles")  # fmt: skip
    config = (
        "window_s: 1\n"
        "debounce_s: 300\n"
        "alerts:\n"
        "  - {statistic: psi, model: iris, feature: 'x[0]', threshold: reference, for_s: 2}\n"
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


def test_prometheus_sees_drift_cross_the_threshold_and_one_alert_is_sent(
    sidecar: tuple[str, Path], prometheus: str, webhook: Webhook
) -> None:
    _, socket_file = sidecar
    rng = np.random.default_rng(1)

    def send(shift: float, seconds: float) -> None:
        """~800 rows per second (windows of 1 s), x[0] shifted by ``shift``."""
        end = time.monotonic() + seconds
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            while time.monotonic() < end:
                x = np.column_stack([rng.normal(size=200) + shift, rng.normal(5.0, 2.0, 200)])
                sock.sendto(
                    encode_frame(record_batch(MODEL, 1, {"x": x}, total_s=0.01)), str(socket_file)
                )
                time.sleep(0.25)

    # Normal traffic until Prometheus has scraped both gauges: no drift, nothing sent.
    deadline = time.monotonic() + WAIT_S
    psi = threshold = None
    while psi is None or threshold is None:
        assert time.monotonic() < deadline, f"Prometheus never scraped: {psi=} {threshold=}"
        send(0.0, 1.0)
        psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
    send(0.0, 3.0)
    psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
    assert psi is not None and threshold is not None
    assert psi < threshold, f"normal traffic drifted: psi {psi} >= {threshold}"
    print(f"normal: psi {psi:.4g}, threshold {threshold:.4g}")
    assert webhook.received == []

    # Drifted traffic: the gauge crosses the threshold gauge in Prometheus, the alert fires.
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, f"no drift in Prometheus: psi {psi} vs {threshold}"
        send(1.5, 1.0)
        psi, threshold = query(prometheus, PSI), query(prometheus, THRESHOLD)
        if psi is not None and threshold is not None and psi > threshold:
            print(f"drifted: psi {psi:.4g}, threshold {threshold:.4g}")
            break
    while not webhook.received:
        assert time.monotonic() < deadline, "the webhook got nothing"
        send(1.5, 1.0)
    send(1.5, 3.0)  # still drifting: firing, but no second POST
    assert len(webhook.received) == 1, webhook.received
    alert = webhook.received[0]
    assert alert["status"] == "firing"
    assert (alert["statistic"], alert["model"], alert["version"], alert["feature"]) == (
        "psi", MODEL, 1, "x[0]"
    )  # fmt: skip
    assert alert["threshold"] == pytest.approx(threshold)
    assert alert["value"] > alert["threshold"]
    assert alert["fired_at"] - alert["since"] >= 2.0

    firing = 'turnout_alert_firing{alert="psi",model="iris",version="1",feature="x[0]"}'
    sent = 'turnout_alert_notifications_total{outcome="sent"}'
    deadline = time.monotonic() + WAIT_S
    while (query(prometheus, firing), query(prometheus, sent)) != (1.0, 1.0):
        assert time.monotonic() < deadline, (query(prometheus, firing), query(prometheus, sent))
        send(1.5, 1.0)
