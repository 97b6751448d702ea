"""``mannstudy replicate FILE``: re-run a finished study's best configurations with fresh seeds, to full budget.

A search ranks configurations on one seed each (or a few); which of its top configurations is
really best, and how reliably each learns, needs more seeds. A replication takes the K best
distinct configurations of the study's Optuna record (COMPLETE trials ranked by value; a
configuration that ran under several seeds ranks by its best trial), or the configurations
listed in a YAML file, and runs each with S seeds the study never used, every run to
``budget.max_steps`` (FIFO scheduling: no early stopping, no Optuna sampling). Each (config,
seed) pair is one MLflow run. By default all seeds of one configuration train in ONE Tune trial as one
batched model (:func:`mann.multiseed.fit_seeds`, :func:`run_replica_seeds`); ``batched=False`` runs each pair
as its own Tune trial through the sweep's own trainable (:func:`study.trainable.run_trial`).

MLflow layout (read by :mod:`analysis.load`)::

    experiment <study>
      run mannstudy.kind=study                      the study's parent run
        run mannstudy.kind=replication              one per replication, nested under the study's run
            mannstudy.replication=<id>              id: rep-<hash of the (config, seed) list>, or given
            mannstudy.study=<study>, mannstudy.study_run=<parent run id>
            artifact replication.json               the configurations (with where each came from) and seeds
          run mannstudy.kind=trial                  one per (config, seed), as in a sweep; batched, its
                                                    mannstudy.trial_id is ``<tune trial id>-s<seed>``

Tune's state lives in ``<results_dir>/ray/<id>/`` (trial folders ``replica_<trial id>_c<i>_s<seed>``, or
``replica_<trial id>_c<i>_x<S>`` for S seeds batched, checkpoints inside: batched, ``checkpoint_<n>/seed-<s>/``),
so ``resume=True`` finishes an interrupted replication with ``Tuner.restore`` (each batched seed resumes from its
own ``seed-<s>`` checkpoint; a seed whose run already recorded its end is not trained again). The trial that
restore runs decides the path, not the ``batched`` option: a resumed replication keeps the layout it began with.
After the Tuner returns, each batched seed's last checkpoint is also linked as ``replica-seed_<trial id>-s<seed>_c<i>
/checkpoint_<n>/checkpoint.pt`` (a hard link), the one-trial-per-run layout that
:func:`analysis.generalization.find_checkpoint` looks for.

Ray is imported inside the functions: :mod:`analysis.load` imports the tag names from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mann.config import ConfigError
from study.spec import MODEL_PARAM, SEED_ATTR, SpecError, StudySpec, load_spec, read_yaml, trial_overrides

KIND_REPLICATION = "replication"  # mannstudy.kind of a replication's parent run
TAG_REPLICATION = "mannstudy.replication"  # its id
TAG_STUDY_RUN = "mannstudy.study_run"  # the run id of the study it replicates
REPLICATION_FILE = "replication.json"
ID_PREFIX = "rep-"  # every replication id starts so; Tune's folder is <results_dir>/ray/<id>, never the sweep's
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ReplicationError(RuntimeError):
    """A replication that cannot start (one line) — nothing recorded is touched."""


@dataclass(frozen=True)
class ReplicaConfig:
    """One configuration to replicate: the trial parameters of the study (``model`` and searched keys)."""

    label: str  # c0, c1, ... in rank order
    params: dict[str, Any]  # as Tune's trial config holds them, without the seed
    source: str  # where it came from, for people: "optuna trial 12 (error 0.031)" or "configs.yaml[2]"


@dataclass
class ReplicationSummary:
    replication_id: str
    parent_run_id: str
    experiment_dir: str
    configs: list[ReplicaConfig]
    seeds: list[int]
    counts: dict[str, int] = field(default_factory=dict)  # trial runs by status (MLflow)

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"replication {self.replication_id}: {len(self.configs)} configs x {len(self.seeds)} seeds; "
                f"runs: {counts or 'none'}")


# ----------------------------------------------------------------------------------------------------------
# Which configurations, which seeds


def _optuna_study(spec: StudySpec):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = spec.storage.startswith("sqlite:///") and not Path(spec.storage.removeprefix("sqlite:///")).is_file()
    try:
        if missing:  # opening it would create an empty database
            raise KeyError(spec.name)
        return optuna.load_study(study_name=spec.name, storage=spec.storage)
    except KeyError:
        raise ReplicationError(f"{spec.source}: study {spec.name!r} has no Optuna record in {spec.storage} "
                               "(run the sweep first, or give the configurations in a file)") from None


def top_configs(spec: StudySpec, top_k: int, study=None) -> list[ReplicaConfig]:
    """The ``top_k`` best distinct configurations among the study's COMPLETE trials (best value first)."""
    import optuna

    if top_k < 1:
        raise ReplicationError(f"top_k: expected a positive integer, got {top_k!r}")
    study = study if study is not None else _optuna_study(spec)
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]
    if not done:
        raise ReplicationError(f"{spec.source}: study {spec.name!r} has no completed trial to replicate")
    done.sort(key=lambda t: (t.value if spec.objective.mode == "min" else -t.value, t.number))
    configs, seen = [], set()
    for t in done:
        params = dict(t.params)
        key = json.dumps(params, sort_keys=True, default=str)
        if key in seen:  # the same configuration under another seed
            continue
        seen.add(key)
        source = f"optuna trial {t.number} ({spec.objective.metric} {t.value:.4g})"
        configs.append(ReplicaConfig(f"c{len(configs)}", params, source))
        if len(configs) == top_k:
            break
    return configs


