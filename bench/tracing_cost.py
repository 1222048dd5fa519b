"""What tracing costs the gateway: two `turnout serve --backend local`, tracing off and on.

Both gateways send request records to their own `turnout monitor` sidecar (supervised
children, as in production). One sidecar has tracing off; the other tail-samples at ratio
0.01 (errors, requests slower than 500 ms and requests above the current p99 always kept)
and exports the spans with OTLP/HTTP to a receiver in this process that decodes and counts
them. HTTP load from ``hey`` at c64 alternates between the two gateways, ``--rounds`` times
each. The gateway's work is identical either way (it always records ids and timings);
what tracing adds is the sidecar's CPU, which shares the machine's cores with the gateway.
Target: tracing on keeps at least 95% of the req/s with it off (median of the paired
rounds). Usage:

  python -m bench.tracing_cost [--duration 10] [--concurrency 64] [--rounds 6]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.harness import (
    RESULTS_DIR,
    Comparison,
    Run,
    Server,
    console,
    exit_on_sigterm,
    fmt,
    free_port,
    machine_info,
    measure_rounds,
    prepare_workload,
    print_verdict,
    rounds_parser,
    rounds_settings,
    save_results,
    sidecar_metrics,
    start_gateway,
    wait_and_warm,
)

TARGET_RATIO = 0.95
SAMPLE_RATIO = 0.01


class Receiver:
    """An OTLP/HTTP traces endpoint that decodes every export and counts its spans."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = ExportTraceServiceRequest.FromString(self.rfile.read(length))
                spans = sum(
                    len(scope.spans)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                )
                with receiver.lock:
                    receiver.spans += spans
                    receiver.exports += 1
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def traces_kept(metrics_port: int) -> dict[str, float]:
    """``turnout_monitor_traces_kept_total`` by reason, from a sidecar's /metrics."""
    text = sidecar_metrics(metrics_port)
    if text is None:
        return {}
    kept = {}
    for line in text.splitlines():
        if line.startswith("turnout_monitor_traces_kept_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            kept[reason] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("turnout_monitor_trace_records_total "):
            kept["records"] = float(line.rsplit(" ", 1)[1])
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = rounds_parser(__doc__, rounds=6)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    exit_on_sigterm()

    receiver = Receiver()
    sidecar_ports = {"off": free_port(), "on": free_port()}
    runs: list[Run] = []
    kept: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ttc-") as tmp:
        work = Path(tmp)
        workload = prepare_workload(work)
        servers: dict[str, tuple[Server, int]] = {}
        try:
            for mode in ("off", "on"):
                env = {"TURNOUT_MONITOR_METRICS_PORT": str(sidecar_ports[mode])}
                if mode == "on":
                    env |= {
                        "TURNOUT_MONITOR_TRACES": "otlp",
                        "TURNOUT_MONITOR_TRACE_SAMPLE_RATIO": str(SAMPLE_RATIO),
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                    }
                else:
                    env["TURNOUT_MONITOR_TRACES"] = "none"
                servers[mode] = start_gateway(work, workload, mode, [], env)
            # Warm at the measured load: the first window's statistics and the exporter's
            # connection are set up before round 0, not during it.
            wait_and_warm(servers, workload, "tracing", warm_s=5, concurrency=args.concurrency)
            runs = measure_rounds(
                servers, workload.body, args.duration, args.concurrency, args.rounds, "tracing"
            )
            kept = traces_kept(sidecar_ports["on"])
        finally:
            for server, _ in servers.values():
                server.stop()
            receiver.stop()

    c = Comparison.of(runs, args.rounds)
    # The verdict is the median of the paired rounds (each pair ran back to back): single
    # rounds on a shared 2-core machine swing by more than the cost being measured.
    median = c.paired_median
    verdict = "PASS" if median is not None and median >= TARGET_RATIO else "FAIL"
    console.print(c.means_line("tracing", args.concurrency))
    console.print(
        f"{c.rounds_line()}; sidecar {fmt(c.off.sidecar_cpu_us_mean, 0)} us off, "
        f"{fmt(c.on.sidecar_cpu_us_mean, 0)} us on"
    )
    records = kept.pop("records", None)
    console.print(
        f"tail sampling kept {', '.join(f'{k} {v:.0f}' for k, v in kept.items() if v)} of "
        f"{fmt(records, 0)} records; the receiver decoded {receiver.spans} spans in "
        f"{receiver.exports} exports"
    )
    print_verdict(
        verdict,
        f"tracing on keeps >= {TARGET_RATIO:.0%} of req/s: median of paired rounds "
        f"{fmt(median, 3)} (ratio of means {fmt(c.ratio, 3)})",
    )
    save_results(
        "tracing-cost",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                **rounds_settings(args),
                "http_load": "hey -z D -c C, alternating off/on",
                "tracing": f"ratio {SAMPLE_RATIO}, errors, slow >= 500 ms and > p99 kept; "
                "OTLP/HTTP to a decoding receiver in the benchmark process",
            },
            **c.payload(),
            "traces_kept": kept,
            "trace_records": records,
            "spans_received": receiver.spans,
            "target": {
                "name": f"median of paired on/off req/s >= {TARGET_RATIO}",
                "verdict": verdict,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
