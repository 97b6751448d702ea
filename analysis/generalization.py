"""Generalization and robustness of trained models: error against test length, input noise and memory size.

A trained model is a trial's last checkpoint (``mann.train``'s ``checkpoint.pt`` inside Tune's trial
folder, found by the trial id). Three axes, each one :class:`pandas.DataFrame` row per model and
condition, so NTM, DNC and LSTM sit side by side:

``length``  ``task.sample(scale=s, full=True)`` for s in ``scales`` (1x to 4x). Scale 1 is the
            task's full training difficulty (whatever curriculum level the checkpoint reached) and
            scores exactly what ``fit`` reported as ``error`` (same sequences: ``eval_seed``,
            ``eval_batches`` of ``batch_size``). Scale s > 1 draws every size from beyond the full
            training range (:mod:`mann.tasks`). Memory grows with the length as in ``fit``'s own
            generalization metrics when the run has ``gen_scale_memory`` (``ceil(s * N)`` slots),
            so a failure there is not a lack of slots.
``noise``   at scale 1, inputs corrupted with probability / standard deviation ``noise``:
            bit tasks (targets are bits: copy, repeat copy, associative recall, reverse,
            priority sort): each data bit (the first ``task.bits`` input channels) of every step
            before the sequence's first scored output flips with probability p; the control
            channels (delimiters, repeat count, priority) stay clean, so the task stays defined.
            Class tasks (graph, bAbI-style): Gaussian noise N(0, sigma^2) added to every input
            element. ``noise_kind`` says which. The noise has its own generator
            (``eval_seed + 1``), so the sequences are those of the clean evaluation and noise 0
            is exactly the plain evaluation. ``noise_floor`` is the error that copying the noise
            would give (p x scored bits per sequence), so a reader sees what is the model and
            what is the noise.
``memory``  at scale ``memory_scale`` (default: the largest scale), the memory is ``factor * N``
            slots (``model(x, memory_size=...)``; the extra slots start as the model's init
            scheme says). Models without external memory (LSTM) have ``memory_size`` NaN: their
            rows repeat one evaluation, a flat baseline beside the memory models.

Pure PyTorch and pandas: no Ray, no MLflow.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch

from analysis.tidy import final_rows, study_target, validate_tidy
from mann import dispatch
from mann.registry import build_model
from mann.tasks import Batch, Score, Task, build_task
from mann.train import CHECKPOINT_NAME, TrainConfig, config_from_flat_dict, load_checkpoint, resolve_device

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
DEFAULT_NOISES = (0.0, 0.01, 0.05, 0.1, 0.2)
DEFAULT_MEMORY_FACTORS = (1.0, 2.0, 4.0)
AXES = ("length", "noise", "memory")
COLUMNS = (
    "label", "run_id", "model", "seed", "config_id", "axis", "scale", "noise", "noise_kind", "memory_size",
    "memory_factor", "level", "error", "noise_floor", "cost_bits", "accuracy", "target_error", "sequences",
)


class GeneralizationError(ValueError):
    """A checkpoint that cannot be found or does not fit; one line naming the trial or file."""


# ----------------------------------------------------------------------------------------------------------
# Trained models


@dataclass
class Trained:
    """A trained model with the config, task (curriculum state included) and checkpoint it came from."""

    label: str  # how tables and plots name it, e.g. "ntm seed 3"
    cfg: TrainConfig
    model: torch.nn.Module  # in eval mode
    task: Task
    checkpoint: Path | None = None
    run_id: str | None = None
    config_id: str | None = None
    step: int = 0  # training steps the checkpoint had

    @property
    def memory_size(self) -> int | None:
        return getattr(self.cfg.model_cfg, "memory_size", None)

    @property
    def noise_kind(self) -> str:
        return "bit_flip" if self.task.targets_kind == "bits" else "gaussian"


def load_trained(checkpoint: str | Path, device: str = "cpu", label: str | None = None, run_id: str | None = None,
                 config_id: str | None = None) -> Trained:
    """The model of a ``mann.train`` checkpoint (file or its folder), in eval mode on ``device`` (cpu, cuda, auto)."""
    state = load_checkpoint(checkpoint)
    device = resolve_device(device).type
    flat = dict(state["config"])
    flat["device"] = device
    flat["checkpoint_dir"] = None
    cfg = config_from_flat_dict(flat)
    task = build_task(cfg.task, cfg.task_cfg)
    task.load_state_dict(state["task"])  # the curriculum level the run reached: scale 1 is its difficulty
    model = build_model(cfg.model, cfg.model_cfg, task.input_size, task.output_size)
    model.load_state_dict(state["model"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    model = model.to(device=device, dtype=dtype).eval()
    name = label or f"{cfg.model} seed {cfg.seed}"
    return Trained(name, cfg, model, task, Path(checkpoint), run_id, config_id, int(state["step"]))


def find_checkpoint(results_dir: str | Path, trial_id: str) -> Path:
    """The last checkpoint of Tune trial ``trial_id`` under ``<results_dir>/ray/<experiment>/``.

    Trial folders carry the trial id (``run_trial_<id>_...`` for a sweep, ``run_point_<run key>_...`` for a
    replication's point); inside, ``checkpoint_<n>/checkpoint.pt`` with the largest n wins. A seed of a batched
    point has the run key ``<key>.s<seed>`` (``<tune trial id>-s<seed>`` in replications recorded before run
    keys) and its checkpoints in the folder of ``<key>``, as ``checkpoint_<n>/seed-<seed>/checkpoint.pt``
    (study/trainable.py, ``point_dirname``). ``results_dir`` may be a URI
    (``s3://bucket/…``, read through pyarrow as Tune wrote it): the checkpoint is then downloaded once into
    a local cache (:data:`CHECKPOINT_CACHE`) and that copy returned.
    """
    remote = "://" in str(results_dir)
    root = f"{str(results_dir).rstrip('/')}/ray" if remote else str(Path(results_dir) / "ray")
    fs, root_path = pafs.FileSystem.from_uri(root) if remote else (pafs.LocalFileSystem(), root)
    layouts = [(trial_id, CHECKPOINT_NAME)]  # (folder key, path in a checkpoint folder)
    if seeded := _SEED_TRIAL.fullmatch(trial_id):
        layouts.append((seeded["trial"], f"seed-{seeded['seed']}/{CHECKPOINT_NAME}"))

    def folders_in(path: str, pattern: str) -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [i.path for i in infos
                if i.type == pafs.FileType.Directory and fnmatch.fnmatchcase(i.base_name, pattern)]

    experiments = folders_in(root_path, "*")
    found, folders = [], 0
    for base, inner in layouts:
        for folder in [f for experiment in experiments for f in folders_in(experiment, f"*_{base}_*")]:
            folders += 1
            for checkpoint_dir in folders_in(folder, "checkpoint_*"):
                number = checkpoint_dir.rpartition("_")[2]
                if number.isdigit() and fs.get_file_info(f"{checkpoint_dir}/{inner}").type == pafs.FileType.File:
                    found.append((int(number), f"{checkpoint_dir}/{inner}"))
    found.sort()
    if not found:
        base, inner = layouts[-1]
        where = f"{folders} trial folder(s)" if folders else "no trial folder"
        raise GeneralizationError(f"trial {trial_id}: no {inner} under {root}/*/*_{base}_* ({where})")
    if not remote:
        return Path(found[-1][1])
    local = CHECKPOINT_CACHE / hashlib.sha256(f"{root}/{found[-1][1]}".encode()).hexdigest()[:20] / CHECKPOINT_NAME
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(found[-1][1], str(local.with_suffix(".part")), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        local.with_suffix(".part").replace(local)
    return local


CHECKPOINT_CACHE = Path(tempfile.gettempdir()) / "mannstudy-checkpoints"  # checkpoints read from object storage


_SEED_TRIAL = re.compile(r"(?P<trial>.+)[-.]s(?P<seed>\d+)")  # a seed's run key in a batched point


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def corrupt(batch: Batch, task: Task, noise: float, generator: torch.Generator) -> Batch:
    """``batch`` with noisy inputs (see the module docstring); the same batch when ``noise`` is 0.

    Bit tasks: flip probability ``noise`` on the data bits before the first scored step.
    Class tasks: add N(0, noise^2) to every input element.
    """
    if noise < 0 or (task.targets_kind == "bits" and noise > 1):
        raise GeneralizationError(f"noise: expected a flip probability in [0, 1] or a std >= 0, got {noise!r}")
    if noise == 0:
        return batch
    x = batch.inputs
    if task.targets_kind == "bits":
        bits = int(getattr(task.cfg, "bits", x.shape[-1]))
        B, T = batch.mask.shape
        scored = batch.mask > 0
        first = torch.where(scored.any(dim=1), scored.float().argmax(dim=1), torch.full((B,), T))  # [B]
        before = torch.arange(T)[None, :] < first[:, None]  # [B, T]
        flip = (torch.rand(x.shape[:2] + (bits,), generator=generator) < noise) & before[..., None]
        data = x[..., :bits]
        x = torch.cat([torch.where(flip, 1.0 - data, data), x[..., bits:]], dim=-1)
    else:
        x = x + noise * torch.randn(x.shape, generator=generator)
    return Batch(x, batch.targets, batch.mask)


@torch.no_grad()
def evaluate(trained: Trained, scale: float = 1.0, noise: float = 0.0, memory_size: int | None = None,
             eval_seed: int | None = None, batches: int | None = None, batch_size: int | None = None
             ) -> dict[str, float]:
    """``error``, ``cost_bits``, ``accuracy`` over ``batches`` x ``batch_size`` sequences (defaults: the run's),
    with ``noise_floor`` and ``sequences``.

    The same procedure as ``fit``'s held-out evaluation: sizes from the task's full training
    difficulty (``sample(full=True)``, whatever the curriculum's level), scaled by s; the global
    RNG forked and seeded with ``eval_seed`` (a model may draw a random initial memory), task data
    from a generator seeded with ``eval_seed``, scores summed over the sequences
    (:class:`mann.tasks.Score`). ``memory_size`` None: the trained N.

    ``noise_floor``: the error that copying the noise would give, beside the model's: on a bit task
    with flip probability p, p x the scored bits per sequence (a model that reproduces its input
    exactly gets that many bits wrong); NaN for Gaussian noise (class tasks), where no such count exists.
    """
    cfg, task, model = trained.cfg, trained.task, trained.model
    eval_seed = cfg.eval_seed if eval_seed is None else eval_seed
    batches = cfg.eval_batches if batches is None else batches
    batch_size = cfg.batch_size if batch_size is None else batch_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    devices = [device] if device.type == "cuda" else []
    forward = dispatch.forward_fn(model, dispatch.choose(model).path)  # the path fit scores with, here too
    total, scored_bits = Score(), 0.0
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(eval_seed)
        data = torch.Generator().manual_seed(eval_seed)
        noise_gen = torch.Generator().manual_seed(eval_seed + 1)
        for _ in range(batches):
            batch = corrupt(task.sample(batch_size, data, scale=scale, full=True), task, noise, noise_gen)
            inputs = batch.inputs.to(device=device, dtype=dtype)
            targets = batch.targets.to(device=device, dtype=dtype if batch.targets.is_floating_point() else None)
            moved = Batch(inputs, targets, batch.mask.to(device=device, dtype=dtype))
            total = total.plus(task.score(forward(inputs, memory_size=memory_size), moved))
            if task.targets_kind == "bits":
                scored_bits += float(batch.mask.sum()) * batch.targets.shape[-1]
    out = total.metrics()
    sequences = float(batches * batch_size)
    out["noise_floor"] = noise * scored_bits / sequences if task.targets_kind == "bits" else math.nan
    out["sequences"] = sequences
    return out


def _slots(trained: Trained, factor: float) -> int | None:
    n = trained.memory_size
    return None if n is None else int(math.ceil(n * factor))


def generalization_table(
    trained: Iterable[Trained],
    scales: Sequence[float] = DEFAULT_SCALES,
    noises: Sequence[float] = DEFAULT_NOISES,
    memory_factors: Sequence[float] = DEFAULT_MEMORY_FACTORS,
    memory_scale: float | None = None,
    axes: Sequence[str] = AXES,
    batches: int | None = None,
) -> pd.DataFrame:
    """Every model on every condition of the chosen ``axes``: one row each, columns :data:`COLUMNS`.

    ``memory_scale``: the length at which the memory axis is measured (default: the largest scale).
    """
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise GeneralizationError(f"axes: expected some of {', '.join(AXES)}, got {', '.join(unknown)}")
    memory_scale = max(scales) if memory_scale is None else memory_scale
    rows = []
    for t in trained:
        base = {
            "label": t.label, "run_id": t.run_id, "model": t.cfg.model, "seed": t.cfg.seed, "config_id": t.config_id,
            "noise_kind": t.noise_kind, "level": t.task.level, "target_error": t.task.target_error,
        }

        def add(axis: str, scale: float, noise: float, factor: float, slots: int | None, t=t, base=base) -> None:
            metrics = evaluate(t, scale=scale, noise=noise, memory_size=slots, batches=batches)
            memory = slots if slots is not None else t.memory_size
            rows.append({**base, "axis": axis, "scale": float(scale), "noise": float(noise),
                         "memory_size": float(memory) if memory is not None else math.nan,
                         "memory_factor": float(factor), **metrics})

        if "length" in axes:
            for s in scales:
                grow = t.cfg.gen_scale_memory and s > 1
                add("length", s, 0.0, s if grow and t.memory_size else 1.0, _slots(t, s) if grow else None)
        if "noise" in axes:
            for p in noises:
                add("noise", 1.0, p, 1.0, None)
        if "memory" in axes:
            for f in memory_factors:
                add("memory", memory_scale, 0.0, f, _slots(t, f))
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ----------------------------------------------------------------------------------------------------------
# From a study's tidy frame


def best_runs(df: pd.DataFrame, metric: str = "error", per_model: int = 1, max_seeds: int = 3,
              direction: str = "minimize") -> pd.DataFrame:
    """The final rows of the completed runs of the best ``per_model`` configurations of each model.

    Configurations rank as :func:`analysis.stability.rank_configurations` says: on their replication
    runs where a model has any (the search run that chose a configuration is not one of them), else
    on their completed search runs; ties go to the better configuration. At most ``max_seeds`` runs
    of each (the best first) from the runs it was judged on. Columns: the tidy columns plus ``rank``
    (0 = best).
    """
    from analysis.stability import rank_configurations

    validate_tidy(df, [metric])
    finals = final_rows(df)
    done = finals[(finals["status"] == "completed") & np.isfinite(finals[metric].astype(float))]
    if done.empty:
        return done.assign(rank=pd.Series(dtype=int))
    target = study_target(df)
    target = math.inf if target is None else target
    ranked = rank_configurations(df, target, metric, direction)
    picked = []
    for _, row in ranked[ranked["rank"] < per_model].iterrows():
        runs = done[done["run_id"].isin(row["run_ids"])]
        runs = runs.sort_values([metric, "seed"], ascending=[direction == "minimize", True], kind="stable")
        picked.append(runs.head(max_seeds).assign(rank=int(row["rank"])))
    return pd.concat(picked, ignore_index=True)


@dataclass
class StudyGeneralization:
    """Generalization of a study's best configurations: the table, the runs used, the runs skipped and why."""

    table: pd.DataFrame
    runs: pd.DataFrame  # final rows of the runs evaluated (best_runs)
    missing: dict[str, str] = field(default_factory=dict)  # run_id -> why it was not evaluated


def evaluate_study(
    df: pd.DataFrame,
    results_dir: str | Path,
    metric: str = "error",
    per_model: int = 1,
    max_seeds: int = 3,
    device: str = "auto",
    **table_kwargs,
) -> StudyGeneralization:
    """Load the last checkpoint of each run of :func:`best_runs` from ``results_dir`` and tabulate all axes.

    A run whose checkpoint is missing (deleted, on another node's disk) is skipped and listed in
    ``missing`` with the reason. ``table_kwargs`` go to :func:`generalization_table`.
    """
    runs = best_runs(df, metric, per_model, max_seeds)
    trained, missing = [], {}
    for _, row in runs.iterrows():
        label = f"{row['model']} seed {row['seed']}" + (f" (#{row['rank'] + 1})" if per_model > 1 else "")
        try:
            path = find_checkpoint(results_dir, str(row["trial_id"]))
            t = load_trained(path, device, label, str(row["run_id"]), str(row["config_id"]))
        except Exception as err:  # CheckpointError, GeneralizationError, a model that no longer loads
            missing[str(row["run_id"])] = " ".join(str(err).split())[:300]
            continue
        if t.cfg.seed != int(row["seed"]) or t.cfg.model != row["model"]:
            missing[str(row["run_id"])] = f"{path}: checkpoint of {t.cfg.model} seed {t.cfg.seed}, not of this run"
            continue
        trained.append(t)
    table = generalization_table(trained, **table_kwargs) if trained else pd.DataFrame(columns=list(COLUMNS))
    return StudyGeneralization(table, runs, missing)
