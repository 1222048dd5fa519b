"""Faults and overload against a real ``turnout serve``: what fails, and how soon it recovers.

``python -m bench.chaos`` runs each case on a gateway of its own and prints one table
(requests sent, succeeded, failed, failures that were not a 429/503 refusal, recovery time),
saving JSON to bench/results/chaos-<stamp>.json:

- ``overload-closed-http``: a model with ``max_queue_size: 8, max_batch_size: 4``; its
  capacity is what 8 closed-loop clients get (hey -c 8), then 256 closed-loop clients
  (hey -c 256): goodput vs capacity, timeouts. Then the same crowd again while two probes
  (a new connection each time, and kept-alive connections that honour Retry-After) time
  their answers: refusal p99. The probes' 200 new connections a second cost the crowd
  about a tenth of its goodput, so goodput is the crowd's without them (with them:
  ``goodput_ratio_probed``). A control probe (a new connection to a route answering 405
  at once) shows how much of a new connection's tail is the saturated machine's rather
  than the refusal's;
- ``overload-open-http``: requests arriving at twice that capacity whatever the server
  answers (``bench.loadgen open``, kept-alive connections, a new one when none is idle);
- ``overload-closed-grpc`` / ``overload-open-grpc``: the same over gRPC (h2load, one stream
  per connection, closed-loop; ``bench.loadgen grpc-open`` for the open loop, 16
  connections, calls evenly spaced as concurrent streams). h2load does not read gRPC
  statuses, so its successes are the model's own inference count, and probes give the codes;
- ``replica-kill-ray``: the Ray backend with 2 replicas under 8 clients; one replica process
  gets SIGKILL: failed requests (0 is the target) and the seconds until Ray runs 2 again;
- ``sidecar-kill``: the monitor sidecar gets SIGKILL under load: failed requests, and the
  seconds until the restarted sidecar has applied records again;
- ``gateway-kill``: a canary policy and a running rollout, then SIGKILL of the gateway and
  a restart on the same state dir: policy and rollout state compared, seconds to ready;
- ``slow-clients``: 300 idle and 200 half-sent connections held open while probes run:
  the probes' p99 (target < 100 ms) and whether the server closed the half-sent ones;
- ``full-disk``: the state dir on a full 1 MiB tmpfs (needs root to mount; skipped
  otherwise): a policy change must be refused with a clear 507 while serving goes on.

The overload cases run ``--rounds`` rounds (6) per protocol of ``--phase`` seconds (4) per
load phase, each measuring the capacity right before its crowd and open loop (the speed of
this shared machine drifts by a fifth within a minute, so a ratio compares phases seconds
apart); a row's ratio is the rounds' median, and goodput is the model's own count of
inferences in the middle of a phase (``steady_rate``), capacity, crowd and open loop
alike. ``--pin`` puts the gateway on one core and the load generators on the others
(``taskset``), as if they ran on separate machines; by default they share every core.

One case at a time with ``--case``; ``--duration`` sets the load phases' length;
``--protocol http`` (or ``grpc``) runs only that protocol's overload rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    RESULTS_DIR,
    AdminClient,
    LoadResult,
    Server,
    admin_token,
    argument_parser,
    check_http,
    children,
    console,
    exit_on_sigterm,
    fmt,
    free_port,
    gateway_config,
    hey_command,
    hey_result,
    hey_start,
    infer_json,
    machine_info,
    new_table,
    parse_hey,
    read_counts,
    retry,
    run_hey,
    running,
    save_results,
    serve_command,
    sidecar_metrics,
    tool_version,
)
from bench.models import INPUT_DIM, build_repository, build_rollout_repository
from bench.serving import grpc_body

OVERLOADED: dict[str, Any] = {"max_batch_size": 4, "max_queue_size": 8}
STATS = "/v2/models/mlp/stats"
INFER = "/v2/models/mlp/infer"

Row = dict[str, Any]


class Workspace:
    def __init__(
        self,
        root: Path,
        duration: float,
        rounds: int = 6,
        pin: bool = False,
        phase: float = 4.0,
        protocols: tuple[str, ...] = ("http", "grpc"),
    ) -> None:
        self.root = root
        self.protocols = protocols  # the overload cases' protocols
        self.duration = duration
        self.rounds = rounds
        self.phase = phase
        self.pin = pin
        x = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
        self.x = x
        self.json_body = root / "body.json"
        self.json_body.write_bytes(infer_json(x))
        self.grpc_body = root / "body.grpc"
        self.grpc_body.write_bytes(grpc_body(x))

    def gateway(
        self,
        label: str,
        repo: Path,
        backend: str = "local",
        settings: dict[str, Any] | None = None,
        state_dir: Path | None = None,
        monitor: bool = False,
    ) -> tuple[Server, int, int, Path]:
        extra = dict(settings or {})
        if state_dir is not None:
            extra["state_dir"] = str(state_dir)
        config, state = gateway_config(self.root, label, **extra)
        if state_dir is not None:
            state = state_dir
        http, grpc = free_port(), free_port()
        options = ["--host", "127.0.0.1", "--config", str(config)]
        options += ["--http-port", str(http), "--grpc-port", str(grpc)]
        if not monitor:
            options.append("--no-monitor")
        log = self.root / f"{label}.log"
        return Server(serve_command(repo, backend, *options), log), http, grpc, state


def loadgen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def finished(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=300)
    document: dict[str, Any] = json.loads(out)
    return document


def p99(document: dict[str, Any], *outcomes: str) -> float | None:
    values = [document["latency"][o]["p99_ms"] for o in outcomes if o in document["latency"]]
    return max(values) if values else None


def h2load(url: str, body: Path, duration: float, *shape: str) -> dict[str, int]:
    return h2load_counts(h2load_start(url, body, duration, *shape), duration)


def h2load_start(url: str, body: Path, duration: float, *shape: str) -> subprocess.Popen[str]:
    command = ["h2load", "-D", f"{duration:g}", *shape, "-t", "1", "-d", str(body)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers", url]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def h2load_counts(process: subprocess.Popen[str], duration: float) -> dict[str, int]:
    out, err = process.communicate(timeout=duration + 120)
    counts = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if counts is None:
        raise RuntimeError(f"unexpected h2load output: {out[-500:]}{err}")
    names = ("done", "succeeded", "failed", "errored", "timeout")
    return dict(zip(names, (int(g) for g in counts.groups()), strict=True))


def steady_rate(port: int, duration: float, settle: float = 1.0) -> float:
    """Inferences per second the gateway served in the middle of a load phase of
    ``duration`` seconds that has just started: from ``settle`` seconds in to ``settle``
    before its end, by the model's own count. A load tool's rate divides by its whole run,
    start-up and drain included: after ``-z``, hey waits for the requests still in flight,
    and a crowd's refused connections are held for up to ``overload_hold_ms``, so half a
    second of near-idle drain would count against the crowd and not against capacity."""
    started = time.monotonic()
    time.sleep(settle)
    first, first_at = served(port), time.monotonic()
    time.sleep(max(0.0, started + duration - settle - time.monotonic()))
    last, last_at = served(port), time.monotonic()
    return float(last - first) / (last_at - first_at)


def served(port: int) -> int:
    counts = read_counts(port, STATS)
    return counts[0] if counts else 0


def under_load(case: str, result: LoadResult, **values: Any) -> Row:
    """A fault case's row from the hey load it ran under: every failure counts (none of
    these cases should refuse anything)."""
    failed = result.errors
    return row(
        case, sent=result.requests, ok=result.requests - failed, failed=failed,
        unexpected=failed, notes=result.notes, **values,
    )  # fmt: skip


def row(case: str, **values: Any) -> Row:
    base: Row = {"case": case, "sent": None, "ok": None, "failed": None, "unexpected": None}
    base.update(values)
    return base


# ---------------------------------------------------------------------------- overload cases


def overload(ws: Workspace) -> list[Row]:
    """``ws.rounds`` rounds per protocol, each measuring the capacity, then the closed-loop
    crowd, then the open loop, so each round's ratios compare phases a few seconds apart;
    a row gives the rounds' median ratio (this machine's speed drifts by a fifth between
    minutes) and keeps every round in ``rounds``."""
    repo = build_repository(ws.root / "overload-models", **OVERLOADED)
    server, http, grpc, _ = ws.gateway("overload", repo)
    everywhere = os.sched_getaffinity(0)
    if ws.pin and len(everywhere) >= 2:
        # The gateway on one core, this process and every load generator (its children)
        # on the rest: the load cannot take the gateway's core, as on separate machines.
        gateway_core = min(everywhere)
        server.command = ["taskset", "-c", str(gateway_core), *server.command]
        os.sched_setaffinity(0, everywhere - {gateway_core})
    try:
        return overload_rounds(ws, server, http, grpc, repo)
    finally:
        os.sched_setaffinity(0, everywhere)


def overload_rounds(ws: Workspace, server: Server, http: int, grpc: int, repo: Path) -> list[Row]:
    with running(server):
        server.wait_ready()
        retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check")
        url = f"http://127.0.0.1:{http}{INFER}"
        rows: list[Row] = []
        if "http" in ws.protocols:
            run_hey(url, ws.json_body, 2, 8)  # warm-up
            http_rounds = [overload_http_round(ws, http) for _ in range(ws.rounds)]
            rows += [merged_rounds([closed for closed, _ in http_rounds])]
            rows += [merged_rounds([open_ for _, open_ in http_rounds])]
        if "grpc" in ws.protocols:
            grpc_url = f"http://127.0.0.1:{grpc}/inference.GRPCInferenceService/ModelInfer"
            h2load(grpc_url, ws.grpc_body, 2, "-c", "8", "-m", "1")  # warm-up
            grpc_rounds = [overload_grpc_round(ws, http, grpc) for _ in range(ws.rounds)]
            rows += [merged_rounds([closed for closed, _ in grpc_rounds])]
            rows += [merged_rounds([open_ for _, open_ in grpc_rounds])]
    return rows


def merged_rounds(rounds: list[Row]) -> Row:
    """One row for several rounds of a case: counts summed, ratios the rounds' medians, and
    a probe's p99 over every round's samples pooled (a round's few hundred are its tail's
    handful)."""
    summed = ("sent", "ok", "failed", "unexpected", "timeouts")
    medians = (
        "goodput_rps", "capacity_rps", "goodput_ratio", "goodput_ratio_hey",
        "goodput_ratio_probed", "goodput_ratio_generator", "arrival_rps", "refusal_p99_ms",
    )  # fmt: skip
    values: dict[str, Any] = {k: sum(r[k] for r in rounds) for k in summed}
    for key in medians:
        present = [r[key] for r in rounds if r.get(key) is not None]
        if present:
            values[key] = float(np.median(present))
    refused = "RESOURCE_EXHAUSTED" if "grpc" in rounds[0]["case"] else "429"
    for kind in ("new", "kept"):
        documents = [r["probes"][kind] for r in rounds if "probes" in r]
        if documents:
            values[f"refusal_p99_ms_{kind}"] = pooled_p99(documents, refused)
            steady = [
                after(r["probes"][kind], r["crowd_at"] + ONSET_S) for r in rounds if "probes" in r
            ]
            values[f"refusal_p99_ms_{kind}_steady"] = pooled_p99(steady, refused)
            values[f"probe_p99_ms_{kind}"] = pooled_p99(documents)
            values[f"refusals_timed_{kind}"] = sum(d["statuses"].get(refused, 0) for d in documents)
    controls = [r["probes"]["control"] for r in rounds if "control" in r.get("probes", {})]
    if controls:
        values["control_p99_ms_new"] = pooled_p99(controls)
    values["goodput_ratios"] = [r["goodput_ratio"] for r in rounds]
    values["rounds"] = rounds
    return row(rounds[0]["case"], **values)


ONSET_S = 0.5
"""The crowd's first half second: before the loop is seen overrun (a 100 ms window) and
refused connections are held, every turn is long, and each kept-alive probe client is
refused there once before it waits its Retry-After, so 16 of a round's ~45 kept refusals
fall in it."""


def after(document: dict[str, Any], since: float) -> dict[str, Any]:
    """A probe document with only the samples sent at ``since`` or later."""
    kept: dict[str, list[float]] = {}
    for outcome, latencies in document["samples_ms"].items():
        times = document["sent_at"][outcome]
        kept[outcome] = [v for v, t in zip(latencies, times, strict=True) if t >= since]
    return {**document, "samples_ms": kept}


def pooled_p99(documents: list[dict[str, Any]], *outcomes: str) -> float | None:
    """The p99 of probes' latencies across documents, of ``outcomes`` (default: all)."""
    pooled = [
        v for d in documents for o, vs in d["samples_ms"].items()
        if not outcomes or o in outcomes for v in vs
    ]  # fmt: skip
    return float(np.percentile(pooled, 99)) if pooled else None


