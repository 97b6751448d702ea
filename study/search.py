"""Ray's OptunaSearch, told the truth about how each trial ended.

Ray's ``OptunaSearch`` tells Optuna that a trial ASHA stopped is COMPLETE with its last, partial
score, reports intermediate values at Tune's ``training_iteration`` rather than the training step,
and never stores the final result as an intermediate value (Tune skips ``on_trial_result`` for the
result that triggers a stop). TPE and every importance evaluator would then mix one-rung scores
with full-budget ones. This subclass keeps Ray's machinery (ask, define-by-run, save/restore) and
changes only what is told:

=================  ==========================  ==============================================
trial ended as     Optuna state                user attributes
=================  ==========================  ==============================================
completed          COMPLETE, final value       status=completed
stopped by ASHA    PRUNED, last value reported status=stopped_early, status_step=<last step>
diverged           FAIL                        status=diverged, status_step=<step>
exception          FAIL                        status=failed
never started      FAIL                        status=not_run
=================  ==========================  ==============================================

A trial's own last report carries ``trial_status`` ("completed" or "diverged", set by the
trainable); a last result without it means the scheduler stopped the trial. Tune tells the searcher
before it stops the trial, so the searcher also tags the trial's MLflow run with that decision
(``tracking.record_stop``): the trial, stopped, reads it and ends with its final evaluation, where a
trial stopped without it (the sweep torn down by an error) records nothing and stays resumable.

``tell`` is idempotent against the storage: after a driver crash the database can be ahead of the
searcher state Ray restored (Optuna then raises ``UpdateFinishedTrialError``), so a trial already finished
in storage is not told again.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

# isort: off
import study.ray_env  # noqa: F401  (sets Ray's environment before ray is imported)
from ray.tune.search.optuna import OptunaSearch
# isort: on
from study.redact import keep_secret, recall_secret, redact

log = logging.getLogger(__name__)

STEP_KEY = "step"  # the training step reported by mann.train.fit
STATUS_KEY = "trial_status"


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose pickle holds its URL without the password (study/redact.py).

    Tune pickles the searcher, and the storage with it, into results_dir; unpickled by the driver that
    restores the sweep, the storage connects with the URL that driver was given for the same database.
    """

    def __init__(self, url: str, **kwargs):
        keep_secret(url)
        super().__init__(url, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "url": redact(self.url)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "url": recall_secret(state["url"])})


