"""Numba kernels behind monitor.stats and monitor.sketch.

Each kernel is a plain ``@njit(cache=True)`` loop that writes into a caller-supplied ``out``
and returns nothing. Kernels trust their inputs: dtypes, shapes, sortedness, finiteness and
non-empty totals are checked by the typed wrappers in ``monitor.stats`` and
``monitor.sketch``, which also pick the kernel (dispatch). Every wrapper passes contiguous
float64 values and counts (int64 for histograms, category counts and sketch buckets), so each
kernel compiles once; ``monitor.stats.warm_up`` compiles them all at sidecar start.

Histogram layout (``histogram_uniform`` / ``histogram_search``): ``out[0]`` counts values
below ``edges[0]``, ``out[1 + i]`` counts bin ``i`` = ``[edges[i], edges[i + 1])`` with the
last bin closed on the right (numpy.histogram's convention), ``out[-1]`` counts values above
``edges[-1]``. NaN is not counted. Histogram, category and sketch kernels *add* into ``out``,
so a running window is the same array fed batch after batch.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = [
    "category_counts",
    "chi2_counts",
    "hellinger_counts",
    "histogram_search",
    "histogram_uniform",
    "js_counts",
    "ks_sorted",
    "linf_counts",
    "psi_counts",
    "sketch_add",
    "sketch_quantiles",
    "wasserstein_sorted",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@njit(cache=True)
def histogram_uniform(values: F64, edges: F64, out: I64) -> None:
    """Equal-width edges: index from the formula, then corrected against the edges.

    The correction is numpy.histogram's: the formula can be one bin off where rounding
    puts a value on the wrong side of an edge, so the comparisons with the stored edges
    decide, and the result is the same as ``histogram_search``.
    """
    n = edges.shape[0] - 1
    first = edges[0]
    last = edges[n]
    span = last - first
    for k in range(values.shape[0]):
        x = values[k]
        if x != x:
            continue
        if x < first:
            out[0] += 1
        elif x > last:
            out[n + 1] += 1
        else:
            i = int((x - first) / span * n)
            if i > n - 1:
                i = n - 1
            while i > 0 and x < edges[i]:
                i -= 1
            while i < n - 1 and x >= edges[i + 1]:
                i += 1
            out[i + 1] += 1


@njit(cache=True)
def histogram_search(values: F64, edges: F64, out: I64) -> None:
    """Any increasing edges: a branch-free binary search (fixed step count per value)."""
    n = edges.shape[0] - 1
    first = edges[0]
    last = edges[n]
    for k in range(values.shape[0]):
        x = values[k]
        if x != x:
            continue
        if x < first:
            out[0] += 1
        elif x > last:
            out[n + 1] += 1
        else:
            # Largest lo with edges[lo] <= x; the loop runs ceil(log2(n + 1)) times.
            lo = 0
            size = n + 1
            while size > 1:
                half = size >> 1
                lo = lo + half if edges[lo + half] <= x else lo
                size -= half
            if lo == n:
                lo = n - 1
            out[lo + 1] += 1


@njit(cache=True)
def category_counts(codes: I64, out: I64) -> None:
    """Integer category codes into ``out[:-1]``; codes outside ``[0, len(out) - 1)``
    (unseen or unknown categories) into ``out[-1]``."""
    k = out.shape[0] - 1
    for i in range(codes.shape[0]):
        c = codes[i]
        if 0 <= c < k:
            out[c] += 1
        else:
            out[k] += 1


@njit(cache=True)
def psi_counts(ref: F64, cur: F64, fill_both_empty: bool, out: F64) -> None:
    """Population stability index, Evidently's formula and zero handling.

    Shares are count / total. A zero share becomes (smallest non-zero share of that side)
    / 1e6 when that smallest share is <= 1e-4, else 1e-4 (Evidently's ``get_binned_data``),
    then PSI = sum((r - c) * ln(r / c)). A bin empty on both sides is filled on both sides
    too when ``fill_both_empty`` (Evidently's numerical path), else it adds nothing
    (Evidently's categorical path, which never sees one; see monitor.stats.psi).
    """
    n = ref.shape[0]
    ref_total = 0.0
    cur_total = 0.0
    for i in range(n):
        ref_total += ref[i]
        cur_total += cur[i]
    ref_min = np.inf
    cur_min = np.inf
    for i in range(n):
        if ref[i] > 0:
            ref_min = min(ref_min, ref[i] / ref_total)
        if cur[i] > 0:
            cur_min = min(cur_min, cur[i] / cur_total)
    ref_fill = ref_min / 1e6 if ref_min <= 0.0001 else 0.0001
    cur_fill = cur_min / 1e6 if cur_min <= 0.0001 else 0.0001
    total = 0.0
    for i in range(n):
        if ref[i] == 0 and cur[i] == 0 and not fill_both_empty:
            continue
        r = ref[i] / ref_total if ref[i] > 0 else ref_fill
        c = cur[i] / cur_total if cur[i] > 0 else cur_fill
        total += (r - c) * math.log(r / c)
    out[0] = total


@njit(cache=True)
def js_counts(ref: F64, cur: F64, out: F64) -> None:
    """Jensen-Shannon distance, base 2, as scipy.spatial.distance.jensenshannon computes it."""
    n = ref.shape[0]
    ref_total = 0.0
    cur_total = 0.0
    for i in range(n):
        ref_total += ref[i]
        cur_total += cur[i]
    left = 0.0
    right = 0.0
    for i in range(n):
        p = ref[i] / ref_total
        q = cur[i] / cur_total
        m = (p + q) / 2.0
        if p > 0:
            left += p * math.log(p / m)
        if q > 0:
            right += q * math.log(q / m)
    js = (left + right) / math.log(2.0)
    out[0] = math.sqrt(js / 2.0)


@njit(cache=True)
def hellinger_counts(ref: F64, cur: F64, out: F64) -> None:
    """Hellinger distance sqrt(sum((sqrt(p) - sqrt(q))^2) / 2), in [0, 1].

    Equal to Evidently's sqrt(1 - sum(sqrt(p * q))) for shares that sum to one, without its
    cancellation (that form gives ~1e-8 for identical inputs; this one gives 0).
    """
    n = ref.shape[0]
    ref_total = 0.0
    cur_total = 0.0
    for i in range(n):
        ref_total += ref[i]
        cur_total += cur[i]
    total = 0.0
    for i in range(n):
        d = math.sqrt(ref[i] / ref_total) - math.sqrt(cur[i] / cur_total)
        total += d * d
    out[0] = min(math.sqrt(total / 2.0), 1.0)


@njit(cache=True)
def linf_counts(ref: F64, cur: F64, out: F64) -> None:
    """L-infinity (Chebyshev) distance between the two share vectors."""
    n = ref.shape[0]
    ref_total = 0.0
    cur_total = 0.0
    for i in range(n):
        ref_total += ref[i]
        cur_total += cur[i]
    best = 0.0
    for i in range(n):
        best = max(best, abs(ref[i] / ref_total - cur[i] / cur_total))
    out[0] = best


@njit(cache=True)
def chi2_counts(ref: F64, cur: F64, out: F64) -> None:
    """Chi-squared statistic of the 2 x k table [ref; cur] and Cramer's V.

    Expected counts are row total * column total / N (scipy.stats.chi2_contingency without
    correction); categories empty on both sides are left out, as scipy would refuse them.
    ``out`` = [chi2, cramers_v, degrees of freedom].
    """
    n = ref.shape[0]
    ref_total = 0.0
    cur_total = 0.0
    for i in range(n):
        ref_total += ref[i]
        cur_total += cur[i]
    grand = ref_total + cur_total
    chi2 = 0.0
    columns = 0
    for i in range(n):
        col = ref[i] + cur[i]
        if col == 0:
            continue
        columns += 1
        e_ref = ref_total * col / grand
        e_cur = cur_total * col / grand
        d_ref = ref[i] - e_ref
        d_cur = cur[i] - e_cur
        chi2 += d_ref * d_ref / e_ref + d_cur * d_cur / e_cur
    out[0] = chi2
    # min(rows - 1, columns - 1) is 1 with two rows and at least two categories.
    out[1] = math.sqrt(chi2 / grand) if columns > 1 else 0.0
    out[2] = max(columns - 1, 0)


@njit(cache=True)
def ks_sorted(a: F64, b: F64, out: F64) -> None:
    """Two-sample Kolmogorov-Smirnov D = max |F_a - F_b| from two sorted arrays.

    The empirical CDFs are evaluated after each distinct value, as i / n_a - j / n_b, the
    same division scipy.stats.ks_2samp does, so D is bit-identical. Once one array is used
    up the difference only shrinks towards 0, so the merge stops there.
    """
    na = a.shape[0]
    nb = b.shape[0]
    i = 0
    j = 0
    d = 0.0
    while i < na and j < nb:
        x = min(a[i], b[j])
        while i < na and a[i] <= x:
            i += 1
        while j < nb and b[j] <= x:
            j += 1
        d = max(d, abs(i / na - j / nb))
    out[0] = d


@njit(cache=True)
def wasserstein_sorted(a: F64, b: F64, out: F64) -> None:
    """Wasserstein-1 distance (area between the empirical CDFs) from two sorted arrays.

    scipy.stats.wasserstein_distance's integral: the sum over the merged sample of
    |F_a - F_b| * (next value - this value).
    """
    na = a.shape[0]
    nb = b.shape[0]
    i = 0
    j = 0
    total = 0.0
    while i < na or j < nb:
        if i < na and j < nb:
            x = min(a[i], b[j])
        elif i < na:
            x = a[i]
        else:
            x = b[j]
        while i < na and a[i] <= x:
            i += 1
        while j < nb and b[j] <= x:
            j += 1
        if i < na and j < nb:
            nxt = min(a[i], b[j])
        elif i < na:
            nxt = a[i]
        elif j < nb:
            nxt = b[j]
        else:
            break
        total += abs(i / na - j / nb) * (nxt - x)
    out[0] = total


@njit(cache=True)
def sketch_add(values: F64, multiplier: float, min_value: float, key_min: int, out: I64) -> None:
    """Add values to DDSketch-mapped log buckets.

    key = ceil(log2(x) * multiplier) with multiplier = ln 2 / ln(gamma), computed exactly as
    the ddsketch package's LogarithmicMapping does (``math.log(x, 2)`` is log(x) / log(2)),
    so keys agree bit for bit. ``out[0]`` counts values below ``min_value`` (reported as 0);
    ``out[1 + key - key_min]`` counts the key; keys past the end land in the last bucket.
    """
    top = out.shape[0] - 1
    ln2 = math.log(2.0)
    for k in range(values.shape[0]):
        x = values[k]
        if x < min_value:
            out[0] += 1
            continue
        i = math.ceil(math.log(x) / ln2 * multiplier) - key_min + 1
        if i < 1:
            i = 1
        elif i > top:
            i = top
        out[i] += 1


@njit(cache=True)
def sketch_quantiles(
    counts: I64, qs: F64, multiplier: float, gamma: float, key_min: int, out: F64
) -> None:
    """Quantiles from sketch buckets with ddsketch's rank rule and bucket value.

    rank = q * (count - 1); the answer is the first bucket whose running count exceeds the
    rank, valued gamma**key * 2 / (1 + gamma) (ddsketch's ``KeyMapping.value``), which is
    within the relative accuracy of every value in (gamma**(key-1), gamma**key]. The
    below-``min_value`` bucket reads as 0. NaN for an empty sketch.
    """
    n = counts.shape[0]
    total = 0.0
    for i in range(n):
        total += counts[i]
    scale = 2.0 / (1.0 + gamma)
    for k in range(qs.shape[0]):
        if total == 0:
            out[k] = np.nan
            continue
        rank = qs[k] * (total - 1.0)
        running = 0.0
        idx = n - 1
        for i in range(n):
            running += counts[i]
            if running > rank:
                idx = i
                break
        if idx == 0:
            out[k] = 0.0
        else:
            key = idx - 1 + key_min
            out[k] = math.pow(2.0, key / multiplier) * scale
