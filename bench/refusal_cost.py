"""What a refusal costs the gateway's event loop, next to what a served request costs it.

Under overload every refusal takes loop time from the requests being served, so the ratio
of the two bounds the goodput an open loop can keep: at twice capacity, with refusals
costing ``r`` of a served request's loop time, a loop-bound gateway keeps at most
``(1 - 2r) / (1 - r)`` of its capacity (90% needs ``r <= 0.09``).

Two gateways in turn (``turnout serve --backend local``), each under 8 closed-loop HTTP
clients (hey -c 8) for ``--duration`` seconds, ``--rounds`` times, alternating:

- ``served``: the overload bench's model (``max_queue_size: 8, max_batch_size: 4``): every
  request is served;
- ``refused``: a model that computes one request at a time for tens of ms behind a queue of
  one (on a worker thread): nearly every request is refused from its head (429).

The figure is the loop thread's CPU time (user and kernel, from /proc) per answer, and the
kernel's share of it. With ``--new-connections`` every request comes on a new connection
(hey ``-disable-keepalive``): a refusal's cost then includes accepting and setting up its
connection, what a crowd of new clients costs the loop. Prints a table; JSON to
bench/results/refusal-cost-<stamp>.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.chaos import INFER, Workspace
from bench.harness import (
    RESULTS_DIR,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    hey_command,
    machine_info,
    new_table,
    parse_hey,
    running,
    save_results,
)
from bench.models import build_repository

MODELS: dict[str, dict[str, Any]] = {
    "served": {"max_batch_size": 4, "max_queue_size": 8},
    "refused": {
        "max_batch_size": 1,
        "max_queue_size": 1,
        "max_inflight_batches": 1,
        "inline_max_us": 0,
        "layers": (256, 4096, 4096, 4096, 10),
    },
}
TICK = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> tuple[float, float]:
    """The main thread's (user, system) CPU seconds: the event loop's."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def measure(
    root: Path, label: str, duration: float, body: Path, keepalive: bool = True
) -> dict[str, Any]:
    root.mkdir(parents=True)
    ws = Workspace(root, duration)
    repo = build_repository(root / label, **MODELS[label])
    server, http, _, _ = ws.gateway(label, repo, settings={"overload_hold_ms": 0})
    url = f"http://127.0.0.1:{http}{INFER}"
    with running(server):
        server.wait_ready()
        assert server.proc is not None
        pid = server.proc.pid
        subprocess.run(hey_command(url, body, 1, 8, keepalive), capture_output=True, check=True)
        user0, system0 = thread_times(pid)
        done = subprocess.run(
            hey_command(url, body, duration, 8, keepalive),
            capture_output=True,
            text=True,
            check=True,
        )
        user1, system1 = thread_times(pid)
    result = parse_hey(done.stdout)
    cpu = (user1 - user0) + (system1 - system0)
    refused = sum(int(n.split(" x ")[0]) for n in result.notes if "HTTP 429" in n)
    return {
        "answers": result.requests,
        "refused": refused,
        "loop_cpu_s": cpu,
        "us_per_answer": cpu / max(result.requests, 1) * 1e6,
        "kernel_share": (system1 - system0) / cpu if cpu else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--new-connections", action="store_true", help="a new connection for every request"
    )
    args = parser.parse_args(argv)
    keepalive = not args.new_connections
    exit_on_sigterm()
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in MODELS}
    with tempfile.TemporaryDirectory(prefix="turnout-refusal-") as tmp:
        root = Path(tmp)
        body = Workspace(root, args.duration).json_body
        for _ in range(args.rounds):
            for label in MODELS:
                runs[label].append(
                    measure(
                        root / f"{label}-{len(runs[label])}", label, args.duration, body, keepalive
                    )
                )
                console.print(label, runs[label][-1])
    median = {
        label: float(np.median([r["us_per_answer"] for r in rows])) for label, rows in runs.items()
    }
    ratio = median["refused"] / median["served"]
    bound = (1 - 2 * ratio) / (1 - ratio) if ratio < 0.5 else 0.0
    table = new_table(
        "event-loop CPU per answer" + (", each on a new connection" if not keepalive else ""),
        ["case", "rounds (us per answer)", "median us", "kernel"],
        left={"case", "rounds (us per answer)"},
    )  # fmt: skip
    for label, rows in runs.items():
        shares = [r["kernel_share"] for r in rows if r["kernel_share"] is not None]
        table.add_row(
            label,
            ", ".join(fmt(r["us_per_answer"], 0) for r in rows),
            fmt(median[label], 0),
            f"{np.median(shares):.0%}" if shares else "-",
        )
    console.print(table)
    console.print(
        f"refusal / served: {ratio:.2f}; a loop-bound gateway at twice capacity keeps at "
        f"most {bound:.2f} of it"
    )
    payload = {
        "machine": machine_info(tools=["hey"]),
        "duration_s": args.duration,
        "new_connections": not keepalive,
        "runs": runs,
        "median_us_per_answer": median,
        "refusal_to_served": ratio,
        "open_loop_bound": bound,
    }
    save_results("refusal-cost", args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
