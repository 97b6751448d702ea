"""The Tune function trainable: one trial = one ``mann.train.fit`` run, reported and checkpointed.

Each evaluation of ``fit`` becomes one ``ray.tune.report`` (ASHA decides on it) with a checkpoint,
and one batch of metrics for the trial's MLflow child run. A trial that Ray retries (a lost node,
a crash) or resumes (``mannstudy sweep --resume``) starts from its last checkpoint and attaches to
the same MLflow run.

How the trial ended is decided here, where it is known, and written both to MLflow
(``TrialTracker.set_status``) and into the last report (``trial_status``, read by
:class:`study.search.TruthfulOptunaSearch`):

- ``fit`` completes (its budget spent, or converged under ``stop_at_error``: ``converged_step`` is
  logged): the last evaluation, which carries the final evaluation's ``final_*`` metrics, is logged
  and reported with ``trial_status=completed``.
- ``fit`` returns ``diverged``: the final evaluation's ``final_*`` (of the weights of the last step
  taken, when they are finite) are logged at the divergence step; a final report with the
  objective at its worst value (so ASHA ranks it last) and ``trial_status=diverged``.
- Tune stops the trial inside ``tune.report``: Ray raises ``SystemExit`` in the training thread.
  When the search decided the stop (ASHA, or the study's time budget: the driver tags the trial's run or
  the study run first, ``record.TAG_STOP``), ``on_eval`` catches it and asks ``fit`` to stop, so ``fit``
  runs its final evaluation of the current weights; its ``final_*`` metrics are logged at the last
  reported step, the trial is recorded ``stopped_early`` there, and the thread then ends with
  ``SystemExit`` as Ray asked (no further report). Ray waits for that thread before it reuses the
  worker or ends it: ``THREAD_END_TIMEOUT_S``, and :func:`study.sweep.with_thread_wait`. The analysis
  censors the trial at that step; its final error is that of weights trained to that step. Without
  that tag Tune is tearing the sweep down (an error in the driver): the trial records no end, its run
  stays RUNNING, and a ``--resume`` continues it from its checkpoint (a grid trial is never stopped
  early, so every stop of one is of this kind).
- any exception: ``failed`` with the message, then re-raised so Tune's FailureConfig retries it.

A trial ends once. Tune saves its experiment state after the searcher was told a trial ended, so a
driver killed in between leaves a state in which that trial still runs, and ``--resume`` restarts it
from its last checkpoint, or from the start when it had none. Every attempt therefore first
reads the trial's MLflow run: when an earlier attempt recorded ``completed``, ``stopped_early`` or
``diverged`` there (the status is written before the final report; ``--resume`` copies onto the run
an end only Optuna recorded, study/state.py), it reports that end again and returns without training
or touching the run. (An attempt restored from the final checkpoint whose run holds no status, e.g. after a
tracking outage, trains no step either: ``fit`` returns at once and the end is recorded then.)

Besides ``fit``'s metrics every report carries where and how the attempt ran (Tune's result.json keeps
them; MLflow does not): ``node_id`` (the Ray node), ``start_step`` (the checkpoint step the attempt
resumed from, 0 for a fresh start), ``mlflow_run_id``, and CPU seconds: ``cpu_s`` of the training thread in
this attempt (a report's own MLflow logging and checkpoint count from the next report on), ``train_cpu_s``
the part of it inside fit's training steps (evaluation excluded), and ``process_cpu_s`` of the whole trial
process since it started (Ray's threads and earlier trials included: ``reuse_actors`` runs several trials in
one process). bench/sweep.py reads them.

A grid (``mannstudy replicate``: fixed configurations x seeds, no early stopping) runs :func:`run_point`
instead: each point is one configuration under one seed (this trial, under the point's run key) or under
several seeds trained as one batched model (:func:`run_seeds`, one MLflow run per seed). Run keys are
chosen by whoever builds the grid, so a resumed grid finds every run it began, with or without Tune's state.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import study.ray_env  # noqa: F401  (Ray's environment, before this module's functions import ray)
from study.record import TAG_TRIAL_NAME
from study.search import STATUS_KEY, STEP_KEY
from study.spec import StudySpec, trial_overrides


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study needs besides its sampled parameters (bound with tune.with_parameters)."""

    spec: StudySpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    threads: int = 1  # torch intra-op threads per trial (its CPU share)
    checkpoint_every: int = 1  # evaluations between checkpoints given to Tune (the last one always is)
    flush_every: int = 1  # evaluations between MLflow sends (each send is one log_batch request)


