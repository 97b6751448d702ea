"""What a sweep costs besides training: the share of trial-process CPU inside training steps, and trial start-up.

Runs a study of tiny trials (STUDY below: NTM and LSTM on a short copy task, TPE + ASHA, 32 trials)
through :func:`study.sweep.run_sweep` on a fresh local Ray with 2 CPUs, MLflow and Optuna in SQLite,
exactly as ``mannstudy sweep`` runs it, and prints:

(a) CPU share. Denominator: the CPU time of every Ray worker process of the run (trial actors, and any
    worker Ray started and never used), sampled from /proc until each exits; Ray's own processes
    (raylet, GCS, ...) and the driver are printed beside it. Numerators, from the trainable's reports
    (study/trainable.py): ``train_cpu_s``, the training thread's CPU inside fit's training steps
    (evaluation excluded), and ``cpu_s``, all of that thread's CPU (evaluation, checkpoints, MLflow
    logging, reporting included). The rest is process start-up (imports), Ray's threads, idle workers.
(b) Start overhead per trial: from Tune starting the trial (driver clock) to its first result reaching
    the driver, minus the training time before that first evaluation (fit's ``wall_time``). Trials that
    start a new worker process pay the process start and imports; later trials reuse the process
    (``reuse_actors``) and pay model building, the MLflow run and the first evaluation.

    .venv/bin/python bench/sweep.py             # 32 trials, ~5 min on a 2-core machine
    .venv/bin/python bench/sweep.py --quick     # 8 trials with fewer steps: a smoke run (~1-2 min)
    .venv/bin/python bench/sweep.py --steps 2400  # longer trials: the start-up cost of the workers amortizes
    .venv/bin/python bench/sweep.py --keep DIR  # keep the results folder (MLflow, Optuna, Tune state) in DIR
    .venv/bin/python bench/sweep.py --study search_spaces/ntm_copy.yaml   # a shipped study, cut down (below)

STUDY is a stress case: its trials train tiny models (~1.5 ms a step) for 1-2 s each, so the two worker
processes' start-up weighs on it as on no real study. ``--study FILE`` measures a shipped study instead, as it
would run on this machine: its models, task, search space, evaluation and ``eval_every`` as written, with 32
trials (``--trials``; the next multiple of the number of seeds where the file lists them), ``max_steps`` cut
to two evaluations (``--steps``; ASHA's grace period half of it), one CPU and no GPU per trial, two trials at
once, no time budget, local MLflow and Optuna.

Timings on a shared machine are noisy; the CPU share much less so than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

STUDY = """\
name: bench_sweep
description: tiny trials for bench/sweep.py
models: [ntm, lstm]
task: copy
fixed:
  optimizer: adam
  batch_size: 16
  eval_batches: 2
  gen_scales: [2.0]
  task.bits: 4
  task.max_length: 3
model_fixed:
  ntm: {{model.controller_size: 32, model.memory_size: 16, model.word_size: 8}}
  lstm: {{model.hidden_size: 64}}
search:
  lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}
