"""Two gateways on one machine each supervise a sidecar of their own: the sidecars' metrics
ports cannot collide (each gets a free loopback port unless one is configured), both serve,
and the address file tells `turnout monitor status` where the local one is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gateways import EVENTUALLY_S, local_settings, running


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_two_gateways_sidecars_on_ports_of_their_own(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_MONITOR_METRICS_PORT", raising=False)
    first_state, second_state = tmp_path / "one", tmp_path / "two"
    with (
        running(local_settings(repository, monitor=True, state_dir=first_state)) as first,
        running(local_settings(repository, monitor=True, state_dir=second_state)) as second,
    ):
        urls = [first.gateway.monitor_http, second.gateway.monitor_http]
        assert urls[0] != urls[1]  # 9100 for the first while free, a free port for the next
        assert first.gateway._port_lock is not None or second.gateway._port_lock is None
        deadline = time.monotonic() + EVENTUALLY_S * 3  # each sidecar imports numba first
        while not all(answers(url) for url in urls):
            assert time.monotonic() < deadline, urls
            time.sleep(0.2)
        written = json.loads((second_state / "gateway.json").read_text())
        assert written["monitor"] == urls[1]
        status = subprocess.run(
            [sys.executable, "-m", "turnout.cli", "monitor", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TURNOUT_STATE_DIR": str(second_state)},
        )
        assert status.returncode == 0, status.stderr
        assert "models" in json.loads(status.stdout)
        for gateway in (first, second):
            monitor = gateway.gateway.monitor
            assert monitor is not None and monitor.starts == 1  # never restarted
