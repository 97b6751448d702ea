"""Milliseconds per training step: S seeds of one configuration batched (mann.multiseed) beside one seed alone.

A step is what a trial pays per update: a fresh batch per seed, forward over the whole sequence, the task's
loss, backward, per-seed gradient norm, clipping and RMSProp (mann.train's defaults), on the copy task at a
fixed length 20 (41 time steps; every seed's batch has the same length, so no padding), batch 16. "alone" is
fit's own step (``_Run.train_step`` + ``apply_update``); "batched" is ``fit_seeds``'s step for S seeds with the
fold engine. The two are timed in alternation, so drift on a shared machine hits both alike; figures are
medians with the 10th-90th percentile beside them. ``ratio`` = batched / alone (the issue's target: <= 2.5 for
8 seeds); ``speed-up`` = S * alone / batched (over training the seeds one after the other).

``--vmap`` adds the alternative that was measured against the fold: ``torch.func.vmap`` over
``functional_call`` of the model (its ``nn.LSTMCell`` rewritten in plain ops, since vmap has no rule for
``aten::lstm_cell``), forward + loss + backward only, beside the fold's forward + loss + backward.

    .venv/bin/python bench/seeds.py                         # ntm, dnc-small, 8 seeds, 2 threads
    .venv/bin/python bench/seeds.py --configs ntm --vmap
    .venv/bin/python bench/seeds.py --quick                 # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mann.multiseed import _FoldEngine, _start, lstm_update  # noqa: E402
from mann.train import make_train_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import BATCH, LENGTH, THREADS  # noqa: E402
from step import CONFIGS as STEP_CONFIGS  # noqa: E402

# The reference sizes, batch, copy length and threads are bench/step.py's; dnc-small is the DNC of the learning tests.
CONFIGS: dict[str, tuple[str, dict]] = {
    "ntm": STEP_CONFIGS["ntm"],
    "dnc-small": ("dnc", {"memory_size": 16, "word_size": 16, "read_heads": 2, "controller_size": 64}),
    "dnc64": STEP_CONFIGS["dnc64"],
    "lstm": STEP_CONFIGS["lstm"],
}


def config(label: str, dtype: str):
    name, model = CONFIGS[label]
    overrides = {f"model.{k}": v for k, v in model.items()}
    overrides.update({"task.min_length": LENGTH, "task.max_length": LENGTH, "task.curriculum": False,
                      "batch_size": BATCH, "device": "cpu", "dtype": dtype})
    return make_train_config(name, "copy", overrides)


def alone_step(seed):
    """fit's step for one seed."""
    loss, norm = seed.run.train_step()
    seed.run.apply_update(norm)


def batched_step(engine, seeds):
    """fit_seeds's step for all seeds (fold engine)."""
    for s, (_, norm) in zip(seeds, engine.train_step(seeds), strict=True):
        s.run.apply_update(norm)


class _PlainCell(nn.Module):
    """nn.LSTMCell's computation in plain ops (vmap cannot batch aten::lstm_cell); same parameter names."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = (
            cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def forward(self, x, hx):
        gates = x @ self.weight_ih.T + self.bias_ih + hx[0] @ self.weight_hh.T + self.bias_hh
        return lstm_update(gates, hx[1])


def vmap_forward_backward(engine, seeds):
    """forward + loss + backward of all seeds with vmap over functional_call (stacked parameters)."""
    model = seeds[0].run.model
    if not hasattr(engine, "vmap_model"):
        engine.vmap_model = copy.copy(model)
        engine.vmap_model._modules = dict(model._modules)
        if isinstance(model._modules.get("controller"), nn.LSTMCell):
            engine.vmap_model._modules["controller"] = _PlainCell(model.controller)
    stacked = engine._stack(seeds)
    batches = [s.run._to_device(s.run.task.sample(s.run.cfg.batch_size, s.run.generator)) for s in seeds]
    x = torch.stack([b.inputs for b in batches])
    states = [model.initial_state(BATCH) for _ in seeds]  # constant-initialised models: no draws
    state = torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *states)
    logits = vmap(lambda p, x, st: functional_call(engine.vmap_model, p, (x,), {"state": st}))(stacked, x, state)
    loss = sum(s.run.task.loss(logits[i], b) for i, (s, b) in enumerate(zip(seeds, batches, strict=True)))
    loss.backward()


def fold_forward_backward(engine, seeds):
    engine.train_step(seeds)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(label: str, n_seeds: int, dtype: str, warmup: int, iters: int, with_vmap: bool) -> dict:
    cfg = config(label, dtype)
    seeds = _start(cfg, list(range(n_seeds)))
    alone = _start(cfg, [0])[0]
    engine = _FoldEngine(seeds)
    pairs = [("alone", alone_step, (alone,)), ("batched", batched_step, (engine, seeds))]
    if with_vmap:
        pairs += [("fold f+b", fold_forward_backward, (engine, seeds)),
                  ("vmap f+b", vmap_forward_backward, (engine, seeds))]
    times: dict[str, list[float]] = {name: [] for name, _, _ in pairs}
    for i in range(warmup + iters):
        for name, fn, args in pairs:  # alternate, so the machine's drift hits every variant alike
            ms = timed(fn, *args)
            if i >= warmup:
                times[name].append(ms)
    return {name: (statistics.median(ts), pct(ts, 0.1), pct(ts, 0.9)) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["ntm", "dnc-small"], choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, default=8, help="seeds batched (default 8)")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--iters", type=int, default=None, help="timed steps per figure (default 15; --quick 2)")
    p.add_argument("--vmap", action="store_true", help="also time vmap against the fold (forward + backward)")
    p.add_argument("--quick", action="store_true", help="few iterations (CI smoke test)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    iters = args.iters or (2 if args.quick else 15)
    warmup = 1 if args.quick else 3
    print(f"# bench/seeds.py: copy length {LENGTH} ({2 * LENGTH + 1} steps), batch {BATCH} per seed, "
          f"{args.seeds} seeds, {args.threads} threads, cpu {args.dtype}, median of {iters} steps after {warmup} "
          f"warm-up; torch {torch.__version__}")
    print(f"{'config':10} {'alone ms':>9} {'p10-p90':>15} {f'{args.seeds} seeds ms':>12} {'p10-p90':>15} "
          f"{'ratio':>6} {'speed-up':>8}")
    for label in args.configs:
        r = measure(label, args.seeds, args.dtype, warmup, iters, args.vmap)
        (a, a10, a90), (b, b10, b90) = r["alone"], r["batched"]
        print(f"{label:10} {a:9.1f} {a10:7.1f}-{a90:<7.1f} {b:12.1f} {b10:7.1f}-{b90:<7.1f} {b / a:6.2f} "
              f"{args.seeds * a / b:8.2f}", flush=True)
        if args.vmap:
            (f, f10, f90), (v, v10, v90) = r["fold f+b"], r["vmap f+b"]
            print(f"{'':10} forward+backward of {args.seeds} seeds: fold {f:.1f} ms ({f10:.1f}-{f90:.1f}), "
                  f"vmap {v:.1f} ms ({v10:.1f}-{v90:.1f}), vmap / fold {v / f:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
