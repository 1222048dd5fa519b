"""turnout side by side with other model servers: ``python -m bench.peers`` (make bench-peers).

Systems, each started alone, checked for a right answer, loaded at each concurrency, stopped:
  floor, ray_naive, turnout_local, turnout_ray   as in bench.serving (the project's venv)
  triton     Triton Inference Server via nvidia-pytriton, dynamic batcher (HTTP + gRPC)
  kserve     KServe's ModelServer, a micro-batcher in the model        (HTTP + gRPC)
  mlserver   MLServer, a custom ONNX Runtime runtime, adaptive batching (HTTP + gRPC)
  litserve   LitServe with its batching                                (HTTP)
  bentoml    BentoML with adaptive batching, its own JSON              (HTTP)
Each peer runs from its own venv under bench/.peers/ (installed first, idempotent) and serves
the same ONNX model with ONNX Runtime, at most 64 rows a batch, ~1 ms to fill one. HTTP load
from hey, gRPC from h2load. Writes bench/results/peers-<UTC>.json, its -rps.png and -p99.png
plots, and copies of the plots in docs/img/ for README.md.
  python -m bench.peers [--systems ...] [--concurrency 1 16 64] [--duration 10] [--skip-install]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import (
    REPO_ROOT,
    RESULTS_DIR,
    argument_parser,
    console,
    exit_on_sigterm,
    exit_status,
    machine_info,
    print_verdict,
    save_results,
)
from bench.peers.install import PEERS, PEERS_DIR, ensure_installed, installed_versions
from bench.peers.report import PLOTS, Target, evaluate_targets, plot, versus_best_peer
from bench.peers.systems import MAX_BATCH_SIZE, MAX_DELAY_US, all_systems
from bench.serving import (
    TITLE,
    VERSUS_BASELINES,
    Row,
    System,
    add_ratios,
    measure_systems,
    print_table,
)

DOCS_IMG = REPO_ROOT / "docs" / "img"
TURNOUT_TARGETS = [
    # turnout's default backend is ray.
    Target("d", "turnout ray (default)", 2.0, lower_p99=True),
    Target("c", "turnout local", 2.5, lower_p99=False),
]
TARGET_CONCURRENCIES = (16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = list(all_systems())
    parser = argument_parser(__doc__)
    parser.add_argument("--systems", nargs="+", default=names, choices=names, metavar="SYSTEM")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument(
        "--skip-install", action="store_true", help="use the peers' venvs as they are"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--img", type=Path, default=DOCS_IMG, help="where the plots' stable copies go"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    return parser.parse_args(argv)


def install(names: list[str]) -> None:
    for name in names:
        if name not in PEERS:
            continue
        console.print(f"{name}: installing into {PEERS[name].venv()} (skipped when up to date)")
        log = PEERS_DIR / f"{name}-install.log"
        why = ensure_installed(PEERS[name], log=log)
        if why:
            console.print(f"[red]{name}: {why} (log: {log})")


def mark_unavailable(rows: list[Row]) -> None:
    """A system that did not start has one row without a concurrency: say it is unavailable."""
    for row in rows:
        if row.concurrency == 0 and row.error and not row.error.startswith("unavailable"):
            row.error = f"unavailable: {row.error}"


def report(
    rows: list[Row],
    systems: dict[str, System],
    args: argparse.Namespace,
    turnout_config: dict[str, Any],
) -> tuple[Path, list[dict[str, Any]]]:
    """Print the table and the targets; write the JSON and the plots. Returns the JSON's path
    and the verdicts."""
    mark_unavailable(rows)
    add_ratios(rows)
    peers = {s.key for name, s in systems.items() if name in PEERS}
    best = versus_best_peer(rows, peers)
    columns = [*VERSUS_BASELINES, ("x best peer", lambda r: best.get(id(r)))]
    print_table(rows, TITLE.replace("Serving", "Peers"), columns)
    concurrencies = [c for c in TARGET_CONCURRENCIES if c in args.concurrency]
    verdicts = evaluate_targets(rows, TURNOUT_TARGETS, peers, concurrencies)
    for v in verdicts:
        print_verdict(v["verdict"], f"{v['target']}: {v['detail']}")

    results = [asdict(row) | {"ratio_best_peer": best.get(id(row))} for row in rows]
    path = save_results(
        "peers", args.out, payload(args, systems, results, verdicts, turnout_config)
    )
    for metric, (suffix, label, _) in PLOTS.items():
        png = args.out / f"{path.stem}-{suffix}.png"
        title = f"{label} vs concurrency, MLP 256-1024-1024-10, 1 row/request"
        plot(rows, systems.values(), metric, png, title)
        console.print(f"plot: {png}")
        if args.img:
            args.img.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, args.img / f"peers-{suffix}.png")
    return path, verdicts


def payload(
    args: argparse.Namespace,
    systems: dict[str, System],
    results: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
    turnout_config: dict[str, Any],
) -> dict[str, Any]:
    return {
        "machine": machine_info(),
        "settings": {
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "model": "MLP 256-1024-1024-10, FP32, one row per request",
            "systems": {
                name: {
                    "key": s.key,
                    "label": s.name,
                    "protocols": ["http", "grpc"] if s.grpc else ["http"],
                    "http_request": f"POST {s.infer_path}, {s.request_format}",
                }
                for name, s in systems.items()
            },
            "peer_batching": {"max_batch_size": MAX_BATCH_SIZE, "max_delay_us": MAX_DELAY_US},
            "turnout_config": turnout_config,
            "http_load": "hey -z D -c C (one connection per worker)",
            "grpc_load": "h2load -D D -c C -m 1 (C connections, one stream each)",
        },
        "peers": {
            name: {
                "requirements": list(PEERS[name].requirements),
                "installed": installed_versions(PEERS[name]),
            }
            for name in systems
            if name in PEERS
        },
        "results": results,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("hey", "h2load"):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} not found: run `make bench-tools`")
            return 2
    exit_on_sigterm()
    if not args.skip_install:
        install(args.systems)
    everything = all_systems()
    systems = {name: everything[name] for name in args.systems}
    rows, turnout_config = measure_systems(list(systems.values()), args.duration, args.concurrency)
    _, verdicts = report(rows, systems, args, turnout_config)
    return exit_status(verdicts, args.strict)
