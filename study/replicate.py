"""``mannstudy replicate FILE``: re-run a finished study's best configurations with fresh seeds, to full budget.

A search ranks configurations on one seed each (or a few); which of its top configurations is
really best, and how reliably each learns, needs more seeds. A replication takes the K best
distinct configurations of the study's Optuna record (COMPLETE trials ranked by value; a
configuration that ran under several seeds ranks by its best trial), or the configurations
listed in a YAML file, and runs each with S seeds the study never used (the search's own runs are
not repeated), every run to ``budget.max_steps``.

It is a sweep of a fixed grid, configurations x seeds: :func:`study.sweep.make_tuner` with ``grid``
(no searcher, no scheduler: no early stopping), the sweep's trainable (:func:`study.trainable.run_point`),
callbacks, kept state (:mod:`study.state`) and :func:`study.sweep.reconcile` (``searched=False``). What is
its own is here: which configurations and seeds, the grid, and the names. Each (config, seed) pair is one
MLflow run whose run key (``mannstudy.trial_id``) is ``<id>.c<i>.s<seed>`` (:func:`run_key`), so a resumed
replication finds every run it began, with or without Tune's state, and accounts for each pair once (a
pair that failed is retried in its own run). By default all seeds of a configuration train in ONE Tune
trial as one batched model (:func:`mann.multiseed.fit_seeds`); ``seeds_per_trial`` splits them (1: one
trial per pair).

MLflow layout (names in :mod:`study.record`; read by :mod:`analysis.load`)::

    experiment <study>
      run mannstudy.kind=study                      the study's parent run
        run mannstudy.kind=replication              one per replication, nested under the study's run
            mannstudy.replication=<id>              id: rep-<hash of the (config, seed) list>, or given
            mannstudy.study=<study>, mannstudy.study_run=<parent run id>
            artifact replication.json               the configurations (with where each came from) and seeds
          run mannstudy.kind=trial                  one per (config, seed), as in a sweep;
                                                    mannstudy.trial_id=<id>.c<i>.s<seed>

Tune's state lives in ``<results_dir>/ray/<id>/`` (a local folder or a URI, as the sweep's), trial folders
``run_point_<id>.c<i>.s<seed>_<trial id>``, or ``run_point_<id>.c<i>_x<S>_<trial id>`` for S seeds batched
(checkpoints ``checkpoint_<n>/seed-<s>/`` inside), so ``resume=True`` finishes an interrupted replication with
``Tuner.restore``; a resumed replication keeps the layout it began with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mann.config import ConfigError
from study.spec import MODEL_PARAM, SEED_ATTR, SpecError, StudySpec, load_spec, read_yaml, trial_overrides

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
    """Every (configuration, seed) pair, configuration-major: one MLflow run each.

    The one place the pairs are made (:func:`replication_points` groups them into Tune trials). Each item:
    ``config`` (index), ``label``, ``params``, ``seed``.
    """
    return [{"config": i, "label": c.label, "params": dict(c.params), "seed": int(s)}
            for i, c in enumerate(configs) for s in seeds]


def run_key(rep_id: str, label: str, seed: int) -> str:
    """The run key of one (configuration, seed) pair, its MLflow run's ``mannstudy.trial_id``: ``<id>.<label>.s<seed>``.

    Chosen here, not by Tune, so that a resumed replication finds each pair's run whatever Tune's state holds
    (a pair that failed is retried in its own run, never beside it)."""
    return f"{rep_id}.{label}.s{seed}"


def replication_points(rep_id: str, grid: Sequence[Mapping[str, Any]],
                       seeds_per_trial: int | None = None) -> list[dict]:
    """The Tune grid of a replication (points as :func:`study.trainable.run_point` reads them): each configuration's
    pairs of ``grid`` in trials of ``seeds_per_trial`` seeds, trained as one batched model (None: all its seeds in
    one trial; 1: one trial per pair). A point's key is its run key for one seed, ``<id>.<label>`` for several."""
    if seeds_per_trial is not None and (isinstance(seeds_per_trial, bool) or not isinstance(seeds_per_trial, int)
                                        or seeds_per_trial < 1):
        raise ReplicationError(f"seeds_per_trial: expected a positive integer, got {seeds_per_trial!r}")
    by_config: dict[int, list[Mapping[str, Any]]] = {}
    for pair in grid:
        by_config.setdefault(pair["config"], []).append(pair)
    points = []
    for pairs in by_config.values():
        size = seeds_per_trial or len(pairs)
        for i in range(0, len(pairs), size):
            group = pairs[i:i + size]
            label, seeds = group[0]["label"], [int(p["seed"]) for p in group]
            keys = [run_key(rep_id, label, s) for s in seeds]
            points.append({"key": keys[0] if len(seeds) == 1 else f"{rep_id}.{label}",
                           "config": dict(group[0]["params"]), "seeds": seeds, "keys": keys})
    return points


def replication_id(grid: Sequence[Mapping[str, Any]]) -> str:
    """``rep-<8 hex>``: a hash of the (config, seed) list, so the same request finds its earlier run on resume."""
    text = json.dumps([{"params": g["params"], "seed": g["seed"]} for g in grid], sort_keys=True, default=str)
    return ID_PREFIX + hashlib.sha1(text.encode()).hexdigest()[:8]


