"""The sweep end to end on real components: a Ray cluster, Tune + ASHA, Optuna in SQLite, MLflow in SQLite.

One grid study (tests/studies/asha.yaml: six learning rates of a tiny LSTM, one of them diverging)
runs once for the module; each test reads one aspect of what it recorded. The entry point's refusals
(bad study files, an unreachable server, an existing study) run in a subprocess, where it is visible
that nothing, Ray included, was started.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow_server import free_port
from optuna.trial import TrialState

from study.record import STATUS_TO_RUN_STATUS, TAG_ATTEMPTS, TAG_PARENT, TAG_STATUS, TAG_STATUS_PREFIX, TAG_TRIAL_ID
from study.spec import load_spec
from study.state import STATE_BUNDLE, TUNER_COPY, TUNER_PKL, StateError, prepare_restore, repair_checkpoints, state_dir
from study.sweep import SweepError, SweepSummary, reconcile, run_sweep
from study.tracking import TrialTracker, prepare_experiment, start_study_run
from study.trainable import TrialContext, _recorded_end

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "tests" / "studies"
LRS = [3e-2, 1e-2, 3e37, 3e-3, 1e-3, 1e-4]  # tests/studies/asha.yaml
DIVERGING_LR = 3e37
EVAL_KEYS = {"sequences", "wall_time", "train_loss", "error", "cost_bits", "accuracy", "curriculum_error", "level",
             "gen2x_error", "gen2x_cost_bits", "gen2x_accuracy"}
FINAL_KEYS = {f"final_{k}" for k in ("error", "cost_bits", "accuracy", "gen2x_error", "gen2x_cost_bits",
                                     "gen2x_accuracy")}


@pytest.fixture(scope="module")
def asha(ray_cluster, study_file, record, tmp_path_factory):
    path = study_file("asha", tmp_path_factory.mktemp("asha"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_sweep(path)
    return path, summary, out.getvalue(), record(path)


@pytest.mark.slow
def test_optuna_records_how_each_trial_ended(asha):
    _, summary, _, rec = asha
    spec = rec.spec
    max_steps, every = spec.budget.max_steps, spec.budget.eval_every
    trials = rec.trials()
    assert sorted(t.params["lr"] for t in trials) == sorted(LRS)  # the grid, each point once
    statuses = Counter(t.user_attrs["status"] for t in trials)
    assert statuses["completed"] >= 1 and statuses["stopped_early"] >= 1 and statuses["diverged"] == 1
    assert sum(statuses.values()) == spec.budget.num_samples
    assert summary.counts == dict(statuses)

    rungs = {spec.budget.grace_period * 2**k for k in range(4)} - {max_steps}
    for t in trials:
        status, step = t.user_attrs["status"], t.user_attrs.get("status_step")
        if status == "completed":
            # COMPLETE only for a full-budget trial, its value the final evaluation
            assert t.state == TrialState.COMPLETE and step == max_steps
            assert t.value == t.intermediate_values[max_steps]
        elif status == "stopped_early":
            assert t.state == TrialState.PRUNED and step in rungs, (step, rungs)
            assert t.value == t.intermediate_values[step]  # Optuna gives a pruned trial its last intermediate value
        else:
            assert status == "diverged" and t.state == TrialState.FAIL and t.params["lr"] == DIVERGING_LR
            assert step == 2 and t.intermediate_values == {}  # loss inf at step 2, before any evaluation
            continue
        # intermediate values at the training steps of every evaluation up to the last one, the stopping one included
        assert sorted(t.intermediate_values) == list(range(every, step + 1, every))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert summary.best["value"] == best.value and summary.best["trial_id"] == best.user_attrs["tune_trial_id"]


@pytest.mark.slow
def test_mlflow_has_one_parent_run_and_one_child_run_per_trial(asha):
    path, _, _, rec = asha
    (parent,) = rec.parents()
    assert parent.info.status == "FINISHED"
    assert parent.data.params["budget.max_steps"] == "60" and parent.data.params["sampler"] == "grid"
    artifacts = {a.path for a in rec.client.list_artifacts(parent.info.run_id)}
    assert path.name in artifacts
    copy = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=path.name,
                                               tracking_uri=rec.spec.tracking_uri, dst_path=str(path.parent / "dl"))
    assert Path(copy).read_text() == path.read_text()

    trials = rec.by_tune_id()
    children = rec.children()
    assert sorted(r.data.tags[TAG_TRIAL_ID] for r in children) == sorted(trials)  # exactly one run per trial
    for run in children:
        t = trials[run.data.tags[TAG_TRIAL_ID]]
        tags, params = run.data.tags, run.data.params
        assert tags[TAG_PARENT] == parent.info.run_id and tags[TAG_ATTEMPTS] == "1"
        status = t.user_attrs["status"]
        assert tags[TAG_STATUS] == status and run.info.status == STATUS_TO_RUN_STATUS[status]
        assert tags[TAG_STATUS_PREFIX + "step"] == str(t.user_attrs["status_step"])
        assert float(params["lr"]) == t.params["lr"]
        assert (params["model"], params["model.hidden_size"], params["max_steps"], params["seed"]) == \
            ("lstm", "16", "60", "0")
        if status == "diverged":
            continue
        # the final evaluation: logged at the last step of a completed trial, and at the stop step of a trial ASHA
        # stopped (its thread runs it after the stop; Ray waits for the thread: study.sweep.with_thread_wait)
        assert set(run.data.metrics) == EVAL_KEYS | FINAL_KEYS, (status, sorted(run.data.metrics))
        for key in FINAL_KEYS:
            assert [s for s, _, _ in rec.history(run.info.run_id, key)] == [t.user_attrs["status_step"]]
        # one point per evaluation step, the same values Optuna holds
        history = rec.history(run.info.run_id, "error")
        assert [s for s, _, _ in history] == sorted(t.intermediate_values)
        for step, value, _ in history:
            assert math.isclose(value, t.intermediate_values[step], rel_tol=1e-6)
        for key in EVAL_KEYS:
            assert [s for s, _, _ in rec.history(run.info.run_id, key)] == sorted(t.intermediate_values)


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_and_the_sweep_goes_on(asha):
    _, summary, out, rec = asha
    (t,) = [t for t in rec.trials() if t.params["lr"] == DIVERGING_LR]
    (run,) = [r for r in rec.children() if r.data.tags[TAG_TRIAL_ID] == t.user_attrs["tune_trial_id"]]
    assert run.info.status == "FAILED" and run.data.tags[TAG_STATUS] == "diverged"
    assert run.data.tags[TAG_STATUS_PREFIX + "step"] == "2"
    assert run.data.tags[TAG_STATUS_PREFIX + "message"].startswith("diverged at step 2: loss is inf")
    # no evaluation before; the final evaluation of the weights of step 1 (the step-2 update was never applied)
    assert set(run.data.metrics) == FINAL_KEYS
    assert [s for s, _, _ in rec.history(run.info.run_id, "final_error")] == [2]
    assert t.state == TrialState.FAIL and t.user_attrs["status_step"] == 2
    # Tune's record: one result, the worst value, so ASHA ranks it last
    (result,) = rec.results()[t.user_attrs["tune_trial_id"]]
    assert result["trial_status"] == "diverged" and result["error"] == math.inf
    # the other trials ran on: every one finished, and the progress shows each
    assert sum(summary.counts.values()) == len(LRS)
    for tune_id, trial in rec.by_tune_id().items():
        assert f"{tune_id} {trial.user_attrs['status']}" in out


@pytest.mark.slow
def test_reports_say_where_and_from_which_step_each_attempt_ran(asha, ray_cluster):
    _, _, _, rec = asha
    head = ray_cluster.head_node.node_id
    for tune_id, rows in rec.results().items():
        assert {r["node_id"] for r in rows} == {head} and {r["start_step"] for r in rows} == {0}
        assert len({r["mlflow_run_id"] for r in rows}) == 1
        for r in rows:
            assert 0 <= r["train_cpu_s"] <= r["cpu_s"] <= r["process_cpu_s"], (tune_id, r)


@pytest.mark.slow
def test_an_existing_study_is_refused_without_resume_and_nothing_is_lost(asha, study_file, tmp_path):
    path, _, _, rec = asha
    before = ([(t.number, t.state, t.value, t.datetime_complete) for t in rec.trials()],
              sorted((r.info.run_id, r.info.status, r.info.end_time) for r in rec.children()),
              [(r.info.status, r.info.end_time) for r in rec.parents()],
              sorted(p.name for p in rec.exp_dir.iterdir()))
    with pytest.raises(SweepError) as info:
        run_sweep(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "--resume" in message
    after = ([(t.number, t.state, t.value, t.datetime_complete) for t in rec.trials()],
             sorted((r.info.run_id, r.info.status, r.info.end_time) for r in rec.children()),
             [(r.info.status, r.info.end_time) for r in rec.parents()],
             sorted(p.name for p in rec.exp_dir.iterdir()))
    assert after == before


DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from study.sweep import run_sweep
    out = []
    for path, resume in json.loads(sys.argv[1]):
        try:
            run_sweep(path, resume=resume)
            out.append({"path": path, "type": None})
        except Exception as err:
            out.append({"path": path, "type": type(err).__name__, "message": str(err)})
        out[-1]["ray"] = ray.is_initialized()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_bad_study_files_and_an_unreachable_server_launch_nothing(study_file, tmp_path, ray_env):
    good = study_file("asha", tmp_path / "good", fresh=True)
    text = (STUDIES / "asha.yaml").read_text() + "results_dir: RESULTS\n"
    cases = {}  # file -> (exception, words its one line must hold)

    def case(name: str, old: str, new: str, error: str, *words: str) -> None:
        assert old in text
        folder = tmp_path / name
        folder.mkdir()
        path = folder / f"{name}.yaml"
        path.write_text(text.replace(old, new).replace("RESULTS", str(folder / "results")))
        cases[str(path)] = (error, words)

    case("syntax", "models: [lstm]", "models: [lstm", "SpecError", "line")
    case("unknown_key", "concurrency: 2", "concurrency: 2\nbudgett: 3", "SpecError", "budgett", "a known key")
    case("bad_value", "reduction_factor: 2", "reduction_factor: 1", "SpecError", "budget.reduction_factor",
         "above 1")
    case("bad_model_key", "model.hidden_size: 16", "model.memory_size: 16", "SpecError", "fixed.model.memory_size")
    case("unreachable", "concurrency: 2", f"concurrency: 2\ntracking_uri: http://127.0.0.1:{free_port()}",
         "TrackingError", "unreachable", "http://127.0.0.1:")
    missing = tmp_path / "missing.yaml"
    cases[str(missing)] = ("SpecError", ("missing.yaml",))
    args = [[p, False] for p in cases] + [[str(good), True]]  # --resume of a study that never ran
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**ray_env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["path"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    for path, (error, words) in cases.items():
        r = results[path]
        assert r["type"] == error and not r["ray"], r
        assert "\n" not in r["message"] and Path(path).name in r["message"], r
        for word in words:
            assert word in r["message"], (word, r)
    resumed = results[str(good)]
    assert resumed["type"] == "SweepError" and "--resume" in resumed["message"] and not resumed["ray"]
    # nothing was written: no results folder (no Optuna or MLflow database, no Tune state)
    for path in [*cases, str(good)]:
        assert not (Path(path).parent / "results").exists(), path


# ------------------------------------------------------------------------------------------------ without Ray


@pytest.mark.slow
def test_reconcile_ends_runs_left_running_as_optuna_recorded_them(study_file, tmp_path, record):
    path = study_file("asha", tmp_path)
    spec = load_spec(path)
    uri = spec.tracking_uri
    experiment_id = prepare_experiment(uri, spec.name)
    parent = start_study_run(uri, experiment_id, spec.name, {"name": spec.name}, path)
    trackers = {tid: TrialTracker(uri, experiment_id, parent, tid, params={"lr": 0.01})
                for tid in ("stopped", "lost", "done")}
    # "stopped": its process wrote the status tag, then Ray ended it before the run was ended (seen in a sweep)
    trackers["stopped"].client.set_tag(trackers["stopped"].run_id, TAG_STATUS, "stopped_early")
    trackers["done"].set_status("completed", step=60)
    study = optuna.create_study(study_name=spec.name, storage=spec.storage)
    for tid in trackers:
        trial = study.ask()
        trial.set_user_attr("tune_trial_id", tid)
        if tid == "stopped":
            trial.set_user_attr("status", "stopped_early")
            trial.set_user_attr("status_step", 20)
            trial.report(2.5, 20)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif tid == "done":
            trial.set_user_attr("status", "completed")
            trial.set_user_attr("status_step", 60)
            study.tell(trial, 1.0)

    assert reconcile(spec, uri, parent, "lost: in a test") == {"optuna": 1, "mlflow": 2}
    runs = {r.data.tags[TAG_TRIAL_ID]: r for r in record(path).children()}
    stopped, lost, done = runs["stopped"], runs["lost"], runs["done"]
    assert (stopped.info.status, stopped.data.tags[TAG_STATUS], stopped.data.tags[TAG_STATUS_PREFIX + "step"]) == \
        ("FINISHED", "stopped_early", "20")
    assert (lost.info.status, lost.data.tags[TAG_STATUS]) == ("FAILED", "failed")
    assert lost.data.tags[TAG_STATUS_PREFIX + "message"] == "lost: in a test"
    assert (done.info.status, done.data.tags[TAG_STATUS]) == ("FINISHED", "completed")
    (orphan,) = [t for t in study.trials if t.user_attrs["tune_trial_id"] == "lost"]
    assert orphan.state == optuna.trial.TrialState.FAIL and orphan.user_attrs["status"] == "not_run"


def test_a_torn_tune_state_is_restored_from_the_copies_kept_outside_tunes_folder(tmp_path):
    exp = tmp_path / "ray" / "tune"
    exp.mkdir(parents=True)
    kept = Path(state_dir(exp))
    assert kept == tmp_path / "ray" / ".mannstudy" / "tune"  # beside Tune's folder, never inside what it copies
    assert state_dir("s3://bucket/study/ray/tune") == "s3://bucket/study/ray/.mannstudy/tune"
    state, searcher = "experiment_state-2026-01-01_00-00-00.json", "searcher-state-2026-01-01_00-00-00.pkl"
    complete = {state: b'{"trial_data": []}', searcher: pickle.dumps({"trials": 3})}
    kept.mkdir(parents=True)
    (kept / STATE_BUNDLE).write_bytes(pickle.dumps(complete))
    (kept / TUNER_COPY).write_bytes(pickle.dumps({"tuner": 1}))
    (exp / TUNER_PKL).write_bytes(b"")  # a kill while Tune copied its staging folder back
    (exp / state).write_text('{"trial_da')  # a kill mid-write
    (exp / searcher).write_bytes(complete[searcher][:5])
    later = exp / "experiment_state-2026-01-02_00-00-00.json"  # written after the newest complete save
    later.write_text('{"trial_data": [')
    later_searcher = exp / "searcher-state-2026-01-02_00-00-00.pkl"  # Tune would restore the searcher from it
    later_searcher.write_bytes(pickle.dumps({"trials": 5}))
    assert prepare_restore(exp, "study.yaml") is True
    for name, data in complete.items():
        assert (exp / name).read_bytes() == data
    assert pickle.loads((exp / TUNER_PKL).read_bytes()) == {"tuner": 1}
    for path in (later, later_searcher):
        assert not path.exists() and path.with_name(path.name + ".stale").exists()

    # no complete copy and a damaged state, or a damaged tuner.pkl and no copy: refused in one line (rather than
    # Tune starting the study over, or a traceback), naming what to do
    (kept / STATE_BUNDLE).unlink()
    (exp / state).write_text("{")
    for damaged in ("experiment state", "tuner.pkl"):
        with pytest.raises(StateError) as info:
            prepare_restore(exp, "study.yaml")
        message = str(info.value)
        assert "\n" not in message and "study.yaml: --resume" in message and "cannot be resumed" in message
        assert "another name or results_dir" in message and (state in message if damaged != "tuner.pkl" else
                                                             TUNER_PKL in message)
        (kept / TUNER_COPY).unlink(missing_ok=True)
        (exp / TUNER_PKL).write_bytes(b"\x80")
    # nothing saved by Tune yet (a kill during start-up): nothing to restore, the run starts afresh
    assert prepare_restore(tmp_path / "ray" / "other", "study.yaml") is False


def test_a_trial_whose_checkpoint_is_gone_resumes_from_its_newest_usable_one_or_restarts(tmp_path):
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    exp = tmp_path / "moved" / "tune"  # the results folder was moved: paths in the state still say /old/...
    trials = {}
    for name, folders in {"kept": ["checkpoint_000003"], "fallback": ["checkpoint_000000", "checkpoint_000001"],
                          "restart": ["checkpoint_000001"]}.items():
        manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
        results = [_TrainingResult(checkpoint=Checkpoint(path=f"/old/tune/trial_{name}/checkpoint_{index:06d}"),
                                   metrics={"step": index}) for index in ((2, 3) if name == "kept" else (1, 2))]
        manager._checkpoint_results, manager._latest_checkpoint_result = results, results[-1]  # as Tune keeps them
        metadata = _TrainingRunMetadata()
        metadata.checkpoint_manager = manager
        trials[name] = metadata.get_json_state()
        for folder in folders:
            (exp / f"trial_{name}" / folder).mkdir(parents=True)
            (exp / f"trial_{name}" / folder / "checkpoint.pt").write_bytes(b"weights")
            (exp / f"trial_{name}" / folder / ".metadata.json").write_text('{"step": 10}')
    (exp / "trial_fallback" / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"")  # an upload cut short
    (exp / "trial_restart" / "checkpoint_000001" / ".metadata.json").unlink()
    state = {"trial_data": [["{}", trials[name]] for name in trials]}
    assert repair_checkpoints(state, exp) == ["trial_kept", "trial_fallback", "trial_restart"]
    latest = {}
    for name, (_, metadata_json) in zip(trials, state["trial_data"], strict=True):
        manager = _TrainingRunMetadata.from_json_state(metadata_json).checkpoint_manager
        result = manager.latest_checkpoint_result
        latest[name] = result.checkpoint.path if result else None
        assert all(Path(exp, *Path(r.checkpoint.path).parts[-2:]).is_dir() for r in manager._checkpoint_results)
    assert latest == {"kept": "/old/tune/trial_kept/checkpoint_000003",
                      "fallback": "/old/tune/trial_fallback/checkpoint_000000", "restart": None}


def test_a_run_that_can_make_no_progress_ends_with_a_message():
    from ray.tune.experiment import Trial

    from study.state import NoProgress

    out = io.StringIO()
    stall = NoProgress(stall_s=0.0, stream=out)
    copy = pickle.loads(pickle.dumps(stall))  # Tune may hold its own copy as the stopper
    trials = [Trial("run_trial", stub=True) for _ in range(3)]
    trials[0].set_status(Trial.TERMINATED)
    trials[1].set_status(Trial.ERROR)  # e.g. failed to restore
    stall.on_step_end(0, trials)
    stall.on_step_end(1, trials)
    assert not stall.stop_all() and not copy.stop_all()  # one trial still pending: progress is possible
    trials[2].set_status(Trial.ERROR)
    stall.on_step_end(2, trials)
    stall.on_step_end(3, trials)
    assert stall.stop_all() and copy.stop_all()
    (message,) = out.getvalue().splitlines()
    assert message.startswith("no progress:") and "3 trials, 2 failed" in message


@pytest.mark.slow
def test_a_restored_attempt_finds_the_end_an_earlier_attempt_recorded(study_file, tmp_path):
    path = study_file("asha", tmp_path)
    spec = load_spec(path)
    uri = spec.tracking_uri
    experiment_id = prepare_experiment(uri, spec.name)
    parent = start_study_run(uri, experiment_id, spec.name, {"name": spec.name}, path)
    context = TrialContext(spec=spec, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent)
    ended = {"completed": 60, "stopped_early": 20, "diverged": 2}
    for status, step in [*ended.items(), ("failed", 30), ("running", None)]:
        tracker = TrialTracker(uri, experiment_id, parent, status, params={"lr": 0.01})
        for s in range(10, (step or 30) + 1, 10):
            tracker.log_metrics({"error": 3.0 - s / 100, "accuracy": s / 100}, s)
        if step is not None:
            tracker.set_status(status, step=step)
        tracker.close()
    for status, step in ended.items():
        run_id, result = _recorded_end(context, status)
        assert result["step"] == step and result["trial_status"] == status
        assert result["error"] == (math.inf if status == "diverged" else 3.0 - step / 100)  # the last point logged
    # a failed attempt is retried, a running one continues, a trial never seen starts: none of them has ended
    assert _recorded_end(context, "failed") is None and _recorded_end(context, "running") is None
    assert _recorded_end(context, "never") is None


def test_a_worker_process_is_prepared_once_with_the_collector_paused(tmp_path, monkeypatch):
    import gc

    from study import trainable

    monkeypatch.setattr(trainable, "_process_prepared", False)  # as in a fresh worker process
    before = gc.get_freeze_count()
    # a store that cannot be opened: the error propagates (the trial fails and is retried), the collector runs
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError):
        trainable._prepare_process(f"sqlite:///{tmp_path}/a-file/mlflow.db")
    # frozen objects that die leave the permanent generation, so the count may fall meanwhile, never rise
    assert gc.isenabled() and not trainable._process_prepared and gc.get_freeze_count() <= before
    try:
        trainable._prepare_process(f"sqlite:///{tmp_path}/mlflow.db")
        assert gc.isenabled() and trainable._process_prepared
        assert {"mann.train", "mlflow.store.tracking.sqlalchemy_store"} <= set(sys.modules)
        frozen = gc.get_freeze_count()
        assert frozen > before
        later = [[i] for i in range(1000)]  # a later trial's objects: not frozen with the process's
        trainable._prepare_process(f"sqlite:///{tmp_path}/mlflow.db")
        assert gc.get_freeze_count() <= frozen  # the 1001 later objects would raise it
        del later
    finally:
        gc.unfreeze()


def test_a_study_its_time_budget_ended_says_so_and_that_resume_cannot_extend_it():
    short = SweepSummary(counts={"completed": 10, "stopped_early": 5}, planned=24, time_budget_s=900.0)
    assert "ended the study after 15 of 24 trials" in short.line() and "--resume cannot extend it" in short.line()
    assert "time_budget" not in SweepSummary(counts={"completed": 24}, planned=24, time_budget_s=900.0).line()
    assert "time_budget" not in SweepSummary(counts={"completed": 15}, planned=24).line()


@pytest.mark.slow
def test_a_grid_study_restarted_without_tune_state_runs_each_point_and_seed_once(ray_cluster, study_file, tmp_path):
    from study import state
    from study.search import TruthfulOptunaSearch
    from study.spec import SEED_ATTR, grid_points, make_sampler
    from study.sweep import StudySpace, _optuna_storage, experiment_dir, public_spec

    path = study_file("asha", tmp_path, seeds=[0, 1], search={"lr": {"choices": [3.0e-2, 1.0e-2, 3.0e-3]}},
                      budget={"num_samples": 6, "max_steps": 20, "eval_every": 10, "early_stopping": False,
                              "grace_period": None})
    spec = load_spec(path)
    # What a driver killed during start-up leaves: the study begun, its grid queued in Optuna by the searcher,
    # one trial asked (its repeat with seed 1 queued), and no Tune state.
    state.mark_begun(experiment_dir(spec))
    searcher = TruthfulOptunaSearch(space=StudySpace(public_spec(spec)), metric="error", mode="min",
                                    sampler=make_sampler(spec), points_to_evaluate=grid_points(spec),
                                    storage=_optuna_storage(spec), study_name=spec.name)
    assert searcher.suggest("killed_0")["seed"] == 0

    summary = run_sweep(path, resume=True)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials(deepcopy=False)
    ran = Counter((t.params["lr"], t.user_attrs[SEED_ATTR]) for t in trials if t.user_attrs.get("status") != "not_run"
                  and t.state.is_finished())
    assert ran == Counter({(lr, seed): 1 for lr in (3.0e-2, 1.0e-2, 3.0e-3) for seed in (0, 1)}), ran
    assert not [t for t in trials if not t.state.is_finished()]  # nothing left queued or running
    assert summary.counts.get("completed") == 6


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA (a trial must fail)")
def test_a_trial_that_failed_after_its_retries_is_not_trained_again_by_resume(ray_cluster, study_file, tmp_path,
                                                                             record):
    # device cuda on a machine without it: that trial fails on every attempt; the cpu one completes
    path = study_file("asha", tmp_path, search={"device": {"choices": ["cpu", "cuda"]}},
                      budget={"num_samples": 2, "max_steps": 20, "eval_every": 10, "early_stopping": False,
                              "grace_period": None})
    rec = record(path)
    assert run_sweep(path).counts == {"completed": 1, "failed": 1}
    failed = {r.data.tags[TAG_TRIAL_ID]: r for r in rec.children() if r.data.tags[TAG_STATUS] == "failed"}
    (key, run), = failed.items()
    results = len(rec.results().get(key, []))

    summary = run_sweep(path, resume=True)
    assert summary.counts == {"completed": 1, "failed": 1}
    again = {r.data.tags[TAG_TRIAL_ID]: r for r in rec.children()}[key]
    assert again.data.tags[TAG_ATTEMPTS] == run.data.tags[TAG_ATTEMPTS] and again.info.status == "FAILED"
    assert len(rec.results().get(key, [])) == results
    (t,) = [t for t in rec.trials() if t.user_attrs["tune_trial_id"] == key]
    assert t.state == TrialState.FAIL and t.user_attrs["status"] == "failed"
