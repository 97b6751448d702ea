"""Seed stability: how reliably one configuration, or one arm (a model, a variant, a grid point), learns.

Unit of analysis: a run (one configuration, one seed). Every run that ended counts:

- ``n_runs``, the denominator of every rate, is the runs that ``completed``, ``diverged`` or were
  ``stopped_early`` by ASHA. A stopped seed is censored, never dropped: it counts as not (yet)
  successful in the success rate and as censored at its last step in the time to target.
  ``failed`` runs (an exception, no outcome of the model) and ``running`` ones are counted in their
  own columns and left out of the denominator.
- Success and steps to target have one definition, :func:`analysis.tidy.reach_times`: a run
  reaches the target at the first of ``stop_after_evals`` consecutive periodic evaluations with
  ``error`` (at the task's full training difficulty) at most the target, as training's convergence
  stop counts; the target is the study's (:func:`analysis.tidy.study_target`: ``stop_at_error``, else
  the task's ``target_error``). ``success_rate`` = runs that reached it, over ``n_runs``, with the
  Wilson interval (:func:`analysis.stats.proportion_ci`): valid from one run on, never of zero width.
  A run that reached the target and was then stopped or diverged still reached it. ``divergence_rate``
  likewise.
- ``median_error``: the median final error of the completed runs with the exact distribution-free
  interval of a median (:func:`analysis.stats.median_ci`): the order statistics x_(j), x_(n-j+1) with the largest j
  whose binomial coverage 1 - 2 P(Bin(n, 1/2) <= j - 1) is at least the level. With fewer than 6
  runs no pair of order statistics reaches 95% (5 runs: 0.9375), so the median is given without
  an interval and ``median_error_why`` says "not estimated: 5 runs, needs at least 6".
- ``median_steps_to_target``: the Kaplan-Meier median of the step at which runs reached the target
  (the same definition), runs that never got there censored at their last step (budget, ASHA stop or
  divergence), with the Brookmeyer-Crowley interval (:func:`analysis.stats.median_time`); +inf when
  fewer than half are known to reach it.

Arms are compared pairwise (:func:`compare_arms`): success rates (Newcombe interval, Boschloo's
test), final errors (Mann-Whitney, Cliff's delta with its interval; a diverged run ranks worst, a
stopped one has no final error and is left out of this test only) and time to target (log-rank);
all p-values of one comparison table are one family, Holm-adjusted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import stats
from analysis.stats import median_ci
from analysis.tidy import final_rows, final_values, param_columns, reach_times, validate_tidy

LEVEL = 0.95
CONFIG_KEYS = ("model", "config_id")  # one configuration: the same model and hyperparameters, any seed
ENDED = ("completed", "diverged", "stopped_early")  # the runs every rate counts
STABILITY_STATISTICS = ("success_rate", "divergence_rate", "median_error", "median_steps_to_target")


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 order statistics of ``values`` (no interpolation: inf stays inf)."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha], method="inverted_cdf", axis=0)
    return float(lo), float(hi)


def _config_label(model: str, cid: str) -> str:
    return f"{model}:{cid[:6]}"


def run_outcomes(df: pd.DataFrame, target: float, metric: str = "error") -> pd.DataFrame:
    """One row per run: its final row plus ``final`` (final ``metric``), ``reached``, ``time``
    (:func:`analysis.tidy.reach_times` of the target, on ``error``) and ``success`` (= ``reached``: one
    definition for the rate, the time and the ranking)."""
    finals = final_rows(df)
    finals["final"] = finals["run_id"].map(final_values(df, metric)).to_numpy(dtype=float)
    reach = reach_times(df, target).set_index("run_id")
    finals["reached"] = finals["run_id"].map(reach["reached"]).astype(bool).to_numpy()
    finals["time"] = finals["run_id"].map(reach["time"]).to_numpy(dtype=float)
    finals["success"] = finals["reached"]
    return finals


def seed_stability(
    df: pd.DataFrame,
    target: float,
    metric: str = "error",
    by: Sequence[str] = CONFIG_KEYS,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Per configuration (or per ``by`` group, e.g. ``("model",)`` for arms): rates, final error, time to target.

    Columns (one row per group, sorted by it): the ``by`` keys; ``n_runs`` (completed + diverged +
    stopped early: the denominator), ``n_completed``, ``n_diverged``, ``n_stopped_early`` (censored),
    ``n_failed``, ``n_running`` (left out); ``n_success``, ``success_rate`` with ``_lo``/``_hi``;
    ``divergence_rate`` with its interval; ``n_final`` (completed runs with a finite final error),
    ``median_error`` with its interval and ``median_error_why``, ``iqr_error``; ``n_reached``,
    ``median_steps_to_target`` with its interval; ``label`` (model:short config id, for configurations)
    and the param columns. An interval that the run count cannot support is NaN and its ``*_why``
    says why (see the module docstring).
    """
    validate_tidy(df, [metric])
    runs_all = run_outcomes(df, target, metric)
    params = param_columns(df)
    rows = []
    for key, runs in runs_all.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        counts = runs["status"].value_counts()
        ended = runs[runs["status"].isin(ENDED)]
        row.update(n_runs=len(ended), **{f"n_{s}": int(counts.get(s, 0)) for s in (*ENDED, "failed", "running")})
        row.update(_statistics(ended, level))
        first = runs.iloc[0]
        if "model" in row and "config_id" in row:
            row["label"] = _config_label(str(row["model"]), str(row["config_id"]))
        if "config_id" in by:
            row.update({p: first[p] for p in params})
        rows.append(row)
    columns = [*by, "n_runs", *(f"n_{s}" for s in (*ENDED, "failed", "running")), "n_success",
               "success_rate", "success_rate_lo", "success_rate_hi",
               "divergence_rate", "divergence_rate_lo", "divergence_rate_hi",
               "n_final", "median_error", "median_error_lo", "median_error_hi", "median_error_why", "iqr_error",
               "n_reached", "median_steps_to_target", "median_steps_to_target_lo", "median_steps_to_target_hi"]
    if "model" in by and "config_id" in by:
        columns.append("label")
    if "config_id" in by:
        columns += params
    return pd.DataFrame(rows, columns=columns)


