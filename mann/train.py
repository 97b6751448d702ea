"""Training: one run of one model on one task, alone (no Ray, no MLflow).

``fit(config, on_eval)`` is the whole life of a trial: seed, build, train with clipping and
divergence detection, evaluate periodically, step the curriculum, stop on convergence, evaluate
once more at the end, checkpoint, resume. The study's trainable wraps it and turns ``on_eval`` into
``tune.report``; the command line wraps it with a progress line.

Evaluation protocol (docs/metrics.md has every metric's unit, :data:`mann.tasks.METRIC_UNITS`):

- ``error``, ``cost_bits``, ``accuracy``: at the task's full training difficulty (its maximum
  length / items / nodes / repeats, whatever the curriculum's level) on a held-out set of
  ``eval_batches * batch_size`` sequences drawn from ``eval_seed``: the same sequences at every
  evaluation and for every seed, so every run of a study is scored on the same task.
- ``gen{s}x_error`` / ``_cost_bits`` / ``_accuracy``: the same at ``s`` times the full difficulty,
  drawn from the same generator after the full-difficulty set.
- ``curriculum_error`` and ``level``: the error at the curriculum's current difficulty, on
  promotion data drawn from :func:`promotion_seed` (never the held-out set). The curriculum
  promotes on it. With the curriculum off it is still measured (the current difficulty is then the
  full one), so every run has the same columns.
- ``final_*``: every run ends with a final evaluation of ``error``, ``cost_bits``, ``accuracy`` and
  the generalization metrics on ``final_eval_sequences`` held-out sequences from ``eval_seed``
  (whose first ``eval_batches * batch_size`` at 1x are the periodic set). It runs whatever the end:
  the budget spent, convergence, an on_eval stop, or divergence (the loop never applies an update
  from a non-finite loss or gradient, so a diverged run's weights are those of its last step;
  when a finite update overflowed them to inf, as an absurd learning rate does, the final
  evaluation is skipped and the message says so). When the end is known at
  an evaluation (the last step, or convergence) its metrics are in that evaluation's on_eval call;
  otherwise (on_eval stop, divergence) only in ``FitResult.metrics``.
- Convergence: with ``stop_at_error`` set, the run stops once ``error <= stop_at_error`` on
  ``stop_after_evals`` consecutive evaluations. It finished what was asked, so its status is
  ``completed``, with ``converged_step`` (the step of the first of those evaluations) in its metrics.

Determinism: ``torch.manual_seed(seed)`` before building the model fixes the initial weights;
training batches come from a ``torch.Generator`` seeded with ``seed``; evaluation batches from
generators re-seeded at every evaluation (``eval_seed``, :func:`promotion_seed`). A checkpoint
holds everything the loop reads (weights, optimizer moments, data generator, curriculum,
convergence count, step), so a resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from mann import dispatch
from mann.config import ConfigError, check, flatten, quoted, replace_checked, to_dict
from mann.optim import Adam, FlatParams, RMSprop, bias_mask, grad_norm
from mann.registry import build_model, make_model_config, model_entry
from mann.tasks import Score, build_task, make_task_config

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mannstudy-checkpoint-1"  # bump when the checkpoint layout changes
FINAL_PREFIX = "final_"  # the final evaluation's metrics: final_error, final_cost_bits, final_gen2x_error, ...
END_METRICS = (FINAL_PREFIX, "converged_step")  # name prefixes of the metrics a run logs once, at its end
_NESTED = ("model_cfg", "task_cfg")  # set through model.* / task.* keys, never directly


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; ``model_cfg``/``task_cfg`` default to the named model's/task's."""

    model: str = "ntm"  # a name in mann.registry.MODELS
    task: str = "copy"  # a name in mann.tasks.TASKS
    model_cfg: Any = None  # the model's resolved config object (make_model_config)
    task_cfg: Any = None  # the task's resolved config object (make_task_config)
    # Graves 2014 trained with RMSProp (Graves 2013's variant: centered, momentum 0.9, decay 0.95) at lr 1e-4;
    # Adam at 1e-3 learns the small tasks faster and is what most later work uses.
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    lr: float = 1e-4
    momentum: float = 0.9  # RMSProp momentum (ignored by Adam)
    alpha: float = 0.95  # RMSProp decay of the squared-gradient average (ignored by Adam)
    centered: bool = True  # RMSProp divides by the gradient's estimated std, as Graves 2013 (ignored by Adam)
    eps: float = 1e-8  # added after the square root (PyTorch's placement; Graves 2013 adds 1e-4 under it)
    weight_decay: float = 0.0  # L2: weight_decay * w added to the gradient before the update (torch.optim's)
    decay_biases: bool = False  # weight decay on biases too (Csordás & Schmidhuber decay weights only)
    batch_size: int = 16
    max_steps: int = 50_000  # optimizer updates; the run's budget
    clip_norm: float | None = None  # rescale the whole gradient to at most this L2 norm
    clip_value: float | None = 10.0  # then clip each gradient element to [-v, v] (Graves 2014 clipped to (-10, 10))
    seed: int = 0  # initial weights and training data
    eval_seed: int = 12345  # evaluation data: the same for every evaluation and every seed, so scores compare
    eval_every: int = 500  # steps between evaluations (and on_eval calls); the last step is always evaluated
    eval_batches: int = 4  # batches of batch_size sequences per evaluation and per scale
    final_eval_sequences: int = 640  # held-out sequences of the final evaluation, per scale (Collier & Beel: 640)
    stop_at_error: float | None = None  # stop once error <= this on stop_after_evals consecutive evaluations
    stop_after_evals: int = 2
    gen_scales: tuple[float, ...] = (2.0, 4.0)  # generalization: difficulty multipliers evaluated besides 1x
    gen_scale_memory: bool = True  # give a scale-s evaluation s times the memory slots, so failures are not capacity
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    dtype: Literal["float32", "float64"] = "float32"  # float64 for numerical checks
    checkpoint_dir: str | None = None  # when set, fit writes <dir>/checkpoint.pt (latest only) ...
    checkpoint_every: int = 1  # ... every this many evaluations, and at the end of the run

    def __post_init__(self):
        # Resolve the nested configs here so TrainConfig(model="dnc") alone is complete.
        if self.model_cfg is None:
            object.__setattr__(self, "model_cfg", make_model_config(self.model))
        else:
            cls = model_entry(self.model).config_cls()
            check(isinstance(self.model_cfg, cls), "model_cfg", f"a {cls.__name__}", type(self.model_cfg).__name__)
        if self.task_cfg is None:
            object.__setattr__(self, "task_cfg", make_task_config(self.task))
        else:
            default = make_task_config(self.task)
            check(type(self.task_cfg) is type(default), "task_cfg", f"a {type(default).__name__}",
                  type(self.task_cfg).__name__)
        check(math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        check(0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        check(0 < self.alpha < 1, "alpha", "a number in (0, 1)", self.alpha)
        check(self.eps > 0, "eps", "a positive number", self.eps)
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0",
              self.weight_decay)
        check(self.batch_size >= 1, "batch_size", "a positive integer", self.batch_size)
        check(self.max_steps >= 1, "max_steps", "a positive integer", self.max_steps)
        for key in ("clip_norm", "clip_value"):
            value = getattr(self, key)
            check(value is None or value > 0, key, "a positive number or null", value)
        check(self.eval_every >= 1, "eval_every", "a positive integer", self.eval_every)
        check(self.eval_batches >= 1, "eval_batches", "a positive integer", self.eval_batches)
        check(self.final_eval_sequences >= 1, "final_eval_sequences", "a positive integer", self.final_eval_sequences)
        check(self.stop_at_error is None or (math.isfinite(self.stop_at_error) and self.stop_at_error >= 0),
              "stop_at_error", "a non-negative number or null", self.stop_at_error)
        check(self.stop_after_evals >= 1, "stop_after_evals", "a positive integer", self.stop_after_evals)
        check(all(s > 1 for s in self.gen_scales), "gen_scales", "a list of numbers > 1", self.gen_scales)
        check(self.checkpoint_every >= 1, "checkpoint_every", "a positive integer", self.checkpoint_every)


def _top_level_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _NESTED]


