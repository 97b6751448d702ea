"""analysis.load against a real SQLite MLflow store (and a real ``mlflow server``) filled by study.tracking itself.

The study: NTM, DNC and LSTM trials with every status, a replication of the best NTM configuration
under two fresh seeds, and an Optuna record of the search (the search space and the Tune trial ids).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow_server import MlflowServer

import analysis.load as load
import study.tracking as tracking
from analysis.load import LoadError, export, load_study, parse_param
from analysis.tidy import config_id, param_columns, validate_tidy
from mann.train import config_to_flat_dict, make_train_config
from study.replicate import ReplicaConfig, start_replication_run
from study.spec import load_spec
from study.tracking import TrialTracker, finish_study_run, prepare_experiment, resolve_tracking_uri, start_study_run

NAME = "loadtest"
STUDY_YAML = """\
name: loadtest
models: [ntm, dnc, lstm]
task: copy
fixed: {batch_size: 4, task.bits: 3}
model_fixed: {ntm: {model.memory_size: 8}, dnc: {model.memory_size: 8}}
search:
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  model.controller_size: {choices: [8, 16], models: [ntm]}
budget: {num_samples: 6, max_steps: 20, eval_every: 10, early_stopping: false}
"""
FIXED = {"batch_size": 4, "task.bits": 3, "max_steps": 20, "eval_every": 10}


def _flat(model: str, seed: int, **overrides) -> dict:
    extra = {} if model == "lstm" else {"model.memory_size": 8}
    return config_to_flat_dict(make_train_config(model, "copy", {**FIXED, **extra, **overrides, "seed": seed}))


def _trial(uri, exp, parent, trial_id, params, evals, status=None, status_step=None):
    """One trial run through TrialTracker: metrics at each (step, error), then its status (None: still running)."""
    with TrialTracker(uri, exp, parent, trial_id, params=params, tags={"mannstudy.trial_name": f"run_trial_{trial_id}"},
                      flush_every=100) as tracker:
        for step, error in evals:
            tracker.log_metrics({"error": error, "accuracy": 1.0 / (1.0 + error), "train_loss": error / 10}, step)
        if status is not None:
            tracker.set_status(status, step=status_step if status_step is not None else (evals[-1][0] if evals else 0))
    return tracker.run_id


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    results = tmp_path_factory.mktemp("load") / "results"
    results.mkdir()
    study_file = results.parent / "loadtest.yaml"
    study_file.write_text(STUDY_YAML + f"results_dir: {results}\n")
    uri = resolve_tracking_uri(None, results)
    exp = prepare_experiment(uri, NAME)
    parent = start_study_run(uri, exp, NAME, {"name": NAME}, study_file)

    best = dict(lr=1e-3, **{"model.controller_size": 8})
    runs = {
        "t0": _trial(uri, exp, parent, "t0", _flat("ntm", 0, **best), [(10, 3.0), (20, 1.0)], "completed"),
        "t1": _trial(uri, exp, parent, "t1", _flat("ntm", 0, lr=3e-3, **{"model.controller_size": 16}),
                     [(10, 4.0)], "stopped_early"),
        "t2": _trial(uri, exp, parent, "t2", _flat("lstm", 0, lr=1e-2), [(10, 5.0)], "diverged", 15),
        "t3": _trial(uri, exp, parent, "t3", _flat("lstm", 0, lr=2e-3), [], "failed", 0),
        "t4": _trial(uri, exp, parent, "t4", _flat("ntm", 1, **best), [(10, 2.0)]),  # still running
        "t5": _trial(uri, exp, parent, "t5", _flat("dnc", 0, lr=1e-3), [(10, 2.5), (20, 0.5)], "completed"),
    }
    # A resumed trial that sent step 20 again, later and with another value: the first point must win.
    client = mlflow.MlflowClient(uri)
    client.log_batch(runs["t0"], metrics=[Metric("error", 99.0, int(time.time() * 1000) + 10_000, 20)],
                     synchronous=True)

    spec = load_spec(study_file)
    configs = [ReplicaConfig("c0", {"model": "ntm", **best}, "optuna trial 0")]
    rep_parent = start_replication_run(uri, exp, spec, parent, "rep-test", configs, [5, 6])
    for seed, final in ((5, 0.2), (6, 0.6)):
        runs[f"r{seed}"] = _trial(uri, exp, rep_parent, f"r{seed}", _flat("ntm", seed, **best),
                                  [(10, 2.0), (20, final)], "completed")
    finish_study_run(uri, rep_parent)
    finish_study_run(uri, parent)

    storage = f"sqlite:///{results / 'optuna.db'}"
    ostudy = optuna.create_study(study_name=NAME, storage=storage)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    model = optuna.distributions.CategoricalDistribution(["ntm", "dnc", "lstm"])
    size = optuna.distributions.CategoricalDistribution([8, 16])
    for number, (tid, params, state, value) in enumerate([
        ("t0", {"model": "ntm", "lr": 1e-3, "model.controller_size": 8}, "COMPLETE", 1.0),
        ("t1", {"model": "ntm", "lr": 3e-3, "model.controller_size": 16}, "PRUNED", None),
        ("t2", {"model": "lstm", "lr": 1e-2}, "FAIL", None),
        ("t3", {"model": "lstm", "lr": 2e-3}, "FAIL", None),
        ("t4", {"model": "ntm", "lr": 1e-3, "model.controller_size": 8}, "RUNNING", None),
        ("t5", {"model": "dnc", "lr": 1e-3}, "COMPLETE", 0.5),
    ]):
        dists = {"model": model, "lr": lr, **({"model.controller_size": size} if "model.controller_size" in params
                                               else {})}
        ostudy.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=value, state=optuna.trial.TrialState[state],
            user_attrs={"tune_trial_id": tid},
        ))
        assert ostudy.trials[-1].number == number
    return {"uri": uri, "runs": runs, "results": results, "storage": storage, "study_file": study_file}


@pytest.fixture(scope="module")
def frame(study):
    return load_study(study["uri"], NAME, optuna_storage=study["storage"])


def _run(df: pd.DataFrame, run_id: str) -> pd.DataFrame:
    return df[df["run_id"] == run_id]


def test_one_row_per_run_and_evaluation_step_with_statuses(study, frame):
    validate_tidy(frame, ["error", "accuracy", "train_loss"])
    runs = study["runs"]
    assert frame["run_id"].nunique() == len(runs) == 8
    assert not frame.duplicated(["run_id", "step"]).any()
    expected = {"t0": ("completed", [10, 20]), "t1": ("stopped_early", [10]), "t2": ("diverged", [10]),
                "t3": ("failed", [0]), "t4": ("running", [10]), "t5": ("completed", [10, 20]),
                "r5": ("completed", [10, 20]), "r6": ("completed", [10, 20])}
    for tid, (status, steps) in expected.items():
        rows = _run(frame, runs[tid])
        assert list(rows["step"]) == steps, tid
        assert set(rows["status"]) == {status}, tid
        assert set(rows["trial_id"]) == {tid}
        assert set(rows["trial_name"]) == {f"run_trial_{tid}"}
    # status_step: where the status was reached; NaN for completed and running runs (the schema)
    step_of = frame.groupby("run_id")["status_step"].first()
    assert step_of[runs["t1"]] == 10 and step_of[runs["t2"]] == 15 and step_of[runs["t3"]] == 0
    assert math.isnan(step_of[runs["t0"]]) and math.isnan(step_of[runs["t4"]])
    # a run that never evaluated is one row of NaN metrics, so it is counted
    failed = _run(frame, runs["t3"])
    assert len(failed) == 1 and failed[["error", "accuracy", "train_loss"]].isna().all().all()


def test_metric_values_are_the_logged_ones_and_the_first_point_at_a_step_wins(study, frame):
    t0 = _run(frame, study["runs"]["t0"]).set_index("step")
    assert t0.loc[10, "error"] == 3.0 and t0.loc[20, "error"] == 1.0  # not the 99.0 sent later at step 20
    assert t0.loc[20, "accuracy"] == pytest.approx(0.5)
    assert t0.loc[20, "train_loss"] == pytest.approx(0.1)
    assert frame["error"].dtype == np.float64


def test_ids_seeds_models_and_extra_columns(study, frame):
    runs = study["runs"]
    by_run = frame.groupby("run_id").first()
    assert by_run.loc[runs["t4"], "seed"] == 1 and by_run.loc[runs["r6"], "seed"] == 6
    assert frame["seed"].dtype == np.int64
    assert by_run.loc[runs["t5"], "model"] == "dnc" and by_run.loc[runs["t2"], "model"] == "lstm"
    assert set(frame["study"]) == {NAME}
    assert set(frame["task"]) == {"copy"}
    assert set(frame["target_error"]) == {0.1}
    assert by_run.loc[runs["t5"], "optuna_trial"] == 5 and by_run.loc[runs["t0"], "optuna_trial"] == 0
    assert pd.isna(by_run.loc[runs["r5"], "optuna_trial"])  # a replication run is no Optuna trial


def test_replications_are_labelled_share_the_config_id_and_can_be_left_out(study, frame):
    runs = study["runs"]
    by_run = frame.groupby("run_id").first()
    assert by_run.loc[runs["r5"], "replication"] == "rep-test"
    assert frame.loc[frame["run_id"] == runs["t0"], "replication"].isna().all()
    # one configuration over seeds: the search run, its repeat and both replication runs share the id
    same = {by_run.loc[runs[t], "config_id"] for t in ("t0", "t4", "r5", "r6")}
    assert len(same) == 1 and same != {by_run.loc[runs["t1"], "config_id"]}
    search_only = load_study(study["uri"], NAME, include_replications=False)
    assert set(search_only["run_id"]) == {runs[t] for t in ("t0", "t1", "t2", "t3", "t4", "t5")}
    assert search_only["replication"].isna().all()


def test_params_are_typed_and_only_the_varying_or_searched_keys_become_columns(study, frame):
    params = param_columns(frame)
    assert "param.lr" in params and frame["param.lr"].dtype == np.float64
    assert "param.model.controller_size" in params
    # constants of the whole study stay out (batch size, evaluation seed); model/seed/task have own columns
    for absent in ("param.batch_size", "param.eval_seed", "param.model", "param.seed", "param.task",
                   "param.checkpoint_dir", "param.task.bits"):
        assert absent not in frame.columns
    by_run = frame.groupby("run_id").first()
    runs = study["runs"]
    assert by_run.loc[runs["t1"], "param.model.controller_size"] == 16
    # searched for ntm only (Optuna): DNC's controller_size (its own default) does not apply to it
    assert pd.isna(by_run.loc[runs["t5"], "param.model.controller_size"])
    assert pd.isna(by_run.loc[runs["t2"], "param.model.controller_size"])  # LSTM has no such field
    # without the Optuna record the DNC's value is simply one more value of a varying key
    plain = load_study(study["uri"], NAME).groupby("run_id").first()
    assert plain.loc[runs["t5"], "param.model.controller_size"] == 128
    assert str(frame["param.model.controller_size"].dtype) == "Int64"


def test_config_id_ignores_the_seed_and_hashes_every_param(study, frame):
    # MLflow holds strings as they are and everything else as JSON (study.tracking): read back, then hashed
    flat = _flat("ntm", 0, lr=1e-3, **{"model.controller_size": 8})
    logged = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}
    expected = config_id({k: parse_param(v) for k, v in logged.items() if k not in ("seed", "checkpoint_dir")})
    assert frame.loc[frame["run_id"] == study["runs"]["t0"], "config_id"].iloc[0] == expected


def test_paging_and_per_run_histories_give_the_same_frame(study, frame, monkeypatch):
    monkeypatch.setattr(tracking, "PAGE_SIZE", 3)  # 8 trial runs: three pages of search_runs
    monkeypatch.setattr(tracking, "SQL_CHUNK", 2)  # and bulk queries of two runs
    paged = load_study(study["uri"], NAME, optuna_storage=study["storage"])
    pd.testing.assert_frame_equal(paged, frame)
    per_run = load_study(study["uri"], NAME, optuna_storage=study["storage"], history_method="per_run")
    pd.testing.assert_frame_equal(per_run, frame)


def test_metrics_argument_fetches_only_those_keys(study):
    df = load_study(study["uri"], NAME, metrics=["error"])
    assert "error" in df.columns and "accuracy" not in df.columns and "train_loss" not in df.columns


def test_export_round_trips_through_parquet_and_csv(frame, tmp_path):
    back = pd.read_parquet(export(frame, tmp_path / "tidy.parquet"))
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    csv = pd.read_csv(export(frame, tmp_path / "sub" / "tidy.csv"))
    assert list(csv.columns) == list(frame.columns) and len(csv) == len(frame)
    with pytest.raises(LoadError, match=r"tidy\.xlsx: expected a \.parquet or \.csv"):
        export(frame, tmp_path / "tidy.xlsx")


def test_unknown_study_and_storage_are_one_line_errors(study):
    with pytest.raises(LoadError, match="no experiment named 'nope'") as err:
        load_study(study["uri"], "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(LoadError, match="no study named 'loadtest'"):
        load_study(study["uri"], NAME, optuna_storage=f"sqlite:///{study['results'] / 'other.db'}")
    with pytest.raises(LoadError, match="history_method"):
        load_study(study["uri"], NAME, history_method="fast")


def test_parse_param_reads_json_and_keeps_other_strings():
    assert parse_param("64") == 64 and parse_param("0.001") == 0.001 and parse_param("true") is True
    assert parse_param("null") is None and parse_param("adam") == "adam"
    assert parse_param("[2.0, 4.0]") == "[2.0, 4.0]"


@pytest.mark.slow
def test_a_tracking_server_gives_the_same_frame_through_its_bulk_endpoint(study, frame, tmp_path):
    db = Path(shutil.copy(study["results"] / "mlflow.db", tmp_path / "mlflow.db"))
    with MlflowServer(tmp_path / "server", backend_uri=f"sqlite:///{db}") as server:
        remote = load_study(server.url, NAME, optuna_storage=study["storage"])
        pd.testing.assert_frame_equal(remote, frame)
        # the public endpoint (a server that refuses the UI's) and the per-run path agree too
        client = mlflow.MlflowClient(server.url)
        store = tracking._store(client)
        ids = list(frame["run_id"].unique())
        ui = sorted(tracking._ui_bulk(client, store, ids, "error"))
        assert ui == sorted(tracking._interval_bulk(client, store, ids, "error"))
        per_run = load.metric_histories(server.url, ids, ["error"], "per_run")
        assert len(per_run) == len(ui)


def test_the_search_space_comes_from_the_study_file_as_the_sweep_records_it(study, tmp_path):
    """spec.json on the study run, written as study.sweep writes it: log scale, bounds, and choices in the file's
    order; a study run recorded without a search space gives None."""
    from study.sweep import _spec_dict

    spec = load_spec(study["study_file"])
    uri = resolve_tracking_uri(None, tmp_path)
    exp = prepare_experiment(uri, "spaced")
    start_study_run(uri, exp, "spaced", _spec_dict(spec), study["study_file"])
    space = load.study_space(load.find_study_runs(uri, "spaced"))
    assert space == {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.controller_size": optuna.distributions.CategoricalDistribution([8, 16]),
    }
    assert load.study_space(load.find_study_runs(study["uri"], NAME)) is None
    reversed_choices = load.space_from_search({"k": {"choices": [64, 16, 32]}, "n": {"low": 1, "high": 4}})
    assert reversed_choices["k"].choices == (64, 16, 32)
    assert reversed_choices["n"] == optuna.distributions.IntDistribution(1, 4)
    with pytest.raises(LoadError, match=r"spec search\.x: expected numeric low and high"):
        load.space_from_search({"x": {"low": "a", "high": 2}})
