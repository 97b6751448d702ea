"""Faults during a sweep, with real components: a SIGKILLed driver, a lost Ray node, a restarted MLflow server.

Each test breaks something at a moment read from the stores themselves (the Optuna database,
Tune's result.json files, the MLflow server), then checks that the study finishes and that its
records are whole: every trial once, ended once, its curve complete and continued from a
checkpoint rather than from step 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import end_ray_folder, kill_group, processes_with_env
from mlflow_server import MlflowServer
from optuna.trial import TrialState
from ray.tune import Callback

from mann.train import END_METRICS
from study.record import STATUS_TO_RUN_STATUS, TAG_ATTEMPTS, TAG_STATUS, TAG_STATUS_PREFIX, TAG_STOP, TAG_TRIAL_ID
from study.state import STATE_BUNDLE, state_dir
from study.sweep import run_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None, poll_s: float = 0.1):
    """Poll ``condition()`` until it returns a truthy value; fail naming ``what`` (and the log) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"the driver exited ({process.returncode}) before {what}:\n{tail}")
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def steps_of(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


def assert_one_point_per_evaluation(rec, run, last_step: int) -> None:
    """One point per evaluation of each periodic metric; the final evaluation's (final_*, converged_step) once, at
    the end."""
    every = rec.spec.budget.eval_every
    for key in run.data.metrics:
        once = key.startswith(END_METRICS)
        expected = [last_step] if once else list(range(every, last_step + 1, every))
        assert [s for s, _, _ in rec.history(run.info.run_id, key)] == expected, key


# ------------------------------------------------------------------------------------------------ driver killed


def _mid_sweep(rec):
    """True once the Optuna study has a completed trial and a running one that has reported (so has a checkpoint).

    Read with sqlite3 in read-only mode: opening an Optuna RDBStorage writes its schema, and a second
    process doing that while the driver creates the database makes one of them fail.
    """
    db = Path(rec.spec.storage.removeprefix("sqlite:///"))
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            states = [row[0] for row in con.execute("SELECT state FROM trials")]
            reported = con.execute("SELECT COUNT(*) FROM trials t WHERE t.state = 'RUNNING' AND EXISTS "
                                   "(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)")
            return "COMPLETE" in states and reported.fetchone()[0] > 0
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return False


@pytest.mark.parametrize("interrupt", ["SIGKILL", "SIGINT"])  # a kill; Ctrl+C in the driver's terminal
def test_resume_after_the_driver_is_killed_finishes_the_study_without_rerunning_a_trial(
        ray_cluster, study_file, record, tmp_path, capfd, interrupt, sigint_reaches_children):
    path = study_file("resume", tmp_path)
    rec = record(path)
    spec = rec.spec
    # `mannstudy sweep` in its own session; it starts its own local Ray, in a private folder that marks every
    # process it starts.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = tmp_path / "driver.log"
    try:
        with open(log, "wb") as out:
            driver = subprocess.Popen([sys.executable, "-m", "study.cli", "sweep", str(path)], cwd=tmp_path, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)})
        code = None
        try:
            wait_until(lambda: _mid_sweep(rec), 300, "a completed trial and a running one", driver, log, 0.05)
            if interrupt == "SIGINT":
                os.killpg(driver.pid, signal.SIGINT)  # the driver's handlers run: it must leave the trials resumable
                code = driver.wait(timeout=120)
        finally:
            kill_group(driver.pid)  # SIGKILL: no handler runs, nothing is flushed
            driver.wait(timeout=30)
    finally:
        end_ray_folder(ray_tmp)  # Ray's processes that left the driver's group, then their folder
    assert not processes_with_env("RAY_TMPDIR", ray_tmp) and not Path(ray_tmp).exists()
    if interrupt == "SIGINT":
        assert code == 130 and "mannstudy: interrupted" in log.read_text(errors="replace"), code
        # No trial running at the interrupt was recorded as stopped (it would be ended for good, not resumed).
        # (a trial Optuna had just asked, not yet known to Tune, has no tune_trial_id and no run)
        running = {t.user_attrs.get("tune_trial_id") for t in rec.trials() if t.state == TrialState.RUNNING} - {None}
        statuses = {r.data.tags[TAG_TRIAL_ID]: r.data.tags.get(TAG_STATUS) for r in rec.children()}
        assert running and not {k: v for k, v in statuses.items() if k in running and v == "stopped_early"}, statuses

    # A kill often lands while Tune writes its state in place; make sure this run has a torn state file.
    state = max(rec.exp_dir.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert (Path(state_dir(rec.exp_dir)) / STATE_BUNDLE).is_file()

    before = {t.number: t for t in rec.trials()}
    attempts_before = {r.data.tags[TAG_TRIAL_ID]: r.data.tags[TAG_ATTEMPTS] for r in rec.children()}
    finished_before = {n: t for n, t in before.items() if t.state.is_finished()}
    assert any(t.state == TrialState.COMPLETE for t in finished_before.values())
    assert any(t.state == TrialState.RUNNING for t in before.values())

    capfd.readouterr()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_sweep(path, resume=True)
    captured = capfd.readouterr()
    output = log.read_text(errors="replace") + out.getvalue() + captured.out + captured.err
    assert "UpdateFinishedTrialError" not in output
    assert "Failed to restore the run state" not in output  # Tune would have started the study over

    after = rec.trials()
    assert all(t.state.is_finished() for t in after)  # nothing stuck RUNNING
    ran = [t for t in after if t.user_attrs["status"] != "not_run"]  # not_run: asked by the killed driver only
    assert len(ran) == spec.budget.num_samples
    assert sum(n for s, n in summary.counts.items() if s != "not_run") == spec.budget.num_samples
    for t in after:
        if t.number in finished_before:  # ended before the kill: its record did not change
            old = finished_before[t.number]
            assert (t.state, t.value, t.datetime_complete, t.user_attrs) == \
                (old.state, old.value, old.datetime_complete, old.user_attrs)
        if t.user_attrs["status"] == "completed":
            assert t.state == TrialState.COMPLETE and t.user_attrs["status_step"] == spec.budget.max_steps

    # No trial trained again. Results of the resumed sweep come from this session's head node (the killed
    # driver had its own Ray). A trial that had ended reports its recorded end once, without training
    # (start_step == step); one that had reported continues from one of its checkpoints, not from step 0.
    head = ray_cluster.head_node.node_id
    tune_ids = {t.user_attrs["tune_trial_id"]: t for t in after if "tune_trial_id" in t.user_attrs}
    for tune_id, rows in rec.results().items():
        t = tune_ids[tune_id]
        new = [r for r in rows if r["node_id"] == head]
        if not new:
            continue
        first = new[0]
        reported = sorted(before[t.number].intermediate_values) if t.number in before else []
        if t.number in finished_before or first["start_step"] == first["step"]:
            assert len(new) == 1 and first["start_step"] == first["step"] == t.user_attrs["status_step"], new
            if t.number in finished_before:
                assert attempts_before[tune_id] == "1"
        else:
            # the newest checkpoint in the restored state may precede the newest report, never the one before it
            assert first["start_step"] in [0, *reported] and (len(reported) < 2 or first["start_step"] > 0), \
                (first, reported)
            assert first["step"] == first["start_step"] + spec.budget.eval_every
        trained = [r["step"] for r in new]
        assert trained == sorted(set(trained)), trained

    # MLflow: exactly one child run per trial that ran, ended as Optuna says; no point logged twice
    runs = rec.children()
    ids = Counter(r.data.tags[TAG_TRIAL_ID] for r in runs)
    assert all(n == 1 for n in ids.values()), ids
    for run in runs:
        t = tune_ids[run.data.tags[TAG_TRIAL_ID]]
        status = t.user_attrs["status"]
        if status == "not_run":  # started by the killed driver, unknown to the restored Tune state
            assert run.data.tags[TAG_STATUS] == "failed" and run.info.status == "FAILED"
            continue
        assert run.data.tags[TAG_STATUS] == status and run.info.status == STATUS_TO_RUN_STATUS[status]
        if t.number in finished_before:
            assert run.data.tags[TAG_ATTEMPTS] == attempts_before[run.data.tags[TAG_TRIAL_ID]]
        assert_one_point_per_evaluation(rec, run, t.user_attrs["status_step"])
    assert {r.data.tags[TAG_TRIAL_ID] for r in runs} >= {t.user_attrs["tune_trial_id"] for t in ran}
    (parent,) = rec.parents()
    assert parent.info.status == "FINISHED"


class FailOnce(Callback):
    """An error in the driver's Tune loop at the ``after``-th trial result, once (``marker`` says it happened; a
    restored Tuner keeps its callbacks): Tune then stops every running trial as it tears the sweep down."""

    def __init__(self, marker: Path, after: int):
        self.marker, self.after, self.seen = str(marker), after, 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1
        if self.seen >= self.after and not Path(self.marker).exists():
            Path(self.marker).touch()
            raise RuntimeError("an error in the driver")


def test_an_error_in_the_driver_leaves_the_running_trials_resumable(ray_cluster, study_file, record, tmp_path):
    path = study_file("resume", tmp_path)
    rec = record(path)
    with pytest.raises(Exception):  # noqa: B017  (Tune wraps the callback's error in its own)
        run_sweep(path, callbacks=[FailOnce(tmp_path / "failed", after=5)])
    assert (tmp_path / "failed").is_file()

    # Tune stopped the running trials without a decision of the search: none ended, none has a final evaluation
    running = {t.user_attrs.get("tune_trial_id") for t in rec.trials() if t.state == TrialState.RUNNING} - {None}
    runs = {r.data.tags[TAG_TRIAL_ID]: r for r in rec.children()}
    torn = running & runs.keys()
    assert torn, (running, runs.keys())
    for key in torn:
        run = runs[key]
        assert run.info.status == "RUNNING" and run.data.tags[TAG_STATUS] == "running", run.data.tags
        assert TAG_STOP not in run.data.tags and not [k for k in run.data.metrics if k.startswith(END_METRICS)]

    summary = run_sweep(path, resume=True)
    assert sum(n for s, n in summary.counts.items() if s != "not_run") == rec.spec.budget.num_samples
    trials = rec.by_tune_id()
    assert all(t.state.is_finished() for t in trials.values())
    for key, run in {r.data.tags[TAG_TRIAL_ID]: r for r in rec.children()}.items():
        status = trials[key].user_attrs["status"]
        if key in torn:  # continued from its checkpoint to an end of its own
            assert status in ("completed", "stopped_early"), (key, status)
        assert run.data.tags[TAG_STATUS] == status
        if status == "stopped_early":  # only ASHA stops a trial here, and said so first
            assert run.data.tags[TAG_STOP] == run.data.tags[TAG_STATUS_PREFIX + "by"] == "scheduler"
        if status in ("completed", "stopped_early"):
            assert_one_point_per_evaluation(rec, run, trials[key].user_attrs["status_step"])


def test_a_spent_time_budget_ends_the_running_trials_with_their_final_evaluation(ray_cluster, study_file, record,
                                                                                tmp_path):
    # trials that cannot finish within the budget, and no early stopping: the budget ends every trial
    path = study_file("resume", tmp_path, budget={"num_samples": 3, "max_steps": 1_000_000, "early_stopping": False,
                                                  "grace_period": None, "time_budget_s": 20})
    rec = record(path)
    summary = run_sweep(path)
    assert "time_budget_s" in summary.line()
    (parent,) = rec.parents()
    assert parent.data.tags[TAG_STOP] == "time_budget" and parent.info.status == "FINISHED"
    runs = rec.children()
    assert runs
    trials = rec.by_tune_id()
    for run in runs:
        t = trials[run.data.tags[TAG_TRIAL_ID]]
        assert run.data.tags[TAG_STATUS] == t.user_attrs["status"] == "stopped_early" and t.state == TrialState.PRUNED
        assert run.info.status == "FINISHED" and run.data.tags[TAG_STATUS_PREFIX + "by"] == "time_budget"
        assert "(the time budget)" in run.data.tags["mlflow.note.content"]
        assert {k for k in run.data.metrics if k.startswith("final_")}, run.data.metrics  # its final evaluation


# ------------------------------------------------------------------------------------------------ node lost


def reported_steps(rec) -> dict[str, int]:
    """Tune trial id -> the last step the driver has recorded for it, read from the Optuna database (written as
    each result arrives; the results folder's result.json files are copies that lag behind)."""
    db = Path(rec.spec.storage.removeprefix("sqlite:///"))
    query = ("SELECT a.value_json, MAX(v.step) FROM trial_user_attributes a JOIN trial_intermediate_values v "
             "ON a.trial_id = v.trial_id WHERE a.key = 'tune_trial_id' GROUP BY a.trial_id")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return {json.loads(tune_id): int(step) for tune_id, step in con.execute(query)}
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return {}


class NodeKiller(threading.Thread):
    """Removes ``node`` (no graceful shutdown) once a trial running on it has reported ``min_step`` and
    has at least ``margin`` steps to go; records that trial and the last step it had reported."""

    def __init__(self, cluster, node, rec, min_step: int, margin: int):
        super().__init__(daemon=True)
        self.cluster, self.node, self.rec = cluster, node, rec
        self.min_step, self.margin = min_step, margin
        self.victim: tuple[str, int] | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        max_steps = self.rec.spec.budget.max_steps
        try:
            while not self.done.is_set():
                on_node = {t for t, rows in self.rec.results().items() if rows[-1]["node_id"] == self.node.node_id}
                for tune_id, step in reported_steps(self.rec).items():
                    if tune_id in on_node and self.min_step <= step <= max_steps - self.margin:
                        self.cluster.remove_node(self.node, allow_graceful=False)
                        self.victim = (tune_id, step)
                        return
                time.sleep(0.05)
        except BaseException as err:  # reported by the test
            self.error = err


def test_a_lost_node_retries_its_trials_from_their_checkpoints(ray_cluster, study_file, record, tmp_path):
    # Longer trials than the other fifo studies: removing a node takes a moment, and the trial on it must
    # still be running when its processes die.
    path = study_file("fifo", tmp_path, name="nodes", concurrency=3, budget={"max_steps": 150})
    rec = record(path)
    spec = rec.spec
    # head: 2 CPUs, worker: 1 CPU; three trials at once fill both nodes
    worker = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    killer = NodeKiller(ray_cluster, worker, rec, min_step=2 * spec.budget.eval_every, margin=100)
    killer.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run_sweep(path)
    finally:
        killer.done.set()
        killer.join(timeout=60)
        if worker in ray_cluster.worker_nodes:
            ray_cluster.remove_node(worker, allow_graceful=False)
    assert killer.error is None, killer.error
    assert killer.victim is not None, "no trial on the worker node reached the step at which to remove it"
    victim, lost_at = killer.victim

    assert summary.counts == {"completed": spec.budget.num_samples}
    assert all(t.state == TrialState.COMPLETE for t in rec.trials())
    # The retry ran on the surviving node and continued from a checkpoint the lost node had written, not from
    # step 0. (Rows of the first attempt may be missing: on a retry Tune rewrites the driver's result.json from
    # the copy in the results folder, which its background sync may not have refreshed yet.)
    head = ray_cluster.head_node.node_id
    rows = rec.results()[victim]
    retried = [r for r in rows if r["start_step"] > 0]
    assert retried, f"trial {victim} finished on the lost node before its processes died: {steps_of(rows)}"
    assert {r["node_id"] for r in retried} == {head}, rows
    assert {r["node_id"] for r in rows if r["start_step"] == 0} <= {worker.node_id}
    restart = retried[0]["start_step"]
    # (Tune registers a reported checkpoint a moment after the result, so it may be the one before lost_at.)
    assert lost_at - spec.budget.eval_every <= restart < spec.budget.max_steps and restart % spec.budget.eval_every == 0
    assert steps_of(retried) == list(range(restart + spec.budget.eval_every, spec.budget.max_steps + 1,
                                           spec.budget.eval_every))
    assert retried[-1]["trial_status"] == "completed"
    for tune_id, other in rec.results().items():
        if tune_id != victim:
            assert {r["start_step"] for r in other} == {0}  # no other trial needed a retry

    runs = {r.data.tags[TAG_TRIAL_ID]: r for r in rec.children()}
    assert sorted(runs) == sorted(rec.results())  # one run per trial
    for tune_id, run in runs.items():
        assert run.data.tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        assert run.data.tags[TAG_ATTEMPTS] == ("2" if tune_id == victim else "1")
        assert_one_point_per_evaluation(rec, run, spec.budget.max_steps)


# ------------------------------------------------------------------------------------------------ tracking server


class ServerRestarter(threading.Thread):
    """Stops the MLflow server once some trial has logged ``min_points`` evaluations, waits ``down_s``,
    starts it again on the same port and backend; records when it went down and when it was back."""

    def __init__(self, server: MlflowServer, rec, min_points: int, down_s: float):
        super().__init__(daemon=True)
        self.server, self.rec, self.min_points, self.down_s = server, rec, min_points, down_s
        self.down_at = self.up_at = None
        self.done = threading.Event()
        self.error: BaseException | None = None

    def logged_enough(self) -> bool:
        with contextlib.suppress(Exception):  # the experiment or its runs may not exist yet
            return any(len(self.rec.history(r.info.run_id, "error")) >= self.min_points for r in self.rec.children())
        return False

    def run(self) -> None:
        try:
            while not self.done.is_set() and not self.logged_enough():
                time.sleep(0.2)
            if self.done.is_set():
                return
            self.down_at = time.time()
            self.server.stop()
            time.sleep(self.down_s)
            self.server.start()
            self.up_at = time.time()
        except BaseException as err:
            self.error = err


def test_tracking_server_restart_mid_sweep_loses_no_metric_point(ray_cluster, study_file, record, tmp_path,
                                                                 mlflow_template):
    backend = Path(shutil.copy(mlflow_template, tmp_path / "server.db"))
    server = MlflowServer(tmp_path / "mlflow", backend_uri=f"sqlite:///{backend}").start()
    try:
        path = study_file("fifo", tmp_path, fresh=True, name="remote", tracking_uri=server.url)
        rec = record(path)
        spec = rec.spec
        restarter = ServerRestarter(server, rec, min_points=2, down_s=2.0)
        restarter.start()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                summary = run_sweep(path)
            finished_at = time.time()
        finally:
            restarter.done.set()
            restarter.join(timeout=120)
        assert restarter.error is None, restarter.error
        assert restarter.up_at is not None and restarter.up_at < finished_at, "the server was not restarted mid-sweep"

        assert summary.counts == {"completed": spec.budget.num_samples}
        runs = rec.children()
        assert len(runs) == spec.budget.num_samples
        logged_while_down = 0
        for run in runs:
            assert run.data.tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
            assert run.data.tags[TAG_STATUS_PREFIX + "step"] == str(spec.budget.max_steps)
            assert_one_point_per_evaluation(rec, run, spec.budget.max_steps)  # every point of every key, once
            history = rec.history(run.info.run_id, "error")
            logged_while_down += sum(restarter.down_at * 1000 <= ts <= restarter.up_at * 1000 for _, _, ts in history)
        assert logged_while_down > 0  # points made while the server was down were buffered and sent later
        (parent,) = rec.parents()
        assert parent.info.status == "FINISHED"
    finally:
        server.stop()