def make_train_config(
    model: str = "ntm", task: str = "copy", overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A TrainConfig from dotted overrides: ``lr``, ``model.memory_size``, ``task.max_length``.

    ``model``/``task`` may also be given as keys (a study may sweep over them). Unknown keys and
    bad values raise ConfigError naming the key.
    """
    overrides = dict(overrides or {})
    model = str(overrides.pop("model", model))
    task = str(overrides.pop("task", task))
    top, model_over, task_over = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("model."):
            model_over[key.removeprefix("model.")] = value
        elif key.startswith("task."):
            task_over[key.removeprefix("task.")] = value
        elif key in _top_level_keys():
            top[key] = value
        else:
            known = ", ".join([*_top_level_keys(), "model.<field>", "task.<field>"])
            raise ConfigError(key, f"a known key ({known})")
    model_cfg = make_model_config(model, model_over)
    task_cfg = make_task_config(task, task_over)
    return replace_checked(TrainConfig(model=model, task=task, model_cfg=model_cfg, task_cfg=task_cfg), top)


def config_to_flat_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted keys -> plain values (lists for tuples): MLflow params, checkpoints, study files."""
    top = {name: to_dict(getattr(cfg, name)) for name in _top_level_keys()}
    return {**top, **flatten({"model": to_dict(cfg.model_cfg), "task": to_dict(cfg.task_cfg)})}


def config_from_flat_dict(flat: Mapping[str, Any]) -> TrainConfig:
    """The inverse of config_to_flat_dict (also accepts a partial dict: missing keys take defaults)."""
    flat = dict(flat)
    flat.pop("model.impl", None)  # recorded by runs from before the choice moved to mann.dispatch: not a setting
    return make_train_config(flat.pop("model", "ntm"), flat.pop("task", "copy"), flat)


class FitResult(NamedTuple):
    # completed: the budget spent, or converged (metrics hold converged_step); stopped: on_eval asked;
    # diverged: a non-finite loss, gradient or optimizer step
    status: Literal["completed", "diverged", "stopped"]
    step: int  # the last step taken (for diverged: the step whose loss or gradient was not finite)
    metrics: dict[str, float]  # the last evaluation's metrics ({} if none happened) and the final evaluation's final_*
    message: str  # one line for people
    checkpoint: Path | None = None  # the last checkpoint written by fit itself (checkpoint_dir), if any


def promotion_seed(eval_seed: int) -> int:
    """Seed of the curriculum's promotion data: fixed for a run, never the held-out set's ``eval_seed``.

    PyTorch's CPU generator draws the same stream for seeds equal in their low 32 bits, so those must differ.
    """
    return (eval_seed ^ 0x9E3779B9) & 0xFFFFFFFF


class Convergence(NamedTuple):
    """The current streak of evaluations with error <= stop_at_error: how many, and the step of the first."""

    count: int = 0
    since: int = -1


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not fit the run: one line naming the file."""


# ----------------------------------------------------------------------------------------------------------------------
# The run: everything fit touches, with its state as one checkpointable dict.


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "'cpu' or 'auto' (no CUDA device is available)", name)
    return torch.device(name)


def build_optimizer(cfg: TrainConfig, flat: FlatParams, names: list[str] | None = None) -> Adam | RMSprop:
    """The run's optimizer on ``flat``; ``names`` (the parameters' names, in order) tell weights from biases when
    weight decay spares the biases (needed then)."""
    decay = None
    if cfg.weight_decay > 0 and not cfg.decay_biases:
        if names is None:
            raise ValueError("build_optimizer: weight decay without decay_biases needs the parameters' names")
        decay = bias_mask(flat, names)
    if cfg.optimizer == "adam":
        return Adam(flat, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, decay=decay)
    return RMSprop(flat, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, centered=cfg.centered,
                   weight_decay=cfg.weight_decay, decay=decay)


class _Run:
    """Model, optimizer, task and data generator of one run, and the train/eval steps on them."""

    def __init__(self, cfg: TrainConfig, impl: str | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        self.task = build_task(cfg.task, cfg.task_cfg)
        torch.manual_seed(cfg.seed)  # initial weights
        model = build_model(cfg.model, cfg.model_cfg, self.task.input_size, self.task.output_size)
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.path = dispatch.choose(self.model, impl).path  # the reference, or its accelerated path here
        self.forward = dispatch.forward_fn(self.model, self.path)
        # the trained weights and their gradients as views of two flat tensors (mann.optim)
        trained = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.flat = FlatParams([p for _, p in trained])
        self.optimizer = build_optimizer(cfg, self.flat, [name for name, _ in trained])
        self.generator = torch.Generator().manual_seed(cfg.seed)  # training data (tasks sample on the CPU)
        self.step = 0
        self.wall_time = 0.0  # seconds spent training (evaluation and checkpointing excluded)
        self.metrics: dict[str, float] = {}  # the last evaluation's
        self.convergence = Convergence()
        self.final: dict[str, float] | None = None  # the final evaluation's final_* metrics, once run

    def _to_device(self, batch):
        """Batch tensors on the run's device; float tensors in the run's dtype (class targets stay long)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            dtype = self.dtype if t.is_floating_point() else None
            return t.to(device=self.device, dtype=dtype, non_blocking=True)

        return type(batch)(*(move(t) for t in batch))

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on a fresh batch. Returns (loss, gradient norm before clipping), both 0-d tensors.

        The caller checks them for divergence *before* calling :meth:`apply_update`, so a
        non-finite gradient never reaches the weights.
        """
        batch = self._to_device(self.task.sample(self.cfg.batch_size, self.generator))
        logits = self.forward(batch.inputs)
        loss = self.task.loss(logits, batch)
        self.optimizer.zero_grad()
        loss.backward()
        return loss.detach(), grad_norm(self.flat)

    def apply_update(self, norm: torch.Tensor) -> str | None:
        """Clip and step. Returns None, or why the step overflowed (a divergence, e.g. Adam's lr / (1 - β1^t))."""
        self.flat.gather_grads()  # gradients a caller assigned (mann.multiseed) into the flat buffer
        grad = self.flat.grad
        with torch.no_grad():
            if self.cfg.clip_norm is not None:  # as torch.nn.utils.clip_grads_with_norm_, on the flat buffer
                grad.mul_(torch.clamp(self.cfg.clip_norm / (norm + 1e-6), max=1.0))
            if self.cfg.clip_value is not None:
                grad.clamp_(-self.cfg.clip_value, self.cfg.clip_value)
        try:
            self.optimizer.step()
        except RuntimeError as err:
            if "overflow" not in str(err):
                raise
            return str(err).strip().splitlines()[0]
        return None

    def divergence(self, loss: torch.Tensor, norm: torch.Tensor, overflow: str | None) -> str:
        """Why the last step diverged: its optimizer step overflowed, or its loss or gradient norm is not finite."""
        if overflow is not None:
            return f"the optimizer step overflowed ({overflow})"
        return f"loss is {loss.item()}" if not torch.isfinite(loss) else f"gradient norm is {norm.item()}"

    def evaluate_and_advance(self, train_loss: float) -> dict[str, float]:
        """Evaluate (``self.metrics``), let the curriculum (a no-op when off) advance on curriculum_error, count
        convergence. When the run ends here (its last step, or converged) the final evaluation runs too and its
        final_* metrics are in the returned dict (not in ``self.metrics``, which checkpoints keep).

        The level reported is the one just evaluated; a checkpoint taken after this carries the updated one."""
        metrics = self.evaluate(train_loss)
        self.task.update_curriculum(metrics["curriculum_error"])
        if self.cfg.stop_at_error is not None:
            if metrics["error"] <= self.cfg.stop_at_error:  # NaN never counts
                count, since = self.convergence
                self.convergence = Convergence(count + 1, since if count else self.step)
            else:
                self.convergence = Convergence()
        if self.converged_step is not None:
            metrics["converged_step"] = self.converged_step
        self.metrics = metrics
        if self.step >= self.cfg.max_steps or self.converged_step is not None:
            return {**metrics, **self.final_evaluation()}
        return dict(metrics)

    @property
    def converged_step(self) -> int | None:
        """Step of the first of stop_after_evals consecutive evaluations with error <= stop_at_error, or None."""
        if self.cfg.stop_at_error is None or self.convergence.count < self.cfg.stop_after_evals:
            return None
        return self.convergence.since

    def final_evaluation(self) -> dict[str, float]:
        """final_* metrics on final_eval_sequences held-out sequences per scale (once; {} if a weight is not finite)."""
        if self.final is None:
            finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
            self.final = self.evaluate_held_out(self.cfg.final_eval_sequences, FINAL_PREFIX) if finite else {}
        return self.final

    def result(self, status: str, checkpoint: Path | None, message: str | None = None) -> FitResult:
        """The FitResult of this run ending now with ``status``: the final evaluation runs here if it has not yet."""
        final = self.final_evaluation()
        message = message or self.end_message(status)
        if not final:
            message += " (no final evaluation: a weight is not finite)"
        return FitResult(status, self.step, {**self.metrics, **final}, message, checkpoint)

    def end_message(self, status: str) -> str:
        """"<status> at step <n> [(converged at step <m>)]: <final error, cost, accuracy>" for a FitResult."""
        metrics = {**self.metrics, **(self.final or {})}
        prefix = FINAL_PREFIX if self.final else ""
        summary = ", ".join(f"{prefix}{k} {metrics[prefix + k]:.4g}" for k in ("error", "cost_bits", "accuracy")
                            if prefix + k in metrics)
        converged = f" (converged at step {self.converged_step})" if self.converged_step is not None else ""
        return f"{status} at step {self.step}{converged}" + (f": {summary}" if summary else "")

    def evaluate(self, train_loss: float) -> dict[str, float]:
        """One periodic evaluation: the held-out metrics, then curriculum_error on the promotion data."""
        cfg = self.cfg
        metrics: dict[str, float] = {
            "step": self.step,
            "sequences": self.step * cfg.batch_size,
            "wall_time": self.wall_time,
            "train_loss": train_loss,
            **self.evaluate_held_out(cfg.eval_batches * cfg.batch_size),
        }
        seed = promotion_seed(cfg.eval_seed)
        promotion_data = torch.Generator().manual_seed(seed)
        promotion = self._scored(self.task.sample, cfg.eval_batches * cfg.batch_size, promotion_data, seed)
        metrics["curriculum_error"] = promotion.metrics()["error"]
        metrics["level"] = self.task.level
        return metrics

    def evaluate_held_out(self, sequences: int, prefix: str = "") -> dict[str, float]:
        """error, cost_bits, accuracy of ``sequences`` held-out sequences (eval_seed) at full difficulty, then at
        each generalization scale: ``{prefix}error``, ..., ``{prefix}gen{s}x_error``, ..."""
        seed = self.cfg.eval_seed
        data = torch.Generator().manual_seed(seed)  # one stream: the 1x set, then each scale's
        full = self._scored(lambda n, g: self.task.sample(n, g, full=True), sequences, data, seed)
        metrics = {prefix + name: value for name, value in full.metrics().items()}
        memory_size = getattr(self.cfg.model_cfg, "memory_size", None)
        for scale in self.cfg.gen_scales:
            slots = None
            if self.cfg.gen_scale_memory and memory_size is not None:
                slots = int(math.ceil(memory_size * scale))
            sample = lambda n, g, scale=scale: self.task.sample(n, g, scale=scale)  # noqa: E731
            score = self._scored(sample, sequences, data, seed, slots)
            for name, value in score.metrics().items():
                metrics[f"{prefix}gen{scale:g}x_{name}"] = value
        return metrics

    @torch.no_grad()
    def _scored(self, sample: Callable[[int, torch.Generator], Any], sequences: int, data: torch.Generator,
                rng_seed: int, memory_size: int | None = None) -> Score:
        """The summed Score of ``sequences`` sequences from ``sample(n, data)``, in batches of at most batch_size.

        A model may draw from the global RNG (e.g. a random initial memory): it runs on a fork seeded with
        ``rng_seed``, so scores are reproducible and the training RNG stays exactly where it was.
        """
        devices = [self.device] if self.device.type == "cuda" else []  # [] forks only the CPU generator
        total = Score()
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(rng_seed)
            self.model.eval()
            for start in range(0, sequences, self.cfg.batch_size):
                batch = self._to_device(sample(min(self.cfg.batch_size, sequences - start), data))
                logits = self.forward(batch.inputs, memory_size=memory_size)
                total = total.plus(self.task.score(logits, batch))
            self.model.train()
        return total

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_flat_dict(self.cfg),
            "step": self.step,
            "wall_time": self.wall_time,
            "metrics": dict(self.metrics),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_generator": self.generator.get_state(),
            "task": self.task.state_dict(),
            "rng": self._rng_state(),  # global RNG, which models may use (e.g. NTM's random initial memory)
            "convergence": self.convergence._asdict(),  # optional on load: checkpoints without it had no stop_at_error
        }

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write <directory>/checkpoint.pt atomically (a crash mid-write leaves the previous one intact)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_NAME
        tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        path = checkpoint_path(path)
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.task.load_state_dict(state["task"])
            self.generator.set_state(state["data_generator"])
            self._set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise CheckpointError(f"{path}: model: expected a checkpoint of this run's model and task, "
                                  f"got one that does not fit ({quoted(detail)})") from None
        self.step = int(state["step"])
        self.wall_time = float(state["wall_time"])
        self.metrics = dict(state["metrics"])
        self.convergence = Convergence(**state.get("convergence", {}))


