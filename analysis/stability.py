"""Seed stability: how reliably one configuration learns across training seeds.

Unit of analysis: a run (one configuration, one seed). Per configuration, the statistics use the
runs that had their full budget (:data:`analysis.tidy.FULL_BUDGET`: ``completed`` and ``diverged``);
stopped-early, failed and running runs are left out and counted in their own columns, since
their final error says nothing about what the configuration reaches.

Every statistic comes with a percentile-bootstrap 95% interval over seeds: the runs of a
configuration are resampled with replacement B = 2000 times (:data:`N_BOOTSTRAP`), every
statistic is computed on the same resamples, and the interval is the 2.5% and 97.5% order
statistics of the B values. B = 2000 keeps the Monte Carlo wobble of the endpoints well below
the sampling error at the seed counts studies use (Efron & Tibshirani ask for >= 1000 for
percentile intervals). Known limits, measured on synthetic normal noise: the interval of a
median covers at about the nominal rate from ~16 seeds; the interval of a mean undercovers at
small n (~0.90 at 10 seeds); a rate of 0 or 1 gives a zero-width interval: read it with n_seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.tidy import FULL_BUDGET, final_rows, param_columns, validate_tidy

N_BOOTSTRAP = 2000  # resamples per interval; see the module docstring
LEVEL = 0.95
CONFIG_KEYS = ("model", "config_id")  # one configuration: the same model and hyperparameters, any seed
STABILITY_STATISTICS = (
    "success_rate", "median_error", "iqr_error", "divergence_rate", "reached_rate", "median_steps_to_target",
)


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[..., np.ndarray],
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    rng: np.random.Generator | int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over the first axis of ``values``.

    values: [n] or [n, k]; statistic(samples, axis=1) maps [B, n, ...] -> [B, ...] (np.median, np.mean).
    Returns (nan, nan) for no values. Infinite values are allowed (the order statistics handle them).
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(rng)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)), dtype=np.int32)
    return _percentile_interval(statistic(values[idx], axis=1), level)


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    # "inverted_cdf" picks order statistics (no interpolation), so +inf (a censored median) stays +inf.
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha], method="inverted_cdf", axis=0)
    return float(lo), float(hi)


def steps_to_target(df: pd.DataFrame, target: float, metric: str = "error") -> pd.DataFrame:
    """Per run: the first evaluation step with ``metric <= target``.

    Returns one row per run_id with ``reached`` (bool), ``steps_to_target`` (NaN when not reached:
    the run is censored at its last step, ``last_step``, and is reported as not reached, never as
    its last step) and ``status``.
    """
    validate_tidy(df, [metric])
    hit = df[df[metric] <= target]
    first = hit.groupby("run_id", sort=False)["step"].min()
    last = final_rows(df).set_index("run_id")
    out = pd.DataFrame(
        {"run_id": last.index, "status": last["status"].to_numpy(), "last_step": last["step"].to_numpy()}
    )
    out["steps_to_target"] = out["run_id"].map(first).astype(float)
    out["reached"] = out["steps_to_target"].notna()
    return out[["run_id", "status", "reached", "steps_to_target", "last_step"]]


def _config_label(model: str, cid: str) -> str:
    return f"{model}:{cid[:6]}"


def seed_stability(
    df: pd.DataFrame,
    target: float,
    metric: str = "error",
    by: Sequence[str] = CONFIG_KEYS,
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Per configuration over seeds: success, final error, divergence, steps to target, with intervals.

    Columns (one row per ``by`` group, sorted by it; ``*_lo``/``*_hi`` are the bootstrap interval):
    ``n_seeds`` (full-budget runs), ``n_stopped_early``, ``n_failed``, ``n_running`` (left out);
    ``success_rate`` (completed with final ``metric <= target``); ``median_error`` and ``iqr_error``
    of the final metric of the completed runs (a diverged run has no final model: it counts in the
    rates, not here); ``divergence_rate``; ``reached_rate`` and ``median_steps_to_target`` (first
    step with ``metric <= target``; a run that never got there counts as +inf, so the median is
    +inf when fewer than half reached it); ``label`` (model:short config id) and the param columns.
    ``seed`` seeds the bootstrap: the same frame and seed give the same intervals.
    """
    validate_tidy(df, [metric])
    finals = final_rows(df)
    stt = steps_to_target(df, target, metric).set_index("run_id")
    finals["steps_to_target"] = finals["run_id"].map(stt["steps_to_target"]).fillna(np.inf).to_numpy()
    params = param_columns(df)
    rng = np.random.default_rng(seed)
    rows = []
    for key, runs in finals.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        counts = runs["status"].value_counts()
        full = runs[runs["status"].isin(FULL_BUDGET)]
        row.update(
            n_seeds=len(full),
            n_stopped_early=int(counts.get("stopped_early", 0)),
            n_failed=int(counts.get("failed", 0)),
            n_running=int(counts.get("running", 0)),
        )
        row.update(_stability_statistics(full, metric, target, n_boot, level, rng))
        first = runs.iloc[0]
        if "model" in row and "config_id" in row:
            row["label"] = _config_label(str(row["model"]), str(row["config_id"]))
        row.update({p: first[p] for p in params})
        rows.append(row)
    columns = [*by, "n_seeds", "n_stopped_early", "n_failed", "n_running",
               *(k for name in STABILITY_STATISTICS for k in (name, name + "_lo", name + "_hi"))]
    if "model" in by and "config_id" in by:
        columns.append("label")
    return pd.DataFrame(rows, columns=[*columns, *params])


