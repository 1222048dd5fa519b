"""bench.ray_packing without Ray: PSS parsing, the fit arithmetic, percentiles, the command
line, and the table and JSON built from made-up measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from bench._results import write_results
from bench.ray_packing import (
    Result,
    fit_on_cpus,
    parse_args,
    payload,
    percentile,
    pss_kib,
    results_table,
)

SMAPS_ROLLUP = """\
55d0c0a00000-7ffd2f5f1000 ---p 00000000 00:00 0                          [rollup]
Rss:              182344 kB
Pss:              151022 kB
Pss_Dirty:         98012 kB
Pss_Anon:          97680 kB
Pss_File:          52990 kB
Pss_Shmem:           352 kB
Shared_Clean:      61424 kB
Private_Dirty:     97988 kB
Swap:                  0 kB
SwapPss:               0 kB
"""


def made_up() -> list[Result]:
    a = Result(
        "per-version",
        5,
        processes=5,
        ready_s=12.3,
        replica_pss_mib=750.0,
        core_pss_mib=540.0,
        core_processes=9,
        cpu_reserved=1.25,
        cpu_per_version=0.25,
        fit_on_cpus=8,
        batches=10_000,
        batches_per_s=1000.0,
        rows_per_s=16_000.0,
        p50_ms=12.5,
        p99_ms=40.0,
        restart_s=8.5,
        versions_down=1,
    )
    b = Result("packed", 5, processes=1, replica_pss_mib=200.0, cpu_reserved=0.25)
    b.notes.append("a note")
    return [a, b]


def test_pss_is_read_from_the_pss_line_not_its_lookalikes() -> None:
    assert pss_kib(SMAPS_ROLLUP) == 151022


def test_a_text_without_pss_counts_nothing() -> None:
    assert pss_kib("") == 0
    assert pss_kib("Rss: 10 kB\nPss_Anon: 5 kB\n") == 0


@pytest.mark.parametrize(
    ("cpus", "each", "fit"), [(2, 0.25, 8), (2, 0.2, 10), (2, 1.0, 2), (2, 0.3, 6), (1, 2.0, 0)]
)
def test_versions_that_fit(cpus: float, each: float, fit: int) -> None:
    assert fit_on_cpus(cpus, each) == fit


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 99) is None


def test_memory_per_version_divides_the_replicas_pss() -> None:
    a, b = made_up()
    assert a.pss_per_version_mib == 150.0
    assert b.pss_per_version_mib == 40.0
    assert Result("packed", 3).pss_per_version_mib is None


def test_defaults() -> None:
    args = parse_args([])
    assert args.versions == [5, 10]
    assert (args.rows, args.concurrency, args.duration, args.restart) == (16, 16, 10, True)
    args = parse_args(["--versions", "2", "--no-restart", "--out", "/tmp/r"])
    assert (args.versions, args.restart, args.out) == ([2], False, Path("/tmp/r"))


def test_the_table_has_a_row_per_layout_and_one_for_rays_own_processes() -> None:
    console = Console(width=200, record=True)
    console.print(results_table(made_up()))
    text = console.export_text()
    lines = [line for line in text.splitlines() if "│" in line]
    assert len(lines) == 4
    a_row = next(line for line in lines if "A per-version" in line)
    for figure in ("12.3", "750", "150", "1.25", "1000", "12.5", "40.0", "8.5"):
        assert figure in a_row
    b_row = next(line for line in lines if "B packed" in line)
    assert "200" in b_row and "40" in b_row and " - " in b_row  # not measured: "-"
    own = next(line for line in lines if "Ray's own (A)" in line)
    assert "540" in own and " 9 " in own


def test_the_results_file_carries_every_measurement(tmp_path: Path) -> None:
    document = payload(made_up(), {"versions": [5]}, {"nproc": 2})
    path = write_results("ray-packing", tmp_path, document)
    assert path.name.startswith("ray-packing-") and path.suffix == ".json"
    loaded = json.loads(path.read_text())
    assert loaded["benchmark"] == "ray-packing"
    assert loaded["settings"] == {"versions": [5]} and loaded["machine"] == {"nproc": 2}
    a, b = loaded["results"]
    assert a["layout"] == "per-version" and a["pss_per_version_mib"] == 150.0
    assert a["restart_s"] == 8.5 and a["versions_down"] == 1
    assert b["notes"] == ["a note"] and b["batches_per_s"] is None
