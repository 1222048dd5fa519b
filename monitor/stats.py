"""Drift statistics between a reference sample and live traffic, on numba kernels.

Binned statistics work on count vectors, so the reference is reduced once and live values
only need counting:

    bins = ReferenceBins.fit(reference)            # edges fitted once
    ref_counts = bins.counts(reference)
    window = bins.counts(batch)                    # or bins.add(batch, window) per batch
    psi(ref_counts, window), js_distance(...), hellinger(...)

Sort-based statistics (``ks_statistic``, ``wasserstein_normed``) take ``SortedSample``s: the
reference is sorted once with numpy, live data is sorted per call with numpy, and the
kernels only merge.

Categorical features are count vectors over the same category list on both sides
(``category_counts`` builds them from integer codes): ``chi2_cramers_v``,
``categorical_js``, ``l_infinity``, and ``psi`` too.

Formulas follow the implementations users compare against, and the tests check them there
(tests/unit/monitor): PSI is Evidently's (its zero fill included), JS is scipy's
``jensenshannon`` in base 2 (Evidently's ``jensenshannon`` test with ``base=2``), KS D is
``scipy.stats.ks_2samp``'s, the normed Wasserstein distance is Evidently's
``wasserstein_distance / max(std(reference), 0.001)``, chi2 is
``scipy.stats.chi2_contingency(correction=False)`` on the 2 x k table.

Every wrapper validates in Python and raises ValueError; kernels never check. At these
volumes p-values carry no information, so none are computed: alert on the distances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from monitor import _kernels
from monitor.sketch import LatencySketch

__all__ = [
    "Chi2Result",
    "ReferenceBins",
    "SortedSample",
    "categorical_js",
    "category_counts",
    "chi2_cramers_v",
    "hellinger",
    "js_distance",
    "ks_statistic",
    "l_infinity",
    "psi",
    "warm_up",
    "wasserstein_normed",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Evidently's floor for the reference standard deviation in the normed Wasserstein distance.
WASSERSTEIN_MIN_NORM = 0.001


def _values(values: npt.ArrayLike, name: str) -> FloatArray:
    array = np.ascontiguousarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _finite_values(values: npt.ArrayLike, name: str) -> FloatArray:
    array = _values(values, name)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _count_pair(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    ref = _values(reference, "reference counts")
    cur = _values(current, "current counts")
    if ref.shape != cur.shape:
        raise ValueError(
            f"count vectors differ in length: reference {ref.size}, current {cur.size}"
        )
    for name, counts in (("reference", ref), ("current", cur)):
        if counts.size == 0:
            raise ValueError(f"{name} counts are empty")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"{name} counts must be finite and non-negative")
        if counts.sum() <= 0:
            raise ValueError(f"{name} counts sum to zero: nothing to compare")
    return ref, cur


def _scalar(
    kernel: Callable[[FloatArray, FloatArray, FloatArray], None], ref: FloatArray, cur: FloatArray
) -> float:
    out = np.empty(1, dtype=np.float64)
    kernel(ref, cur, out)
    return float(out[0])


@dataclass(frozen=True, eq=False)
class ReferenceBins:
    """Bin edges fitted once on the reference sample; live values are counted into them.

    ``counts`` returns ``n_bins + 2`` counts: values below the first edge, the bins, values
    above the last edge (numpy.histogram's bins, closed on the left except the last).
    Reference values never fall outside, but live values do, and PSI/JS/Hellinger see
    that mass in the outer bins instead of silently dropping it. NaN is not counted.

    ``fit`` defaults to quantile edges (equal reference mass per bin): every bin holds
    ~n/n_bins reference values, so PSI never meets a near-empty reference bin (where
    Evidently's zero fill dominates the sum), and skewed features such as latencies or
    amounts are resolved where their mass is. ``strategy="equal_width"`` gives numpy's
    ``histogram_bin_edges`` (Evidently's binning, with ``n_bins="sturges"``), counted with
    a direct index instead of a search. The tests compare both against Evidently on the same
    edges.
    """

    edges: FloatArray
    uniform: bool

    @classmethod
    def fit(
        cls,
        reference: npt.ArrayLike,
        n_bins: int | Literal["sturges"] = 10,
        *,
        strategy: Literal["quantile", "equal_width"] = "quantile",
    ) -> ReferenceBins:
        """Fit edges on ``reference`` (NaN ignored).

        Quantile edges that coincide (ties in the reference) are merged, so a discrete
        feature can get fewer than ``n_bins`` bins. A constant reference gets the single bin
        ``[v - 0.5, v + 0.5]``, as numpy.histogram does.
        """
        values = _values(reference, "reference")
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise ValueError("reference has no values (empty or all NaN)")
        if not np.isfinite(values).all():
            raise ValueError("reference contains infinite values")
        if not (n_bins == "sturges" or (isinstance(n_bins, int) and n_bins >= 1)):
            raise ValueError(f"n_bins must be a positive integer or 'sturges', got {n_bins!r}")
        if strategy == "equal_width":
            return cls.from_edges(np.histogram_bin_edges(values, bins=n_bins))
        if strategy != "quantile":
            raise ValueError(f"strategy must be 'quantile' or 'equal_width', got {strategy!r}")
        if n_bins == "sturges":
            n_bins = int(np.ceil(np.log2(values.size))) + 1
        edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size < 2:
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        return cls.from_edges(edges)

    @classmethod
    def from_edges(cls, edges: npt.ArrayLike) -> ReferenceBins:
        """Use given edges (finite, strictly increasing, at least two).

        Edges equal to ``np.linspace(edges[0], edges[-1], len(edges))`` are counted with the
        equal-width kernel; the result is the same either way.
        """
        array = _values(edges, "edges").copy()
        if array.size < 2:
            raise ValueError("need at least two edges")
        if not np.isfinite(array).all():
            raise ValueError("edges must be finite")
        if not (np.diff(array) > 0).all():
            raise ValueError("edges must be strictly increasing")
        array.flags.writeable = False
        uniform = bool(np.array_equal(array, np.linspace(array[0], array[-1], array.size)))
        return cls(edges=array, uniform=uniform)

    @property
    def n_bins(self) -> int:
        """Bins between the edges (``counts`` has two more: below and above)."""
        return int(self.edges.size - 1)

    def counts(self, values: npt.ArrayLike) -> IntArray:
        """Counts of ``values``: ``[below, bin 0, ..., bin n-1, above]``."""
        out = np.zeros(self.n_bins + 2, dtype=np.int64)
        self.add(values, out)
        return out

    def add(self, values: npt.ArrayLike, counts: IntArray) -> None:
        """Add ``values`` into running ``counts`` (int64, length ``n_bins + 2``) in place."""
        if (
            not isinstance(counts, np.ndarray)
            or counts.dtype != np.int64
            or counts.shape != (self.n_bins + 2,)
            or not counts.flags.c_contiguous
            or not counts.flags.writeable
        ):
            shape = (self.n_bins + 2,)
            raise ValueError(f"counts must be a writeable, contiguous int64 array of shape {shape}")
        array = _values(values, "values")
        if self.uniform:
            _kernels.histogram_uniform(array, self.edges, counts)
        else:
            _kernels.histogram_search(array, self.edges, counts)


def category_counts(codes: npt.ArrayLike, n_categories: int) -> IntArray:
    """Count integer category codes: ``n_categories`` counts, then one for any other code.

    The last slot collects codes outside ``[0, n_categories)`` (categories the reference
    never saw); it takes part in the categorical statistics like any category.
    """
    if n_categories < 1:
        raise ValueError(f"n_categories must be >= 1, got {n_categories}")
    array = np.asarray(codes)
    if array.ndim != 1:
        raise ValueError(f"codes must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {array.dtype}")
    out = np.zeros(n_categories + 1, dtype=np.int64)
    _kernels.category_counts(np.ascontiguousarray(array, dtype=np.int64), out)
    return out


def psi(
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    *,
    both_empty: Literal["skip", "fill"] = "skip",
) -> float:
    """Population stability index between two count vectors over the same bins.

    Evidently's formula and zero handling: shares are count / total; a zero share becomes
    the smallest non-zero share of its side / 1e6 when that is <= 1e-4, else 1e-4; PSI =
    sum((r - c) * ln(r / c)).

    ``both_empty`` decides bins empty on *both* sides. ``"skip"`` (default): they add 0, as
    in Evidently's categorical path, which only sees categories present on one side.
    ``"fill"``: both zeros are filled, as in Evidently's numerical path, where such a bin
    adds (fill_ref - fill_cur) * ln(fill_ref / fill_cur), up to ~2e-3 when the two sides'
    fills differ, for a bin nobody saw. Reference-fitted bins make that artefact common (the
    outer bins are always empty in the reference, and a few outliers in the current window
    change its fill), so it is off by default; ``"fill"`` reproduces Evidently's numerical
    PSI bit for bit on the same edges.
    """
    if both_empty not in ("skip", "fill"):
        raise ValueError(f"both_empty must be 'skip' or 'fill', got {both_empty!r}")
    ref, cur = _count_pair(reference, current)
    out = np.empty(1, dtype=np.float64)
    _kernels.psi_counts(ref, cur, both_empty == "fill", out)
    return float(out[0])


def js_distance(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count vectors."""
    ref, cur = _count_pair(reference, current)
    return _scalar(_kernels.js_counts, ref, cur)


def hellinger(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Hellinger distance (in [0, 1]) between two count vectors."""
    ref, cur = _count_pair(reference, current)
    return _scalar(_kernels.hellinger_counts, ref, cur)


def categorical_js(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2) between category count vectors.

    The same statistic as ``js_distance``; categories empty on both sides add nothing, so
    the category list may include categories neither side saw.
    """
    return js_distance(reference, current)


def l_infinity(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Largest absolute difference between the two category shares (Chebyshev)."""
    ref, cur = _count_pair(reference, current)
    return _scalar(_kernels.linf_counts, ref, cur)


class Chi2Result(NamedTuple):
    statistic: float
    """Pearson's chi-squared of the 2 x k table [reference; current]."""
    cramers_v: float
    """sqrt(chi2 / N): Cramer's V for two rows, in [0, 1]; 0 with a single category."""
    dof: int
    """k - 1 over the categories seen on either side."""


def chi2_cramers_v(reference: npt.ArrayLike, current: npt.ArrayLike) -> Chi2Result:
    """Chi-squared homogeneity statistic and Cramer's V between category count vectors.

    No continuity correction; categories empty on both sides are dropped (they have no
    expected count).
    """
    ref, cur = _count_pair(reference, current)
    out = np.empty(3, dtype=np.float64)
    _kernels.chi2_counts(ref, cur, out)
    return Chi2Result(float(out[0]), float(out[1]), int(out[2]))


@dataclass(frozen=True, eq=False)
class SortedSample:
    """A sample sorted once (numpy), with the population standard deviation Evidently norms
    the Wasserstein distance by. Build the reference's once; live windows per call."""

    values: FloatArray
    std: float

    @classmethod
    def of(cls, values: npt.ArrayLike) -> SortedSample:
        array = _finite_values(values, "sample")
        std = float(np.std(array))
        array = np.sort(array)
        array.flags.writeable = False
        return cls(values=array, std=std)

    def __len__(self) -> int:
        return int(self.values.size)


def _sorted(sample: SortedSample | npt.ArrayLike) -> SortedSample:
    return sample if isinstance(sample, SortedSample) else SortedSample.of(sample)


def ks_statistic(
    reference: SortedSample | npt.ArrayLike, current: SortedSample | npt.ArrayLike
) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D (identical to scipy's ks_2samp)."""
    ref = _sorted(reference)
    cur = _sorted(current)
    out = np.empty(1, dtype=np.float64)
    _kernels.ks_sorted(ref.values, cur.values, out)
    return float(out[0])


def wasserstein_normed(
    reference: SortedSample | npt.ArrayLike,
    current: SortedSample | npt.ArrayLike,
    *,
    norm: float | None = None,
) -> float:
    """Wasserstein-1 distance divided by ``norm``, by default Evidently's
    ``max(std(reference), 0.001)`` (population std), so the distance reads in reference
    standard deviations. Symmetric only for a fixed ``norm``."""
    ref = _sorted(reference)
    cur = _sorted(current)
    if norm is None:
        norm = max(ref.std, WASSERSTEIN_MIN_NORM)
    elif not (np.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be positive and finite, got {norm}")
    out = np.empty(1, dtype=np.float64)
    _kernels.wasserstein_sorted(ref.values, cur.values, out)
    return float(out[0]) / norm


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, for the sidecar's start."""
    sample = np.linspace(-1.0, 1.0, 16)
    for strategy in ("quantile", "equal_width"):
        bins = ReferenceBins.fit(sample, 4, strategy=strategy)
        counts = bins.counts(sample)
        psi(counts, counts)
        psi(counts, counts, both_empty="fill")
        js_distance(counts, counts)
        hellinger(counts, counts)
    categories = category_counts(np.arange(4), 3)
    chi2_cramers_v(categories, categories)
    l_infinity(categories, categories)
    ref = SortedSample.of(sample)
    ks_statistic(ref, ref)
    wasserstein_normed(ref, ref)
    sketch = LatencySketch()
    sketch.add(np.array([0.001, 0.01]))
    sketch.quantile(0.5)
