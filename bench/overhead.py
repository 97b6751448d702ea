"""What a sweep adds around training: the share of a trial's time in MLflow logging, checkpoints and Tune reports.

A trial of a sweep is ``mann.train.fit`` with an ``on_eval`` (study/trainable.py, ``run_trial``) that, at every
evaluation and at the defaults of ``TrialContext`` (checkpoint every evaluation, flush every evaluation):

1. sends the evaluation's metrics to the trial's MLflow child run (``TrialTracker.log_metrics``, one
   ``log_batch`` request), and at the last one flushes and records the status (``set_status``);
2. writes a checkpoint with fit's ``save_checkpoint`` into a temporary folder and wraps it in a Tune
   ``Checkpoint`` with its metadata;
3. calls ``tune.report`` with it: Tune persists (copies) the checkpoint to the experiment's storage, hands the
   result to the driver and blocks the training thread until the driver has dealt with it (scheduler,
   searcher, callbacks, experiment state) and asks for the next one.

Measured here, for the trial configurations of the demo study (search_spaces/demo.yaml: its NTM and its DNC
with 2 read heads, at lr 3e-3; its max_steps and eval_every) and for the reference NTM (128 x 20, LSTM 100,
1 read + 1 write head, 8-bit copy of length 1-20 with the curriculum, RMSProp 1e-4: the defaults, which are
search_spaces/ntm_copy.yaml's fixed values; its eval_every of 1,000 steps, over the first evaluations only):

- ``fit alone``: fit with an ``on_eval`` that only reads the clock, twice in a fresh process (the second printed);
- ``fit + on_eval``: fit with steps 1 and 2 done exactly as run_trial does them, against a real SQLite MLflow
  store made by ``study.tracking.prepare_experiment`` / ``start_study_run`` (as the sweep driver makes it),
  twice in a fresh process: the ``1st trial`` is a trial in a new Ray worker (its first MLflow calls pay the
  store's import, apart, and cold SQLAlchemy caches), the ``later`` one a trial in a reused worker
  (``reuse_actors``: 30 of bench/sweep.py's 32 trials). The target is read on the later trial;
- ``Tune report``: step 3, timed inside real Tune runs on a local Ray (2 CPUs): a small function trainable
  replays each configuration's evaluations (its metrics and its real checkpoint file, one report every
  ``--gap`` seconds) in a Tuner set up as study.sweep.make_tuner sets one up (TruthfulOptunaSearch with a
  SQLite study, ASHA on ``step``, JSON logger, state backup, checkpoints kept 2, TUNE_GLOBAL_CHECKPOINT_S=0),
  two trials at once.

Printed per configuration: training time (fit's ``wall_time``: inside training steps), evaluation time (the rest
of fit, model building included), MLflow logging time (run set-up, sends, status and close), checkpoint time,
Tune report time (per-report mean from the Tune runs x the trial's evaluations), and the share of
logging + checkpointing, and of all three, in the trial's total (fit + on_eval + Tune reports). Target: <= 5%.

    .venv/bin/python bench/overhead.py              # the demo's full trials, 2,000 reference NTM steps (~8-12 min)
    .venv/bin/python bench/overhead.py --quick      # 300 demo steps, 200 reference NTM steps every 100 (~3-5 min)
    .venv/bin/python bench/overhead.py --device cuda --threads 2   # on a GPU machine

Timings on a shared machine are noisy: ``fit alone`` and the trial run one after the other, so the difference of
their totals is mostly the machine's load; the costs measured directly (per evaluation, in ms) are the figures to
carry elsewhere. Rule of thumb from them (2-core CPU machine, SQLite): logging + checkpoint cost ~11-14 ms per
evaluation and ~30 ms per trial, the report ~20 ms more, so they stay under 5% when a trial trains for at least
~0.3 s between evaluations (~0.7 s with the report; ``eval_every`` x step time).

Figures, with the command: see docs/gpu.md ("What a sweep adds around training").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DEMO = ROOT / "search_spaces" / "demo.yaml"
REFERENCE = ROOT / "search_spaces" / "ntm_copy.yaml"

# label -> (study file, the trial's sampled parameters). The reference NTM's are ntm_copy's searched keys at the
# defaults of mann (so the trial is the default NTM on the default copy task).
CASES: dict[str, tuple[Path, dict]] = {
    "demo ntm": (DEMO, {"model": "ntm", "lr": 3e-3}),
    "demo dnc": (DEMO, {"model": "dnc", "lr": 3e-3, "model.read_heads": 2}),
    "reference ntm": (REFERENCE, {"model": "ntm", "optimizer": "rmsprop", "lr": 1e-4, "clip_value": 10.0,
                                  "batch_size": 16, "model.controller_size": 100, "model.memory_size": 128,
                                  "model.shift_range": 1, "model.memory_init": "constant"}),
}
# Budget overrides: None keeps the study's. The reference study's 50,000 steps would take hours here.
FULL = {"demo ntm": None, "demo dnc": None, "reference ntm": {"max_steps": 2000}}
QUICK = {"demo ntm": {"max_steps": 300}, "demo dnc": {"max_steps": 300},
         "reference ntm": {"max_steps": 200, "eval_every": 100}}
TUNE_REPORTS = 10  # reports per replayed trial (a trial with fewer evaluations repeats its last)
CPUS = 2


# ----------------------------------------------------------------------------------------------------------------
# One trial outside Tune (runs in a fresh process)


def trial_config(label: str, budget: dict | None, device: str):
    from mann.train import make_train_config
    from study.spec import load_spec, trial_overrides

    path, params = CASES[label]
    spec = load_spec(path)
    model, overrides = trial_overrides(spec, {"seed": 0, **params})
    overrides.update(budget or {})
    overrides["device"] = device
    return spec, make_train_config(model, spec.task, overrides)


def run_fit_twice(label: str, budget: dict | None, device: str, threads: int, tracking: dict | None,
                  keep: str | None) -> tuple[dict, dict]:
    """The same trial twice in one process: (the first trial of a worker process, a later one). With
    ``reuse_actors`` a worker process runs trial after trial (30 of bench/sweep.py's 32), and its later trials
    find torch, SQLAlchemy's statement caches and the SQLite connection pool warm."""
    first = run_fit(label, budget, device, threads, tracking, keep, "first")
    return first, run_fit(label, budget, device, threads, tracking, None, "later")


def run_fit(label: str, budget: dict | None, device: str, threads: int, tracking: dict | None,
            keep: str | None, trial: str = "first") -> dict:
    """Time one fit. ``tracking``: None for fit alone, else {uri, experiment_id, parent_run_id}: on_eval then
    does what study.trainable.run_trial does outside Tune. ``keep``: copy the first checkpoint there (untimed).
    ``trial`` names the MLflow run's trial (the two trials of ``run_fit_twice`` get runs of their own)."""
    import torch
    from ray.tune import Checkpoint

    from mann.train import CHECKPOINT_NAME, config_to_flat_dict, fit
    from study.tracking import TrialTracker

    torch.set_num_threads(threads)
    spec, cfg = trial_config(label, budget, device)
    times = {"log": [], "checkpoint": [], "evaluation": [], "log_setup": 0.0, "log_end": 0.0, "untimed": 0.0,
             "store_import": 0.0}
    records: list[dict] = []
    mark = {"clock": 0.0, "wall_time": 0.0}

    if tracking is not None and tracking["uri"].startswith("sqlite:") and trial == "first":
        # MLflow imports its SQLAlchemy store on the first call to a database URI: once per worker process (with
        # reuse_actors later trials in the process skip it), so it is timed apart from the trial.
        imported = time.perf_counter()
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        times["store_import"] = time.perf_counter() - imported
    started = time.perf_counter()
    tracker = None
    if tracking is not None:
        tracker = TrialTracker(
            tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], f"{label}-{trial}".replace(" ", "_"),
            params=config_to_flat_dict(cfg), tags={"mannstudy.trial_name": label}, flush_every=1,
        )
        times["log_setup"] = time.perf_counter() - started
    mark["clock"] = time.perf_counter()

    def on_eval(metrics: dict, save_checkpoint) -> None:
        entered = time.perf_counter()
        wall_time = float(metrics["wall_time"])
        # Time since the last on_eval returned, less training: the evaluation (the first also builds the model).
        times["evaluation"].append(entered - mark["clock"] - (wall_time - mark["wall_time"]))
        step = int(metrics["step"])
        records.append(dict(metrics))
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            if step >= cfg.max_steps:
                tracker.flush()
                tracker.set_status("completed", step=step)
            logged = time.perf_counter()
            times["log"].append(logged - entered)
            with tempfile.TemporaryDirectory(prefix="mannstudy-ckpt-") as tmp:
                save_checkpoint(tmp)
                saved = Checkpoint.from_directory(tmp)
                saved.set_metadata({"step": step, "wall_time": wall_time})
                wrapped = time.perf_counter()
                if keep and not times["checkpoint"]:  # the file the Tune runs replay (not a trial's cost)
                    shutil.copy(Path(tmp) / CHECKPOINT_NAME, keep)
                copied = time.perf_counter()
            times["untimed"] += copied - wrapped
            times["checkpoint"].append(wrapped - logged + time.perf_counter() - copied)  # + removing the folder
        mark["clock"], mark["wall_time"] = time.perf_counter(), wall_time

    result = fit(cfg, on_eval=on_eval)
    if tracker is not None:
        closing = time.perf_counter()
        tracker.close()
        times["log_end"] = time.perf_counter() - closing
    total = time.perf_counter() - started - times["untimed"]
    return {"status": result.status, "steps": result.step, "eval_every": cfg.eval_every, "total": total,
            "train": float(result.metrics["wall_time"]), "records": records, **times,
            "checkpoint_bytes": Path(keep).stat().st_size if keep else 0}


