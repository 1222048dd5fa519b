"""Where the HTTP open loop's goodput goes: what a served request costs the event loop at
twice capacity, next to what it costs under 8 closed-loop clients.

One gateway serves the chaos bench's overloaded model (``max_queue_size: 8,
max_batch_size: 4``). Phases alternate, capacity first and last (``C O C O ... C``):
``C`` is 8 closed-loop clients (``hey -c 8``), ``O`` the open loop at twice the capacity
just measured (``bench.loadgen open``). In the middle of each phase (from 1 s in to 1 s
before its end) the bench reads the model's inferences (its stats), the refusals (the
``turnout_requests`` counter's 429s) and the event loop thread's user and system CPU time
(``/proc``). Each open phase's ratio is its goodput over the mean of the capacities on
either side of it, so the machine's drift between minutes cancels to first order.

The table gives, per kind of phase, the medians of: served per second, the loop's user
and system microseconds per served request, and refusals per served request. What the
open loop adds per served request, less its refusals at what
``python -m bench.refusal_cost`` says one costs, is what serving itself costs more there.
Usage:

  python -m bench.open_loop_cost [--pairs 8] [--phase 5]
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.chaos import INFER, OVERLOADED, Workspace, expected_mlp, finished, loadgen, served
from bench.harness import (
    RESULTS_DIR,
    argument_parser,
    check_http,
    console,
    exit_on_sigterm,
    fmt,
    hey_result,
    hey_start,
    machine_info,
    new_table,
    retry,
    run_hey,
    running,
    save_results,
)
from bench.models import build_repository
from bench.refusal_cost import thread_times

_REFUSED = re.compile(r'^turnout_requests_total\{[^}]*status="429"[^}]*\} ([0-9.e+]+)$', re.M)


def refused(port: int) -> int:
    """429s the gateway has answered, every model and protocol."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return int(sum(float(v) for v in _REFUSED.findall(text)))


def window(pid: int, port: int, phase: float, settle: float = 1.0) -> dict[str, float]:
    """A phase that has just started, measured from ``settle`` in to ``settle`` before its
    end: served and refused per second, and the loop's CPU per served request."""
    time.sleep(settle)
    user0, system0 = thread_times(pid)
    served0, refused0, at0 = served(port), refused(port), time.monotonic()
    time.sleep(max(0.0, phase - 2 * settle))
    user1, system1 = thread_times(pid)
    served1, refused1, at1 = served(port), refused(port), time.monotonic()
    count = max(served1 - served0, 1)
    return {
        "served_rps": (served1 - served0) / (at1 - at0),
        "refused_rps": (refused1 - refused0) / (at1 - at0),
        "user_us_per_served": (user1 - user0) / count * 1e6,
        "system_us_per_served": (system1 - system0) / count * 1e6,
        "refused_per_served": (refused1 - refused0) / count,
        "loop_busy": (user1 - user0 + system1 - system0) / (at1 - at0),
    }


def bracketed(capacities: Sequence[float], goodputs: Sequence[float]) -> list[float]:
    """Each open phase's goodput over the mean of the capacities measured just before and
    just after it (``capacities`` has one more entry than ``goodputs``)."""
    if len(capacities) != len(goodputs) + 1:
        raise ValueError("one capacity before each open phase and one after the last")
    return [g / ((capacities[i] + capacities[i + 1]) / 2) for i, g in enumerate(goodputs)]


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=8, help="open-loop phases")
    parser.add_argument("--phase", type=float, default=5.0, help="seconds per load phase")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs: at least 2")
    if args.phase < 3:
        parser.error("--phase: at least 3 (seconds; 1 s settles at each end)")
    exit_on_sigterm()
    phases: dict[str, list[dict[str, float]]] = {"capacity": [], "open": []}
    with tempfile.TemporaryDirectory(prefix="turnout-open-cost-") as tmp:
        ws = Workspace(Path(tmp), args.phase)
        repo = build_repository(ws.root / "overload-models", **OVERLOADED)
        server, http, _, _ = ws.gateway("open-cost", repo)
        url = f"http://127.0.0.1:{http}{INFER}"
        with running(server):
            server.wait_ready()
            assert server.proc is not None
            pid = server.proc.pid
            retry(lambda: check_http(http, ws.x, expected_mlp(repo, ws.x)), "HTTP check")
            run_hey(url, ws.json_body, 2, 8)  # warm-up

            def capacity() -> None:
                load = hey_start(url, ws.json_body, args.phase, 8)
                phases["capacity"].append(window(pid, http, args.phase))
                hey_result(load, args.phase)
                time.sleep(0.5)

            capacity()
            for _ in range(args.pairs):
                rate = 2 * phases["capacity"][-1]["served_rps"]
                generator = loadgen("open", "--address", f"127.0.0.1:{http}",
                                    "--body", str(ws.json_body), "--duration", str(args.phase),
                                    "--rate", f"{rate:.0f}")  # fmt: skip
                measured = window(pid, http, args.phase)
                finished(generator)
                phases["open"].append({**measured, "arrival_rps": rate})
                time.sleep(2)  # the storm's holds end before the next phase
                capacity()
                console.print(
                    f"open {measured['served_rps']:.0f} req/s between capacities "
                    f"{phases['capacity'][-2]['served_rps']:.0f} and "
                    f"{phases['capacity'][-1]['served_rps']:.0f}"
                )
    ratios = bracketed(
        [p["served_rps"] for p in phases["capacity"]], [p["served_rps"] for p in phases["open"]]
    )
    keys = ["served_rps", "user_us_per_served", "system_us_per_served", "refused_per_served"]
    medians = {
        kind: {k: statistics.median(p[k] for p in rows) for k in keys}
        for kind, rows in phases.items()
    }
    table = new_table(
        "the event loop per served request",
        ["phase", "served/s", "user us", "system us", "refused per served"],
        left={"phase"},
    )
    for kind, values in medians.items():
        table.add_row(
            kind,
            fmt(values["served_rps"], 0),
            fmt(values["user_us_per_served"], 1),
            fmt(values["system_us_per_served"], 1),
            fmt(values["refused_per_served"], 3),
        )
    console.print(table)
    spread = statistics.stdev(ratios) / len(ratios) ** 0.5
    console.print(
        f"open loop / capacity (bracketed): median {statistics.median(ratios):.3f}, "
        f"mean {statistics.mean(ratios):.3f} ± {spread:.3f} (standard error), "
        f"rounds {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    payload: dict[str, Any] = {
        "machine": machine_info(tools=["hey"]),
        "phase_s": args.phase,
        "phases": phases,
        "medians": medians,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_mean": statistics.mean(ratios),
        "ratio_standard_error": spread,
    }
    save_results("open-loop-cost", args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