class TruthfulOptunaSearch(OptunaSearch):
    """OptunaSearch whose Optuna states say how each trial really ended (see module docstring).

    ``tracking_uri``: where the trials' MLflow runs are, for the stop decisions (kept in its redacted form, the
    form Tune may pickle; the password comes back through :func:`study.redact.recall_secret`).
    """

    def __init__(self, *args, tracking_uri: str | None = None, grid: list[tuple[dict, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracking_uri = keep_secret(tracking_uri) if tracking_uri else None
        self.grid = grid  # a grid study's (point, seed) pairs, each to run once (see _refill_grid)

    def suggest(self, trial_id: str) -> dict | None:
        with warnings.catch_warnings():
            # Ray warns when the define-by-run function takes over a second, meaning training there. Ours only
            # samples: grouped TPE over the study's history in SQLite, and queueing a configuration's repeats,
            # which on a busy machine can take that long. The warning would only alarm the user.
            warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument",
                                    category=UserWarning)
            self._refill_grid()
            config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        return config

    def _refill_grid(self) -> None:
        """A grid study whose queue has run dry while a (point, seed) pair is still to run gets that pair queued.

        A trial asked by a driver that was killed before Tune saved it is failed as ``not_run`` on --resume, and
        the restored Tune still counts on a trial in its place: without this, the sampler would fill that place
        with a point it picks (one that ran already) and the lost pair would never run.
        """
        from study.spec import SEED_ATTR, params_key, planned_runs

        grid = getattr(self, "grid", None)  # a searcher restored from an older state has none
        if not grid or self._ot_study is None:
            return
        if self._ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        first_seed = grid[0][1]
        planned = planned_runs(self._ot_study, first_seed)
        for params, seed in grid:
            if (params_key(params), seed) not in planned:
                # the first seed is asked as a new configuration (which queues the repeats still to run)
                self._ot_study.enqueue_trial(params, user_attrs={} if seed == first_seed else {SEED_ATTR: seed})
                return

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)
        if self._already_finished(ot_trial):
            return
        state, value, attrs = self.verdict(result, error)
        if result:
            self._report(trial_id, result)
        for key, val in attrs.items():
            ot_trial.set_user_attr(key, val)
        self._ot_study.tell(ot_trial, value if state == TrialState.COMPLETE else None, state=state)
        run_id = (result or {}).get("mlflow_run_id")
        if attrs["status"] == "stopped_early" and run_id and getattr(self, "tracking_uri", None):
            from study.tracking import record_stop

            record_stop(recall_secret(self.tracking_uri), run_id, "scheduler")  # before Tune stops the trial

    def verdict(self, result: dict | None, error: bool) -> tuple[TrialState, float | None, dict[str, Any]]:
        """(Optuna state, value, user attributes) for a trial that ended with this last result."""
        if error:
            return TrialState.FAIL, None, {"status": "failed"}
        if not result:
            return TrialState.FAIL, None, {"status": "not_run"}
        step = int(result.get(STEP_KEY, 0) or 0)
        status = result.get(STATUS_KEY)
        value = result.get(self._metric)
        if status == "diverged" or value is None or not math.isfinite(value):
            return TrialState.FAIL, None, {"status": "diverged", "status_step": step}
        if status == "completed":
            return TrialState.COMPLETE, float(value), {"status": "completed", "status_step": step}
        return TrialState.PRUNED, None, {"status": "stopped_early", "status_step": step}

    def _report(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        value = result.get(self._metric)
        if ot_trial is None or value is None or not math.isfinite(value):
            return
        frozen = self._frozen(ot_trial)  # one storage read per result: the trainable waits in tune.report
        step = int(result.get(STEP_KEY, 0) or 0)
        # A trial resumed from a checkpoint reports some steps again.
        if not frozen.state.is_finished() and step not in frozen.intermediate_values:
            ot_trial.report(float(value), step)

    def _already_finished(self, ot_trial: optuna.Trial) -> bool:
        return self._frozen(ot_trial).state.is_finished()

    def _frozen(self, ot_trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        # One trial from storage (Study.trials would load them all on every result).
        return self._ot_study._storage.get_trial(ot_trial._trial_id)


def fail_running_trials(study: optuna.Study, reason: str) -> list[int]:
    """Mark the study's RUNNING trials FAIL (status ``not_run``, with ``reason``); return their numbers.

    Only for after a sweep: then nothing runs, and a RUNNING trial was asked by a driver that died
    before Tune recorded it. Optuna's user attributes cannot change once a trial is finished, so
    they are written first, through the storage (Study has no public setter for a trial by number).
    """
    storage = study._storage
    numbers = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in numbers:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        storage.set_trial_user_attr(trial_id, "status", "not_run")
        storage.set_trial_user_attr(trial_id, "status_message", reason)
        study.tell(number, state=TrialState.FAIL)
    return numbers


def tell_recorded_end(study: optuna.Study, number: int, status: str, step: int, value: float | None) -> None:
    """Tell the study's RUNNING trial ``number`` the end its MLflow run recorded (``completed``, ``stopped_early``,
    ``diverged`` at ``step``; ``value`` the objective's last logged value), as the searcher would have.

    Only for after a sweep: the driver died after the trial recorded its end and before the searcher was told.
    """
    if status == "completed" and (value is None or not math.isfinite(value)):
        status = "diverged"  # as TruthfulOptunaSearch.verdict decides
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    storage.set_trial_user_attr(trial_id, "status", status)
    storage.set_trial_user_attr(trial_id, "status_step", int(step))
    if status == "completed":
        study.tell(number, float(value), state=TrialState.COMPLETE)
    elif status == "stopped_early":
        study.tell(number, state=TrialState.PRUNED)
    else:
        study.tell(number, state=TrialState.FAIL)