def _stability_statistics(
    full: pd.DataFrame, metric: str, target: float, n_boot: int, level: float, rng: np.random.Generator
) -> dict[str, float]:
    """Point values and joint-bootstrap intervals for the full-budget runs of one configuration."""
    completed = (full["status"] == "completed").to_numpy()
    final = full[metric].to_numpy(dtype=float)
    # Per run, as arrays over the n runs; NaN marks "no final error" (diverged, or never measured).
    error = np.where(completed & np.isfinite(final), final, np.nan)
    success = (completed & (final <= target)).astype(float)
    diverged = (full["status"] == "diverged").to_numpy(dtype=float)
    steps = full["steps_to_target"].to_numpy(dtype=float)

    def stats(err, suc, div, stp):
        """Each statistic over the runs (axis 1) of each row of [R, n] arrays -> [R]."""
        q25, q50, q75 = _nanquantile_rows(err, (0.25, 0.5, 0.75))
        return {
            "success_rate": suc.mean(axis=1),
            "median_error": q50,
            "iqr_error": q75 - q25,
            "divergence_rate": div.mean(axis=1),
            "reached_rate": np.isfinite(stp).mean(axis=1),
            "median_steps_to_target": np.median(stp, axis=1),
        }

    n = len(full)
    if n == 0:
        return {k: np.nan for name in STABILITY_STATISTICS for k in (name, name + "_lo", name + "_hi")}
    point = stats(error[None], success[None], diverged[None], steps[None])
    idx = rng.integers(0, n, size=(n_boot, n), dtype=np.int32)
    boot = stats(error[idx], success[idx], diverged[idx], steps[idx])
    out: dict[str, float] = {}
    for name, value in point.items():
        # A resample with no completed run has no median error: the interval is taken over the others.
        b = boot[name][~np.isnan(boot[name])]
        lo, hi = _percentile_interval(b, level) if len(b) else (np.nan, np.nan)
        out.update({name: float(value[0]), name + "_lo": lo, name + "_hi": hi})
    return out


