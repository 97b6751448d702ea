"""Known-truth tests of analysis/stats.py: coverage, size and power by simulation, with fixed seeds.

Bands: a simulated rate r from S studies is compared with its target within 3.5 binomial
standard errors plus the stated slack, so a correct implementation fails about 1 time in 2000
per check while a wrong one (a zero-width interval, an uncorrected family, a one-sided p) fails.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (
    MIN_GROUPS,
    NotEstimated,
    compare_rates,
    compare_values,
    holm,
    kaplan_meier,
    km_medians,
    logrank,
    median_ratio,
    median_time,
    proportion_ci,
    rank_sum_null,
    require,
    variance_components,
)

Z = stats.norm.ppf(0.975)


def band(rate_true: float, s: int) -> float:
    return 3.5 * math.sqrt(rate_true * (1 - rate_true) / s)


# ----------------------------------------------------------------------------- proportion_ci

@pytest.mark.parametrize(
    "n, mean_cov, min_cov",
    # exact coverage (binomial sum) over p = 0.05..0.95; measured: n=5 0.958 (min 0.904 at p=0.11),
    # n=10 0.956 (min 0.914), n=20 0.953 (min 0.925)
    [(5, 0.958, 0.90), (10, 0.956, 0.91), (20, 0.953, 0.92)],
)
def test_wilson_coverage_is_near_nominal_averaged_over_p(n, mean_cov, min_cov):
    ps = np.linspace(0.05, 0.95, 91)
    ci = np.array([proportion_ci(k, n) for k in range(n + 1)])  # [n+1, 2]
    pmf = stats.binom.pmf(np.arange(n + 1)[:, None], n, ps[None])  # [n+1, P]
    covered = (ci[:, :1] <= ps) & (ps <= ci[:, 1:])
    coverage = (pmf * covered).sum(axis=0)  # [P], exact
    assert abs(coverage.mean() - 0.95) <= 0.02
    assert coverage.mean() == pytest.approx(mean_cov, abs=0.002)
    assert coverage.min() >= min_cov  # Wilson dips below nominal at some p: by this much at most

    # and by simulation, through the same function, at p = 0.3
    rng = np.random.default_rng(n)
    k = rng.binomial(n, 0.3, size=4000)
    sim = np.mean([ci[j, 0] <= 0.3 <= ci[j, 1] for j in k])
    exact = coverage[np.argmin(abs(ps - 0.3))]
    assert abs(sim - exact) <= band(exact, 4000)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_wilson_never_zero_width_at_0_and_n(n):
    lo0, hi0 = proportion_ci(0, n)
    lon, hin = proportion_ci(n, n)
    assert lo0 == 0.0 and hi0 == pytest.approx(Z**2 / (n + Z**2))
    assert hin == 1.0 and lon == pytest.approx(n / (n + Z**2))
    assert hi0 > 0 and lon < 1


def test_proportion_ci_refuses_n0_and_bad_counts():
    with pytest.raises(NotEstimated, match="not estimated: 0 runs, needs at least 1"):
        proportion_ci(0, 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        proportion_ci(6, 5)
    with pytest.raises(ValueError):
        proportion_ci(1, 5, level=1.5)


# ----------------------------------------------------------------------------- compare_rates

@pytest.fixture(scope="module")
def rates_table():
    """Every outcome (k1, k2) at 10 runs per arm: p, lo, hi, each [11, 11].

    Boschloo's test costs tens of milliseconds per table, so each table is computed once per
    symmetry class: swapping the arms or swapping successes and failures leaves p unchanged and
    maps (lo, hi) to (-hi, -lo) (checked in test_compare_rates_symmetry).
    """
    n = 10
    p, lo, hi = (np.full((n + 1, n + 1), np.nan) for _ in range(3))
    for a in range(n + 1):
        for b in range(n + 1):
            if not np.isnan(p[a, b]):
                continue
            r = compare_rates(a, n, b, n)
            for (i, j), flip in (((a, b), 1), ((b, a), -1), ((n - a, n - b), -1), ((n - b, n - a), 1)):
                p[i, j] = r["p"]
                lo[i, j], hi[i, j] = (r["lo"], r["hi"]) if flip == 1 else (-r["hi"], -r["lo"])
    return n, p, lo, hi


def test_compare_rates_symmetry():
    r = compare_rates(3, 10, 8, 12)
    swapped = compare_rates(8, 12, 3, 10)
    flipped = compare_rates(7, 10, 4, 12)
    for other in (swapped, flipped):
        assert other["p"] == pytest.approx(r["p"], rel=1e-6)
        assert (other["lo"], other["hi"]) == pytest.approx((-r["hi"], -r["lo"]))


def _outcome_weights(n, p1, p2):
    return stats.binom.pmf(np.arange(n + 1), n, p1)[:, None] * stats.binom.pmf(np.arange(n + 1), n, p2)[None]


@pytest.mark.parametrize("p0, size", [(0.5, 0.0422), (0.2, 0.0299), (0.8, 0.0299)])
def test_compare_rates_exact_test_keeps_its_level(rates_table, p0, size):
    n, p, _, _ = rates_table
    w = _outcome_weights(n, p0, p0)
    rejection = (w * (p <= 0.05)).sum()
    assert rejection <= 0.05  # an exact test: never above alpha
    # measured: Boschloo 0.042 at p = 0.5 and 0.030 at 0.2 (Fisher's test: 0.013 and 0.008)
    assert rejection == pytest.approx(size, abs=0.002)
    # the same through simulated studies looked up in the table
    rng = np.random.default_rng(7)
    k1, k2 = rng.binomial(n, p0, 4000), rng.binomial(n, p0, 4000)
    assert abs((p[k1, k2] <= 0.05).mean() - rejection) <= band(rejection, 4000)


@pytest.mark.parametrize("p1, p2", [(0.1, 0.7), (0.2, 0.8)])
def test_compare_rates_power_matches_normal_approximation(rates_table, p1, p2):
    n, p, lo, hi = rates_table
    w = _outcome_weights(n, p1, p2)
    power = (w * (p <= 0.05)).sum()  # exact: 0.824 and 0.805 (Fisher's test: 0.667 and 0.635)
    pbar = (p1 + p2) / 2
    theory = stats.norm.cdf(
        (abs(p1 - p2) - Z * math.sqrt(2 * pbar * (1 - pbar) / n)) / math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    )  # 0.838 and 0.817
    assert abs(power - theory) <= 0.03
    coverage = (w * ((lo <= p1 - p2) & (p1 - p2 <= hi))).sum()  # Newcombe: 0.928 and 0.937
    assert 0.92 <= coverage <= 0.98


def test_compare_rates_degenerate():
    both_zero = compare_rates(0, 5, 0, 5)
    assert both_zero["diff"] == 0 and both_zero["p"] == 1.0
    assert both_zero["lo"] < 0 < both_zero["hi"]
    all_vs_none = compare_rates(5, 5, 0, 5)
    assert all_vs_none["diff"] == 1.0 and all_vs_none["hi"] == 1.0 and 0 < all_vs_none["lo"] < 1
    assert all_vs_none["p"] < 0.01
    one = compare_rates(1, 1, 0, 1)
    # scipy's two-sided Boschloo p is twice the one-sided one: 2 * 0.25 at one run per arm
    assert one["lo"] < 0 < one["hi"] and one["p"] == pytest.approx(0.5)
    with pytest.raises(NotEstimated, match="arm 2"):
        compare_rates(1, 3, 0, 0)


# ----------------------------------------------------------------------------- compare_values

def _cliff_true(shift):
    # X ~ N(0, 1), Y ~ N(shift, 1): P(X > Y) - P(X < Y) = 1 - 2 Phi(shift / sqrt 2)
    return 1 - 2 * stats.norm.cdf(shift / math.sqrt(2))


def _lehmann_power(n, shift):
    # normal approximation to the Mann-Whitney power at m = n (Lehmann 1975, ch. 2), with the
    # variance of U under the alternative: n^2 [theta(1-theta) + 2(n-1)(p2 - theta^2)],
    # p2 = P(X < Y1, X < Y2) = Phi2(shift/sqrt2, shift/sqrt2; rho = 1/2)
    theta = stats.norm.cdf(shift / math.sqrt(2))
    p2 = stats.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]]).cdf([shift / math.sqrt(2)] * 2)
    v1 = n * n * (theta * (1 - theta) + 2 * (n - 1) * (p2 - theta**2))
    v0 = n * n * (2 * n + 1) / 12
    return stats.norm.cdf((n * n * abs(theta - 0.5) - Z * math.sqrt(v0)) / math.sqrt(v1))


@pytest.mark.parametrize("n, shift, studies", [(10, 0.0, 600), (10, 1.3, 300), (5, 2.0, 300)])
def test_compare_values_size_power_and_effect_coverage(n, shift, studies):
    rng = np.random.default_rng(11)
    x = rng.normal(0.0, 1.0, (studies, n))
    y = rng.normal(shift, 1.0, (studies, n))
    res = [compare_values(x[i], y[i]) for i in range(studies)]
    reject = np.mean([r["p"] <= 0.05 for r in res])
    if shift == 0:
        # measured 0.050 over 1000 studies at n=10
        assert abs(reject - 0.05) <= band(0.05, studies)
    else:
        theory = _lehmann_power(n, shift)  # 0.741 (n=10, shift 1.3), 0.693 (n=5, shift 2.0)
        assert abs(reject - theory) <= band(theory, studies) + 0.02
    delta = _cliff_true(shift)
    coverage = np.mean([r["lo"] <= delta <= r["hi"] for r in res])  # measured 0.94-0.97
    assert abs(coverage - 0.95) <= band(0.95, studies) + 0.02


def test_compare_values_keeps_its_level_with_ties_at_zero():
    # final errors: half the runs at exactly 0, the rest rounded to 0.1 (heavy ties), no difference.
    # measured over 2000 studies: 0.034 at n=5, 0.046 at n=10 (an exact test: at most alpha)
    rng = np.random.default_rng(12)
    studies, n = 600, 10

    def errors():
        return np.where(rng.random((studies, n)) < 0.5, 0.0, np.round(rng.exponential(1.0, (studies, n)), 1))

    x, y = errors(), errors()
    reject = np.mean([compare_values(x[i], y[i])["p"] <= 0.05 for i in range(studies)])
    assert reject <= 0.05 + band(0.05, studies)
    assert reject >= 0.02


def test_compare_values_exact_p_and_ties():
    r = compare_values([1, 2, 3], [4, 5, 6])
    assert r["p"] == pytest.approx(0.1)  # 2 of the C(6, 3) = 20 splits are this extreme
    assert r["effect"] == -1.0 and r["lo"] == -1.0 and -1.0 < r["hi"] < 0.0  # non-zero width at separation
    assert compare_values([4, 5, 6], [1, 2, 3])["effect"] == 1.0

    # no ties: the same p as scipy's exact Mann-Whitney
    rng = np.random.default_rng(0)
    for m, n in ((3, 4), (9, 12), (10, 10)):
        x, y = rng.random(m), rng.random(n) + 0.2
        exact = stats.mannwhitneyu(x, y, method="exact").pvalue
        assert compare_values(x, y)["p"] == pytest.approx(exact, rel=1e-9)

    # ties (final errors at 0), unequal arms: the p is the share of all C(12, 5) = 792 splits of
    # the pooled values whose rank sum lies as far from its null mean as the observed one, or farther
    x = np.array([0, 0, 0, 0, 0.1])
    y = np.array([0, 0, 0.2, 0.3, 0.3, 0.4, 0.5])
    pooled = np.concatenate([x, y])
    ranks = stats.rankdata(pooled)
    centre = 5 * ranks.mean()
    observed = abs(ranks[:5].sum() - centre)
    sums = np.array([ranks[list(idx)].sum() for idx in combinations(range(12), 5)])
    r = compare_values(x, y)
    assert r["p"] == pytest.approx(np.mean(np.abs(sums - centre) >= observed - 1e-9))
    assert r["effect"] == pytest.approx(np.sign(x[:, None] - y[None]).mean())


def test_rank_sum_null_counts_every_split():
    counts = rank_sum_null(np.array([2, 3, 3, 6, 7, 9]), 3)
    assert counts.sum() == math.comb(6, 3)
    brute = np.bincount([sum(c) for c in combinations([2, 3, 3, 6, 7, 9], 3)], minlength=len(counts))
    np.testing.assert_array_equal(counts, brute)


def test_compare_values_degenerate():
    same = compare_values([0, 0, 0], [0, 0])
    assert same["p"] == 1.0 and same["effect"] == 0.0 and same["lo"] < 0 < same["hi"]
    single = compare_values([1.0], [2.0])
    assert single["p"] == 1.0 and single["effect"] == -1.0 and single["hi"] > 0
    assert single["n1"] == 1 and single["n2"] == 1
    with pytest.raises(NotEstimated, match="arm 1"):
        compare_values([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        compare_values([np.nan], [1.0])


# ----------------------------------------------------------------------------- survival

def _censored_exponential(rng, studies, n, censor_rate=0.25):
    event = rng.exponential(1.0, (studies, n))
    censor = rng.exponential(1.0 / censor_rate, (studies, n))  # about 20% censored
    return np.minimum(event, censor), event <= censor


@pytest.mark.parametrize("n", [5, 10, 20])
def test_median_time_interval_coverage(n):
    # measured over 1000 studies: 0.952 (n=5), 0.952 (n=10), 0.957 (n=20); at n=5 the upper
    # limit is always inf (the log-log band never drops below 1/2 with 5 runs)
    rng = np.random.default_rng(n)
    studies = 600
    t, r = _censored_exponential(rng, studies, n)
    true_median = math.log(2)
    covered = 0
    for i in range(studies):
        med, lo, hi = median_time(t[i], r[i])
        assert lo <= med <= hi
        covered += lo <= true_median <= hi
    assert abs(covered / studies - 0.95) <= band(0.95, studies) + 0.01


def test_kaplan_meier_by_hand_and_km_medians_agree():
    # times 1, 2, 2, 5 reached; 3, 6 censored: S = 5/6, 5/6 * 3/5 = 1/2, 1/2, 1/2 * 1/2, 1/4
    km = kaplan_meier([1, 2, 2, 5, 3, 6], [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(km.t, [1, 2, 3, 5, 6])
    np.testing.assert_allclose(km.survival, [5 / 6, 1 / 2, 1 / 2, 1 / 4, 1 / 4])
    assert np.all(km.lo <= km.survival) and np.all(km.survival <= km.hi)
    assert median_time([1, 2, 2, 5, 3, 6], [1, 1, 1, 1, 0, 0])[0] == 2.0

    rng = np.random.default_rng(0)
    t = rng.integers(1, 8, (200, 9)).astype(float)  # many ties, events and censorings at one time
    r = rng.random((200, 9)) < 0.6
    fast = km_medians(t, r)
    slow = np.array([median_time(t[i], r[i])[0] for i in range(200)])
    np.testing.assert_array_equal(fast, slow)


def test_survival_degenerate():
    assert median_time([3, 4, 5], [False, False, False]) == (math.inf, math.inf, math.inf)
    km = kaplan_meier([3, 4], [False, False])
    np.testing.assert_array_equal(km.survival, [1, 1])
    med, lo, hi = median_time([3.0], [True])  # one run: median 3, no upper bound
    assert med == 3.0 and hi == math.inf
    km = kaplan_meier([1, 2, 3], [True, True, True])
    assert km.survival[-1] == 0 and km.hi[-1] > 0  # never claims certainty at the last event
    assert math.isnan(logrank([1, 2], [False, False], [3], [False]))
    with pytest.raises(NotEstimated):
        median_time([], [])
    with pytest.raises(ValueError, match="censored"):
        median_time([1, math.inf], [True, False])


@pytest.mark.parametrize(
    "n, hr, studies",
    [(10, 1.0, 800), (20, 1.0, 500), (20, 3.0, 300)],
)
def test_logrank_size_and_power(n, hr, studies):
    rng = np.random.default_rng(2)
    t1 = rng.exponential(1.0, (studies, n))
    t2 = rng.exponential(hr, (studies, n))
    reached = np.ones(n, bool)
    p = np.array([logrank(t1[i], reached, t2[i], reached) for i in range(studies)])
    reject = (p <= 0.05).mean()
    if hr == 1.0:
        # the log-rank's normal approximation is liberal at small n: measured 0.068 at 10 runs per
        # arm, 0.053 at 20 (1000 studies each)
        slack = 0.03 if n == 10 else 0.01
        assert abs(reject - 0.05) <= band(0.05, studies) + slack
    else:
        d = 2 * n  # events: no censoring
        schoenfeld = stats.norm.cdf(math.sqrt(d / 4) * abs(math.log(hr)) - Z)  # 0.935
        freedman = stats.norm.cdf(math.sqrt(d) * abs(hr - 1) / (hr + 1) - Z)  # 0.885
        # measured 0.907: between the two textbook approximations
        assert freedman - band(freedman, studies) <= reject <= schoenfeld + band(schoenfeld, studies)


def test_median_ratio_coverage_and_refusals():
    # arm 2 is twice as slow: true ratio of medians 0.5. Measured coverage over 250 studies with
    # ~17% censoring (bench/stats_coverage.py): 0.971 (n=5, 245 estimated), 0.984 (n=10), 0.988
    # (n=20): the percentile bootstrap of a Kaplan-Meier median is conservative here
    rng = np.random.default_rng(5)
    studies, n = 150, 10
    covered = 0
    for _ in range(studies):
        e1, e2 = rng.exponential(1.0, n), rng.exponential(2.0, n)
        c1, c2 = rng.exponential(5.0, n), rng.exponential(10.0, n)
        r = median_ratio(np.minimum(e1, c1), e1 <= c1, np.minimum(e2, c2), e2 <= c2)
        assert r.lo <= r.ratio <= r.hi
        covered += r.lo <= 0.5 <= r.hi
    assert 0.93 <= covered / studies <= 1.0

    with pytest.raises(NotEstimated, match="4 runs in arm 1, needs at least 5"):
        median_ratio([1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    with pytest.raises(NotEstimated, match="not reached in arm 2"):
        median_ratio([1, 2, 3, 4, 5], [1] * 5, [1, 2, 3, 4, 5], [1, 0, 0, 0, 0])
    same = median_ratio([1, 2, 3, 4, 5], [1] * 5, [1, 2, 3, 4, 5], [1] * 5)
    assert same.ratio == 1.0 and same.lo < 1.0 < same.hi


# ----------------------------------------------------------------------------- holm

def test_holm_hand_worked():
    # sorted 0.01, 0.02, 0.03, 0.04 (m=4): 0.04, 0.06, 0.06 (0.03*2, raised to the running max), 0.06
    np.testing.assert_allclose(holm([0.04, 0.01, 0.03, 0.02]), [0.06, 0.04, 0.06, 0.06])
    # 0.005*3 = 0.015, 0.03*2 = 0.06, 0.5*1 = 0.5
    np.testing.assert_allclose(holm([0.5, 0.005, 0.03]), [0.5, 0.015, 0.06])
    # capped at 1, NaN passed through and not counted in m
    out = holm([0.6, np.nan, 0.7])
    np.testing.assert_allclose(out, [1.0, np.nan, 1.0])
    np.testing.assert_allclose(holm([0.01, np.nan]), [0.01, np.nan])
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError):
        holm([1.5])


def test_holm_family_wise_error_under_the_null():
    # m independent true nulls: Holm rejects some iff min p <= alpha/m, so FWER = 1 - (1 - alpha/m)^m
    rng = np.random.default_rng(3)
    studies, m = 4000, 5
    p = rng.uniform(size=(studies, m))
    any_rejected = np.array([(holm(row) <= 0.05).any() for row in p]).mean()
    theory = 1 - (1 - 0.05 / m) ** m  # 0.0490
    assert abs(any_rejected - theory) <= band(theory, studies)
    raw = (p <= 0.05).any(axis=1).mean()  # unadjusted: 1 - 0.95^5 = 0.226
    assert raw > 0.2


# ----------------------------------------------------------------------------- variance components

@pytest.mark.parametrize(
    "k, n, icc, balanced",
    # measured coverage over 1000 studies (bench/stats_coverage.py): 0.955 (10 x 5, 0.3), 0.942
    # (5 x 3, 0.5), 0.935 (10 configurations of 2-8 seeds, 0.3: the n0 interval is approximate)
    [(10, 5, 0.3, True), (5, 3, 0.5, True), (10, None, 0.3, False)],
)
def test_variance_components_recovers_icc_with_coverage(k, n, icc, balanced):
    rng = np.random.default_rng(4)
    studies = 600
    covered, estimates = 0, []
    for _ in range(studies):
        sizes = np.full(k, n) if balanced else rng.integers(2, 9, k)
        g = np.repeat(np.arange(k), sizes)
        y = rng.normal(0, math.sqrt(icc), k)[g] + rng.normal(0, math.sqrt(1 - icc), len(g))
        v = variance_components(y, g)
        assert v.balanced == balanced
        assert v.seed_share == pytest.approx(1 - v.icc)
        assert v.within_lo <= v.within <= v.within_hi
        covered += v.icc_lo <= icc <= v.icc_hi
        estimates.append(v.icc)
    slack = 0.01 if balanced else 0.03
    assert abs(covered / studies - 0.95) <= band(0.95, studies) + slack
    assert abs(np.mean(estimates) - icc) <= 0.08  # the ANOVA ICC is biased low at few groups


def test_variance_components_by_hand_and_refusals():
    # groups a: 1, 3 (mean 2); b: 5, 7 (mean 6); c: 9, 11 (mean 10); grand mean 6
    y = [1, 3, 5, 7, 9, 11]
    g = ["a", "a", "b", "b", "c", "c"]
    v = variance_components(y, g)
    msb, msw = 2 * (16 + 0 + 16) / 2, (1 + 1) * 3 / 3  # 32, 2
    assert v.within == pytest.approx(msw)
    assert v.between == pytest.approx((msb - msw) / 2)
    assert v.icc == pytest.approx(15 / 17)
    f = msb / msw
    f_l = f / stats.f.ppf(0.975, 2, 3)
    assert v.icc_lo == max(0.0, (f_l - 1) / (f_l + 1))  # -0.0014, clipped to 0
    assert v.seed_share_hi == pytest.approx(1 - v.icc_lo)

    with pytest.raises(NotEstimated, match=f"2 configurations, needs at least {MIN_GROUPS}"):
        variance_components([1, 2, 3, 4], [0, 0, 1, 1])
    with pytest.raises(NotEstimated, match="1 seeds in the smallest configuration, needs at least 2"):
        variance_components([1, 2, 3, 4, 5], [0, 0, 1, 1, 2])
    with pytest.raises(NotEstimated, match="no variation between seeds"):
        variance_components([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2])
    # no configuration effect at all: ICC 0, the interval reaches 0, seed noise is all the variance
    v = variance_components([1, 2, 1, 2, 1, 2], [0, 0, 1, 1, 2, 2])
    assert v.icc == 0.0 and v.icc_lo == 0.0 and v.seed_share == 1.0


def test_require_sentence():
    require(3, 3, "trials")
    with pytest.raises(NotEstimated) as err:
        require(3, 10, "trials")
    assert err.value.reason == "not estimated: 3 trials, needs at least 10" == str(err.value)