_CHECKPOINT_KEYS = (
    "format", "config", "step", "wall_time", "metrics", "model", "optimizer", "data_generator", "task", "rng",
)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a directory holding checkpoint.pt."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's state dict (tensors on the CPU), or CheckpointError naming the file and what was expected."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (expected a {CHECKPOINT_NAME} written by mannstudy)")
    # torch.save writes a zip archive: anything else (random bytes, a truncated copy, another format) is no
    # checkpoint, whatever torch.load would complain about.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: file: expected a mannstudy checkpoint (the zip archive torch.save writes), "
                              f"got {path.stat().st_size:,} bytes that are not one (truncated, or another file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, zip errors)
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: file: expected a mannstudy checkpoint holding only tensors and plain "
                              f"values, got a torch file that does not load ({quoted(detail)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: format: expected checkpoint format {CHECKPOINT_FORMAT!r}, got {quoted(got)}")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: {missing[0]}: expected checkpoint keys {', '.join(missing)} (missing)")
    config = state["config"]
    if not (isinstance(config, dict) and all(isinstance(k, str) for k in config)
            and isinstance(config.get("model"), str) and isinstance(config.get("task"), str)):
        raise CheckpointError(f"{path}: config: expected a mapping of config keys with the model and task "
                              f"names, got {quoted(config)}")
    return state


