"""Always-valid statistics for rollout gates and A/B experiments.

Every test here keeps its error guarantee while it is looked at continuously: the type I
error is at most ``alpha`` uniformly over time, so a controller may evaluate it after every
batch of requests and stop at the first decision. Each rests on a nonnegative
(super)martingale ``M_t`` with ``E[M_0] <= 1`` under the null and Ville's inequality
``P(sup_t M_t >= 1/alpha) <= alpha``.

* :func:`mean_difference` (with :func:`error_rate_difference`, :func:`real_mean_difference`):
  the normal-mixture mSPRT of Johari, Pekelis & Walsh, "Always valid inference" (2017/2022),
  for ``theta = mean_canary - mean_stable``, and its confidence sequence. It relies on the
  normal approximation of the difference of sample means, with plug-in variances.
* :func:`exceedance_rate` (with :func:`latency_exceedance`): a Beta-binomial mixture of
  likelihood ratios for one Bernoulli rate against a bound. Exact (no approximation).
* :func:`sample_ratio_mismatch`: the Dirichlet-multinomial Bayes factor of Lindon & Malek,
  "Anytime-valid inference for multinomial count data" (2022). Exact.
* :func:`ab_lift`: each treatment arm against the control with the mSPRT, Bonferroni over
  the arms.

The ``*_batch`` functions take numpy arrays (one entry per stream, or per stream and time)
and return arrays; the scalar functions call them and wrap the result in a frozen dataclass.

Measured by tests/unit/rollout/test_statistics.py (seeded, alpha = 0.05, a run counts as a
false positive if any look decides; ``pytest -s`` prints the figures):

* error-rate mSPRT, A/A at 1% errors on both arms, canary share 10%, a look every 20
  requests up to 5,000, 4,000 runs: P(any "worse") = 0.0005, P(any "proved better") = 0.
* error-rate mSPRT at the margin (canary 2%, stable 1%, margin 0.01), same looks:
  P(any "no_worse") = 0.041, the closest to alpha of all (the normal approximation is weakest
  for a rare event on the small arm).
* error-rate mSPRT, 1% (stable) -> 5% (canary), canary share 10%: a median of 270 canary
  requests (90th percentile 414) to "worse"; all of 2,000 runs decide.
* exceedance test, bound 1%, a look every 10 canary requests up to 3,000, 4,000 runs:
  P(any "worse") = 0.015 at a true rate of 1%; P(any "no_worse") = 0.022 at 2% (the bound
  plus the default slack); at 5%: median 110 requests to "worse".
* SRM, a look every 20 assignments up to 5,000, 4,000 runs: P(any mismatch) = 0.029 on a
  10%/90% split, 0.035 on three equal arms; 12% instead of 10%: median 1,770 assignments.
* A/B lift, A/A with a control and two treatments at 5% conversions, a look every 30
  requests up to 6,000, 2,000 runs: P(any "winner"/"loser") = 0.003.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MIN_N",
    "ERROR_RATE_TAU",
    "SRM_CONCENTRATION",
    "Decision",
    "DifferenceBatch",
    "DifferenceResult",
    "ExceedanceBatch",
    "ExceedanceResult",
    "LiftBatch",
    "LiftDecision",
    "LiftResult",
    "SampleSummary",
    "SrmDecision",
    "SrmResult",
    "ab_lift",
    "ab_lift_batch",
    "bernoulli_variance",
    "default_exceedance_prior",
    "default_slack",
    "error_rate_difference",
    "error_rate_difference_batch",
    "exceedance_rate",
    "exceedance_rate_batch",
    "latency_exceedance",
    "mean_difference",
    "mean_difference_batch",
    "msprt_half_width",
    "msprt_log_lambda",
    "real_mean_difference",
    "sample_ratio_mismatch",
    "sample_ratio_mismatch_batch",
    "two_sample_bernoulli_variances",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

ERROR_RATE_TAU = 0.02
"""Default mixing standard deviation for differences of rates (error rates of a few percent):
the mixture puts its weight on differences of about two percentage points, which is what a
rollout should detect within a few hundred canary requests."""

DEFAULT_MIN_N = 30
"""Fewest observations per arm before the mSPRT may decide: below it the normal
approximation of a difference of means is not to be trusted."""

SRM_CONCENTRATION = 100.0
"""Default Dirichlet prior concentration ``K = sum a_i`` of the SRM test (``a_i = K p0_i``).

