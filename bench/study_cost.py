"""What a study file costs before it runs: each arm's training step and evaluation, priced as a trial runs them.

For every configuration of the study (each model of ``models`` x each point of a ``sampler: grid`` search; for
other samplers the fixed values with each searched entry at its low end) this builds the trial's TrainConfig
exactly as the sweep does (``study.spec.trial_overrides``), then times ``steps`` training steps
(``_Run.train_step`` + ``apply_update``) after ``warmup``, one periodic evaluation (``_Run.evaluate``: the
held-out set at 1x and every ``gen_scales``, and the promotion data) and the final evaluation
(``final_eval_sequences`` per scale). Times are process CPU time (``time.process_time``): on a shared machine
the steadier figure, and the wall time of one uncontended trial per core. Run with one thread
(``OMP_NUM_THREADS=1``) to price ``resources: {cpu: 1}`` trials.

The budget printed is the **upper bound**: every trial runs to ``budget.max_steps`` (none converges, none is
stopped), so per trial ``max_steps * step + ceil(max_steps / eval_every) * eval + final``; the study's wall time
is the sum over trials divided by ``concurrency`` (trials at once), or with ``concurrency: null`` on a cluster with
a CPU per trial, the longest trial. Runs that converge early end sooner. Ray's and MLflow's start-up per trial
(seconds) is not included.

    OMP_NUM_THREADS=1 .venv/bin/python bench/study_cost.py search_spaces/collier_beel2018_init_small.yaml
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mann.train import _Run, make_train_config  # noqa: E402
from study.spec import MODEL_PARAM, StudySpec, grid_points, load_spec, trial_overrides  # noqa: E402


def arms(spec: StudySpec) -> list[dict]:
    """The study's configurations as trial parameters (``model`` always named)."""
    if spec.sampler == "grid":
        points = grid_points(spec)
    else:
        points = [{p.key: p.choices[0] if p.choices else p.low for p in spec.search if p.applies_to(m)}
                  | {MODEL_PARAM: m} for m in spec.models]
    return [{MODEL_PARAM: spec.models[0], **p} for p in points]


def cpu_s(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def price_arm(spec: StudySpec, params: dict, steps: int, warmup: int) -> dict[str, float]:
    model, overrides = trial_overrides(spec, params)
    run = _Run(make_train_config(model, spec.task, overrides))

    def step() -> None:
        loss, norm = run.train_step()
        run.apply_update(norm)
        float(loss)  # fit syncs once per step (its finiteness check)
        run.step += 1

    for _ in range(warmup):
        step()
    per_step = [cpu_s(step) for _ in range(steps)]
    evaluation = cpu_s(lambda: run.evaluate(0.0))
    final = cpu_s(run.final_evaluation)
    return {"step": statistics.fmean(per_step), "eval": evaluation, "final": final}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("studies", nargs="+", type=Path)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per arm")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.studies:
        spec = load_spec(path)
        b = spec.budget
        seeds = 1 if spec.seeds == "trial" else len(spec.seeds)
        configs = arms(spec)
        trials_per_arm = b.num_samples // len(configs)
        evals = math.ceil(b.max_steps / b.eval_every)
        print(f"{path}: {len(configs)} arm(s) x {seeds} seed(s) = {b.num_samples} trials, max_steps {b.max_steps}, "
              f"eval_every {b.eval_every} ({evals} evaluations), concurrency {spec.concurrency}; CPU seconds, "
              f"{args.steps} timed steps after {args.warmup}", flush=True)
        total = longest = 0.0
        for params in configs:
            r = price_arm(spec, params, args.steps, args.warmup)
            trial = b.max_steps * r["step"] + evals * r["eval"] + r["final"]
            total += trial * trials_per_arm
            longest = max(longest, trial)
            label = ", ".join(f"{k}={v}" for k, v in params.items())
            print(f"  {label}: {1e3 * r['step']:.1f} ms/step, {r['eval']:.2f} s/evaluation, {r['final']:.2f} s final "
                  f"-> at most {trial / 60:.1f} min per trial x {trials_per_arm}", flush=True)
        if spec.concurrency is None:  # as many as the cluster allows: with a CPU per trial, the longest trial
            wall = f"{longest / 60:.0f} min wall with every trial at once (concurrency null)"
        else:  # list scheduling: the trials' sum over the slots, plus at most (1 - 1/c) of the longest trial
            tail = longest * (1 - 1 / spec.concurrency)
            wall = (f"{total / 60 / spec.concurrency:.0f} min wall at {spec.concurrency} trials at once "
                    f"(+ at most {tail / 60:.1f} min while the last trial runs alone)")
        print(f"  upper bound: {total / 3600:.2f} CPU core-hours, {wall}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