def check_checkpoint_dir(directory: str | os.PathLike, resuming: str | os.PathLike | None = None) -> Path:
    """Make ``directory`` for fit's checkpoints, or ConfigError(checkpoint_dir) before any training.

    Refused: a path that is (or lies under) an existing file, a folder that cannot be made, and a folder that
    already holds the checkpoint of another run (a new run would overwrite it; ``resuming`` names the
    checkpoint a run continues from, which it may replace).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError("checkpoint_dir", "a folder for checkpoint.pt, not an existing file", source=str(directory))
    existing = directory / CHECKPOINT_NAME
    if existing.exists() and not (resuming is not None and checkpoint_path(resuming).resolve() == existing.resolve()):
        raise ConfigError("checkpoint_dir", f"a folder without a {CHECKPOINT_NAME} of another run (continue that "
                          "run with --resume, or choose another folder)", source=str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("checkpoint_dir", f"a folder that can be made ({err.strerror or err})",
                          source=str(directory)) from None
    return directory


def config_from_checkpoint(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was written with, with optional dotted overrides (e.g. a larger max_steps)."""
    path = checkpoint_path(path)
    flat = dict(load_checkpoint(path)["config"])
    flat.update(overrides or {})
    return config_from_flat_dict(flat)


# ----------------------------------------------------------------------------------------------------------------------


