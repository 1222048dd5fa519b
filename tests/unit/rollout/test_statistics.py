"""gateway.rollout.statistics: known values against scipy, and seeded peeking simulations.

Known values are recomputed here another way: the mSPRT's Lambda as a ratio of normal
densities (the mixture's marginal N(theta0, V + tau^2) over N(theta0, V)) and its confidence
bounds by root finding; the Beta-binomial and Dirichlet-multinomial ratios with scipy's
pmfs. The simulations peek after every batch of requests and count a run as a false positive
if any look decides; ``pytest -s`` prints the measured figures (quoted in the module
docstring and docs/rollout-statistics.md).

Monte-Carlo allowance: with R runs, an estimated rate whose true value is at most alpha has a
standard error of at most sqrt(alpha (1 - alpha) / R); 0.0034 at R = 4000, 0.0049 at
R = 2000. The assertions allow three standard errors above alpha (a false failure about once
in 700 seeds, were the true rate exactly alpha; the measured rates are far below).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import scipy.optimize
import scipy.special
import scipy.stats

from gateway.rollout.statistics import (
    DEFAULT_MIN_N,
    ERROR_RATE_TAU,
    SRM_CONCENTRATION,
    Decision,
    LiftDecision,
    SampleSummary,
    SrmDecision,
    ab_lift,
    ab_lift_batch,
    bernoulli_variance,
    default_exceedance_prior,
    default_slack,
    error_rate_difference,
    error_rate_difference_batch,
    exceedance_rate,
    exceedance_rate_batch,
    latency_exceedance,
    mean_difference,
    msprt_half_width,
    msprt_log_lambda,
    real_mean_difference,
    sample_ratio_mismatch,
    sample_ratio_mismatch_batch,
    two_sample_bernoulli_variances,
)

ALPHA = 0.05
IntArray = npt.NDArray[np.int64]


def allowance(runs: int) -> float:
    return 3.0 * math.sqrt(ALPHA * (1.0 - ALPHA) / runs)


# --------------------------------------------------------------------------------------------
# Known values


def reference_log_lambda(d: float, v: float, tau: float, theta0: float) -> float:
    """The mixture likelihood ratio as a ratio of normal densities of the estimate."""
    mixture = scipy.stats.norm.logpdf(d, loc=theta0, scale=math.sqrt(v + tau * tau))
    null = scipy.stats.norm.logpdf(d, loc=theta0, scale=math.sqrt(v))
    return float(mixture - null)


def reference_bounds(d: float, v: float, tau: float, alpha: float) -> tuple[float, float]:
    """The confidence sequence's ends: where Lambda(theta0) crosses 1/alpha, by root finding."""

    def excess(theta0: float) -> float:
        return reference_log_lambda(d, v, tau, theta0) - math.log(1.0 / alpha)

    reach = 50.0 * math.sqrt(v + tau * tau)
    lower = scipy.optimize.brentq(excess, d - reach, d, xtol=1e-14)
    upper = scipy.optimize.brentq(excess, d, d + reach, xtol=1e-14)
    return float(lower), float(upper)


@pytest.mark.parametrize(
    ("d", "v", "tau", "theta0"),
    [
        (0.03, 1e-4, 0.02, 0.0),
        (-0.01, 4e-5, 0.02, 0.005),
        (1.5, 0.3, 1.0, 0.2),
        (0.0, 1e-6, 0.1, 0),
    ],
)
def test_msprt_lambda_and_bounds_match_an_independent_calculation(
    d: float, v: float, tau: float, theta0: float
) -> None:
    assert float(msprt_log_lambda(d, v, tau, theta0)) == pytest.approx(
        reference_log_lambda(d, v, tau, theta0), rel=1e-9, abs=1e-12
    )
    half_width = float(msprt_half_width(v, tau, ALPHA))
    lower, upper = reference_bounds(d, v, tau, ALPHA)
    assert d - half_width == pytest.approx(lower, rel=1e-9, abs=1e-12)
    assert d + half_width == pytest.approx(upper, rel=1e-9, abs=1e-12)


