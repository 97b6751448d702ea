"""Paper comparison: a published claim set against the study's runs, with an interval and a verdict.

A replication study file carries a ``paper`` block (validated by ``study.spec``; here it is plain data)::

    paper:
      cite: Collier & Beel (2018), Implementing Neural Turing Machines, ICANN
      arms:                                   # named arms: column values that select each arm's runs
        constant: {model.memory_init: constant_trained}
        learned: {model.memory_init: learned}
      claims:
        - claim: constant initialisation converges about twice as fast as the next scheme
          reported: "Figure 2: ..."           # the paper's own figure, in words
          outcome: steps                      # steps | success | final_<metric>
          arm: constant
          against: [learned]                  # the claim holds against the best of these
          expected: 0.5                       # the paper's figure on our scale (optional)

Outcomes, the estimate each reports and the direction the claim asserts:

- ``steps``: steps to convergence, as :func:`analysis.tidy.reach_times` defines reaching the target (the
  first of ``stop_after_evals`` consecutive evaluations with ``error`` at or below the study's
  ``stop_at_error``, :func:`analysis.tidy.study_target`; where training stopped on it, its
  ``converged_step``). A run that never converged is censored at its last step, a run stopped early
  (ASHA, the time budget) too: it counts, never dropped.
  Estimate: ratio of Kaplan-Meier medians, arm / against, with a bootstrap interval
  (:func:`analysis.stats.median_ratio`); test: log-rank. Claimed: ratio < 1 (the arm is faster).
- ``success``: the fraction of runs that converged (the same definition), every ended run in the denominator.
  Estimate: difference arm - against, Newcombe's interval; test: Boschloo's exact test. Claimed: difference > 0.
- ``final_<metric>`` (e.g. ``final_gen4x_error``): the end-of-run value of a lower-is-better metric, over the
  runs that ended at their budget or converged (completed, or diverged: a stopped run was cut short).
  Estimate: Cliff's delta P(arm > against) - P(arm < against), its interval; test: Mann-Whitney.
  Claimed: delta < 0 (the arm's values are lower).

"The best of ``against``" is the competitor the claim is hardest on: the lowest median time (then the most
runs converged), the highest rate, the lowest median value.

Verdict of one claim, at the study's level (95%), with the p-values Holm-adjusted over the paper's claims:

- ``reproduced``: the difference is significant in the claimed direction and, when the paper gives a figure
  (``expected``), that figure lies inside our interval;
- ``partly reproduced``: significant in the claimed direction, but the paper's figure lies outside our
  interval (the direction holds, the size does not);
- ``inconclusive``: the estimate points the claimed way (or neither way) but is not significant at this n;
- ``not reproduced``: the estimate points the other way, or no difference in a claimed one;
- ``not estimated``: too few runs, or the estimate cannot be formed (said why).

The paper's verdict: ``reproduced`` when every claim is; ``partly reproduced`` when some claim is reproduced
or partly; otherwise ``not reproduced`` when some claim is not reproduced, ``not estimated`` when no claim could
be estimated, and ``inconclusive`` when the claims are inconclusive or not estimated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from analysis import stats
from analysis.tidy import final_rows, final_values, reach_times, study_target, validate_tidy

ALPHA = 0.05
ENDED = ("completed", "diverged", "stopped_early")  # runs that ended: failed and running ones did not


class Verdict(NamedTuple):
    """One claim set against the runs. ``estimate`` with ``lo``/``hi`` on the outcome's scale (see module doc)."""

    claim: str
    outcome: str
    arm: str
    against: str  # the competitor chosen (the best of the claim's ``against``)
    n_arm: int
    n_against: int
    estimate: float
    lo: float
    hi: float
    p: float
    p_holm: float
    expected: float | None
    verdict: str
    why: str  # what the verdict rests on, in one sentence


