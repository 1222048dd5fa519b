"""Serving benchmark: turnout (local and Ray backends) against two hand-written baselines.

Systems, started one at a time so they never share the machine's cores:
  a  floor      uvicorn + Starlette calling ONNX Runtime inline (bench.baselines.floor)
  b  ray_naive  Ray Serve proxy + one deployment with @serve.batch (bench.baselines.ray_naive)
  c  turnout    `turnout serve --backend local`
  d  turnout    `turnout serve --backend ray` (batches over same-node sockets)
  e  turnout    the same through Serve handles only (`ray_same_node_channel: false`)

HTTP load comes from `hey`, gRPC load (turnout only) from `h2load`, one OS thread each. Usage:
  python -m bench.serving [--duration 10] [--concurrency 1 16 64] [--systems a b c d]
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import (
    INFER_PATH,
    RESULTS_DIR,
    STATS_PATH,
    LoadResult,
    Server,
    StartError,
    Workload,
    argument_parser,
    check_grpc,
    check_output,
    console,
    exit_on_sigterm,
    exit_status,
    fmt,
    free_port,
    goodput,
    infer_json,
    infer_request,
    machine_info,
    new_table,
    oip_output,
    prepare_workload,
    print_verdict,
    read_counts,
    retry,
    run_hey,
    running,
    save_results,
    serve_command,
)
from bench.models import MODEL_NAME

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
WARMUP_S = 2
LOAD_THREADS = 1
"""OS threads of each load generator (h2load ``-t``, hey's GOMAXPROCS): the same share of
the machine for both, so the gRPC and HTTP rows compare."""


def model_file(repo: Path) -> str:
    return str(repo / MODEL_NAME / "1" / "model.onnx")


Launch = Callable[[Path, int, int, Path], Server]
"""(model repository, HTTP port, gRPC port, log file) -> the system's Server, not started yet;
raises StartError when the system cannot run here."""


@dataclass(frozen=True)
class System:
    """One system under test: how it starts, which HTTP requests it takes, what it speaks."""

    key: str
    name: str
    launch: Launch
    grpc: bool = False  # OIP v2 gRPC on the gRPC port
    # Where delta(inference_count)/delta(execution_count) comes from; None: not known.
    stats_path: str | None = None
    unbatched: bool = False  # runs every request on its own: the batch is always 1
    infer_path: str = INFER_PATH
    http_body: Callable[[np.ndarray], bytes] = infer_json
    http_answer: Callable[[bytes], np.ndarray] = oip_output
    request_format: str = "OIP v2 JSON"


def baseline(module: str) -> Launch:
    """A hand-written baseline, ``python -m bench.baselines.MODULE``."""

    def launch(repo: Path, http_port: int, grpc_port: int, log: Path) -> Server:
        command = [sys.executable, "-m", f"bench.baselines.{module}", "--model", model_file(repo)]
        return Server([*command, "--port", str(http_port)], log)

    return launch


def turnout(backend: str, env: dict[str, str] | None = None) -> Launch:
    """``turnout serve --backend BACKEND``, the serving path alone, ``env`` added to its
    environment."""

    def launch(repo: Path, http_port: int, grpc_port: int, log: Path) -> Server:
        ports = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        # The monitor's cost is measured by bench/monitor_cost.py.
        options = ["--host", "127.0.0.1", *ports, "--no-monitor"]
        return Server(serve_command(repo, backend, *options), log, env=env)

    return launch


SYSTEMS = {
    "a": System("a", "floor", baseline("floor"), unbatched=True),
    "b": System("b", "ray_naive", baseline("ray_naive"), stats_path="/stats"),
    "c": System("c", "turnout local", turnout("local"), grpc=True, stats_path=STATS_PATH),
    "d": System("d", "turnout ray", turnout("ray"), grpc=True, stats_path=STATS_PATH),
    "e": System(
        "e",
        "turnout ray handles",
        turnout("ray", {"TURNOUT_RAY_SAME_NODE_CHANNEL": "false"}),
        grpc=True,
        stats_path=STATS_PATH,
    ),
}


@dataclass
class Row:
    system: str
    name: str
    protocol: str
    concurrency: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_batch: float | None = None
    requests: int = 0
    errors: int = 0
    error: str | None = None
    ratio_a: float | None = None
    ratio_b: float | None = None


def grpc_body(x: np.ndarray) -> bytes:
    """A gRPC message frame: 0 (uncompressed), 4-byte big-endian length, ModelInferRequest."""
    message: bytes = infer_request(x).SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message


# ------------------------------------------------------------------------------------- h2load


def run_h2load(url: str, body: Path, duration: float, concurrency: int, log: Path) -> LoadResult:
    # C connections with one stream each: the same shape as hey's C workers, so HTTP and gRPC
    # rows compare; against a grpc.aio ModelInfer server on 2 cores this also loaded the server
    # 10-40% more than one connection carrying C streams (-c 1 -m C).
    log.unlink(missing_ok=True)  # h2load appends to its log file
    command = ["h2load", "-D", f"{duration:g}", "-c", str(concurrency), "-m", "1"]
    command += ["-t", str(LOAD_THREADS)]
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command += ["-d", str(body), *headers, "--log-file", str(log), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 90)
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stdout[-500:]}{done.stderr}")
    return parse_h2load(done.stdout, log)


def parse_h2load(text: str, log: Path) -> LoadResult:
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    counts = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if rps is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{text[-800:]}")
    done, succeeded, failed, errored, timeouts = (int(g) for g in counts.groups())
    # h2load prints no percentiles; its log has one row per request:
    # start time (us since epoch), HTTP status, microseconds until the end of the response.
    latencies_us = []
    with log.open() as rows:
        for row in rows:
            cols = row.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                latencies_us.append(float(cols[2]))
    p50 = p99 = None
    if latencies_us:
        p50, p99 = (float(v) / 1e3 for v in np.percentile(latencies_us, [50, 99]))
    return LoadResult(
        rps=goodput(float(rps.group(1)), succeeded, done),
        p50_ms=p50,
        p99_ms=p99,
        requests=done,
        errors=failed + errored + timeouts,
    )


# ---------------------------------------------------------------------------------- one system


def check_http_answer(system: System, port: int, x: np.ndarray, expected: np.ndarray) -> None:
    """POST one request in ``system``'s HTTP format; its answer must be ONNX Runtime's."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{system.infer_path}",
        data=system.http_body(x),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        check_output(system.http_answer(response.read()), expected)


def bench_system(
    system: System, workload: Workload, work: Path, duration: float, concurrencies: list[int]
) -> list[Row]:
    """Start ``system`` alone, check its answers, load it at each concurrency, stop it."""
    http_port, grpc_port = free_port(), free_port()
    rows: list[Row] = []
    try:
        server = system.launch(
            workload.repo, http_port, grpc_port, work / f"server-{system.key}.log"
        )
    except StartError as exc:
        return [Row(system.key, system.name, "-", 0, error=str(exc))]
    console.rule(f"({system.key}) {system.name}")
    console.print(" ".join(server.command), style="dim")
    with running(server):
        try:
            took = server.wait_ready()
            console.print(f"ready after {took:.1f} s")
            x, expected = workload.x, workload.expected
            check = functools.partial(check_http_answer, system, http_port, x, expected)
            retry(check, "HTTP correctness check")
            if system.grpc:
                retry(lambda: check_grpc(grpc_port, x, expected), "gRPC correctness check")
        except StartError as exc:
            console.print(f"[red]({system.key}) {system.name} did not start: {exc}")
            return [Row(system.key, system.name, "-", 0, error=f"start failed: {exc}")]

        http_file, grpc_file = work / f"body-{system.key}.json", work / "body.grpc"
        http_file.write_bytes(system.http_body(x))
        http_url = f"http://127.0.0.1:{http_port}{system.infer_path}"
        grpc_url = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}"
        loads: list[tuple[str, Callable[[float, int], LoadResult]]] = [
            ("http", lambda d, c: run_hey(http_url, http_file, d, c, LOAD_THREADS))
        ]
        if system.grpc:
            h2log = work / f"h2load-{system.key}.log"
            loads.append(("grpc", lambda d, c: run_h2load(grpc_url, grpc_file, d, c, h2log)))

        for protocol, load in loads:
            # Warm-up: ORT's first runs, Ray's routing tables and connection pools settle.
            with contextlib.suppress(Exception):
                load(WARMUP_S, 16)
            for concurrency in concurrencies:
                row = Row(system.key, system.name, protocol, concurrency)
                before = read_counts(http_port, system.stats_path) if system.stats_path else None
                try:
                    result = load(duration, concurrency)
                except Exception as exc:
                    row.error = str(exc)[:500]
                    console.print(f"[red]{protocol} c{concurrency}: {row.error}")
                    rows.append(row)
                    continue
                after = read_counts(http_port, system.stats_path) if system.stats_path else None
                row.rps, row.p50_ms, row.p99_ms = result.rps, result.p50_ms, result.p99_ms
                row.requests, row.errors = result.requests, result.errors
                if system.unbatched:
                    row.avg_batch = 1.0
                elif before is not None and after is not None and after[1] > before[1]:
                    row.avg_batch = (after[0] - before[0]) / (after[1] - before[1])
                if result.notes:
                    row.error = "; ".join(result.notes)[:500]
                console.print(
                    f"{protocol} c{concurrency}: {row.rps:.0f} req/s, p50 {fmt(row.p50_ms)} ms, "
                    f"p99 {fmt(row.p99_ms)} ms, batch {fmt(row.avg_batch, 1)}, "
                    f"errors {row.errors}"
                )
                rows.append(row)
    return rows


