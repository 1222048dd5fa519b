"""What the rollout controller decides from: per-version evidence the gateway sees itself.

An :class:`Evidence` is one of the data plane's observers. For the models under a rollout it
keeps, per version and since the start of the current step (the same window for the stable
and the canary version), the requests answered, the server errors (5xx: backend errors,
injected faults, timeouts; gRPC INTERNAL/UNAVAILABLE/DEADLINE_EXCEEDED), the longest run of
consecutive failures, a log-bucketed latency histogram of successful requests (2% wide
buckets: quantiles within 1%), and per-column sums of the first output tensor (for the
drift gate: means and variances of the canary's outputs against the stable version's).
Everything is O(1) per request and costs nothing for models without a rollout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from turnout_contract.records import RequestRecord

__all__ = ["LATENCY_BUCKETS", "Evidence", "VersionEvidence"]

_LOW_S: Final = 50e-6
_RATIO: Final = 1.02
_LOG_RATIO: Final = math.log(_RATIO)
LATENCY_BUCKETS: Final = int(math.log(120.0 / _LOW_S) / _LOG_RATIO) + 2
"""Bucket i holds latencies in [LOW * RATIO**(i-1), LOW * RATIO**i); 0 below LOW."""
MAX_OUTPUT_COLUMNS: Final = 8


def bucket_upper_s(index: int) -> float:
    return float(_LOW_S * _RATIO**index)


@dataclass(slots=True)
class VersionEvidence:
    """One version's requests since the window started."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: int = 0
    failure_run: int = 0
    """Consecutive failed requests right now (reset by a success)."""
    longest_failure_run: int = 0
    latency: np.ndarray[Any, np.dtype[np.int64]] = field(
        default_factory=lambda: np.zeros(LATENCY_BUCKETS, np.int64)
    )
    output_rows: int = 0
    output_sum: np.ndarray[Any, np.dtype[np.float64]] | None = None
    output_sumsq: np.ndarray[Any, np.dtype[np.float64]] | None = None

    def add(self, record: RequestRecord) -> None:
        self.requests += 1
        if record.status >= 500:
            self.errors += 1
            self.failure_run += 1
            if self.failure_run > self.longest_failure_run:
                self.longest_failure_run = self.failure_run
            return
        if record.status != 200:
            return  # the client's mistake (4xx): neither a failure nor a success
        self.failure_run = 0
        total = record.total_s
        index = int(math.log(total / _LOW_S) / _LOG_RATIO) + 1 if total >= _LOW_S else 0
        self.latency[min(index, LATENCY_BUCKETS - 1)] += 1
        outputs = record.outputs()
        if outputs:
            self._add_outputs(next(iter(outputs.values())), record.rows)

    def _add_outputs(self, tensor: np.ndarray[Any, Any], rows: int) -> None:
        if tensor.dtype.kind not in "biuf" or rows <= 0 or tensor.size == 0:
            return
        values = tensor.reshape(rows, -1)[:, :MAX_OUTPUT_COLUMNS].astype(np.float64)
        if self.output_sum is None or self.output_sumsq is None:
            self.output_sum = values.sum(axis=0)
            self.output_sumsq = np.square(values).sum(axis=0)
        elif values.shape[1] == self.output_sum.shape[0]:
            self.output_sum += values.sum(axis=0)
            self.output_sumsq += np.square(values).sum(axis=0)
        else:
            return
        self.output_rows += rows

    @property
    def successes(self) -> int:
        return int(self.latency.sum())

    def quantile_s(self, q: float) -> float | None:
        """The latency quantile ``q`` of successful requests (bucket upper bound)."""
        total = self.successes
        if not total:
            return None
        index = int(np.searchsorted(np.cumsum(self.latency), q * total, side="left"))
        return bucket_upper_s(index)

    def slower_than(self, threshold_s: float) -> int:
        """Successful requests slower than ``threshold_s`` (to the bucket)."""
        if threshold_s < _LOW_S:
            return self.successes
        index = int(math.log(threshold_s / _LOW_S) / _LOG_RATIO) + 1
        return int(self.latency[index + 1 :].sum()) if index + 1 < LATENCY_BUCKETS else 0

    def output_moments(self) -> tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """(rows, per-column means, per-column variances) of the first output, or None."""
        if self.output_sum is None or self.output_sumsq is None or self.output_rows < 2:
            return None
        n = self.output_rows
        mean = self.output_sum / n
        variance = np.maximum(self.output_sumsq / n - np.square(mean), 0.0) * n / (n - 1)
        return n, mean, variance

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.quantile_s(0.5), self.quantile_s(0.99)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p50_ms": None if p50 is None else round(p50 * 1e3, 3),
            "p99_ms": None if p99 is None else round(p99 * 1e3, 3),
            "longest_failure_run": self.longest_failure_run,
            "seconds": round(time.monotonic() - self.started, 3),
        }


class Evidence:
    """The observer: per watched model, one :class:`VersionEvidence` per watched version."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[int, VersionEvidence]] = {}
        self.on_failure: Callable[[], None] | None = None
        """Called on every failed request of a watched version (the controller wakes up:
        the trip-wire rolls back without waiting for its tick)."""

    def watch(self, model: str, versions: list[int]) -> None:
        """Start a new window for ``versions`` of ``model`` (a rollout's step starts)."""
        now = time.monotonic()
        self.windows[model] = {v: VersionEvidence(started=now) for v in versions}

    def forget(self, model: str) -> None:
        self.windows.pop(model, None)

    def of(self, model: str, version: int) -> VersionEvidence | None:
        return self.windows.get(model, {}).get(version)

    def observe(self, record: RequestRecord) -> None:
        window = self.windows.get(record.model)
        if window is None:
            return
        version = window.get(record.version)
        if version is not None:
            version.add(record)
            if record.status >= 500 and self.on_failure is not None:
                self.on_failure()
