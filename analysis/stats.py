"""Small-sample statistics for comparing runs: numpy/scipy in, floats out.

Every function here takes plain arrays or counts and returns floats (or a NamedTuple of floats),
so each can be checked against known truth by simulation (tests/test_stats.py). No pandas, no
MLflow: the callers in analysis/ turn tidy frames into arrays and these numbers into tables.

Choices, each made for the seed counts studies use (3-20 runs per arm):

- Success rates: **Wilson** score interval (:func:`proportion_ci`). Clopper-Pearson guarantees at
  least nominal coverage at every p and pays for it with wide intervals: its 95% interval covers
  0.990 / 0.983 / 0.975 of the time at n = 5 / 10 / 20 (averaged over p = 0.05..0.95). Wilson's
  averages 0.958 / 0.956 / 0.953 and never has zero width (0/n gives [0, z^2/(n+z^2)]); it dips
  below nominal at some p (the binomial lattice), to 0.904 / 0.914 / 0.925 at worst.
- Difference of rates: **Newcombe's hybrid score** interval built from the two Wilson intervals,
  with **Boschloo's exact test** (:func:`compare_rates`). Boschloo's test keeps the exact level of
  Fisher's test and is uniformly more powerful than it; Fisher's conditional test is markedly
  conservative at 5-20 runs per arm. The interval and the test are different procedures and can
  disagree at the margin; report both.
- Values (final errors): **Mann-Whitney** test with **Cliff's delta**
  (:func:`compare_values`). Final errors pile up at 0 (ties) and are far from normal, so a rank
  test, with an exact permutation p-value that accounts for ties (see :func:`compare_values`). Cliff's delta
  = P(X > Y) - P(X < Y) is the effect the test measures, and its interval is Newcombe's (2006)
  score-type interval for the Mann-Whitney probability, which stays inside [-1, 1] and keeps a
  non-zero width at complete separation (delta = +-1), where bootstrap and Wald intervals collapse.
- Time to target: **Kaplan-Meier** with a log-log pointwise band (scipy's Greenwood-based one),
  the median with the **Brookmeyer-Crowley** interval read off that band, the **log-rank** test,
  and a percentile bootstrap over seeds for the ratio of two medians (:func:`median_ratio`).
- Families of p-values: **Holm** step-down (:func:`holm`), which controls the family-wise error
  rate under any dependence between the comparisons.
- Seed noise: a **one-way random-effects** model (configuration random, seeds within it) with
  the exact F-based interval for the intraclass correlation (:func:`variance_components`).

Minimum sizes. A function that cannot give an honest answer raises :class:`NotEstimated`
(a ``ValueError``) whose message is the sentence a report prints, e.g. "not estimated: 2
configurations, needs at least 3". Malformed input (k > n, negative counts, NaN times, mismatched
lengths) raises a plain ``ValueError``. The minimums:

- rates, values, survival: at least 1 run per arm (:data:`MIN_RUNS`). The intervals are valid
  from one run on (they are just wide), so nothing above 1 is imposed: the width says it.
- :func:`median_ratio`: at least :data:`MIN_RUNS_BOOTSTRAP` = 5 runs per arm. A bootstrap over n
  seeds has at most C(2n-1, n) distinct resamples (35 at n = 4, 126 at n = 5), so the 2.5% and
  97.5% quantiles below 5 rest on a handful of distinct values.
- :func:`variance_components`: at least :data:`MIN_GROUPS` = 3 configurations, each with at least
  :data:`MIN_REPLICATES` = 2 seeds. Within-configuration variance needs two seeds per
  configuration; with 2 configurations the between-configuration mean square has 1 degree of
  freedom and the exact ICC interval spans almost all of [0, 1] (at 2 x 5 runs and a true ICC of
  0.5 its upper limit has a median of 0.998 over simulated studies), which says nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy import optimize, stats

LEVEL = 0.95
MIN_RUNS = 1
MIN_RUNS_BOOTSTRAP = 5
MIN_GROUPS = 3
MIN_REPLICATES = 2
N_BOOTSTRAP = 2000  # resamples for median_ratio: endpoint Monte Carlo error well below sampling error
EXACT_MAX_RUNS = 60  # Mann-Whitney p: exact permutation distribution up to this many runs in all


class NotEstimated(ValueError):
    """Too little data for an honest estimate; ``str(err)`` / ``err.reason`` is the sentence to print."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def require(n: int, minimum: int, unit: str) -> None:
    """Raise NotEstimated("not estimated: {n} {unit}, needs at least {minimum}") when n < minimum.

    unit names what was counted, in the plural ("trials", "runs in arm 1", "configurations").
    """
    if n < minimum:
        raise NotEstimated(f"not estimated: {n} {unit}, needs at least {minimum}")


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _check_counts(k: int, n: int, name: str) -> None:
    if int(k) != k or int(n) != n or n < 0 or not 0 <= k <= n:
        raise ValueError(f"{name}: expected integers with 0 <= k <= n, got k={k}, n={n}")