def _worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


ENDED = ("completed", "stopped_early", "diverged")  # statuses that end a trial (``failed`` is retried)


def _recorded_end(context: TrialContext, trial_id: str) -> tuple[str, dict] | None:
    """(MLflow run id, result) of the end an earlier attempt of this trial recorded in its MLflow run, or None.

    The result is the run's latest metrics at the recorded step with the recorded status: what the
    trial reported when it ended (a diverged trial gets the worst objective again, as then).
    """
    from study.record import TAG_STATUS, TAG_STATUS_PREFIX
    from study.tracking import find_trial_runs

    runs = find_trial_runs(context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id, 60.0)
    if not runs:
        return None
    run = runs[0]  # the oldest: the one TrialTracker attaches to
    tags = run.data.tags
    status = tags.get(TAG_STATUS)
    if status not in ENDED:
        return None
    result = {**run.data.metrics, STEP_KEY: int(tags.get(TAG_STATUS_PREFIX + "step", 0)), STATUS_KEY: status}
    metric, mode = context.spec.objective.metric, context.spec.objective.mode
    if status == "diverged" or metric not in result:
        result[metric] = _worst(mode)
    return run.info.run_id, result


class _CpuClock:
    """CPU seconds of the training thread, and the part of them inside fit's training steps.

    fit reports ``wall_time``: seconds inside training steps, evaluation excluded. Training and
    evaluation both run on this thread, so the thread's CPU time between two evaluations is split in
    proportion to their wall times (wall time alone would count waiting for a busy core as work).
    """

    def __init__(self):
        self.cpu = self.train_cpu = 0.0
        self._mark = (time.thread_time(), time.perf_counter())
        self._wall_time: float | None = None  # fit's wall_time at the previous evaluation
        self._reporting_since = self._mark[0]  # thread CPU at the last evaluation

    def evaluation(self, wall_time: float) -> None:
        """At an evaluation: account the thread's CPU since the last ``resume()``."""
        now = time.thread_time()
        cpu, wall = now - self._mark[0], time.perf_counter() - self._mark[1]
        trained = wall_time - self._wall_time if self._wall_time is not None else None
        self.cpu += cpu
        if trained is not None and wall > 0:
            self.train_cpu += cpu * min(1.0, max(0.0, trained) / wall)
        self._wall_time = wall_time
        self._reporting_since = now

    def start(self, wall_time: float) -> None:
        """Training starts from ``wall_time`` (0, or a checkpoint's): the first interval counts too."""
        self._wall_time = wall_time

    def resume(self) -> None:
        """After reporting: training continues from here. The CPU since ``evaluation()`` (MLflow logging, the
        checkpoint, the report) counts in ``cpu`` (so from the next report on)."""
        now = time.thread_time()
        self.cpu += now - self._reporting_since
        self._mark = (now, time.perf_counter())

    def fields(self) -> dict[str, float]:
        return {"cpu_s": self.cpu, "train_cpu_s": self.train_cpu, "process_cpu_s": time.process_time()}


def hide_gpus(gpus: float) -> None:
    """A trial that holds no GPU sees none: ``CUDA_VISIBLE_DEVICES`` empty, set before anything opens CUDA.

    Ray sets the variable for a trial that holds GPUs (to the ones it assigned), but leaves it as the
    node's for a trial with ``gpu: 0`` (ray 2.60; RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO defaults to off), where
    ``device: auto`` would then take cuda:0 outside Ray's accounting.
    """
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


# How long Ray waits for a stopped trial's thread to end before it gives its worker to the next trial
# (``reuse_actors``; study.sweep.with_thread_wait waits as long where the worker ends instead). Ray's own default,
# 2 s, is shorter than recording the end: the thread still runs the final evaluation, flushes the
# trial's metrics and writes its status to MLflow, each retried for up to ``TrialTracker.retry_timeout_s`` (60 s)
# and, on a loaded machine with SQLite, often longer than 2 s. Past the wait, Ray logs "Could not re-use actor
# ... reset_config()" as an ERROR and errors the next trial, which Tune then retries on a new worker.
THREAD_END_TIMEOUT_S = 150