def measure_systems(
    systems: list[System], duration: float, concurrencies: list[int]
) -> tuple[list[Row], dict[str, Any]]:
    """Each system alone, one after the other, on one MLP workload; the rows of all of them
    and turnout's model config."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="turnout-bench-") as tmp:
        work = Path(tmp)
        workload = prepare_workload(work)
        (work / "body.grpc").write_bytes(grpc_body(workload.x))  # bench_system reads it
        config = workload.repo / MODEL_NAME / "config.yaml"
        turnout_config = yaml.safe_load(config.read_text())
        for system in systems:
            rows += bench_system(system, workload, work, duration, concurrencies)
    return rows, turnout_config


# ------------------------------------------------------------------------------ report, targets


def find(rows: list[Row], system: str, protocol: str, concurrency: int) -> Row | None:
    for row in rows:
        if (row.system, row.protocol, row.concurrency) == (system, protocol, concurrency):
            return row
    return None


def add_ratios(rows: list[Row]) -> None:
    # Ratios compare with the baselines' HTTP numbers at the same concurrency, whatever the
    # protocol of the row: the baselines speak HTTP only.
    for row in rows:
        for base, attr in (("a", "ratio_a"), ("b", "ratio_b")):
            ref = find(rows, base, "http", row.concurrency)
            if row.rps is not None and ref is not None and ref.rps:
                setattr(row, attr, row.rps / ref.rps)


TITLE = "Serving benchmark (MLP 256-1024-1024-10, one row per request)"
RatioColumn = tuple[str, Callable[[Row], float | None]]
VERSUS_BASELINES: list[RatioColumn] = [
    ("x (a)", lambda r: r.ratio_a),
    ("x (b)", lambda r: r.ratio_b),
]


def print_table(
    rows: list[Row], title: str = TITLE, ratios: list[RatioColumn] = VERSUS_BASELINES
) -> None:
    """One line per row, a req/s ratio column per entry of ``ratios``; then the rows' notes."""
    columns = ["system", "protocol", "conc", "req/s", "p50 ms", "p99 ms", "avg batch", "errors"]
    columns += [name for name, _ in ratios] + ["note"]
    table = new_table(title, columns, left=("system", "note"))
    for row in rows:
        table.add_row(
            f"({row.system}) {row.name}",
            row.protocol,
            str(row.concurrency) if row.concurrency else "-",
            fmt(row.rps, 0),
            fmt(row.p50_ms),
            fmt(row.p99_ms),
            fmt(row.avg_batch, 1),
            str(row.errors),
            *(fmt(ratio(row)) for _, ratio in ratios),
            (row.error or "").split("\n", 1)[0][:50],
        )
    console.print(table)
    for row in rows:
        if row.error:
            where = f"{row.protocol} c{row.concurrency}" if row.concurrency else "start"
            console.print(f"[yellow]({row.system}) {row.name} {where}:[/yellow] {row.error}")


