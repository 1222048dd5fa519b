"""Which traces are kept: the tail sampler.

After a record's request has finished and its outcome is known, :class:`TailSampler` decides
whether its trace is kept:

    error      every request answered with a status other than 200
    slow       total time >= ``trace_slow_ms``
    p99        total time above the version and arm's p99 (last window, else cumulative),
               the slowest first, within a budget of 1% of the records
    parent     the caller's ``traceparent`` had the sampled flag (``trace_keep_sampled_parents``)
    ratio      the rest, by trace id: its low 64 bits below ``trace_sample_ratio`` * 2^64, so
               every service sampling by ratio on the same id agrees

(``trace``, the last of ``KEEP_REASONS``, is a shadow call kept because its primary request
was: the tracer decides those, a second later.)
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from monitor.settings import MonitorSettings
from turnout_contract.records import RecordBatch

__all__ = ["KEEP_REASONS", "TailSampler"]

KEEP_REASONS = ("error", "slow", "p99", "parent", "ratio", "trace")

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
P99_SHARE = 0.01
P99_BURST = 50.0


class TailSampler:
    """Per record: keep its trace or not, and why (see the module docstring)."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.slow_s = settings.trace_slow_ms / 1e3
        ratio = settings.trace_sample_ratio
        self.all = ratio >= 1.0
        self.threshold = np.uint64(min(int(ratio * 2.0**64), 2**64 - 1))
        self.keep_above_p99 = settings.trace_keep_above_p99
        self.keep_sampled_parents = settings.trace_keep_sampled_parents
        self.p99: dict[tuple[str, int, str], float] = {}
        """(model, version, arm) -> p99 of total time; refreshed by the tracer's tick."""
        self._p99_tokens = P99_BURST

    def reasons(self, batch: RecordBatch) -> list[str | None]:
        """Why each record's trace is kept (one of ``KEEP_REASONS``), or None."""
        columns = batch.columns
        n = batch.rows
        status = np.asarray(columns["status"])
        total = np.asarray(columns["total_s"])
        error = status != 200
        slow = total >= self.slow_s
        if self.keep_above_p99 and self.p99:
            key = (batch.model, batch.version)
            limits = np.array([self.p99.get((*key, arm), math.inf) for arm in columns["arm"]])
            above = self._slowest_within_budget(total, (total > limits) & ~error & ~slow)
        else:
            above = np.zeros(n, np.bool_)
        if self.keep_sampled_parents:
            parent = (np.asarray(columns["trace_flags"]) & 1).astype(np.bool_)
        else:
            parent = np.zeros(n, np.bool_)
        ratio = self.by_ratio(columns["trace_id"])
        choices: list[tuple[BoolArray, str]] = [
            (error, "error"),
            (slow, "slow"),
            (above, "p99"),
            (parent, "parent"),
            (ratio, "ratio"),
        ]
        reasons: list[str | None] = [None] * n
        for mask, reason in reversed(choices):  # the first reason that holds wins
            for index in np.flatnonzero(mask).tolist():
                reasons[index] = reason
        return reasons

    def _slowest_within_budget(self, total: FloatArray, candidates: BoolArray) -> BoolArray:
        """The slowest of ``candidates``, at most 1% of the records seen over time.

        A p99 from the last window lags the traffic: when latency rises, far more than 1%
        exceed it. The budget keeps the rule to its share (each record adds 0.01 of a
        token, up to ``P99_BURST`` saved), and spends it on the slowest first.
        """
        self._p99_tokens = min(self._p99_tokens + P99_SHARE * len(total), P99_BURST)
        found = np.flatnonzero(candidates)
        allowed = int(self._p99_tokens)
        if len(found) > allowed:
            found = found[np.argsort(-total[found], kind="stable")[:allowed]]
            candidates = np.zeros(len(total), np.bool_)
            candidates[found] = True
        self._p99_tokens -= len(found)
        return candidates

    def by_ratio(self, trace_ids: list[str]) -> BoolArray:
        if self.all:
            return np.ones(len(trace_ids), np.bool_)
        if not self.threshold:
            return np.zeros(len(trace_ids), np.bool_)
        low = np.fromiter((int(t[16:32] or "0", 16) for t in trace_ids), np.uint64, len(trace_ids))
        result: BoolArray = low < self.threshold
        return result
