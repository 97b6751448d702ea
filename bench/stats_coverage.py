"""Coverage, size and power of analysis/stats.py on simulated studies: the figures its docstrings and tests quote.

Every figure is a rate over simulated studies with known truth (fixed seeds), or an exact sum over
all binomial outcomes where one exists. tests/test_stats.py asserts these with fewer studies.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stats_coverage.py               # about a minute
    OMP_NUM_THREADS=1 .venv/bin/python bench/stats_coverage.py --studies 4000
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from analysis.stats import (  # noqa: E402
    NotEstimated,
    compare_rates,
    compare_values,
    holm,
    logrank,
    median_ratio,
    median_time,
    proportion_ci,
    variance_components,
)

Z = stats.norm.ppf(0.975)


def wilson_and_clopper_pearson() -> None:
    ps = np.linspace(0.05, 0.95, 91)
    for n in (5, 10, 20):
        k = np.arange(n + 1)
        pmf = stats.binom.pmf(k[:, None], n, ps[None])  # [n+1, P]
        wilson = np.array([proportion_ci(j, n) for j in k])
        cp_lo = np.where(k == 0, 0.0, stats.beta.ppf(0.025, k, n - k + 1))
        cp_hi = np.where(k == n, 1.0, stats.beta.ppf(0.975, k + 1, n - k))
        for name, lo, hi in (("Wilson", wilson[:, 0], wilson[:, 1]), ("Clopper-Pearson", cp_lo, cp_hi)):
            cov = (pmf * ((lo[:, None] <= ps) & (ps <= hi[:, None]))).sum(axis=0)
            print(f"proportion_ci {name:16s} n={n:2d}: coverage mean {cov.mean():.3f} over p=0.05..0.95, "
                  f"min {cov.min():.3f} at p={ps[cov.argmin()]:.2f}")


def rates(n: int = 10) -> None:
    table = [[compare_rates(a, n, b, n) for b in range(n + 1)] for a in range(n + 1)]
    p = np.array([[r["p"] for r in row] for row in table])
    lo = np.array([[r["lo"] for r in row] for row in table])
    hi = np.array([[r["hi"] for r in row] for row in table])
    fisher = np.array([[stats.fisher_exact([[a, b], [n - a, n - b]]).pvalue for b in range(n + 1)]
                       for a in range(n + 1)])
    for p1, p2 in ((0.5, 0.5), (0.2, 0.2), (0.1, 0.7), (0.2, 0.8)):
        w = stats.binom.pmf(np.arange(n + 1), n, p1)[:, None] * stats.binom.pmf(np.arange(n + 1), n, p2)[None]
        pbar = (p1 + p2) / 2
        normal = stats.norm.cdf((abs(p1 - p2) - Z * math.sqrt(2 * pbar * (1 - pbar) / n))
                                / math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n))
        theory = f", normal approximation {normal:.3f}" if p1 != p2 else ""
        print(f"compare_rates n={n}/arm p1={p1} p2={p2}: rejection {(w * (p <= 0.05)).sum():.3f} (exact sum; "
              f"Fisher's {(w * (fisher <= 0.05)).sum():.3f}{theory}), "
              f"Newcombe coverage {(w * ((lo <= p1 - p2) & (p1 - p2 <= hi))).sum():.3f}")


def lehmann_power(n: int, shift: float) -> float:
    theta = stats.norm.cdf(shift / math.sqrt(2))
    p2 = stats.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]]).cdf([shift / math.sqrt(2)] * 2)
    v1 = n * n * (theta * (1 - theta) + 2 * (n - 1) * (p2 - theta**2))
    return stats.norm.cdf((n * n * abs(theta - 0.5) - Z * math.sqrt(n * n * (2 * n + 1) / 12)) / math.sqrt(v1))


def values(studies: int) -> None:
    rng = np.random.default_rng(1)
    for n, shift in ((5, 0.0), (10, 0.0), (20, 0.0), (5, 2.0), (10, 1.3), (20, 0.9)):
        x, y = rng.normal(0, 1, (studies, n)), rng.normal(shift, 1, (studies, n))
        res = [compare_values(x[i], y[i]) for i in range(studies)]
        delta = 1 - 2 * stats.norm.cdf(shift / math.sqrt(2))
        reject = np.mean([r["p"] <= 0.05 for r in res])
        cover = np.mean([r["lo"] <= delta <= r["hi"] for r in res])
        theory = f", Lehmann's normal approximation {lehmann_power(n, shift):.3f}" if shift else ""
        print(f"compare_values n={n}/arm shift={shift}: rejection {reject:.3f}{theory}; "
              f"Cliff's delta coverage {cover:.3f}")
    for n in (5, 10):  # final errors: half the runs at exactly 0, the rest rounded to 0.1 (heavy ties)
        x, y = (np.where(rng.random((studies, n)) < 0.5, 0.0, np.round(rng.exponential(1.0, (studies, n)), 1))
                for _ in range(2))
        reject = np.mean([compare_values(x[i], y[i])["p"] <= 0.05 for i in range(studies)])
        print(f"compare_values n={n}/arm, half the values tied at 0, no difference: rejection {reject:.3f}")


def survival(studies: int) -> None:
    for n in (5, 10, 20):
        rng = np.random.default_rng(n)
        event, censor = rng.exponential(1.0, (studies, n)), rng.exponential(4.0, (studies, n))
        t, r = np.minimum(event, censor), event <= censor
        res = [median_time(t[i], r[i]) for i in range(studies)]
        cover = np.mean([lo <= math.log(2) <= hi for _, lo, hi in res])
        print(f"median_time n={n}: coverage {cover:.3f} (censored {1 - r.mean():.2f}), "
              f"upper limit inf in {np.mean([math.isinf(hi) for *_, hi in res]):.3f}")
    for n, hr in ((10, 1.0), (20, 1.0), (20, 3.0), (10, 4.0)):
        rng = np.random.default_rng(2)
        t1, t2 = rng.exponential(1.0, (studies, n)), rng.exponential(hr, (studies, n))
        ones = np.ones(n, bool)
        reject = np.mean([logrank(t1[i], ones, t2[i], ones) <= 0.05 for i in range(studies)])
        theory = ""
        if hr != 1:
            d = 2 * n
            theory = (f", Freedman {stats.norm.cdf(math.sqrt(d) * (hr - 1) / (hr + 1) - Z):.3f}, "
                      f"Schoenfeld {stats.norm.cdf(math.sqrt(d / 4) * math.log(hr) - Z):.3f}")
        print(f"logrank n={n}/arm hazard ratio {hr}: rejection {reject:.3f}{theory}")
    for n in (5, 10, 20):
        rng = np.random.default_rng(5)
        covered = estimated = 0
        s = max(100, studies // 4)
        for _ in range(s):
            e1, e2, c1, c2 = (rng.exponential(scale, n) for scale in (1.0, 2.0, 5.0, 10.0))
            try:
                r = median_ratio(np.minimum(e1, c1), e1 <= c1, np.minimum(e2, c2), e2 <= c2)
            except NotEstimated:  # a median not reached: the ratio is refused, not counted
                continue
            estimated += 1
            covered += r.lo <= 0.5 <= r.hi
        print(f"median_ratio n={n}/arm (true 0.5): coverage {covered / estimated:.3f} over the {estimated} "
              f"of {s} studies where both medians were reached")


def holm_fwer(studies: int) -> None:
    rng = np.random.default_rng(3)
    for m in (2, 5, 10):
        p = rng.uniform(size=(studies * 20, m))  # m independent true nulls
        fwer = np.mean([(holm(row) <= 0.05).any() for row in p])
        print(f"holm m={m} true nulls: family-wise error {fwer:.4f} over {studies * 20} families "
              f"theory 1 - (1 - 0.05/m)^m = {1 - (1 - 0.05 / m) ** m:.4f}; unadjusted {(p <= 0.05).any(1).mean():.3f}")


def seed_noise(studies: int) -> None:
    for k, n, icc in ((10, 5, 0.3), (5, 3, 0.5), (20, 4, 0.1), (10, None, 0.3), (8, None, 0.6)):
        rng = np.random.default_rng(4)
        covered, est = 0, []
        for _ in range(studies):
            sizes = np.full(k, n) if n else rng.integers(2, 9, k)
            g = np.repeat(np.arange(k), sizes)
            y = rng.normal(0, math.sqrt(icc), k)[g] + rng.normal(0, math.sqrt(1 - icc), len(g))
            v = variance_components(y, g)
            covered += v.icc_lo <= icc <= v.icc_hi
            est.append(v.icc)
        shape = f"{k} x {n}" if n else f"{k} x 2-8 (unbalanced)"
        print(f"variance_components {shape} ICC {icc}: coverage {covered / studies:.3f}, "
              f"mean estimate {np.mean(est):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000, help="simulated studies per figure")
    args = parser.parse_args()
    wilson_and_clopper_pearson()
    rates()
    values(args.studies)
    survival(args.studies)
    holm_fwer(args.studies)
    seed_noise(args.studies)


if __name__ == "__main__":
    main()
