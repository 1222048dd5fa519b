"""monitor.stats and monitor.sketch against reference implementations, plus properties.

One table of (our statistic, reference implementation) pairs, run over seeded samples of
several shapes and sizes: Evidently's own stattest functions (PSI, Jensen-Shannon,
Hellinger, normed Wasserstein), scipy (ks_2samp, wasserstein_distance, chi2_contingency,
association, jensenshannon, chebyshev). Binned statistics get the same bins on both sides:
either our counts on Evidently's edges (its numerical path), or Evidently's categorical path
fed our bin indices, which is how Evidently computes a statistic from given bins.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from ddsketch import DDSketch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import chebyshev, jensenshannon

from monitor import _kernels
from monitor.sketch import LatencySketch
from monitor.stats import (
    ReferenceBins,
    SortedSample,
    categorical_js,
    category_counts,
    chi2_cramers_v,
    hellinger,
    js_distance,
    ks_statistic,
    l_infinity,
    psi,
    warm_up,
    wasserstein_normed,
)

with warnings.catch_warnings():
    # Evidently's import reaches numpy.core and other deprecated corners.
    warnings.simplefilter("ignore")
    from evidently.legacy.calculations.stattests.hellinger_distance import (
        _hellinger_distance,
    )
    from evidently.legacy.calculations.stattests.jensenshannon import _jensenshannon
    from evidently.legacy.calculations.stattests.psi import _psi
    from evidently.legacy.calculations.stattests.wasserstein_distance_norm import (
        _wasserstein_distance_norm,
    )
    from evidently.legacy.core import ColumnType

TOLERANCE = 1e-9
NUM = ColumnType.Numerical
CAT = ColumnType.Categorical
Array = np.ndarray


# --- seeded samples: (reference, current) pairs ------------------------------------------

SIZES = (300, 5_000, 50_000)


def _pair(kind: str, n: int) -> tuple[Array, Array]:
    rng = np.random.default_rng([KINDS.index(kind), n])
    match kind:
        case "same":
            return rng.normal(0, 1, n), rng.normal(0, 1, n)
        case "shifted":
            return rng.normal(0, 1, n), rng.normal(0.25, 1, n)
        case "scaled":
            return rng.normal(5, 2, n), rng.normal(5, 3, n)
        case "lognormal":
            return rng.lognormal(0, 1, n), rng.lognormal(0.2, 1.1, n)
        case "heavy_tail":
            return rng.standard_t(3, n), rng.standard_t(3, n) * 1.2 + 0.1
        case "uneven":  # different sizes, partly outside the reference's range
            return rng.uniform(0, 1, n), rng.uniform(0.3, 1.4, n // 3 + 7)
    raise AssertionError(kind)


KINDS = ("same", "shifted", "scaled", "lognormal", "heavy_tail", "uneven")
CASES = [(kind, n) for kind in KINDS for n in SIZES]


def _s(values: Array) -> pd.Series:
    return pd.Series(values)


def _bin_index(bins: ReferenceBins, values: Array) -> Array:
    """Each value's slot in ``bins.counts`` (0 below, 1..n bins, n + 1 above)."""
    index = np.searchsorted(bins.edges, values, side="right")
    index[values == bins.edges[-1]] = bins.n_bins  # last bin is closed on the right
    return index


def _sturges_combined(ref: Array, cur: Array) -> ReferenceBins:
    """Evidently's numerical binning: Sturges edges over both samples together."""
    return ReferenceBins.from_edges(np.histogram_bin_edges(np.concatenate([ref, cur]), "sturges"))


def _sturges_unique(ref: Array, cur: Array) -> ReferenceBins:
    """Evidently's Hellinger binning: Sturges edges over the distinct values."""
    return ReferenceBins.from_edges(np.histogram_bin_edges(np.unique(np.r_[ref, cur]), "sturges"))


def _interior(bins: ReferenceBins, values: Array) -> Array:
    return bins.counts(values)[1:-1]


# --- numerical table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    ours: Callable[[Array, Array], float]
    reference: Callable[[Array, Array], float]


def _ours_psi_evidently_bins(ref: Array, cur: Array) -> float:
    bins = _sturges_combined(ref, cur)
    return psi(_interior(bins, ref), _interior(bins, cur), both_empty="fill")


def _ours_js_evidently_bins(ref: Array, cur: Array) -> float:
    bins = _sturges_combined(ref, cur)
    return js_distance(_interior(bins, ref), _interior(bins, cur))


def _ours_hellinger_evidently_bins(ref: Array, cur: Array) -> float:
    bins = _sturges_unique(ref, cur)
    return hellinger(_interior(bins, ref), _interior(bins, cur))


