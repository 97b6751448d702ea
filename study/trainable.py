"""The Tune function trainable: one trial = one ``mann.train.fit`` run, reported and checkpointed.

Each evaluation of ``fit`` becomes one ``ray.tune.report`` (ASHA decides on it) with a checkpoint,
and one batch of metrics for the trial's MLflow child run. A trial that Ray retries (a lost node,
a crash) or resumes (``mannstudy sweep --resume``) starts from its last checkpoint and attaches to
the same MLflow run.

How the trial ended is decided here, where it is known, and written both to MLflow
(``TrialTracker.set_status``) and into the last report (``trial_status``, read by
:class:`study.search.TruthfulOptunaSearch`):

- ``fit`` returns ``completed``: the last evaluation is reported with ``trial_status=completed``.
- ``fit`` returns ``diverged``: a final report with the objective at its worst value (so ASHA ranks
  it last) and ``trial_status=diverged``.
- Tune stops the trial (ASHA, or the study's time budget) inside ``tune.report``: Ray ends the
  training thread with ``SystemExit``; the trial is ``stopped_early`` at its last reported step.
- any exception: ``failed`` with the message, then re-raised so Tune's FailureConfig retries it.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

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


def run_trial(config: dict, context: TrialContext) -> None:
    """Tune function trainable. ``config``: the define-by-run parameters (``model``, ``seed``, searched keys)."""
    import torch
    from ray import tune

    from mann.train import CHECKPOINT_NAME, config_to_flat_dict, fit, make_train_config
    from study.tracking import TrialTracker

    torch.set_num_threads(max(1, context.threads))
    spec = context.spec
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    model, overrides = trial_overrides(spec, config)
    cfg = make_train_config(model, spec.task, overrides)
    metric, mode = spec.objective.metric, spec.objective.mode

    tracker = TrialTracker(
        context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id,
        params=config_to_flat_dict(cfg), tags={"mannstudy.trial_name": tune_context.get_trial_name()},
        flush_every=context.flush_every,
    )
    last = {"step": 0, "final": None}  # the last reported step; the terminal status it carried, if any
    evaluations = 0

    def report(metrics: dict, status: str, save_checkpoint=None) -> None:
        last["step"], last["final"] = int(metrics.get(STEP_KEY, last["step"])), status if status != "running" else None
        result = {**metrics, STATUS_KEY: status}
        if save_checkpoint is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(prefix="mannstudy-ckpt-") as tmp:
            save_checkpoint(tmp)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))

    def on_eval(metrics: dict, save_checkpoint) -> None:
        nonlocal evaluations
        evaluations += 1
        step = int(metrics[STEP_KEY])
        tracker.log_metrics({k: v for k, v in metrics.items() if k != STEP_KEY}, step)
        final = step >= cfg.max_steps
        if final:
            tracker.flush()
            tracker.set_status("completed", step=step)
        keep = final or evaluations % context.checkpoint_every == 0
        report(metrics, "completed" if final else "running", save_checkpoint if keep else None)

    checkpoint = tune.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored:
            resume_from = Path(restored) / CHECKPOINT_NAME if restored else None
            result = fit(cfg, on_eval=on_eval, resume_from=resume_from)
        if result.status == "diverged":
            tracker.flush()
            tracker.set_status("diverged", step=result.step, message=result.message)
            report({**result.metrics, STEP_KEY: result.step, metric: _worst(mode)}, "diverged")
    except SystemExit:
        # Tune stopped the trial inside tune.report (Ray ends the training thread this way).
        if last["final"] is None:
            tracker.set_status("stopped_early", step=last["step"])
        raise
    except BaseException as err:
        if tracker.status is None:
            tracker.set_status("failed", step=last["step"], message=f"{type(err).__name__}: {err}")
        raise
    finally:
        tracker.close()
