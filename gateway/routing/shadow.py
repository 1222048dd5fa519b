"""Shadow traffic: a copy of a request goes to the shadow version; the answers are compared.

The mirrored call never delays or changes the primary answer: it runs as a background task
after the primary was submitted, and its outcome is only counted (:class:`ShadowStats`) and
recorded (a ``shadow`` :class:`turnout_contract.records.RequestRecord`, handed to the same
observers as requests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.batching import Batcher
from gateway.errors import TurnoutError
from turnout_contract.records import SHADOW, BatchTiming, RequestRecord, Tensors
from turnout_contract.trace import TraceContext

__all__ = ["ShadowMirror", "ShadowStats", "compare_answers"]


@dataclass(slots=True)
class ShadowStats:
    """Agreement between a model's primary answers and its shadow version's."""

    requests: int = 0
    errors: int = 0
    shed: int = 0
    """Copies not sent because the primary was under pressure (not in ``requests``)."""
    exact_matches: int = 0
    compared: int = 0
    """Answer pairs compared (a copy still running, or whose primary failed, is not)."""
    abs_diff_sum: float = 0.0
    compared_values: int = 0

    def public(self) -> dict[str, Any]:
        compared = self.compared
        return {
            "requests": self.requests,
            "errors": self.errors,
            "shed": self.shed,
            "exact_match_rate": self.exact_matches / compared if compared else None,
            "mean_abs_diff": self.abs_diff_sum / self.compared_values
            if self.compared_values
            else None,
        }


def compare_answers(primary: Tensors, shadow: Tensors, stats: ShadowStats) -> None:
    """Count one exact match or mismatch, and the absolute differences of numeric outputs."""
    exact = True
    for key, value in primary.items():
        other = shadow.get(key)
        if other is None or other.shape != value.shape:
            exact = False
            continue
        if not np.array_equal(value, other):
            exact = False
        if value.dtype.kind in "biuf" and value.size:
            diff = np.abs(value.astype(np.float64) - other.astype(np.float64))
            stats.abs_diff_sum += float(diff.sum())
            stats.compared_values += value.size
    stats.exact_matches += exact
    stats.compared += 1


class ShadowMirror:
    """Mirrors requests to shadow versions; keeps :class:`ShadowStats` per (model, version)."""

    def __init__(self, observers: Sequence[Callable[[RequestRecord], None]] = ()) -> None:
        self.observers = observers
        """Each gets the record of every mirrored call."""
        self.stats: dict[tuple[str, int], ShadowStats] = {}
        self._background: set[asyncio.Task[None]] = set()

    def shed(self, name: str, version: int) -> None:
        """Count a copy not sent: the primary is under pressure (shadows go first)."""
        self.stats.setdefault((name, version), ShadowStats()).shed += 1

    def mirror(
        self,
        name: str,
        version: int,
        shadow: Batcher | None,
        tensors: Tensors,
        rows: int,
        primary: asyncio.Future[Tensors],
        trace: TraceContext,
    ) -> None:
        """Send a copy to ``shadow`` (None: that version is not loaded); never wait on it."""
        stats = self.stats.setdefault((name, version), ShadowStats())
        stats.requests += 1
        if shadow is None:
            stats.errors += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._call(name, version, shadow, tensors, rows, primary, trace, stats)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _call(
        self,
        name: str,
        version: int,
        shadow: Batcher,
        tensors: Tensors,
        rows: int,
        primary: asyncio.Future[Tensors],
        trace: TraceContext,
        stats: ShadowStats,
    ) -> None:
        started = time.perf_counter()
        timing = BatchTiming()
        mirrored: Tensors | None = None
        try:
            mirrored = await shadow.submit(tensors, rows, None, timing)
        except Exception as exc:
            stats.errors += 1
            status = exc.http_status if isinstance(exc, TurnoutError) else 500
            error = exc.message if isinstance(exc, TurnoutError) else str(exc)
        else:
            status, error = 200, ""
        took = time.perf_counter() - started
        record = RequestRecord(
            name, version, 0, SHADOW, status, time.time_ns() - int(took * 1e9), started,
            started, took, timing, trace.child(), SHADOW, "", "", error, "",
        )  # fmt: skip
        for observe in self.observers:
            observe(record)
        if mirrored is None:
            return
        try:
            answered = await primary
        except Exception:
            stats.errors += 1
            return
        compare_answers(answered, mirrored, stats)
