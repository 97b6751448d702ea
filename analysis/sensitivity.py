"""Hyperparameter sensitivity: which hyperparameters matter, measured on full-budget trials only.

Ray's OptunaSearch tells Optuna that an ASHA-stopped trial is COMPLETE with its one-rung score, so
Optuna's own study mixes partial and full-budget scores. Here the study is rebuilt in memory
from the tidy frame with only the runs whose status is ``completed`` (and a finite objective);
stopped-early, diverged, failed and running runs are excluded and counted
(:class:`TrialSelection`, :func:`status_table`). Each run is one trial, so replicated seeds of
one configuration are several trials at the same point.

On that study, Optuna's evaluators: fANOVA (Hutter et al. 2014; a random forest's functional
ANOVA, seeded) and PED-ANOVA (Watanabe et al. 2023; which parameter values the top
``target_quantile`` of trials prefer). Beside them, a rank correlation per parameter:
Spearman's rho for numeric parameters; for categorical ones (and bools) the correlation ratio
eta of the objective's ranks on the category, sqrt(between-category sum of squares of ranks /
total), which has no sign and equals |rho| for two categories. The seed-noise share
(:func:`seed_noise`) says how much of the objective's variance reseeding alone produces: an
importance below it is indistinguishable from noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

from analysis.stability import CONFIG_KEYS, LEVEL, N_BOOTSTRAP, _percentile_interval
from analysis.tidy import PARAM_PREFIX, STATUSES, final_rows, param_columns, param_name, validate_tidy

EVALUATORS = ("fanova", "ped_anova")
LOG_SPAN = 100.0  # inferred log scale when all values are positive and max/min spans >= two decades
MODEL_PARAM = "model"  # analysed as a categorical hyperparameter when the trials span several models


class SensitivityError(ValueError):
    """Bad input to the sensitivity analysis; the message is one line naming the parameter."""


# --- which trials ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSelection:
    """The trials an importance analysis used, and what it left out.

    used: final rows of the runs used (status ``completed``, finite objective), one per run.
    excluded: {reason: number of runs}; a reason is a status, or ``completed, non-finite <metric>``.
    """

    used: pd.DataFrame
    excluded: dict[str, int]

    @property
    def n_used(self) -> int:
        return len(self.used)

    @property
    def run_ids(self) -> list[str]:
        return list(self.used["run_id"])


def select_trials(df: pd.DataFrame, metric: str = "error") -> TrialSelection:
    """Full-budget trials for importance: completed runs with a finite final ``metric``; the rest counted."""
    validate_tidy(df, [metric])
    finals = final_rows(df)
    finite = np.isfinite(finals[metric].to_numpy(dtype=float))
    completed = (finals["status"] == "completed").to_numpy()
    excluded = {s: int(n) for s, n in finals.loc[~completed, "status"].value_counts().items() if n}
    if (completed & ~finite).any():
        excluded[f"completed, non-finite {metric}"] = int((completed & ~finite).sum())
    return TrialSelection(finals[completed & finite].reset_index(drop=True), excluded)


def status_table(df: pd.DataFrame, metric: str = "error") -> pd.DataFrame:
    """Runs per status (every status listed, zeros included) and how many of them importance used.

    Columns: ``status``, ``n_runs``, ``n_used``.
    """
    selection = select_trials(df, metric)
    counts = final_rows(df)["status"].value_counts()
    used = selection.used["status"].value_counts()
    return pd.DataFrame(
        {
            "status": list(STATUSES),
            "n_runs": [int(counts.get(s, 0)) for s in STATUSES],
            "n_used": [int(used.get(s, 0)) for s in STATUSES],
        }
    )


# --- search space and the in-memory Optuna study ------------------------------------------------------


def _python(value):
    """numpy scalars -> Python scalars (Optuna's categorical choices must be None/bool/int/float/str)."""
    return value.item() if isinstance(value, np.generic) else value


def _present(values: pd.Series) -> pd.Series:
    return values[values.notna()]


def infer_distributions(
    used: pd.DataFrame,
    known: Mapping[str, BaseDistribution] | None = None,
    include_model: bool = True,
) -> dict[str, BaseDistribution]:
    """The search-space distribution of each hyperparameter, keyed by dotted name (``model.memory_size``).

    ``known`` (the study's search space, when the caller has it) wins. Otherwise inferred from the
    values: an integer column -> IntDistribution, a float column -> FloatDistribution, anything
    else (str, bool) -> CategoricalDistribution of the values seen; numeric bounds are the observed
    min and max, and log scale when all values are positive and span >= LOG_SPAN (max/min).
    ``model`` joins as a categorical parameter when the trials span several models.
    """
    known = {param_name(k): v for k, v in (known or {}).items()}
    out: dict[str, BaseDistribution] = {}
    columns = [*param_columns(used)]
    if include_model and used["model"].nunique() > 1:
        columns.append("model")
    for column in columns:
        name = param_name(column)
        values = _present(used[column])
        if name in known:
            out[name] = known[name]
            continue
        if values.empty:
            continue
        kind = values.dtype.kind if column != "model" else "O"
        if kind in "iu":
            low, high = int(values.min()), int(values.max())
            out[name] = IntDistribution(low, high, log=low >= 1 and high / low >= LOG_SPAN)
        elif kind == "f":
            low, high = float(values.min()), float(values.max())
            out[name] = FloatDistribution(low, high, log=low > 0 and high / low >= LOG_SPAN)
        else:
            choices = sorted({_python(v) for v in values}, key=lambda v: (type(v).__name__, v))
            out[name] = CategoricalDistribution(choices)
    return out


def _column(name: str) -> str:
    return name if name == MODEL_PARAM else PARAM_PREFIX + name


def _trial_params(row: pd.Series, distributions: Mapping[str, BaseDistribution]) -> dict[str, object]:
    """The typed params of one run under ``distributions`` (absent conditional params left out)."""
    params = {}
    for name, dist in distributions.items():
        value = row.get(_column(name))
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            continue
        value = _python(value)
        if isinstance(dist, CategoricalDistribution):
            ok = value in dist.choices
        else:
            value = int(value) if isinstance(dist, IntDistribution) else float(value)
            ok = dist.low <= value <= dist.high
        if not ok:
            raise SensitivityError(
                f"{_column(name)}: run {row['run_id']} has {value!r}, outside the search space {dist}"
            )
        params[name] = value
    return params


def build_study(
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    direction: str = "minimize",
) -> optuna.Study:
    """An in-memory Optuna study with one COMPLETE trial per used run (value: the final ``metric``).

    Each trial carries ``run_id``, ``config_id`` and ``seed`` as user attributes.
    """
    trials = [
        optuna.trial.create_trial(
            value=float(row[metric]),
            params=(params := _trial_params(row, distributions)),
            distributions={k: distributions[k] for k in params},
            user_attrs={"run_id": str(row["run_id"]), "config_id": str(row["config_id"]), "seed": int(row["seed"])},
        )
        for _, row in used.iterrows()
    ]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created in memory" line per analysis
    try:
        study = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    return study


# --- importances ---------------------------------------------------------------------------------


def rank_correlation(x: pd.Series, y: pd.Series, categorical: bool) -> float:
    """Spearman's rho of (x, y); for a categorical x, the correlation ratio eta of y's ranks on x.

    Rows where x is absent are dropped; NaN when fewer than 3 rows or no variation.
    """
    keep = x.notna().to_numpy() & y.notna().to_numpy()
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    ry = y.rank().to_numpy(dtype=float)  # average ranks for ties
    if categorical:
        dev = ry - ry.mean()
        total = float(dev @ dev)
        group_means = pd.Series(ry).groupby(x.astype(str).to_numpy()).transform("mean").to_numpy()
        between = float(((group_means - ry.mean()) ** 2).sum())
        return math.sqrt(between / total) if total > 0 else float("nan")
    rx = x.astype(float).rank().to_numpy(dtype=float)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def importance_table(
    study: optuna.Study,
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    evaluators: Sequence[str] = EVALUATORS,
    seed: int = 0,
    ped_anova_quantile: float = 0.1,
) -> pd.DataFrame:
    """Importance of each hyperparameter under each evaluator, beside its rank correlation.

    Index: dotted parameter name. Columns: ``kind`` (float/int/categorical), ``log``, ``n`` (trials
    with the parameter), one column per evaluator (normalized to sum to 1 over the parameters it
    rates; NaN where it cannot rate one, e.g. fANOVA and a conditional parameter), ``rank_corr`` and
    ``abs_rank_corr``. Sorted by the first evaluator (or abs_rank_corr), descending. Evaluator
    columns are NaN with fewer than 2 trials.
    """
    made = {
        "fanova": lambda: FanovaImportanceEvaluator(seed=seed),
        # Optuna advises >= 5 trials above target_quantile: ~50 trials at the default 0.1.
        "ped_anova": lambda: PedAnovaImportanceEvaluator(target_quantile=ped_anova_quantile),
    }
    unknown = [e for e in evaluators if e not in made]
    if unknown:
        raise SensitivityError(f"evaluators: expected some of {', '.join(made)}, got {', '.join(unknown)}")
    table = pd.DataFrame(index=pd.Index(list(distributions), name="param"))
    table["kind"] = [_kind(d) for d in distributions.values()]
    table["log"] = [bool(getattr(d, "log", False)) for d in distributions.values()]
    table["n"] = [int(used[_column(p)].notna().sum()) for p in distributions]
    enough = len(study.trials) >= 2 and len(distributions) > 0
    for name in evaluators:
        scores = get_param_importances(study, evaluator=made[name]()) if enough else {}
        table[name] = [float(scores[p]) if p in scores else np.nan for p in distributions]
    table["rank_corr"] = [
        rank_correlation(used[_column(p)], used[metric], _kind(d) == "categorical") for p, d in distributions.items()
    ]
    table["abs_rank_corr"] = table["rank_corr"].abs()
    by = evaluators[0] if evaluators else "abs_rank_corr"
    return table.sort_values(by, ascending=False, na_position="last", kind="stable")


def _kind(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "categorical"
    return "int" if isinstance(dist, IntDistribution) else "float"


# --- seed noise ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedNoise:
    """How much of the objective's variance the seeds alone explain.

    share = within-config variance / total variance: the pooled variance over seeds of the
    configurations replicated over >= 2 seeds (sum_i SS_i / sum_i (n_i - 1)), over the variance
    of the objective across all used trials. It can exceed 1 when the replicated configs are
    noisier than the study as a whole. ``ci``: percentile bootstrap, resampling replicated configs
    (whole, with their seeds) and, independently, the trials of the total.
    NaN when no configuration was replicated.
    """

    share: float
    ci: tuple[float, float]
    within_var: float
    total_var: float
    n_configs: int  # replicated configurations
    n_runs: int  # runs of those configurations


def seed_noise(
    used: pd.DataFrame,
    metric: str = "error",
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> SeedNoise:
    """Seed-noise share of the objective's variance, from configurations replicated over seeds (see SeedNoise)."""
    y = used[metric].to_numpy(dtype=float)
    groups = used.groupby(list(CONFIG_KEYS))[metric]
    n_i = groups.count().to_numpy(dtype=float)
    ss_i = groups.agg(lambda s: float(((s - s.mean()) ** 2).sum())).to_numpy(dtype=float)
    n_i, ss_i = n_i[n_i >= 2], ss_i[n_i >= 2]
    if len(n_i) == 0 or len(y) < 3:
        return SeedNoise(np.nan, (np.nan, np.nan), np.nan, np.nan, 0, 0)
    within = ss_i.sum() / (n_i - 1).sum()
    total = float(np.var(y, ddof=1))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(n_i), np.full(len(n_i), 1.0 / len(n_i)), size=n_boot)  # [B, configs]
    boot_within = (counts @ ss_i) / (counts @ (n_i - 1))
    boot_total = np.var(y[rng.integers(0, len(y), size=(n_boot, len(y)))], axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = boot_within / boot_total
    ci = _percentile_interval(boot[np.isfinite(boot)], level)
    share = within / total if total > 0 else np.nan
    return SeedNoise(float(share), ci, float(within), total, int(len(n_i)), int(n_i.sum()))


# --- marginals, interaction, boundary ------------------------------------------------------------


def _positions(values: np.ndarray, dist: BaseDistribution) -> np.ndarray:
    """Numeric values -> their position in [0, 1] across the distribution's range (log space when log)."""
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        values, low, high = np.log(values), math.log(low), math.log(high)
    return (values - low) / (high - low) if high > low else np.full(len(values), 0.5)


def _bins(values: pd.Series, dist: BaseDistribution, n_bins: int) -> tuple[pd.Series, list[str], list[float]]:
    """Bin a parameter's values: per value for categorical or few distinct values, else n_bins equal
    bins of the (log) range. Returns (bin index per value, labels, numeric centre per bin or NaN)."""
    present = values.dropna()
    distinct = sorted(present.unique(), key=lambda v: (type(v).__name__, v))
    if isinstance(dist, CategoricalDistribution) or len(distinct) <= n_bins:
        order = {v: i for i, v in enumerate(distinct)}
        index = values.map(lambda v: order.get(v, np.nan))
        centres = [float(v) if isinstance(v, int | float | np.number) and not isinstance(v, bool) else np.nan
                   for v in distinct]
        return index, [_label(v) for v in distinct], centres
    u = _positions(values.to_numpy(dtype=float), dist)
    index = pd.Series(np.clip(np.floor(u * n_bins), 0, n_bins - 1), index=values.index)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centre_u = (edges[:-1] + edges[1:]) / 2
    low, high = float(dist.low), float(dist.high)
    centres = (np.exp(np.log(low) + centre_u * (np.log(high) - np.log(low))) if dist.log
               else low + centre_u * (high - low))
    return index, [_label(c) for c in centres], [float(c) for c in centres]


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float | np.floating) else str(value)


@dataclass(frozen=True)
class Marginal:
    """One hyperparameter against the objective.

    points: every used trial (``value``, ``objective``, ``bin`` (row of summary), ``config_id``, ``seed``);
    summary: per bin (per value for categorical / few distinct values): ``label``, ``centre``
    (NaN for categorical), ``n``, ``median``, ``q25``, ``q75`` of the objective.
    """

    param: str
    kind: str
    log: bool
    points: pd.DataFrame
    summary: pd.DataFrame


def marginals(
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    params: Sequence[str] | None = None,
    n_bins: int = 8,
) -> list[Marginal]:
    """Marginal data per hyperparameter (in ``params`` order; default: every one in ``distributions``)."""
    out = []
    for name in params if params is not None else list(distributions):
        dist, column = distributions[name], _column(name)
        rows = used[used[column].notna()]
        points = pd.DataFrame(
            {"value": rows[column].to_numpy(), "objective": rows[metric].to_numpy(dtype=float),
             "config_id": rows["config_id"].to_numpy(), "seed": rows["seed"].to_numpy()}
        )
        index, labels, centres = _bins(rows[column], dist, n_bins)
        points.insert(2, "bin", index.to_numpy(dtype=int))
        grouped = points.groupby("bin")["objective"]
        summary = pd.DataFrame(
            {"n": grouped.count(), "median": grouped.median(), "q25": grouped.quantile(0.25),
             "q75": grouped.quantile(0.75)}
        )
        summary = summary.reindex(range(len(labels)))  # every bin, so "bin" indexes summary rows
        summary["n"] = summary["n"].fillna(0).astype(int)
        summary.insert(0, "centre", centres)
        summary.insert(0, "label", labels)
        out.append(Marginal(name, _kind(dist), bool(getattr(dist, "log", False)), points, summary))
    return out


@dataclass(frozen=True)
class Interaction:
    """Median objective over a grid of two hyperparameters (rows: params[0] bins, columns: params[1] bins)."""

    params: tuple[str, str]
    median: pd.DataFrame
    count: pd.DataFrame


def interaction(
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    params: tuple[str, str],
    metric: str = "error",
    n_bins: int = 5,
) -> Interaction:
    """The interaction table of two hyperparameters, for a heatmap: bins of each, median objective per cell."""
    a, b = params
    rows = used[used[_column(a)].notna() & used[_column(b)].notna()]
    ia, la, _ = _bins(rows[_column(a)], distributions[a], n_bins)
    ib, lb, _ = _bins(rows[_column(b)], distributions[b], n_bins)
    cells = pd.DataFrame({"a": ia.to_numpy(), "b": ib.to_numpy(), "y": rows[metric].to_numpy(dtype=float)})
    grid = cells.groupby(["a", "b"])["y"].agg(["median", "count"])
    full = pd.MultiIndex.from_product([range(len(la)), range(len(lb))], names=["a", "b"])
    grid = grid.reindex(full)
    median = grid["median"].unstack("b")
    count = grid["count"].fillna(0).astype(int).unstack("b")
    for table in (median, count):
        table.index, table.columns = pd.Index(la, name=a), pd.Index(lb, name=b)
    return Interaction((a, b), median, count)


def boundary_check(
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    direction: str = "minimize",
    known: Sequence[str] = (),
    top_fraction: float = 0.1,
    margin: float = 0.1,
) -> pd.DataFrame:
    """Do the best trials sit on a boundary of the search space? One row per numeric hyperparameter.

    Positions run from 0 (low bound) to 1 (high bound) across the range (of log values for a log
    parameter). The top trials are the best ``top_fraction`` of the used trials (at least 3); a
    parameter is flagged ``at_boundary`` = "low"/"high" when their median position lies within
    ``margin`` of that bound: most of the best trials crowd against it, so the search space
    probably cut off the optimum (widen it). A parameter that does not matter has its top trials
    spread over the range and is not flagged. ``bounds`` says whether the range is the search
    space (names in ``known``) or only the range the trials happened to sample.
    Columns: ``param``, ``low``, ``high``, ``log``, ``bounds``, ``best_value``, ``best_position``
    (of the single best trial), ``n_top``, ``top_median_position``, ``at_boundary``.
    """
    order = used[metric].astype(float).sort_values(ascending=direction == "minimize", kind="stable").index
    n_top = min(len(order), max(3, math.ceil(top_fraction * len(order))))
    top = used.loc[order[:n_top]]
    rows = []
    for name, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            continue
        values = top[_column(name)].dropna().to_numpy(dtype=float)
        if len(values) == 0:
            continue
        u = _positions(values, dist)
        median = float(np.median(u))
        flag = "low" if median <= margin else "high" if median >= 1 - margin else ""
        if dist.single():
            flag = ""  # a fixed value is no boundary
        rows.append(
            dict(param=name, low=dist.low, high=dist.high, log=dist.log,
                 bounds="search space" if name in known else "observed", best_value=values[0],
                 best_position=float(u[0]), n_top=len(values), top_median_position=median, at_boundary=flag)
        )
    columns = ["param", "low", "high", "log", "bounds", "best_value", "best_position", "n_top",
               "top_median_position", "at_boundary"]
    return pd.DataFrame(rows, columns=columns)


# --- everything at once ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sensitivity:
    """The sensitivity analysis of one study (see :func:`hyperparameter_sensitivity`)."""

    metric: str
    direction: str
    selection: TrialSelection
    status: pd.DataFrame
    distributions: dict[str, BaseDistribution]
    importances: pd.DataFrame
    seed_noise: SeedNoise
    marginals: list[Marginal]
    interaction: Interaction | None
    boundary: pd.DataFrame
    study: optuna.Study | None = field(default=None, repr=False)


def hyperparameter_sensitivity(
    df: pd.DataFrame,
    metric: str = "error",
    direction: str = "minimize",
    distributions: Mapping[str, BaseDistribution] | None = None,
    evaluators: Sequence[str] = EVALUATORS,
    seed: int = 0,
    n_boot: int = N_BOOTSTRAP,
    ped_anova_quantile: float = 0.1,
) -> Sensitivity:
    """Sensitivity of the final ``metric`` to each hyperparameter, from the completed trials of ``df``.

    ``distributions``: the search space as Optuna distributions keyed by dotted name, when known
    (the rest is inferred, see :func:`infer_distributions`). ``seed`` seeds fANOVA's forest and the
    bootstrap. The interaction table is for the top pair under the first evaluator.
    """
    if direction not in ("minimize", "maximize"):
        raise SensitivityError(f"direction: expected 'minimize' or 'maximize', got {direction!r}")
    selection = select_trials(df, metric)
    used = selection.used
    dists = infer_distributions(used, distributions)
    study = build_study(used, dists, metric, direction)
    table = importance_table(study, used, dists, metric, evaluators, seed, ped_anova_quantile)
    ranking = table[evaluators[0] if evaluators else "abs_rank_corr"].dropna().index  # already sorted
    top_pair = (ranking[0], ranking[1]) if len(ranking) >= 2 and len(used) >= 2 else None
    return Sensitivity(
        metric=metric,
        direction=direction,
        selection=selection,
        status=status_table(df, metric),
        distributions=dists,
        importances=table,
        seed_noise=seed_noise(used, metric, n_boot, seed=seed),
        marginals=marginals(used, dists, metric, params=list(table.index)),
        interaction=interaction(used, dists, top_pair, metric) if top_pair else None,
        boundary=boundary_check(used, dists, metric, direction, known=[param_name(k) for k in distributions or {}]),
        study=study,
    )