# ----------------------------------------------------------------------------- rates

def proportion_ci(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval for a success probability from k successes in n runs.

    Returns (lo, hi) with 0 <= lo < hi <= 1 for every n >= 1 (0/n and n/n included).
    Raises NotEstimated for n = 0.
    """
    _check_counts(k, n, "proportion_ci")
    require(n, MIN_RUNS, "runs")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=_check_level(level), method="wilson")
    return float(ci.low), float(ci.high)


def compare_rates(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> dict[str, float]:
    """Difference of success rates, p1 - p2 = k1/n1 - k2/n2.

    Returns {"diff", "lo", "hi", "p"}: Newcombe's hybrid score interval (his method 10, from the
    Wilson intervals of each rate) and the two-sided p-value of Boschloo's exact test.
    Raises NotEstimated when an arm has no runs.
    """
    _check_counts(k1, n1, "compare_rates arm 1")
    _check_counts(k2, n2, "compare_rates arm 2")
    require(n1, MIN_RUNS, "runs in arm 1")
    require(n2, MIN_RUNS, "runs in arm 2")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = proportion_ci(k1, n1, level)
    l2, u2 = proportion_ci(k2, n2, level)
    diff = p1 - p2
    # Newcombe (1998): each side combines the distances from each estimate to its Wilson limit.
    lo = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    if (k1 == 0 and k2 == 0) or (k1 == n1 and k2 == n2):
        p = 1.0  # identical all-or-none tables carry no evidence; scipy returns 1.0 here too, made explicit
    else:
        # scipy's convention: each column is one binomial sample (successes, failures)
        p = float(stats.boschloo_exact([[k1, k2], [n1 - k1, n2 - k2]]).pvalue)
    return {"diff": float(diff), "lo": float(max(lo, -1.0)), "hi": float(min(hi, 1.0)), "p": min(p, 1.0)}


# ----------------------------------------------------------------------------- values

def _as_values(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=float).ravel()
    if np.isnan(x).any():
        raise ValueError(f"{name}: NaN values; drop runs without a value before comparing")
    return x


def rank_sum_null(scores: np.ndarray, m: int) -> np.ndarray:
    """Permutation distribution of the sum of m of the given integer scores.

    scores: [N] non-negative integers (here twice the mid-ranks of the pooled sample, so ties keep
    their mid-rank); returns counts: [S + 1] float, counts[s] = number of the C(N, m) subsets of
    size m whose scores sum to s. Dynamic programme over the items (the shift algorithm of
    Streitberg & Roehmel 1986): after item i, ways[j, s] counts subsets of the first i items
    of size j and sum s. Cost O(N * m * S), S = sum(scores).
    """
    scores = np.asarray(scores, dtype=np.int64)
    total = int(scores.sum())
    ways = np.zeros((m + 1, total + 1))
    ways[0, 0] = 1.0
    for c in scores:
        # take item i: a subset of size j - 1 and sum s - c becomes size j and sum s
        if c == 0:
            ways[1:] = ways[1:] + ways[:-1]
        else:
            ways[1:, c:] = ways[1:, c:] + ways[:-1, :-c]
    return ways[m]


def _mann_whitney_p(x: np.ndarray, y: np.ndarray) -> float:
    pooled = np.concatenate([x, y])
    if np.all(pooled == pooled[0]):
        return 1.0  # every value tied: nothing separates the arms (the normal approximation gives 0/0)
    if len(pooled) > EXACT_MAX_RUNS:
        # normal approximation with tie correction: accurate at these sizes
        return float(stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic").pvalue)
    # Exact permutation p-value, ties included. scipy's method="exact" uses the untied null
    # distribution (wrong with ties, and final errors tie at 0), and its permutation route
    # enumerates every split (seconds at 10 + 10 runs); the rank-sum distribution is cheap.
    scores = np.rint(2.0 * stats.rankdata(pooled)).astype(np.int64)
    counts = rank_sum_null(scores, len(x))
    sums = np.arange(len(counts))
    centre = len(x) * scores.mean()
    observed = abs(scores[: len(x)].sum() - centre)
    extreme = np.abs(sums - centre) >= observed - 1e-9  # two-sided: as far from the null mean or farther
    return float(min(1.0, counts[extreme].sum() / counts.sum()))


def _mann_whitney_theta_interval(theta: float, m: int, n: int, level: float) -> tuple[float, float]:
    """Newcombe's (2006) score-type interval for theta = P(X > Y) + P(X = Y) / 2.

    Variance of theta_hat at theta (Hanley & McNeil 1982, with both n_x - 1 and n_y - 1 replaced
    by N* = (m + n)/2 - 1):  V(theta) = theta (1 - theta) / (m n) * [1 + N* ((1 - theta)/(2 - theta)
    + theta/(1 + theta))].  The interval is {theta: (theta - theta_hat)^2 <= z^2 V(theta)}, solved
    on each side of theta_hat; V(0) = V(1) = 0, so the limits stay in [0, 1] with non-zero width.
    """
    z = stats.norm.ppf(0.5 + level / 2.0)
    n_star = (m + n) / 2.0 - 1.0

    def score(t: float) -> float:
        v = t * (1.0 - t) / (m * n) * (1.0 + n_star * ((1.0 - t) / (2.0 - t) + t / (1.0 + t)))
        return (t - theta) ** 2 - z * z * v

    # score < 0 just inside theta_hat (at theta_hat itself for theta_hat in (0, 1); one step in
    # at 0 or 1, where V vanishes), while score(0) = theta_hat^2 and score(1) = (1 - theta_hat)^2
    # are >= 0: one root on each side. At theta_hat = 0 the root at 0 is the limit itself, and
    # the upper root is searched above a point just inside (0, 1); likewise at 1.
    eps = 1e-12
    inner_lo, inner_hi = max(theta, eps), min(theta, 1.0 - eps)
    lo = 0.0 if theta <= 0.0 else optimize.brentq(score, 0.0, inner_hi)
    hi = 1.0 if theta >= 1.0 else optimize.brentq(score, inner_lo, 1.0)
    return float(lo), float(hi)


def compare_values(x, y, level: float = LEVEL) -> dict[str, float]:
    """Two-sided Mann-Whitney test of x against y, and Cliff's delta with its interval.

    x: [n1], y: [n2] (e.g. final errors of two arms; lower is better for errors).
    effect = Cliff's delta = P(X > Y) - P(X < Y) over all n1 * n2 pairs, in [-1, 1]: negative
    when x tends to be smaller (an arm with lower errors has delta < 0 against the other).
    lo, hi: Newcombe's (2006) score-type interval for P(X > Y) + P(X = Y)/2, mapped to delta.
    p: the exact permutation p-value of the rank sum (mid-ranks for ties) up to
    n1 + n2 = EXACT_MAX_RUNS runs: the share of all C(n1 + n2, n1) splits of the pooled values
    whose rank sum lies at least as far from its null mean as the observed one. Above that,
    scipy's normal approximation with tie correction.
    Returns {"p", "effect", "lo", "hi", "n1", "n2"}. Raises NotEstimated when an arm is empty.
    """
    x = _as_values(x, "compare_values x")
    y = _as_values(y, "compare_values y")
    require(len(x), MIN_RUNS, "values in arm 1")
    require(len(y), MIN_RUNS, "values in arm 2")
    level = _check_level(level)
    sign = np.sign(x[:, None] - y[None, :])  # [n1, n2]
    delta = float(sign.mean())
    theta = (delta + 1.0) / 2.0  # P(X > Y) + P(X = Y)/2
    t_lo, t_hi = _mann_whitney_theta_interval(theta, len(x), len(y), level)
    return {
        "p": _mann_whitney_p(x, y),
        "effect": delta,
        "lo": 2.0 * t_lo - 1.0,
        "hi": 2.0 * t_hi - 1.0,
        "n1": float(len(x)),
        "n2": float(len(y)),
    }


# ----------------------------------------------------------------------------- time to target

def _as_survival(times, reached, name: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=float).ravel()
    r = np.asarray(reached, dtype=bool).ravel()
    if t.shape != r.shape:
        raise ValueError(f"{name}: times and reached differ in length ({len(t)} vs {len(r)})")
    if not np.all(np.isfinite(t)) or (t < 0).any():
        raise ValueError(f"{name}: times must be finite and >= 0 (a run that never reached the "
                         "target is censored at its last step, with reached=False)")
    return t, r


class Survival(NamedTuple):
    """Kaplan-Meier estimate as a right-continuous step function.

    t: [m] distinct observed times (events and censorings), increasing; survival[i], lo[i], hi[i]
    hold on [t[i], t[i+1]) and 1 before t[0] (plot with ``where="post"`` from (0, 1)).
    survival = fraction of runs that have not yet reached the target.
    """

    t: np.ndarray
    survival: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def kaplan_meier(times, reached, level: float = LEVEL) -> Survival:
    """Kaplan-Meier survival with a pointwise log-log band (Greenwood variance), via scipy.stats.ecdf.

    times: [n] steps at which each run reached the target, or its last step when it did not;
    reached: [n] bool, False = censored at that time (stopped by budget, ASHA or divergence).
    The log-log band stays inside [0, 1] and covers better at small n than the linear one
    (Borgan & Liestol 1990). Where it is undefined: before the first event (survival 1) both
    limits are 1; after the last run reached the target (survival 0) the lower limit is 0 and the
    upper limit keeps its last defined value (1 if none), since Greenwood's variance is undefined
    there and a zero upper limit would claim certainty that a handful of runs cannot give.
    Returns Survival(t, survival, lo, hi), each [m]. Raises NotEstimated for no runs.
    """
    t, r = _as_survival(times, reached, "kaplan_meier")
    require(len(t), MIN_RUNS, "runs")
    res = stats.ecdf(stats.CensoredData(uncensored=t[r], right=t[~r]))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "confidence interval is undefined at some observations"
        band = res.sf.confidence_interval(confidence_level=_check_level(level), method="log-log")
    s = np.asarray(res.sf.probabilities, dtype=float)
    lo = np.where(np.isnan(band.low.probabilities), s, band.low.probabilities)
    hi = np.asarray(band.high.probabilities, dtype=float).copy()
    hi[s == 1.0] = 1.0
    for i in np.flatnonzero(np.isnan(hi)):  # survival 0: carry the last defined upper limit
        hi[i] = hi[i - 1] if i > 0 else 1.0
    return Survival(np.asarray(res.sf.quantiles, dtype=float), s, lo, hi)


_HALF = 0.5 + 1e-12  # products of (1 - d/r) that equal 1/2 exactly can land a rounding error above it


def _first_below_half(t: np.ndarray, curve: np.ndarray) -> float:
    below = np.flatnonzero(curve <= _HALF)
    return float(t[below[0]]) if len(below) else math.inf


def median_time(times, reached, level: float = LEVEL) -> tuple[float, float, float]:
    """Median time to target with the Brookmeyer-Crowley interval.

    median = the smallest time at which the Kaplan-Meier survival is <= 1/2; math.inf when fewer
    than half the runs are known to have reached the target ("not reached").
    (lo, hi) = the times at which the lower and upper limits of the pointwise log-log band first
    reach 1/2: the set of t whose band contains 1/2. hi = math.inf when the upper band stays
    above 1/2 (the data cannot bound the median from above): always so below 7 runs, even when
    every run reached the target; lo = math.inf only when no run reached the target early enough
    for even the lower band to reach 1/2.
    Returns (median, lo, hi). Raises NotEstimated for no runs.
    """
    km = kaplan_meier(times, reached, level)
    return (
        _first_below_half(km.t, km.survival),
        _first_below_half(km.t, km.lo),
        _first_below_half(km.t, km.hi),
    )


def km_medians(times: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Kaplan-Meier medians of many samples at once (rows), as in :func:`median_time`.

    times, reached: [B, n] -> [B] medians (math.inf where not reached). Used by the bootstrap of
    :func:`median_ratio`, where B = 2000 calls to scipy would dominate the report's run time.
    Ties: events are ordered before censorings at the same time (censored runs are at risk at
    their censoring time), and processing d tied events one at a time multiplies to the same
    (1 - d/r) as the grouped Kaplan-Meier factor, so the first row position with S <= 1/2 gives
    the same time.
    """
    times = np.asarray(times, dtype=float)
    reached = np.asarray(reached, dtype=bool)
    b, n = times.shape
    order = np.lexsort((~reached, times), axis=1)  # by time, events first
    t = np.take_along_axis(times, order, axis=1)
    e = np.take_along_axis(reached, order, axis=1)
    at_risk = n - np.arange(n)  # [n]: runs at risk at sorted position i
    s = np.cumprod(1.0 - e / at_risk, axis=1)  # [B, n]
    below = s <= _HALF
    first = below.argmax(axis=1)
    return np.where(below.any(axis=1), t[np.arange(b), first], math.inf)


