"""One study's MLflow runs (and its Optuna study) -> the tidy frame of :mod:`analysis.tidy`.

What is read, and from where (the layout and its names are :mod:`study.record`'s)::

    experiment <study>                       one per study (the study name)
      run mannstudy.kind=study               the study's parent run
        run mannstudy.kind=trial             a trial of the search         -> replication None
        run mannstudy.kind=replication       a replication's parent run (mannstudy.replication=<id>)
          run mannstudy.kind=trial           a trial of the replication    -> replication <id>

Per trial run: its params (the whole TrainConfig as dotted keys, strings in MLflow: typed here by
reading them as JSON), the tags ``mannstudy.status`` / ``mannstudy.status_step`` / ``mannstudy.seed``
/ ``mannstudy.model`` / ``mannstudy.trial_id``, and the full history of every metric key.

Which params become ``param.<key>`` columns: the hyperparameters that vary across the loaded runs,
plus every key the Optuna study searched. Constants (the batch size of a study that never searched
it, the evaluation seed, ...) stay out: they would only add rows of zeros to every importance
table. ``model``, ``task`` and ``seed`` have their own columns. ``config_id`` hashes *all* params
but the seed (and ``checkpoint_dir``, a path), so it does not depend on which runs were loaded.
With the Optuna study, a searched key that a model's trials never had (``models: [dnc]`` in the
study file) is NaN for that model's runs, replications included: it does not apply to them.

Extra columns beside the schema: ``task``, ``target_error`` (the task's success threshold, from
``task.target_error``), ``stop_at_error`` and ``stop_after_evals`` (the run's convergence stop: with
``target_error``, what :func:`analysis.tidy.study_target` and :func:`analysis.tidy.reach_times` read, NaN where
the run lacks them), ``trial_name`` (Tune's trial name: finds checkpoints), ``optuna_trial``
(the Optuna trial number, when the Optuna study was given and the run was one of its trials).

Fetching (paging through the runs; the histories of many runs' metrics at once, by the store's bulk call
where it has one) is :mod:`study.tracking`'s: :func:`study.tracking.runs_of_kind`,
:func:`study.tracking.metric_histories`, where the measured costs of each way are noted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.tidy import ID_COLUMNS, METRIC_COLUMNS, PARAM_PREFIX, config_id, validate_tidy
from study.record import (
    KIND_REPLICATION,
    KIND_STUDY,
    KIND_TRIAL,
    RUNNING,
    SPEC_FILE,
    STATUS_TO_RUN_STATUS,
    TAG_KIND,
    TAG_MODEL,
    TAG_PARENT,
    TAG_REPLICATION,
    TAG_SEED,
    TAG_STATUS,
    TAG_STATUS_PREFIX,
    TAG_STUDY,
    TAG_TRIAL_ID,
    TAG_TRIAL_NAME,
)

EXTRA_COLUMNS = ("task", "target_error", "stop_at_error", "stop_after_evals", "trial_name", "optuna_trial")
# Params that are no hyperparameters or have their own column.
_OWN_COLUMN = ("model", "task", "seed")
_NOT_HASHED = ("seed", "checkpoint_dir")
_RUN_STATUS = {"FINISHED": "completed", "KILLED": "stopped_early", "FAILED": "failed", "RUNNING": "running",
               "SCHEDULED": "running"}


class LoadError(ValueError):
    """A study that cannot be loaded (unknown name, no parent run, bad path); one line."""


# ----------------------------------------------------------------------------------------------------------
# Where the study is


@dataclass(frozen=True)
class StudyRuns:
    """The MLflow runs of one study: parent, replications and trial runs (``mlflow.entities.Run``)."""

    tracking_uri: str
    study: str
    experiment_id: str
    parent: Any  # the study's parent Run
    replications: dict[str, Any] = field(default_factory=dict)  # replication id -> its parent Run
    trials: list = field(default_factory=list)  # trial Runs of the search and of the loaded replications

    @property
    def running(self) -> bool:
        """The study's sweep (or one of its replications) has not ended."""
        return self.parent.info.status == "RUNNING" or any(
            r.info.status == "RUNNING" for r in self.replications.values()
        )