def configs_from_file(path: str | os.PathLike, spec: StudySpec) -> list[ReplicaConfig]:
    """Configurations listed in a YAML file: ``configs: [{model: dnc, lr: 1.0e-3, ...}, ...]`` (or a bare list).

    Keys are the study's dotted keys (``model`` names one of the study's models); the fixed values
    and budget of the study apply on top, as for its trials. Each entry is checked with
    ``make_train_config``; a mistake raises SpecError naming the file and ``configs[i].<key>``.
    """
    from mann.train import make_train_config

    source = str(path)
    data = read_yaml(path)
    entries = data.get("configs") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"configs"}:
        raise SpecError(sorted(set(data) - {"configs"})[0], "only the key configs", source=source)
    if not isinstance(entries, list) or not entries:
        raise SpecError("configs", "a non-empty list of mappings of dotted keys to values", entries, source)
    configs = []
    for i, entry in enumerate(entries):
        where = f"configs[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(where, "a mapping of dotted keys to values (lr: 1.0e-3, model.memory_size: 64)", entry,
                            source)
        if "seed" in entry:
            raise SpecError(f"{where}.seed", "no seed here (seeds come from --seeds)", entry["seed"], source)
        params = dict(entry)
        if len(spec.models) == 1:
            params.setdefault(MODEL_PARAM, spec.models[0])
        try:
            model, overrides = trial_overrides(spec, params)
            make_train_config(model, spec.task, overrides)
        except ConfigError as err:
            raise SpecError(f"{where}.{err.key}", err.expected, err.got, source) from None
        configs.append(ReplicaConfig(f"c{i}", params, f"{Path(source).name}[{i}]"))
    return configs


def fresh_seeds(spec: StudySpec, count: int, study=None) -> list[int]:
    """``count`` seeds the study never trained with: the integers after the largest seed it used."""
    if count < 1:
        raise ReplicationError(f"seeds: expected a positive number of seeds, got {count!r}")
    used = set(spec.seeds) if spec.seeds != "trial" else set()
    if study is not None:
        used |= {int(t.user_attrs[SEED_ATTR]) for t in study.get_trials(deepcopy=False) if SEED_ATTR in t.user_attrs}
    start = max(used, default=-1) + 1
    return list(range(start, start + count))


