"""Autoscaling from the gateway's queue under a 3x step in load, on a real Ray backend.

``python -m bench.autoscale`` serves a model heavy enough that its replicas, not the
gateway, set the capacity (MLP 256 -> 4096 -> 4096 -> 10, one ONNX Runtime thread a
replica), with ``autoscaling: {min_replicas: 1, max_replicas: 2}``. It measures what one
and two fixed replicas serve (hey, 32 clients), puts the step's rate between the two
(``--step-at``), then sends an open loop (``bench.loadgen open``) of a third of it for
``--before`` s, the step's rate for ``--step`` s, and a third again for ``--after`` s,
reading the gateway's replica count twice a second.

Targets: at most 10 s with a per-second p99 above ``--target-p99-ms`` after the step; no
oscillation (at most one scale change per direction per phase); back to one replica after
the load drops. It prints a table, writes JSON and a PNG (per-second p99 and replicas) to
bench/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    RESULTS_DIR,
    Server,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    free_port,
    infer_json,
    machine_info,
    new_table,
    print_verdict,
    run_hey,
    running,
    save_results,
    serve_command,
)
from bench.models import INPUT_DIM, MODEL_NAME, build_repository

LAYERS = (INPUT_DIM, 4096, 4096, 10)
SCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_queue_delay_ms": 10.0,
    "window_s": 5.0,
    "scale_up_cooldown_s": 10.0,
    "scale_down_delay_s": 20.0,
}
INFER = f"/v2/models/{MODEL_NAME}/infer"


def replicas(port: int) -> int | None:
    """The gateway's ``turnout_replicas`` for the model, None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("turnout_replicas{") and f'model="{MODEL_NAME}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return None


class ReplicaWatch:
    """Reads the replica count every ``interval`` s on a thread: (seconds, count) pairs."""

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def start(self, at: float) -> None:
        self.started = at
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            count = replicas(self.port)
            if count is not None:
                self.samples.append((time.perf_counter() - self.started, count))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def changes(samples: list[tuple[float, int]], start: float, end: float) -> list[dict[str, Any]]:
    """Changes of the replica count seen between ``start`` and ``end`` seconds."""
    seen: list[dict[str, Any]] = []
    previous = None
    for at, count in samples:
        if previous is not None and count != previous and start <= at < end:
            seen.append({"t": round(at, 1), "from": previous, "to": count})
        previous = count
    return seen


def analyse(
    series: list[dict[str, Any]],
    samples: list[tuple[float, int]],
    phases: tuple[float, float, float],
    target_p99_ms: float,
) -> dict[str, Any]:
    """Seconds above the latency target after the step, scale changes per phase, and the
    replicas at the end."""
    before, step, after = phases
    step_end = before + step

    def above(second: dict[str, Any]) -> bool:
        if second["sent"] and second["ok"] < 0.99 * second["sent"]:
            return True
        return second["p99_ms"] is not None and second["p99_ms"] > target_p99_ms

    above_after_step = [s["t"] for s in series if before <= s["t"] < step_end and above(s)]
    up = changes(samples, before, step_end)
    down = changes(samples, step_end, step_end + after)
    scaled_up_at = next((c["t"] - before for c in up if c["to"] > c["from"]), None)
    scaled_down_at = next((c["t"] - step_end for c in down if c["to"] < c["from"]), None)
    return {
        "seconds_above_target_after_step": len(above_after_step),
        "above_target_seconds": above_after_step,
        "changes_in_step": up,
        "changes_after_drop": down,
        "changes_before_step": changes(samples, 0.0, before),
        "scaled_up_after_s": scaled_up_at,
        "scaled_down_after_s": scaled_down_at,
        "replicas_at_end": samples[-1][1] if samples else None,
    }


