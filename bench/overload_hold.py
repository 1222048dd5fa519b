"""How long to hold a refused connection: gateways that differ only in ``overload_hold_ms``.

Each gateway serves the chaos bench's overloaded model (``max_queue_size: 8,
max_batch_size: 4``); round by round, alternating which goes first, each measures its own
capacity (8 closed-loop HTTP clients, ``hey -c 8``) and then takes the HTTP open loop at
twice that (``bench.loadgen open``), goodput counted by the model in the middle of the
phase, as ``bench.chaos`` does. The table gives each hold's ratios, their median and the
refusals a phase. Usage:

  python -m bench.overload_hold [--holds 500 1000] [--rounds 6] [--phase 4]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chaos import INFER, OVERLOADED, Workspace, http_capacity, http_open_loop
from bench.harness import (
    RESULTS_DIR,
    Server,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    machine_info,
    new_table,
    run_hey,
    save_results,
)
from bench.models import build_repository


def open_loop_round(ws: Workspace, http: int) -> dict[str, Any]:
    """One round on one gateway: its capacity, then the open loop at twice it."""
    capacity, _ = http_capacity(ws, http)
    time.sleep(0.5)
    goodput, document = http_open_loop(ws, http, 2 * capacity)
    statuses = document.get("statuses", {})
    time.sleep(2)  # the storm's holds end before the next phase
    return {
        "capacity_rps": capacity,
        "goodput_rps": goodput,
        "goodput_ratio": goodput / capacity,
        "refused": int(statuses.get("429", 0)),
        "served": int(statuses.get("200", 0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--holds", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--phase", type=float, default=4.0, help="seconds per load phase")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if any(not 0 <= hold <= 1000 for hold in args.holds):
        parser.error("--holds: each between 0 and 1000 (ms), as overload_hold_ms allows")
    exit_on_sigterm()

    rounds: dict[int, list[dict[str, Any]]] = {hold: [] for hold in args.holds}
    with tempfile.TemporaryDirectory(prefix="tho-") as tmp:
        ws = Workspace(Path(tmp), args.phase, args.rounds, phase=args.phase)
        repo = build_repository(
            ws.root / "models",
            max_batch_size=OVERLOADED["max_batch_size"],
            max_queue_size=OVERLOADED["max_queue_size"],
        )
        servers: dict[int, tuple[Server, int]] = {}
        try:
            for hold in args.holds:
                server, http, _, _ = ws.gateway(
                    f"hold{hold}", repo, settings={"overload_hold_ms": hold}
                )
                server.start()
                servers[hold] = (server, http)
            for server, http in servers.values():
                server.wait_ready()
                run_hey(f"http://127.0.0.1:{http}{INFER}", ws.json_body, 2, 8)  # warm-up
            for index in range(args.rounds):
                # Alternate which goes first, so neither always follows the other's load.
                order = args.holds if index % 2 == 0 else args.holds[::-1]
                for hold in order:
                    result = open_loop_round(ws, servers[hold][1])
                    rounds[hold].append(result)
                    console.print(
                        f"round {index} hold {hold} ms: capacity "
                        f"{result['capacity_rps']:.0f} req/s, goodput {result['goodput_rps']:.0f}"
                        f" ({result['goodput_ratio']:.2f}), {result['refused']} refused"
                    )
        finally:
            for server, _ in servers.values():
                server.stop()

    table = new_table(
        "HTTP open loop at twice capacity, by overload_hold_ms",
        ["hold ms", "goodput / capacity, by round", "median", "refused a phase (median)"],
        left=["goodput / capacity, by round"],
    )
    summary: dict[str, Any] = {}
    for hold, results in rounds.items():
        ratios = [r["goodput_ratio"] for r in results]
        median = statistics.median(ratios) if ratios else None
        refused = statistics.median([r["refused"] for r in results]) if results else None
        summary[str(hold)] = {"median_ratio": median, "median_refused": refused}
        table.add_row(
            str(hold), ", ".join(f"{r:.2f}" for r in ratios), fmt(median, 3), fmt(refused, 0)
        )
    console.print(table)
    save_results(
        "overload-hold",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                "holds_ms": args.holds,
                "rounds": args.rounds,
                "phase_s": args.phase,
                "model": OVERLOADED,
                "load": "hey -c 8 for capacity, then bench.loadgen open at 2x, per round",
            },
            "rounds": {str(k): v for k, v in rounds.items()},
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
