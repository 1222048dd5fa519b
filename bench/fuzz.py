"""The decoder fuzzing of ``make test``, run long: the same seeded properties of
tests/unit/test_decoder_fuzz.py and tests/integration/test_fuzz_server.py with many more
examples. Prints one row per property (examples, outcome, seconds) and writes JSON.

Usage:
  python -m bench.fuzz [--examples 20000] [--server-examples 2000]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.harness import REPO_ROOT, argument_parser, console, machine_info, new_table, save_results

SUITES = {
    "decoders": "tests/unit/test_decoder_fuzz.py",
    "server": "tests/integration/test_fuzz_server.py",
}


def run(suite: str, examples: int) -> list[dict[str, object]]:
    with TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "TURNOUT_FUZZ_EXAMPLES": str(examples)}
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--junitxml={report}", "--timeout=3600", SUITES[suite]],
            cwd=REPO_ROOT, env=env, check=False,
        )  # fmt: skip
        console.print(f"{suite}: {time.monotonic() - started:.0f} s")
        rows = []
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            rows.append(
                {
                    "suite": suite,
                    "test": case.get("name", ""),
                    "examples": examples,
                    "seconds": float(case.get("time", "0")),
                    "passed": not failed,
                }
            )
        return rows


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--server-examples", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = run("decoders", args.examples) + run("server", args.server_examples)
    table = new_table(
        "Fuzzing", ["suite", "test", "examples", "seconds", "outcome"], {"suite", "test"}
    )
    for row in rows:
        outcome = "[green]passed[/green]" if row["passed"] else "[red]FAILED[/red]"
        table.add_row(
            str(row["suite"]),
            str(row["test"]),
            str(row["examples"]),
            f"{row['seconds']:.1f}",
            outcome,
        )
    console.print(table)
    save_results("fuzz", args.out, {"machine": machine_info(), "results": rows})
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