class Ratio(NamedTuple):
    """ratio = median1 / median2 with a bootstrap interval (lo, hi); < 1 means arm 1 is faster."""

    ratio: float
    lo: float
    hi: float


def median_ratio(
    times1, reached1, times2, reached2, level: float = LEVEL, n_boot: int = N_BOOTSTRAP, rng: int = 0
) -> Ratio:
    """Ratio of the Kaplan-Meier median times to target of two arms, with a bootstrap interval.

    ratio = median1 / median2 ("arm 1 takes 0.5x the steps of arm 2" = twice as fast).
    Interval: percentile bootstrap over runs, each arm resampled with replacement on its own
    (n_boot times, seeded by rng so a report is reproducible), the ratio recomputed on each
    resample. A resample in which an arm does not reach its median gives a ratio of inf (arm 1)
    or 0 (arm 2); one in which neither does has no ratio and counts against both limits (0 for the
    lower quantile, inf for the upper), so the interval widens rather than drops it.
    Measured on exponential times with ~17% censoring and a true ratio of 0.5: coverage 0.971 /
    0.984 / 0.988 at 5 / 10 / 20 runs per arm (conservative; bench/stats_coverage.py).
    Steps to target are evaluation steps, so medians are discrete: when the resampled medians of
    both arms take a single value the interval is that one ratio; read it with the run counts.
    Raises NotEstimated below MIN_RUNS_BOOTSTRAP runs per arm, or when either observed median is
    not reached (the ratio is then not a number; report the medians).
    """
    t1, r1 = _as_survival(times1, reached1, "median_ratio arm 1")
    t2, r2 = _as_survival(times2, reached2, "median_ratio arm 2")
    require(len(t1), MIN_RUNS_BOOTSTRAP, "runs in arm 1")
    require(len(t2), MIN_RUNS_BOOTSTRAP, "runs in arm 2")
    level = _check_level(level)
    m1 = km_medians(t1[None], r1[None])[0]
    m2 = km_medians(t2[None], r2[None])[0]
    for arm, m in ((1, m1), (2, m2)):
        if not math.isfinite(m):
            raise NotEstimated(f"not estimated: median time not reached in arm {arm}")
    if m2 == 0:
        raise NotEstimated("not estimated: median time of arm 2 is 0")
    gen = np.random.default_rng(rng)
    i1 = gen.integers(0, len(t1), size=(n_boot, len(t1)))
    i2 = gen.integers(0, len(t2), size=(n_boot, len(t2)))
    b1 = km_medians(t1[i1], r1[i1])
    b2 = km_medians(t2[i2], r2[i2])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = b1 / b2  # inf/inf and 0/0 -> nan
    alpha = (1.0 - level) / 2.0
    lo = np.quantile(np.where(np.isnan(ratio), 0.0, ratio), alpha, method="inverted_cdf")
    hi = np.quantile(np.where(np.isnan(ratio), math.inf, ratio), 1.0 - alpha, method="inverted_cdf")
    return Ratio(float(m1 / m2), float(lo), float(hi))


