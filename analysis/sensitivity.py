"""Hyperparameter sensitivity: which hyperparameters matter, on which trials, and how sure that is.

Two sets of trials, each analysed on its own and reported with its n:

- **full budget**: the runs whose status is ``completed`` with a finite final objective (the
  end-of-run evaluation ``final_<metric>`` where logged, see :func:`analysis.tidy.final_values`).
  Under ASHA these are the survivors, selected by outcome: about one trial in 9-27.
- **common rung**: every trial at the largest step that every used trial reached. The rung is the
  smallest last-evaluated step of the ``completed`` and ``stopped_early`` runs (ASHA stops a trial at a
  rung, so every stopped trial reached at least the first one); a ``diverged`` run is used with its
  value at the rung when it got there, and counted as left out when it diverged before. This set is
  not selected by outcome, at the price of a shorter horizon.

Ray's OptunaSearch tells Optuna that an ASHA-stopped trial is COMPLETE with its one-rung score, so
both sets are rebuilt here from the tidy frame, never from Optuna's values; every run left out is
counted with its reason (:class:`TrialSelection`, :func:`status_table`).

**Importance** (:func:`importance`) comes from a surrogate: a random forest of the objective on
the hyperparameters (numeric ones at their position in the search range, in log space where the
study file says ``log``; choices by their position in the study file's list; an absent conditional
parameter as its own value). For each of ``n_boot`` bootstrap resamples of the trials, a forest is
fitted on the resample and scored on the trials the resample left out (about 37%): its
**explained variance** R^2 = 1 - MSE / Var(objective), and per parameter the **permutation
importance**: half the increase of that MSE when the parameter's values are shuffled among the
left-out trials, over Var(objective) (half: shuffling an additive effect adds twice its variance).
Both are fractions of the objective's variance; the estimate is the
mean over resamples and the interval their percentile interval. Scoring on left-out trials makes a
parameter that does not matter score about 0 (positive or negative), so "above noise" means the
interval excludes 0; a driving parameter's importance approaches the surrogate's R^2. The
interval is wider than a pure sampling interval (it also carries the noise of scoring ~37% of n
trials), which errs on the side of "not shown to matter".

Optuna's fANOVA (Hutter et al. 2014) and PED-ANOVA (Watanabe et al. 2023) are given beside it, each
with its own 95% bootstrap interval: the trials are resampled with replacement ``n_refits`` times
(40, seeded), the evaluator refitted on each resample, and the interval is the percentile interval
of the refits' values (:func:`evaluator_bootstrap`). Their values are normalized to sum to 1 over
the parameters, i.e. shares of whatever the evaluator's model explains, and so are never set
against seed noise; an interval that excludes 0 says a parameter takes a share reliably, not that
it is above noise. fANOVA's forest has ``FANOVA_TREES`` trees of depth at most ``FANOVA_DEPTH``
(Optuna's default is 64 of depth 64, four times the cost for every refit): the refits, not the
forest, carry the uncertainty.

**Minimum trials.** Importance is not estimated below ``max(20, 10 * p)`` trials for p searched
parameters (:func:`min_trials`), and the table then holds no number, only the sentence why. The
reasons: (1) the out-of-bootstrap score needs left-out trials: with 20 trials a resample leaves
out about 7, the fewest on which an R^2 and a shuffle still mean something; (2) a regression on p
predictors needs about 10 observations per predictor before its fitted effects stop tracking
noise (the events-per-variable rule of Peduzzi et al. 1996, Harrell's *Regression Modeling
Strategies* 4.4); a forest is no less data-hungry. fANOVA fits a random forest on the same trials,
so the same minimum holds for it. The known-truth tests check the consequence: at the minimum, one
driving parameter out of four is found with an interval excluding 0 and a null study puts no
parameter above noise. PED-ANOVA needs more (:func:`ped_anova_min_trials`): it keeps only the trials
in the top ``target_quantile`` (10%) and compares their Parzen density of each parameter with that
of all trials, so its estimate rests on ``quantile * n`` trials; 100 trials keep 10 of them, twice
the 5 Optuna's documentation asks for, so that a resample (which repeats some and drops about a
third of the distinct ones) still has about 6 distinct top trials to fit a density on. Below its
minimum the PED-ANOVA column holds no number and ``Importance.evaluator_why`` the sentence
"not estimated: N trials, needs at least M".

**Seed noise** (:func:`seed_noise`): the share of the objective's variance that reseeding one
configuration produces, from the configurations run with several seeds. It is the part no
hyperparameter can explain: it is set against the surrogate's R^2 (R^2 + seed share near 1: the
surrogate explains what there is to explain), never against the normalized fANOVA/PED-ANOVA shares.

**Search space.** Log scale, bounds and the order of choices come from the study file
(:func:`analysis.load.study_space`, or the Optuna record); when neither is known the ranges are the
observed ones on a linear scale, never a log scale guessed from the values, and the report says so.
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

from analysis.stability import LEVEL, _percentile_interval
from analysis.stats import NotEstimated, variance_components
from analysis.tidy import PARAM_PREFIX, STATUSES, final_rows, final_values, param_columns, param_name, validate_tidy

EVALUATORS = ("fanova", "ped_anova")
MODEL_PARAM = "model"  # analysed as a categorical hyperparameter when the trials span several models
MIN_TRIALS = 20  # importance is not estimated below max(MIN_TRIALS, TRIALS_PER_PARAM * p): module docstring
TRIALS_PER_PARAM = 10
PED_ANOVA_MIN_TRIALS = 100  # PED-ANOVA keeps the top quantile only: 10 trials of 100 at 0.1 (module docstring)
PED_ANOVA_MIN_TOP = 10  # trials in PED-ANOVA's top quantile, at least (twice the 5 Optuna advises)
N_REFITS = 40  # fANOVA / PED-ANOVA refits on resampled trials, for their intervals
FANOVA_TREES = 16  # fANOVA's forest: the refits carry the uncertainty (module docstring)
FANOVA_DEPTH = 16
N_BOOT_IMPORTANCE = 100  # forest refits per importance analysis (each a few tens of ms)
N_TREES = 16  # trees per surrogate forest: the bootstrap, not the forest, carries the uncertainty
RUNG_STATUSES = ("completed", "stopped_early", "diverged")


class SensitivityError(ValueError):
    """Bad input to the sensitivity analysis; the message is one line naming the parameter."""


def min_trials(n_params: int) -> int:
    """The fewest trials an importance analysis (and fANOVA) of ``n_params`` parameters accepts (module docstring)."""
    return max(MIN_TRIALS, TRIALS_PER_PARAM * n_params)


def ped_anova_min_trials(target_quantile: float = 0.1) -> int:
    """The fewest trials PED-ANOVA is run on: 100, and enough for PED_ANOVA_MIN_TOP in its top quantile."""
    return max(PED_ANOVA_MIN_TRIALS, math.ceil(PED_ANOVA_MIN_TOP / target_quantile - 1e-9))


# --- which trials ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSelection:
    """The trials an importance analysis used, and what it left out.

    used: one row per run used (its final row, with ``metric`` replaced by the value analysed and,
    at a rung, ``step`` by the rung). excluded: {reason: number of runs}. basis: "full budget" or
    "step <rung>"; step: the rung (None for full budget).
    """

    used: pd.DataFrame
    excluded: dict[str, int]
    basis: str = "full budget"
    step: int | None = None

    @property
    def n_used(self) -> int:
        return len(self.used)

    @property
    def run_ids(self) -> list[str]:
        return list(self.used["run_id"])


def select_trials(df: pd.DataFrame, metric: str = "error") -> TrialSelection:
    """Full-budget trials: completed runs with a finite final ``metric`` (``final_<metric>`` where logged)."""
    validate_tidy(df, [metric])
    finals = final_rows(df)
    finals[metric] = finals["run_id"].map(final_values(df, metric)).to_numpy(dtype=float)
    finite = np.isfinite(finals[metric].to_numpy(dtype=float))
    completed = (finals["status"] == "completed").to_numpy()
    excluded = {s: int(n) for s, n in finals.loc[~completed, "status"].value_counts().items() if n}
    if (completed & ~finite).any():
        excluded[f"completed, non-finite {metric}"] = int((completed & ~finite).sum())
    return TrialSelection(finals[completed & finite].reset_index(drop=True), excluded)


def select_at_rung(df: pd.DataFrame, metric: str = "error") -> TrialSelection:
    """Every trial at the common rung: the largest step that every used trial reached (module docstring).

    The value of a run is its ``metric`` at its last evaluation at or before the rung.
    """
    validate_tidy(df, [metric])
    finals = final_rows(df)
    points = df[np.isfinite(df[metric].astype(float))]
    last = points.groupby("run_id")["step"].max()
    status = finals.set_index("run_id")["status"]
    anchors = last[last.index.isin(status[status.isin(("completed", "stopped_early"))].index)]
    if anchors.empty:
        excluded = {s: int(n) for s, n in finals["status"].value_counts().items() if n}
        return TrialSelection(finals.iloc[0:0].assign(**{metric: pd.Series(dtype=float)}), excluded, "no rung")
    rung = int(anchors.min())
    reached = last[last >= rung].index
    candidates = status[status.isin(RUNG_STATUSES)]
    use = [r for r in candidates.index if r in reached]
    excluded: dict[str, int] = {}
    for run_id, st in status.items():
        if run_id in use:
            continue
        reason = st if st not in RUNG_STATUSES else (
            f"{st} before step {rung}" if run_id in last.index else f"{st}, no finite {metric}")
        excluded[reason] = excluded.get(reason, 0) + 1
    at = points[points["run_id"].isin(use) & (points["step"] <= rung)].sort_values("step", kind="stable")
    value = at.groupby("run_id")[metric].last()
    used = finals[finals["run_id"].isin(use)].copy()
    used[metric] = used["run_id"].map(value).to_numpy(dtype=float)
    used["step"] = rung
    return TrialSelection(used.reset_index(drop=True), excluded, f"step {rung}", rung)


def status_table(df: pd.DataFrame, metric: str = "error") -> pd.DataFrame:
    """Runs per status (every status listed, zeros included) and how many each importance analysis used.

    Columns: ``status``, ``n_runs``, ``n_used`` (full budget), ``n_used_at_rung``.
    """
    selection = select_trials(df, metric)
    rung = select_at_rung(df, metric)
    counts = final_rows(df)["status"].value_counts()
    used = selection.used["status"].value_counts()
    used_rung = rung.used["status"].value_counts()
    return pd.DataFrame(
        {
            "status": list(STATUSES),
            "n_runs": [int(counts.get(s, 0)) for s in STATUSES],
            "n_used": [int(used.get(s, 0)) for s in STATUSES],
            "n_used_at_rung": [int(used_rung.get(s, 0)) for s in STATUSES],
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

    ``known`` (the study file's search space, when the caller has it) wins. Otherwise the range is
    the values seen, on a linear scale: an integer column -> IntDistribution, a float column ->
    FloatDistribution, anything else (str, bool) -> CategoricalDistribution of the values seen.
    A log scale is never guessed from the values (a study file says it). ``model`` joins as a
    categorical parameter when the trials span several models.
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
            out[name] = IntDistribution(int(values.min()), int(values.max()))
        elif kind == "f":
            out[name] = FloatDistribution(float(values.min()), float(values.max()))
        else:
            choices = sorted({_python(v) for v in values}, key=lambda v: (type(v).__name__, v))
            out[name] = CategoricalDistribution(choices)
    return out


def ordinal(dist: BaseDistribution) -> bool:
    """A list of numeric choices: ordered as the study file lists them (ranked and binned in that order)."""
    return isinstance(dist, CategoricalDistribution) and all(
        isinstance(c, int | float) and not isinstance(c, bool) for c in dist.choices)


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
    return _in_memory_study(direction, trials)


def _in_memory_study(direction, trials: Sequence[optuna.trial.FrozenTrial]) -> optuna.Study:
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

    Rows where x is absent are dropped; NaN when fewer than 3 rows or no variation. A list of
    numeric choices is numeric here: pass its positions in the study file's list.
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


def encode(used: pd.DataFrame, distributions: Mapping[str, BaseDistribution]) -> np.ndarray:
    """The trials' hyperparameters as surrogate inputs: [n_trials, n_params], one column per distribution.

    Numeric: position in the range (0..1, of the logs for a log scale); choices: index in the
    study file's list; absent (a conditional parameter that does not apply): -1.
    """
    columns = []
    for name, dist in distributions.items():
        values = used[_column(name)]
        present = values.notna().to_numpy()
        col = np.full(len(used), -1.0)
        if isinstance(dist, CategoricalDistribution):
            index = {_python(c): i for i, c in enumerate(dist.choices)}
            col[present] = [index.get(_python(v), -1) for v in values[present]]
        elif present.any():
            col[present] = _positions(values[present].to_numpy(dtype=float), dist)
        columns.append(col)
    return np.stack(columns, axis=1) if columns else np.zeros((len(used), 0))


def surrogate_bootstrap(
    x: np.ndarray, y: np.ndarray, n_boot: int = N_BOOT_IMPORTANCE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-bootstrap explained variance and permutation importances of a random-forest surrogate.

    x: [n, p] (:func:`encode`), y: [n]. Per resample b (trials drawn with replacement), a forest is
    fitted on the resample and scored on the trials it left out: r2[b] = 1 - MSE / Var(y) and
    imp[b, j] = (MSE with column j shuffled among the left-out trials - MSE) / (2 Var(y)), Var over all n:
    for an additive effect of independent parameters, shuffling x_j adds twice the variance of its
    effect f_j (y - f + f_j(x_j) - f_j(x'_j)), so imp is the fraction of Var(y) that f_j carries.
    Returns (r2 [B], imp [B, p]); rows are NaN for a resample that left out fewer than 2 trials.
    """
    from sklearn.ensemble import RandomForestRegressor

    n, p = x.shape
    rng = np.random.default_rng(seed)
    var = float(np.var(y))
    r2, imp = np.full(n_boot, np.nan), np.full((n_boot, p), np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        held = np.setdiff1d(np.arange(n), idx)
        if len(held) < 2 or var == 0:
            continue
        forest = RandomForestRegressor(n_estimators=N_TREES, min_samples_leaf=2, random_state=int(rng.integers(2**31)))
        forest.fit(x[idx], y[idx])
        # One predict call: the left-out trials as they are, then once per column with that column shuffled.
        shuffled = np.repeat(x[held][None], p + 1, axis=0)  # [p + 1, h, p]
        for j in range(p):
            shuffled[j + 1, :, j] = rng.permutation(shuffled[j + 1, :, j])
        pred = forest.predict(shuffled.reshape(-1, p)).reshape(p + 1, len(held))
        mse = ((pred - y[held][None]) ** 2).mean(axis=1)  # [p + 1]
        r2[b] = 1.0 - mse[0] / var
        imp[b] = (mse[1:] - mse[0]) / (2.0 * var)
    return r2, imp


def importance_table(
    study: optuna.Study,
    used: pd.DataFrame,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    evaluators: Sequence[str] = EVALUATORS,
    seed: int = 0,
    ped_anova_quantile: float = 0.1,
) -> pd.DataFrame:
    """Optuna's normalized importances of each hyperparameter beside its rank correlation (points, no interval).

    Index: dotted parameter name. Columns: ``kind`` (float/int/categorical), ``log``, ``n`` (trials
    with the parameter), one column per evaluator (normalized to sum to 1 over the parameters it
    rates: a share of what the evaluator's model explains; NaN where it cannot rate one, e.g. fANOVA
    and a conditional parameter, and for PED-ANOVA with fewer than ``5 / ped_anova_quantile``
    trials, Optuna's own minimum), ``rank_corr`` and ``abs_rank_corr``. The minimums of the module
    docstring and the intervals are :func:`importance`'s.
    """
    unknown = [e for e in evaluators if e not in EVALUATORS]
    if unknown:
        raise SensitivityError(f"evaluators: expected some of {', '.join(EVALUATORS)}, got {', '.join(unknown)}")
    table = pd.DataFrame(index=pd.Index(list(distributions), name="param"))
    table["kind"] = [_kind(d) for d in distributions.values()]
    table["log"] = [bool(getattr(d, "log", False)) for d in distributions.values()]
    table["n"] = [int(used[_column(p)].notna().sum()) for p in distributions]
    enough = {"fanova": len(study.trials) >= 2,
              "ped_anova": len(study.trials) >= math.ceil(5 / ped_anova_quantile)}  # Optuna's own minimum
    for name in evaluators:
        ok = enough[name] and len(distributions) > 0
        scores = get_param_importances(study, evaluator=_evaluator(name, seed, ped_anova_quantile)) if ok else {}
        table[name] = [float(scores[p]) if p in scores else np.nan for p in distributions]
    codes = encode(used, distributions)
    table["rank_corr"] = [
        rank_correlation(_ranked(used, p, d, codes[:, i]), used[metric], _kind(d) == "categorical" and not ordinal(d))
        for i, (p, d) in enumerate(distributions.items())
    ]
    table["abs_rank_corr"] = table["rank_corr"].abs()
    return table


def _evaluator(name: str, seed: int, ped_anova_quantile: float):
    if name == "fanova":
        return FanovaImportanceEvaluator(n_trees=FANOVA_TREES, max_depth=FANOVA_DEPTH, seed=seed)
    return PedAnovaImportanceEvaluator(target_quantile=ped_anova_quantile)


def evaluator_bootstrap(
    study: optuna.Study, params: Sequence[str], evaluator: str, n_refits: int = N_REFITS, seed: int = 0,
    ped_anova_quantile: float = 0.1,
) -> np.ndarray:
    """Optuna's ``evaluator`` refitted on ``n_refits`` resamples of the study's trials (drawn with replacement).

    Returns [n_refits, len(params)]: each refit's normalized importance of ``params`` (the ones the evaluator
    rated on all trials); a row is NaN where the evaluator could not fit the resample (e.g. every value equal).
    """
    trials = study.trials
    rng = np.random.default_rng(seed)
    out = np.full((n_refits, len(params)), np.nan)
    for b in range(n_refits):
        resample = _in_memory_study(study.direction, [trials[i] for i in rng.integers(0, len(trials), len(trials))])
        try:
            scores = get_param_importances(resample, evaluator=_evaluator(evaluator, seed + 1 + b, ped_anova_quantile),
                                           params=list(params))
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        out[b] = [float(scores.get(p, np.nan)) for p in params]
    return out


def _ranked(used: pd.DataFrame, name: str, dist: BaseDistribution, code: np.ndarray) -> pd.Series:
    """The values rank correlation ranks: numeric choices by their position in the study file's list."""
    if ordinal(dist):
        return pd.Series(np.where(code >= 0, code, np.nan), index=used.index)
    return used[_column(name)]


def _kind(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "categorical"
    return "int" if isinstance(dist, IntDistribution) else "float"


@dataclass(frozen=True)
class Importance:
    """One importance analysis (full budget, or every trial at the common rung); see :func:`importance`.

    table: index = dotted parameter; ``kind``, ``log``, ``n``, ``importance`` (permutation importance,
    a fraction of the objective's variance), ``importance_lo``/``importance_hi`` (its interval),
    ``above_noise`` (the interval excludes 0), then per Optuna evaluator its share (``fanova``,
    ``ped_anova``) with its bootstrap interval (``fanova_lo``, ``fanova_hi``, ...), ``rank_corr`` and
    ``abs_rank_corr``; sorted by ``importance``. Every number is NaN when ``why`` says it was not estimated;
    an evaluator's columns are NaN when ``evaluator_why[name]`` says why (below its own minimum).
    explained / explained_ci: the surrogate's out-of-bootstrap R^2 and its interval. n_refits: the
    evaluators' refits per interval.
    """

    selection: TrialSelection
    min_trials: int
    table: pd.DataFrame
    explained: float = math.nan
    explained_ci: tuple[float, float] = (math.nan, math.nan)
    n_boot: int = 0
    why: str | None = None
    evaluator_why: dict[str, str] = field(default_factory=dict)
    n_refits: int = 0

    @property
    def estimated(self) -> bool:
        return self.why is None

    @property
    def basis(self) -> str:
        return self.selection.basis


IMPORTANCE_COLUMNS = ("importance", "importance_lo", "importance_hi", "above_noise")


def evaluator_columns(evaluators: Sequence[str]) -> list[str]:
    """``fanova``, ``fanova_lo``, ``fanova_hi``, ... for each evaluator, in order."""
    return [f"{name}{suffix}" for name in evaluators for suffix in ("", "_lo", "_hi")]


def importance(
    selection: TrialSelection,
    distributions: Mapping[str, BaseDistribution],
    metric: str = "error",
    direction: str = "minimize",
    evaluators: Sequence[str] = EVALUATORS,
    n_boot: int = N_BOOT_IMPORTANCE,
    seed: int = 0,
    level: float = LEVEL,
    ped_anova_quantile: float = 0.1,
    n_refits: int = N_REFITS,
) -> Importance:
    """Importance of each hyperparameter on the trials of ``selection`` (see the module docstring).

    Below :func:`min_trials` (or with an objective that does not vary) nothing is estimated:
    ``why`` says "not estimated: <n> trials, needs at least <M> ..." and the table holds no number.
    PED-ANOVA below :func:`ped_anova_min_trials` likewise, in ``evaluator_why["ped_anova"]``.
    """
    used = selection.used
    dists = {k: d for k, d in distributions.items() if _column(k) in used and used[_column(k)].notna().any()}
    need = min_trials(len(dists))
    blank = pd.DataFrame(index=pd.Index(list(dists), name="param"))
    blank["kind"] = [_kind(d) for d in dists.values()]
    blank["log"] = [bool(getattr(d, "log", False)) for d in dists.values()]
    blank["n"] = [int(used[_column(p)].notna().sum()) for p in dists]
    for column in (*IMPORTANCE_COLUMNS, *evaluator_columns(evaluators), "rank_corr", "abs_rank_corr"):
        blank[column] = np.nan
    n = selection.n_used
    y = used[metric].to_numpy(dtype=float) if n else np.zeros(0)
    why = None
    if not dists:
        why = "not estimated: no searched hyperparameter varies among the trials"
    elif n < need:
        why = (f"not estimated: {n} trials, needs at least {need} ({TRIALS_PER_PARAM} per searched parameter, "
               f"{len(dists)} searched, and never fewer than {MIN_TRIALS})")
    elif np.unique(y).size < 2:
        why = f"not estimated: all {n} trials have the same {metric}, there is no variation to attribute"
    if why is not None:
        return Importance(selection, need, blank, why=why, evaluator_why={e: why for e in evaluators})
    evaluator_why = {}  # fANOVA's minimum is the analysis's own (met here); PED-ANOVA's is larger
    if "ped_anova" in evaluators and n < (ped_min := ped_anova_min_trials(ped_anova_quantile)):
        evaluator_why["ped_anova"] = (f"not estimated: {n} trials, needs at least {ped_min} (PED-ANOVA keeps only "
                                      f"the top {ped_anova_quantile:.0%} of the trials)")
    run = [e for e in evaluators if e not in evaluator_why]
    study = build_study(used, dists, metric, direction)
    table = importance_table(study, used, dists, metric, run, seed, ped_anova_quantile)
    for e in evaluators:
        rated = [p for p in dists if e in table and np.isfinite(table.loc[p, e])]
        lo, hi = np.full(len(dists), np.nan), np.full(len(dists), np.nan)
        if e in run and rated and n_refits > 0:
            refits = evaluator_bootstrap(study, rated, e, n_refits, seed, ped_anova_quantile)
            ok = np.isfinite(refits).all(axis=1)
            if ok.any():
                at = [list(dists).index(p) for p in rated]
                lo[at], hi[at] = np.quantile(refits[ok], [(1 - level) / 2, (1 + level) / 2], axis=0)
        if e not in table:
            table[e] = np.nan
        table[f"{e}_lo"], table[f"{e}_hi"] = lo, hi
    table = table[["kind", "log", "n", *evaluator_columns(evaluators), "rank_corr", "abs_rank_corr"]]
    r2, imp = surrogate_bootstrap(encode(used, dists), y, n_boot, seed)
    ok = np.isfinite(r2)
    lo, hi = np.quantile(imp[ok], [(1 - level) / 2, (1 + level) / 2], axis=0)
    table.insert(3, "importance", imp[ok].mean(axis=0))
    table.insert(4, "importance_lo", lo)
    table.insert(5, "importance_hi", hi)
    table.insert(6, "above_noise", lo > 0)
    table = table.sort_values("importance", ascending=False, kind="stable")
    return Importance(selection, need, table, float(r2[ok].mean()), _percentile_interval(r2[ok], level), int(ok.sum()),
                      evaluator_why=evaluator_why, n_refits=n_refits)


# --- seed noise ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedNoise:
    """How much of the objective's variance reseeding one configuration produces.

    A one-way random-effects model, configuration random and seeds within it
    (:func:`analysis.stats.variance_components`), on the configurations run with at least two seeds:
    share = within / (between + within) = 1 - ICC, with the exact F-based interval ``ci``.
    ``why`` says why it was not estimated (share and ci NaN): fewer than 3 such configurations, or
    no variation between seeds.
    """

    share: float
    ci: tuple[float, float]
    within_var: float
    between_var: float
    n_configs: int  # configurations with >= 2 seeds
    n_runs: int  # runs of those configurations
    why: str | None = None


def seed_noise(used: pd.DataFrame, metric: str = "error", level: float = LEVEL) -> SeedNoise:
    """Seed-noise share of the objective's variance, from configurations replicated over seeds (see SeedNoise)."""
    groups = pd.Series([f"{m}/{c}" for m, c in zip(used["model"], used["config_id"], strict=True)],
                       index=used.index, dtype=object)
    sizes = groups.map(groups.value_counts())
    keep = (sizes >= 2).to_numpy() & np.isfinite(used[metric].to_numpy(dtype=float))
    n_configs, n_runs = int(groups[keep].nunique()), int(keep.sum())
    try:
        vc = variance_components(used.loc[keep, metric].to_numpy(dtype=float), groups[keep].to_numpy(), level)
    except NotEstimated as err:
        reason = err.reason + (" (configurations with two or more seeds)" if "configurations" in err.reason else "")
        return SeedNoise(np.nan, (np.nan, np.nan), np.nan, np.nan, n_configs, n_runs, reason)
    return SeedNoise(vc.seed_share, (vc.seed_share_lo, vc.seed_share_hi), vc.within, vc.between, n_configs, n_runs)


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
    if isinstance(dist, CategoricalDistribution):  # every choice, in the study file's order
        order = {_python(c): i for i, c in enumerate(dist.choices)}
        index = values.map(lambda v: order.get(_python(v), np.nan))
        centres = [float(c) if ordinal(dist) else np.nan for c in dist.choices]
        return index, [_label(c) for c in dist.choices], centres
    distinct = sorted(present.unique(), key=lambda v: (type(v).__name__, v))
    if len(distinct) <= n_bins:
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

    points: every used trial (``value``, ``objective``, ``bin`` (row of summary), ``config_id``, ``seed``,
    ``model``: the figure draws each model apart);
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
             "config_id": rows["config_id"].to_numpy(), "seed": rows["seed"].to_numpy(),
             "model": rows["model"].to_numpy() if "model" in rows else np.full(len(rows), "")}
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
    """The sensitivity analysis of one study (see :func:`hyperparameter_sensitivity`).

    ``full`` and ``rung``: the importance analyses on full-budget trials and on every trial at the
    common rung; ``importances`` is ``full.table``. Marginals, interaction and boundary describe the
    full-budget trials.
    """

    metric: str
    direction: str
    selection: TrialSelection
    status: pd.DataFrame
    distributions: dict[str, BaseDistribution]
    full: Importance
    rung: Importance
    seed_noise: SeedNoise
    marginals: list[Marginal]
    interaction: Interaction | None
    boundary: pd.DataFrame
    space_known: bool = False
    study: optuna.Study | None = field(default=None, repr=False)

    @property
    def importances(self) -> pd.DataFrame:
        return self.full.table


def hyperparameter_sensitivity(
    df: pd.DataFrame,
    metric: str = "error",
    direction: str = "minimize",
    distributions: Mapping[str, BaseDistribution] | None = None,
    evaluators: Sequence[str] = EVALUATORS,
    seed: int = 0,
    n_boot: int = N_BOOT_IMPORTANCE,
    ped_anova_quantile: float = 0.1,
    n_refits: int = N_REFITS,
) -> Sensitivity:
    """Sensitivity of ``metric`` to each hyperparameter, on full-budget trials and at the common rung.

    ``distributions``: the search space as Optuna distributions keyed by dotted name, from the study
    file (the rest is inferred, see :func:`infer_distributions`). ``seed`` seeds the forests and the
    bootstraps; ``n_refits``: the fANOVA / PED-ANOVA refits behind their intervals. The interaction table is
    for the top pair by full-budget importance, when estimated.
    """
    if direction not in ("minimize", "maximize"):
        raise SensitivityError(f"direction: expected 'minimize' or 'maximize', got {direction!r}")
    selection = select_trials(df, metric)
    at_rung = select_at_rung(df, metric)
    used = selection.used
    dists = infer_distributions(pd.concat([used, at_rung.used], ignore_index=True), distributions)
    study = build_study(used, dists, metric, direction)
    kwargs = dict(metric=metric, direction=direction, evaluators=evaluators, n_boot=n_boot, seed=seed,
                  ped_anova_quantile=ped_anova_quantile, n_refits=n_refits)
    full = importance(selection, dists, **kwargs)
    rung = importance(at_rung, dists, **kwargs)
    order = list(full.table.index) if full.estimated else [k for k in dists if k in full.table.index]
    top = [p for p in order if full.estimated and full.table.loc[p, "importance"] > 0][:2]
    return Sensitivity(
        metric=metric,
        direction=direction,
        selection=selection,
        status=status_table(df, metric),
        distributions=dists,
        full=full,
        rung=rung,
        seed_noise=seed_noise(used, metric),
        marginals=marginals(used, dists, metric, params=order),
        interaction=interaction(used, dists, (top[0], top[1]), metric) if len(top) == 2 else None,
        boundary=boundary_check(used, dists, metric, direction, known=[param_name(k) for k in distributions or {}]),
        space_known=bool(distributions),
        study=study,
    )