def in_fresh_process(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------------------------------------------
# tune.report inside a real Tune run


def replay(config: dict, job: dict) -> None:
    """Function trainable: report the recorded evaluations with the recorded checkpoint, timing each tune.report."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    attempt = {"node_id": ray.get_runtime_context().get_node_id(), "start_step": 0, "mlflow_run_id": "0" * 32}
    records, times = job["records"], []
    for i in range(job["reports"]):
        time.sleep(job["gap_s"])  # training, as far as the driver can tell
        final = i == job["reports"] - 1
        metrics = {**records[min(i, len(records) - 1)], "step": (i + 1) * job["every"]}
        result = {**metrics, "trial_status": "completed" if final else "running", **attempt,
                  "cpu_s": time.thread_time(), "train_cpu_s": 0.0, "process_cpu_s": time.process_time()}
        with tempfile.TemporaryDirectory(prefix="mannstudy-ckpt-") as tmp:
            shutil.copy(job["checkpoint"], Path(tmp) / "checkpoint.pt")
            saved = tune.Checkpoint.from_directory(tmp)
            saved.set_metadata({"step": metrics["step"], "wall_time": float(metrics["wall_time"])})
            started = time.perf_counter()
            try:
                tune.report(result, checkpoint=saved)
            finally:  # the last report ends in SystemExit: ASHA stops every trial at max_t, as in a sweep
                times.append(time.perf_counter() - started)
                (Path(job["out"]) / f"{trial_id}.json").write_text(json.dumps(times))


def tune_report_times(label: str, measured: dict, checkpoint: Path, work: Path, gap_s: float) -> list[float]:
    """Seconds per tune.report of two replayed trials of ``label`` run at once, in a Tuner set up as a sweep's."""
    import optuna
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from study.search import TruthfulOptunaSearch
    from study.spec import load_spec, make_sampler
    from study.state import StateBackupCallback
    from study.sweep import ProgressCallback, StudySpace

    spec = load_spec(CASES[label][0])
    name = label.replace(" ", "_")
    out = work / f"times-{name}"
    out.mkdir()
    every = measured["eval_every"]
    job = {"records": measured["records"], "checkpoint": str(checkpoint), "reports": TUNE_REPORTS,
           "every": every, "gap_s": gap_s, "out": str(out)}
    metric, mode = spec.objective.metric, spec.objective.mode
    searcher = TruthfulOptunaSearch(
        space=StudySpace(spec), metric=metric, mode=mode, sampler=make_sampler(spec),
        storage=optuna.storages.RDBStorage(f"sqlite:///{work / f'optuna-{name}.db'}"), study_name=name,
    )
    max_t = TUNE_REPORTS * every
    # Both trials replay the same scores, so ASHA stops neither (a stop would end the replay early).
    scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(spec.budget.grace_period, max_t),
                              reduction_factor=spec.budget.reduction_factor)
    exp_dir = work / "ray" / name
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(replay, job=job), {"cpu": 1, "gpu": 0}),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=2, max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(exp_dir.parent), failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[ProgressCallback(spec, stream=io.StringIO()), JsonLoggerCallback(),
                       StateBackupCallback(exp_dir)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{label}: a replayed trial failed in Tune: {grid.errors[0]}")
    times = [t for path in sorted(out.glob("*.json")) for t in json.loads(path.read_text())]
    if len(times) != 2 * TUNE_REPORTS:
        raise RuntimeError(f"{label}: expected {2 * TUNE_REPORTS} timed reports from Tune, got {len(times)}")
    return times


# ----------------------------------------------------------------------------------------------------------------
# Report


def fmt_s(seconds: float) -> str:
    return f"{seconds:8.2f} s"


def print_case(label: str, alone: tuple[dict, dict], tracked: tuple[dict, dict], reports: list[float]
               ) -> tuple[float, float]:
    """Print one configuration's table; return the share of logging + checkpointing of its (first, later) trial."""
    first, later = tracked
    evals = len(later["records"])
    report_mean = statistics.fmean(reports)
    report = report_mean * evals

    def costs(t: dict) -> tuple[float, float, float]:
        """(MLflow logging, checkpointing, total with the Tune reports) of one tracked trial, in seconds."""
        return t["log_setup"] + sum(t["log"]) + t["log_end"], sum(t["checkpoint"]), t["total"] + report

    print(f"\n{label}: {later['steps']} steps, evaluation every {later['eval_every']} ({evals} evaluations), "
          f"checkpoint {first['checkpoint_bytes'] / 1e3:.0f} kB")
    print(f"  {'':34}{'fit alone':>11}{'1st trial':>11}{'later':>11}   per evaluation (later trial)")

    def row(name: str, values: list[str], note: str) -> None:
        print(f"  {name:34}" + "".join(f"{v:>11}" for v in values) + f"   {note}")

    row("training (fit wall_time)", [fmt_s(alone[1]["train"]), fmt_s(first["train"]), fmt_s(later["train"])],
        f"{1e3 * later['train'] / evals:7.0f} ms")
    row("evaluation (+ model building)", [fmt_s(sum(t["evaluation"])) for t in (alone[1], first, later)],
        f"{1e3 * statistics.median(later['evaluation']):7.0f} ms median")
    row("MLflow logging", ["", fmt_s(costs(first)[0]), fmt_s(costs(later)[0])],
        f"{1e3 * statistics.median(later['log']):7.1f} ms median send; run set-up {1e3 * later['log_setup']:.0f} ms "
        f"(1st trial {1e3 * first['log_setup']:.0f}), close {1e3 * later['log_end']:.0f} ms")
    row("checkpointing", ["", fmt_s(costs(first)[1]), fmt_s(costs(later)[1])],
        f"{1e3 * statistics.median(later['checkpoint']):7.1f} ms median")
    row("Tune report (measured in Tune)", ["", fmt_s(report), fmt_s(report)],
        f"{1e3 * report_mean:7.1f} ms mean, {1e3 * statistics.median(reports):.1f} median, "
        f"{1e3 * max(reports):.1f} max (n={len(reports)})")
    row("total", [fmt_s(alone[1]["total"]), fmt_s(costs(first)[2]), fmt_s(costs(later)[2])],
        "(fit + on_eval + Tune reports)")
    shares = []
    for name, t in (("a later trial of a worker process", later), ("the first trial of one", first)):
        log, ckpt, total = costs(t)
        shares.append((log + ckpt) / total)
        print(f"  share of logging + checkpointing in {name}: {100 * shares[-1]:.1f}% (target <= 5%); with Tune "
              f"reports: {100 * (log + ckpt + report) / total:.1f}%")
    if first["store_import"]:
        log, ckpt, total = costs(first)
        imported = first["store_import"]
        print(f"  once per worker process, not above: MLflow's SQLite store import {imported:.2f} s; the first "
              f"trial's share with it: {100 * (log + ckpt + imported) / (total + imported):.1f}%")
    return shares[1], shares[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter trials (2 evaluations each): a smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="fit's device (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (the study's resources.cpu)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between replayed reports in the Tune runs")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                   help=f"configurations to measure ({', '.join(repr(c) for c in CASES)})")
    args = p.parse_args(argv)
    budgets = QUICK if args.quick else FULL

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    for key, value in {"RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": str(args.threads), "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_AUTH_MODE": "disabled"}.items():
        os.environ[key] = value
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import mlflow
    import ray
    import torch

    from mann.config import to_dict
    from study import tracking

    command = " ".join(["bench/overhead.py", *sys.argv[1:]] if argv is None else ["bench/overhead.py", *argv])
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"# {command}   ({now}; {platform.node()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"ray {ray.__version__}, mlflow {mlflow.__version__}; device {args.device}, {args.threads} torch "
          f"thread(s) per trial; MLflow in SQLite; checkpoint and flush every evaluation)", flush=True)

    uri = f"sqlite:///{work / 'mlflow.db'}"
    spec = None
    measured: dict[str, tuple[dict, dict, Path]] = {}
    try:
        for label in args.cases:
            from study.spec import load_spec

            spec = load_spec(CASES[label][0])
            experiment_id = tracking.prepare_experiment(uri, spec.name, work / "mlartifacts")
            parent = tracking.find_study_run(uri, experiment_id, spec.name) or tracking.start_study_run(
                uri, experiment_id, spec.name, to_dict(spec), CASES[label][0])
            where = {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent}
            keep = work / f"{label.replace(' ', '_')}.pt"
            print(f"{label}: fit alone ...", end=" ", flush=True)
            alone = in_fresh_process(run_fit_twice, label, budgets[label], args.device, args.threads, None, None)
            print(f"{alone[0]['total']:.0f} + {alone[1]['total']:.0f} s; fit + on_eval ...", end=" ", flush=True)
            tracked = in_fresh_process(run_fit_twice, label, budgets[label], args.device, args.threads, where,
                                       str(keep))
            print(f"{tracked[0]['total']:.0f} + {tracked[1]['total']:.0f} s", flush=True)
            measured[label] = (alone, tracked, keep)

        ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
        try:
            reports = {}
            for label, (_, tracked, keep) in measured.items():
                print(f"{label}: Tune reports ...", end=" ", flush=True)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    reports[label] = tune_report_times(label, tracked[0], keep, work, args.gap)
                print("done", flush=True)
        finally:
            ray.shutdown()

        shares = {label: print_case(label, alone, tracked, reports[label])
                  for label, (alone, tracked, _) in measured.items()}
        worst = max(shares, key=lambda label: shares[label][1])
        print(f"\nlargest share of logging + checkpointing: {100 * shares[worst][1]:.1f}% ({worst}) in a later trial "
              f"of a worker process; in the first trial of one, "
              f"{100 * max(first for first, _ in shares.values()):.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