def _statistics(ended: pd.DataFrame, level: float) -> dict[str, object]:
    """The statistics of one group's ended runs (see :func:`seed_stability`)."""
    n = len(ended)
    completed = ended[ended["status"] == "completed"]
    final = completed["final"].to_numpy(dtype=float)
    final = final[np.isfinite(final)]
    k = int(ended["success"].sum())
    d = int((ended["status"] == "diverged").sum())
    out: dict[str, object] = {"n_success": k, "n_final": len(final), "n_reached": int(ended["reached"].sum())}
    if n:
        lo, hi = stats.proportion_ci(k, n, level)
        out.update(success_rate=k / n, success_rate_lo=lo, success_rate_hi=hi)
        lo, hi = stats.proportion_ci(d, n, level)
        out.update(divergence_rate=d / n, divergence_rate_lo=lo, divergence_rate_hi=hi)
        med, lo, hi = stats.median_time(ended["time"].to_numpy(dtype=float), ended["reached"].to_numpy(), level)
        out.update(median_steps_to_target=med, median_steps_to_target_lo=lo, median_steps_to_target_hi=hi)
    med, lo, hi, why = median_ci(final, level)
    out.update(median_error=med, median_error_lo=lo, median_error_hi=hi, median_error_why=why)
    out["iqr_error"] = float(np.subtract(*np.quantile(final, [0.75, 0.25]))) if len(final) else math.nan
    return out


# --- which configuration is best ------------------------------------------------------------------------