def _wait_for_thread_end() -> None:
    """Ray reads ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` in this worker process at each reuse (a user's value stays)."""
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(THREAD_END_TIMEOUT_S))


_process_prepared = False  # set by the first trial a worker process runs (reuse_actors: later trials share it)


def _prepare_process(tracking_uri: str) -> None:
    """Once per worker process: import what every trial uses with Python's cyclic collector paused, then freeze.

    torch, mann and MLflow with its SQLAlchemy store leave ~800k objects that live as long as
    the process. While they are being created, the collector's full passes keep walking all of them; paused,
    then moved to the permanent generation with ``gc.freeze()``, they cost no collection now or later
    (measured, Python 3.11: 3.5 -> 2.9 CPU s in a Ray worker, 4.4 -> 3.0 s standalone). Only the first trial of
    a process does this: freezing at a later trial would also keep an earlier trial's garbage cycles forever.
    """
    global _process_prepared
    if _process_prepared:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import mann.train  # noqa: F401  (torch; and no torch._dynamo: mann.optim is not torch.optim)
        from study import tracking

        tracking.warm_up(tracking_uri)
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
    _process_prepared = True


def _start_attempt(context: TrialContext) -> None:
    """What every attempt does first in its worker: the GPUs it may see, the previous trial's thread ended, the
    process prepared once, torch's threads set to the trial's CPU share."""
    hide_gpus(context.spec.resources.gpu)
    _wait_for_thread_end()
    _prepare_process(context.tracking_uri)
    import torch

    torch.set_num_threads(max(1, context.threads))


def _tracker(context: TrialContext, key: str, cfg, config: dict):
    """The MLflow run of run key ``key`` (created, or attached to on a retry): ``cfg``'s flat keys as params,
    Tune's trial name as a tag, named by ``config`` (the trial's parameters and seed)."""
    from ray import tune

    from mann.train import config_to_flat_dict
    from study.tracking import TrialTracker, trial_run_name

    return TrialTracker(context.tracking_uri, context.experiment_id, context.parent_run_id, key,
                        params=config_to_flat_dict(cfg), tags={TAG_TRIAL_NAME: tune.get_context().get_trial_name()},
                        run_name=trial_run_name(config), flush_every=context.flush_every)


def _tune_report(result: dict, write=None, metadata: dict | None = None) -> None:
    """``tune.report(result)``, with a checkpoint when ``write(folder)`` is given: it fills a temporary folder,
    which Tune copies (``metadata`` is the checkpoint's, e.g. its step)."""
    from ray import tune

    if write is None:
        tune.report(result)
        return
    with tempfile.TemporaryDirectory(prefix="mannstudy-ckpt-") as tmp:
        write(tmp)
        saved = tune.Checkpoint.from_directory(tmp)
        saved.set_metadata(metadata or {})
        tune.report(result, checkpoint=saved)


