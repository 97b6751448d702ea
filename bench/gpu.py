"""The GPU story in one run: what a trial's training step costs on each path, how trials share a GPU, seeds batched.

Prints, for ``--device`` (cuda by default; ``--device cpu`` runs the same script at small sizes, as the test suite
does, so the script is known to work before a GPU is there):

1. **step**: ms per full training step (forward over the copy sequence, loss, backward, RMSProp; bench/step.py's
   step and configurations) for each path of mann.dispatch on the device: ``reference`` (autograd, one launch per
   op), ``compiled`` (torch.compile of the model's step, inductor), on CUDA also ``cuda-graph`` (the same with
   ``mode="reduce-overhead"``: each step a CUDA-graph replay), beside ``fused`` on the CPU (the fused kernels,
   what a CPU trial runs). ``1st s`` is the first step, compile included (per process and shape);
   ``peak MB`` the most device memory one step holds above what was in use before it (CUDA only).
2. **packed**: 1, 4, 8, 16 trials at once on the device (as Ray packs trials with a fractional ``gpu``): each
   trial is its own process stepping the same configuration; after every trial's warm-up (compile included) all
   step for ``--packed-seconds`` together. Total steps/s against one trial alone.
3. **seeds**: ``mann.multiseed``'s folded step for 1, 8, 32 seeds (each seed its own weights and batch of 16):
   ms per step and against one seed (engine ``fold``; on the device's path under ``impl auto``).

    .venv/bin/python bench/gpu.py                       # on a GPU: under 10 minutes
    .venv/bin/python bench/gpu.py --device cpu --quick  # the smoke run the tests make
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mann import compiled, dispatch  # noqa: E402
from mann.multiseed import _make_engine, _start  # noqa: E402
from mann.registry import build_model, make_model_config  # noqa: E402
from mann.train import make_train_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import step as step_bench  # noqa: E402  (bench/step.py: its configurations, task, step and timing)

# label -> (registry name, model overrides): bench/step.py's reference sizes, and tiny ones for --quick
CONFIGS = {**step_bench.CONFIGS,
           "ntm-tiny": ("ntm", {"memory_size": 8, "word_size": 4, "controller_size": 8}),
           "dnc-tiny": ("dnc", {"memory_size": 8, "word_size": 4, "controller_size": 8, "read_heads": 2})}
FULL = {"configs": ["ntm", "dnc64", "dnc256"], "trials": [1, 4, 8, 16], "seeds": [1, 8, 32], "iters": 20,
        "warmup": 3, "packed_config": "ntm", "packed_seconds": 20.0}
# one tiny configuration: each compiled configuration costs the test suite about a minute of compiling
QUICK = {"configs": ["ntm-tiny"], "trials": [1, 2], "seeds": [1, 2], "iters": 2, "warmup": 1,
         "packed_config": "ntm-tiny", "packed_seconds": 2.0}


def build(label: str, path: str, device: torch.device):
    """(model, forward) of ``label`` on ``path``: reference, fused, compiled, or cuda-graph (compiled, CUDA graphs)."""
    name, overrides = CONFIGS[label]
    task = step_bench.make_task()
    torch.manual_seed(0)
    model = build_model(name, make_model_config(name, overrides), task.input_size, task.output_size).to(device)
    if path == "cuda-graph":
        return model, compiled.forward_fn(model, cuda_graphs=True)
    if path == "compiled":
        return model, compiled.forward_fn(model, cuda_graphs=False)
    return model, dispatch.forward_fn(model, dispatch.choose(model, path).path)


def peak_mb(step, batch, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def step_rows(label: str, device: torch.device, iters: int, warmup: int) -> list[dict]:
    """One row per path of ``label``: the device's paths and the CPU's fused kernels, timed in alternation."""
    cpu = torch.device("cpu")
    paths = [("reference", device), ("compiled", device)]
    if device.type == "cuda":
        paths.append(("cuda-graph", device))
    if CONFIGS[label][0] != "lstm":
        paths.append(("fused", cpu))
    variants = []
    for path, dev in paths:
        _, data = step_bench.batches(4, dev, torch.float32)
        t0 = time.perf_counter()
        model, forward = build(label, path, dev)
        step = step_bench.make_step(model, forward, step_bench.make_task())
        step(data[0])
        step_bench.sync(dev)
        variants.append((path, dev, step, data, time.perf_counter() - t0))
    for _path, dev, step, data, _ in variants:
        for i in range(warmup):
            step(data[i % len(data)])
        step_bench.sync(dev)
    wall: dict[str, list[float]] = {path: [] for path, *_ in variants}
    for i in range(iters):
        for path, dev, step, data, _ in variants:
            t0 = time.perf_counter()
            step(data[i % len(data)])
            step_bench.sync(dev)
            wall[path].append((time.perf_counter() - t0) * 1e3)
    return [{"config": label, "path": path, "device": dev.type, "ms": statistics.median(wall[path]),
             "first_s": first, "peak_mb": peak_mb(step, data[0], dev)}
            for path, dev, step, data, first in variants]


def worker(args) -> int:
    """One packed trial: warm up, say so, wait for the others, then step for ``--packed-seconds``; print steps/s."""
    device = torch.device(args.device)
    path = args.packed_path
    model, forward = build(args.packed_config, path, device)
    step = step_bench.make_step(model, forward, step_bench.make_task())
    _, data = step_bench.batches(4, device, torch.float32, seed=args.worker_index)
    for i in range(args.warmup + 1):
        step(data[i % len(data)])
    step_bench.sync(device)
    folder = Path(args.barrier)
    (folder / f"ready-{args.worker_index}").touch()
    while len(list(folder.glob("ready-*"))) < args.workers:
        time.sleep(0.01)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.packed_seconds:
        step(data[steps % len(data)])
        steps += 1
    step_bench.sync(device)
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0)}), flush=True)
    return 0


def packed(n: int, args, path: str) -> float:
    """Total steps/s of ``n`` trials stepping at once on the device."""
    with tempfile.TemporaryDirectory(prefix="mann-gpu-bench-") as barrier:
        common = [sys.executable, __file__, "--device", args.device, "--packed-config", args.packed_config,
                  "--packed-path", path, "--packed-seconds", str(args.packed_seconds), "--warmup", str(args.warmup),
                  "--workers", str(n), "--barrier", barrier, "--threads", "1"]
        procs = [subprocess.Popen([*common, "--worker-index", str(i)], stdout=subprocess.PIPE, text=True)
                 for i in range(n)]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a packed trial failed (exit codes {[p.returncode for p in procs]})")
    return sum(json.loads(out.strip().splitlines()[-1])["steps_per_s"] for out in outs)


def seeds_ms(label: str, count: int, device: torch.device, iters: int, warmup: int) -> float:
    """ms per folded training step of ``count`` seeds (mann.multiseed's engine, as fit_seeds runs it)."""
    name, overrides = CONFIGS[label]
    cfg = make_train_config(name, "copy", {
        "device": device.type, "batch_size": step_bench.BATCH, "task.min_length": step_bench.LENGTH,
        "task.max_length": step_bench.LENGTH, "task.curriculum": False,
        **{f"model.{k}": v for k, v in overrides.items()}})
    seeds = _start(cfg, list(range(count)))
    engine = _make_engine("fold" if count > 1 else "loop", seeds)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        for s, (_, norm) in zip(seeds, engine.train_step(seeds), strict=True):
            s.run.apply_update(norm)
        step_bench.sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (the CPU smoke run of the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--packed-config", default=None)
    p.add_argument("--packed-path", default=None)
    p.add_argument("--packed-seconds", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    # a packed trial's own process (started by this script)
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    for key in ("packed_config", "packed_seconds", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, plan[key])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_index is not None:
        return worker(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: --device cuda, but torch sees no CUDA device (use --device cpu for the smoke run)",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# bench/gpu.py on {name}: copy length {step_bench.LENGTH}, batch {step_bench.BATCH}, float32, "
          f"median of {plan['iters']} steps after {args.warmup} warm-up; torch {torch.__version__}", flush=True)
    records: dict[str, list] = {"step": [], "packed": [], "seeds": []}

    print(f"\n## step\n{'config':9} {'path':11} {'device':6} {'ms':>8} {'1st s':>7} {'peak MB':>8}", flush=True)
    for label in plan["configs"]:
        for r in step_rows(label, device, plan["iters"], args.warmup):
            records["step"].append(r)
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            print(f"{r['config']:9} {r['path']:11} {r['device']:6} {r['ms']:8.2f} {r['first_s']:7.2f} {peak:>8}",
                  flush=True)

    path = args.packed_path or ("cuda-graph" if device.type == "cuda" else "fused")
    print(f"\n## packed ({args.packed_config}, {path}, {args.packed_seconds:g} s together)\n"
          f"{'trials':>6} {'steps/s':>9} {'x one':>6}", flush=True)
    one = None
    for n in plan["trials"]:
        total = packed(n, args, path)
        one = one or total
        records["packed"].append({"trials": n, "steps_per_s": total, "vs_one": total / one})
        print(f"{n:6d} {total:9.1f} {total / one:6.2f}", flush=True)

    print(f"\n## seeds (fit_seeds' folded step, {args.packed_config})\n{'seeds':>6} {'ms':>8} {'x one':>6}",
          flush=True)
    base = None
    for count in plan["seeds"]:
        ms = seeds_ms(args.packed_config, count, device, plan["iters"], args.warmup)
        base = base or ms
        records["seeds"].append({"seeds": count, "ms": ms, "vs_one": ms / base})
        print(f"{count:6d} {ms:8.2f} {ms / base:6.2f}", flush=True)
    if device.type == "cuda":
        print(f"\npeak device memory of the run: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MB")
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, **records}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MANN_IMPL", "auto")
    raise SystemExit(main())
