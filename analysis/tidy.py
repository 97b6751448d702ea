"""The tidy frame every analysis reads: one row per run x evaluation step.

A loader (MLflow runs + the Optuna study) fills it; stability, sensitivity, generalization and
the report only ever read this frame, so they can be tested on synthetic studies with known truth.

Schema (one row per run and evaluation step; a run is one trial of one study, with one seed):

=================  ==========================================================================
column             meaning
=================  ==========================================================================
``study``          str: the study name (several values when one study was run under several
                   search seeds, or when replications are loaded beside their study)
``replication``    str or None: the replication id when the run comes from
                   ``mannstudy replicate``; None for runs of the search itself
``run_id``         str: the MLflow run id; the unit of every per-run statistic
``trial_id``       the Optuna trial number (or any id unique within the study)
``config_id``      str: :func:`config_id` of the run's hyperparameters without the seed, so the
                   runs of one configuration over seeds share it
``seed``           int: the run's training seed (a nuisance hyperparameter: never a ``param.`` column)
``model``          str: the registry name (``ntm``, ``dnc``, ``dnc-md``, ... , ``lstm``)
``status``         one of :data:`STATUSES`: ``completed`` (full budget), ``stopped_early``
                   (ASHA stopped it; Optuna: PRUNED), ``diverged`` (NaN/Inf; Optuna: FAIL),
                   ``failed`` (an exception), ``running`` (not finished when loaded)
``status_step``    int or NaN: the step at which the status was reached (the divergence step,
                   the last rung of a stopped trial); NaN for completed runs
``step``           int: the training step of this evaluation
metrics            float columns named as ``mann.train`` reports them (see :data:`METRIC_COLUMNS`):
                   ``error`` (at the task's full training difficulty, held-out sequences),
                   ``cost_bits``, ``accuracy``, ``curriculum_error``, ``level``, ``train_loss``,
                   ``wall_time``, ``sequences``, ``gen2x_error``, ..., the end-of-run
                   ``final_error``, ``final_cost_bits``, ``final_accuracy``, ``final_gen2x_error``,
                   ... (logged once, at the run's last step) and ``converged_step``;
                   units: docs/metrics.md. NaN where not measured
``param.<key>``    one column per hyperparameter, named by its dotted key (``param.lr``,
                   ``param.model.memory_size``, ``param.task.max_length``), holding the typed
                   value: int columns for integer parameters (pandas ``Int64`` where some runs lack
                   it), float for real ones, str/bool for categorical ones; NaN/None where a
                   conditional parameter does not apply to the run
=================  ==========================================================================

A run that never reached an evaluation (failed at start) still has one row, with ``step`` 0
and NaN metrics, so that it is counted. Extra columns are allowed and ignored, except the
loader's ``target_error``, ``stop_at_error`` and ``stop_after_evals`` (or ``param.`` columns of those
keys), which :func:`study_target` and :func:`reach_times` read.

Success and steps to target have one definition, :func:`reach_times` (docs/metrics.md, "Success and
steps to target"): a run reaches the target at the first of ``stop_after_evals`` consecutive periodic
evaluations whose ``error`` is at most the target, exactly as training's convergence stop counts
(``mann.train``: ``stop_at_error``, ``stop_after_evals``, ``converged_step``). Every success rate,
Kaplan-Meier time, ranking and paper comparison reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

STATUSES = ("completed", "stopped_early", "diverged", "failed", "running")
# Runs that used their whole budget: a diverged run would never have recovered, so it counts
# as an outcome of its configuration; stopped, failed and running runs did not get the chance.
FULL_BUDGET = ("completed", "diverged")

ID_COLUMNS = (
    "study", "replication", "run_id", "trial_id", "config_id", "seed", "model", "status", "status_step", "step",
)
REQUIRED_COLUMNS = ID_COLUMNS
METRIC_COLUMNS = (
    "error", "cost_bits", "accuracy", "curriculum_error", "level", "train_loss", "wall_time", "sequences",
    "gen2x_error", "gen2x_cost_bits", "gen2x_accuracy", "gen4x_error", "gen4x_cost_bits", "gen4x_accuracy",
    "final_error", "final_cost_bits", "final_accuracy", "converged_step",
)
PARAM_PREFIX = "param."
DEFAULT_STOP_AFTER_EVALS = 2  # mann.train.TrainConfig.stop_after_evals's default, for frames that lack the key
# Columns a periodic evaluation always logs: a row with none of them is no evaluation (a diverged run's final_*
# at its divergence step, a run's empty step-0 row).
EVALUATION_COLUMNS = ("error", "curriculum_error", "level", "train_loss")
_SEED_KEYS = ("seed", PARAM_PREFIX + "seed")


class TidyError(ValueError):
    """A frame that does not follow the tidy schema; the message is one line naming what is wrong."""


def validate_tidy(df: pd.DataFrame, metrics: Iterable[str] = ()) -> pd.DataFrame:
    """Check ``df`` against the schema (required columns, known statuses, the given metric columns).

    Returns ``df`` unchanged so calls can chain; raises :class:`TidyError` otherwise.
    """
    if not isinstance(df, pd.DataFrame):
        raise TidyError(f"tidy frame: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in (*REQUIRED_COLUMNS, *metrics) if c not in df.columns]
    if missing:
        raise TidyError(
            f"tidy frame: missing columns {', '.join(missing)} (expected the columns of analysis.tidy: "
            f"{', '.join(REQUIRED_COLUMNS)}, plus metric and param.<key> columns)"
        )
    unknown = sorted(set(df["status"].dropna().astype(str)) - set(STATUSES))
    if unknown or df["status"].isna().any():
        got = ", ".join(unknown) if unknown else "a missing status"
        raise TidyError(f"tidy frame: status: expected one of {', '.join(STATUSES)}, got {got}")
    return df


def param_columns(df: pd.DataFrame) -> list[str]:
    """The ``param.<key>`` columns of ``df``, in frame order; the seed is not a hyperparameter here."""
    return [c for c in df.columns if c.startswith(PARAM_PREFIX) and c not in _SEED_KEYS]


def param_name(column: str) -> str:
    """``param.model.memory_size`` -> ``model.memory_size`` (the key Optuna and the study files use)."""
    return column[len(PARAM_PREFIX):] if column.startswith(PARAM_PREFIX) else column


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation (largest ``step``) of each run: one row per ``run_id``, in first-seen run order."""
    validate_tidy(df)
    order = pd.Index(df["run_id"]).unique()
    last = df.sort_values("step", kind="stable").groupby("run_id", sort=False).tail(1)
    return last.set_index("run_id", drop=False).loc[order].reset_index(drop=True)


