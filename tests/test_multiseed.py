"""mann.multiseed: S seeds trained as one batched model give each seed what fit gives it alone."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mann.config import ConfigError
from mann.multiseed import NotFoldable, _make_engine, _start, fit_seeds
from mann.registry import MODELS, ModelEntry
from mann.tasks import TASKS, CopyConfig, CopyTask, TaskEntry
from mann.train import fit, load_checkpoint, make_train_config

SEEDS = [0, 1, 2]
# Tiny float64 runs on 3-bit copy of length 1..3: with batch 4 each seed's batches have their own lengths, so
# the folded batch is padded; the curriculum threshold sits among the seeds' errors, so their levels part.
# clip_norm is below the usual gradient norm: clipping is on, and a norm over all seeds would show.
TINY = {
    "task.bits": 3, "task.max_length": 3, "task.curriculum_start": 1, "task.curriculum_step": 1,
    "task.curriculum_threshold": 1.1, "optimizer": "rmsprop", "lr": 1e-2, "batch_size": 4, "max_steps": 12,
    "eval_every": 4, "eval_batches": 1, "gen_scales": [2], "device": "cpu", "dtype": "float64", "clip_norm": 0.1,
    "final_eval_sequences": 6,
}
TINY_MODEL = {
    "lstm": {"model.hidden_size": 8},
    # random initial memory: every training and evaluation forward draws from the seed's global RNG stream
    "ntm": {"model.controller_size": 8, "model.memory_size": 8, "model.word_size": 4, "model.memory_init": "random"},
    "dnc": {"model.controller_size": 8, "model.memory_size": 8, "model.word_size": 4, "model.read_heads": 2},
}


def tiny(model: str, task: str = "copy", **overrides):
    return make_train_config(model, task, {**TINY, **TINY_MODEL.get(model, {}), **overrides})


def alone(cfg, seed: int, tmp_path, **kwargs):
    """fit for one seed, checkpointing to its own directory (the checkpoint holds the final weights)."""
    return fit(dataclasses.replace(cfg, seed=seed, checkpoint_dir=str(tmp_path / f"alone-{seed}")), **kwargs)


def weights(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model"]


def assert_same_run(batched, single, rtol: float = 1e-9) -> None:
    """Same status, step, message and metrics (wall_time aside); weights equal up to rounding."""
    assert (batched.status, batched.step, batched.message) == (single.status, single.step, single.message)
    a = {k: v for k, v in batched.metrics.items() if k != "wall_time"}
    b = {k: v for k, v in single.metrics.items() if k != "wall_time"}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key
    wa, wb = weights(batched), weights(single)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=rtol, msg=key)


@pytest.mark.parametrize("model,impl", [("lstm", None), ("ntm", None), ("dnc", None), ("dnc", "reference")])
def test_each_seed_gets_what_fit_gives_it_alone(model, impl, tmp_path):
    """NTM and DNC fold through their fused path on CPU (mann.fast with stacked weights); with impl "reference"
    (and the LSTM) through the folded model's swapped layers."""
    cfg = tiny(model, checkpoint_dir=str(tmp_path / "batched"))
    engine = _make_engine("fold", _start(cfg, SEEDS, impl=impl))
    assert (engine.fast_names is not None) == (model != "lstm" and impl is None)
    calls = []
    results = fit_seeds(cfg, SEEDS, on_eval=lambda seed, m, save: calls.append((seed, m["step"], m["level"])),
                        engine="fold", impl=impl)
    for seed, batched in zip(SEEDS, results, strict=True):
        single = alone(cfg, seed, tmp_path, impl=impl)
        assert batched.status == "completed" and batched.checkpoint == tmp_path / "batched" / f"seed-{seed}" / \
            "checkpoint.pt"
        assert_same_run(batched, single)
    # on_eval: once per seed after each of its evaluations, seeds in order; each seed has its own curriculum.
    assert [(seed, step) for seed, step, _ in calls] == [(s, step) for step in (4, 8, 12) for s in SEEDS]
    assert any(len({level for _, step, level in calls if step == at}) > 1 for at in (4, 8, 12)), calls
    # The seeds really differ (own initial weights and data).
    w = [weights(r) for r in results]
    assert not torch.equal(w[0]["output.weight"], w[1]["output.weight"])