def arm_runs(df: pd.DataFrame, arms: Mapping[str, Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    """Each named arm's ended runs: one row per run (its final row), selected by the arm's column values, with
    ``time`` and ``reached`` (see :func:`convergence`; with no ``stop_at_error`` or ``target_error`` in the
    frame no run reached anything).

    ``arms``: {name: {column or param key: value}}; ``model`` is the model column, any other key a
    ``param.<key>`` column. A run matching two arms is an error in the study file's ``paper`` block.
    """
    validate_tidy(df)
    finals = final_rows(df)
    finals = finals[finals["status"].isin(ENDED)].reset_index(drop=True)
    target = study_target(df)
    reach = reach_times(df, -math.inf if target is None else target).set_index("run_id")
    finals["reached"] = finals["run_id"].map(reach["reached"]).astype(bool).to_numpy()
    finals["time"] = finals["run_id"].map(reach["time"]).to_numpy(dtype=float)
    out: dict[str, pd.DataFrame] = {}
    taken = pd.Series(False, index=finals.index)
    for name, selector in arms.items():
        keep = pd.Series(True, index=finals.index)
        for key, value in selector.items():
            column = key if key in ("model", "seed") else f"param.{key}"
            if column not in finals.columns:
                keep &= False
                continue
            keep &= finals[column].map(lambda v, want=value: _same(v, want)).astype(bool)
        if (keep & taken).any():
            raise ValueError(f"paper.arms.{name}: selects runs already in another arm")
        taken |= keep
        out[name] = finals[keep]
    return out


def _same(value: Any, want: Any) -> bool:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return want is None
    if isinstance(want, bool) or isinstance(value, bool | np.bool_):
        return bool(value) == bool(want) and isinstance(want, bool)
    if isinstance(want, int | float) and isinstance(value, int | float | np.number):
        return float(value) == float(want)
    return str(value) == str(want)


def convergence(runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(time, converged) of an arm's runs (from :func:`arm_runs`): the step it reached the study's target
    (:func:`analysis.tidy.reach_times`), else its last step (censored)."""
    return runs["time"].to_numpy(dtype=float), runs["reached"].to_numpy(dtype=bool)


def _steps(df, runs_a, runs_b, level) -> dict[str, float]:
    ta, ea = convergence(runs_a)
    tb, eb = convergence(runs_b)
    z, p = stats.logrank_test(ta, ea, tb, eb)
    try:
        r = stats.median_ratio(ta, ea, tb, eb, level)
        estimate, lo, hi, why = r.ratio, r.lo, r.hi, None
    except stats.NotEstimated as err:
        estimate, lo, hi, why = math.nan, math.nan, math.nan, err.reason
    # the claimed direction (arm faster): ratio < 1; where the ratio is not a number, the log-rank sign
    direction = (1.0 - estimate) if math.isfinite(estimate) else z
    return dict(estimate=estimate, lo=lo, hi=hi, p=p, direction=direction,
                estimate_why=why, n_a=len(ta), n_b=len(tb))


def _success(df, runs_a, runs_b, level) -> dict[str, float]:
    ea, eb = convergence(runs_a)[1], convergence(runs_b)[1]
    if len(ea) and len(eb) and not (ea.any() or eb.any()):
        raise stats.NotEstimated("not estimated: no run of either arm converged, nothing to compare")
    r = stats.compare_rates(int(ea.sum()), len(ea), int(eb.sum()), len(eb), level)
    return dict(estimate=r["diff"], lo=r["lo"], hi=r["hi"], p=r["p"], direction=r["diff"],
                estimate_why=None, n_a=len(ea), n_b=len(eb))


def _values(metric: str):
    def make(df, runs_a, runs_b, level) -> dict[str, float]:
        runs_a, runs_b = (r[r["status"] != "stopped_early"] for r in (runs_a, runs_b))
        ended = df[df["run_id"].isin(pd.concat([runs_a, runs_b])["run_id"])]
        if metric not in ended.columns:
            raise stats.NotEstimated(f"not estimated: no run logged {metric}")
        values = final_values(ended, metric)
        xa = runs_a["run_id"].map(values).to_numpy(dtype=float)
        xb = runs_b["run_id"].map(values).to_numpy(dtype=float)
        xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
        if len(xa) == 0 or len(xb) == 0:
            raise stats.NotEstimated(f"not estimated: {len(xa)} and {len(xb)} runs with {metric}, needs 1 each")
        r = stats.compare_values(xa, xb, level)
        return dict(estimate=r["effect"], lo=r["lo"], hi=r["hi"], p=r["p"], direction=-r["effect"],
                    estimate_why=None, n_a=len(xa), n_b=len(xb))
    return make


def outcome_test(outcome: str):
    """The comparison function of ``outcome`` (see the module docstring); ValueError for an unknown one."""
    if outcome == "steps":
        return _steps
    if outcome == "success":
        return _success
    if outcome.startswith("final_"):
        return _values(outcome)
    raise ValueError(f"outcome: expected steps, success or final_<metric>, got {outcome!r}")


def _strength(outcome: str, df: pd.DataFrame, runs: pd.DataFrame) -> tuple:
    """Sort key of a competitor: smaller is stronger (faster, more reliable, lower)."""
    if outcome == "steps":
        t, e = convergence(runs)
        median = stats.km_medians(t[None], e[None])[0] if len(t) else math.inf
        return (median, -(e.mean() if len(e) else 0.0))
    if outcome == "success":
        e = convergence(runs)[1]
        return (-(e.mean() if len(e) else 0.0),)
    runs = runs[runs["status"] != "stopped_early"]  # as the comparison: a stopped run was cut short
    values = final_values(df[df["run_id"].isin(runs["run_id"])], outcome) if len(runs) else pd.Series(dtype=float)
    return (float(np.nanmedian(values)) if len(values) and np.isfinite(values).any() else math.inf,)


def compare_claims(df: pd.DataFrame, paper: Mapping[str, Any], level: float = stats.LEVEL) -> list[Verdict]:
    """Every claim of ``paper`` (the study file's ``paper`` block) set against the runs in ``df``."""
    arms = arm_runs(df, paper.get("arms") or {})
    rows: list[dict[str, Any]] = []
    for claim in paper.get("claims") or ():
        outcome, arm = claim["outcome"], claim["arm"]
        test = outcome_test(outcome)
        against = min(claim["against"], key=lambda name: _strength(outcome, df, arms[name]))
        row = dict(claim=claim.get("claim", ""), outcome=outcome, arm=arm, against=against,
                   n_arm=len(arms[arm]), n_against=len(arms[against]), estimate=math.nan, lo=math.nan,
                   hi=math.nan, p=math.nan, expected=claim.get("expected"), result=None, why=None)
        try:
            row["result"] = test(df, arms[arm], arms[against], level)
        except stats.NotEstimated as err:
            row["why"] = err.reason
        if row["result"]:
            r = row["result"]
            row.update(n_arm=r["n_a"], n_against=r["n_b"], estimate=r["estimate"], lo=r["lo"], hi=r["hi"],
                       p=r["p"])
        rows.append(row)
    adjusted = stats.holm(np.array([r["p"] for r in rows], dtype=float)) if rows else np.array([])
    out = []
    for row, p_holm in zip(rows, adjusted, strict=True):
        verdict, why = _verdict(row, float(p_holm))
        out.append(Verdict(row["claim"], row["outcome"], row["arm"], row["against"], row["n_arm"],
                           row["n_against"], row["estimate"], row["lo"], row["hi"], row["p"], float(p_holm),
                           row["expected"], verdict, why))
    return out


def _verdict(row: Mapping[str, Any], p_holm: float) -> tuple[str, str]:
    r = row["result"]
    if r is None:
        return "not estimated", row["why"] or "not estimated"
    if math.isnan(r["p"]):
        return "not estimated", "no run of either arm converged: nothing to compare"
    if not math.isfinite(r["direction"]):
        return "not estimated", r["estimate_why"] or "the direction of the difference is not estimated"
    claimed = r["direction"] > 0
    significant = p_holm < ALPHA
    if r["direction"] == 0 and not significant:
        return "inconclusive", f"no difference either way at this n (Holm p = {p_holm:.3g})"
    if not claimed:
        return "not reproduced", (f"the estimate points against the claim (Holm p = {p_holm:.3g})" if significant
                                  else f"no difference in the claimed direction (Holm p = {p_holm:.3g})")
    if not significant:
        return "inconclusive", f"the claimed direction, not significant at this n (Holm p = {p_holm:.3g})"
    expected = row["expected"]
    lo, hi = r["lo"], r["hi"]
    if expected is None:
        return "reproduced", f"significant in the claimed direction (Holm p = {p_holm:.3g})"
    if not (math.isfinite(lo) or math.isfinite(hi)):
        return "partly reproduced", (f"significant in the claimed direction (Holm p = {p_holm:.3g}); the size "
                                     f"is not estimated ({r['estimate_why']}), so the paper's {expected:g} is "
                                     "not checked")
    if lo <= float(expected) <= hi:
        return "reproduced", (f"significant in the claimed direction (Holm p = {p_holm:.3g}) and the paper's "
                              f"{expected:g} is inside our interval")
    return "partly reproduced", (f"significant in the claimed direction (Holm p = {p_holm:.3g}), but the "
                                 f"paper's {expected:g} is outside our interval [{lo:.3g}, {hi:.3g}]")


def paper_verdict(verdicts: Sequence[Verdict]) -> str:
    """The paper's verdict from its claims' (see the module docstring)."""
    found = {v.verdict for v in verdicts}
    if found == {"reproduced"}:
        return "reproduced"
    if found & {"reproduced", "partly reproduced"}:
        return "partly reproduced"
    if "not reproduced" in found:
        return "not reproduced"
    if found <= {"not estimated"}:
        return "not estimated"
    return "inconclusive"


def survival_by_arm(df: pd.DataFrame, paper: Mapping[str, Any], level: float = stats.LEVEL
                    ) -> dict[str, stats.Survival]:
    """Kaplan-Meier curves of steps to convergence per named arm (arms with at least one run)."""
    out = {}
    for name, runs in arm_runs(df, paper.get("arms") or {}).items():
        if len(runs):
            t, e = convergence(runs)
            out[name] = stats.kaplan_meier(t, e, level)
    return out


def arm_summary(df: pd.DataFrame, paper: Mapping[str, Any], level: float = stats.LEVEL) -> pd.DataFrame:
    """Per named arm: runs, converged (with the rate's Wilson interval), Kaplan-Meier median steps to
    convergence (Brookmeyer-Crowley interval; inf = not reached within the budget)."""
    rows = []
    for name, runs in arm_runs(df, paper.get("arms") or {}).items():
        row = {"arm": name, "runs": len(runs), "converged": math.nan, "rate lo": math.nan, "rate hi": math.nan,
               "median steps": math.nan, "steps lo": math.nan, "steps hi": math.nan}
        if len(runs):
            t, e = convergence(runs)
            lo, hi = stats.proportion_ci(int(e.sum()), len(e), level)
            median, mlo, mhi = stats.median_time(t, e, level)
            row.update({"converged": int(e.sum()), "rate lo": lo, "rate hi": hi, "median steps": median,
                        "steps lo": mlo, "steps hi": mhi})
        rows.append(row)
    return pd.DataFrame(rows)