Measured while choosing it (10%/90% split, 500 runs, looks every 20 assignments): 20% instead
of 10% is caught after a median of 140 assignments (120 with ``K = 2``, 280 with ``K =
1000``), 12% after 1,640 (2,500 with ``K = 2``, 1,990 with ``K = 1000``)."""

_RELATIVE_LIFT_EPSILON = 1e-12


class Decision(StrEnum):
    """The verdict of a one-sided gate on a canary."""

    WORSE = "worse"
    NO_WORSE = "no_worse"
    UNDECIDED = "undecided"


class SrmDecision(StrEnum):
    """``mismatch``: the assignment counts disagree with the expected shares."""

    MISMATCH = "mismatch"
    UNDECIDED = "undecided"


class LiftDecision(StrEnum):
    """The verdict on one treatment arm of an A/B experiment."""

    WINNER = "winner"
    LOSER = "loser"
    NO_DIFFERENCE = "no_difference"
    KEEP_RUNNING = "keep_running"


# --------------------------------------------------------------------------------------------
# Samples


def bernoulli_variance(successes: npt.ArrayLike, n: npt.ArrayLike) -> FloatArray:
    """The per-observation variance of one Bernoulli sample, floored away from zero.

    ``p~ (1 - p~)`` with the continuity-corrected rate ``p~ = (k + 0.5) / (n + 1)``: close to
    ``p^ (1 - p^)`` once there are a few successes and failures, but positive when ``k = 0``
    or ``k = n`` (0 errors on both arms would otherwise give a zero variance and an infinite
    likelihood ratio for any difference at all).
    """
    k = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(n, dtype=np.float64)
    corrected = (k + 0.5) / (trials + 1.0)
    return np.asarray(corrected * (1.0 - corrected), dtype=np.float64)


def two_sample_bernoulli_variances(
    successes_a: npt.ArrayLike,
    n_a: npt.ArrayLike,
    successes_b: npt.ArrayLike,
    n_b: npt.ArrayLike,
) -> tuple[FloatArray, FloatArray]:
    """Per-observation variances of two Bernoulli samples, each floored by the pooled one.

    ``var_i = max(p~_i (1 - p~_i), p~ (1 - p~))`` with ``p~_i`` the corrected rate of
    :func:`bernoulli_variance` and ``p~ = (k_a + k_b + 0.5) / (n_a + n_b + 1)`` the pooled
    one. The floor matters for the small arm of a rare event: a canary with 0 errors in 200
    requests at a true 1% would otherwise get a variance of about ``0.0025`` instead of
    ``0.0099``, and the normal approximation would "prove" it better than the stable
    version about one time in ten (measured). The floor only widens intervals.
    """
    k_a = np.asarray(successes_a, dtype=np.float64)
    k_b = np.asarray(successes_b, dtype=np.float64)
    t_a = np.asarray(n_a, dtype=np.float64)
    t_b = np.asarray(n_b, dtype=np.float64)
    pooled = bernoulli_variance(k_a + k_b, t_a + t_b)
    return (
        np.asarray(np.maximum(bernoulli_variance(k_a, t_a), pooled), dtype=np.float64),
        np.asarray(np.maximum(bernoulli_variance(k_b, t_b), pooled), dtype=np.float64),
    )


@dataclass(frozen=True, slots=True)
class SampleSummary:
    """What the tests need of one arm's sample: its size, mean and per-observation variance."""

    n: int
    mean: float
    variance: float
    successes: int | None = None
    """Set for a rate (:meth:`bernoulli`): two rates get :func:`two_sample_bernoulli_variances`."""

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")
        if not self.variance >= 0.0:
            raise ValueError("variance must be >= 0")

    @classmethod
    def bernoulli(cls, successes: int, n: int) -> SampleSummary:
        """A rate: mean ``k/n``, variance floored by :func:`bernoulli_variance`.

        Compared with another rate, the variances are those of
        :func:`two_sample_bernoulli_variances` instead.
        """
        if not 0 <= successes <= n:
            raise ValueError("need 0 <= successes <= n")
        mean = successes / n if n else 0.0
        return cls(n, mean, float(bernoulli_variance(successes, n)), successes)

    @classmethod
    def of(cls, values: Sequence[float] | npt.ArrayLike) -> SampleSummary:
        """Mean and unbiased sample variance (``ddof = 1``; 0 for fewer than two values)."""
        data = np.asarray(values, dtype=np.float64).ravel()
        if data.size == 0:
            return cls(0, 0.0, 0.0)
        variance = float(data.var(ddof=1)) if data.size > 1 else 0.0
        return cls(int(data.size), float(data.mean()), variance)


# --------------------------------------------------------------------------------------------
# 1. Two-sample mSPRT for a difference of means


def _paired_variances(first: SampleSummary, second: SampleSummary) -> tuple[float, float]:
    """The two per-observation variances; pooled floors when both samples are rates."""
    if first.successes is None or second.successes is None:
        return first.variance, second.variance
    var_first, var_second = two_sample_bernoulli_variances(
        first.successes, first.n, second.successes, second.n
    )
    return float(var_first), float(var_second)