def run_trial(config: dict, context: TrialContext, trial_id: str | None = None) -> None:
    """Tune function trainable. ``config``: the define-by-run parameters (``model``, ``seed``, searched keys).

    ``trial_id``: the trial's run key in MLflow (``mannstudy.trial_id``); default Tune's trial id. A grid point
    (:func:`run_point`) names its own, so that a resumed grid finds its runs whatever Tune's state holds.
    """
    _start_attempt(context)
    import ray
    from ray import tune

    from mann.train import CHECKPOINT_NAME, FINAL_PREFIX, fit, make_train_config

    clock = _CpuClock()
    spec = context.spec
    trial_id = trial_id or tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()
    node_id = ray.get_runtime_context().get_node_id()
    # A restored trial may have ended in an earlier session, with or without a checkpoint: read the record first.
    ended = _recorded_end(context, trial_id)
    if ended is not None:
        run_id, result = ended
        step = result[STEP_KEY]
        tune.report({**result, "node_id": node_id, "start_step": step, "mlflow_run_id": run_id, **clock.fields()})
        return
    model, overrides = trial_overrides(spec, config)
    cfg = make_train_config(model, spec.task, overrides)
    metric, mode = spec.objective.metric, spec.objective.mode

    tracker = _tracker(context, trial_id, cfg, config)
    restored_from = checkpoint.get_metadata() if checkpoint else {}  # {step, wall_time} of the checkpoint
    clock.start(float(restored_from.get("wall_time", 0.0)))
    attempt = {"node_id": node_id, "start_step": int(restored_from.get("step", 0)),
               "mlflow_run_id": tracker.run_id}
    last = {"step": 0, "final": None}  # the last reported step; the terminal status it carried, if any
    stopped = {"by": None}  # who decided the stop Tune made inside tune.report ("scheduler", "time_budget"), if any
    evaluations = 0

    def report(metrics: dict, status: str, save_checkpoint=None) -> None:
        last["step"], last["final"] = int(metrics.get(STEP_KEY, last["step"])), status if status != "running" else None
        result = {**metrics, STATUS_KEY: status, **attempt, **clock.fields()}
        _tune_report(result, save_checkpoint, {"step": last["step"], "wall_time": float(metrics.get("wall_time", 0.0))})

    def on_eval(metrics: dict, save_checkpoint) -> bool:
        nonlocal evaluations
        evaluations += 1
        clock.evaluation(float(metrics.get("wall_time", 0.0)))
        step = int(metrics[STEP_KEY])
        tracker.log_metrics({k: v for k, v in metrics.items() if k != STEP_KEY}, step)
        final = step >= cfg.max_steps or "converged_step" in metrics  # fit ends here: final_* are in metrics
        if final:
            tracker.flush()
            tracker.set_status("completed", step=step)
        keep = final or evaluations % context.checkpoint_every == 0
        try:
            report(metrics, "completed" if final else "running", save_checkpoint if keep else None)
        except SystemExit:
            # Tune stopped the trial; Ray ends the training thread this way. When the search decided it (ASHA, the
            # time budget: recorded before the stop), ask fit to stop instead, so that it runs its final evaluation
            # of these weights; the thread ends once that is logged. Otherwise the sweep is being torn down (an
            # error in the driver): the trial records no end, and a --resume continues it from its checkpoint.
            stopped["by"] = tracker.stop_decision()
            if stopped["by"] is None:
                raise
            return True
        clock.resume()
        return False

    def log_final(result) -> None:
        """The final evaluation's metrics (not in an on_eval call when the run diverged or was stopped)."""
        final = {k: v for k, v in result.metrics.items() if k.startswith(FINAL_PREFIX)}
        if final:
            tracker.log_metrics(final, result.step)
            tracker.flush()

    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored:
            resume_from = Path(restored) / CHECKPOINT_NAME if restored else None
            result = fit(cfg, on_eval=on_eval, resume_from=resume_from)
        if result.status == "stopped":  # only a stop by Tune stops fit here
            log_final(result)
            tracker.set_status("stopped_early", step=last["step"], by=stopped["by"])
            last["final"] = "stopped_early"
        elif result.status == "diverged":
            log_final(result)
            tracker.set_status("diverged", step=result.step, message=result.message)
            report({**result.metrics, STEP_KEY: result.step, metric: _worst(mode)}, "diverged")
        elif result.status == "completed" and last["final"] is None:
            # Restored from the final checkpoint with no status in the run: nothing left to train, but
            # this attempt reopened the run and Tune waits for a last result.
            log_final(result)
            tracker.set_status("completed", step=result.step)
            report({**result.metrics, STEP_KEY: result.step}, "completed")
        if stopped["by"] is not None:
            raise SystemExit(0)  # end the thread as Ray asked; returning would report once more to a stopped trial
    except SystemExit:
        # Tune stopped the trial inside tune.report (Ray ends the training thread this way).
        if last["final"] is None and stopped["by"] is not None:
            tracker.set_status("stopped_early", step=last["step"], by=stopped["by"])
        raise
    except BaseException as err:
        if stopped["by"] is not None:
            # Stopped by Tune, then the final evaluation failed: the trial's end is still the stop.
            if tracker.status is None:
                tracker.set_status("stopped_early", step=last["step"], by=stopped["by"],
                                   message=f"no final evaluation: {type(err).__name__}: {err}")
            raise SystemExit(0) from err
        if tracker.status is None:
            tracker.set_status("failed", step=last["step"], message=f"{type(err).__name__}: {err}")
        raise
    finally:
        tracker.close()