objective: {{metric: error, mode: min}}
budget: {{num_samples: {trials}, max_steps: {steps}, eval_every: {every}, grace_period: {grace}, reduction_factor: 2}}
seeds: trial
resources: {{cpu: 1, gpu: 0}}
concurrency: 2
results_dir: {results}
"""
FULL = {"trials": 32, "steps": 1200, "every": 100, "grace": 300}
QUICK = {"trials": 8, "steps": 200, "every": 50, "grace": 100}
CPUS = 2


# ----------------------------------------------------------------------------------------------------------------
# CPU time of the Ray processes, from /proc


class ProcessSampler(threading.Thread):
    """Samples utime+stime of every process whose environment has ``RAY_TMPDIR=<marker>`` (the processes
    of this run's Ray), keeping each one's last value; splits them into workers and Ray's own processes.

    A worker is a process the raylet started to run tasks and actors: the raylet gives it ``RAY_JOB_ID`` in its
    environment (its agents get none). Not the command line: Ray retitles workers (``ray::IDLE``,
    ``ray::ImplicitFunc.train``) and its agents (``ray::DashboardAgent``), and the raylet's names default_worker.py.
    """

    def __init__(self, marker: str, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.needle = f"RAY_TMPDIR={marker}".encode()
        self.period_s = period_s
        self.cpu: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.stop = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.own_cpu = 0.0  # this thread's CPU (it runs in the driver process)

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                if pid not in self.kind:
                    environ = (entry / "environ").read_bytes().split(b"\0")
                    if self.needle not in environ:
                        self.kind[pid] = "other"
                        continue
                    worker = any(v.startswith(b"RAY_JOB_ID=") for v in environ)
                    self.kind[pid] = "worker" if worker else "ray"
                if self.kind[pid] == "other":
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
            except (OSError, IndexError, ValueError):  # gone, or not readable
                continue

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            self.sample()
        self.own_cpu = time.thread_time()

    def per_process(self, kind: str) -> list[float]:
        return sorted((self.cpu[p] for p, k in self.kind.items() if k == kind and p in self.cpu), reverse=True)


# ----------------------------------------------------------------------------------------------------------------


def timing_callback():
    from ray.tune import Callback

    class Timing(Callback):
        """Driver clock at each trial's start and first result; every trial's first and last result."""

        def __init__(self):
            self.started: dict[str, float] = {}
            self.first: dict[str, tuple[float, dict]] = {}
            self.last: dict[str, dict] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.first.setdefault(trial.trial_id, (time.time(), dict(result)))
            self.last[trial.trial_id] = dict(result)

    return Timing()


def cut_down(study: Path, trials: int, steps: int | None, results: Path) -> tuple[str, str]:
    """A shipped study file as this bench runs it (module docstring): (YAML text, one line saying what it is)."""
    import yaml

    raw = yaml.safe_load(study.read_text())
    budget = raw["budget"]
    every = budget["eval_every"]
    steps = steps or 2 * every
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, list):  # every configuration runs once per seed: a multiple of them (33 for 3 seeds)
        trials = -(-trials // len(seeds)) * len(seeds)
    budget.update(num_samples=trials, max_steps=steps, eval_every=min(every, steps))
    budget.pop("time_budget_s", None)
    if budget.get("early_stopping", True):
        budget["grace_period"] = max(budget["eval_every"], steps // 2 // budget["eval_every"] * budget["eval_every"])
    raw.update(resources={"cpu": 1, "gpu": 0}, concurrency=2, results_dir=str(results))
    for key in ("tracking_uri", "storage"):
        raw.pop(key, None)
    fixed = raw.get("fixed", {})
    what = (f"{study} with {trials} trials of up to {steps} steps, evaluation every {budget['eval_every']} "
            f"(models {', '.join(raw['models'])} on {raw['task']}; fixed {fixed}; searched {', '.join(raw['search'])})")
    return yaml.safe_dump(raw, sort_keys=False), what


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (f"median {statistics.median(values):.2f} s, mean {statistics.fmean(values):.2f} s, "
            f"min {min(values):.2f} s, max {max(values):.2f} s (n={len(values)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 trials of 200 steps: a smoke run")
    p.add_argument("--keep", metavar="DIR", help="write the results folder here and keep it")
    p.add_argument("--steps", type=int, help="budget.max_steps (default 1200; ASHA's grace period is a quarter; "
                                             "with --study: two evaluations, grace half)")
    p.add_argument("--study", type=Path, metavar="FILE", help="run this study file, cut down (see above)")
    p.add_argument("--trials", type=int, default=FULL["trials"], help="with --study: trials (default 32)")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.steps and not args.study:
        sizes.update(steps=args.steps, grace=max(sizes["every"], args.steps // 4 // sizes["every"] * sizes["every"]))

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # private: marks this run's Ray processes
    results = Path(args.keep).resolve() if args.keep else work / "results"
    for key, value in {"RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_AUTH_MODE": "disabled"}.items():
        os.environ[key] = value
    for key in ("MLFLOW_TRACKING_URI", "MANNSTUDY_STORAGE", "MANNSTUDY_RESULTS_DIR"):
        os.environ.pop(key, None)
    path = work / "bench_sweep.yaml"
    if args.study:
        text, what = cut_down(args.study, args.trials, args.steps, results)
        path.write_text(text)
    else:
        path.write_text(STUDY.format(results=results, **sizes))
        what = (f"{sizes['trials']} trials (NTM 32/16x8 and LSTM 64 on copy, length 1-3, 4 bits, batch 16; up to "
                f"{sizes['steps']} steps, evaluation every {sizes['every']}: 2 batches at 1x and 2x), TPE + ASHA "
                f"(grace {sizes['grace']}, factor 2)")

    from study.sweep import run_sweep

    sampler = ProcessSampler(ray_tmp)
    timing = timing_callback()
    command = " ".join(["bench/sweep.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}: {what}, local Ray with {CPUS} CPUs, 2 trials at once, MLflow + Optuna in SQLite",
          flush=True)
    driver_cpu = time.process_time()
    started = time.monotonic()
    sampler.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the sweep's own progress lines
            result = run_sweep(path, num_cpus=CPUS, callbacks=[timing])
    finally:
        sampler.stop.set()
        sampler.join()
        sampler.sample()
    wall = time.monotonic() - started
    driver_cpu = time.process_time() - driver_cpu

    per_worker = sampler.per_process("worker")
    worker_cpu, ray_cpu, ray_procs = sum(per_worker), sum(sampler.per_process("ray")), len(sampler.per_process("ray"))
    last = timing.last.values()
    train_cpu = sum(r.get("train_cpu_s", 0.0) for r in last)
    thread_cpu = sum(r.get("cpu_s", 0.0) for r in last)
    trained_steps = sum(r.get("step", 0) for r in last)
    print(f"wall {wall:.0f} s; {result.line()}; {trained_steps} training steps in all")
    each = ", ".join(f"{c:.1f}" for c in per_worker)
    print(f"(a) worker processes ({len(per_worker)}): {worker_cpu:.1f} CPU s ({each}); inside training steps "
          f"{train_cpu:.1f} s = {100 * train_cpu / worker_cpu:.1f}% (target >= 85%)")
    print(f"    training thread in all (with evaluation, checkpoints, MLflow, reporting): {thread_cpu:.1f} s = "
          f"{100 * thread_cpu / worker_cpu:.1f}%; the rest (process start-up and imports, Ray threads, idle "
          f"workers): {worker_cpu - thread_cpu:.1f} s")
    # One-time costs of a worker process, before its first trial's clock starts: the Ray worker and Tune's actor,
    # then study.trainable._prepare_process (torch, mann, MLflow and its store); and in that first
    # trial's thread, first use of torch ops.
    firsts = {}
    for trial_id, (_, first) in sorted(timing.first.items(), key=lambda kv: kv[1][0]):
        firsts.setdefault(first.get("pid"), trial_id)
    before_first = sum(timing.first[t][1]["process_cpu_s"] - timing.first[t][1]["cpu_s"] for t in firsts.values())
    side = {t: r["cpu_s"] - r["train_cpu_s"] for t, r in timing.last.items()}  # thread CPU outside training steps
    later = [v for t, v in side.items() if t not in firsts.values()]
    if later:
        print(f"    thread CPU outside training steps per trial: first trial of a process "
              f"{statistics.median(side[t] for t in firsts.values()):.2f} s, later trials median "
              f"{statistics.median(later):.2f} s (evaluation, checkpoints, MLflow, reporting)")
    print(f"    without the worker processes' start-up before their first trial ({before_first:.1f} s): "
          f"{100 * train_cpu / (worker_cpu - before_first):.1f}%")
    print(f"    beside them: driver {driver_cpu - sampler.own_cpu:.1f} CPU s (this bench's /proc sampling excluded: "
          f"{sampler.own_cpu:.1f} s), Ray's own processes {ray_cpu:.1f} CPU s ({ray_procs})")

    overheads = {"new": [], "reused": []}
    seen_pids = set()
    for trial_id, (at, first) in sorted(timing.first.items(), key=lambda kv: kv[1][0]):
        if trial_id not in timing.started:
            continue
        overhead = at - timing.started[trial_id] - float(first.get("wall_time", 0.0))
        overheads["reused" if first.get("pid") in seen_pids else "new"].append(overhead)
        seen_pids.add(first.get("pid"))
    print(f"(b) start overhead per trial (trial start -> first result, minus training): "
          f"{summary(overheads['new'] + overheads['reused'])}")
    print(f"    in a new worker process: {summary(overheads['new'])}")
    print(f"    in a reused one: {summary(overheads['reused'])}")

    deadline = time.monotonic() + 10  # Ray's processes exit in the moments after ray.shutdown()
    while True:
        sampler.kind.clear()  # look at every process again, started late or not
        sampler.sample()
        leftover = [p for p, k in sampler.kind.items() if k != "other"]
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leftover:
        print(f"warning: {len(leftover)} Ray processes of this run still running: {leftover}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
