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
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench._results import write_results
from bench.models import INPUT_DIM, MODEL_NAME, build_repository
from bench.serving import (
    INFER_PATH,
    REPO_ROOT,
    Server,
    StartError,
    check_http,
    console,
    fmt,
    free_port,
    http_body,
    machine_info,
    read_counts,
    retry,
    run_hey,
    turnout_executable,
)

TARGET_RATIO = 0.95
STATS_PATH = f"/v2/models/{MODEL_NAME}/stats"


@dataclass
class Run:
    mode: str  # "off" or "on"
    round: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_batch: float | None = None
    gateway_cpu_us: float | None = None  # CPU time of the gateway process per request
    sidecar_cpu_us: float | None = None  # of its children (the sidecar), per request
    requests: int = 0
    errors: int = 0
    error: str | None = None


@dataclass
class Summary:
    mode: str
    rps_mean: float | None
    rps_runs: list[float] = field(default_factory=list)
    p50_ms_mean: float | None = None
    p99_ms_mean: float | None = None
    gateway_cpu_us_mean: float | None = None
    sidecar_cpu_us_mean: float | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def cpu_snapshot(pid: int) -> tuple[float, dict[int, float]]:
    return cpu_seconds(pid), {child: cpu_seconds(child) for child in children(pid)}


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