def test_msprt_fixed_numbers() -> None:
    # d = 0.03, V = 1e-4, tau = 0.02 (tau^2 = 4e-4), theta0 = 0, alpha = 0.05, by hand:
    # log Lambda = 0.5 ln(1e-4 / 5e-4) + 4e-4 * 9e-4 / (2 * 1e-4 * 5e-4) = -0.804719 + 3.6
    assert float(msprt_log_lambda(0.03, 1e-4, 0.02)) == pytest.approx(2.795281044, abs=1e-8)
    # half-width = sqrt(1e-4 * 5e-4 / 4e-4 * (2 ln 20 + ln 5)) = sqrt(1.25e-4 * 7.600902)
    assert float(msprt_half_width(1e-4, 0.02, 0.05)) == pytest.approx(0.030823901, abs=1e-8)


def test_error_rate_difference_by_hand() -> None:
    # Canary 30 errors of 300, stable 90 of 2700: corrected rates 30.5/301, 90.5/2701, pooled
    # 120.5/3001 (below the canary's, above the stable's: it floors only the stable arm).
    p_c, p_s, pooled = 30.5 / 301, 90.5 / 2701, 120.5 / 3001
    assert p_s < pooled < p_c
    v = p_c * (1 - p_c) / 300 + pooled * (1 - pooled) / 2700
    d = 30 / 300 - 90 / 2700
    lower, _ = reference_bounds(d, v, ERROR_RATE_TAU, 2 * ALPHA)
    result = error_rate_difference(30, 300, 90, 2700, margin=0.01)
    assert result.estimate == pytest.approx(d)
    assert result.lower == pytest.approx(lower, rel=1e-9)
    assert result.statistic == pytest.approx(
        reference_log_lambda(d, v, ERROR_RATE_TAU, 0.01), rel=1e-9
    )
    assert result.decision is Decision.WORSE
    assert (result.canary_n, result.stable_n, result.margin) == (300, 2700, 0.01)


def test_one_sided_rule_is_the_half_normal_mixture_up_to_phi() -> None:
    # At the 2-alpha boundary, the half-normal mixture 2 Lambda Phi(z) is at least
    # Phi(sqrt(2 ln(1 / (2 alpha)))) / alpha: the documented 1.016 alpha bound at alpha = 0.05.
    v, tau = 1e-4, 0.02
    d = float(msprt_half_width(v, tau, 2 * ALPHA))
    z = tau * d / math.sqrt(v * (v + tau * tau))
    half_normal = 2.0 * math.exp(float(msprt_log_lambda(d, v, tau))) * scipy.stats.norm.cdf(z)
    floor = scipy.stats.norm.cdf(math.sqrt(2 * math.log(1 / (2 * ALPHA))))
    assert half_normal * ALPHA >= floor > 0.98
    assert ALPHA / floor == pytest.approx(0.0508, abs=1e-4)


@pytest.mark.parametrize(
    ("k", "n", "bound", "prior"),
    [(5, 100, 0.01, None), (0, 50, 0.01, None), (40, 400, 0.05, (2.0, 30.0)), (3, 3, 0.2, None)],
)
def test_exceedance_statistic_matches_scipy_betabinom(
    k: int, n: int, bound: float, prior: tuple[float, float] | None
) -> None:
    a, b = default_exceedance_prior(bound) if prior is None else prior
    marginal = scipy.stats.betabinom.logpmf(k, n, a, b)
    at_null = scipy.stats.binom.logpmf(k, n, min(k / n, bound))
    at_upper_null = scipy.stats.binom.logpmf(k, n, max(k / n, 2 * bound))
    result = exceedance_rate(k, n, bound, prior=prior)
    assert result.statistic == pytest.approx(marginal - at_null, rel=1e-9, abs=1e-9)
    assert result.no_worse_statistic == pytest.approx(marginal - at_upper_null, rel=1e-9, abs=1e-9)
    assert result.estimate == pytest.approx(k / n)
    assert result.slack == bound


def test_default_exceedance_prior() -> None:
    assert default_exceedance_prior(0.01) == pytest.approx((1.0, 49.0))
    assert default_exceedance_prior(0.6) == pytest.approx((1.0, 0.25))