def _quantile_bins(statistic: Callable[[Array, Array], float]) -> Callable[[Array, Array], float]:
    def ours(ref: Array, cur: Array) -> float:
        bins = ReferenceBins.fit(ref, 10)
        return statistic(bins.counts(ref), bins.counts(cur))

    return ours


def _evidently_on_quantile_bins(
    evidently: Callable[..., tuple[float, bool]], **kwargs: object
) -> Callable[[Array, Array], float]:
    """Evidently's categorical path over our reference-fitted quantile bins (under- and
    overflow slots included): Evidently computes the statistic from the same bins."""

    def reference(ref: Array, cur: Array) -> float:
        bins = ReferenceBins.fit(ref, 10)
        ref_idx, cur_idx = _bin_index(bins, ref), _bin_index(bins, cur)
        return float(evidently(_s(ref_idx), _s(cur_idx), CAT, 0.1, **kwargs)[0])

    return reference


NUMERIC_PAIRS = [
    Pair(
        "psi vs evidently (its Sturges bins)",
        _ours_psi_evidently_bins,
        lambda r, c: float(_psi(_s(r), _s(c), NUM, 0.1)[0]),
    ),
    Pair(
        "psi vs evidently (reference quantile bins)",
        _quantile_bins(psi),
        _evidently_on_quantile_bins(_psi),
    ),
    Pair(
        "js vs evidently base 2 (its Sturges bins)",
        _ours_js_evidently_bins,
        lambda r, c: float(_jensenshannon(_s(r), _s(c), NUM, 0.1, base=2)[0]),
    ),
    Pair(
        "js vs evidently base 2 (reference quantile bins)",
        _quantile_bins(js_distance),
        _evidently_on_quantile_bins(_jensenshannon, base=2),
    ),
    Pair(
        "hellinger vs evidently (its Sturges bins)",
        _ours_hellinger_evidently_bins,
        lambda r, c: float(_hellinger_distance(_s(r), _s(c), NUM, 0.1)[0]),
    ),
    Pair(
        "hellinger vs evidently (reference quantile bins)",
        _quantile_bins(hellinger),
        _evidently_on_quantile_bins(_hellinger_distance),
    ),
    Pair(
        "ks D vs scipy ks_2samp",
        ks_statistic,
        lambda r, c: float(scipy.stats.ks_2samp(r, c).statistic),
    ),
    Pair(
        "wasserstein normed vs evidently",
        wasserstein_normed,
        lambda r, c: float(_wasserstein_distance_norm(_s(r), _s(c), NUM, 0.1)[0]),
    ),
    Pair(
        "wasserstein normed vs scipy / std",
        lambda r, c: wasserstein_normed(SortedSample.of(r), c),
        lambda r, c: float(scipy.stats.wasserstein_distance(r, c)) / max(float(np.std(r)), 1e-3),
    ),
]


@pytest.mark.parametrize("kind,n", CASES, ids=[f"{k}-{n}" for k, n in CASES])
@pytest.mark.parametrize("pair", NUMERIC_PAIRS, ids=[p.name for p in NUMERIC_PAIRS])
def test_numeric_statistic_matches_reference(pair: Pair, kind: str, n: int) -> None:
    ref, cur = _pair(kind, n)
    ours = pair.ours(ref, cur)
    expected = pair.reference(ref, cur)
    assert math.isfinite(ours)
    assert abs(ours - expected) <= TOLERANCE, (ours, expected)