# ----------------------------------------------------------------------------------------------------------
# A grid point: one configuration under one seed, or several seeds trained as one batched model

POINT = "point"  # the key of a grid trial's config: {"point": {"key", "config", "seeds", "keys"}}


def run_point(config: dict, context: TrialContext) -> None:
    """Tune function trainable of a grid (``study.sweep.make_tuner(grid=...)``). ``config[POINT]``::

        key     the point's name (its trial folder): the run key for one seed
        config  the trial parameters without the seed (``model`` and searched keys)
        seeds   [int, ...]
        keys    [str, ...]: each seed's run key (its MLflow run's ``mannstudy.trial_id``)

    One seed: :func:`run_trial` under its run key. Several: :func:`run_seeds`. The point decides, so a
    restored grid keeps the layout it began with.
    """
    point = config[POINT]
    seeds, keys = [int(s) for s in point["seeds"]], list(point["keys"])
    if len(seeds) == 1:
        run_trial({**point["config"], "seed": seeds[0]}, context, trial_id=keys[0])
    else:
        run_seeds(point["config"], dict(zip(seeds, keys, strict=True)), context)


def point_dirname(trial) -> str:
    """A grid trial's folder: ``run_point_<key>_<trial id>``, or ``run_point_<key>_x<S>_<trial id>`` for S seeds
    batched (their checkpoints in ``checkpoint_<n>/seed-<s>/``). ``analysis.generalization.find_checkpoint``
    finds a run's checkpoint by its run key (``<key>``, or ``<key>.s<seed>`` of a batch) in these names."""
    point = trial.config.get(POINT, {})
    seeds = point.get("seeds", [])
    batch = f"_x{len(seeds)}" if len(seeds) > 1 else ""
    return f"run_point_{point.get('key', 'x')}{batch}_{trial.trial_id}"