def final_values(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per run (index ``run_id``): the run's final ``metric``.

    The end-of-run evaluation ``final_<metric>`` (a larger held-out set, logged once when a run ends)
    where the run has a finite one, else ``metric`` at the run's last evaluation. NaN when neither.
    """
    validate_tidy(df, [metric])
    last = final_rows(df).set_index("run_id")[metric].astype(float)
    column = "final_" + metric
    if column in df.columns:
        logged = df[np.isfinite(df[column].astype(float))].sort_values("step", kind="stable")
        ended = logged.groupby("run_id", sort=False)[column].last().astype(float)
        last = ended.reindex(last.index).fillna(last)
    return last


def _canonical(value: Any) -> Any:
    """A JSON-ready value with one spelling per value: 64, 64.0 and np.int64(64) hash alike."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return repr(value) if not math.isfinite(value) else value
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return str(value)


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value)) or value is pd.NA


def config_id(params: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit hash of a run's hyperparameters, without the seed.

    Keys may carry the ``param.`` prefix or not; a missing (None/NaN) value counts as absent, so
    a conditional parameter that does not apply changes nothing. Numbers hash by value (64 == 64.0),
    strings as strings: the loader must type MLflow's string params before hashing.
    """
    canonical = {
        param_name(key): _canonical(value)
        for key, value in params.items()
        if param_name(key) != "seed" and not _absent(value)
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def params_of(row: Mapping[str, Any] | pd.Series) -> dict[str, Any]:
    """The hyperparameters of one tidy row as ``{dotted key: value}``, absent ones left out."""
    return {
        param_name(key): value
        for key, value in dict(row).items()
        if key.startswith(PARAM_PREFIX) and key not in _SEED_KEYS and not _absent(value)
    }


def _run_setting(df: pd.DataFrame, key: str) -> pd.Series:
    """Per run (index ``run_id``): the run's value of the TrainConfig key ``key`` (column ``key`` or
    ``param.<key>``), NaN where the frame does not hold it."""
    runs = pd.Index(df["run_id"]).unique()
    for column in (key, PARAM_PREFIX + key):
        if column in df.columns:
            values = pd.to_numeric(df[column], errors="coerce").astype(float)
            return values.groupby(df["run_id"], sort=False).first().reindex(runs)
    return pd.Series(math.nan, index=runs, dtype=float)


def study_target_setting(df: pd.DataFrame) -> tuple[str, float] | None:
    """(the key it comes from, the value) of :func:`study_target`; None when the frame holds neither key."""
    for key in ("stop_at_error", "target_error"):
        values = _run_setting(df, key).dropna()
        if len(values):
            return key, float(values.median())
    return None


def study_target(df: pd.DataFrame) -> float | None:
    """The error a run must reach to count as a success: the study's ``stop_at_error`` where its runs set one,
    else the task's ``target_error``; None when the frame holds neither.

    Several values (a study that searched ``stop_at_error``, runs of two tasks) give their median.
    """
    setting = study_target_setting(df)
    return None if setting is None else setting[1]


def reach_times(df: pd.DataFrame, target: float, after: int | None = None, metric: str = "error") -> pd.DataFrame:
    """Per run: when it reached ``target``, or the step it is censored at.

    A run reaches the target at the step of the first of ``after`` consecutive periodic evaluations with
    ``metric <= target`` (an evaluation whose ``metric`` is NaN breaks the streak, as in training). ``after``
    None: each run's own ``stop_after_evals`` (DEFAULT_STOP_AFTER_EVALS where the frame lacks it), so that
    with the run's ``stop_at_error`` as the target this is the ``converged_step`` training logged. A run
    that never reached it is censored at its last step, whatever ended it (budget, ASHA stop, divergence).

    Returns one row per run_id (first-seen order): ``status``, ``reached`` (bool), ``steps_to_target``
    (NaN when not reached), ``last_step``, ``time`` (``steps_to_target`` if reached, else ``last_step``: the
    time a Kaplan-Meier estimate reads, with ``reached`` as its event indicator).
    """
    validate_tidy(df, [metric])
    present = [c for c in EVALUATION_COLUMNS if c in df.columns]
    evals = df[df[present].notna().any(axis=1)].sort_values(["run_id", "step"], kind="stable")
    evals = evals.drop_duplicates(["run_id", "step"], keep="first")
    streaks = _run_setting(df, "stop_after_evals").fillna(DEFAULT_STOP_AFTER_EVALS) if after is None else None
    first: dict[str, float] = {}
    for run_id, run in evals.groupby("run_id", sort=False):
        need = int(after if streaks is None else streaks[run_id])
        below = (run[metric].astype(float) <= target).to_numpy()  # NaN compares False
        steps = run["step"].to_numpy()
        count = 0
        for i, ok in enumerate(below):
            count = count + 1 if ok else 0
            if count >= need:
                first[run_id] = float(steps[i - need + 1])
                break
    last = final_rows(df)
    out = pd.DataFrame({"run_id": last["run_id"].to_numpy(), "status": last["status"].to_numpy(),
                        "last_step": last["step"].to_numpy()})
    out["steps_to_target"] = out["run_id"].map(first).astype(float)
    out["reached"] = out["steps_to_target"].notna()
    out["time"] = out["steps_to_target"].fillna(out["last_step"].astype(float))
    return out[["run_id", "status", "reached", "steps_to_target", "last_step", "time"]]
