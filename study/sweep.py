"""``mannstudy sweep FILE``: one study = one Ray Tune run (OptunaSearch + ASHA), tracked in MLflow.

Results layout (``spec.results_dir``; local by default, shared storage on a cluster)::

    <results_dir>/mlflow.db       MLflow tracking store (default; an http URI on a cluster)
    <results_dir>/mlartifacts/    MLflow artifacts (study file, spec, reports)
    <results_dir>/optuna.db       the Optuna study (default; PostgreSQL on a cluster)
    <results_dir>/ray/tune/       Tune's experiment state and trial checkpoints (what --resume reads)
    <results_dir>/ray/.mannstudy/ what --resume puts back before Tune reads its state (study/state.py)

``results_dir`` may be a URI (``s3://bucket/prefix``): Tune's folders and ``.mannstudy`` are then in the
bucket, read and written through pyarrow; the databases cannot be (the study names ``storage`` and
``tracking_uri``), and the MLflow artifacts go where the tracking server puts them.

Every ask/tell happens here, in the driver (one writer), so SQLite serves a local study.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mann.config import to_dict
from study.redact import keep_secret, recall_secret, redact
from study.spec import StudySpec, define_by_run, grid_points, load_spec, make_sampler, params_key, planned_runs

# isort: off
from study.ray_env import PENDING_ENV, PENDING_GIVEN  # before ray: sets Ray's environment
from ray.tune import Callback
from ray.tune.logger import JsonLoggerCallback
from ray.tune.stopper import TimeoutStopper
# isort: on

EXPERIMENT_NAME = "tune"  # Tune's experiment folder under <results_dir>/ray
MAX_FAILURES = 2  # retries per trial (a lost node, a crash), each from the trial's last checkpoint


class SweepError(RuntimeError):
    """A sweep that cannot start (one line, exit code 2) — nothing recorded is touched."""


@dataclass
class SweepSummary:
    """What a finished sweep did, by trial status."""

    counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # params and value of the best completed trial
    experiment_dir: str = ""
    parent_run_id: str = ""
    planned: int = 0  # budget.num_samples
    time_budget_s: float | None = None  # budget.time_budget_s

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        best = f"; best {self.best['value']:.4g} ({self.best['trial_id']})" if self.best else ""
        return f"trials: {counts or 'none'}{best}{self._short()}"

    def _short(self) -> str:
        """Why fewer trials than planned ran, when the study's time budget is the reason. Tune keeps what is
        left of that budget in its state, so a ``--resume`` of a study whose budget ran out runs nothing more."""
        ran = sum(self.counts.values())
        if self.time_budget_s is None or ran >= self.planned:
            return ""
        return (f"; budget.time_budget_s ({self.time_budget_s:g} s) ended the study after {ran} of "
                f"{self.planned} trials, and a --resume cannot extend it (a new results_dir starts over)")


@dataclass(frozen=True)
class StudySpace:
    """The study's define-by-run space as a picklable object: Tune pickles the searcher with its space."""

    spec: StudySpec

    def __call__(self, trial):
        return define_by_run(self.spec)(trial)


def experiment_dir(spec: StudySpec, name: str | None = None) -> str:
    """Tune's experiment folder: a local path, or a URI (``s3://bucket/…``) when ``results_dir`` is one.

    ``name``: a grid's (a replication's) folder beside the search's; default the search's."""
    return posixpath.join(spec.results_dir, "ray", name or EXPERIMENT_NAME)


