"""Monitor statistics benchmark: monitor.stats / monitor.sketch against the references.

1M reference values against 1M current values, each statistic timed side by side with its
reference implementation in the same repeat (alternating), medians over the repeats. The
current window is the reference distribution shifted by 0.02 sigma, the small-drift regime a
monitor spends its time in (design.md section 4):

  PSI, JS (base 2)   turnout: current counted into bins fitted once on the reference
                     (Evidently's Sturges edges, so the values agree), reference counts
                     precomputed  | Evidently psi / jensenshannon (bins the combined data)
  KS D               turnout: reference sorted once, current sorted (numpy) and merged
                     (numba)      | scipy.stats.ks_2samp (sorts both, adds a p-value)
  KS D, large drift  the same on a 0.25 sigma shift, 1.1x scale window, no target: scipy's
                     asymptotic p-value (kstwo.sf) costs far less when D is large, so
                     ks_2samp's time depends on the drift while ours does not
  Wasserstein        same as KS   | Evidently wasserstein (normed), no target
  latency sketch     1M lognormal latencies added, p99.9 read | ddsketch.DDSketch (1%)
  ingest             rows of 8 features counted into quantile bins + 1 latency per row into
                     the sketch, in batches, one thread: values per second

Targets: PSI and JS >= 30x Evidently, KS >= 5x scipy, sketch >= 50x ddsketch, ingest >= 1M
values/s. Prints a table and writes bench/results/monitor-stats-<UTC>.json and
monitor-stats-latest.json. Usage:
  python -m bench.monitor_stats [--n 1000000] [--repeats 5] [--strict]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
from ddsketch import DDSketch

from bench.harness import (
    RESULTS_DIR,
    argument_parser,
    console,
    exit_status,
    machine_info,
    new_table,
    save_results,
)
from monitor.sketch import LatencySketch
from monitor.stats import (
    ReferenceBins,
    SortedSample,
    js_distance,
    ks_statistic,
    psi,
    warm_up,
    wasserstein_normed,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Evidently's import touches deprecated numpy/pandas corners
    from evidently.legacy.calculations.stattests.jensenshannon import _jensenshannon
    from evidently.legacy.calculations.stattests.psi import _psi
    from evidently.legacy.calculations.stattests.wasserstein_distance_norm import (
        _wasserstein_distance_norm,
    )
    from evidently.legacy.core import ColumnType

QUANTILES = np.array([0.5, 0.9, 0.95, 0.99, 0.999])
INGEST_FEATURES = 8
INGEST_BATCH_ROWS = 8192
TARGETS = {"psi": 30.0, "js": 30.0, "ks": 5.0, "sketch": 50.0}
INGEST_TARGET = 1_000_000.0
STATS_PACKAGES = ("numpy", "numba", "scipy", "pandas", "evidently", "ddsketch")


@dataclass
class Row:
    key: str
    statistic: str
    reference: str
    reference_ms: float
    turnout_ms: float
    speedup: float
    target: float | None
    reference_value: float
    turnout_value: float
    abs_diff: float


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def side_by_side(
    ours: Callable[[], float], theirs: Callable[[], float], repeats: int
) -> tuple[float, float, float, float]:
    """Alternate the two, one untimed call each first; medians in ms and the last values."""
    ours_value, theirs_value = ours(), theirs()
    ours_s: list[float] = []
    theirs_s: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        theirs_value = theirs()
        theirs_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours_value = ours()
        ours_s.append(time.perf_counter() - start)
    return median_ms(ours_s), median_ms(theirs_s), ours_value, theirs_value


def bench_statistics(n: int, repeats: int) -> list[Row]:
    rng = np.random.default_rng(20261127)
    reference = rng.normal(0.0, 1.0, n)
    current = rng.normal(0.02, 1.0, n)
    drifted = rng.normal(0.25, 1.1, n)
    ref_series, cur_series = pd.Series(reference), pd.Series(current)
    num = ColumnType.Numerical

    # Fitted once, outside the timings: what the sidecar holds for a reference profile.
    edges = np.histogram_bin_edges(np.concatenate([reference, current]), bins="sturges")
    bins = ReferenceBins.from_edges(edges)
    ref_counts = bins.counts(reference)
    ref_sorted = SortedSample.of(reference)

    def ours_psi() -> float:
        return psi(ref_counts, bins.counts(current))

    def ours_js() -> float:
        return js_distance(ref_counts, bins.counts(current))

    cases: list[tuple[str, str, str, Callable[[], float], Callable[[], float]]] = [
        (
            "psi",
            "PSI (Sturges bins)",
            "Evidently psi",
            ours_psi,
            lambda: float(_psi(ref_series, cur_series, num, 0.1)[0]),
        ),
        (
            "js",
            "Jensen-Shannon, base 2",
            "Evidently jensenshannon",
            ours_js,
            lambda: float(_jensenshannon(ref_series, cur_series, num, 0.1, base=2)[0]),
        ),
        (
            "ks",
            "KS statistic D",
            "scipy ks_2samp",
            lambda: ks_statistic(ref_sorted, current),
            lambda: float(scipy.stats.ks_2samp(reference, current).statistic),
        ),
        (
            "ks_large_drift",
            "KS statistic D, large drift",
            "scipy ks_2samp",
            lambda: ks_statistic(ref_sorted, drifted),
            lambda: float(scipy.stats.ks_2samp(reference, drifted).statistic),
        ),
        (
            "wasserstein",
            "Wasserstein-1 / std(ref)",
            "Evidently wasserstein",
            lambda: wasserstein_normed(ref_sorted, current),
            lambda: float(_wasserstein_distance_norm(ref_series, cur_series, num, 0.1)[0]),
        ),
    ]
    rows = []
    for key, name, reference_name, ours, theirs in cases:
        ours_ms, theirs_ms, ours_value, theirs_value = side_by_side(ours, theirs, repeats)
        rows.append(
            Row(
                key,
                name,
                reference_name,
                theirs_ms,
                ours_ms,
                theirs_ms / ours_ms,
                TARGETS.get(key),
                theirs_value,
                ours_value,
                abs(ours_value - theirs_value),
            )
        )
        console.print(f"  {name}: {theirs_ms:.1f} ms vs {ours_ms:.2f} ms")
    return rows


def bench_sketch(n: int, repeats: int) -> Row:
    latencies = np.random.default_rng(7).lognormal(np.log(0.02), 1.0, n)  # seconds
    latency_list = latencies.tolist()  # the reference adds Python floats one by one

    def ours() -> float:
        sketch = LatencySketch(0.01)
        sketch.add(latencies)
        return float(sketch.quantiles(QUANTILES)[-1])

    def theirs() -> float:
        sketch = DDSketch(0.01)
        add = sketch.add
        for value in latency_list:
            add(value)
        return float(sketch.get_quantile_value(QUANTILES[-1]))

    ours_ms, theirs_ms, ours_value, theirs_value = side_by_side(ours, theirs, repeats)
    console.print(f"  latency sketch: {theirs_ms:.1f} ms vs {ours_ms:.2f} ms")
    return Row(
        "sketch",
        "latency sketch, add 1M + p99.9 (1% rel.)",
        "ddsketch DDSketch",
        theirs_ms,
        ours_ms,
        theirs_ms / ours_ms,
        TARGETS["sketch"],
        theirs_value,
        ours_value,
        abs(ours_value - theirs_value),
    )


def bench_ingest(rows: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    scales = np.linspace(0.5, 3.0, INGEST_FEATURES)[:, None]
    reference = rng.normal(0.0, 1.0, (INGEST_FEATURES, 100_000)) * scales
    live = rng.normal(0.1, 1.0, (INGEST_FEATURES, rows)) * scales  # one contiguous row each
    latencies = rng.lognormal(np.log(0.02), 1.0, rows)
    bins = [ReferenceBins.fit(column, 10) for column in reference]  # quantile bins

    def run() -> None:
        windows = [np.zeros(b.n_bins + 2, dtype=np.int64) for b in bins]
        sketch = LatencySketch()
        for start in range(0, rows, INGEST_BATCH_ROWS):
            stop = start + INGEST_BATCH_ROWS
            for feature, (b, window) in enumerate(zip(bins, windows, strict=True)):
                b.add(live[feature, start:stop], window)
            sketch.add(latencies[start:stop])

    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    values = rows * (INGEST_FEATURES + 1)
    per_second = values / statistics.median(seconds)
    console.print(f"  ingest: {per_second / 1e6:.1f}M values/s")
    return {
        "rows": rows,
        "features": INGEST_FEATURES,
        "batch_rows": INGEST_BATCH_ROWS,
        "values": values,
        "median_s": statistics.median(seconds),
        "values_per_s": per_second,
        "target_values_per_s": INGEST_TARGET,
    }


def print_table(rows: list[Row], ingest: dict[str, Any], n: int) -> list[dict[str, Any]]:
    columns = ("statistic", "reference", "ref ms", "turnout ms", "speed-up", "target", "|diff|")
    title = f"monitor statistics, {n:,} vs {n:,} values (medians)"
    table = new_table(title, columns, left=columns[:2])
    verdicts = []
    for row in rows:
        verdict = "-" if row.target is None else "PASS" if row.speedup >= row.target else "FAIL"
        target = "-" if row.target is None else f">= {row.target:g}x {verdict}"
        table.add_row(
            row.statistic,
            row.reference,
            f"{row.reference_ms:.1f}",
            f"{row.turnout_ms:.2f}",
            f"{row.speedup:.1f}x",
            target,
            f"{row.abs_diff:.1e}",
        )
        if row.target is not None:
            verdicts.append({"target": row.key, "verdict": verdict, "speedup": row.speedup})
    ingest_ok = ingest["values_per_s"] >= INGEST_TARGET
    verdict = "PASS" if ingest_ok else "FAIL"
    table.add_row(
        f"ingest: {ingest['features']} features + latency, batches of {ingest['batch_rows']}",
        "-",
        "-",
        f"{ingest['median_s'] * 1e3:.1f}",
        f"{ingest['values_per_s'] / 1e6:.1f}M values/s",
        f">= 1M/s {verdict}",
        "-",
    )
    verdicts.append(
        {"target": "ingest", "verdict": verdict, "values_per_s": ingest["values_per_s"]}
    )
    console.print(table)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--n", type=int, default=1_000_000, help="values per side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    start = time.perf_counter()
    warm_up()
    console.print(f"kernels ready in {time.perf_counter() - start:.2f} s (numba cache)")
    rows = bench_statistics(args.n, args.repeats)
    rows.append(bench_sketch(args.n, args.repeats))
    ingest = bench_ingest(args.n, args.repeats)
    verdicts = print_table(rows, ingest, args.n)
    machine = machine_info(STATS_PACKAGES, hardware=False, load_average=True, tools=())
    machine["load_average_before"] = list(load_before)
    console.print(
        f"load average before {load_before[0]:.2f}, after {machine['load_average_1_5_15'][0]:.2f}"
        f" on {machine['nproc']} cores"
    )
    save_results(
        "monitor-stats",
        args.out,
        {
            "machine": machine,
            "settings": {
                "n": args.n,
                "repeats": args.repeats,
                "reference": "normal(0, 1)",
                "current": "normal(0.02, 1)",
                "current_large_drift": "normal(0.25, 1.1), KS row without target",
                "latencies": "lognormal(log 0.02 s, 1)",
                "sketch_relative_accuracy": 0.01,
                "quantiles": QUANTILES.tolist(),
            },
            "results": [asdict(row) for row in rows],
            "ingest": ingest,
            "targets": verdicts,
        },
    )
    return exit_status(verdicts, args.strict)


if __name__ == "__main__":
    sys.exit(main())