@pytest.mark.parametrize(
    ("counts", "shares", "concentration"),
    [
        ((12, 88), (0.1, 0.9), SRM_CONCENTRATION),
        ((30, 70), (0.1, 0.9), 2.0),
        ((40, 33, 27), (1 / 3, 1 / 3, 1 / 3), SRM_CONCENTRATION),
        ((0, 0, 5), (0.2, 0.3, 0.5), 3.0),
    ],
)
def test_srm_bayes_factor_matches_gammaln_and_scipy_pmfs(
    counts: tuple[int, ...], shares: tuple[float, ...], concentration: float
) -> None:
    n_i = np.array(counts, dtype=float)
    a_i = concentration * np.array(shares)
    by_gammaln = (
        scipy.special.gammaln(a_i.sum())
        - scipy.special.gammaln(a_i.sum() + n_i.sum())
        + np.sum(scipy.special.gammaln(a_i + n_i) - scipy.special.gammaln(a_i))
        - np.sum(n_i * np.log(shares))
    )
    # The multinomial coefficient cancels between the two pmfs.
    by_pmfs = scipy.stats.dirichlet_multinomial.logpmf(
        n_i, a_i, int(n_i.sum())
    ) - scipy.stats.multinomial.logpmf(n_i, int(n_i.sum()), shares)
    result = sample_ratio_mismatch(counts, shares, concentration=concentration)
    assert result.log_bayes_factor == pytest.approx(by_gammaln, rel=1e-9, abs=1e-9)
    assert result.log_bayes_factor == pytest.approx(by_pmfs, rel=1e-9, abs=1e-9)
    assert sum(result.observed_shares) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Edge cases and the scalar API


def test_zero_errors_on_both_arms_stay_finite_and_undecided() -> None:
    result = error_rate_difference(0, 500, 0, 4500)
    assert math.isfinite(result.lower) and math.isfinite(result.upper)
    assert result.lower < 0.0 < result.upper
    assert result.decision is Decision.UNDECIDED
    assert float(bernoulli_variance(0, 500)) == pytest.approx((0.5 / 501) * (1 - 0.5 / 501))


def test_pooled_floor_widens_the_small_arm_of_a_rare_event() -> None:
    var_c, var_s = two_sample_bernoulli_variances(0, 200, 18, 1800)
    assert float(var_c) == pytest.approx(float(bernoulli_variance(18, 2000)))
    assert float(var_s) == pytest.approx(float(bernoulli_variance(18, 1800)))


def test_no_decision_below_min_n() -> None:
    # 20 errors in 25 canary requests is overwhelming, but 25 < DEFAULT_MIN_N.
    assert error_rate_difference(20, 25, 10, 1000).decision is Decision.UNDECIDED
    assert error_rate_difference(20, 25, 10, 1000, min_n=10).decision is Decision.WORSE
    assert DEFAULT_MIN_N == 30


def test_no_worse_within_a_margin() -> None:
    result = error_rate_difference(10, 1000, 100, 10000, margin=0.01)
    assert result.upper < 0.01
    assert result.decision is Decision.NO_WORSE


def test_real_means_and_summaries() -> None:
    values = np.random.default_rng(0).normal(10.0, 2.0, size=500)
    summary = SampleSummary.of(values)
    assert summary.n == 500
    assert summary.variance == pytest.approx(float(np.var(values, ddof=1)))
    assert summary.successes is None
    slow = real_mean_difference(400, 12.0, 4.0, 4000, 10.0, 4.0, tau=0.5, margin=1.0)
    assert slow.decision is Decision.WORSE
    same = mean_difference(summary, summary, tau=0.5, margin=1.0)
    assert same.estimate == 0.0 and same.decision is Decision.NO_WORSE
    constant = real_mean_difference(100, 1.0, 0.0, 100, 1.0, 0.0, tau=0.5)
    assert math.isfinite(constant.statistic)
    with pytest.raises(ValueError):
        SampleSummary(5, 1.0, -1.0)
    with pytest.raises(ValueError):
        SampleSummary.bernoulli(6, 5)
    with pytest.raises(ValueError):
        real_mean_difference(10, 1.0, 1.0, 10, 1.0, 1.0, tau=0.0)