@pytest.mark.parametrize("kind,n", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_ks_is_bit_identical_to_scipy_asymptotic(kind: str, n: int) -> None:
    # ks_2samp's exact mode (n <= 10,000) re-rounds D to h / lcm(n1, n2); its asymptotic
    # mode returns max |F1 - F2| as computed, which is what the merge computes.
    ref, cur = _pair(kind, n)
    assert ks_statistic(ref, cur) == scipy.stats.ks_2samp(ref, cur, method="asymp").statistic


def test_skipping_bins_empty_on_both_sides_is_the_only_difference() -> None:
    ref, cur = _pair("heavy_tail", 5_000)
    bins = _sturges_combined(ref, cur)
    r, c = _interior(bins, ref), _interior(bins, cur)
    both_empty = (r == 0) & (c == 0)
    assert both_empty.any()  # the case this test is about
    assert psi(r, c) == pytest.approx(psi(r[~both_empty], c[~both_empty], both_empty="fill"))
    evidently = float(_psi(_s(ref), _s(cur), NUM, 0.1)[0])
    assert abs(psi(r, c, both_empty="fill") - evidently) <= TOLERANCE


# --- categorical table ---------------------------------------------------------------------


def _categorical_pair(seed: int, k: int, n: int, drift: float) -> tuple[Array, Array]:
    """Category codes: reference from a Dirichlet draw, current moved towards another."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k))
    q = (1 - drift) * p + drift * rng.dirichlet(np.ones(k))
    return rng.choice(k, n, p=p), rng.choice(k, max(n // 2, 1), p=q)


CATEGORICAL_CASES = [
    (seed, k, n, drift)
    for seed, (k, n) in enumerate([(2, 200), (5, 2_000), (12, 50_000), (40, 100_000)])
    for drift in (0.0, 0.2, 0.8)
]


def _counts(codes: Array, k: int) -> Array:
    return category_counts(codes, k)[:-1]


def _observed(ref_counts: Array, cur_counts: Array) -> tuple[Array, Array]:
    keep = (ref_counts + cur_counts) > 0
    return ref_counts[keep], cur_counts[keep]


@dataclass(frozen=True)
class CategoricalPair:
    name: str
    ours: Callable[[Array, Array], float]
    reference: Callable[[Array, Array, Array, Array], float]  # counts, then raw codes
    relative: bool = False


def _chi2_reference(r: Array, c: Array, *_: Array) -> float:
    table = np.vstack(_observed(r, c))
    return float(scipy.stats.chi2_contingency(table, correction=False).statistic)


def _cramers_reference(r: Array, c: Array, *_: Array) -> float:
    table = np.vstack(_observed(r, c))
    if table.shape[1] < 2:
        return 0.0
    return float(scipy.stats.contingency.association(table, method="cramer", correction=False))


def _share(x: Array) -> Array:
    return x / x.sum()


CATEGORICAL_PAIRS = [
    CategoricalPair(
        "chi2 vs scipy chi2_contingency (relative)",
        lambda r, c: chi2_cramers_v(r, c).statistic,
        _chi2_reference,
        relative=True,
    ),
    CategoricalPair(
        "cramers v vs scipy association",
        lambda r, c: chi2_cramers_v(r, c).cramers_v,
        _cramers_reference,
    ),
    CategoricalPair(
        "categorical js vs scipy jensenshannon base 2",
        categorical_js,
        lambda r, c, *_: float(jensenshannon(r, c, base=2)),
    ),
    CategoricalPair(
        "l_infinity vs scipy chebyshev",
        l_infinity,
        lambda r, c, *_: float(chebyshev(_share(r), _share(c))),
    ),
    CategoricalPair(
        "psi vs evidently categorical",
        psi,
        lambda r, c, rc, cc: float(_psi(_s(rc), _s(cc), CAT, 0.1)[0]),
    ),
    CategoricalPair(
        "js vs evidently categorical base 2",
        categorical_js,
        lambda r, c, rc, cc: float(_jensenshannon(_s(rc), _s(cc), CAT, 0.1, base=2)[0]),
    ),
    CategoricalPair(
        "hellinger vs evidently categorical",
        hellinger,
        lambda r, c, rc, cc: float(_hellinger_distance(_s(rc), _s(cc), CAT, 0.1)[0]),
    ),
]


@pytest.mark.parametrize(
    "seed,k,n,drift", CATEGORICAL_CASES, ids=[f"k{k}-n{n}-d{d}" for _, k, n, d in CATEGORICAL_CASES]
)
@pytest.mark.parametrize("pair", CATEGORICAL_PAIRS, ids=[p.name for p in CATEGORICAL_PAIRS])
def test_categorical_statistic_matches_reference(
    pair: CategoricalPair, seed: int, k: int, n: int, drift: float
) -> None:
    ref_codes, cur_codes = _categorical_pair(seed, k, n, drift)
    r, c = _counts(ref_codes, k), _counts(cur_codes, k)
    ours = pair.ours(r, c)
    expected = pair.reference(r, c, ref_codes, cur_codes)
    bound = TOLERANCE * max(1.0, abs(expected)) if pair.relative else TOLERANCE
    assert abs(ours - expected) <= bound, (ours, expected)


def test_chi2_dof_and_unseen_categories() -> None:
    counts = category_counts(np.array([0, 0, 1, 2, 7, -1]), 3)
    assert counts.tolist() == [2, 1, 1, 2]
    result = chi2_cramers_v([10, 0, 5, 0], [4, 0, 9, 1])
    table = np.array([[10, 5, 0], [4, 9, 1]])
    assert result.dof == scipy.stats.chi2_contingency(table, correction=False).dof == 2


# --- histograms ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.integers(0, 60),
        elements=st.one_of(
            st.floats(-5, 5, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5, np.nan])
        ),
    ),
    edges=st.lists(st.floats(-4, 4, allow_nan=False), min_size=2, max_size=12, unique=True),
)
def test_histogram_kernels_match_numpy(values: Array, edges: list[float]) -> None:
    sorted_edges = np.sort(np.array(edges))
    uniform = np.linspace(sorted_edges[0], sorted_edges[-1], len(edges))
    candidates = [sorted_edges] + ([uniform] if (np.diff(uniform) > 0).all() else [])
    for candidate in candidates:
        bins = ReferenceBins.from_edges(candidate)
        counts = bins.counts(values)
        finite = values[~np.isnan(values)]
        assert counts[1:-1].tolist() == np.histogram(finite, candidate)[0].tolist()
        assert counts[0] == (finite < candidate[0]).sum()
        assert counts[-1] == (finite > candidate[-1]).sum()
        # Both kernels agree on any edges (the uniform one only gets equal-width edges).
        searched = np.zeros_like(counts)
        _kernels.histogram_search(np.ascontiguousarray(values), bins.edges, searched)
        assert searched.tolist() == counts.tolist()


def test_reference_bins_fit() -> None:
    reference = np.random.default_rng(3).lognormal(0, 1, 10_000)
    bins = ReferenceBins.fit(reference, 10)
    assert not bins.uniform and bins.n_bins == 10
    counts = bins.counts(reference)
    assert counts[0] == counts[-1] == 0
    assert counts[1:-1].min() >= 999 and counts[1:-1].max() <= 1001
    equal_width = ReferenceBins.fit(reference, "sturges", strategy="equal_width")
    assert equal_width.uniform
    np.testing.assert_array_equal(
        equal_width.edges, np.histogram_bin_edges(reference, bins="sturges")
    )
    assert ReferenceBins.fit([1.0, 1.0, 1.0]).edges.tolist() == [0.5, 1.5]
    assert ReferenceBins.fit([0] * 95 + [1, 2, 3, 4, 5], 10).edges.tolist() == [0, 5]  # ties
    running = bins.counts(reference[:5_000])
    bins.add(reference[5_000:], running)
    assert running.tolist() == counts.tolist()


# --- properties ----------------------------------------------------------------------------

samples = hnp.arrays(
    np.float64,
    st.integers(1, 80),
    elements=st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 1.0, -1.0]),  # ties
    ),
)


@settings(max_examples=150, deadline=None)
@given(sample=samples, n_bins=st.integers(1, 12))
def test_identical_samples_give_zero(sample: Array, n_bins: int) -> None:
    counts = ReferenceBins.fit(sample, n_bins).counts(sample)
    assert psi(counts, counts) == 0.0
    assert psi(counts, counts, both_empty="fill") == 0.0
    assert js_distance(counts, counts) == 0.0
    assert hellinger(counts, counts) == 0.0
    assert categorical_js(counts, counts) == 0.0
    assert l_infinity(counts, counts) == 0.0
    assert chi2_cramers_v(counts, counts)[:2] == (0.0, 0.0)
    assert ks_statistic(sample, sample) == 0.0
    assert wasserstein_normed(sample, sample) == 0.0
    assert wasserstein_normed(sample, np.random.default_rng(0).permutation(sample)) == 0.0


@settings(max_examples=150, deadline=None)
@given(a=samples, b=samples)
def test_symmetric_statistics(a: Array, b: Array) -> None:
    assert ks_statistic(a, b) == ks_statistic(b, a)
    # The normed distance divides by the reference's std; the distance itself is symmetric.
    assert wasserstein_normed(a, b, norm=1.0) == wasserstein_normed(b, a, norm=1.0)
    bins = ReferenceBins.fit(np.r_[a, b], 6)
    ca, cb = bins.counts(a), bins.counts(b)
    assert js_distance(ca, cb) == js_distance(cb, ca)
    assert hellinger(ca, cb) == hellinger(cb, ca)
    assert l_infinity(ca, cb) == l_infinity(cb, ca)
    for value in (js_distance(ca, cb), hellinger(ca, cb), ks_statistic(a, b)):
        assert 0.0 <= value <= 1.0


# --- latency sketch ------------------------------------------------------------------------

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def _latencies(seed: int, n: int) -> Array:
    return np.random.default_rng(seed).lognormal(np.log(0.02), 1.0, n)  # seconds


@pytest.mark.parametrize("n", [1, 50, 20_000])
def test_sketch_quantiles_within_relative_accuracy(n: int) -> None:
    values = _latencies(n, n)
    sketch = LatencySketch(0.01)
    sketch.add(values)
    for q in QUANTILES:
        exact = float(np.quantile(values, q, method="lower"))  # the order statistic ranked
        assert abs(sketch.quantile(q) - exact) <= 0.01 * exact, q


@pytest.mark.parametrize("accuracy", [0.01, 0.02, 0.05])
def test_sketch_equals_ddsketch(accuracy: float) -> None:
    values = np.r_[_latencies(11, 5_000), 0.02 * (1 + accuracy) ** np.arange(-40, 40)]
    ours = LatencySketch(accuracy)
    ours.add(values)
    theirs = DDSketch(accuracy)
    for value in values.tolist():
        theirs.add(value)
    # Same buckets, key for key ...
    store = theirs._store
    dense = np.zeros(ours.key_max - ours.key_min + 1)
    keys = np.arange(store.offset, store.offset + len(store.bins))
    dense[keys - ours.key_min] = store.bins
    np.testing.assert_array_equal(ours.counts[1:], dense)
    # ... and the same quantiles.
    for q in QUANTILES:
        assert ours.quantile(q) == theirs.get_quantile_value(q), q


@settings(max_examples=100, deadline=None)
@given(
    a=hnp.arrays(np.float64, st.integers(0, 60), elements=st.floats(0, 1e5)),
    b=hnp.arrays(np.float64, st.integers(0, 60), elements=st.floats(0, 1e5)),
)
def test_sketch_merge_is_exact(a: Array, b: Array) -> None:
    left, right, both = LatencySketch(), LatencySketch(), LatencySketch()
    left.add(a)
    right.add(b)
    both.add(np.r_[a, b])
    left.merge(right)
    assert left.counts.tolist() == both.counts.tolist()
    assert left.count == a.size + b.size
    assert np.array_equal(left.quantiles(QUANTILES), both.quantiles(QUANTILES), equal_nan=True)


def test_sketch_edges() -> None:
    sketch = LatencySketch(min_value=1e-6, max_value=10.0)
    assert math.isnan(sketch.quantile(0.5))
    sketch.add([0.0, 1e-9, 1e3])  # below the range reads 0; above lands in the top bucket
    assert sketch.counts[0] == 2 and sketch.counts[-1] == 1
    assert sketch.quantile(0.0) == 0.0
    assert sketch.quantile(1.0) == pytest.approx(10.0, rel=0.01)
    with pytest.raises(ValueError, match="non-negative"):
        sketch.add([1.0, float("nan")])
    with pytest.raises(ValueError, match="different accuracy"):
        sketch.merge(LatencySketch(0.02))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sketch.quantile(1.5)
    with pytest.raises(ValueError):
        sketch.counts[0] = 5  # read-only view


# --- validation and warm-up ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: psi([1, 2], [1, 2, 3]), "differ in length"),
        (lambda: psi([1, -1], [1, 2]), "non-negative"),
        (lambda: js_distance([0, 0], [1, 2]), "sum to zero"),
        (lambda: hellinger([], []), "empty"),
        (lambda: l_infinity([1, np.nan], [1, 2]), "finite"),
        (lambda: psi([1, 2], [1, 2], both_empty="drop"), "both_empty"),  # type: ignore[arg-type]
        (lambda: ks_statistic([1.0, np.nan], [1.0]), "NaN"),
        (lambda: wasserstein_normed([], [1.0]), "empty"),
        (lambda: wasserstein_normed([1.0], [1.0], norm=0.0), "norm"),
        (lambda: ReferenceBins.from_edges([0.0, 0.0]), "strictly increasing"),
        (lambda: ReferenceBins.from_edges([1.0]), "two edges"),
        (lambda: ReferenceBins.fit([np.nan]), "no values"),
        (lambda: ReferenceBins.fit([1.0], 0), "n_bins"),
        (lambda: ReferenceBins.fit([[1.0]]), "one-dimensional"),
        (lambda: ReferenceBins.fit([1.0, 2.0]).add([1.0], np.zeros(3)), "int64"),
        (lambda: category_counts([0.5], 2), "integers"),
        (lambda: LatencySketch(0.0), "relative_accuracy"),
    ],
)
def test_wrappers_validate(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_warm_up_compiles_every_kernel_once() -> None:
    warm_up()
    for name in _kernels.__all__:
        kernel = getattr(_kernels, name)
        # One signature each: the wrappers hand every kernel the same dtypes and layouts.
        assert len(kernel.signatures) == 1, (name, kernel.signatures)