def logrank(times1, reached1, times2, reached2) -> float:
    """Two-sided log-rank test p-value (scipy.stats.logrank) that two arms reach the target at the same rate.

    The p-value is the chi-square approximation, somewhat liberal at few runs: under no difference
    it rejects at 5% in 0.068 of simulated studies at 10 runs per arm, 0.053 at 20
    (bench/stats_coverage.py).
    Returns NaN when no run in either arm reached the target (no event, nothing to test);
    :func:`holm` passes NaN through. Raises NotEstimated when an arm is empty.
    """
    return logrank_test(times1, reached1, times2, reached2)[1]


def logrank_test(times1, reached1, times2, reached2) -> tuple[float, float]:
    """(z, p) of the log-rank test: z > 0 when arm 1 reaches the target sooner than arm 2 would under no
    difference (more events than expected), p two-sided as :func:`logrank`. (NaN, NaN) without events."""
    t1, r1 = _as_survival(times1, reached1, "logrank arm 1")
    t2, r2 = _as_survival(times2, reached2, "logrank arm 2")
    require(len(t1), MIN_RUNS, "runs in arm 1")
    require(len(t2), MIN_RUNS, "runs in arm 2")
    if not (r1.any() or r2.any()):
        return math.nan, math.nan
    res = stats.logrank(
        stats.CensoredData(uncensored=t1[r1], right=t1[~r1]),
        stats.CensoredData(uncensored=t2[r2], right=t2[~r2]),
    )
    return float(res.statistic), float(res.pvalue)