PROBES = {
    # A new connection every 10 ms (one client each time), and 16 kept-alive clients every
    # 50 ms that wait the Retry-After they are sent: a few hundred refusals of each kind per
    # round, so a p99 is not a round's one or two slowest samples; together about 1% of
    # the crowd's requests.
    "new": ("--connection", "new", "--interval", "0.01"),
    "kept": ("--connection", "kept", "--clients", "16", "--interval", "0.05"),
}


def probes_ok_rate(*documents: dict[str, Any], ok: str, seconds: float) -> float:
    return float(sum(d["statuses"].get(ok, 0) for d in documents)) / seconds


def http_capacity(ws: Workspace, http: int) -> tuple[float, float]:
    """What 8 closed-loop HTTP clients get in a phase: by the model's count in its middle,
    and by hey's own rate."""
    load = hey_start(f"http://127.0.0.1:{http}{INFER}", ws.json_body, ws.phase, 8)
    capacity = steady_rate(http, ws.phase)
    return capacity, hey_result(load, ws.phase).rps


def http_open_loop(ws: Workspace, http: int, rate: float) -> tuple[float, dict[str, Any]]:
    """The HTTP open loop at ``rate`` for a phase: the model's goodput in its middle, and
    the generator's document."""
    generator = loadgen("open", "--address", f"127.0.0.1:{http}", "--body", str(ws.json_body),
                        "--duration", str(ws.phase), "--rate", f"{rate:.0f}")  # fmt: skip
    goodput = steady_rate(http, ws.phase)
    return goodput, finished(generator)


