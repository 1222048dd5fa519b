"""The monitor sidecar: ingest from the gateway's socket, metrics and status over HTTP.

    turnout monitor [--listen unix:///path] [--metrics-port 9100] [--config FILE]

HTTP (a small threaded ``http.server`` on ``host:metrics_port``):

- ``GET /metrics``: Prometheus text format, or OpenMetrics (with exemplars) when the
  ``Accept`` header asks for ``application/openmetrics-text``;
- ``GET /status`` and ``GET /status/<model>``: the JSON document of ``MonitorState.snapshot``
  plus the active alerts, which ``turnout monitor status`` prints;
- ``POST /feedback``: true labels of earlier requests, for accuracy (``monitor.feedback``);
- ``GET /healthz``: ``ok``.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from monitor.alerts import AlertManager
from monitor.exporters.prometheus import build_registry
from monitor.ingest import Ingest
from monitor.settings import MonitorSettings
from monitor.state import MonitorState
from monitor.tracing import build_tracer

__all__ = ["MonitorServer", "run_monitor"]

log = logging.getLogger("turnout.monitor")

MAX_FEEDBACK_BYTES = 16 * 1024 * 1024


class MonitorServer:
    """The sidecar's parts wired together; ``start()`` / ``stop()``."""

    def __init__(self, settings: MonitorSettings, *, tick_s: float = 0.2) -> None:
        self.settings = settings
        self.state = MonitorState(settings)
        self.alerts = AlertManager(settings, self.state)
        self.tracer = build_tracer(settings, self.state)
        self.registry: CollectorRegistry = build_registry(self.state, self.alerts, self.tracer)
        self.ingest = Ingest(
            self.state,
            settings.socket_file(),
            queue_size=settings.queue_size,
            tick_s=tick_s,
            on_tick=self.alerts.evaluate,
            tracer=self.tracer,
        )
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    @property
    def metrics_port(self) -> int:
        assert self._http is not None
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.metrics_port}"

    def status(self, model: str | None = None) -> dict[str, Any]:
        document = self.state.snapshot(model)
        document["alerts"] = [
            alert.document()
            for alert in self.alerts.active()
            if model is None or alert.model == model
        ]
        return document

    def start(self) -> None:
        # The port first: if it is taken, nothing else has started.
        server = ThreadingHTTPServer(
            (self.settings.host, self.settings.metrics_port), _handler(self)
        )
        self.alerts.start()
        self.ingest.start()
        server.daemon_threads = True
        self._http = server
        self._http_thread = threading.Thread(
            target=server.serve_forever, name="turnout-monitor-http", daemon=True
        )
        self._http_thread.start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
        self.ingest.stop()
        self.alerts.stop()
        if self.tracer is not None:
            self.tracer.shutdown()  # exports what is queued


def _handler(server: MonitorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path.rstrip("/")
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(server.registry), content_type)
            elif path == "/status" or path.startswith("/status/"):
                model = urllib.parse.unquote(path[len("/status/") :]) or None
                document = server.status(model)
                if model is not None and not document["models"]:
                    body = {"error": f"no records of model {model!r} yet"}
                    self._reply(404, json.dumps(body).encode(), "application/json")
                    return
                self._reply(200, json.dumps(document).encode(), "application/json")
            elif path == "/healthz":
                self._reply(200, b"ok\n", "text/plain")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/feedback":
                self._reply(404, b"not found\n", "text/plain")
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if length > MAX_FEEDBACK_BYTES:
                    raise ValueError(f"feedback larger than {MAX_FEEDBACK_BYTES} bytes")
                loaded = json.loads(self.rfile.read(length))
                documents = loaded if isinstance(loaded, list) else [loaded]
                with server.state.lock:
                    matched = sum(server.state.predictions.feedback(d) for d in documents)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                body = json.dumps({"error": f"invalid feedback: {exc}"}).encode()
                self._reply(400, body, "application/json")
                return
            answer = {"matched": matched, "unmatched": len(documents) - matched}
            self._reply(200, json.dumps(answer).encode(), "application/json")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler


def run_monitor(settings: MonitorSettings) -> int:
    """Run the sidecar until SIGINT or SIGTERM."""
    from monitor.stats import warm_up

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    warm_up()
    server = MonitorServer(settings)
    try:
        server.start()
    except OSError as exc:
        print(f"turnout monitor: cannot start: {exc}", file=sys.stderr)
        server.stop()
        return 1
    # What start-up built (numba's compiled kernels, profiles, the exporter) lives as long as
    # the process: keep it out of the collector's full passes, which the objects of every
    # frame and span would otherwise trigger over the whole heap.
    gc.freeze()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"turnout monitor ready: records on unix://{settings.socket_file()}, "
        f"metrics on {server.url}/metrics",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.stop()
    return 0
