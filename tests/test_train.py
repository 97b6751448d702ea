"""mann.train: configuration, determinism, checkpoints and resume, divergence, evaluation, learning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mann.config import ConfigError
from mann.registry import MODELS, ModelEntry
from mann.train import (
    CheckpointError,
    TrainConfig,
    _Run,
    config_from_checkpoint,
    config_from_flat_dict,
    config_to_flat_dict,
    fit,
    load_checkpoint,
    make_train_config,
    promotion_seed,
)

# Tiny runs: a few steps of small models on 3-bit copy of length 1..3, on the CPU.
TINY = {
    "task.bits": 3, "task.max_length": 3, "optimizer": "adam", "lr": 1e-2, "batch_size": 4,
    "max_steps": 12, "eval_every": 4, "eval_batches": 1, "gen_scales": [2], "device": "cpu",
    "final_eval_sequences": 8,
}
TINY_MODEL = {
    "lstm": {"model.hidden_size": 8},
    "ntm": {"model.controller_size": 8, "model.memory_size": 8, "model.word_size": 4},
    "dnc": {"model.controller_size": 8, "model.memory_size": 8, "model.word_size": 4, "model.read_heads": 2},
}


def tiny(model: str = "lstm", task: str = "copy", **overrides) -> TrainConfig:
    return make_train_config(model, task, {**TINY, **TINY_MODEL[model], **overrides})


def params(checkpoint) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "wall_time"}


# -- configuration -----------------------------------------------------------------------------------------------


def test_defaults_follow_graves_2014_and_resolve_nested_configs():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.alpha, cfg.clip_value) == ("rmsprop", 1e-4, 0.9, 0.95, 10.0)
    assert type(cfg.model_cfg).__name__ == "NTMConfig" and type(cfg.task_cfg).__name__ == "CopyConfig"
    assert TrainConfig(model="lstm").model_cfg == make_train_config("lstm").model_cfg


def test_overrides_reach_all_three_namespaces_and_variant_presets():
    cfg = make_train_config(
        "dnc-md", "associative_recall",
        {"lr": "3e-4", "model.memory_size": "16", "task.max_items": 3, "gen_scales": "[2, 3]", "clip_norm": "null"},
    )
    assert cfg.lr == 3e-4 and cfg.clip_norm is None and cfg.gen_scales == (2.0, 3.0)
    assert cfg.model_cfg.memory_size == 16 and cfg.model_cfg.masking and cfg.model_cfg.deallocation
    assert cfg.task_cfg.max_items == 3
    # model and task may come as keys too (a study may sweep over variants)
    assert make_train_config("ntm", "copy", {"model": "lstm", "task": "reverse"}).model == "lstm"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"nope": 1}, "nope"),
        ({"lr": -1}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"device": "tpu"}, "device"),
        ({"gen_scales": [0.5]}, "gen_scales"),
        ({"model_cfg": {}}, "model_cfg"),
        ({"model.nope": 1}, "model.nope"),
        ({"model.memory_size": "x"}, "model.memory_size"),
        ({"task.bits": 0}, "task.bits"),
        ({"model": "gru"}, "model"),
        ({"task": "sudoku"}, "task"),
    ],
)
def test_bad_overrides_raise_one_line_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        make_train_config("ntm", "copy", overrides)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_flat_dict_is_plain_and_round_trips():
    cfg = make_train_config("dnc-ms", "copy", {"model.memory_size": 16, "gen_scales": [2, 5], "lr": 2e-4})
    flat = config_to_flat_dict(cfg)
    assert flat["model"] == "dnc-ms" and flat["model.memory_size"] == 16 and flat["task.bits"] == 8
    assert flat["gen_scales"] == [2.0, 5.0] and flat["lr"] == 2e-4
    assert all(isinstance(v, str | int | float | bool | list | type(None)) for v in flat.values())
    assert config_from_flat_dict(flat) == cfg


# -- evaluation and the on_eval protocol ---------------------------------------------------------------------------


def test_on_eval_gets_every_metric_at_each_evaluation_and_the_last_step():
    seen = []
    result = fit(tiny(max_steps=10, gen_scales=[2, 3]), on_eval=lambda m, save: seen.append(m))
    assert [m["step"] for m in seen] == [4, 8, 10]
    expected = {"step", "sequences", "wall_time", "train_loss", "error", "cost_bits", "accuracy", "curriculum_error",
                "level"}
    expected |= {f"gen{s}x_{k}" for s in (2, 3) for k in ("error", "cost_bits", "accuracy")}
    final = {f"final_{k}" for k in expected if k.endswith(("error", "cost_bits", "accuracy")) and "curriculum" not in k}
    for m in seen:
        assert set(m) == (expected | final if m is seen[-1] else expected)  # the last step carries the final eval
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in m.values())
    assert seen[-1]["sequences"] == 10 * 4
    assert result.status == "completed" and result.step == 10 and result.metrics == seen[-1]


def test_every_evaluation_scores_the_same_sequences():
    # With updates too small to change a float32 weight, every evaluation must give the same numbers.
    seen = []
    fit(tiny(lr=1e-30, **{"task.curriculum": False}), on_eval=lambda m, save: seen.append(m))
    scores = [{k: v for k, v in m.items() if k.endswith(("error", "cost_bits", "accuracy")) and "final" not in k}
              for m in seen]
    assert len(scores) == 3 and scores[0] == scores[1] == scores[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="device: expected 'cpu' or 'auto'"):
        fit(tiny(device="cuda"))


def test_on_eval_returning_true_stops_the_run():
    result = fit(tiny(), on_eval=lambda m, save: m["step"] >= 4)
    assert (result.status, result.step, result.metrics["step"]) == ("stopped", 4, 4)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    results = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = tiny("ntm", seed=seed, checkpoint_dir=str(tmp_path / name))
        results[name] = fit(cfg)
    assert without_time(results["a"].metrics) == without_time(results["b"].metrics)
    assert_same_tensors(params(results["a"].checkpoint), params(results["b"].checkpoint))
    assert not torch.equal(params(results["a"].checkpoint)["output.weight"],
                           params(results["c"].checkpoint)["output.weight"])


def test_float64_runs_in_float64(tmp_path):
    result = fit(tiny("ntm", dtype="float64", checkpoint_dir=str(tmp_path)))
    assert result.status == "completed" and math.isfinite(result.metrics["train_loss"])
    assert all(t.dtype == torch.float64 for t in params(result.checkpoint).values() if t.is_floating_point())


# -- checkpoints and resume ----------------------------------------------------------------------------------------


def test_resume_continues_exactly_as_if_uninterrupted(tmp_path):
    # RMSProp with momentum (optimizer state), a random initial memory (global RNG) and a curriculum that
    # promotes at every evaluation (task state): a resumed run must restore all of them.
    cfg = tiny(
        "ntm", optimizer="rmsprop", lr=1e-3, checkpoint_dir=str(tmp_path / "full"),
        **{"model.memory_init": "random", "task.max_length": 6, "task.curriculum_start": 1,
           "task.curriculum_step": 1, "task.curriculum_threshold": 1e9},
    )

    def save_at_8(metrics, save_checkpoint):
        if metrics["step"] == 8:
            assert save_checkpoint(tmp_path / "mid") == tmp_path / "mid" / "checkpoint.pt"

    full_evals, resumed_evals = [], []
    full = fit(cfg, on_eval=lambda m, save: (full_evals.append(m), save_at_8(m, save))[1])
    resumed_cfg = make_train_config("ntm", "copy", {**config_to_flat_dict(cfg), "checkpoint_dir": str(tmp_path / "r")})
    resumed = fit(resumed_cfg, on_eval=lambda m, save: resumed_evals.append(m), resume_from=tmp_path / "mid")

    assert [m["level"] for m in full_evals] == [0, 1, 2]  # the curriculum did move
    assert resumed.step == full.step == 12
    assert [without_time(m) for m in resumed_evals] == [without_time(full_evals[-1])]
    end_full, end_resumed = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_tensors(end_full["model"], end_resumed["model"])
    assert end_full["task"] == end_resumed["task"] == {"level": 3}
    assert torch.equal(end_full["data_generator"], end_resumed["data_generator"])
    for a, b in zip(end_full["optimizer"]["state"].values(), end_resumed["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(a, b)


def test_checkpoint_holds_config_and_a_finished_run_resumes_to_itself(tmp_path):
    cfg = tiny(checkpoint_dir=str(tmp_path))
    first = fit(cfg)
    assert config_from_checkpoint(tmp_path) == cfg
    assert config_from_checkpoint(first.checkpoint, {"max_steps": 20}).max_steps == 20
    again = fit(cfg, resume_from=first.checkpoint)
    assert (again.status, again.step, again.metrics) == ("completed", 12, first.metrics)


def test_missing_corrupt_or_foreign_checkpoints_raise_one_line_checkpoint_error(tmp_path):
    good = fit(tiny(checkpoint_dir=str(tmp_path / "good"))).checkpoint
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path in (tmp_path / "missing.pt", truncated, garbage, foreign):
        with pytest.raises(CheckpointError) as info:
            fit(tiny(), resume_from=path)
        assert str(path) in str(info.value) and "expected" in str(info.value) and "\n" not in str(info.value)
    # A checkpoint of another model size does not fit this run.
    with pytest.raises(CheckpointError, match="expected a checkpoint of this run's model"):
        fit(tiny(**{"model.hidden_size": 9}), resume_from=good)


# -- divergence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_absurd_learning_rate_diverges_with_a_step_not_an_exception(optimizer):
    # lr 1e38 sends float32 weights to inf: NaN loss (RMSProp) or an overflowing update (Adam's lr / (1 - β1)).
    result = fit(tiny(optimizer=optimizer, lr=1e38, clip_value=None, max_steps=50, eval_every=100))
    assert result.status == "diverged"
    assert 1 <= result.step < 50 and f"diverged at step {result.step}" in result.message
    # The final evaluation scores the weights the run ended with when they are finite (Adam's overflowing
    # step was refused); RMSProp's update sent a weight to inf: nothing to score, and the message says so.
    finite = optimizer == "adam"
    assert ("final_error" in result.metrics) == finite
    assert ("no final evaluation: a weight is not finite" in result.message) != finite


@dataclass(frozen=True)
class PoisonConfig:
    poison_step: int = 3  # the forward pass at which the model misbehaves
    poison: str = "loss"  # "loss": NaN logits; "gradient": finite logits, NaN gradient


EVAL_ROWS: list[int] = []  # sequences per evaluation forward of PoisonModel, in call order


class PoisonModel(nn.Module):
    """A linear read-out that goes wrong on purpose at one training step, to test divergence detection.

    Its evaluation forwards record their batch sizes in EVAL_ROWS (to see what the final evaluation scored).
    """

    def __init__(self, cfg: PoisonConfig, input_size: int, output_size: int):
        super().__init__()
        self.cfg, self.calls = cfg, 0
        self.linear = nn.Linear(input_size, output_size)

    def forward(self, x, state=None, memory_size=None):
        y = self.linear(x)
        if not self.training:
            EVAL_ROWS.append(x.shape[0])
        if self.training:
            self.calls += 1
            if self.calls == self.cfg.poison_step:
                if self.cfg.poison == "loss":
                    return y * math.nan
                # d/dw sqrt(w - w) at 0 is inf, times 0: NaN in the gradient only
                return y + 0 * torch.sqrt(self.linear.weight - self.linear.weight).sum()
        return y


@pytest.mark.parametrize("poison, why", [("loss", "loss is nan"), ("gradient", "gradient norm is nan")])
def test_nan_in_loss_or_gradient_ends_the_run_at_that_step(monkeypatch, tmp_path, poison, why):
    monkeypatch.setitem(MODELS, "poison", ModelEntry(__name__, "PoisonConfig", "PoisonModel"))
    evaluations = []
    cfg = make_train_config("poison", "copy", {**TINY, "model.poison": poison, "model.poison_step": 7,
                                               "checkpoint_dir": str(tmp_path)})
    result = fit(cfg, on_eval=lambda m, save: evaluations.append(m))
    assert (result.status, result.step) == ("diverged", 7)
    assert why in result.message
    # the last evaluation before, and the final evaluation of the weights it left
    assert {k: v for k, v in result.metrics.items() if not k.startswith("final_")} == evaluations[-1]
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["final_error"])
    # The poisoned update was never applied: the last checkpoint (step 4) is the one fit left.
    assert all(torch.isfinite(t).all() for t in params(result.checkpoint).values())


# -- learning ------------------------------------------------------------------------------------------------------
# Small models with Adam at 1e-2 (measured here over seeds 0, 1, 2: NTM 600-700 steps, DNC 900-1200 steps to the
# target); the step budgets leave a wide margin. Evaluations on 128 sequences, every 100 steps, stop at the target.
SMALL = {"optimizer": "adam", "lr": 1e-2, "batch_size": 16, "device": "cpu", "seed": 0,
         "eval_every": 100, "eval_batches": 8, "gen_scales": [], "task.curriculum": False}


def learn(model: str, task: str, overrides: dict):
    cfg = make_train_config(model, task, {**SMALL, **overrides})
    return fit(cfg, on_eval=lambda m, save: m["error"] < cfg.task_cfg.target_error)


@pytest.mark.slow
def test_ntm_learns_copy_of_short_sequences():
    result = learn("ntm", "copy", {
        "model.controller_size": 32, "model.memory_size": 16, "model.word_size": 8,
        "task.bits": 4, "task.min_length": 1, "task.max_length": 3, "max_steps": 3000,
    })
    assert result.status == "stopped" and result.metrics["error"] < 0.1, result.message


@pytest.mark.slow
def test_dnc_learns_associative_recall_with_few_items():
    result = learn("dnc", "associative_recall", {
        "model.controller_size": 32, "model.memory_size": 16, "model.word_size": 8, "model.read_heads": 1,
        "task.bits": 4, "task.item_length": 1, "task.min_items": 2, "task.max_items": 3, "max_steps": 4000,
    })
    assert result.status == "stopped" and result.metrics["error"] < 0.1, result.message


# -- evaluation protocol: full difficulty, promotion data, final evaluation, convergence ---------------------------


def test_error_is_at_full_difficulty_whatever_the_curriculum_level():
    # An untrained model (lr too small to move a float32 weight) on 3-bit copy up to length 20, its curriculum held
    # at length 2: curriculum_error can be at most 3 * 2 wrong bits per sequence; error, at length up to 20, is not.
    curriculum = {"task.max_length": 20, "task.curriculum_start": 2, "task.curriculum_threshold": 1e-9,
                  "lr": 1e-30, "max_steps": 8}
    seen = []
    fit(tiny(**curriculum), on_eval=lambda m, save: seen.append(m))
    assert [m["level"] for m in seen] == [0, 0]
    assert all(m["curriculum_error"] <= 3 * 2 < m["error"] for m in seen)
    # the held-out set is the task itself: the same run with the curriculum off scores the same error
    off = []
    fit(tiny(**curriculum, **{"task.curriculum": False}), on_eval=lambda m, save: off.append(m))
    assert [m["error"] for m in off] == [m["error"] for m in seen]
    assert [m["cost_bits"] for m in off] == [m["cost_bits"] for m in seen]


def test_promotion_data_is_not_the_held_out_set():
    assert promotion_seed(12345) != 12345
    run = _Run(tiny(**{"task.curriculum": False}))
    held_out = run.task.sample(4, torch.Generator().manual_seed(run.cfg.eval_seed), full=True)
    promotion = run.task.sample(4, torch.Generator().manual_seed(promotion_seed(run.cfg.eval_seed)))
    assert not torch.equal(held_out.inputs[..., :3].sum((1, 2)), promotion.inputs[..., :3].sum((1, 2)))
    # curriculum off: the same difficulty, other sequences, so another estimate of the same error
    metrics = run.evaluate(train_loss=0.0)
    assert metrics["curriculum_error"] != metrics["error"] and metrics["level"] == 0


@pytest.mark.parametrize("end", ["completed", "stopped", "converged", "diverged"])
def test_final_evaluation_scores_final_eval_sequences_whatever_the_end(monkeypatch, end):
    monkeypatch.setitem(MODELS, "poison", ModelEntry(__name__, "PoisonConfig", "PoisonModel"))
    overrides = {**TINY, "final_eval_sequences": 10, "model.poison_step": 7 if end == "diverged" else 10**9}
    if end == "converged":
        overrides |= {"stop_at_error": 1e9, "stop_after_evals": 2}
    cfg = make_train_config("poison", "copy", overrides)
    EVAL_ROWS.clear()
    seen = []
    result = fit(cfg, on_eval=lambda m, save: seen.append(m) or end == "stopped")
    expected = {"completed": ("completed", 12), "stopped": ("stopped", 4), "converged": ("completed", 8),
                "diverged": ("diverged", 7)}[end]
    assert (result.status, result.step) == expected, result.message
    # periodic evaluations: 4 sequences per set (held-out 1x, 2x, promotion); the final one: 10 per scale
    assert EVAL_ROWS[-6:] == [4, 4, 2, 4, 4, 2] and EVAL_ROWS.count(2) == 2
    final = {k for k in result.metrics if k.startswith("final_")}
    assert final == {f"final_{p}{k}" for p in ("", "gen2x_") for k in ("error", "cost_bits", "accuracy")}
    # known at an evaluation (the last step, convergence): in that on_eval call too
    assert final <= set(seen[-1]) if end in ("completed", "converged") else not final & set(seen[-1])
    if end == "converged":
        assert result.metrics["converged_step"] == seen[-1]["converged_step"] == 4
        assert "converged at step 4" in result.message
    else:
        assert "converged_step" not in result.metrics


def test_convergence_stops_after_the_stated_consecutive_evaluations_and_resumes_mid_streak(monkeypatch, tmp_path):
    # Scripted full-difficulty errors per evaluation step: below 0.1 at 2, above at 4, below from 6 on.
    script = {2: 0.05, 4: 0.5}
    evaluate = _Run.evaluate

    def scripted(self, train_loss):
        metrics = evaluate(self, train_loss)
        return {**metrics, "error": script.get(self.step, 0.05)}

    monkeypatch.setattr(_Run, "evaluate", scripted)
    cfg = tiny(max_steps=40, eval_every=2, stop_at_error=0.1, stop_after_evals=3, checkpoint_dir=str(tmp_path / "a"))
    seen = []

    def on_eval(metrics, save):
        seen.append(metrics)
        if metrics["step"] == 8:
            save(tmp_path / "mid")

    result = fit(cfg, on_eval=on_eval)
    assert [m["step"] for m in seen] == [2, 4, 6, 8, 10]  # not before the third consecutive one
    assert (result.status, result.step, result.metrics["converged_step"]) == ("completed", 10, 6)
    assert [("converged_step" in m, "final_error" in m) for m in seen] == [(False, False)] * 4 + [(True, True)]
    resumed = fit(cfg, resume_from=tmp_path / "mid")  # two of three below at step 8: one more evaluation
    assert (resumed.status, resumed.step, resumed.metrics["converged_step"]) == ("completed", 10, 6)
    again = fit(cfg, resume_from=result.checkpoint)  # a converged run resumed trains no further
    assert (again.status, again.step) == ("completed", 10)