def overload_http_round(ws: Workspace, http: int) -> tuple[Row, Row]:
    d = ws.phase
    url = f"http://127.0.0.1:{http}{INFER}"
    address = f"127.0.0.1:{http}"
    capacity, capacity_hey = http_capacity(ws, http)
    console.print(f"capacity (8 closed-loop HTTP clients): {capacity:.0f} req/s")
    time.sleep(0.5)
    load = hey_start(url, ws.json_body, d, 256)
    goodput = steady_rate(http, d)
    crowd = hey_result(load, d)
    time.sleep(3)  # the crowd's holds end before the next phase
    # The same crowd again, now timed by the probes: a new connection each time, one
    # kept-alive connection, and the control (a new connection each time to a route that
    # answers 405 at once: its tail is a new connection's, accepting and setting it up
    # under the crowd, not a refusal's).
    probe_args = ("--address", address, "--body", str(ws.json_body), "--duration", str(d - 1))
    probes = [loadgen("probe", *probe_args, *PROBES[kind]) for kind in ("new", "kept")]
    control_probe = loadgen("probe", *probe_args, *PROBES["new"], "--path", "/v2/health/ready")
    time.sleep(0.5)
    crowd_at = time.perf_counter()
    load = hey_start(url, ws.json_body, d, 256)
    probed_goodput = steady_rate(http, d)
    timed = hey_result(load, d)
    new, kept = (finished(p) for p in probes)
    control = finished(control_probe)
    probed_goodput -= probes_ok_rate(new, kept, ok="200", seconds=d - 1)
    notes = [*crowd.notes, *timed.notes]
    timeouts = sum(int(n.split(" x ")[0]) for n in notes if "HTTP" not in n)
    refused = sum(int(n.split(" x ")[0]) for n in crowd.notes if "HTTP 429" in n)
    refused_timed = sum(int(n.split(" x ")[0]) for n in timed.notes if "HTTP 429" in n)
    closed = row(
        "overload-closed-http",
        sent=crowd.requests,
        ok=crowd.requests - crowd.errors,
        failed=crowd.errors,
        unexpected=crowd.errors - refused + timed.errors - refused_timed,
        goodput_rps=goodput,
        capacity_rps=capacity,
        goodput_ratio=goodput / capacity,
        goodput_ratio_hey=crowd.rps / capacity_hey,
        goodput_ratio_probed=probed_goodput / capacity,
        refusal_p99_ms_new=p99(new, "429"),
        refusal_p99_ms_kept=p99(kept, "429"),
        probe_p99_ms_new=p99(new, *new["latency"]),
        probe_p99_ms_kept=p99(kept, *kept["latency"]),
        probes={"new": new, "kept": kept, "control": control},
        crowd_at=crowd_at,
        control_p99_ms_new=p99(control, *control["latency"]),
        timeouts=timeouts,
    )
    time.sleep(3)
    rate = 2 * capacity
    goodput, open_loop = http_open_loop(ws, http, rate)
    opened = open_loop_row("overload-open-http", open_loop, "200", "429", capacity, rate, goodput)
    time.sleep(1)
    return closed, opened