def test_scalar_results_agree_with_the_batches() -> None:
    k_c, n_c, k_s, n_s = np.array([3, 40, 0]), np.array([300, 500, 60]), np.array([27, 50, 1]), 2700
    batch = error_rate_difference_batch(k_c, n_c, k_s, n_s, margin=0.005)
    for i in range(3):
        one = error_rate_difference(int(k_c[i]), int(n_c[i]), int(k_s[i]), n_s, margin=0.005)
        assert one.lower == batch.lower[i] and one.upper == batch.upper[i]
        assert (one.decision is Decision.WORSE) == batch.worse[i]
        assert (one.decision is Decision.NO_WORSE) == batch.no_worse[i]
    exceed = exceedance_rate_batch(np.array([0, 5, 30]), 300, 0.01)
    assert list(exceed.worse) == [False, False, True]
    assert exceedance_rate(30, 300, 0.01).decision is Decision.WORSE


def test_exceedance_decisions_and_latency_wrapper() -> None:
    assert exceedance_rate(1, 10, 0.01).decision is Decision.UNDECIDED
    assert exceedance_rate(0, 10, 0.01).statistic <= 0.0  # estimate inside the null: R <= 1
    assert latency_exceedance(15, 100, quantile=0.99).decision is Decision.WORSE
    assert latency_exceedance(15, 100, quantile=0.99, min_n=200).decision is Decision.UNDECIDED
    assert latency_exceedance(10, 3000, quantile=0.99).decision is Decision.NO_WORSE
    with pytest.raises(ValueError):
        exceedance_rate(1, 10, 0.6, slack=0.5)
    # The default slack keeps the upper null under 1 for every bound in (0, 1).
    assert [default_slack(b) for b in (0.01, 0.2, 0.5, 0.9)] == pytest.approx(
        [0.01, 0.2, 0.25, 0.05]
    )
    assert exceedance_rate(90, 100, 0.5).decision is Decision.WORSE
    assert exceedance_rate(40, 1000, 0.5).decision is Decision.NO_WORSE  # below 0.75
    assert exceedance_rate(1, 10, 0.95).decision is Decision.NO_WORSE  # below 0.975
    with pytest.raises(ValueError):
        latency_exceedance(1, 10, quantile=1.0)


def test_srm_decisions() -> None:
    broken = sample_ratio_mismatch([200, 800], [0.1, 0.9])
    assert broken.decision is SrmDecision.MISMATCH
    assert broken.observed_shares == (0.2, 0.8)
    fine = sample_ratio_mismatch([101, 899], [1, 9])  # shares are normalised
    assert fine.decision is SrmDecision.UNDECIDED
    assert fine.expected_shares == pytest.approx((0.1, 0.9))
    assert sample_ratio_mismatch([0, 0], [0.5, 0.5]).log_bayes_factor == 0.0
    with pytest.raises(ValueError):
        sample_ratio_mismatch([1, 2, 3], [0.5, 0.5])


def test_ab_lift_decisions() -> None:
    control = SampleSummary.bernoulli(500, 10000)
    arms = {
        "better": SampleSummary.bernoulli(700, 10000),
        "worse": SampleSummary.bernoulli(300, 10000),
        "same": SampleSummary.bernoulli(505, 10000),
        "early": SampleSummary.bernoulli(5, 20),
    }
    results = {r.arm: r for r in ab_lift(control, arms, tau=0.02, equivalence_margin=0.02)}
    assert results["better"].decision is LiftDecision.WINNER
    assert results["better"].relative_lift == pytest.approx(0.4)
    assert results["worse"].decision is LiftDecision.LOSER
    assert results["same"].decision is LiftDecision.NO_DIFFERENCE
    assert results["early"].decision is LiftDecision.KEEP_RUNNING
    assert results["same"].alpha_per_arm == pytest.approx(ALPHA / 4)
    # Bonferroni: the interval is the two-sided one at alpha / k.
    var_t, var_c = two_sample_bernoulli_variances(700, 10000, 500, 10000)
    half = float(msprt_half_width(float(var_t) / 10000 + float(var_c) / 10000, 0.02, ALPHA / 4))
    assert results["better"].lower == pytest.approx(0.02 - half)
    lower_is_better = ab_lift(control, arms, tau=0.02, higher_is_better=False)
    assert lower_is_better[0].decision is LiftDecision.LOSER
    assert lower_is_better[1].decision is LiftDecision.WINNER
    zero_control = ab_lift(SampleSummary.bernoulli(0, 100), {"t": arms["same"]}, tau=0.02)
    assert zero_control[0].relative_lift is None