def msprt_log_lambda(
    estimate: npt.ArrayLike, variance: npt.ArrayLike, tau: float, theta0: npt.ArrayLike = 0.0
) -> FloatArray:
    """Log of the normal-mixture likelihood ratio against ``theta = theta0``.

    With ``d`` the estimate, ``V`` its variance and ``theta ~ N(theta0, tau^2)`` as mixture::

        Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))

    If ``d ~ N(theta0, V_t)`` along the stream, ``Lambda_t`` is a martingale with mean 1.
    """
    d = np.asarray(estimate, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    tau2 = tau * tau
    centred = d - np.asarray(theta0, dtype=np.float64)
    log_lambda = -0.5 * np.log1p(tau2 / v) + tau2 * centred * centred / (2.0 * v * (v + tau2))
    return np.asarray(log_lambda, dtype=np.float64)


def msprt_half_width(variance: npt.ArrayLike, tau: float, alpha: float) -> FloatArray:
    """Half-width of the always-valid two-sided confidence sequence at level ``1 - alpha``.

    ``{theta0 : Lambda(theta0) < 1/alpha}`` solved for ``theta0``::

        d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

    ``P(theta leaves the interval at any time) <= alpha`` (under the normal approximation).
    """
    v = np.asarray(variance, dtype=np.float64)
    tau2 = tau * tau
    radicand = v * (v + tau2) / tau2 * (2.0 * math.log(1.0 / alpha) + np.log1p(tau2 / v))
    return np.asarray(np.sqrt(radicand), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class DifferenceBatch:
    """:func:`mean_difference_batch`'s arrays; ``worse``/``no_worse`` as in the scalar result."""

    estimate: FloatArray
    lower: FloatArray
    upper: FloatArray
    statistic: FloatArray
    worse: BoolArray
    no_worse: BoolArray


@dataclass(frozen=True, slots=True)
class DifferenceResult:
    """The mSPRT on ``theta = mean_canary - mean_stable`` at one moment.

    ``lower`` and ``upper`` are one-sided always-valid bounds at level ``alpha`` each (together
    a ``1 - 2 alpha`` confidence sequence). ``statistic`` is ``log Lambda`` against
    ``theta0 = margin``. ``decision``: ``worse`` when ``lower > margin``, ``no_worse`` when
    ``upper < margin``, else ``undecided`` (always ``undecided`` below ``min_n`` per arm).
    """

    estimate: float
    lower: float
    upper: float
    statistic: float
    canary_n: int
    stable_n: int
    margin: float
    alpha: float
    decision: Decision


def _difference_core(
    canary_n: npt.ArrayLike,
    canary_mean: npt.ArrayLike,
    canary_variance: npt.ArrayLike,
    stable_n: npt.ArrayLike,
    stable_mean: npt.ArrayLike,
    stable_variance: npt.ArrayLike,
    *,
    tau: float,
    two_sided_alpha: float,
    theta0: float,
    min_n: int,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, BoolArray]:
    """Estimate, lower, upper (two-sided at ``two_sided_alpha``), log Lambda(theta0), enough."""
    if not tau > 0.0:
        raise ValueError("tau must be > 0")
    n_c = np.asarray(canary_n, dtype=np.float64)
    n_s = np.asarray(stable_n, dtype=np.float64)
    estimate = np.asarray(canary_mean, np.float64) - np.asarray(stable_mean, np.float64)
    # An empty arm has no variance to speak of; such entries are never decided (min_n >= 1).
    variance = np.asarray(canary_variance, np.float64) / np.maximum(n_c, 1.0) + np.asarray(
        stable_variance, np.float64
    ) / np.maximum(n_s, 1.0)
    # Keeps the formulas finite for a metric without any variance; min_n is the real guard.
    variance = np.maximum(variance, 1e-12 * tau * tau)
    half_width = msprt_half_width(variance, tau, two_sided_alpha)
    enough = (n_c >= max(min_n, 1)) & (n_s >= max(min_n, 1))
    return (
        np.asarray(estimate, dtype=np.float64),
        np.asarray(estimate - half_width, dtype=np.float64),
        np.asarray(estimate + half_width, dtype=np.float64),
        msprt_log_lambda(estimate, variance, tau, theta0),
        np.asarray(enough, dtype=np.bool_),
    )


def mean_difference_batch(
    canary_n: npt.ArrayLike,
    canary_mean: npt.ArrayLike,
    canary_variance: npt.ArrayLike,
    stable_n: npt.ArrayLike,
    stable_mean: npt.ArrayLike,
    stable_variance: npt.ArrayLike,
    *,
    tau: float,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> DifferenceBatch:
    """The mSPRT of :func:`mean_difference`, elementwise over broadcast arrays."""
    _check_alpha(alpha)
    estimate, lower, upper, statistic, enough = _difference_core(
        canary_n,
        canary_mean,
        canary_variance,
        stable_n,
        stable_mean,
        stable_variance,
        tau=tau,
        two_sided_alpha=2.0 * alpha,
        theta0=margin,
        min_n=min_n,
    )
    return DifferenceBatch(
        estimate=estimate,
        lower=lower,
        upper=upper,
        statistic=statistic,
        worse=enough & (lower > margin),
        no_worse=enough & (upper < margin),
    )


def mean_difference(
    canary: SampleSummary,
    stable: SampleSummary,
    *,
    tau: float,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> DifferenceResult:
    """Always-valid one-sided gates on ``theta = mean_canary - mean_stable`` (mSPRT).

    ``V = var_c / n_c + var_s / n_s`` is the variance of ``d = mean_c - mean_s`` (per-observation
    variances plugged in); ``Lambda`` and the confidence sequence are those of
    :func:`msprt_log_lambda` and :func:`msprt_half_width`.

    One-sided use: the two-sided formula at ``2 alpha`` gives the bounds. "Canary worse by more
    than ``margin``" (H0: ``theta <= margin`` rejected) when ``lower > margin``; "canary no
    worse than ``margin``" (H0: ``theta >= margin`` rejected) when ``upper < margin``. Each
    side is the half-normal mixture ``M+ = 2 Lambda Phi(z)``, ``z = tau (d - theta0) /
    sqrt(V (V + tau^2))``, up to the factor ``Phi(z) >= Phi(sqrt(2 log(1/(2 alpha))))``, so
    each side's error is at most ``alpha / Phi(sqrt(2 log(1/(2 alpha))))`` (``1.016 alpha``
    at ``alpha = 0.05``), uniformly over time, under the normal approximation.

    ``tau`` is the mixing standard deviation, in the metric's units: about the smallest
    difference that should be detected quickly (:data:`ERROR_RATE_TAU` for error rates). Fix
    it before the rollout starts. With ``margin = 0`` "no_worse" needs the canary to be
    proven better; a rollout gate passes its tolerance (e.g. ``0.005`` for error rates).
    Nothing is decided before ``min_n`` observations on each arm.
    """
    canary_variance, stable_variance = _paired_variances(canary, stable)
    batch = mean_difference_batch(
        canary.n,
        canary.mean,
        canary_variance,
        stable.n,
        stable.mean,
        stable_variance,
        tau=tau,
        margin=margin,
        alpha=alpha,
        min_n=min_n,
    )
    if bool(batch.worse):
        decision = Decision.WORSE
    elif bool(batch.no_worse):
        decision = Decision.NO_WORSE
    else:
        decision = Decision.UNDECIDED
    return DifferenceResult(
        estimate=float(batch.estimate),
        lower=float(batch.lower),
        upper=float(batch.upper),
        statistic=float(batch.statistic),
        canary_n=canary.n,
        stable_n=stable.n,
        margin=margin,
        alpha=alpha,
        decision=decision,
    )


def error_rate_difference_batch(
    canary_errors: npt.ArrayLike,
    canary_n: npt.ArrayLike,
    stable_errors: npt.ArrayLike,
    stable_n: npt.ArrayLike,
    *,
    tau: float = ERROR_RATE_TAU,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> DifferenceBatch:
    """:func:`error_rate_difference` elementwise over broadcast arrays of counts."""
    k_c = np.asarray(canary_errors, dtype=np.float64)
    n_c = np.asarray(canary_n, dtype=np.float64)
    k_s = np.asarray(stable_errors, dtype=np.float64)
    n_s = np.asarray(stable_n, dtype=np.float64)
    var_c, var_s = two_sample_bernoulli_variances(k_c, n_c, k_s, n_s)
    return mean_difference_batch(
        n_c,
        k_c / np.maximum(n_c, 1.0),
        var_c,
        n_s,
        k_s / np.maximum(n_s, 1.0),
        var_s,
        tau=tau,
        margin=margin,
        alpha=alpha,
        min_n=min_n,
    )


def error_rate_difference(
    canary_errors: int,
    canary_n: int,
    stable_errors: int,
    stable_n: int,
    *,
    tau: float = ERROR_RATE_TAU,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> DifferenceResult:
    """:func:`mean_difference` for error rates given as counts (Bernoulli means).

    The variances are those of :func:`two_sample_bernoulli_variances` (each arm's, floored
    by the pooled one); ``tau`` defaults to :data:`ERROR_RATE_TAU` (0.02).
    """
    return mean_difference(
        SampleSummary.bernoulli(canary_errors, canary_n),
        SampleSummary.bernoulli(stable_errors, stable_n),
        tau=tau,
        margin=margin,
        alpha=alpha,
        min_n=min_n,
    )


def real_mean_difference(
    canary_n: int,
    canary_mean: float,
    canary_variance: float,
    stable_n: int,
    stable_mean: float,
    stable_variance: float,
    *,
    tau: float,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> DifferenceResult:
    """:func:`mean_difference` for a real-valued metric given as (n, mean, sample variance)."""
    return mean_difference(
        SampleSummary(canary_n, canary_mean, canary_variance),
        SampleSummary(stable_n, stable_mean, stable_variance),
        tau=tau,
        margin=margin,
        alpha=alpha,
        min_n=min_n,
    )


# --------------------------------------------------------------------------------------------
# 2. One-sample exceedance rate: Beta-binomial mixture


@dataclass(frozen=True, slots=True)
class ExceedanceBatch:
    """:func:`exceedance_rate_batch`'s arrays."""

    estimate: FloatArray
    statistic: FloatArray
    no_worse_statistic: FloatArray
    worse: BoolArray
    no_worse: BoolArray


@dataclass(frozen=True, slots=True)
class ExceedanceResult:
    """The exceedance test at one moment.

    ``statistic`` is ``log R`` against H0: ``p <= bound``; ``no_worse_statistic`` is the log
    ratio against H0: ``p >= bound + slack``. ``decision``: ``worse`` when
    ``statistic >= log(1/alpha)``, else ``no_worse`` when ``no_worse_statistic >=
    log(1/alpha)``, else ``undecided``.
    """

    estimate: float
    exceedances: int
    n: int
    bound: float
    slack: float
    statistic: float
    no_worse_statistic: float
    alpha: float
    decision: Decision


def _lgamma_scalar(x: float) -> float:
    return math.lgamma(x)


_LGAMMA_UFUNC = np.vectorize(_lgamma_scalar, otypes=[np.float64])


def _lgamma(x: npt.ArrayLike) -> FloatArray:
    """``math.lgamma`` elementwise (numpy has no log-gamma of its own).

    Counts repeat a lot across streams and moments, so it is evaluated once per distinct value.
    """
    values = np.asarray(x, dtype=np.float64)
    if values.size <= 64:
        return np.asarray(_LGAMMA_UFUNC(values), dtype=np.float64)
    distinct, inverse = np.unique(values, return_inverse=True)
    result = np.asarray(_LGAMMA_UFUNC(distinct), dtype=np.float64)[inverse]
    return np.asarray(result.reshape(values.shape), dtype=np.float64)


def _log_beta(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    a_ = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    return np.asarray(_lgamma(a_) + _lgamma(b_) - _lgamma(a_ + b_), dtype=np.float64)


def _bernoulli_log_likelihood(k: FloatArray, n: FloatArray, p: FloatArray) -> FloatArray:
    """``k log p + (n - k) log(1 - p)`` with ``0 log 0 = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        hits = np.where(k > 0, k * np.log(p), 0.0)
        misses = np.where(n - k > 0, (n - k) * np.log1p(-p), 0.0)
    return np.asarray(hits + misses, dtype=np.float64)


def default_exceedance_prior(bound: float) -> tuple[float, float]:
    """``Beta(1, (1 - m) / m)`` with mean ``m = min(2 bound, (1 + bound) / 2)``.

    Its mass sits on rates up to a few times the bound (61% of it above the bound for small
    bounds), where a slow canary is to be caught quickly.
    """
    mean = min(2.0 * bound, 0.5 * (1.0 + bound))
    return 1.0, (1.0 - mean) / mean


def default_slack(bound: float) -> float:
    """``min(bound, (1 - bound) / 2)``: "no worse" proves the rate below twice the bound, or,
    for bounds of 1/3 and up (where twice is 2/3 or more), below halfway from it to 1."""
    return min(bound, 0.5 * (1.0 - bound))


def exceedance_rate_batch(
    exceedances: npt.ArrayLike,
    n: npt.ArrayLike,
    bound: float,
    *,
    slack: float | None = None,
    alpha: float = 0.05,
    prior: tuple[float, float] | None = None,
    min_n: int = 1,
) -> ExceedanceBatch:
    """:func:`exceedance_rate` elementwise over broadcast arrays of counts."""
    _check_alpha(alpha)
    if not 0.0 < bound < 1.0:
        raise ValueError("bound must be in (0, 1)")
    slack_ = default_slack(bound) if slack is None else slack
    upper_null = bound + slack_
    if not (slack_ >= 0.0 and upper_null < 1.0):
        raise ValueError("need slack >= 0 and bound + slack < 1")
    a, b = default_exceedance_prior(bound) if prior is None else prior
    if not (a > 0.0 and b > 0.0):
        raise ValueError("prior parameters must be > 0")
    k = np.asarray(exceedances, dtype=np.float64)
    trials = np.asarray(n, dtype=np.float64)
    estimate = k / np.maximum(trials, 1.0)
    log_mixture = _log_beta(a + k, b + trials - k) - _log_beta(a, b)
    # Maximum likelihood over each null: at the estimate when it lies inside, else at the edge.
    lower_null_mle = np.minimum(estimate, bound)
    upper_null_mle = np.maximum(estimate, upper_null)
    statistic = log_mixture - _bernoulli_log_likelihood(k, trials, lower_null_mle)
    no_worse_statistic = log_mixture - _bernoulli_log_likelihood(k, trials, upper_null_mle)
    threshold = math.log(1.0 / alpha)
    enough = trials >= max(min_n, 1)
    worse = enough & (statistic >= threshold)
    return ExceedanceBatch(
        estimate=np.asarray(estimate, dtype=np.float64),
        statistic=statistic,
        no_worse_statistic=no_worse_statistic,
        worse=np.asarray(worse, dtype=np.bool_),
        no_worse=np.asarray(enough & ~worse & (no_worse_statistic >= threshold), np.bool_),
    )


def exceedance_rate(
    exceedances: int,
    n: int,
    bound: float,
    *,
    slack: float | None = None,
    alpha: float = 0.05,
    prior: tuple[float, float] | None = None,
    min_n: int = 1,
) -> ExceedanceResult:
    """Always-valid test of a Bernoulli rate ``p`` against ``bound`` (``k`` of ``n`` trials).

    Mixture marginal likelihood of the sequence, ``p ~ Beta(a, b)``::

        m_n = B(a + k, b + n - k) / B(a, b)

    "Worse" tests H0: ``p <= p0`` (``p0 = bound``) with ``R_n = m_n / max_{p <= p0} L_n(p)``,
    ``L_n(p) = p^k (1 - p)^(n - k)``; the maximum is at ``min(k/n, p0)``, so ``R_n = m_n /
    L_n(p0)`` when ``k/n > p0`` and ``R_n <= 1`` otherwise. For every ``p`` in the null,
    ``R_n <= m_n / L_n(p)``, and ``m_n / L_n(p)`` is a mixture of likelihood ratios, a
    martingale with mean 1 under ``p``: by Ville, ``P_p(sup_n R_n >= 1/alpha) <= alpha`` for
    every ``p <= p0``, exactly (no approximation). Decision ``worse`` when ``R_n >= 1/alpha``.

    "No worse" is the mirror image: H0: ``p >= p0 + slack`` is rejected when ``m_n /
    max_{p >= p0 + slack} L_n(p) >= 1/alpha``, with the same mixture. ``slack`` defaults to
    :func:`default_slack` (``bound`` below 1/3: "no_worse" proves the rate is below twice
    the bound). ``prior`` ``(a, b)`` defaults to :func:`default_exceedance_prior`. ``min_n``
    is not needed for validity; it only holds decisions back.
    """
    batch = exceedance_rate_batch(
        exceedances, n, bound, slack=slack, alpha=alpha, prior=prior, min_n=min_n
    )
    if bool(batch.worse):
        decision = Decision.WORSE
    elif bool(batch.no_worse):
        decision = Decision.NO_WORSE
    else:
        decision = Decision.UNDECIDED
    return ExceedanceResult(
        estimate=float(batch.estimate),
        exceedances=exceedances,
        n=n,
        bound=bound,
        slack=bound if slack is None else slack,
        statistic=float(batch.statistic),
        no_worse_statistic=float(batch.no_worse_statistic),
        alpha=alpha,
        decision=decision,
    )


def latency_exceedance(
    slower: int,
    n: int,
    *,
    quantile: float = 0.99,
    slack: float | None = None,
    alpha: float = 0.05,
    prior: tuple[float, float] | None = None,
    min_n: int = 1,
) -> ExceedanceResult:
    """The latency gate: ``slower`` of ``n`` canary requests took longer than the threshold.

    The threshold is the stable version's ``quantile`` plus a margin, fixed before counting
    (re-estimating it while counting is outside the guarantee). A canary as fast as the
    stable version exceeds it with probability at most ``1 - quantile``, which is the bound of
    :func:`exceedance_rate`.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    return exceedance_rate(
        slower, n, 1.0 - quantile, slack=slack, alpha=alpha, prior=prior, min_n=min_n
    )


# --------------------------------------------------------------------------------------------
# 3. Sample-ratio mismatch: Dirichlet-multinomial Bayes factor


@dataclass(frozen=True, slots=True)
class SrmResult:
    """The sequential SRM test at one moment; ``log_bayes_factor`` against the expected shares."""

    counts: tuple[int, ...]
    expected_shares: tuple[float, ...]
    observed_shares: tuple[float, ...]
    log_bayes_factor: float
    alpha: float
    decision: SrmDecision


def _expected_shares(expected_shares: Sequence[float] | npt.ArrayLike) -> FloatArray:
    shares = np.asarray(expected_shares, dtype=np.float64)
    if shares.ndim != 1 or shares.size < 2 or not bool(np.all(shares > 0.0)):
        raise ValueError("expected_shares: at least two arms, each share > 0")
    return np.asarray(shares / shares.sum(), dtype=np.float64)


def sample_ratio_mismatch_batch(
    counts: npt.ArrayLike,
    expected_shares: Sequence[float] | npt.ArrayLike,
    *,
    concentration: float = SRM_CONCENTRATION,
) -> FloatArray:
    """``log BF`` of :func:`sample_ratio_mismatch` over ``counts`` of shape ``(..., arms)``."""
    shares = _expected_shares(expected_shares)
    total_prior = concentration
    if not total_prior > 0.0:
        raise ValueError("concentration must be > 0")
    n_i = np.asarray(counts, dtype=np.float64)
    if n_i.shape[-1:] != shares.shape:
        raise ValueError("counts must end with one axis of one entry per arm")
    a_i = total_prior * shares
    n = n_i.sum(axis=-1)
    log_bf = (
        math.lgamma(total_prior)
        - _lgamma(total_prior + n)
        + (_lgamma(a_i + n_i) - _lgamma(a_i)).sum(axis=-1)
        - (n_i * np.log(shares)).sum(axis=-1)
    )
    return np.asarray(log_bf, dtype=np.float64)


def sample_ratio_mismatch(
    counts: Sequence[int],
    expected_shares: Sequence[float],
    *,
    alpha: float = 0.05,
    concentration: float = SRM_CONCENTRATION,
) -> SrmResult:
    """Sequential sample-ratio-mismatch test (Lindon & Malek's Dirichlet-multinomial BF).

    With ``n_i`` assignments to arm ``i``, expected shares ``p0_i``, ``n = sum n_i`` and the
    Dirichlet prior ``a_i = K p0_i`` (prior concentration ``K = sum a_i``)::

        BF_n = Gamma(K) / Gamma(K + n) * prod_i Gamma(a_i + n_i) / Gamma(a_i) / prod_i p0_i^n_i

    the Dirichlet-multinomial marginal likelihood of the assignment sequence over its
    likelihood under the expected shares: a martingale with mean 1 when the split is right,
    so ``P(sup_n BF_n >= 1/alpha) <= alpha`` exactly. ``mismatch`` when ``BF >= 1/alpha``.
    ``K`` defaults to :data:`SRM_CONCENTRATION` (100): a small ``K`` (one per arm) spreads the
    prior over all splits and catches gross mismatches (a broken router) a little sooner; a
    larger one centres it on the expected shares and catches small mismatches sooner; 100 is
    close to the best of both on the splits measured. Computed in log space with
    ``math.lgamma``.
    """
    _check_alpha(alpha)
    shares = _expected_shares(expected_shares)
    if len(counts) != shares.size or any(c < 0 for c in counts):
        raise ValueError("one nonnegative count per arm")
    log_bf = float(sample_ratio_mismatch_batch(counts, shares, concentration=concentration))
    total = sum(counts)
    observed = tuple(c / total for c in counts) if total else tuple(0.0 for _ in counts)
    mismatch = log_bf >= math.log(1.0 / alpha)
    return SrmResult(
        counts=tuple(int(c) for c in counts),
        expected_shares=tuple(float(s) for s in shares),
        observed_shares=observed,
        log_bayes_factor=log_bf,
        alpha=alpha,
        decision=SrmDecision.MISMATCH if mismatch else SrmDecision.UNDECIDED,
    )


# --------------------------------------------------------------------------------------------
# 4. A/B lift


@dataclass(frozen=True, slots=True)
class LiftResult:
    """One treatment arm against the control.

    ``difference`` = ``mean_treatment - mean_control`` with its always-valid two-sided
    confidence sequence ``[lower, upper]`` at level ``1 - alpha_per_arm``; ``relative_lift``
    = ``difference / mean_control`` (``None`` when the control mean is ~0); ``statistic`` is
    ``log Lambda`` against no difference.
    """

    arm: str
    n: int
    control_n: int
    difference: float
    lower: float
    upper: float
    relative_lift: float | None
    statistic: float
    alpha_per_arm: float
    decision: LiftDecision


@dataclass(frozen=True, slots=True)
class LiftBatch:
    """:func:`ab_lift_batch`'s arrays: one entry per (treatment arm, moment)."""

    difference: FloatArray
    lower: FloatArray
    upper: FloatArray
    statistic: FloatArray
    winner: BoolArray
    loser: BoolArray
    no_difference: BoolArray


def ab_lift_batch(
    control_n: npt.ArrayLike,
    control_mean: npt.ArrayLike,
    control_variance: npt.ArrayLike,
    treatment_n: npt.ArrayLike,
    treatment_mean: npt.ArrayLike,
    treatment_variance: npt.ArrayLike,
    *,
    arms: int,
    tau: float,
    alpha: float = 0.05,
    equivalence_margin: float = 0.0,
    higher_is_better: bool = True,
    min_n: int = DEFAULT_MIN_N,
) -> LiftBatch:
    """:func:`ab_lift` elementwise over broadcast arrays; ``arms`` sets Bonferroni's ``k``."""
    _check_alpha(alpha)
    if arms < 1:
        raise ValueError("arms must be >= 1")
    difference, lower, upper, statistic, enough = _difference_core(
        treatment_n,
        treatment_mean,
        treatment_variance,
        control_n,
        control_mean,
        control_variance,
        tau=tau,
        two_sided_alpha=alpha / arms,
        theta0=0.0,
        min_n=min_n,
    )
    above = enough & (lower > 0.0)
    below = enough & (upper < 0.0)
    inside = enough & ~above & ~below
    inside &= (-equivalence_margin < lower) & (upper < equivalence_margin)
    return LiftBatch(
        difference=difference,
        lower=lower,
        upper=upper,
        statistic=statistic,
        winner=above if higher_is_better else below,
        loser=below if higher_is_better else above,
        no_difference=np.asarray(inside, dtype=np.bool_),
    )


def ab_lift(
    control: SampleSummary,
    treatments: Mapping[str, SampleSummary],
    *,
    tau: float,
    alpha: float = 0.05,
    equivalence_margin: float = 0.0,
    higher_is_better: bool = True,
    min_n: int = DEFAULT_MIN_N,
) -> tuple[LiftResult, ...]:
    """Always-valid A/B decisions, each treatment arm against the control (mSPRT).

    For each of the ``k`` treatment arms: the two-sided confidence sequence of
    :func:`msprt_half_width` for ``mean_treatment - mean_control`` at level ``1 - alpha/k``
    (Bonferroni: the chance that any arm's sequence ever misses its difference is at most
    ``alpha``, so any "winner" or "loser" among equal arms has probability <= ``alpha``).
    Decision, with "better" meaning higher unless ``higher_is_better`` is false:
    ``winner`` when the sequence is strictly on the better side of 0, ``loser`` when strictly
    on the worse side, ``no_difference`` when it lies inside ``(-equivalence_margin,
    +equivalence_margin)``, else ``keep_running``. Nothing is decided below ``min_n`` per arm.
    ``tau`` as in :func:`mean_difference` (0.02 for conversion rates of a few percent).
    """
    if not treatments:
        raise ValueError("need at least one treatment arm")
    alpha_per_arm = alpha / len(treatments)
    results: list[LiftResult] = []
    for arm, sample in treatments.items():
        treatment_variance, control_variance = _paired_variances(sample, control)
        batch = ab_lift_batch(
            control.n,
            control.mean,
            control_variance,
            sample.n,
            sample.mean,
            treatment_variance,
            arms=len(treatments),
            tau=tau,
            alpha=alpha,
            equivalence_margin=equivalence_margin,
            higher_is_better=higher_is_better,
            min_n=min_n,
        )
        if bool(batch.winner):
            decision = LiftDecision.WINNER
        elif bool(batch.loser):
            decision = LiftDecision.LOSER
        elif bool(batch.no_difference):
            decision = LiftDecision.NO_DIFFERENCE
        else:
            decision = LiftDecision.KEEP_RUNNING
        difference = float(batch.difference)
        control_scale = max(1.0, math.sqrt(control.variance))
        near_zero = abs(control.mean) <= _RELATIVE_LIFT_EPSILON * control_scale
        results.append(
            LiftResult(
                arm=arm,
                n=sample.n,
                control_n=control.n,
                difference=difference,
                lower=float(batch.lower),
                upper=float(batch.upper),
                relative_lift=None if near_zero else difference / control.mean,
                statistic=float(batch.statistic),
                alpha_per_arm=alpha_per_arm,
                decision=decision,
            )
        )
    return tuple(results)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 0.5:
        raise ValueError("alpha must be in (0, 0.5)")