def verdicts(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    above = result["seconds_above_target_after_step"]
    step_dirs = [c["to"] > c["from"] for c in result["changes_in_step"]]
    drop_dirs = [c["to"] > c["from"] for c in result["changes_after_drop"]]
    once = all(
        sum(1 for d in dirs if d == up) <= 1 for dirs in (step_dirs, drop_dirs) for up in (1, 0)
    )
    return [
        ("<= 10 s above the latency target after the step", above <= 10, f"{above} s"),
        (
            "no oscillation (<= 1 change per direction per phase)",
            once and not result["changes_before_step"],
            f"step {result['changes_in_step']}, drop {result['changes_after_drop']}",
        ),
        (
            "back to 1 replica after the load drops",
            result["replicas_at_end"] == 1,
            f"{result['replicas_at_end']} at the end",
        ),
    ]


def plot(
    series: list[dict[str, Any]], samples: list[tuple[float, int]], path: Path, **info: Any
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, latency = plt.subplots(figsize=(9, 4))
    latency.plot(
        [s["t"] for s in series], [s["p99_ms"] for s in series], color="tab:blue", label="p99"
    )
    latency.axhline(info["target_p99_ms"], color="tab:blue", linestyle=":", label="target")
    latency.set_xlabel("seconds")
    latency.set_ylabel("p99 latency per second (ms)", color="tab:blue")
    latency.set_yscale("log")
    count = latency.twinx()
    count.step([t for t, _ in samples], [c for _, c in samples], color="tab:red", where="post")
    count.set_ylabel("replicas", color="tab:red")
    count.set_ylim(0, max([c for _, c in samples] + [2]) + 1)
    for at in info["phase_edges"]:
        latency.axvline(at, color="grey", linewidth=0.8)
    latency.set_title(info["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def gateway(repo: Path, log: Path) -> tuple[Server, int]:
    http, grpc = free_port(), free_port()
    command = serve_command(
        repo, "ray", "--host", "127.0.0.1", "--http-port", str(http),
        "--grpc-port", str(grpc), "--no-monitor",
    )  # fmt: skip
    return Server(command, log), http


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--step-at", type=float, default=0.5,
        help="the step's rate between one replica's capacity (1) and two's (0)",
    )  # fmt: skip
    parser.add_argument("--before", type=float, default=30.0)
    parser.add_argument("--step", type=float, default=60.0)
    parser.add_argument("--after", type=float, default=60.0)
    parser.add_argument("--target-p99-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="turnout-autoscale-") as tmp:
        work = Path(tmp)
        body = work / "body.json"
        body.write_bytes(infer_json(np.ones((1, INPUT_DIM), np.float32)))
        # What one and two replicas serve, on gateways of their own that do not scale: the
        # step goes between the two, so one replica cannot serve it and two can.
        capacity = {}
        for count in (1, 2):
            fixed = build_repository(
                work / f"fixed-{count}", max_batch_size=32, layers=LAYERS, num_replicas=count
            )
            server, http = gateway(fixed, work / f"fixed-{count}.log")
            with running(server):
                server.wait_ready()
                url = f"http://127.0.0.1:{http}{INFER}"
                run_hey(url, body, 3, 32)  # warm-up
                capacity[count] = run_hey(url, body, 8, 32).rps
        step_rate = round(args.step_at * capacity[1] + (1 - args.step_at) * capacity[2])
        base = round(step_rate / 3)
        console.print(
            f"one replica: {capacity[1]:.0f} req/s, two: {capacity[2]:.0f}; "
            f"base {base}/s, step {3 * base}/s"
        )
        if capacity[2] < 1.15 * capacity[1]:
            console.print("[yellow]two replicas serve barely more than one on this machine")

        scaled = build_repository(
            work / "scaled", max_batch_size=32, layers=LAYERS, autoscaling=SCALING
        )
        server, http = gateway(scaled, work / "scaled.log")
        schedule = f"{base}:{args.before},{3 * base}:{args.step},{base}:{args.after}"
        with running(server):
            server.wait_ready()
            watch = ReplicaWatch(http)
            generator = [
                sys.executable, "-m", "bench.loadgen", "open", "--address", f"127.0.0.1:{http}",
                "--path", INFER, "--body", str(body), "--schedule", schedule, "--series",
            ]  # fmt: skip
            watch.start(time.perf_counter())
            done = subprocess.run(generator, capture_output=True, text=True, check=False)
            watch.stop()
            if done.returncode != 0:
                console.print(f"[red]load generator failed: {done.stderr[-800:]}")
                return 1
            load = json.loads(done.stdout)
    phases = (args.before, args.step, args.after)
    result = analyse(load["series"], watch.samples, phases, args.target_p99_ms)
    table = new_table(
        "Autoscaling: a 3x step in load (Ray backend, 1..2 replicas)",
        ["phase", "rate /s", "ok", "p99 ms (worst second)", "replica changes"],
        left={"phase", "replica changes"},
    )
    edges = [0.0, args.before, args.before + args.step, sum(phases)]
    for name, rate, lo, hi in zip(
        ("before", "step", "after"), (base, 3 * base, base), edges, edges[1:], strict=False
    ):
        seconds = [s for s in load["series"] if lo <= s["t"] < hi]
        worst = max((s["p99_ms"] or 0.0 for s in seconds), default=None)
        ok = sum(s["ok"] for s in seconds)
        sent = sum(s["sent"] for s in seconds)
        seen = changes(watch.samples, lo, hi)
        table.add_row(
            name, str(rate), f"{ok}/{sent}", fmt(worst),
            ", ".join(f"{c['from']}->{c['to']} at {c['t']} s" for c in seen) or "-",
        )  # fmt: skip
    console.print(table)
    checks = verdicts(result)
    for name, ok, detail in checks:
        print_verdict("PASS" if ok else "FAIL", f"{name}: {detail}")
    payload = {
        "machine": machine_info(),
        "config": {"scaling": SCALING, "layers": LAYERS, "max_batch_size": 32},
        "capacity_rps": {"one_replica": capacity[1], "two_replicas": capacity[2]},
        "schedule": schedule,
        "target_p99_ms": args.target_p99_ms,
        "result": result,
        "verdicts": [{"target": n, "pass": ok, "detail": d} for n, ok, d in checks],
        "series": load["series"],
        "replicas": watch.samples,
        "statuses": load["statuses"],
    }
    path = save_results("autoscale", RESULTS_DIR, payload)
    plot(
        load["series"], watch.samples, path.with_suffix(".png"),
        target_p99_ms=args.target_p99_ms, phase_edges=edges[1:-1],
        title=f"3x step: {base} -> {3 * base} -> {base} req/s",
    )  # fmt: skip
    console.print(f"plot: {path.with_suffix('.png')}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