OnEval = Callable[[dict[str, float], Callable[[str | os.PathLike], Path]], bool | None]


def fit(config: TrainConfig, on_eval: OnEval | None = None, resume_from: str | os.PathLike | None = None,
        impl: str | None = None) -> FitResult:
    """Train ``config`` to its budget, convergence, an on_eval stop request, or divergence, then run the final
    evaluation (module docstring). Never raises for divergence.

    ``on_eval(metrics, save_checkpoint)`` is called after each evaluation (and the task's
    curriculum update); ``save_checkpoint(dir)`` writes ``dir/checkpoint.pt`` and returns its path. Returning
    True stops the run. ``resume_from`` (a checkpoint file or its directory) continues a run
    exactly where it was saved. ``impl``: how the model runs (mann.dispatch; None: ``$MANN_IMPL`` or auto), the same
    maths on any path.
    """
    cfg = config
    run = _Run(cfg, impl)
    if resume_from is not None:
        run.load(resume_from)
    last_checkpoint: Path | None = None
    saved_at = -1
    evaluations = 0
    # Accumulated on the device: reading the loss every step would add a sync we only pay at evaluations.
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)
    loss_count = 0
    started = time.perf_counter()

    def evaluate_and_report() -> bool:
        """Evaluate, step the curriculum, call on_eval. True if on_eval asks to stop."""
        nonlocal loss_count, started, evaluations, last_checkpoint, saved_at
        run.wall_time += time.perf_counter() - started
        train_loss = (loss_sum / loss_count).item()  # mean since the last evaluation (>= 1 step)
        loss_sum.zero_()
        loss_count = 0
        metrics = run.evaluate_and_advance(train_loss)
        evaluations += 1
        if cfg.checkpoint_dir is not None and evaluations % cfg.checkpoint_every == 0:
            last_checkpoint, saved_at = run.save(cfg.checkpoint_dir), run.step
        stop = bool(on_eval(metrics, run.save)) if on_eval is not None else False
        started = time.perf_counter()
        return stop

    status = "completed"
    while run.step < cfg.max_steps and run.converged_step is None:
        loss, norm = run.train_step()
        # The one host sync per step: NaN/Inf in the loss or anywhere in the gradient ends the run here,
        # before the update, so the weights stay finite.
        finite = bool(torch.isfinite(loss + norm))
        overflow = run.apply_update(norm) if finite else None
        run.step += 1
        if not finite or overflow is not None:
            run.wall_time += time.perf_counter() - started
            message = f"diverged at step {run.step}: {run.divergence(loss, norm, overflow)}"
            return run.result("diverged", last_checkpoint, message)
        loss_sum += loss
        loss_count += 1
        if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            if evaluate_and_report() and run.step < cfg.max_steps and run.converged_step is None:
                status = "stopped"
                break

    if cfg.checkpoint_dir is not None and (last_checkpoint is None or saved_at != run.step):
        last_checkpoint = run.save(cfg.checkpoint_dir)
    return run.result(status, last_checkpoint)