def _check_results_exist(uri: str, study_name: str) -> None:
    """LoadError for a SQLite tracking file that does not exist: loading only reads, and MLflow would create an
    empty database there (logging its migrations) for a study that has no results."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise LoadError(f"{db}: no results of study {study_name!r} (no MLflow database there; run the study "
                            "first: mannstudy sweep STUDY_FILE)")


def find_study_runs(tracking_uri: str, study_name: str, include_replications: bool = True) -> StudyRuns:
    """The parent run, replication runs and trial runs of ``study_name``; LoadError when there is no such study."""
    from study import tracking

    _check_results_exist(tracking_uri, study_name)
    exp_id = tracking.find_experiment(tracking_uri, study_name)
    if exp_id is None:
        raise LoadError(f"MLflow at {tracking_uri}: no experiment named {study_name!r} (the study's name; "
                        "run the study first, or check the name and the tracking URI)")
    parent_id = tracking.find_study_run(tracking_uri, exp_id, study_name)
    if parent_id is None:
        raise LoadError(f"MLflow at {tracking_uri}: experiment {study_name!r} has no study run "
                        f"(tag {TAG_KIND}={KIND_STUDY}, {TAG_STUDY}={study_name})")
    parent = tracking.get_run(tracking_uri, parent_id)
    replications = {}
    if include_replications:
        for run in tracking.runs_of_kind(tracking_uri, exp_id, KIND_REPLICATION):
            rid = run.data.tags.get(TAG_REPLICATION)
            if rid and run.data.tags.get(TAG_STUDY, study_name) == study_name:
                replications.setdefault(rid, run)  # the oldest run of an id wins (runs come by start time)
    parents = {parent_id, *(r.info.run_id for r in replications.values())}
    trials = [r for r in tracking.runs_of_kind(tracking_uri, exp_id, KIND_TRIAL)
              if r.data.tags.get(TAG_PARENT) in parents]
    return StudyRuns(tracking_uri, study_name, exp_id, parent, replications, trials)


# ----------------------------------------------------------------------------------------------------------
# Metric histories


def metric_histories(tracking_uri: str, run_ids: Sequence[str], keys: Iterable[str],
                     method: str = "auto") -> pd.DataFrame:
    """Every point of each metric ``key`` of each run: columns ``run_id``, ``key``, ``step``, ``value``, ``timestamp``.

    ``method``: "auto" (bulk when the store has a bulk call), "bulk", or "per_run" (one request per run and
    key); see :func:`study.tracking.metric_histories`.
    """
    from study import tracking

    if method not in tracking.HISTORY_METHODS:
        raise LoadError(f"history_method: expected auto, bulk or per_run, got {method!r}")
    try:
        rows = tracking.metric_histories(tracking_uri, run_ids, keys, method)
    except tracking.TrackingError as err:  # "bulk" asked of a store without a bulk call
        raise LoadError(str(err)) from None
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])


# ----------------------------------------------------------------------------------------------------------
# Params, statuses, Optuna


def parse_param(text: str) -> Any:
    """An MLflow param string -> its value: JSON where it parses (numbers, true/false, null, lists as
    JSON text), the string itself otherwise (``adam``, ``lstm``)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)  # hashable, one spelling
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return value