# ----------------------------------------------------------------------------- multiplicity

def median_ci(values: np.ndarray | list[float], level: float = LEVEL) -> tuple[float, float, float, str | None]:
    """Median of ``values`` [n] with its exact distribution-free interval: (median, lo, hi, why).

    Interval: (x_(j), x_(n-j+1)) of the sorted values, j the largest with coverage
    1 - 2 P(Bin(n, 1/2) <= j - 1) >= level (any continuous distribution; with ties it covers at least
    as often). ``why`` is None, or "not estimated: <n> runs, needs at least <m>" when no j reaches the
    level (lo and hi then NaN); (NaN, NaN, NaN, why) for no values.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    need = next(m for m in range(1, 200) if 1.0 - 2.0 * stats.binom.cdf(0, m, 0.5) >= level)
    if n == 0:
        return math.nan, math.nan, math.nan, f"not estimated: 0 runs, needs at least {need}"
    median = float(np.median(x))
    if n < need:
        return median, math.nan, math.nan, f"not estimated: {n} runs, needs at least {need}"
    j = np.arange(1, n // 2 + 1)
    coverage = 1.0 - 2.0 * stats.binom.cdf(j - 1, n, 0.5)
    best = int(j[coverage >= level].max())
    return median, float(x[best - 1]), float(x[n - best]), None


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    pvalues: [m] (NaN allowed: passed through as NaN and not counted in the family size).
    With the valid p-values sorted, p(1) <= ... <= p(m'), the adjusted
    p~(i) = max_{j <= i} min(1, (m' - j + 1) p(j)): monotone in p and capped at 1. Rejecting
    where p~ <= alpha controls the family-wise error rate at alpha under any dependence.
    scipy has Benjamini-Hochberg (false_discovery_control), which controls a different error
    rate, so Holm is written here.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"holm: expected a 1-d array of p-values, got shape {p.shape}")
    valid = ~np.isnan(p)
    if ((p[valid] < 0) | (p[valid] > 1)).any():
        raise ValueError("holm: p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(steps)
    return out


# ----------------------------------------------------------------------------- seed noise

class VarianceComponents(NamedTuple):
    """One-way random-effects decomposition of a metric over configurations and seeds.

    between: variance of the configuration means' true values (sigma^2_a, ANOVA estimate, >= 0);
    within: seed-to-seed variance inside a configuration (sigma^2_e) with its exact chi-square
    interval (within_lo, within_hi); icc = between / (between + within), the share of variance due
    to the configuration, with (icc_lo, icc_hi); seed_share = within / total = 1 - icc, with
    (seed_share_lo, seed_share_hi) = (1 - icc_hi, 1 - icc_lo). balanced: all configurations had
    the same number of seeds (the ICC interval is then exact under normality).
    """

    between: float
    within: float
    within_lo: float
    within_hi: float
    icc: float
    icc_lo: float
    icc_hi: float
    seed_share: float
    seed_share_lo: float
    seed_share_hi: float
    n_groups: int
    n_values: int
    balanced: bool


def variance_components(values, groups, level: float = LEVEL) -> VarianceComponents:
    """Seed noise vs configuration effect: one-way random-effects ANOVA (Searle, Casella & McCulloch 1992, ch. 3).

    values: [N] metric per run; groups: [N] configuration label per run (ints or strings: sortable).
    Model: y_ij = mu + a_i + e_ij, a_i ~ N(0, sigma^2_a) (configuration), e_ij ~ N(0, sigma^2_e)
    (seed). With k configurations of n_i runs, N = sum n_i, MSB and MSW the between and within
    mean squares, and n0 = (N - sum n_i^2 / N) / (k - 1) (n0 = n when balanced):
      within = MSW, between = max(0, (MSB - MSW) / n0), icc = between / (between + within).
    ICC interval (balanced, exact): with F = MSB / MSW and F_a the a-quantile of F(k-1, N-k),
      F_L = F / F_{1-alpha/2}, F_U = F / F_{alpha/2},  icc in [(F_L - 1) / (F_L + n - 1), (F_U - 1) / (F_U + n - 1)],
    clipped to [0, 1]. Unbalanced: the same formula with n0 for n, which is approximate
    (Donner 1986 reviews it as adequate for moderate imbalance); ``balanced`` says which applies.
    Raises NotEstimated below MIN_GROUPS configurations, when a configuration has fewer than
    MIN_REPLICATES seeds, or when there is no within-configuration variation (every
    configuration gave identical values across its seeds: the normal model does not hold).
    """
    y = _as_values(values, "variance_components values")
    g = np.asarray(groups).ravel()
    if len(g) != len(y):
        raise ValueError(f"variance_components: values and groups differ in length ({len(y)} vs {len(g)})")
    level = _check_level(level)
    _, label = np.unique(g, return_inverse=True)
    sizes = np.bincount(label)
    k, n_total = len(sizes), len(y)
    require(k, MIN_GROUPS, "configurations")
    require(int(sizes.min()), MIN_REPLICATES, "seeds in the smallest configuration")
    means = np.bincount(label, weights=y) / sizes
    grand = y.mean()
    ssb = float(np.sum(sizes * (means - grand) ** 2))
    ssw = float(np.sum((y - means[label]) ** 2))
    df_b, df_w = k - 1, n_total - k
    msb, msw = ssb / df_b, ssw / df_w
    if msw <= 0.0:
        raise NotEstimated("not estimated: no variation between seeds of any configuration")
    balanced = bool(np.all(sizes == sizes[0]))
    n0 = (n_total - np.sum(sizes**2) / n_total) / df_b
    between = max(0.0, (msb - msw) / n0)
    icc = between / (between + msw)
    alpha = 1.0 - level
    f = msb / msw
    f_l = f / stats.f.ppf(1.0 - alpha / 2.0, df_b, df_w)
    f_u = f / stats.f.ppf(alpha / 2.0, df_b, df_w)
    icc_lo = float(np.clip((f_l - 1.0) / (f_l + n0 - 1.0), 0.0, 1.0))
    icc_hi = float(np.clip((f_u - 1.0) / (f_u + n0 - 1.0), 0.0, 1.0))
    within_lo = ssw / stats.chi2.ppf(1.0 - alpha / 2.0, df_w)
    within_hi = ssw / stats.chi2.ppf(alpha / 2.0, df_w)
    return VarianceComponents(
        between=float(between), within=float(msw), within_lo=float(within_lo), within_hi=float(within_hi),
        icc=float(icc), icc_lo=icc_lo, icc_hi=icc_hi,
        seed_share=float(1.0 - icc), seed_share_lo=1.0 - icc_hi, seed_share_hi=1.0 - icc_lo,
        n_groups=int(k), n_values=int(n_total), balanced=balanced,
    )
