"""Where every benchmark writes its JSON: a timestamped file and a ``-latest`` copy.

Every run writes one ``<name>-<UTC stamp>.json`` (``--out``, default bench/results/), so no
run overwrites another, and ``<name>-latest.json``, a copy of it at a fixed path for looking
at the newest run by hand; no code reads it, and bench/results/.gitignore keeps it out of git.

Commit only the timestamped files that a figure in README.md or docs/ cites (and name the
file next to the figure); the other runs stay on the machine that made them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

__all__ = ["write_results"]


def write_results(name: str, out: Path, payload: dict[str, Any]) -> Path:
    """Write ``out/<name>-<UTC stamp>.json`` and ``out/<name>-latest.json``; return the first."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(payload, indent=2) + "\n"
    path = out / f"{name}-{stamp}.json"
    for target in (path, out / f"{name}-latest.json"):
        tmp = target.with_suffix(".tmp")  # atomic: a reader never sees half a file
        tmp.write_text(text)
        tmp.replace(target)
    return path
