"""What the monitor costs the gateway: `turnout serve --backend local` with and without it.

Two gateways run side by side on the same model (bench.models' MLP): one with
``--no-monitor``, one sending request records (every request's tensors, within the default
sampling budget) to a sidecar that receives them. The sidecar is ``turnout monitor``, started
by the gateway as its supervised child; with ``--sink`` (or when ``turnout monitor`` is not
installed) it is a minimal datagram sink that only counts frames, which isolates the
gateway's own cost. HTTP load from ``hey`` at c64 alternates between the two, ``--rounds``
times each, so drift in the machine's load hits both alike. Target: with the monitor on, at
least 95% of the req/s with it off. Usage:

  python -m bench.monitor_cost [--duration 10] [--concurrency 64] [--rounds 3] [--sink]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    STATS_PATH,
    Comparison,
    Run,
    Server,
    StartError,
    console,
    exit_on_sigterm,
    fmt,
    machine_info,
    measure_rounds,
    prepare_workload,
    print_verdict,
    read_counts,
    rounds_parser,
    rounds_settings,
    save_results,
    sidecar_metrics,
    start_gateway,
    turnout_executable,
    wait_and_warm,
)

TARGET_RATIO = 0.95


# ----------------------------------------------------------------------- the counting sink


def run_sink(path: Path, stats_file: Path) -> int:
    """Receive datagrams on ``path``, count frames and bytes, write the counts on SIGTERM."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock.bind(str(path))
    sock.settimeout(0.2)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    frames = received = 0
    print("sink ready", flush=True)
    while not stop:
        try:
            received += len(sock.recv(1 << 20))
            frames += 1
        except TimeoutError:
            continue
    stats_file.write_text(json.dumps({"frames": frames, "bytes": received}))
    return 0


def sidecar_requests(metrics_port: int = 9100) -> float | None:
    """Requests the sidecar has recorded (``turnout_monitor_requests_total``), if it answers."""
    text = sidecar_metrics(metrics_port)
    if text is None:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("turnout_monitor_requests_total{")
    )


def monitor_available() -> bool:
    try:
        done = subprocess.run(
            [turnout_executable(), "monitor", "--help"], capture_output=True, timeout=60
        )
    except (StartError, OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = rounds_parser(__doc__, rounds=3)
    parser.add_argument("--sink", action="store_true", help="a counting sink, not the sidecar")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--run-sink", nargs=2, metavar=("SOCKET", "STATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_sink:
        return run_sink(Path(args.run_sink[0]), Path(args.run_sink[1]))

    exit_on_sigterm()
    use_sidecar = not args.sink and monitor_available()
    receiver = (
        "turnout monitor (the gateway's supervised child)"
        if use_sidecar
        else "a datagram sink that only counts frames"
        + ("" if args.sink else " (turnout monitor is not available)")
    )
    console.print(f"monitor on: records go to {receiver}")

    runs: list[Run] = []
    sink_stats: dict[str, Any] | None = None
    sidecar_stats: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="tmc-") as tmp:
        work = Path(tmp)
        workload = prepare_workload(work)
        servers: dict[str, tuple[Server, int]] = {}
        sink: Server | None = None
        socket_file = work / "sink.sock"
        sink_file = work / "sink.json"
        try:
            if not use_sidecar:
                command = [sys.executable, "-m", "bench.monitor_cost", "--run-sink"]
                sink = Server([*command, str(socket_file), str(sink_file)], work / "sink.log")
                sink.start()
                deadline = time.monotonic() + 60
                while not socket_file.exists():  # bound: it receives from now on
                    if time.monotonic() > deadline or sink.proc is None or sink.proc.poll():
                        raise StartError(f"the sink did not start:\n{sink.log_tail()}")
                    time.sleep(0.1)
            for mode in ("off", "on"):
                extra = ["--no-monitor"] if mode == "off" else []
                if mode == "on" and not use_sidecar:
                    extra = ["--monitor-address", f"unix://{socket_file}"]
                servers[mode] = start_gateway(work, workload, mode, extra)
            wait_and_warm(servers, workload, "monitor")

            runs = measure_rounds(
                servers, workload.body, args.duration, args.concurrency, args.rounds
            )
            if use_sidecar:
                served = read_counts(servers["on"][1], STATS_PATH)
                recorded = sidecar_requests()
                sidecar_stats = {"served": served[0] if served else None, "recorded": recorded}
        finally:
            for server, _ in servers.values():
                server.stop()
            if sink is not None and sink.proc is not None:
                sink.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sink.proc.wait(10)
                sink.stop()
                with contextlib.suppress(OSError, ValueError):
                    sink_stats = json.loads(sink_file.read_text())

    c = Comparison.of(runs, args.rounds)
    verdict = "PASS" if c.ratio is not None and c.ratio >= TARGET_RATIO else "FAIL"
    console.print(c.means_line("monitor", args.concurrency))
    console.print(f"{c.rounds_line()}, sidecar {fmt(c.on.sidecar_cpu_us_mean, 0)} us")
    print_verdict(
        verdict, f"monitor on keeps >= {TARGET_RATIO:.0%} of req/s: ratio {fmt(c.ratio, 3)}"
    )
    if sidecar_stats is not None:
        console.print(
            f"the sidecar recorded {sidecar_stats['recorded']} requests of the "
            f"{sidecar_stats['served']} the monitored gateway served (its /metrics on :9100)"
        )
    if sink_stats is not None:
        console.print(
            f"sink received {sink_stats['frames']} frames, {sink_stats['bytes'] / 1e6:.1f} MB"
        )
    save_results(
        "monitor-cost",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                **rounds_settings(args),
                "receiver": receiver,
                "http_load": "hey -z D -c C, alternating off/on",
                "monitor_defaults": "sample_rows_per_s 10000, queue 65536, flush every 50 ms",
            },
            **c.payload(),
            "sink": sink_stats,
            "sidecar": sidecar_stats,
            "target": {"name": f"on/off req/s >= {TARGET_RATIO}", "verdict": verdict},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