Rows = dict[tuple[str, int, str], Row]
Check = Callable[[Rows], tuple[bool, str]]


@dataclass
class Target:
    name: str
    needs: list[tuple[str, int, str]]  # (system, concurrency, protocol): rows the check reads
    check: Check


def _ratio(num: float | None, den: float | None) -> float:
    return float("nan") if num is None or not den else num / den


def _d16_vs_b(r: Rows) -> tuple[bool, str]:
    d, b = r[("d", 16, "http")], r[("b", 16, "http")]
    ratio = _ratio(d.rps, b.rps)
    ok = ratio >= 5 and d.p99_ms is not None and b.p99_ms is not None and d.p99_ms < b.p99_ms
    return ok, f"{ratio:.2f}x req/s, p99 {fmt(d.p99_ms)} vs {fmt(b.p99_ms)} ms"


def _d64_vs_a(r: Rows) -> tuple[bool, str]:
    d, a = r[("d", 64, "http")], r[("a", 64, "http")]
    ratio = _ratio(d.rps, a.rps)
    ok = ratio >= 0.5 and d.avg_batch is not None and d.avg_batch >= 16
    return ok, f"{ratio:.2f}x req/s of (a), average batch {fmt(d.avg_batch, 1)}"


def _c16_vs_a(r: Rows) -> tuple[bool, str]:
    ratio = _ratio(r[("c", 16, "http")].rps, r[("a", 16, "http")].rps)
    return ratio >= 0.8, f"{ratio:.2f}x req/s of (a)"