def _optuna_storage(spec: StudySpec):
    """The study's Optuna storage; pickled (into Tune's state by the searcher) without a password in its URL."""
    from study.search import StudyStorage

    if spec.storage.startswith("sqlite:///"):
        Path(spec.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return StudyStorage(spec.storage)


def public_spec(spec: StudySpec) -> StudySpec:
    """``spec`` with the passwords of its connection strings masked: what Tune may pickle into results_dir (the
    searcher's space, the progress callback, the trials' context; none of them connects with these URLs)."""
    return replace(spec, storage=redact(spec.storage), tracking_uri=redact(spec.tracking_uri))


def _existing_trials(spec: StudySpec) -> int:
    """Trials the study already has in its Optuna storage (a SQLite file that does not exist has none:
    it is not created here, so a sweep refused later leaves nothing behind)."""
    import optuna

    if spec.storage.startswith("sqlite:///") and not Path(spec.storage.removeprefix("sqlite:///")).is_file():
        return 0
    try:
        return len(optuna.load_study(study_name=spec.name, storage=_optuna_storage(spec)).trials)
    except KeyError:
        return 0


def with_thread_wait(trainable):
    """The Tune class of function trainable ``trainable`` whose ``cleanup`` waits for the training thread to end,
    up to ``study.trainable.THREAD_END_TIMEOUT_S``.

    A trial that Tune stops runs its final evaluation in that thread after Ray raised ``SystemExit`` there
    (study/trainable.py). Where the worker is reused, ``FunctionTrainable.reset_config`` waits for the thread
    (``TUNE_FUNCTION_THREAD_TIMEOUT_S``, which the trainable sets); where it is not (the last trials of a sweep,
    an errored trial), Tune calls ``stop``, whose ``FunctionTrainable.cleanup`` ends the session with
    ``session.finish(timeout=0)`` and the worker process exits, killing the thread (a daemon) mid-evaluation.
    This relies on Ray's internals (ray 2.x, ray/tune/trainable/function_trainable.py): ``wrap_function``
    builds the class, and ``ray.train._internal.session.get_session()`` holds the ``training_thread``; Tune
    itself waits up to ``TUNE_FORCE_TRIAL_CLEANUP_S`` (600 s) for ``stop`` before it kills a worker.
    """
    from ray.train._internal.session import get_session
    from ray.tune.trainable.function_trainable import wrap_function

    from study.trainable import THREAD_END_TIMEOUT_S

    base = wrap_function(trainable)

    class ThreadWait(base):
        def cleanup(self):
            session = get_session()
            thread = session.training_thread if session is not None and session.training_started else None
            try:
                super().cleanup()  # tells the thread to stop (SystemExit at its report), does not wait
            finally:
                if thread is not None:
                    thread.join(timeout=THREAD_END_TIMEOUT_S)

    ThreadWait.__name__ = ThreadWait.__qualname__ = base._name  # Tune names trials and the registry entry by it
    return ThreadWait


class TimeBudget(TimeoutStopper):
    """Tune's stopper for ``budget.time_budget_s`` that, when the budget is spent, first records on the study run
    that the budget ends the trials Tune is about to stop (``tracking.record_stop``): each of them then ends with
    its final evaluation as ``stopped_early``, where a trial stopped for any other reason stays resumable.
    The tracking URI is kept in its redacted form (Tune pickles its stoppers)."""

    def __init__(self, seconds: float, tracking_uri: str, parent_run_id: str):
        super().__init__(seconds)
        self.tracking_uri, self.parent_run_id = keep_secret(tracking_uri), parent_run_id
        self.recorded = False

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent and not self.recorded:
            from study.tracking import record_stop

            record_stop(recall_secret(self.tracking_uri), self.parent_run_id, "time_budget")
            self.recorded = True
        return spent


def make_tuner(spec: StudySpec, context, resume: bool, callbacks: Sequence[Callback] = (),
               grid: Sequence[dict] | None = None, name: str | None = None):
    """A new Tuner for the study, or the restored one for ``--resume``.

    ``callbacks``: extra Tune callbacks for a new sweep (bench/sweep.py times trials with one); a
    restored Tuner keeps the callbacks it was created with (Tuner.restore takes none).
    ``grid``: run exactly these points instead of searching (:func:`study.trainable.run_point` documents
    a point): one trial each, no searcher, no scheduler (no early stopping, no time budget), in the
    experiment folder ``name`` (:func:`experiment_dir`). The trainable, callbacks and kept state are the
    search's.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from study import state
    from study.search import TruthfulOptunaSearch
    from study.trainable import POINT, point_dirname, run_point, run_trial

    trainable = with_thread_wait(tune.with_resources(
        tune.with_parameters(run_trial if grid is None else run_point, context=context),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    ))
    exp_dir = experiment_dir(spec, name)
    if resume and state.prepare_restore(exp_dir, str(spec.source)):
        keep_secret(spec.storage)  # the restored searcher's storage, pickled without its password, gets it here
        # A searched trial that failed after its retries has ended: Optuna's FAIL cannot be undone, so training it
        # again would leave the two records disagreeing. A grid's failed pair is tried again (its run is its record).
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=grid is not None)

    if grid is not None:
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.concurrency, reuse_actors=True,
                                      trial_dirname_creator=point_dirname)
        return _new_tuner(spec, trainable, exp_dir, tune_config, callbacks, {POINT: tune.grid_search(list(grid))})
    metric, mode = spec.objective.metric, spec.objective.mode
    # Ray enqueues points_to_evaluate every time it sets up the study: a new search over a study that a killed
    # driver began (--resume without Tune state) queues only the grid points that are not queued or run yet.
    searcher = TruthfulOptunaSearch(
        space=StudySpace(public_spec(spec)), metric=metric, mode=mode, sampler=make_sampler(spec),
        points_to_evaluate=_grid_to_queue(spec) if spec.sampler == "grid" else None,
        storage=_optuna_storage(spec), study_name=spec.name, tracking_uri=spec.tracking_uri,
        grid=[(p, seed) for p in grid_points(spec) for seed in spec.seeds]
        if spec.sampler == "grid" and spec.seeds != "trial" else None,
    )
    if spec.budget.early_stopping:
        # time_attr "step": ASHA's rungs are training steps, whatever the evaluation interval.
        scheduler = ASHAScheduler(
            time_attr="step", max_t=spec.budget.max_steps,
            grace_period=spec.budget.grace_period, reduction_factor=spec.budget.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
        num_samples=spec.budget.num_samples, max_concurrent_trials=spec.concurrency,
        reuse_actors=True,  # no process start + torch import per trial (about 3x faster for 8 short trials)
    )
    budget = None
    if spec.budget.time_budget_s:
        budget = TimeBudget(spec.budget.time_budget_s, spec.tracking_uri, context.parent_run_id)
    return _new_tuner(spec, trainable, exp_dir, tune_config, callbacks, stop=budget)


def _grid_to_queue(spec: StudySpec) -> list[dict]:
    """The grid points of a ``sampler: grid`` study that its Optuna study has not queued or run yet (all of them
    for a new study)."""
    points = grid_points(spec)
    if not _existing_trials(spec):
        return points
    import optuna

    first_seed = spec.seeds[0] if spec.seeds != "trial" else None
    planned = planned_runs(optuna.load_study(study_name=spec.name, storage=_optuna_storage(spec)), first_seed)
    return [p for p in points if (params_key(p), first_seed) not in planned]


def _new_tuner(spec: StudySpec, trainable, exp_dir: str, tune_config, callbacks: Sequence[Callback],
               param_space: dict | None = None, stop=None):
    """A new Tuner writing to ``exp_dir``, with the callbacks every study has, and a copy of its tuner.pkl kept.
    ``stop``: a Tune stopper besides the one every study has (:class:`study.state.NoProgress`)."""
    from ray import tune
    from ray.tune.stopper import CombinedStopper

    from study import state

    stall = state.NoProgress()
    run_config = tune.RunConfig(
        name=posixpath.basename(exp_dir), storage_path=posixpath.dirname(exp_dir),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2), stop=CombinedStopper(stall, stop) if stop else stall,
        callbacks=[ProgressCallback(public_spec(spec)), JsonLoggerCallback(), state.StateBackupCallback(exp_dir), stall,
                   *callbacks],
        verbose=0,
    )
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    state.keep_tuner_copy(exp_dir)
    return tuner


class ProgressCallback(Callback):
    """One line per finished trial: counts by status and the best completed trial so far.

    The counts and the best trial are part of Tune's saved state (``get_state``), so a resumed run goes on
    counting where the saved state left off; the clock starts again with each driver.
    """

    def __init__(self, spec: StudySpec, stream=None):
        self.spec = spec
        self.stream = stream  # None: sys.stdout at each print (Tune pickles callbacks; a captured stdout is not)
        self.counts: dict[str, int] = {}
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()

    def _emit(self, trials, trial, status: str, step: int | None) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        running = sum(1 for t in trials if t.status == "RUNNING")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        best = f" | best {self.best[0]:.4g} ({self.best[1]})" if self.best else ""
        at = f" at step {step}" if step is not None else ""
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.0f}s] {trial.trial_id} {status}{at} | running {running}, {counts}{best}",
              file=self.stream or sys.stdout, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("trial_status") or "stopped_early"
        if status == "running":
            status = "stopped_early"
        value = result.get(self.spec.objective.metric)
        if status == "completed" and value is not None:
            better = self.best is None or (value < self.best[0] if self.spec.objective.mode == "min"
                                           else value > self.best[0])
            if better:
                self.best = (float(value), trial.trial_id)
        self._emit(trials, trial, status, result.get("step"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._emit(trials, trial, "failed", (trial.last_result or {}).get("step"))

    def get_state(self) -> dict:
        return {"counts": dict(self.counts), "best": self.best}

    def set_state(self, state: dict) -> None:
        self.counts, self.best = dict(state["counts"]), state["best"]

    def __setstate__(self, state: dict) -> None:  # unpickled by a new driver: its own clock
        self.__dict__.update(state)
        self.started = time.monotonic()


def reconcile(spec: StudySpec, tracking_uri: str, parent_run_id: str, reason: str,
              lost: bool = True, searched: bool = True) -> dict[str, int]:
    """Make MLflow and Optuna, the record of what has ended, agree; return how many of each were fixed.

    ``lost`` (after the Tuner returned, or before a run started afresh: nothing runs):
    - An Optuna trial still RUNNING whose MLflow run recorded an end (the driver died before the searcher
      was told) is told that end. Any other was asked by a driver that died before its trial could end, or
      before Tune recorded it: FAIL with status ``not_run``.
    - An MLflow child run still RUNNING (status tag ``running``, or a status tag written but the run not
      ended): its process ended before it could record its status (Ray ends a stopped trial's process
      without waiting for the training thread when no other trial reuses it; a lost node; a driver crash).
      The Optuna record says how the trial ended when the searcher was told (``stopped_early``,
      ``completed``, ``diverged``, ``failed``, with its step); otherwise the run is ``failed`` with ``reason``.
    Not ``lost`` (before a restore, when restored trials are about to run): only runs whose trial Optuna
    records as ended get that end, so that the restored trial finds it and does not train again.
    Not ``searched`` (a grid: no Optuna study): the run's own status tag is the record; a run that wrote
    its end but was not ended gets that end, any other still RUNNING is ``failed`` with ``reason`` when ``lost``.
    """
    from study.record import TAG_STATUS, TAG_STATUS_PREFIX, TAG_TRIAL_ID
    from study.tracking import end_trial_run, get_run, trial_runs
    from study.trainable import ENDED

    parent = get_run(tracking_uri, parent_run_id)
    children = trial_runs(tracking_uri, parent.info.experiment_id, parent_run_id)
    runs = {}  # trial id -> its run (the oldest, the one TrialTracker attaches to)
    for run in sorted(children, key=lambda r: (r.info.start_time, r.info.run_id), reverse=True):
        runs[run.data.tags.get(TAG_TRIAL_ID)] = run
    fixed = {"optuna": 0, "mlflow": 0}
    verdicts = {}  # trial id -> {status, status_step} as recorded
    if searched:
        verdicts = _optuna_verdicts(spec, runs, reason, lost, fixed)
    else:
        for trial_id, run in runs.items():
            recorded, step = run.data.tags.get(TAG_STATUS), run.data.tags.get(TAG_STATUS_PREFIX + "step", 0)
            if recorded in ENDED:
                verdicts[trial_id] = {"status": recorded, "status_step": step}
    for run in runs.values():
        if run.info.status != "RUNNING":
            continue
        verdict = verdicts.get(run.data.tags.get(TAG_TRIAL_ID))
        if verdict is None and not lost:
            continue
        status = (verdict or {}).get("status", "failed")
        details = {"step": verdict["status_step"]} if verdict and "status_step" in verdict else {}
        if status == "failed":
            details["message"] = reason
        end_trial_run(tracking_uri, run.info.run_id, status, details)
        fixed["mlflow"] += 1
    return fixed


def _optuna_verdicts(spec: StudySpec, runs: dict, reason: str, lost: bool, fixed: dict[str, int]) -> dict[str, dict]:
    """reconcile's Optuna side: tell Optuna the ends only MLflow recorded and fail what was lost (when ``lost``,
    counted in ``fixed``); return trial id -> the user attributes of each trial Optuna records as ended."""
    import optuna

    from study.record import STATUS_TO_RUN_STATUS, TAG_STATUS, TAG_STATUS_PREFIX
    from study.search import fail_running_trials, tell_recorded_end
    from study.trainable import ENDED

    study = optuna.load_study(study_name=spec.name, storage=_optuna_storage(spec))
    if lost:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            run = runs.get(t.user_attrs.get("tune_trial_id"))
            recorded = run.data.tags.get(TAG_STATUS) if run is not None else None
            if recorded in ENDED:
                step = int(run.data.tags.get(TAG_STATUS_PREFIX + "step", 0))
                tell_recorded_end(study, t.number, recorded, step, run.data.metrics.get(spec.objective.metric))
                fixed["optuna"] += 1
        fixed["optuna"] += len(fail_running_trials(study, reason))
    return {t.user_attrs["tune_trial_id"]: t.user_attrs for t in study.get_trials(deepcopy=False)
            if "tune_trial_id" in t.user_attrs and t.user_attrs.get("status") in STATUS_TO_RUN_STATUS}


def summarize(spec: StudySpec) -> SweepSummary:
    """Counts by status and the best completed trial, from the Optuna study (the searcher's record)."""
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=_optuna_storage(spec))
    summary = SweepSummary(experiment_dir=str(experiment_dir(spec)), planned=spec.budget.num_samples,
                           time_budget_s=spec.budget.time_budget_s)
    best = None
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status", t.state.name.lower())
        summary.counts[status] = summary.counts.get(status, 0) + 1
        if t.state == optuna.trial.TrialState.COMPLETE:
            better = best is None or (t.value < best.value if spec.objective.mode == "min" else t.value > best.value)
            if better:
                best = t
    if best is not None:
        summary.best = {"value": best.value, "params": best.params,
                        "trial_id": best.user_attrs.get("tune_trial_id", str(best.number))}
    return summary


