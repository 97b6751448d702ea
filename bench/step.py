"""Milliseconds per full training step of the reference configurations, beside the controller-alone floor.

A full step is what a trial pays per update: forward over the whole sequence, the task's loss, backward, and the
optimizer step (RMSProp with mann.train's defaults, on one flat buffer as in a trial: mann.optim), on the copy
task at length 20 (41 time steps with the delimiter and the recall phase), batch 16. Batches are drawn before
timing; warm-up steps are not timed. The figure is the median over many steps, with the 10th-90th percentile
beside it. The floor and the paths of one configuration are timed in alternation, one step of each in turn, so
that a machine whose speed drifts hits them alike and ``ratio`` compares steps taken in the same seconds.
``cpu ms`` is the median CPU time of the process per step (all threads): with ``--threads 1`` on a busy machine
it is the better estimate of the uncontended step (wall time then includes the time the scheduler gave to other
processes). With 2 threads on a machine whose cores are busy, every parallel op waits for a descheduled thread.
``1st step s`` includes building or compiling (the fused kernels' build once per machine; torch.compile per
process and shape).

The floor is the controller alone: an ``nn.LSTMCell`` loop over the same time steps with the same input
size (task input + read vectors, fed zeros), one output layer, the same loss, backward and optimizer.
``ratio`` = step / floor: how much the memory machinery costs on top of the controller; printed for wall
time and for CPU time.

Memory, two figures per configuration:
- ``saved MB``: bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, counted
  once per storage). Exact and repeatable; it is what "do not materialise what backward does not need" is
  about.
- ``peak MB``: the most memory one full step holds above what was in use before it (after warm-up, so the
  optimizer state already exists). On CPU, glibc's count of bytes malloc has handed out (``mallinfo2``:
  in-use heap chunks + mmapped chunks, which is where large tensors go), sampled after every aten op of the
  step, forward and backward, by a ``TorchDispatchMode``: exact at op granularity (torch's CPU tensors come
  straight from malloc, no cache hides them; RSS and ``getrusage`` do not work here: the allocator keeps freed
  pages). On CUDA,
  ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the step.

    .venv/bin/python bench/step.py                 # all configurations, reference and fused
    .venv/bin/python bench/step.py --quick         # a smoke run (CI)
    .venv/bin/python bench/step.py --configs ntm dnc64 --impl fused compiled --json /tmp/step.json
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mann import dispatch  # noqa: E402
from mann.registry import build_model, make_model_config  # noqa: E402
from mann.tasks import build_task, make_task_config  # noqa: E402

BATCH = 16
LENGTH = 20  # copy length: 2 * 20 + 1 = 41 time steps
THREADS = 2

# label -> (registry name, model overrides). Sizes as in the issue: NTM 128x20, LSTM 100, 1 read + 1 write head;
# DNC N=64 / N=256, W=32, R=4, LSTM 128; the LSTM baseline at its default size.
CONFIGS: dict[str, tuple[str, dict]] = {
    "ntm": ("ntm", {"memory_size": 128, "word_size": 20, "controller_size": 100, "read_heads": 1,
                    "write_heads": 1}),
    "dnc64": ("dnc", {"memory_size": 64, "word_size": 32, "read_heads": 4, "controller_size": 128}),
    "dnc256": ("dnc", {"memory_size": 256, "word_size": 32, "read_heads": 4, "controller_size": 128}),
    "lstm": ("lstm", {}),
}


# ----------------------------------------------------------------------------------------------------------------
# What is timed


def make_task():
    cfg = make_task_config("copy", {"min_length": LENGTH, "max_length": LENGTH, "curriculum": False})
    return build_task("copy", cfg)


def make_optimizer(params, kind: str = "mann"):
    """RMSProp with mann.train's defaults: ``mann``, on one flat buffer as a trial runs it (mann.optim);
    ``torch``: torch.optim.RMSprop. Returns (optimizer, zero_grad)."""
    from mann.optim import FlatParams
    from mann.train import TrainConfig, build_optimizer

    cfg = TrainConfig()
    if kind == "torch":
        opt = torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                  centered=cfg.centered)
        return opt, lambda: opt.zero_grad(set_to_none=True)
    opt = build_optimizer(cfg, FlatParams(params))
    return opt, opt.zero_grad


def build(label: str, impl: str, device: torch.device, dtype: torch.dtype):
    """(model, forward(x) -> logits) of one configuration on one path of mann.dispatch (reference, fused,
    compiled): each is asked for by name, so a path that cannot run the model is an error, never the reference."""
    name, overrides = CONFIGS[label]
    cfg = make_model_config(name, overrides)
    task = make_task()
    torch.manual_seed(0)
    model = build_model(name, cfg, task.input_size, task.output_size).to(device=device, dtype=dtype)
    return model, dispatch.forward_fn(model, dispatch.choose(model, impl).path)


class Floor(nn.Module):
    """The controller alone: LSTMCell over [x_t, r] (r = zeros of the read vectors' size), one output layer."""

    def __init__(self, input_size: int, reads_size: int, hidden: int, output_size: int):
        super().__init__()
        self.reads_size = reads_size
        self.cell = nn.LSTMCell(input_size + reads_size, hidden)
        self.output = nn.Linear(hidden + reads_size, output_size)

    def forward(self, x):
        B, T, _ = x.shape
        r = x.new_zeros(B, self.reads_size)
        h = c = x.new_zeros(B, self.cell.hidden_size)
        hs = []
        for t in range(T):
            h, c = self.cell(torch.cat([x[:, t], r], dim=1), (h, c))
            hs.append(h)
        h = torch.stack(hs, dim=1)
        return self.output(torch.cat([h, r[:, None].expand(B, T, -1)], dim=-1))


def build_floor(label: str, device, dtype):
    name, overrides = CONFIGS[label]
    cfg = make_model_config(name, overrides)
    task = make_task()
    if name == "lstm":
        reads, hidden = 0, cfg.hidden_size
    else:
        reads, hidden = cfg.read_heads * cfg.word_size, cfg.controller_size
    torch.manual_seed(0)
    floor = Floor(task.input_size, reads, hidden, task.output_size).to(device=device, dtype=dtype)
    return floor, floor


def batches(n: int, device, dtype, seed: int = 0):
    task = make_task()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = task.sample(BATCH, g)
        out.append(type(b)(b.inputs.to(device, dtype), b.targets.to(device, dtype), b.mask.to(device, dtype)))
    return task, out


def make_step(model, forward, task, optimizer: str = "mann"):
    opt, zero_grad = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)

    def step(batch):
        zero_grad()
        loss = task.loss(forward(batch.inputs), batch)
        loss.backward()
        opt.step()
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(steps: list[Callable], data, device, warmup: int, iters: int) -> list[tuple[list, list]]:
    """Milliseconds of each timed step of each of ``steps``, run in turn (step i of every variant, then step
    i + 1), so that the machine's drift hits every variant alike: (wall clock, CPU time of this process, all
    its threads) per variant."""
    for step in steps:
        for i in range(warmup):
            step(data[i % len(data)])
    sync(device)
    times: list[tuple[list, list]] = [([], []) for _ in steps]
    for i in range(iters):
        batch = data[i % len(data)]
        for step, (wall, cpu) in zip(steps, times, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            step(batch)
            sync(device)
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return times


def saved_bytes(forward, task, batch) -> int:
    """Bytes autograd saves for backward in one forward + loss (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(forward(batch.inputs), batch)
    del loss
    return sum(seen.values())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes malloc has handed out and not taken back (glibc >= 2.33 ``mallinfo2``), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks (big tensors)

    return in_use


class _PeakAfterEachOp(TorchDispatchMode):
    """Samples a memory counter after every aten op (forward and backward): the peak at op granularity."""

    def __init__(self, counter: Callable[[], int]):
        super().__init__()
        self.counter, self.peak = counter, counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.counter())
        return out


def peak_mb(step, batch, device: torch.device) -> float | None:
    """MB: the peak memory one full step takes above what was in use before it (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(batch)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    in_use = _heap_in_use()
    if in_use is None:
        return None
    before = in_use()
    with _PeakAfterEachOp(in_use) as probe:
        step(batch)
    return (probe.peak - before) / 2**20


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One implementation of one configuration, ready to step."""

    impl: str
    step: Callable
    forward: Callable
    task: object
    first_step_s: float


def prepare(label: str, impl: str, device: torch.device, dtype: torch.dtype, data, optimizer: str = "mann") -> Variant:
    """Build ``impl`` of ``label`` and take its first step (which includes any compilation). ``fused-torchopt``: the
    fused path stepped by torch.optim.RMSprop instead of ``optimizer``."""
    if impl == "fused-torchopt":
        return dataclasses.replace(prepare(label, "fused", device, dtype, data, "torch"), impl=impl)
    t0 = time.perf_counter()
    if impl == "floor":
        model, forward = build_floor(label, device, dtype)
    else:
        model, forward = build(label, impl, device, dtype)
    task = make_task()
    step = make_step(model, forward, task, optimizer)
    step(data[0])
    sync(device)
    return Variant(impl, step, forward, task, time.perf_counter() - t0)


def measure_config(label: str, impls: list[str], device: torch.device, dtype: torch.dtype, warmup: int, iters: int,
                   probe_memory: bool, optimizer: str = "mann") -> list[dict]:
    """One row per implementation of ``label``, the floor first; all of them timed in alternation."""
    _, data = batches(4, device, dtype)
    variants = [prepare(label, impl, device, dtype, data, optimizer) for impl in ["floor", *impls]]
    times = time_alternating([v.step for v in variants], data, device, warmup, iters)
    records = []
    for v, (wall, cpu) in zip(variants, times, strict=True):
        record = {
            "config": label, "impl": v.impl, "ms": statistics.median(wall), "p10": percentile(wall, 0.1),
            "p90": percentile(wall, 0.9), "cpu_ms": statistics.median(cpu), "iters": iters,
            "first_step_s": v.first_step_s, "saved_mb": saved_bytes(v.forward, v.task, data[0]) / 2**20,
        }
        if probe_memory:
            record["peak_mb"] = peak_mb(v.step, data[0], device)
        records.append(record)
    floor = records[0]
    for r in records[1:]:
        r["floor_ms"], r["floor_cpu_ms"] = floor["ms"], floor["cpu_ms"]
        r["ratio"], r["cpu_ratio"] = r["ms"] / floor["ms"], r["cpu_ms"] / floor["cpu_ms"]
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--impl", nargs="+", default=["reference", "fused"],
                   choices=["reference", "fused", "compiled", "fused-torchopt"],
                   help="paths of mann.dispatch; fused-torchopt: the fused path stepped by torch.optim")
    p.add_argument("--optimizer", default="mann", choices=["mann", "torch"],
                   help="RMSProp of every other variant and the floor: mann.optim's (default) or torch.optim's")
    p.add_argument("--quick", action="store_true", help="few iterations, no memory probes (CI smoke test)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per figure (default 30; --quick 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    iters = args.iters or (2 if args.quick else 30)
    warmup = 1 if args.quick else 5
    probe = not (args.quick or args.no_memory)
    print(f"# bench/step.py: copy length {LENGTH} ({2 * LENGTH + 1} steps), batch {BATCH}, {args.threads} threads, "
          f"{args.device} {args.dtype}, median of {iters} steps after {warmup} warm-up; RMSProp of "
          f"{'mann.optim' if args.optimizer == 'mann' else 'torch.optim'}; torch {torch.__version__}")
    print(f"{'config':8} {'impl':13} {'ms':>8} {'p10-p90':>15} {'floor ms':>9} {'ratio':>6} {'cpu ms':>7} "
          f"{'floor cpu':>9} {'ratio':>6} {'saved MB':>9} {'peak MB':>8} {'1st step s':>10}")
    records = []
    for label in args.configs:
        impls = ["reference"] if CONFIGS[label][0] == "lstm" else args.impl
        records += measure_config(label, impls, device, dtype, warmup, iters, probe, args.optimizer)
        for r in records[-1 - len(impls):]:
            peak = r.get("peak_mb")
            peak_s = "-" if peak is None else f"{peak:.1f}"
            floor_s = f"{r['floor_ms']:.1f}" if "floor_ms" in r else "-"
            ratio_s = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            floor_cpu_s = f"{r['floor_cpu_ms']:.1f}" if "floor_cpu_ms" in r else "-"
            cpu_ratio_s = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
            print(f"{r['config']:8} {r['impl']:13} {r['ms']:8.1f} {r['p10']:7.1f}-{r['p90']:<7.1f} {floor_s:>9} "
                  f"{ratio_s:>6} {r['cpu_ms']:7.1f} {floor_cpu_s:>9} {cpu_ratio_s:>6} {r['saved_mb']:9.1f} {peak_s:>8} "
                  f"{r['first_step_s']:10.2f}", flush=True)
    if args.json:
        meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
                "torch": torch.__version__, "threads": args.threads, "device": args.device, "dtype": args.dtype}
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