def overload_grpc_round(ws: Workspace, http: int, grpc: int) -> tuple[Row, Row]:
    d = ws.phase
    grpc_url = f"http://127.0.0.1:{grpc}/inference.GRPCInferenceService/ModelInfer"
    load = h2load_start(grpc_url, ws.grpc_body, d, "-c", "8", "-m", "1")
    capacity = steady_rate(http, d)
    base = h2load_counts(load, d)
    console.print(f"capacity (8 closed-loop gRPC clients): {capacity:.0f} req/s")
    time.sleep(0.5)
    before = served(http)
    load = h2load_start(grpc_url, ws.grpc_body, d, "-c", "256", "-m", "1")
    goodput = steady_rate(http, d)
    crowd = h2load_counts(load, d)
    ok = min(served(http) - before, crowd["done"])
    time.sleep(3)
    # The same crowd again, timed by the probes.
    probe_args = ("--address", f"127.0.0.1:{grpc}", "--duration", str(d - 1))
    probes = [loadgen("grpc-probe", *probe_args, *PROBES[kind]) for kind in ("new", "kept")]
    time.sleep(0.5)
    crowd_at = time.perf_counter()
    load = h2load_start(grpc_url, ws.grpc_body, d, "-c", "256", "-m", "1")
    probed_goodput = steady_rate(http, d)
    timed = h2load_counts(load, d)
    new, kept = (finished(p) for p in probes)
    probed_goodput -= probes_ok_rate(new, kept, ok="OK", seconds=d - 1)
    closed = row(
        "overload-closed-grpc",
        sent=crowd["done"],
        ok=ok,
        failed=crowd["done"] - ok,
        unexpected=sum(c["errored"] + c["timeout"] for c in (crowd, timed)),
        goodput_rps=goodput,
        capacity_rps=capacity,
        goodput_ratio=goodput / capacity,
        goodput_ratio_probed=probed_goodput / capacity,
        refusal_p99_ms_new=p99(new, "RESOURCE_EXHAUSTED"),
        refusal_p99_ms_kept=p99(kept, "RESOURCE_EXHAUSTED"),
        probe_p99_ms_new=p99(new, *new["latency"]),
        probe_p99_ms_kept=p99(kept, *kept["latency"]),
        probes={"new": new, "kept": kept},
        crowd_at=crowd_at,
        timeouts=crowd["timeout"] + timed["timeout"],
        capacity_run=base,
    )
    time.sleep(3)
    rate = 2 * capacity
    generator = loadgen("grpc-open", "--address", f"127.0.0.1:{grpc}", "--body",
                        str(ws.grpc_body), "--duration", str(d), "--rate", f"{rate:.0f}",
                        "--connections", "16")  # fmt: skip
    goodput = steady_rate(http, d)
    open_g = finished(generator)
    opened = open_loop_row(
        "overload-open-grpc", open_g, "OK", "RESOURCE_EXHAUSTED", capacity, rate, goodput
    )
    time.sleep(1)
    return closed, opened