# --------------------------------------------------------------------------------------------
# Simulations with continuous peeking


def canary_streams(
    rng: np.random.Generator,
    runs: int,
    looks: int,
    batch: int,
    canary_share: float,
    canary_rate: float,
    stable_rate: float,
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Cumulative (canary errors, canary n, stable errors, stable n) at every look."""
    canary_n = rng.binomial(batch, canary_share, size=(runs, looks))
    canary_errors = rng.binomial(canary_n, canary_rate)
    stable_errors = rng.binomial(batch - canary_n, stable_rate)
    return (
        canary_errors.cumsum(axis=1),
        canary_n.cumsum(axis=1),
        stable_errors.cumsum(axis=1),
        (batch - canary_n).cumsum(axis=1),
    )


def test_error_rate_aa_with_continuous_peeking() -> None:
    runs = 4000
    # 1% errors on both arms, canary share 10%, a look every 20 requests up to 5,000.
    streams = canary_streams(np.random.default_rng(11), runs, 250, 20, 0.10, 0.01, 0.01)
    batch = error_rate_difference_batch(*streams)
    worse = float(batch.worse.any(axis=1).mean())
    better = float(batch.no_worse.any(axis=1).mean())  # margin 0: "proved better"
    print(f"\nerror-rate A/A: P(any worse) = {worse:.4f}, P(any proved better) = {better:.4f}")
    assert worse <= ALPHA + allowance(runs)
    assert better <= ALPHA + allowance(runs)


def test_error_rate_no_worse_at_the_margin_boundary() -> None:
    # theta = 0.01 exactly (2% vs 1%) with margin 0.01: "no_worse" is a false positive.
    runs = 4000
    streams = canary_streams(np.random.default_rng(12), runs, 250, 20, 0.10, 0.02, 0.01)
    batch = error_rate_difference_batch(*streams, margin=0.01)
    no_worse = float(batch.no_worse.any(axis=1).mean())
    worse = float(batch.worse.any(axis=1).mean())
    print(f"\nerror-rate at theta = margin: P(any no_worse) = {no_worse:.4f}, worse {worse:.4f}")
    assert no_worse <= ALPHA + allowance(runs)
    assert worse <= ALPHA + allowance(runs)


def test_error_rate_power_one_to_five_percent() -> None:
    runs = 2000
    # 1% -> 5% at canary share 10%, a look every 20 requests up to 20,000 (~2,000 canary).
    streams = canary_streams(np.random.default_rng(13), runs, 1000, 20, 0.10, 0.05, 0.01)
    canary_n = streams[1]
    worse = error_rate_difference_batch(*streams).worse
    decided = worse.any(axis=1)
    first = worse.argmax(axis=1)
    to_decide = canary_n[np.arange(runs), first][decided]
    median = float(np.median(to_decide))
    print(
        f"\nerror-rate 1% -> 5%: decided {decided.mean():.4f}, median {median:.0f} canary "
        f"requests, 90th percentile {np.percentile(to_decide, 90):.0f}"
    )
    assert decided.mean() >= 0.99
    assert median < 300  # measured 266


def test_exceedance_aa_and_power() -> None:
    rng = np.random.default_rng(21)
    runs, looks, step = 4000, 300, 10
    n = np.arange(1, looks + 1) * step
    # True exceedance rate exactly at the 1% bound, a look every 10 canary requests to 3,000.
    at_bound = rng.binomial(step, 0.01, size=(runs, looks)).cumsum(axis=1)
    batch = exceedance_rate_batch(at_bound, n, 0.01)
    worse = float(batch.worse.any(axis=1).mean())
    # At the upper null p = bound + slack = 2%, "no_worse" is the false positive.
    at_upper = rng.binomial(step, 0.02, size=(runs, looks)).cumsum(axis=1)
    no_worse = float(exceedance_rate_batch(at_upper, n, 0.01).no_worse.any(axis=1).mean())
    slow = rng.binomial(step, 0.05, size=(1000, looks)).cumsum(axis=1)
    slow_worse = exceedance_rate_batch(slow, n, 0.01).worse
    median = float(np.median(n[slow_worse.argmax(axis=1)][slow_worse.any(axis=1)]))
    print(
        f"\nexceedance at the bound: P(any worse) = {worse:.4f}; at bound + slack: "
        f"P(any no_worse) = {no_worse:.4f}; at 5%: decided {slow_worse.any(axis=1).mean():.3f}, "
        f"median {median:.0f} requests; at the bound, no_worse within 3,000: "
        f"{batch.no_worse.any(axis=1).mean():.3f}"
    )
    assert worse <= ALPHA + allowance(runs)
    assert no_worse <= ALPHA + allowance(runs)
    assert slow_worse.any(axis=1).mean() >= 0.99
    assert median < 150  # measured 100


@pytest.mark.parametrize("shares", [(0.1, 0.9), (1 / 3, 1 / 3, 1 / 3)])
def test_srm_aa_with_continuous_peeking(shares: tuple[float, ...]) -> None:
    runs = 4000
    # Correct split, a look every 20 assignments up to 5,000.
    steps = np.random.default_rng(31).multinomial(20, shares, size=(runs, 250))
    log_bf = sample_ratio_mismatch_batch(steps.cumsum(axis=1), shares)
    false_positive = float((log_bf >= math.log(1 / ALPHA)).any(axis=1).mean())
    print(f"\nSRM A/A {tuple(round(s, 3) for s in shares)}: P(any mismatch) = {false_positive:.4f}")
    assert false_positive <= ALPHA + allowance(runs)


def test_srm_catches_a_broken_split() -> None:
    steps = np.random.default_rng(32).multinomial(20, (0.12, 0.88), size=(500, 500))
    mismatch = sample_ratio_mismatch_batch(steps.cumsum(axis=1), (0.1, 0.9)) >= math.log(20)
    median = float(np.median(mismatch.argmax(axis=1)[mismatch.any(axis=1)] + 1) * 20)
    print(f"\nSRM 12% instead of 10%: decided {mismatch.any(axis=1).mean():.3f}, median {median}")
    assert mismatch.any(axis=1).mean() >= 0.95


def test_ab_lift_aa_with_continuous_peeking() -> None:
    runs, looks, step = 2000, 200, 30
    rng = np.random.default_rng(41)
    # A control and two treatments, 5% conversions on all, equal split, a look every 30
    # requests up to 6,000.
    assigned = rng.multinomial(step, (1 / 3, 1 / 3, 1 / 3), size=(runs, looks))
    n = assigned.cumsum(axis=1)
    k = rng.binomial(assigned, 0.05).cumsum(axis=1)
    decided = np.zeros(runs, dtype=bool)
    for arm in (1, 2):
        var_t, var_c = two_sample_bernoulli_variances(
            k[..., arm], n[..., arm], k[..., 0], n[..., 0]
        )
        batch = ab_lift_batch(
            n[..., 0],
            k[..., 0] / n[..., 0],
            var_c,
            n[..., arm],
            k[..., arm] / n[..., arm],
            var_t,
            arms=2,
            tau=0.02,
        )
        decided |= (batch.winner | batch.loser).any(axis=1)
    false_positive = float(decided.mean())
    print(f"\nA/B A/A, 2 treatments: P(any winner or loser) = {false_positive:.4f}")
    assert false_positive <= ALPHA + allowance(runs)