def replication_grid(configs: Sequence[ReplicaConfig], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every (configuration, seed) pair, configuration-major: one Tune trial each.

    The one place the pairs are made, so that a batched many-seeds-at-once model can take the
    list instead. Each item: ``config`` (index), ``label``, ``params``, ``seed``.
    """
    return [{"config": i, "label": c.label, "params": dict(c.params), "seed": int(s)}
            for i, c in enumerate(configs) for s in seeds]


def replication_batches(configs: Sequence[ReplicaConfig], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One item per configuration with all the seeds: one batched Tune trial each (``config``, ``label``,
    ``params``, ``seeds``)."""
    return [{"config": i, "label": c.label, "params": dict(c.params), "seeds": [int(s) for s in seeds]}
            for i, c in enumerate(configs)]


def seed_trial_id(trial_id: str, seed: int) -> str:
    """The ``mannstudy.trial_id`` of one seed of a batched trial: ``<tune trial id>-s<seed>``."""
    return f"{trial_id}-s{seed}"


def replication_id(grid: Sequence[Mapping[str, Any]]) -> str:
    """``rep-<8 hex>``: a hash of the (config, seed) list, so the same request finds its earlier run on resume."""
    text = json.dumps([{"params": g["params"], "seed": g["seed"]} for g in grid], sort_keys=True, default=str)
    return ID_PREFIX + hashlib.sha1(text.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------------
# The Tune side


def run_replica(config: dict, context) -> None:
    """Tune function trainable: one item of the grid. ``seeds`` (a batch): :func:`run_replica_seeds`; ``seed``
    (one pair): the sweep's own trainable. The item decides, so a restored replication keeps its layout."""
    from study.trainable import _prepare_process, run_trial

    replica = config["replica"]
    if "seeds" in replica:
        _prepare_process(context.tracking_uri)  # run_trial does it itself
        run_replica_seeds(replica, context)
    else:
        run_trial({**replica["params"], "seed": replica["seed"]}, context)


def _recorded_ends(context, trial_ids: Mapping[int, str]) -> dict[int, tuple[str, dict]]:
    """seed -> (status, metrics) of the seeds whose MLflow run an earlier attempt ended (the sweep's own reading,
    :func:`study.trainable._recorded_end`, per seed)."""
    from study.search import STATUS_KEY
    from study.trainable import _recorded_end

    ended = {}
    for seed, trial_id in trial_ids.items():
        found = _recorded_end(context, trial_id)
        if found is not None:
            ended[seed] = (found[1][STATUS_KEY], found[1])
    return ended


def run_replica_seeds(replica: dict, context) -> None:
    """All seeds of one configuration in one Tune trial: :func:`mann.multiseed.fit_seeds`, one MLflow run per seed.

    Each seed's child run is what :func:`study.trainable.run_trial` would record for it (params, tags, metrics,
    ``completed``/``diverged``/``failed``), with ``mannstudy.trial_id`` = ``<tune trial id>-s<seed>``. Tune gets
    one result per evaluation step (after every seed has evaluated it): the mean objective over the seeds
    (a diverged seed counts as the worst value), and a checkpoint every ``checkpoint_every`` evaluations and at
    the end holding ``seed-<s>/checkpoint.pt`` per seed. No early stopping: every seed trains to max_steps.
    """
    import shutil
    import tempfile

    import ray
    import torch
    from ray import tune

    from mann.multiseed import SEED_DIR, fit_seeds
    from mann.train import FINAL_PREFIX, config_to_flat_dict, make_train_config
    from study.search import STATUS_KEY, STEP_KEY
    from study.tracking import TrialTracker, trial_run_name
    from study.trainable import _worst

    torch.set_num_threads(max(1, context.threads))
    spec = context.spec
    metric, mode = spec.objective.metric, spec.objective.mode
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    checkpoint = tune.get_checkpoint()
    seeds = [int(s) for s in replica["seeds"]]
    ids = {s: seed_trial_id(trial_id, s) for s in seeds}
    configs = {}
    for s in seeds:
        model, overrides = trial_overrides(spec, {**replica["params"], "seed": s})
        configs[s] = make_train_config(model, spec.task, overrides)
    cfg = configs[seeds[0]]
    ended = _recorded_ends(context, ids)  # a restored trial may have ended, with or without a checkpoint
    status = {s: ended[s][0] for s in ended}  # seed -> its end, once known
    steps = {s: int(ended[s][1].get(STEP_KEY, cfg.max_steps)) for s in ended}  # seed -> the step it ended at
    latest = {s: ended[s][1] for s in ended}  # seed -> its last metrics
    restored_from = checkpoint.get_metadata() if checkpoint else {}
    attempt = {"node_id": ray.get_runtime_context().get_node_id(), "start_step": int(restored_from.get("step", 0)),
               "seeds": len(seeds)}
    trackers = {
        s: TrialTracker(context.tracking_uri, context.experiment_id, context.parent_run_id, ids[s],
                        params=config_to_flat_dict(configs[s]),
                        tags={"mannstudy.trial_name": tune_context.get_trial_name()},
                        run_name=trial_run_name({**replica["params"], "seed": s}), flush_every=context.flush_every)
        for s in seeds if s not in ended
    }
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
        if not save:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(prefix="mannstudy-ckpt-") as tmp:  # Tune gets its own copy
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            saved = tune.Checkpoint.from_directory(tmp)
            saved.set_metadata({"step": step})
            tune.report(result, checkpoint=saved)

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
        return False  # no early stopping in a replication

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
        # Tune stopped the trial inside tune.report (Ray ends the training thread this way).
        for tracker in trackers.values():
            if tracker.status is None:
                tracker.set_status("stopped_early", step=at["step"] or 0)
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


def _trial_dirname(trial) -> str:
    replica = trial.config.get("replica", {})
    if "seeds" in replica:
        return f"replica_{trial.trial_id}_c{replica.get('config', 'x')}_x{len(replica['seeds'])}"
    return f"replica_{trial.trial_id}_c{replica.get('config', 'x')}_s{replica.get('seed', 'x')}"


def experiment_dir(spec: StudySpec, rep_id: str) -> Path:
    return Path(spec.results_dir) / "ray" / rep_id


def check_name(name: str) -> str:
    """A replication id from a user's name: letters, digits, ``_ . -``; ``rep-`` prepended when missing."""
    if not _ID.match(name):
        raise ReplicationError(f"replication name {name!r}: expected letters, digits, '_', '.', '-' "
                               "(it names a folder and an MLflow tag)")
    return name if name.startswith(ID_PREFIX) else ID_PREFIX + name


def _make_tuner(spec: StudySpec, context, grid: list[dict], exp_dir: Path, resume: bool):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from study import state
    from study.sweep import MAX_FAILURES, ProgressCallback

    trainable = tune.with_resources(
        tune.with_parameters(run_replica, context=context),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    if resume and state.prepare_restore(exp_dir, str(spec.source)):
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    tune_config = tune.TuneConfig(
        num_samples=1, max_concurrent_trials=spec.concurrency, reuse_actors=True,
        trial_dirname_creator=_trial_dirname,
    )
    stall = state.NoProgress()
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2), stop=stall,
        callbacks=[ProgressCallback(spec), JsonLoggerCallback(), state.StateBackupCallback(exp_dir), stall],
        verbose=0,
    )
    tuner = tune.Tuner(trainable, param_space={"replica": tune.grid_search(grid)}, tune_config=tune_config,
                       run_config=run_config)
    state.keep_tuner_copy(exp_dir)
    return tuner


# ----------------------------------------------------------------------------------------------------------
# MLflow: the replication's parent run


def start_replication_run(uri: str, experiment_id: str, spec: StudySpec, study_run_id: str, rep_id: str,
                          configs: Sequence[ReplicaConfig], seeds: Sequence[int]) -> str:
    """Get or create the replication's parent run (nested under the study's run); return its id."""
    from study.tracking import TAG_KIND, TAG_PARENT, TAG_STUDY, _client, _retry, provenance_tags

    client = _client(uri)
    filter_string = f"tags.`{TAG_KIND}` = '{KIND_REPLICATION}' AND tags.`{TAG_REPLICATION}` = '{rep_id}'"
    found = _retry(lambda: client.search_runs([experiment_id], filter_string=filter_string, max_results=10),
                   uri, f"searching replication {rep_id}", 30.0)
    if found:
        run_id = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        _retry(lambda: client.update_run(run_id, status="RUNNING"), uri, "reopening the replication run", 30.0)
        return run_id
    tags = {TAG_KIND: KIND_REPLICATION, TAG_REPLICATION: rep_id, TAG_STUDY: spec.name, TAG_STUDY_RUN: study_run_id,
            TAG_PARENT: study_run_id, "mannstudy.replication_seeds": json.dumps(list(seeds)), **provenance_tags()}
    run = _retry(lambda: client.create_run(experiment_id, tags=tags, run_name=rep_id), uri,
                 f"creating replication run {rep_id}", 30.0)
    record = {"replication": rep_id, "study": spec.name, "seeds": list(seeds),
              "configs": [{"label": c.label, "params": c.params, "source": c.source} for c in configs]}
    _retry(lambda: client.log_dict(run.info.run_id, json.loads(json.dumps(record, default=str)), REPLICATION_FILE),
           uri, f"uploading {REPLICATION_FILE}", 30.0)
    return run.info.run_id


def _child_statuses(uri: str, experiment_id: str, parent_run_id: str) -> list:
    from study.tracking import TAG_KIND, TAG_PARENT, _client

    client = _client(uri)
    runs, token = [], None
    while True:
        filter_string = f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND tags.`{TAG_KIND}` = 'trial'"
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _reconcile(uri: str, experiment_id: str, parent_run_id: str, reason: str) -> dict[str, int]:
    """After the Tuner returns nothing runs, so child runs still ``running`` were lost: mark them failed.

    Returns the child runs per status."""
    from study.tracking import (
        RUNNING,
        STATUS_TO_RUN_STATUS,
        TAG_NOTE,
        TAG_STATUS,
        TAG_STATUS_PREFIX,
        _client,
        status_note,
    )

    client = _client(uri)
    counts: dict[str, int] = {}
    for run in _child_statuses(uri, experiment_id, parent_run_id):
        status = run.data.tags.get(TAG_STATUS, RUNNING)
        if status == RUNNING:
            client.set_tag(run.info.run_id, TAG_STATUS, "failed")
            client.set_tag(run.info.run_id, TAG_STATUS_PREFIX + "message", reason)
            client.set_tag(run.info.run_id, TAG_NOTE, status_note("failed", {"message": reason}))
            client.set_terminated(run.info.run_id, status=STATUS_TO_RUN_STATUS["failed"])
            status = "failed"
        counts[status] = counts.get(status, 0) + 1
    return counts


def _best_value(uri: str, experiment_id: str, parent_run_id: str, spec: StudySpec) -> float | None:
    """The best objective among the replication's completed runs (their last value), or None."""
    from study.tracking import TAG_STATUS

    metric = spec.objective.metric
    values = [run.data.metrics[metric] for run in _child_statuses(uri, experiment_id, parent_run_id)
              if run.data.tags.get(TAG_STATUS) == "completed" and metric in run.data.metrics]
    if not values:
        return None
    return min(values) if spec.objective.mode == "min" else max(values)


# ----------------------------------------------------------------------------------------------------------
# Entry points


def parse_seeds(seeds: int | str | Sequence[int]) -> int | list[int]:
    """``3`` / ``"3"`` -> 3 fresh seeds; ``"10,11"`` / ``[10, 11]`` -> exactly those."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return seeds
    if isinstance(seeds, str):
        parts = [p.strip() for p in seeds.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ReplicationError(f"seeds: expected a count (5) or a comma-separated list (10,11,12), got {seeds!r}")\
                from None
        if not values:
            raise ReplicationError(f"seeds: expected a count (5) or a comma-separated list (10,11,12), got {seeds!r}")
        return values[0] if len(values) == 1 and "," not in seeds else values
    values = [int(s) for s in seeds]
    if not values or len(set(values)) != len(values):
        raise ReplicationError(f"seeds: expected distinct integers, got {list(seeds)!r}")
    return values


def plan_replication(spec: StudySpec, top_k: int, seeds: int | str | Sequence[int],
                     configs_file: str | os.PathLike | None = None) -> tuple[list[ReplicaConfig], list[int]]:
    """(configurations, seeds) of a replication request, without running anything."""
    study = None
    if configs_file is None:
        study = _optuna_study(spec)
        configs = top_configs(spec, top_k, study)
    else:
        configs = configs_from_file(configs_file, spec)
    wanted = parse_seeds(seeds)
    if isinstance(wanted, int):
        if study is None:
            try:
                study = _optuna_study(spec)
            except ReplicationError:
                study = None  # no search record: fresh means after the study file's seeds
        wanted = fresh_seeds(spec, wanted, study)
    return configs, list(wanted)


def run_replication(
    study_file: str | os.PathLike,
    top_k: int,
    seeds: int | str | Sequence[int],
    configs_file: str | os.PathLike | None = None,
    address: str | None = None,
    resume: bool = False,
    name: str | None = None,
    num_cpus: int | None = None,
    batched: bool = True,
) -> ReplicationSummary:
    """Replicate the ``top_k`` best configurations of the study in ``study_file`` (or those in ``configs_file``)
    with ``seeds`` (a count of fresh seeds, or the seeds themselves), to full budget; return its summary.

    ``address``: None starts a local Ray (or uses this process's); ``auto``/``host:port`` joins a cluster.
    ``resume`` finishes an interrupted replication of the same request (same configs and seeds).
    ``name``: the replication id (default: a hash of the request, see :func:`replication_id`).
    ``batched``: all seeds of a configuration in one Tune trial (:func:`run_replica_seeds`); False: one Tune
    trial per (config, seed). A resumed replication keeps the layout it began with.
    """
    import study.sweep  # noqa: F401  (sets Ray's environment before ray is imported)
    from study import state, tracking

    started = time.monotonic()
    spec = load_spec(study_file)
    configs, seed_list = plan_replication(spec, top_k, seeds, configs_file)
    grid = replication_grid(configs, seed_list)
    rep_id = check_name(name) if name else replication_id(grid)
    exp_dir = experiment_dir(spec, rep_id)
    begun = state.has_begun(exp_dir) or state.has_tune_state(exp_dir)
    if resume and not begun:
        raise ReplicationError(f"{study_file}: --resume: no replication state in {exp_dir} "
                               "(run without --resume to start it)")
    if not resume and begun:
        raise ReplicationError(f"{study_file}: replication {rep_id} already has results in {exp_dir} "
                               "(use --resume to finish it)")

    uri = spec.tracking_uri
    tracking.check_reachable(uri)
    experiment_id = tracking.prepare_experiment(uri, spec.name, Path(spec.results_dir) / "mlartifacts"
                                                if "://" not in spec.results_dir else None)
    study_run = tracking.find_study_run(uri, experiment_id, spec.name)
    if study_run is None:
        raise ReplicationError(f"{study_file}: study {spec.name!r} has no MLflow run at {uri} (run the sweep first)")
    if not resume:
        state.mark_begun(exp_dir)  # before anything is recorded: a --resume can finish what follows
    parent = start_replication_run(uri, experiment_id, spec, study_run, rep_id, configs, seed_list)
    if resume and not state.has_tune_state(exp_dir):  # starts afresh: nothing recorded runs any more
        _reconcile(uri, experiment_id, parent, "lost: the driver stopped before Tune saved its state")

    from study.sweep import connect_ray, disconnect_ray
    from study.trainable import TrialContext

    started_ray = connect_ray(address, num_cpus)
    try:
        context = TrialContext(spec=spec, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent,
                               threads=max(1, int(spec.resources.cpu)))
        items = replication_batches(configs, seed_list) if batched else grid
        tuner = _make_tuner(spec, context, items, exp_dir, resume)
        print(f"replicate {spec.name}: {len(configs)} configs x {len(seed_list)} seeds {seed_list} "
              f"= {len(grid)} runs to {spec.budget.max_steps} steps; MLflow run {parent} ({rep_id})", flush=True)
        for c in configs:
            print(f"  {c.label}: {c.source}: {json.dumps(c.params, default=str)}", flush=True)
        tuner.fit()
        counts = _reconcile(uri, experiment_id, parent, "lost: the run did not finish in this replication")
        tracking.log_study_summary(uri, parent, counts, time.monotonic() - started, spec.objective.metric,
                                   _best_value(uri, experiment_id, parent, spec))
        tracking.finish_study_run(uri, parent, "FINISHED")
        return ReplicationSummary(rep_id, parent, str(exp_dir), configs, seed_list, counts)
    finally:
        if started_ray:
            disconnect_ray()


def cli_replicate(study_file: str, top_k: int = 3, seeds: int | str | Sequence[int] = 3,
                  configs_file: str | None = None, address: str | None = None, resume: bool = False,
                  batched: bool = True) -> int:
    """``mannstudy replicate FILE --top K --seeds S|s1,s2 [--configs FILE] [--address A] [--resume] [--no-batch]``.

    Returns 0, or 2 (one line on stderr) for a request that cannot start; study-file mistakes raise
    SpecError for the command line's usual handling.
    """
    from study.redact import redact
    from study.tracking import TrackingError

    try:
        summary = run_replication(study_file, top_k, seeds, configs_file, address, resume, batched=batched)
    except (ReplicationError, TrackingError) as err:
        print(f"mannstudy: {redact(str(err))}", file=sys.stderr)
        return 2
    print(f"done: {summary.line()}")
    return 0