def open_loop_row(
    case: str, document: dict[str, Any], ok_status: str, refused_status: str,
    capacity: float, rate: float, goodput: float,
) -> Row:  # fmt: skip
    """A row from a ``bench.loadgen`` open loop's document (its outcomes by status) and the
    goodput the model counted in the middle of the phase.

    The generator's own successes over its sending time are kept as
    ``goodput_ratio_generator`` but do not judge: a gateway that holds refused connections
    makes the generator wait for a free one, and the requests queued that way are answered
    for seconds after the sending stops (up to 3.9 s in ``chaos-20261203T210600Z.json``),
    so that quotient counted about two phases' answers over one."""
    statuses = document["statuses"]
    ok = statuses.get(ok_status, 0)
    sent = sum(statuses.values())
    return row(
        case,
        sent=sent,
        ok=ok,
        failed=sent - ok,
        unexpected=sent - ok - statuses.get(refused_status, 0),
        goodput_rps=goodput,
        capacity_rps=capacity,
        goodput_ratio=goodput / capacity,
        goodput_ratio_generator=ok / document["duration_s"] / capacity,
        arrival_rps=rate,
        refusal_p99_ms=p99(document, refused_status),
        timeouts=statuses.get("timeout", 0),
        open_loop=document,
    )


def expected_mlp(repo: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"))
    result: np.ndarray[Any, Any] = session.run(None, {"input": x})[0]
    return result


# ------------------------------------------------------------------------------- kill cases


class Background:
    """hey in the background, so a fault can be injected while it loads the server."""

    def __init__(self, url: str, body: Path, duration: float, clients: int) -> None:
        command = hey_command(url, body, duration, clients)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    def result(self) -> LoadResult:
        out, _ = self.process.communicate(timeout=300)
        return parse_hey(out)


def processes_named(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
    return found


def wait_until(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` holds, or None if it never did within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - started
        time.sleep(0.1)
    return None


def replica_kill(ws: Workspace) -> list[Row]:
    repo = build_repository(ws.root / "ray-models", num_replicas=2, max_batch_size=8)
    server, http, _, _ = ws.gateway("ray", repo, backend="ray")
    with running(server):
        server.wait_ready(timeout=300)
        retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check", 60)
        replicas = sorted(processes_named("ServeReplica:turnout-mlp-v1"))
        if len(replicas) < 2:
            return [row("replica-kill-ray", note=f"found {len(replicas)} replica processes")]
        load = Background(f"http://127.0.0.1:{http}{INFER}", ws.json_body, 3 * ws.duration, 8)
        time.sleep(ws.duration)
        victim = replicas[0]
        os.kill(victim, signal.SIGKILL)

        def two_again() -> bool:
            alive = set(processes_named("ServeReplica:turnout-mlp-v1")) - {victim}
            return len(alive) >= 2

        recovery = wait_until(two_again, 120)
        result = load.result()
    return [under_load("replica-kill-ray", result, recovery_s=recovery)]


def sidecar_kill(ws: Workspace) -> list[Row]:
    repo = build_repository(ws.root / "sidecar-models")
    metrics_port = free_port()
    settings = {"monitor_http": f"http://127.0.0.1:{metrics_port}"}
    server, http, _, _ = ws.gateway("sidecar", repo, settings=settings, monitor=True)
    server.env = {"TURNOUT_MONITOR_METRICS_PORT": str(metrics_port)}
    with running(server):
        server.wait_ready()
        retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check")
        assert server.proc is not None
        gateway_pid = server.proc.pid

        def applied() -> int:
            return applied_on(metrics_port)

        def sidecar_pid() -> int | None:
            pids = [p for p in children(gateway_pid) if p in processes_named("monitor")]
            return pids[0] if pids else None

        load = Background(f"http://127.0.0.1:{http}{INFER}", ws.json_body, 3 * ws.duration, 8)
        if wait_until(lambda: sidecar_pid() is not None and applied() > 0, ws.duration) is None:
            load.result()
            return [row("sidecar-kill", note="the sidecar never applied records")]
        time.sleep(ws.duration / 2)
        victim = sidecar_pid()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)

        def new_one_applies() -> bool:
            pid = sidecar_pid()
            return pid is not None and pid != victim and applied() > 0

        recovery = wait_until(new_one_applies, 60)
        result = load.result()
    return [under_load("sidecar-kill", result, recovery_s=recovery)]


def applied_on(port: int) -> int:
    text = sidecar_metrics(port) or ""
    for line in text.splitlines():
        if line.startswith("turnout_monitor_records_total "):
            return int(float(line.split()[1]))
    return 0


def gateway_kill(ws: Workspace) -> list[Row]:
    repo = build_rollout_repository(ws.root / "kill-models")
    state = ws.root / "kill-state"
    state.mkdir()
    server, http, _, _ = ws.gateway("kill", repo, state_dir=state)

    async def policy_and_rollout(token: str) -> tuple[Any, Any]:
        admin = AdminClient(f"127.0.0.1:{http}", token, "rollout")
        try:
            traffic = await admin.status()
            status, rollout = await admin.call("GET", "rollout")
            keep = ("revision", "weights", "shadow", "rollout")
            # The rollout's own record, not the evidence gathered since (a new process's).
            state = ("phase", "stable", "canary", "step", "started", "step_started", "config")
            progress = {k: rollout.get(k) for k in state} if status == 200 else None
            return {k: traffic.get(k) for k in keep}, progress
        finally:
            await admin.close()

    async def start_canary(token: str) -> None:
        admin = AdminClient(f"127.0.0.1:{http}", token, "rollout")
        try:
            status, document = await admin.change({"op": "set", "weights": {"1": 100}})
            assert status == 200, document
            status, document = await admin.change({"op": "shadow", "version": 2, "percent": 10})
            assert status == 200, document
            body = {"canary": 2, "steps": [10, 50, 100], "step_seconds": 3600}
            status, document = await admin.call("POST", "rollout", body)
            assert status == 200, document
        finally:
            await admin.close()

    server.start()
    try:
        server.wait_ready()
        token = admin_token(state)
        asyncio.run(start_canary(token))
        before = asyncio.run(policy_and_rollout(token))
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.proc = None
        server.start()
        started = time.monotonic()
        server.wait_ready()
        ready = time.monotonic() - started
        after = asyncio.run(policy_and_rollout(token))
    finally:
        server.stop()
    same = before == after
    return [
        row(
            "gateway-kill",
            recovery_s=ready,
            state_intact=same,
            before=before,
            after=after,
            unexpected=0 if same else 1,
        )
    ]


def slow_clients(ws: Workspace) -> list[Row]:
    repo = build_repository(ws.root / "slow-models")
    server, http, _, _ = ws.gateway("slow", repo)
    address = f"127.0.0.1:{http}"
    with running(server):
        server.wait_ready()
        retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check")
        # Held past the gateway's 10 s head timeout, so its closing them shows.
        slow = loadgen("slow", "--address", address, "--idle", "300", "--partial", "200",
                       "--duration", str(max(12.0, ws.duration + 2)))  # fmt: skip
        time.sleep(1.5)
        probes = [
            loadgen("probe", "--address", address, "--body", str(ws.json_body),
                    "--duration", str(ws.duration), "--interval", "0.02", "--connection", kind)
            for kind in ("new", "kept")
        ]  # fmt: skip
        new, kept = (finished(p) for p in probes)
        held = finished(slow)
    sent = sum(new["statuses"].values()) + sum(kept["statuses"].values())
    ok = new["statuses"].get("200", 0) + kept["statuses"].get("200", 0)
    return [
        row(
            "slow-clients",
            sent=sent,
            ok=ok,
            failed=sent - ok,
            unexpected=sent - ok,
            probe_p99_ms_new=p99(new, *new["latency"]),
            probe_p99_ms_kept=p99(kept, *kept["latency"]),
            slow_connections=held,
        )
    ]


def full_disk(ws: Workspace) -> list[Row]:
    state = ws.root / "full-state"
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], capture_output=True
    )
    if mounted.returncode != 0:
        return [row("full-disk", note="skipped: cannot mount a tmpfs (needs root)")]
    try:
        repo = build_repository(ws.root / "disk-models")
        server, http, _, _ = ws.gateway("disk", repo, state_dir=state)
        with running(server):
            server.wait_ready()
            retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check")
            token = admin_token(state)
            filler = state / "filler"
            with filler.open("wb") as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()

            async def refused_change() -> tuple[int, Any]:
                admin = AdminClient(f"127.0.0.1:{http}", token, "mlp")
                try:
                    return await admin.change({"op": "set", "weights": {"1": 100}})
                finally:
                    await admin.close()

            status, document = asyncio.run(refused_change())
            load = run_hey(f"http://127.0.0.1:{http}{INFER}", ws.json_body, ws.duration, 8)
            filler.unlink()
            after, _ = asyncio.run(refused_change())
    finally:
        subprocess.run(["umount", str(state)], capture_output=True)
    return [
        row(
            "full-disk",
            sent=load.requests,
            ok=load.requests - load.errors,
            failed=load.errors,
            unexpected=load.errors + (0 if status == 507 else 1),
            refusal_status=status,
            refusal=document,
            after_space_freed_status=after,
        )
    ]


CASES: dict[str, Callable[[Workspace], list[Row]]] = {
    "overload": overload,
    "replica-kill-ray": replica_kill,
    "sidecar-kill": sidecar_kill,
    "gateway-kill": gateway_kill,
    "slow-clients": slow_clients,
    "full-disk": full_disk,
}


def print_table(rows: list[Row]) -> None:
    table = new_table(
        "chaos",
        ["case", "sent", "ok", "failed", "not 429/503", "goodput/cap", "refusal p99 ms",
         "probe p99 ms", "recovery s"],
        left={"case"},
    )  # fmt: skip
    for r in rows:
        refusal = [
            r.get(k) for k in ("refusal_p99_ms_new", "refusal_p99_ms_kept", "refusal_p99_ms")
        ]
        probe = [r.get(k) for k in ("probe_p99_ms_new", "probe_p99_ms_kept")]
        table.add_row(
            r["case"],
            *(str(r[k]) if r.get(k) is not None else "-" for k in ("sent", "ok", "failed")),
            str(r["unexpected"]) if r.get("unexpected") is not None else "-",
            fmt(r.get("goodput_ratio")),
            " / ".join(fmt(v, 1) for v in refusal if v is not None) or "-",
            " / ".join(fmt(v, 1) for v in probe if v is not None) or "-",
            fmt(r.get("recovery_s"), 1),
        )
    console.print(table)
    for r in rows:
        if r.get("note"):
            console.print(f"{r['case']}: {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--case", choices=list(CASES), action="append")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument(
        "--rounds", type=int, default=6, help="overload: rounds per protocol (medians)"
    )
    parser.add_argument(
        "--phase", type=float, default=4.0, help="overload: seconds of each load phase"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="overload: the gateway on one core, the load generators on the others",
    )
    parser.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        action="append",
        help="overload: only this protocol's rounds (default: both)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="turnout-chaos-") as tmp:
        protocols = tuple(args.protocol or ("http", "grpc"))
        ws = Workspace(Path(tmp), args.duration, args.rounds, args.pin, args.phase, protocols)
        for name in args.case or list(CASES):
            console.print(f"[bold]{name}")
            try:
                rows += CASES[name](ws)
            except Exception as exc:
                rows.append(row(name, note=f"failed to run: {exc!r}"[:500]))
            console.print(rows[-1] if rows else "")
    print_table(rows)
    payload = {
        "machine": machine_info(tools=["hey", "h2load"]),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "pinned": args.pin,
        "rows": rows,
        "hey": tool_version("hey"),
    }
    path = save_results("chaos", args.out, payload)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