def _nanquantile_rows(x: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Linear-interpolation quantiles of each row of x [R, n], ignoring NaN -> [len(qs), R]; NaN for an all-NaN row.

    np.nanquantile does the same through a Python loop over rows (apply_along_axis): ~100x slower here.
    """
    s = np.sort(x, axis=1)  # NaN sorts last
    k = (~np.isnan(x)).sum(axis=1)  # [R] values per row
    pos = np.asarray(qs, dtype=float)[:, None] * np.maximum(k - 1, 0)  # [Q, R] fractional index
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(k - 1, 0))
    v_lo = np.take_along_axis(s, lo.T, axis=1).T
    v_hi = np.take_along_axis(s, hi.T, axis=1).T
    out = v_lo + (v_hi - v_lo) * (pos - lo)
    out[:, k == 0] = np.nan
    return out


def learning_curves(
    df: pd.DataFrame,
    metric: str = "error",
    by: Sequence[str] = CONFIG_KEYS,
    band: tuple[float, float] = (0.25, 0.75),
    statuses: Sequence[str] = FULL_BUDGET,
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


@dataclass(frozen=True)
class SearchVariance:
    """Spread of the best-found error across repeated studies beside the seed spread within a config.

    ``best_per_study``: one row per study (``study``, ``best``, ``run_id``, ``config_id``, ``n_trials``).
    ``between_study_sd``: sd of ``best`` across studies; ``within_config_sd``: pooled sd over seeds
    within configurations replicated over seeds (>= 2 completed runs); ``ratio`` = between / within.
    ``*_ci``: percentile-bootstrap intervals (studies resampled for the first, configurations for
    the second). A ratio near 1 or below says the studies disagree no more than reseeding one
    configuration does: the search's choice among its best configs is within seed noise.
    """

    best_per_study: pd.DataFrame
    n_studies: int
    between_study_sd: float
    between_study_sd_ci: tuple[float, float]
    n_configs_replicated: int
    within_config_sd: float
    within_config_sd_ci: tuple[float, float]
    ratio: float


def search_vs_seed_variance(
    df: pd.DataFrame,
    metric: str = "error",
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> SearchVariance:
    """Trial-to-trial (seed) variance vs study-to-study variance of the same study under several search seeds.

    Uses completed runs only (the best-found value of a study is a full-budget one). The studies are
    the distinct ``study`` values of the search runs (``replication`` None); the seed spread comes
    from every configuration in ``df`` with at least two completed runs (replications from
    ``mannstudy replicate``, or repeats inside the searches).
    """
    validate_tidy(df, [metric])
    finals = final_rows(df)
    done = finals[(finals["status"] == "completed") & np.isfinite(finals[metric].astype(float))]
    rng = np.random.default_rng(seed)

    search = done[done["replication"].isna()]
    best_rows = search.loc[search.groupby("study", sort=True)[metric].idxmin()]
    best = best_rows[["study", metric, "run_id", "config_id"]].rename(columns={metric: "best"}).reset_index(drop=True)
    best["n_trials"] = best["study"].map(search.groupby("study").size()).to_numpy()
    b = best["best"].to_numpy(dtype=float)
    between = float(np.std(b, ddof=1)) if len(b) >= 2 else np.nan
    between_ci = bootstrap_ci(b, _sd, n_boot, level, rng) if len(b) >= 2 else (np.nan, np.nan)

    # Pooled within-config variance: sum_i SS_i / sum_i (n_i - 1) over replicated configs i.
    groups = done.groupby(list(CONFIG_KEYS))[metric]
    n_i = groups.count().to_numpy(dtype=float)
    ss_i = groups.agg(lambda s: float(((s - s.mean()) ** 2).sum())).to_numpy(dtype=float)
    keep = n_i >= 2
    n_i, ss_i = n_i[keep], ss_i[keep]
    if len(n_i):
        within = float(np.sqrt(ss_i.sum() / (n_i - 1).sum()))
        # Cluster bootstrap over configurations: counts[b, i] = how often config i is drawn in resample b.
        counts = rng.multinomial(len(n_i), np.full(len(n_i), 1.0 / len(n_i)), size=n_boot)
        boot = np.sqrt((counts @ ss_i) / (counts @ (n_i - 1)))
        within_ci = _percentile_interval(boot, level)
    else:
        within, within_ci = np.nan, (np.nan, np.nan)
    ratio = between / within if within and np.isfinite(within) and within > 0 else np.nan
    return SearchVariance(best, len(b), between, between_ci, int(len(n_i)), within, within_ci, float(ratio))


def _sd(x: np.ndarray, axis: int) -> np.ndarray:
    return np.std(x, axis=axis, ddof=1)