def check_name(name: str) -> str:
    """A replication id from a user's name: letters, digits, ``_ . -``; ``rep-`` prepended when missing."""
    if not _ID.match(name):
        raise ReplicationError(f"replication name {name!r}: expected letters, digits, '_', '.', '-' "
                               "(it names a folder and an MLflow tag)")
    return name if name.startswith(ID_PREFIX) else ID_PREFIX + name


# ----------------------------------------------------------------------------------------------------------
# MLflow: the replication's parent run


def start_replication_run(uri: str, experiment_id: str, spec: StudySpec, study_run_id: str, rep_id: str,
                          configs: Sequence[ReplicaConfig], seeds: Sequence[int]) -> str:
    """Get or create the replication's parent run (nested under the study's run); return its id."""
    from study import tracking

    record = {"replication": rep_id, "study": spec.name, "seeds": list(seeds),
              "configs": [{"label": c.label, "params": c.params, "source": c.source} for c in configs]}
    return tracking.start_replication_run(uri, experiment_id, spec.name, study_run_id, rep_id, seeds, record)


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
    seeds_per_trial: int | None = None,
) -> ReplicationSummary:
    """Replicate the ``top_k`` best configurations of the study in ``study_file`` (or those in ``configs_file``)
    with ``seeds`` (a count of fresh seeds, or the seeds themselves), to full budget; return its summary.

    ``address``: None starts a local Ray (or uses this process's); ``auto``/``host:port`` joins a cluster.
    ``resume`` finishes an interrupted replication of the same request (same configs and seeds).
    ``name``: the replication id (default: a hash of the request, see :func:`replication_id`).
    ``seeds_per_trial``: seeds of a configuration trained as one batched model in one Tune trial (None: all of
    them; 1: one trial per (config, seed)). A resumed replication keeps the layout it began with.
    The sweep's machinery runs it: :func:`study.sweep.make_tuner` with the grid, :func:`study.sweep.reconcile`
    without an Optuna study.
    """
    from study import state, tracking
    from study.sweep import experiment_dir, make_tuner, run_job

    spec = load_spec(study_file)
    configs, seed_list = plan_replication(spec, top_k, seeds, configs_file)
    grid = replication_grid(configs, seed_list)
    rep_id = check_name(name) if name else replication_id(grid)
    points = replication_points(rep_id, grid, seeds_per_trial)
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
    experiment_id = tracking.find_experiment(uri, spec.name)
    study_run = tracking.find_study_run(uri, experiment_id, spec.name) if experiment_id else None
    if study_run is None:
        raise ReplicationError(f"{study_file}: study {spec.name!r} has no MLflow run at {uri} (run the sweep first)")

    def start_run(experiment_id: str) -> str:
        return start_replication_run(uri, experiment_id, spec, study_run, rep_id, configs, seed_list)

    def make(context):
        # A resume without Tune's state starts the grid afresh: its trials find their runs by run key.
        tuner = make_tuner(spec, context, resume, grid=points, name=rep_id)
        print(f"replicate {spec.name}: {len(configs)} configs x {len(seed_list)} seeds {seed_list} "
              f"= {len(grid)} runs to {spec.budget.max_steps} steps; MLflow run {context.parent_run_id} ({rep_id})",
              flush=True)
        for c in configs:
            print(f"  {c.label}: {c.source}: {json.dumps(c.params, default=str)}", flush=True)
        return tuner

    def outcome(parent: str):
        counts, best = _outcome(uri, experiment_id, parent, spec)
        return ReplicationSummary(rep_id, parent, exp_dir, configs, seed_list, counts), counts, best

    return run_job(spec, str(study_file), exp_dir, resume, start_run, make, outcome, address=address,
                   num_cpus=num_cpus, searched=False, lost_reason="lost: the run did not finish in this replication")


def _outcome(uri: str, experiment_id: str, parent_run_id: str, spec: StudySpec) -> tuple[dict[str, int], float | None]:
    """(child runs per status, the best objective among the completed ones (their last value) or None)."""
    from study.record import RUNNING, TAG_STATUS
    from study.tracking import trial_runs

    runs = trial_runs(uri, experiment_id, parent_run_id)
    counts: dict[str, int] = {}
    for run in runs:
        status = run.data.tags.get(TAG_STATUS, RUNNING)
        counts[status] = counts.get(status, 0) + 1
    metric = spec.objective.metric
    values = [run.data.metrics[metric] for run in runs
              if run.data.tags.get(TAG_STATUS) == "completed" and metric in run.data.metrics]
    best = (min(values) if spec.objective.mode == "min" else max(values)) if values else None
    return counts, best


def cli_replicate(study_file: str, top_k: int = 3, seeds: int | str | Sequence[int] = 3,
                  configs_file: str | None = None, address: str | None = None, resume: bool = False,
                  seeds_per_trial: int | None = None) -> int:
    """``mannstudy replicate FILE --top K --seeds S|s1,s2 [--configs FILE] [--address A] [--resume]
    [--seeds-per-trial N | --no-batch]``.

    Returns 0, or 2 (one line on stderr) for a request that cannot start; study-file mistakes raise
    SpecError for the command line's usual handling.
    """
    from study.redact import redact
    from study.tracking import TrackingError

    try:
        summary = run_replication(study_file, top_k, seeds, configs_file, address, resume,
                                  seeds_per_trial=seeds_per_trial)
    except (ReplicationError, TrackingError) as err:
        print(f"mannstudy: {redact(str(err))}", file=sys.stderr)
        return 2
    print(f"done: {summary.line()}")
    return 0