def sidecar_requests(url: str = "http://127.0.0.1:9100/metrics") -> float | None:
    """Requests the sidecar has recorded (``turnout_monitor_requests_total``), if it answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, ValueError):
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


def serve_command(repo: Path, config: Path, http_port: int, extra: list[str]) -> list[str]:
    return [
        turnout_executable(),
        "serve",
        "--backend",
        "local",
        "--host",
        "127.0.0.1",
        "--model-repository",
        str(repo),
        "--config",
        str(config),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(free_port()),
        *extra,
    ]


def summarize(runs: list[Run], mode: str) -> Summary:
    ok = [r for r in runs if r.mode == mode and r.rps is not None]

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.fmean(present) if present else None

    return Summary(
        mode=mode,
        rps_mean=mean([r.rps for r in ok]),
        rps_runs=[r.rps for r in ok if r.rps is not None],
        p50_ms_mean=mean([r.p50_ms for r in ok]),
        p99_ms_mean=mean([r.p99_ms for r in ok]),
        gateway_cpu_us_mean=mean([r.gateway_cpu_us for r in ok]),
        sidecar_cpu_us_mean=mean([r.sidecar_cpu_us for r in ok]),
    )


@dataclass
class Workload:
    """The MLP repository, one request's input and body, and ONNX Runtime's answer to it."""

    repo: Path
    x: np.ndarray[Any, Any]
    expected: np.ndarray[Any, Any]
    body: Path


def prepare_workload(work: Path) -> Workload:
    repo = build_repository(work / "models")
    x = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = str(repo / MODEL_NAME / "1" / "model.onnx")
    expected = ort.InferenceSession(model, options).run(None, {"input": x})[0]
    body = work / "body.json"
    body.write_bytes(http_body(x))
    return Workload(repo, x, expected, body)


def start_gateway(
    work: Path, workload: Workload, mode: str, extra: list[str], env: dict[str, str] | None = None
) -> tuple[Server, int]:
    """`turnout serve --backend local` with a state dir of its own; returns it and its port."""
    state = work / f"state-{mode}"
    state.mkdir()
    config = work / f"turnout-{mode}.yaml"
    config.write_text(f"state_dir: {state}\n")
    port = free_port()
    server = Server(serve_command(workload.repo, config, port, extra), work / f"{mode}.log", env)
    console.print(" ".join(server.command), style="dim")
    server.start()
    return server, port


def wait_and_warm(
    servers: dict[str, tuple[Server, int]],
    workload: Workload,
    label: str,
    warm_s: float = 2,
    concurrency: int = 16,
) -> None:
    """Each gateway ready, answering right, and warmed up with ``warm_s`` of load."""
    for mode, (server, port) in servers.items():
        took = server.wait_ready()
        retry(
            lambda port=port: check_http(port, workload.x, workload.expected), f"{mode} HTTP check"
        )
        console.print(f"{label} {mode}: ready after {took:.1f} s")
        with contextlib.suppress(Exception):  # warm-up
            run_hey(f"http://127.0.0.1:{port}{INFER_PATH}", workload.body, warm_s, concurrency)


def measure_rounds(
    servers: dict[str, tuple[Server, int]],
    body: Path,
    duration: float,
    concurrency: int,
    rounds: int,
    label: str = "monitor",
) -> list[Run]:
    """``rounds`` load runs per server, alternating which goes first, with CPU per request."""
    runs: list[Run] = []
    modes = list(servers)
    for index in range(rounds):
        # Alternate which goes first, so neither always follows the other's load.
        order = modes if index % 2 == 0 else modes[::-1]
        for mode in order:
            server, port = servers[mode]
            run = Run(mode, index)
            before = read_counts(port, STATS_PATH)
            assert server.proc is not None
            cpu_before = cpu_snapshot(server.proc.pid)
            try:
                result = run_hey(
                    f"http://127.0.0.1:{port}{INFER_PATH}", body, duration, concurrency
                )
            except Exception as exc:
                run.error = str(exc)[:500]
                console.print(f"[red]{label} {mode} round {index}: {run.error}")
                runs.append(run)
                continue
            after = read_counts(port, STATS_PATH)
            cpu_after = cpu_snapshot(server.proc.pid)
            if before and after and after[0] > before[0]:
                served = after[0] - before[0]  # one row per request
                run.gateway_cpu_us = (cpu_after[0] - cpu_before[0]) / served * 1e6
                sidecar = sum(
                    spent - cpu_before[1].get(child, 0.0) for child, spent in cpu_after[1].items()
                )
                run.sidecar_cpu_us = sidecar / served * 1e6
            run.rps, run.p50_ms, run.p99_ms = result.rps, result.p50_ms, result.p99_ms
            run.requests, run.errors = result.requests, result.errors
            if before and after and after[1] > before[1]:
                run.avg_batch = (after[0] - before[0]) / (after[1] - before[1])
            console.print(
                f"round {index} {label} {mode:3}: {fmt(run.rps, 0)} req/s, "
                f"p50 {fmt(run.p50_ms)} ms, p99 {fmt(run.p99_ms)} ms, "
                f"batch {fmt(run.avg_batch, 1)}, errors {run.errors}, CPU/request: "
                f"gateway {fmt(run.gateway_cpu_us, 0)} us, "
                f"sidecar {fmt(run.sidecar_cpu_us, 0)} us"
            )
            runs.append(run)
            time.sleep(1)
    return runs


def paired_ratios(runs: list[Run], rounds: int) -> list[float]:
    """on/off req/s of each round (the two ran back to back)."""
    return [
        on_run.rps / off_run.rps
        for index in range(rounds)
        for off_run in runs
        for on_run in runs
        if off_run.round == on_run.round == index
        and (off_run.mode, on_run.mode) == ("off", "on")
        and off_run.rps
        and on_run.rps
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternating")
    parser.add_argument("--sink", action="store_true", help="a counting sink, not the sidecar")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--run-sink", nargs=2, metavar=("SOCKET", "STATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_sink:
        return run_sink(Path(args.run_sink[0]), Path(args.run_sink[1]))

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
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

    off, on = summarize(runs, "off"), summarize(runs, "on")
    ratio = on.rps_mean / off.rps_mean if on.rps_mean and off.rps_mean else None
    verdict = "PASS" if ratio is not None and ratio >= TARGET_RATIO else "FAIL"
    console.print(
        f"HTTP c{args.concurrency}: monitor off {fmt(off.rps_mean, 0)} req/s "
        f"(p99 {fmt(off.p99_ms_mean)} ms), on {fmt(on.rps_mean, 0)} req/s "
        f"(p99 {fmt(on.p99_ms_mean)} ms)"
    )
    pairs = paired_ratios(runs, args.rounds)
    paired_median = statistics.median(pairs) if pairs else None
    console.print(
        f"per-round on/off: {', '.join(f'{p:.3f}' for p in pairs)} "
        f"(median {fmt(paired_median, 3)}); CPU per request: gateway "
        f"{fmt(off.gateway_cpu_us_mean, 0)} us off, {fmt(on.gateway_cpu_us_mean, 0)} us on, "
        f"sidecar {fmt(on.sidecar_cpu_us_mean, 0)} us"
    )
    colour = "green" if verdict == "PASS" else "red"
    console.print(
        f"[{colour}]{verdict}[/{colour}] monitor on keeps >= {TARGET_RATIO:.0%} of req/s: "
        f"ratio {fmt(ratio, 3)}"
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
    path = write_results(
        "monitor-cost",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "model": "MLP 256-1024-1024-10, FP32, one row per request",
                "receiver": receiver,
                "http_load": "hey -z D -c C, alternating off/on",
                "monitor_defaults": "sample_rows_per_s 10000, queue 65536, flush every 50 ms",
            },
            "runs": [asdict(r) for r in runs],
            "summary": {"off": asdict(off), "on": asdict(on)},
            "ratio": ratio,
            "paired_ratios": pairs,
            "paired_ratio_median": paired_median,
            "sink": sink_stats,
            "sidecar": sidecar_stats,
            "target": {"name": f"on/off req/s >= {TARGET_RATIO}", "verdict": verdict},
        },
    )
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