REAPER_MARK = "MANNSTUDY_RAY_OF"  # in the environment of every process of a local Ray a driver started
_reaper: dict[str, Any] = {}  # the reaper of this process's local Ray: its process and its mark


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Use this process's Ray if it has one, else start a local one (``address`` None) or join ``address``.

    Returns True when this call connected (the caller then calls :func:`disconnect_ray` when done). A local
    Ray's processes carry a mark in their environment, and a reaper process (``study.reaper``) ends them
    once this process has gone, however it went: Ray's agents outlive a SIGKILLed driver otherwise.
    """
    import subprocess
    import uuid

    import ray

    if ray.is_initialized():
        return False
    # A driver started by `ray job submit` or a KubeRay RayJob is told its cluster in RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or None
    # WARNING: Ray's and Tune's INFO lines ("Started a local Ray instance", "Wrote the latest version of all
    # result files") stay out of the terminal; the sweep prints its own progress.
    if address is None:
        mark = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if k != REAPER_MARK}
        reaper = subprocess.Popen([sys.executable, "-m", "study.reaper", REAPER_MARK, mark], stdin=subprocess.PIPE,
                                  env=env, start_new_session=True)
        _reaper.update(process=reaper, mark=mark)
        os.environ[REAPER_MARK] = mark
        # Ray turns on token authentication for a new local instance and says so in a WARNING line each time:
        # the setting stays as Ray chooses it, the line stays out of the terminal.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return True


def pending_trials(spec: StudySpec, cluster_resources: dict[str, float]) -> int:
    """How many trials Tune keeps pending (asked, waiting for resources): the study's concurrency.

    The autoscaler adds nodes for the pending trials it sees, so with one pending trial a cluster grows
    one node at a time; with ``concurrency`` of them it adds what the study needs at once. No more:
    a trial asked but never started is an orphan if the driver dies (reconcile() marks it not_run).
    Without a concurrency: as many as the cluster's present resources hold (at least 1).
    """
    if spec.concurrency is not None:
        return spec.concurrency
    fits = [cluster_resources.get("CPU", 0) / spec.resources.cpu]
    if spec.resources.gpu:
        fits.append(cluster_resources.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(min(fits) + 1e-9))


def unshared_record(spec: StudySpec, nodes: Sequence[dict], driver_node_id: str, cwd: Path | None = None) -> str | None:
    """Why this study's record would be split across machines (one line), or None.

    ``nodes``: ``ray.nodes()``; ``driver_node_id``: the node of this process. Trials evidently run on
    other machines when the alive nodes have more than one address, or when the driver's node cannot
    hold one trial (a head with ``CPU: 0``: its workers are yet to be added by the autoscaler). Then
    a SQLite tracking store, or the local folder ``results/<name>`` that a study falls back to when
    neither it nor the cluster's environment names one, is on the driver's machine only: the trials'
    runs and checkpoints would land on whichever node ran them. (A SQLite Optuna storage is fine: only
    the driver uses it.)
    """
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    hosts = {n.get("NodeManagerAddress") for n in alive}
    driver = next((n for n in alive if n.get("NodeID") == driver_node_id), None)
    held = (driver or {}).get("Resources", {})
    fits = held.get("CPU", 0) >= spec.resources.cpu and held.get("GPU", 0) >= spec.resources.gpu
    if len(hosts) > 1:
        why = f"{len(hosts)} machines"
    elif driver is not None and not fits:
        why = "this node has no room for a trial, so they run on nodes yet to join"
    else:
        return None
    fallback = str(((cwd or Path.cwd()) / "results" / spec.name).resolve())
    if spec.tracking_uri.startswith("sqlite:"):
        what = f"tracking_uri is a SQLite file on this machine ({spec.tracking_uri})"
    elif spec.results_dir == fallback:
        what = f"results_dir fell back to a folder on this machine ({spec.results_dir})"
    else:
        return None
    return (f"the Ray cluster runs trials on other machines ({why}) but {what}: set MLFLOW_TRACKING_URI, "
            "MANNSTUDY_STORAGE and MANNSTUDY_RESULTS_DIR in the cluster's environment or ~/mannstudy.env "
            "(docs/cluster.md), or name shared ones in the study file")


def disconnect_ray() -> None:
    """Shut down the Ray :func:`connect_ray` started or joined; the reaper then ends what a local one left."""
    import ray

    ray.shutdown()
    os.environ.pop(REAPER_MARK, None)
    reaper = _reaper.pop("process", None)
    _reaper.pop("mark", None)
    if reaper is not None:
        reaper.stdin.close()  # its signal: this process is done with Ray
        with contextlib.suppress(Exception):
            reaper.wait(timeout=30)


def run_sweep(path: str | os.PathLike, address: str | None = None, resume: bool = False,
              num_cpus: int | None = None, callbacks: Sequence[Callback] = ()) -> SweepSummary:
    """Run (or ``resume``) the study in ``path`` to the end; return its summary.

    ``address``: None starts a local Ray (or uses one this process already started, or joins
    ``$RAY_ADDRESS``); ``auto`` or ``host:port`` joins a cluster. Raises SpecError / SweepError /
    TrackingError (one line) before any trial starts when the study file, the results folder or the
    tracking server is wrong; then nothing was written (no Optuna study, no MLflow run, no Ray started).
    On a cluster whose trials run on other machines, a record those machines cannot share is refused
    once Ray is joined (:func:`unshared_record`), before anything is written. An already-initialized Ray
    (e.g. a test cluster) is used as it is and left running. ``callbacks``: extra Tune callbacks (new sweeps only).
    """
    from study import state, tracking
    from study.record import TAG_RESULTS_DIR

    spec = load_spec(path)
    exp_dir = experiment_dir(spec)
    begun = state.has_begun(exp_dir) or state.has_tune_state(exp_dir)
    if resume and not begun:
        raise SweepError(f"{path}: --resume: no sweep state in {exp_dir} (run without --resume to start the study)")
    if resume and callbacks:
        raise SweepError(f"{path}: --resume: a restored sweep keeps its own callbacks")
    uri = spec.tracking_uri
    try:
        tracking.check_reachable(uri)  # before anything is written, Optuna included
    except tracking.TrackingError as err:
        raise tracking.TrackingError(f"{path}: tracking_uri: {err}") from None
    if not resume and (begun or _existing_trials(spec)):
        raise SweepError(
            f"{path}: study {spec.name!r} already has results in {spec.results_dir} "
            "(use --resume to finish it, or give the study another name / results_dir)"
        )

    def make(context):
        tuner = make_tuner(spec, context, resume, callbacks)
        print(f"sweep {spec.name}: {spec.budget.num_samples} trials of {', '.join(spec.models)} on {spec.task}; "
              f"MLflow {redact(uri)} (parent run {context.parent_run_id})", flush=True)
        return tuner

    def start_run(experiment_id: str) -> str:
        return tracking.start_study_run(uri, experiment_id, spec.name, _spec_dict(spec), Path(path),
                                        extra_tags={TAG_RESULTS_DIR: spec.results_dir})

    def outcome(parent: str):
        summary = summarize(spec)
        summary.parent_run_id = parent
        return summary, summary.counts, summary.best["value"] if summary.best else None

    return run_job(spec, str(path), exp_dir, resume, start_run, make, outcome, address=address, num_cpus=num_cpus,
                   lost_reason="lost: the trial did not finish in this sweep (driver or node lost)")


def run_job(spec: StudySpec, source: str, exp_dir: str, resume: bool, start_run: Callable[[str], str],
            make: Callable[[Any], Any], outcome: Callable[[str], tuple[Any, dict[str, int], float | None]], *,
            address: str | None = None, num_cpus: int | None = None, searched: bool = True,
            lost_reason: str = "lost: the trial did not finish in this run"):
    """The driver of one run of the sweep machinery: a search (:func:`run_sweep`) or a fixed grid
    (:func:`study.replicate.run_replication`), once its caller has checked the request. Returns ``outcome``'s
    first value.

    In order: mann's kernels built on this machine; Ray joined (or started: ``address``, ``num_cpus``); a record
    the trials' machines cannot share refused (:func:`unshared_record`) before anything is written; the run marked
    begun (a new one); the MLflow experiment and the parent run (``start_run(experiment_id)`` -> its id); the
    trials' context; a searched study's ends only Optuna recorded given to their runs before a restore; the
    Tuner (``make(context)``) run to its end; :func:`reconcile` (``searched``: with Optuna; else each run's own
    status tag is the record; ``lost_reason`` for what was lost); ``outcome(parent)`` -> (result, counts by
    status, best objective), logged on the parent run, which is then FINISHED. When the driver stops before that,
    the parent run is KILLED (Ctrl+C) or FAILED and the error propagates; ``--resume`` reopens it.
    """
    import ray

    from mann import native
    from study import state, tracking
    from study.trainable import TrialContext

    started = time.monotonic()
    uri = spec.tracking_uri
    # Build mann/csrc's kernels on this machine now (~35 s, once), not in the first trials' workers: a local
    # run's workers then only load them. Cluster nodes build theirs in cluster.yaml's setup_commands.
    native.prepare()
    started_ray = connect_ray(address, num_cpus)
    try:
        problem = unshared_record(spec, ray.nodes(), ray.get_runtime_context().get_node_id())
        if problem:
            raise SweepError(f"{source}: {problem}")
        if not resume:
            state.mark_begun(exp_dir)  # before anything is recorded: a --resume can finish what follows
        experiment_id = tracking.prepare_experiment(uri, spec.name, Path(spec.results_dir) / "mlartifacts"
                                                    if "://" not in spec.results_dir else None)
        parent = start_run(experiment_id)
    except BaseException:
        if started_ray:
            disconnect_ray()
        raise
    try:
        context = TrialContext(spec=public_spec(spec), tracking_uri=uri, experiment_id=experiment_id,
                               parent_run_id=parent, threads=max(1, int(spec.resources.cpu)))
        os.environ[PENDING_ENV] = PENDING_GIVEN or str(pending_trials(spec, ray.cluster_resources()))
        if resume and searched and _existing_trials(spec):
            # A restore runs trials Tune's state left running: first give their runs the ends Optuna recorded.
            # With no Tune state the study starts afresh and nothing recorded runs any more. (A grid's trials
            # find their runs' ends themselves, by run key.)
            reconcile(spec, uri, parent, "lost: the driver stopped before Tune saved its state",
                      lost=not state.has_tune_state(exp_dir))
        make(context).fit()
        reconcile(spec, uri, parent, lost_reason, searched=searched)
        result, counts, best = outcome(parent)
        tracking.log_study_summary(uri, parent, counts, time.monotonic() - started, spec.objective.metric, best)
        tracking.finish_study_run(uri, parent, "FINISHED")
        return result
    except BaseException as err:
        # The parent run says the driver stopped (--resume reopens it); the error itself propagates.
        with contextlib.suppress(Exception):
            tracking.finish_study_run(uri, parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                                      timeout_s=5.0)
        raise
    finally:
        if started_ray:
            disconnect_ray()


def _spec_dict(spec: StudySpec) -> dict[str, Any]:
    data = to_dict(spec)
    data["search"] = {p.key: {k: v for k, v in to_dict(p).items() if k != "key"} for p in spec.search}
    return data


def cli_sweep(path: str, address: str | None, resume: bool) -> int:
    summary = run_sweep(path, address=address, resume=resume)
    print(f"done: {summary.line()}")
    spec = load_spec(path)
    if spec.tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {redact(spec.tracking_uri)}")
    else:
        print(f"MLflow UI: mannstudy ui {spec.results_dir}")
    return 0
