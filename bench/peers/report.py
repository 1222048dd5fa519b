"""The peers benchmark's report: each row against the best peer, the targets, the plots."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import fmt
from bench.serving import Row, System

PLOTS = {
    # metric -> (file suffix, y label, log scale)
    "rps": ("rps", "requests/s", False),
    "p99_ms": ("p99", "p99 latency (ms)", True),
}


def best_peer(rows: Iterable[Row], peers: Collection[str], protocol: str, conc: int) -> Row | None:
    """The peer row with the most req/s at ``protocol`` and ``conc``; None when no peer ran."""
    measured = [
        r
        for r in rows
        if r.system in peers and (r.protocol, r.concurrency) == (protocol, conc) and r.rps
    ]
    return max(measured, key=lambda r: r.rps or 0.0, default=None)


def versus_best_peer(rows: list[Row], peers: Collection[str]) -> dict[int, float]:
    """id(row) -> its req/s over the best peer's at the same protocol and concurrency."""
    ratios: dict[int, float] = {}
    for row in rows:
        best = best_peer(rows, peers, row.protocol, row.concurrency)
        if row.rps is not None and best is not None and best.rps:
            ratios[id(row)] = row.rps / best.rps
    return ratios


@dataclass(frozen=True)
class Target:
    system: str  # a row key
    label: str
    ratio: float
    lower_p99: bool


def evaluate_targets(
    rows: list[Row], targets: list[Target], peers: Collection[str], concurrencies: Iterable[int]
) -> list[dict[str, Any]]:
    """Each target at each concurrency it names (HTTP) that this run measured."""
    verdicts: list[dict[str, Any]] = []
    for target in targets:
        for conc in concurrencies:
            name = f"{target.label} HTTP c{conc}: >= {target.ratio:g}x the best peer's req/s"
            name += ", lower p99" if target.lower_p99 else ""
            ours = next(
                (
                    r
                    for r in rows
                    if (r.system, r.protocol, r.concurrency) == (target.system, "http", conc)
                ),
                None,
            )
            best = best_peer(rows, peers, "http", conc)
            if not any(r.system == target.system for r in rows):
                verdicts.append({"target": name, "verdict": "SKIP", "detail": "not in this run"})
                continue
            if ours is None or ours.rps is None or best is None or not best.rps:
                missing = "turnout" if ours is None or ours.rps is None else "any peer"
                verdicts.append(
                    {"target": name, "verdict": "FAIL", "detail": f"no result for {missing}"}
                )
                continue
            ratio = ours.rps / best.rps
            p99_ok = (
                ours.p99_ms is not None and best.p99_ms is not None and ours.p99_ms < best.p99_ms
            )
            ok = ratio >= target.ratio and (p99_ok or not target.lower_p99)
            detail = (
                f"{ratio:.2f}x of ({best.system}) {best.name} "
                f"({ours.rps:.0f} vs {best.rps:.0f} req/s), "
                f"p99 {fmt(ours.p99_ms)} vs {fmt(best.p99_ms)} ms"
            )
            verdicts.append({"target": name, "verdict": "PASS" if ok else "FAIL", "detail": detail})
    return verdicts


def plot(rows: list[Row], systems: Iterable[System], metric: str, path: Path, title: str) -> None:
    """One line per system and protocol (gRPC dashed) of ``metric`` against concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    _, ylabel, log_y = PLOTS[metric]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    concurrencies: set[int] = set()
    for index, system in enumerate(systems):
        for protocol, style in (("http", "-"), ("grpc", "--")):
            points = sorted(
                (r.concurrency, getattr(r, metric))
                for r in rows
                if r.system == system.key
                and r.protocol == protocol
                and r.rps is not None
                and getattr(r, metric) is not None
            )
            if not points:
                continue
            concurrencies.update(c for c, _ in points)
            turnout = system.name.startswith("turnout")
            axes.plot(
                [c for c, _ in points],
                [v for _, v in points],
                style,
                color=f"C{index % 10}",  # one colour per system, both protocols
                marker="o",
                linewidth=2.6 if turnout else 1.4,
                label=f"{system.name} ({protocol})",
            )
    axes.set_xscale("log", base=2)
    ticks = sorted(concurrencies)
    axes.set_xticks(ticks, [str(c) for c in ticks])
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("concurrent clients")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
