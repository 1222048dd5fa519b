"""Two revisions of turnout side by side: a git revision ("base") against the working tree.

For a change to the gateway's hot path, the question is what it changed on this machine,
today; single runs on a shared 2-core machine swing by more than most changes. So both
gateways run at once (`turnout serve --backend local --no-monitor`, the MLP), the base one
from a detached git worktree put first on its PYTHONPATH, and `hey` loads them in turn,
``--rounds`` times per concurrency, alternating which goes first. Each round reports req/s,
latency, rows per batch and the gateway's CPU per request; the verdict line per
concurrency is the median of the paired working/base ratios. Usage:

  python -m bench.revisions --base REV [--concurrency 1 2 4] [--duration 5] [--rounds 6]
      [--new-connections]   (each request on a new connection: what accepting costs)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import (
    REPO_ROOT,
    RESULTS_DIR,
    Comparison,
    Server,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    machine_info,
    measure_rounds,
    new_table,
    prepare_workload,
    save_results,
    start_gateway,
    wait_and_warm,
)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def imported_from(env: dict[str, str]) -> str:
    """Where a gateway started with ``env`` imports the gateway package from."""
    command = [sys.executable, "-c", "import gateway; print(gateway.__file__)"]
    return subprocess.run(
        command, check=True, capture_output=True, text=True, env=env, cwd="/"
    ).stdout.strip()


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--duration", type=float, default=5, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=6, help="base/working pairs per level")
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="each request on a new connection (hey -disable-keepalive)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    exit_on_sigterm()

    try:
        base = git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        parser.error(f"--base {args.base!r} is not a commit of {REPO_ROOT}")
    working = git("rev-parse", "HEAD") + (" + changes" if git("status", "--porcelain") else "")
    levels: dict[int, Comparison] = {}
    with tempfile.TemporaryDirectory(prefix="trv-") as tmp:
        work = Path(tmp)
        tree = work / "base"
        git("worktree", "add", "--detach", str(tree), base)
        servers: dict[str, tuple[Server, int]] = {}
        try:
            base_env = {"PYTHONPATH": str(tree)}
            source = imported_from({**os.environ, **base_env})
            if not source.startswith(str(tree)):
                raise SystemExit(f"the base gateway would import {source}, not the worktree's")
            workload = prepare_workload(work)
            # "off" is the base, "on" the working tree: the harness's names for a pair.
            servers["off"] = start_gateway(work, workload, "off", ["--no-monitor"], base_env)
            servers["on"] = start_gateway(work, workload, "on", ["--no-monitor"])
            wait_and_warm(servers, workload, "revisions")
            for concurrency in args.concurrency:
                runs = measure_rounds(
                    servers,
                    workload.body,
                    args.duration,
                    concurrency,
                    args.rounds,
                    f"c{concurrency}",
                    keepalive=not args.new_connections,
                )
                levels[concurrency] = Comparison.of(runs, args.rounds)
        finally:
            for server, _ in servers.values():
                server.stop()
            git("worktree", "remove", "--force", str(tree))

    table = new_table(
        f"working tree ({working[:12]}) against base ({base[:12]}), medians of rounds",
        [
            "clients",
            "req/s base",
            "req/s working",
            "working/base (paired median)",
            "p50 ms base / working",
            "p99 ms base / working",
            "rows per batch base / working",
            "CPU us/request base / working",
        ],
        left=["clients"],
    )
    for concurrency, c in levels.items():

        def of(mode: str, key: str, c: Comparison = c) -> float | None:
            return median([getattr(r, key) for r in c.runs if r.mode == mode])

        def pair(key: str, digits: int = 2) -> str:
            return f"{fmt(of('off', key), digits)} / {fmt(of('on', key), digits)}"

        table.add_row(
            str(concurrency),
            fmt(of("off", "rps"), 0),
            fmt(of("on", "rps"), 0),
            fmt(c.paired_median, 3),
            pair("p50_ms"),
            pair("p99_ms"),
            pair("avg_batch", 1),
            pair("gateway_cpu_us", 0),
        )
    console.print(table)
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "base": base,
            "working": working,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "http_load": "hey -z D -c C"
            + (" -disable-keepalive" if args.new_connections else "")
            + ", alternating base/working",
            "new_connections": args.new_connections,
            "model": "MLP 256-1024-1024-10, FP32, one row per request",
        },
        # Each level's runs and summaries say "off" for the base and "on" for the working tree.
        "levels": {str(k): c.payload() for k, c in levels.items()},
    }
    save_results("revisions", args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
