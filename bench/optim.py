"""Milliseconds per optimizer update: torch.optim's per-parameter loop against mann.optim's flat buffer.

An update is what mann.train does around backward: zero the gradients, take the gradient's norm, clip each
element to [-10, 10] (Graves 2014; mann.train's default), and step. Timed for the weights of each model that
bench/step.py times and of the tiny NTM bench/sweep.py's study trains, with RMSProp (mann.train's default:
centered, momentum 0.9) and Adam, the two implementations in alternation (one update of each in turn), median
of many updates. Gradients are fixed random tensors: backward is not timed.

    .venv/bin/python bench/optim.py
    .venv/bin/python bench/optim.py --threads 1 --iters 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mann.optim import Adam, FlatParams, RMSprop, grad_norm  # noqa: E402
from mann.train import make_train_config  # noqa: E402

MODELS = {  # label -> (model, overrides): bench/step.py's configurations and bench/sweep.py's tiny NTM
    "ntm": ("ntm", {"model.memory_size": 128, "model.word_size": 20, "model.controller_size": 100}),
    "dnc64": ("dnc", {"model.memory_size": 64, "model.word_size": 32, "model.read_heads": 4,
                      "model.controller_size": 128}),
    "ntm-tiny": ("ntm", {"model.controller_size": 32, "model.memory_size": 16, "model.word_size": 8,
                         "task.bits": 4, "task.max_length": 3}),
}
CLIP = 10.0


def weights(label: str) -> list[torch.Tensor]:
    from mann.registry import build_model
    from mann.tasks import build_task

    model, overrides = MODELS[label]
    cfg = make_train_config(model, "copy", overrides)
    task = build_task("copy", cfg.task_cfg)
    torch.manual_seed(0)
    net = build_model(model, cfg.model_cfg, task.input_size, task.output_size)
    return [p for p in net.parameters() if p.requires_grad]


def torch_update(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor]):
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=1e-3)
    else:
        opt = torch.optim.RMSprop(params, lr=1e-4, alpha=0.95, momentum=0.9, centered=True)

    def update():
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads, strict=True):  # what backward would leave
            p.grad = g
        torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_value_(params, CLIP)
        opt.step()

    return update


def flat_update(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor]):
    flat = FlatParams(params)
    if kind == "adam":
        opt = Adam(flat, lr=1e-3)
    else:
        opt = RMSprop(flat, lr=1e-4, alpha=0.95, momentum=0.9, centered=True)
    source = torch.cat([g.reshape(-1) for g in grads])

    def update():
        opt.zero_grad()
        flat.grad.copy_(source)  # what backward would leave (autograd accumulates into the views)
        grad_norm(flat)
        with torch.no_grad():
            flat.grad.clamp_(-CLIP, CLIP)
        opt.step()

    return update


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench/optim.py: {args.threads} threads, median of {args.iters} updates in alternation "
          f"(zero grad, norm, clip to +-{CLIP:g}, step); torch {torch.__version__}")
    print(f"{'model':9} {'tensors':>7} {'numbers':>8} {'optimizer':9} {'torch.optim ms':>14} {'mann.optim ms':>13} "
          f"{'saved ms':>8}")
    for label in MODELS:
        for kind in ("rmsprop", "adam"):
            g = torch.Generator().manual_seed(1)
            a = weights(label)
            b = [p.detach().clone().requires_grad_() for p in a]
            grads = [torch.randn(p.shape, generator=g) for p in a]
            updates = [torch_update(kind, a, grads), flat_update(kind, b, grads)]
            times: list[list[float]] = [[], []]
            for i in range(args.iters + 20):
                for update, out in zip(updates, times, strict=True):
                    t0 = time.perf_counter()
                    update()
                    if i >= 20:  # warm-up
                        out.append((time.perf_counter() - t0) * 1e3)
            ms = [statistics.median(t) for t in times]
            print(f"{label:9} {len(a):7} {sum(p.numel() for p in a):8} {kind:9} {ms[0]:14.3f} {ms[1]:13.3f} "
                  f"{ms[0] - ms[1]:8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
