"""A mergeable latency sketch: DDSketch's logarithmic mapping over a dense count array.

A value x > 0 goes to bucket key = ceil(log_gamma(x)) with gamma = (1 + a) / (1 - a), so
bucket k holds (gamma**(k-1), gamma**k] and reads back as gamma**k * 2 / (1 + gamma): every
value in the bucket is within relative error a of it (a = 1% by default). Keys are computed
exactly as the ddsketch package's ``LogarithmicMapping`` computes them, and quantiles use its
rank rule, so with the same relative accuracy both give identical buckets and quantiles.

OpenTelemetry's exponential histograms and Prometheus native histograms number the same
buckets one lower (their index i holds (base**i, base**(i+1)]): export key - 1 there.

The count array is dense between ``min_value`` and ``max_value`` (1 ns to ~11.6 days in
seconds: 1,728 buckets, 14 KiB at 1%): adding is one log per value, merging is adding
arrays (exact: counts are integers), and the array is what gets shipped. Values below
``min_value`` (zero included) are counted in bucket 0 and read as 0, like DDSketch's zero
bucket; values above ``max_value`` are counted in the top bucket.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from monitor import _kernels

__all__ = ["LatencySketch"]


class LatencySketch:
    """Counts of non-negative values (latencies) in log buckets of bounded relative error."""

    __slots__ = (
        "_counts",
        "gamma",
        "key_max",
        "key_min",
        "max_value",
        "min_value",
        "multiplier",
        "relative_accuracy",
    )

    def __init__(
        self,
        relative_accuracy: float = 0.01,
        *,
        min_value: float = 1e-9,
        max_value: float = 1e6,
    ) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy}")
        if not (0.0 < min_value < max_value < math.inf):
            raise ValueError(
                f"need 0 < min_value < max_value < inf, got {min_value} and {max_value}"
            )
        self.relative_accuracy = relative_accuracy
        self.min_value = min_value
        self.max_value = max_value
        # The ddsketch package's LogarithmicMapping, operation for operation.
        gamma_mantissa = 2 * relative_accuracy / (1 - relative_accuracy)
        self.gamma = 1 + gamma_mantissa
        self.multiplier = 1 / math.log1p(gamma_mantissa) * math.log(2)
        self.key_min = self._key(min_value)
        self.key_max = self._key(max_value)
        self._counts = np.zeros(self.key_max - self.key_min + 2, dtype=np.int64)

    def _key(self, value: float) -> int:
        return math.ceil(math.log(value, 2) * self.multiplier)

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        """Bucket counts, read-only: ``[below min_value, key_min, ..., key_max]``."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    @property
    def count(self) -> int:
        return int(self._counts.sum())

    def bucket_keys(self) -> npt.NDArray[np.int64]:
        """The key of each bucket after the first (``counts[1:]``)."""
        return np.arange(self.key_min, self.key_max + 1, dtype=np.int64)

    def add(self, values: npt.ArrayLike) -> None:
        """Add values (seconds, or any unit fixed for the sketch); NaN or negative raise."""
        array = np.ascontiguousarray(values, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"values must be one-dimensional, got shape {array.shape}")
        if array.size == 0:
            return
        if not (array >= 0).all():  # NaN fails the comparison too
            raise ValueError("latencies must be non-negative numbers (found NaN or < 0)")
        _kernels.sketch_add(array, self.multiplier, self.min_value, self.key_min, self._counts)

    def mergeable(self, other: LatencySketch) -> bool:
        return (
            self.gamma == other.gamma
            and self.key_min == other.key_min
            and self.key_max == other.key_max
            and self.min_value == other.min_value
        )

    def merge(self, other: LatencySketch) -> None:
        """Add ``other``'s counts into this sketch: the result is exactly the sketch of both
        inputs' values."""
        if not self.mergeable(other):
            raise ValueError(
                "cannot merge sketches with different accuracy or range: "
                f"({self.relative_accuracy}, {self.min_value}, {self.max_value}) vs "
                f"({other.relative_accuracy}, {other.min_value}, {other.max_value})"
            )
        self._counts += other._counts

    def copy(self) -> LatencySketch:
        clone = LatencySketch(
            self.relative_accuracy, min_value=self.min_value, max_value=self.max_value
        )
        clone._counts[:] = self._counts
        return clone

    def quantiles(self, qs: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Quantiles for each q in [0, 1]; NaN where the sketch is empty."""
        array = np.ascontiguousarray(qs, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"qs must be one-dimensional, got shape {array.shape}")
        if not ((array >= 0) & (array <= 1)).all():
            raise ValueError("quantiles must be in [0, 1]")
        out = np.empty(array.size, dtype=np.float64)
        _kernels.sketch_quantiles(
            self._counts, array, self.multiplier, self.gamma, self.key_min, out
        )
        return out

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1); NaN when empty.

        Within ``relative_accuracy`` of the order statistic of rank floor(q * (count - 1)),
        numpy's ``quantile(values, q, method="lower")``.
        """
        return float(self.quantiles(np.array([q]))[0])