def test_loop_engine_is_fit_itself(tmp_path):
    cfg = tiny("ntm", checkpoint_dir=str(tmp_path / "batched"), max_steps=8)
    for seed, batched in zip(SEEDS, fit_seeds(cfg, SEEDS, engine="loop"), strict=True):
        assert_same_run(batched, alone(cfg, seed, tmp_path), rtol=0)


# -- divergence and stopping ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoisonCopyConfig(CopyConfig):
    poison: float = 0.1  # chance that a training batch carries a NaN input (decided by the seed's data stream)


class PoisonCopyTask(CopyTask):
    """Copy whose data stream now and then holds a NaN: a seed-specific divergence at a known step."""

    def _sample(self, batch_size, generator, scale, difficulty):
        batch = super()._sample(batch_size, generator, scale, difficulty)
        if scale == 1 and torch.rand((), generator=generator, dtype=torch.float64) < self.cfg.poison:
            batch.inputs[-1, 0, 0] = math.nan
        return batch


def first_poisoned_step(cfg, seed: int) -> int | None:
    """The training step at which this seed's data stream first holds a NaN (curriculum off)."""
    task, generator = PoisonCopyTask(cfg.task_cfg), torch.Generator().manual_seed(seed)
    for step in range(1, cfg.max_steps + 1):
        if torch.isnan(task.sample(cfg.batch_size, generator).inputs).any():
            return step
    return None


def test_a_diverging_seed_leaves_the_batch_and_the_others_go_on(monkeypatch, tmp_path):
    monkeypatch.setitem(TASKS, "poison_copy", TaskEntry(PoisonCopyConfig, PoisonCopyTask))
    cfg = tiny("dnc", "poison_copy", **{"task.curriculum": False, "task.poison": 0.05}, max_steps=16,
               checkpoint_dir=str(tmp_path / "batched"))
    # Two seeds that never see a NaN around one that does, mid-run (after an evaluation).
    steps = {seed: first_poisoned_step(cfg, seed) for seed in range(40)}
    bad = next(s for s, step in steps.items() if step is not None and 5 <= step <= 12)
    seeds = [s for s, step in steps.items() if step is None][:1] + [bad] + \
        [s for s, step in steps.items() if step is None][1:2]
    stopped = {}

    def on_eval(seed, metrics, save):
        stopped.setdefault(seed, metrics["step"])
        return seed == seeds[2] and metrics["step"] == 8  # on_eval stops one seed, as ASHA would

    results = fit_seeds(cfg, seeds, on_eval=on_eval, engine="fold")
    assert [r.status for r in results] == ["completed", "diverged", "stopped"]
    assert results[1].step == steps[bad] and "loss is nan" in results[1].message
    assert results[2].step == 8
    for seed, batched in zip(seeds, results, strict=True):
        single = alone(cfg, seed, tmp_path, on_eval=lambda m, save, seed=seed: on_eval(seed, m, save))
        assert_same_run(batched, single)


def test_a_real_divergence_hits_each_seed_at_its_own_step():
    # RMSProp at lr 1e36 in float32: the weights overflow, each seed at a step of its own (or not at all).
    cfg = tiny("lstm", optimizer="rmsprop", lr=1e36, clip_value=None, clip_norm=None, dtype="float32",
               max_steps=30, eval_every=10)
    seeds = [0, 1, 2, 3, 4]
    results = fit_seeds(cfg, seeds, engine="fold")
    assert {r.status for r in results} == {"diverged", "completed"}
    assert len({r.step for r in results if r.status == "diverged"}) > 1
    for seed, batched in zip(seeds, results, strict=True):
        single = fit(dataclasses.replace(cfg, seed=seed))
        assert (batched.status, batched.step, batched.message) == (single.status, single.step, single.message)
        assert batched.metrics.keys() == single.metrics.keys()
        for key in batched.metrics.keys() - {"wall_time"}:
            assert batched.metrics[key] == pytest.approx(single.metrics[key], rel=1e-5), key