def _typed_column(values: list) -> pd.Series:
    """A param column in the narrowest dtype: Int64/int64, float64, boolean, else str (None where absent)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="boolean")
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="Int64" if len(present) < len(values) else "int64")
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values],
                     dtype=object)


def _status(run) -> tuple[str, float]:
    """(tidy status, status step) of a trial run, from its tags (or, untagged, from MLflow's run status)."""
    tags = run.data.tags
    status = tags.get(TAG_STATUS) or _RUN_STATUS.get(run.info.status, "failed")
    if status not in (*STATUS_TO_RUN_STATUS, RUNNING):
        status = "failed"
    if status in ("completed", "running"):
        return status, math.nan
    try:
        return status, float(int(tags.get(TAG_STATUS_PREFIX + "step", "")))
    except ValueError:
        return status, math.nan


@dataclass(frozen=True)
class OptunaInfo:
    """What the Optuna study adds: trial number per Tune trial id, the search space and which models had which key."""

    trial_numbers: dict[str, int]
    distributions: dict[str, Any]  # dotted key -> optuna distribution (the union over trials)
    models_with: dict[str, set[str]]  # searched key -> models whose trials had it
    running: int  # trials still RUNNING
    states: dict[str, int]  # Optuna state name -> trials


def load_optuna(storage: str, study_name: str) -> OptunaInfo:
    """Read the Optuna study ``study_name`` from ``storage`` (a SQLAlchemy URL); LoadError when absent."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise LoadError(f"Optuna storage {storage}: no study named {study_name!r}") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    numbers, dists, models_with, states = {}, {}, {}, {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
        tune_id = t.user_attrs.get("tune_trial_id")
        if tune_id:
            numbers[str(tune_id)] = t.number
        model = t.params.get("model")
        for key, dist in t.distributions.items():
            dists.setdefault(key, dist)
            if model is not None:
                models_with.setdefault(key, set()).add(model)
    return OptunaInfo(numbers, dists, models_with, states.get("RUNNING", 0), states)


# ----------------------------------------------------------------------------------------------------------
# The tidy frame


def load_study(
    tracking_uri: str,
    study_name: str,
    optuna_storage: str | None = None,
    include_replications: bool = True,
    metrics: Iterable[str] | None = None,
    history_method: str = "auto",
) -> pd.DataFrame:
    """The tidy frame of one study: one row per trial run and evaluation step (see :mod:`analysis.tidy`).

    ``metrics``: the metric keys to fetch (default: every key any run logged). ``optuna_storage``
    adds ``optuna_trial`` and the search space (see the module docstring). Runs come in start
    order, steps ascending.
    """
    runs = find_study_runs(tracking_uri, study_name, include_replications)
    optuna_info = load_optuna(optuna_storage, study_name) if optuna_storage else None
    return tidy_from_runs(runs, optuna_info, metrics, history_method)


def tidy_from_runs(runs: StudyRuns, optuna_info: OptunaInfo | None = None, metrics: Iterable[str] | None = None,
                   history_method: str = "auto") -> pd.DataFrame:
    """The tidy frame of already-found runs (:func:`find_study_runs`)."""
    replication_of = {r.info.run_id: rid for rid, r in runs.replications.items()}
    trials = runs.trials
    keys = set(metrics) if metrics is not None else {k for r in trials for k in r.data.metrics}
    keys = [k for k in METRIC_COLUMNS if k in keys] + sorted(keys - set(METRIC_COLUMNS))  # the schema's order first

    # One record per run: ids, status, typed params.
    records, params = [], []
    for run in trials:
        tags = run.data.tags
        p = {k: parse_param(v) for k, v in run.data.params.items()}
        status, status_step = _status(run)
        seed = p.get("seed", tags.get(TAG_SEED))
        trial_id = tags.get(TAG_TRIAL_ID, run.info.run_name or run.info.run_id)
        records.append({
            "study": runs.study,
            "replication": replication_of.get(tags.get(TAG_PARENT)),
            "run_id": run.info.run_id,
            "trial_id": str(trial_id),
            "config_id": config_id({k: v for k, v in p.items() if k not in _NOT_HASHED}),
            "seed": int(seed) if seed is not None else -1,
            "model": str(p.get("model", tags.get(TAG_MODEL, "unknown"))),
            "status": status,
            "status_step": status_step,
            "task": str(p.get("task", "unknown")),
            "target_error": float(p["task.target_error"]) if isinstance(p.get("task.target_error"), int | float)
            else math.nan,
            "stop_at_error": _number(p.get("stop_at_error")),
            "stop_after_evals": _number(p.get("stop_after_evals")),
            "trial_name": tags.get(TAG_TRIAL_NAME),
            "optuna_trial": (optuna_info.trial_numbers.get(str(trial_id)) if optuna_info else None),
        })
        params.append(p)
    run_frame = pd.DataFrame(records, columns=[*[c for c in ID_COLUMNS if c != "step"], *EXTRA_COLUMNS])
    run_frame["optuna_trial"] = run_frame["optuna_trial"].astype("Int64")
    run_frame["seed"] = run_frame["seed"].astype("int64")
    run_frame["status_step"] = run_frame["status_step"].astype("float64")
    run_frame = pd.concat([run_frame, _param_frame(params, run_frame["model"], optuna_info)], axis=1)

    # Metrics: one long frame of points -> one row per (run, step).
    points = pd.DataFrame(columns=["run_id", "key", "step", "value", "timestamp"])
    if keys and len(run_frame):
        points = metric_histories(runs.tracking_uri, list(run_frame["run_id"]), keys, history_method)
    if len(points):
        # A resumed trial may have sent a step twice; the first point at a step wins (study.tracking).
        points = points.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
        points = points.drop_duplicates(["run_id", "key", "step"], keep="first")
        wide = points.pivot(index=["run_id", "step"], columns="key", values="value").reset_index()
        wide.columns.name = None
    else:
        wide = pd.DataFrame(columns=["run_id", "step"])
    # A run without any evaluation keeps one row at step 0 (so it is counted).
    missing = sorted(set(run_frame["run_id"]) - set(wide["run_id"]))
    if missing:
        wide = pd.concat([wide, pd.DataFrame({"run_id": missing, "step": 0})], ignore_index=True)
    for key in keys:
        if key not in wide.columns:
            wide[key] = np.nan
    wide["step"] = wide["step"].astype("int64")
    wide[keys] = wide[keys].astype("float64")

    order = {rid: i for i, rid in enumerate(run_frame["run_id"])}
    df = run_frame.merge(wide, on="run_id", how="left")
    df = df.assign(_order=df["run_id"].map(order)).sort_values(["_order", "step"], kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)
    front = [*ID_COLUMNS, *keys, *EXTRA_COLUMNS]
    df = df[front + [c for c in df.columns if c not in front]]
    return validate_tidy(df)


def _number(value: Any) -> float:
    """A param's value as a float; NaN for null, absent or not a number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _param_frame(params: list[dict], models: pd.Series, optuna_info: OptunaInfo | None) -> pd.DataFrame:
    """``param.<key>`` columns: the keys that vary across runs, and the searched ones (see the module docstring)."""
    searched = set(optuna_info.distributions) - {"model"} if optuna_info else set()
    keys = sorted({k for p in params for k in p} - set(_OWN_COLUMN) - set(_NOT_HASHED))
    columns = {}
    for key in keys:
        values = [p.get(key) for p in params]
        distinct = {json.dumps(v, sort_keys=True) for v in values if v is not None}
        if len(distinct) < 2 and key not in searched:
            continue
        if key in searched and optuna_info.models_with.get(key):
            applies = optuna_info.models_with[key]
            values = [v if m in applies else None for v, m in zip(values, models, strict=True)]
        columns[PARAM_PREFIX + key] = _typed_column(values)
    return pd.DataFrame(columns, index=models.index)


# ----------------------------------------------------------------------------------------------------------
# Export


def export(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the frame to ``path``: Parquet for ``.parquet``/``.pq``, CSV for ``.csv``; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".parquet", ".pq"):
        df.to_parquet(path, index=False)
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        raise LoadError(f"{path}: expected a .parquet or .csv file name, got suffix {suffix or '(none)'!r}")
    return path


def distributions(optuna_info: OptunaInfo | None) -> Mapping[str, Any] | None:
    """The searched keys' Optuna distributions (for :func:`analysis.sensitivity.hyperparameter_sensitivity`)."""
    return dict(optuna_info.distributions) if optuna_info else None


# ----------------------------------------------------------------------------------------------------------
# The search space as the study file wrote it


def space_from_search(search: Mapping[str, Any]) -> dict[str, Any]:
    """A study file's ``search`` mapping -> Optuna distributions keyed by dotted name, scale and order as written.

    ``{choices: [...]}`` -> CategoricalDistribution with the choices in the file's order (numeric
    choices keep that order: the analysis reads it, never the order of the values that survived);
    ``{low, high, log}`` -> IntDistribution when ``integer`` is true (or, without that key, when both
    bounds are integers), FloatDistribution otherwise, log scale exactly when ``log`` is true.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, entry in search.items():
        if not isinstance(entry, Mapping):
            raise LoadError(f"spec search.{key}: expected {{low, high, log}} or {{choices: [...]}}, got {entry!r}")
        if entry.get("choices") is not None:
            out[key] = CategoricalDistribution(list(entry["choices"]))
            continue
        low, high, log = entry.get("low"), entry.get("high"), bool(entry.get("log", False))
        if not isinstance(low, int | float) or not isinstance(high, int | float):
            raise LoadError(f"spec search.{key}: expected numeric low and high, got {low!r} and {high!r}")
        integer = entry.get("integer")
        if integer is None:
            integer = isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool)
        out[key] = (IntDistribution(int(low), int(high), log=log) if integer
                    else FloatDistribution(float(low), float(high), log=log))
    return out


def recorded_spec(runs: StudyRuns) -> dict[str, Any] | None:
    """The study as the sweep recorded it: the ``spec.json`` artifact of the study's parent run, parsed.

    None when the run has no such artifact (a study recorded without it) or the store cannot serve it.
    """
    from study.tracking import read_artifact_text

    try:
        text = read_artifact_text(runs.tracking_uri, runs.parent.info.run_id, SPEC_FILE)
    except Exception:  # no artifact, or a store that cannot serve it: the spec is then unknown
        return None
    spec = json.loads(text)
    return spec if isinstance(spec, dict) else None


def study_space(runs: StudyRuns, spec: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The search space of the study file, from its recorded spec (``spec``, else :func:`recorded_spec`).

    None when there is no recorded spec or it holds no ``search`` mapping; the caller then says the
    space was inferred.
    """
    spec = spec if spec is not None else recorded_spec(runs)
    search = spec.get("search") if isinstance(spec, Mapping) else None
    return space_from_search(search) if isinstance(search, Mapping) else None
