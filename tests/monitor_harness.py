"""Real processes for the monitor's tests: a `turnout monitor` sidecar, a Prometheus server
scraping it, and a webhook receiver. Shared by the integration and end-to-end tests."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], signum: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Webhook:
    """A local HTTP receiver collecting the JSON documents POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextmanager
def run_sidecar(state_dir: Path, config_yaml: str) -> Iterator[tuple[str, Path]]:
    """A `turnout monitor` process with ``config_yaml``; yields its metrics base URL and its
    records socket, and checks it exits cleanly on SIGTERM."""
    config = state_dir / "monitor.yaml"
    config.write_text(config_yaml)
    socket_file = state_dir / "records.sock"
    env = {"TURNOUT_MONITOR_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen(
        [sys.executable, "-m", "turnout.cli", "monitor", "--listen", f"unix://{socket_file}",
         "--metrics-port", "0", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "ready" in line, line
        url = re.search(r"(http://[\d.]+:\d+)/metrics", line)
        assert url, line
        yield url.group(1), socket_file
    finally:
        stop_process(process)
    assert process.returncode == 0


@contextmanager
def run_prometheus(
    metrics_url: str, state_dir: Path, others: dict[str, str] | None = None
) -> Iterator[str]:
    """A Prometheus server scraping ``metrics_url`` (job turnout-monitor) and ``others``
    (job name -> metrics URL) every second; yields its base URL."""
    jobs = {"turnout-monitor": metrics_url, **(others or {})}
    config = state_dir / "prometheus.yml"
    lines = [
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}",
        "scrape_configs:",
    ]
    for job, url in jobs.items():
        parts = urllib.parse.urlsplit(url)
        lines.append(
            f"  - {{job_name: {job}, metrics_path: '{parts.path or '/metrics'}', "
            f"static_configs: [{{targets: ['{parts.netloc}']}}]}}"
        )
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log = open(state_dir / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={state_dir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, (state_dir / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready"
            time.sleep(0.2)
        yield base
    finally:
        stop_process(process)
        log.close()


def query(base: str, promql: str) -> float | None:
    """The value of an instant query with one series, or None when there is none."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        document = json.loads(response.read())
    assert document["status"] == "success", document
    result = document["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None