def rank_configurations(df: pd.DataFrame, target: float, metric: str = "error",
                        direction: str = "minimize") -> pd.DataFrame:
    """Configurations ranked per model, each judged on its replications where it has any.

    A search picks its best configuration by the very runs that make it look best (winner's curse),
    so the search run that selected a configuration never enters its replication statistics: a
    configuration with replication runs is judged on those alone (``source`` "replications"), and
    where a model has any replicated configuration only those compete for "best" (the others were
    not chosen for replication). Otherwise the completed search runs judge it (``source`` "search").
    Order within a model: median final ``metric`` (better first), then the success rate (higher),
    then the mean final ``metric``, then more runs: ties go to the better configuration, and only a
    full tie falls back to the config id (for a stable order).

    Columns: ``model``, ``config_id``, ``label``, ``source``, ``runs`` (completed runs judged),
    ``median``, ``mean``, ``n_runs`` (the configuration's ended runs from the same source: completed,
    diverged, stopped early), ``n_success`` (those that reached the target, :func:`analysis.tidy.reach_times`)
    and ``success_rate`` (``n_success / n_runs``), ``rank`` (0 = best of its model), ``run_ids``
    (the completed runs judged).
    """
    runs = run_outcomes(df, target, metric)
    ended = runs[runs["status"].isin(ENDED)]
    done = ended[(ended["status"] == "completed") & np.isfinite(ended["final"])]
    replicated = done[done["replication"].notna()]
    rows = []
    for model, group in done.groupby("model", sort=True):
        rep = replicated[replicated["model"] == model]
        source, pool = ("replications", rep) if len(rep) else ("search", group)
        same_source = ended["replication"].notna() if len(rep) else ended["replication"].isna()
        for cid, g in pool.groupby("config_id", sort=True):
            every = ended[same_source & (ended["model"] == model) & (ended["config_id"] == cid)]
            rows.append({"model": model, "config_id": cid, "label": _config_label(str(model), str(cid)),
                         "source": source, "runs": len(g), "median": float(g["final"].median()),
                         "mean": float(g["final"].mean()), "n_runs": len(every),
                         "n_success": int(every["success"].sum()), "success_rate": float(every["success"].mean()),
                         "run_ids": list(g["run_id"])})
    out = pd.DataFrame(rows, columns=["model", "config_id", "label", "source", "runs", "median", "mean",
                                      "n_runs", "n_success", "success_rate", "run_ids"])
    if out.empty:
        return out.assign(rank=pd.Series(dtype=int))
    sign = 1.0 if direction == "minimize" else -1.0
    out = out.assign(_m=sign * out["median"], _s=-out["success_rate"], _a=sign * out["mean"], _n=-out["runs"])
    out = out.sort_values(["model", "_m", "_s", "_a", "_n", "config_id"], kind="stable")
    out["rank"] = out.groupby("model").cumcount()
    return out.drop(columns=["_m", "_s", "_a", "_n"]).reset_index(drop=True)


# --- arms ------------------------------------------------------------------------------------------------


def compare_arms(
    df: pd.DataFrame, target: float, arm: str = "model", metric: str = "error", level: float = LEVEL
) -> pd.DataFrame:
    """Every pair of arms (values of column ``arm``) compared on three outcomes; one Holm family.

    One row per pair and ``outcome``:

    - ``success rate``: ``estimate`` = rate_a - rate_b, Newcombe interval, Boschloo's exact p;
      over every ended run (stopped ones count as not successful).
    - ``final error``: ``estimate`` = Cliff's delta P(a > b) - P(a < b) of the final errors (negative:
      arm a has lower errors), with its interval, Mann-Whitney p; completed runs, diverged ones
      as +inf (the worst outcome), stopped ones left out (no final error at a full budget).
    - ``steps to target``: ``estimate`` = median_a / median_b of the Kaplan-Meier medians (NaN when
      either is not reached), log-rank p; every ended run, censored where it did not reach the target.

    Columns: ``arm_a``, ``arm_b``, ``outcome``, ``n_a``, ``n_b``, ``estimate``, ``lo``, ``hi``, ``p``,
    ``p_holm`` (Holm over every row of the table), ``why`` (a comparison that could not be made).
    """
    validate_tidy(df, [metric])
    runs = run_outcomes(df, target, metric)
    runs = runs[runs["status"].isin(ENDED)]
    arms = sorted(runs[arm].dropna().unique(), key=str)
    rows = []
    for a, b in itertools.combinations(arms, 2):
        ra, rb = runs[runs[arm] == a], runs[runs[arm] == b]
        for outcome, make in (("success rate", _rates), ("final error", _values), ("steps to target", _times)):
            row = {"arm_a": a, "arm_b": b, "outcome": outcome, "why": None}
            try:
                row.update(make(ra, rb, level))
            except stats.NotEstimated as err:
                row.update(n_a=len(ra), n_b=len(rb), why=err.reason)
            rows.append(row)
    out = pd.DataFrame(rows, columns=["arm_a", "arm_b", "outcome", "n_a", "n_b", "estimate", "lo", "hi", "p",
                                      "p_holm", "why"])
    if len(out):
        out["p_holm"] = stats.holm(out["p"].to_numpy(dtype=float))
    return out