def _d1_latency(r: Rows) -> tuple[bool, str]:
    d, b = r[("d", 1, "http")].p50_ms, r[("b", 1, "http")].p50_ms
    ok = d is not None and b is not None and d <= b / 2
    return ok, f"p50 {fmt(d)} ms vs (b) {fmt(b)} ms"


def _rps_ratio(num: tuple[str, int, str], den: tuple[str, int, str], least: float) -> Check:
    def check(r: Rows) -> tuple[bool, str]:
        ratio = _ratio(r[num].rps, r[den].rps)
        return ratio >= least, f"{ratio:.2f}x ({fmt(r[num].rps, 0)} vs {fmt(r[den].rps, 0)} req/s)"

    return check


def _d1_vs_c(r: Rows) -> tuple[bool, str]:
    d, c = r[("d", 1, "http")].p50_ms, r[("c", 1, "http")].p50_ms
    ok = d is not None and c is not None and d <= 2 * c
    return ok, f"p50 {fmt(d)} ms vs (c) {fmt(c)} ms"


def _ratio_target(
    name: str, num: tuple[str, int, str], den: tuple[str, int, str], least: float
) -> Target:
    return Target(name, [num, den], _rps_ratio(num, den, least))


TARGETS = [
    Target(
        "(d) HTTP c16: >= 5x req/s of (b), lower p99",
        [("d", 16, "http"), ("b", 16, "http")],
        _d16_vs_b,
    ),
    Target(
        "(d) HTTP c64: >= 0.5x req/s of (a), avg batch >= 16",
        [("d", 64, "http"), ("a", 64, "http")],
        _d64_vs_a,
    ),
    Target("(c) HTTP c16: >= 0.8x req/s of (a)", [("c", 16, "http"), ("a", 16, "http")], _c16_vs_a),
    Target("(d) HTTP c1: p50 <= half of (b)'s", [("d", 1, "http"), ("b", 1, "http")], _d1_latency),
    *(
        _ratio_target(
            f"(d) HTTP c{c}: >= 0.8x req/s of (c)", ("d", c, "http"), ("c", c, "http"), 0.8
        )
        for c in (16, 64)
    ),
    Target("(d) HTTP c1: p50 <= 2x (c)'s", [("d", 1, "http"), ("c", 1, "http")], _d1_vs_c),
    *(
        _ratio_target(
            f"({s}) gRPC c{c}: >= 0.9x its HTTP req/s", (s, c, "grpc"), (s, c, "http"), 0.9
        )
        for s in ("c", "d")
        for c in (16, 64)
    ),
]


def evaluate_targets(
    rows: list[Row], systems: list[str], concurrencies: list[int]
) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    for target in TARGETS:
        planned = all(s in systems and c in concurrencies for s, c, _ in target.needs)
        found = {need: find(rows, need[0], need[2], need[1]) for need in target.needs}
        if not planned:
            verdict, detail = "SKIP", "not measured in this run"
        elif any(row is None or row.rps is None for row in found.values()):
            missing = [
                f"({s}) {p} c{c}" for (s, c, p), row in found.items() if row is None or not row.rps
            ]
            verdict, detail = "FAIL", "no result for " + ", ".join(missing)
        else:
            ok, detail = target.check({k: v for k, v in found.items() if v is not None})
            verdict = "PASS" if ok else "FAIL"
        verdicts.append({"target": target.name, "verdict": verdict, "detail": detail})
    return verdicts


def print_targets(verdicts: list[dict[str, Any]]) -> None:
    for v in verdicts:
        print_verdict(v["verdict"], f"{v['target']}: {v['detail']}")


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)

    for tool in ("hey", "h2load"):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} not found: run `make bench-tools`")
            return 2

    exit_on_sigterm()

    systems = [SYSTEMS[key] for key in args.systems]
    rows, turnout_config = measure_systems(systems, args.duration, args.concurrency)
    add_ratios(rows)
    print_table(rows)
    verdicts = evaluate_targets(rows, args.systems, args.concurrency)
    print_targets(verdicts)
    save_results(
        "serving",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "systems": {k: SYSTEMS[k].name for k in args.systems},
                "model": "MLP 256-1024-1024-10, FP32, one row per request",
                "turnout_config": turnout_config,
                "http_load": f"hey -z D -c C (one connection per worker), "
                f"GOMAXPROCS={LOAD_THREADS}",
                "grpc_load": f"h2load -D D -c C -m 1 -t {LOAD_THREADS} "
                "(C connections, one stream each)",
            },
            "results": [asdict(row) for row in rows],
            "targets": verdicts,
        },
    )
    return exit_status(verdicts, args.strict)


if __name__ == "__main__":
    sys.exit(main())