def test_convergence_stop_and_final_evaluation_are_fits_per_seed(tmp_path):
    # The threshold sits among the seeds' full-difficulty errors at step 4: seeds converge at steps of their own.
    cfg = tiny("lstm", max_steps=24, checkpoint_dir=str(tmp_path / "batched"))
    errors = sorted(fit(dataclasses.replace(cfg, seed=s, max_steps=4, checkpoint_dir=None)).metrics["error"]
                    for s in SEEDS)
    cfg = dataclasses.replace(cfg, stop_at_error=(errors[0] + errors[-1]) / 2, stop_after_evals=2)
    results = fit_seeds(cfg, SEEDS, engine="fold")
    assert all(r.status == "completed" and "final_error" in r.metrics and "final_gen2x_cost_bits" in r.metrics
               for r in results)
    assert len({r.step for r in results}) > 1 and any(r.step < 24 for r in results)  # some stopped early
    for seed, batched in zip(SEEDS, results, strict=True):
        assert_same_run(batched, alone(cfg, seed, tmp_path))


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_resume_from_seed_checkpoints_continues_exactly(tmp_path):
    cfg = tiny("ntm", max_steps=12)
    full = fit_seeds(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "full")), SEEDS)
    first = fit_seeds(dataclasses.replace(cfg, max_steps=8, checkpoint_dir=str(tmp_path / "part")), SEEDS)
    assert all(r.step == 8 for r in first)
    rest = fit_seeds(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "rest")), SEEDS,
                     resume_from=tmp_path / "part")
    for a, b in zip(rest, full, strict=True):
        assert_same_run(a, b, rtol=0)  # the same batched arithmetic: bit for bit
    # A seed's checkpoint is fit's: fit resumes it and lands where fit_seeds did.
    single = fit(dataclasses.replace(cfg, seed=1, checkpoint_dir=str(tmp_path / "one")),
                 resume_from=tmp_path / "part" / "seed-1")
    assert_same_run(rest[1], single)


def test_resume_from_a_missing_seed_names_the_file(tmp_path):
    from mann.train import CheckpointError

    fit_seeds(tiny("lstm", max_steps=4, checkpoint_dir=str(tmp_path)), [0])
    with pytest.raises(CheckpointError, match="seed-1") as info:
        fit_seeds(tiny("lstm"), [0, 1], resume_from=tmp_path)
    assert "\n" not in str(info.value)


# -- models the fold cannot batch, and bad input --------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledConfig:
    pass


class ScaledModel(nn.Module):
    """A read-out whose step uses a parameter directly (not through a layer): the fold must refuse it."""

    def __init__(self, cfg, input_size: int, output_size: int):
        super().__init__()
        self.linear = nn.Linear(input_size, output_size)
        self.scale = nn.Parameter(torch.rand(output_size))

    def initial_state(self, batch_size, memory_size=None):
        return (self.linear.weight.new_zeros(batch_size, 1),)

    def forward(self, x, state=None, memory_size=None):
        return self.linear(x) * self.scale


def test_a_model_the_fold_cannot_batch_falls_back_to_the_loop(monkeypatch, tmp_path):
    monkeypatch.setitem(MODELS, "scaled", ModelEntry(__name__, "ScaledConfig", "ScaledModel"))
    cfg = tiny("scaled", max_steps=4, checkpoint_dir=str(tmp_path / "batched"))
    with pytest.raises(NotFoldable, match="'scaled' cannot be folded"):
        fit_seeds(cfg, SEEDS, engine="fold")
    with pytest.warns(UserWarning, match="one after the other"):
        results = fit_seeds(cfg, SEEDS)
    for seed, batched in zip(SEEDS, results, strict=True):
        assert_same_run(batched, alone(cfg, seed, tmp_path), rtol=0)


def test_foldable_models_raise_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_seeds(tiny("dnc-md", **{"model.controller_size": 8, "model.memory_size": 8, "model.word_size": 4},
                       max_steps=1), [0, 1], engine="auto")


@pytest.mark.parametrize("seeds", [[], [1, 1], [0, "1"]])
def test_bad_seeds_name_the_key(seeds):
    with pytest.raises(ConfigError, match="seeds: expected a non-empty list of distinct integers"):
        fit_seeds(tiny("lstm"), seeds)
