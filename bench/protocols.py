"""Milliseconds per training step of the published protocols issue 12 replicates, as a trial runs them.

A step is exactly what ``mann.train.fit`` pays per update: ``_Run.train_step`` (a fresh batch from the task at
the protocol's full difficulty, forward, loss, backward, gradient norm) and ``_Run.apply_update`` (clipping,
weight decay, the optimizer). Sequence lengths are drawn as in training, so steps differ in cost: the budget
figure is the **mean** over many steps (the median and the 10th-90th percentile are printed beside it). Warm-up
steps are not timed. Run with one thread (``--threads 1``, and ``OMP_NUM_THREADS=1`` in the environment) to
price one trial per core; on a shared machine ``cpu ms`` (process CPU time per step) is the steadier figure.

Protocols (the papers' public training scripts' defaults):

- ``collier_ntm``: Collier & Beel 2018, run_tasks.py: NTM, LSTM-100 (forget bias 1), N=128, W=20, 1 read + 1
  write head, shift range 1, clip 20, memory init as their code runs "constant" (``constant_trained``); copy, 8
  bits, lengths 1-20, no curriculum, loss summed per sequence; batch 32; Adam lr 1e-3; gradient-norm clip 50.
  ``collier_ntm_len20``: the same at length 20 only, which is what run_tasks.py trains on with its default
  ``--curriculum none`` (generate_data.py: ``seq_len = max_seq_len``).
- ``graves_ntm``: Graves et al. 2014 copy: the same NTM, RMSProp (Graves 2013: centered, momentum 0.9) lr 1e-4,
  gradients clipped to (-10, 10); batch 16 (the paper does not give one).
- ``graves_lstm``: the paper's LSTM baseline on copy: 3 stacked layers of 256; otherwise as ``graves_ntm``.
- ``csordas_dnc`` / ``csordas_dnc_mds``: Csordás & Schmidhuber 2019, main.py's associative_recall profile: DNC
  (and DNC-MDS, masks floored at 0.1), LSTM-128 (forget bias 1), N=64, W=32, 1 read head, interface clip 20;
  associative recall, items of 3 x 8 bits, 2-16 items, no curriculum, loss summed per sequence; batch 16;
  RMSProp (not centered) lr 1e-4, momentum 0.9, eps 1e-10, weight decay 1e-5 on weights; gradient-norm clip 10.

    OMP_NUM_THREADS=1 .venv/bin/python bench/protocols.py --threads 1
    .venv/bin/python bench/protocols.py --protocols csordas_dnc --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mann.train import _Run, make_train_config  # noqa: E402

NTM = {"model.controller_size": 100, "model.memory_size": 128, "model.word_size": 20, "model.read_heads": 1,
       "model.write_heads": 1, "model.shift_range": 1, "model.clip_value": 20}
FORGET = {"model.forget_bias": 1.0}
COPY = {"task.bits": 8, "task.min_length": 1, "task.max_length": 20, "task.curriculum": False}
SUM = {"task.loss_reduction": "sum"}
GRAVES_OPT = {"optimizer": "rmsprop", "lr": 1e-4, "momentum": 0.9, "alpha": 0.95, "centered": True,
              "clip_norm": None, "clip_value": 10.0, "batch_size": 16}
DNC = {"model.controller_size": 128, "model.memory_size": 64, "model.word_size": 32, "model.read_heads": 1,
       "model.clip_value": 20}
RECALL = {"task.bits": 8, "task.item_length": 3, "task.min_items": 2, "task.max_items": 16, "task.curriculum": False,
          **SUM}
CSORDAS_OPT = {"optimizer": "rmsprop", "lr": 1e-4, "momentum": 0.9, "alpha": 0.99, "centered": False, "eps": 1e-10,
               "weight_decay": 1e-5, "clip_norm": 10.0, "clip_value": None, "batch_size": 16}

PROTOCOLS: dict[str, tuple[str, str, dict]] = {
    "collier_ntm": ("ntm", "copy", {**NTM, **COPY, **SUM, **FORGET, "model.memory_init": "constant_trained",
                                    "optimizer": "adam", "lr": 1e-3, "clip_norm": 50.0, "clip_value": None,
                                    "batch_size": 32}),
    "collier_ntm_len20": ("ntm", "copy", {**NTM, **COPY, **SUM, **FORGET, "task.min_length": 20,
                                          "model.memory_init": "constant_trained", "optimizer": "adam", "lr": 1e-3,
                                          "clip_norm": 50.0, "clip_value": None, "batch_size": 32}),
    "graves_ntm": ("ntm", "copy", {**NTM, **COPY, **GRAVES_OPT}),
    "graves_lstm": ("lstm", "copy", {"model.hidden_size": 256, "model.layers": 3, **COPY, **GRAVES_OPT}),
    "csordas_dnc": ("dnc", "associative_recall", {**DNC, **RECALL, **CSORDAS_OPT, **FORGET}),
    "csordas_dnc_mds": ("dnc-mds", "associative_recall", {**DNC, **RECALL, **CSORDAS_OPT, **FORGET,
                                                          "model.mask_min": 0.1}),
}


def time_protocol(name: str, steps: int, warmup: int, seed: int) -> dict[str, float]:
    model, task, overrides = PROTOCOLS[name]
    run = _Run(make_train_config(model, task, {**overrides, "seed": seed, "max_steps": steps + warmup}))
    walls, cpus = [], []
    for i in range(warmup + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        loss, norm = run.train_step()
        run.apply_update(norm)
        float(loss)  # fit syncs once per step (its finiteness check)
        if i >= warmup:
            walls.append(1e3 * (time.perf_counter() - wall))
            cpus.append(1e3 * (time.process_time() - cpu))
    params = sum(p.numel() for p in run.model.parameters())
    deciles = statistics.quantiles(walls, n=10)
    return {"mean": statistics.fmean(walls), "median": statistics.median(walls), "p10": deciles[0],
            "p90": deciles[-1], "cpu_mean": statistics.fmean(cpus), "params": params,
            "batch": run.cfg.batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--steps", type=int, default=40, help="timed steps per protocol")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} thread(s), torch "
          f"{torch.__version__}; ms per training step")
    print(f"{'protocol':16} {'batch':>5} {'params':>9} {'mean':>8} {'median':>8} {'p10-p90':>15} {'cpu mean':>9}")
    for name in args.protocols:
        r = time_protocol(name, args.steps, args.warmup, args.seed)
        print(f"{name:16} {r['batch']:5d} {r['params']:9,d} {r['mean']:8.1f} {r['median']:8.1f} "
              f"{r['p10']:7.1f}-{r['p90']:<7.1f} {r['cpu_mean']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