def run_seeds(params: dict, keys: dict[int, str], context: TrialContext) -> None:
    """Several seeds of one configuration in one Tune trial: :func:`mann.multiseed.fit_seeds`, one MLflow run each.

    ``params``: the trial parameters without the seed; ``keys``: seed -> its run key. Each seed's run is what
    :func:`run_trial` would record for it (params, tags, metrics, ``completed``/``diverged``/``failed``). Tune
    gets one result per evaluation step (after every seed has evaluated it): the mean objective over the seeds
    (a diverged seed counts as the worst value), and a checkpoint every ``checkpoint_every`` evaluations and at
    the end holding ``seed-<s>/checkpoint.pt`` per seed. No early stopping: every seed trains to max_steps. A
    seed whose run recorded its end in an earlier attempt is not trained again.
    """
    _start_attempt(context)
    import shutil

    import ray
    from ray import tune

    from mann.multiseed import SEED_DIR, fit_seeds
    from mann.train import FINAL_PREFIX, make_train_config

    spec = context.spec
    metric, mode = spec.objective.metric, spec.objective.mode
    checkpoint = tune.get_checkpoint()
    seeds = list(keys)
    configs = {}
    for s in seeds:
        model, overrides = trial_overrides(spec, {**params, "seed": s})
        configs[s] = make_train_config(model, spec.task, overrides)
    cfg = configs[seeds[0]]
    ended = {}  # seed -> (status, metrics) an earlier attempt recorded: read first, with or without a checkpoint
    for s in seeds:
        found = _recorded_end(context, keys[s])
        if found is not None:
            ended[s] = (found[1][STATUS_KEY], found[1])
    status = {s: ended[s][0] for s in ended}  # seed -> its end, once known
    steps = {s: int(ended[s][1].get(STEP_KEY, cfg.max_steps)) for s in ended}  # seed -> the step it ended at
    latest = {s: ended[s][1] for s in ended}  # seed -> its last metrics
    restored_from = checkpoint.get_metadata() if checkpoint else {}
    attempt = {"node_id": ray.get_runtime_context().get_node_id(), "start_step": int(restored_from.get("step", 0)),
               "seeds": len(seeds)}
    trackers = {s: _tracker(context, keys[s], configs[s], {**params, "seed": s}) for s in seeds if s not in ended}
    staging = Path(tempfile.mkdtemp(prefix="mannstudy-seeds-"))  # seed-<s>/checkpoint.pt: each seed's latest
    at = {"step": None, "evaluations": 0}  # the evaluation step in progress; evaluation steps seen

    def report(step: int, final: bool, save: bool) -> None:
        values = [(_worst(mode) if status.get(s) == "diverged" else latest[s].get(metric, _worst(mode)))
                  for s in seeds if s in latest or s in status]
        counts = {f"seeds_{k}": sum(1 for v in status.values() if v == k) for k in ("completed", "diverged")}
        if final:
            trial_status = "completed" if counts["seeds_completed"] else "diverged"
        else:
            trial_status = "running"
        result = {STEP_KEY: step, metric: sum(values) / len(values) if values else _worst(mode),
                  STATUS_KEY: trial_status, **counts, **attempt}
        write = (lambda tmp: shutil.copytree(staging, tmp, dirs_exist_ok=True)) if save else None
        _tune_report(result, write, {"step": step})

    def end_step() -> None:
        """Every seed has evaluated step at["step"]: one result for Tune."""
        if at["step"] is not None:
            at["evaluations"] += 1
            report(at["step"], False, at["evaluations"] % context.checkpoint_every == 0)

    def on_eval(seed: int, metrics: dict, save_checkpoint) -> bool:
        step = int(metrics[STEP_KEY])
        if step != at["step"]:
            end_step()  # fit_seeds evaluates every live seed at a step before it trains the next
            at["step"] = step
        tracker = trackers[seed]
        tracker.log_metrics({k: v for k, v in metrics.items() if k != STEP_KEY}, step)
        latest[seed] = dict(metrics)
        final = step >= cfg.max_steps or "converged_step" in metrics  # the seed ends here: final_* are in metrics
        if final:
            tracker.flush()
            tracker.set_status("completed", step=step)
            status[seed] = "completed"
        if final or (at["evaluations"] + 1) % context.checkpoint_every == 0:
            save_checkpoint(staging / SEED_DIR.format(seed=seed))
        return False  # no early stopping in a grid

    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored:
            if restored:
                shutil.copytree(restored, staging, dirs_exist_ok=True)
        todo = [s for s in seeds if s not in ended]
        resumable = [s for s in todo if (staging / SEED_DIR.format(seed=s)).is_dir()]
        # A seed without a checkpoint (none was due before the crash) starts afresh, in a batch of its own.
        groups = [(group, resume) for group, resume in ((resumable, staging), ([s for s in todo if s not in
                  resumable], None)) if group]
        for group, resume in groups:
            results = fit_seeds(cfg, group, on_eval=on_eval, resume_from=resume)
            for s, result in zip(group, results, strict=True):
                latest[s] = {**latest.get(s, {}), **result.metrics}
                final = {k: v for k, v in result.metrics.items() if k.startswith(FINAL_PREFIX)}
                if result.status == "diverged":
                    trackers[s].log_metrics(final, result.step)  # the final evaluation of its last good weights
                    trackers[s].set_status("diverged", step=result.step, message=result.message)
                    status[s] = "diverged"
                elif result.status == "completed" and s not in status:  # resumed at its end: no evaluation ran
                    trackers[s].log_metrics(final, result.step)
                    trackers[s].set_status("completed", step=result.step)
                    status[s] = "completed"
                steps[s] = result.step
            at["step"] = None
        report(max(steps.values(), default=0), True, True)
    except SystemExit:
        # Tune stopped the trial inside tune.report. A grid stops nothing early, so the sweep is being torn down
        # (an error in the driver): the seeds record no end, and a --resume continues them from the checkpoint.
        raise
    except BaseException as err:
        for tracker in trackers.values():
            if tracker.status is None:
                tracker.set_status("failed", step=at["step"] or 0, message=f"{type(err).__name__}: {err}")
        raise
    finally:
        for tracker in trackers.values():
            tracker.close()
        shutil.rmtree(staging, ignore_errors=True)