def _rates(ra: pd.DataFrame, rb: pd.DataFrame, level: float) -> dict[str, float]:
    r = stats.compare_rates(int(ra["success"].sum()), len(ra), int(rb["success"].sum()), len(rb), level)
    return {"n_a": len(ra), "n_b": len(rb), "estimate": r["diff"], "lo": r["lo"], "hi": r["hi"], "p": r["p"]}


def _final_errors(runs: pd.DataFrame) -> np.ndarray:
    done = runs[runs["status"].isin(("completed", "diverged"))]
    value = np.where(done["status"] == "diverged", np.inf, done["final"].to_numpy(dtype=float))
    return value[~np.isnan(value)]


def _values(ra: pd.DataFrame, rb: pd.DataFrame, level: float) -> dict[str, float]:
    xa, xb = _final_errors(ra), _final_errors(rb)
    if len(xa) == 0 or len(xb) == 0:
        raise stats.NotEstimated(f"not estimated: {len(xa)} and {len(xb)} runs with a final error, "
                                 "needs at least 1 each")
    r = stats.compare_values(xa, xb, level)
    return {"n_a": len(xa), "n_b": len(xb), "estimate": r["effect"], "lo": r["lo"], "hi": r["hi"], "p": r["p"]}


def _times(ra: pd.DataFrame, rb: pd.DataFrame, level: float) -> dict[str, float]:
    ta, ea = ra["time"].to_numpy(dtype=float), ra["reached"].to_numpy(dtype=bool)
    tb, eb = rb["time"].to_numpy(dtype=float), rb["reached"].to_numpy(dtype=bool)
    p = stats.logrank(ta, ea, tb, eb)
    ma, mb = stats.median_time(ta, ea, level)[0], stats.median_time(tb, eb, level)[0]
    ratio = ma / mb if math.isfinite(ma) and math.isfinite(mb) and mb > 0 else math.nan
    why = None if math.isfinite(ratio) else "ratio not estimated: a median time is not reached (log-rank p still valid)"
    return {"n_a": len(ra), "n_b": len(rb), "estimate": ratio, "lo": math.nan, "hi": math.nan, "p": p, "why": why}


def survival_curves(df: pd.DataFrame, target: float, arm: str = "model", metric: str = "error",
                    level: float = LEVEL) -> dict[str, stats.Survival]:
    """Kaplan-Meier curve (fraction of runs not yet at the target) with its band, per arm, over ended runs."""
    runs = run_outcomes(df, target, metric)
    runs = runs[runs["status"].isin(ENDED)]
    return {
        str(a): stats.kaplan_meier(g["time"].to_numpy(dtype=float), g["reached"].to_numpy(dtype=bool), level)
        for a, g in runs.groupby(arm, sort=True)
    }


# --- learning curves ------------------------------------------------------------------------------------


def learning_curves(
    df: pd.DataFrame,
    metric: str = "error",
    by: Sequence[str] = CONFIG_KEYS,
    band: tuple[float, float] = (0.25, 0.75),
    statuses: Sequence[str] = ("completed", "diverged"),
) -> pd.DataFrame:
    """Learning curves with seed bands: per configuration and step, the median and a quantile band over seeds.

    Columns: the ``by`` keys, ``label``, ``step``, ``n`` (runs evaluated at that step), ``median``,
    ``lo``, ``hi`` (the ``band`` quantiles). Runs that diverge drop out of later steps, so ``n``
    shrinks there and the band describes the survivors: plot ``n`` or read it beside the band.
    """
    validate_tidy(df, [metric])
    rows = df[df["status"].isin(statuses) & np.isfinite(df[metric].astype(float))]
    grouped = rows.groupby([*by, "step"], sort=True)[metric]
    out = pd.DataFrame(
        {"n": grouped.count(), "median": grouped.median(), "lo": grouped.quantile(band[0]),
         "hi": grouped.quantile(band[1])}
    ).reset_index()
    if "model" in by and "config_id" in by:
        labels = [_config_label(str(m), str(c)) for m, c in zip(out["model"], out["config_id"], strict=True)]
        out.insert(len(by), "label", labels)
    return out
