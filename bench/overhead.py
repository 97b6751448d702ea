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

- ``fit alone``: fit with an ``on_eval`` that only reads the clock, in a fresh process;
- ``fit + on_eval``: fit with steps 1 and 2 done exactly as run_trial does them, against a real SQLite MLflow
  store made by ``study.tracking.prepare_experiment`` / ``start_study_run`` (as the sweep driver makes it),
  in a fresh process (as a trial in a new Ray worker: the first MLflow call pays the store's set-up);
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
carry elsewhere. Rule of thumb from them: logging + checkpoint + report cost a fixed ~0.1-0.2 s per evaluation, so
a trial stays under 5% when it trains for at least ~2-4 s between evaluations (``eval_every`` x step time).

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


def run_fit(label: str, budget: dict | None, device: str, threads: int, tracking: dict | None,
            keep: str | None) -> dict:
    """Time one fit. ``tracking``: None for fit alone, else {uri, experiment_id, parent_run_id}: on_eval then
    does what study.trainable.run_trial does outside Tune. ``keep``: copy the first checkpoint there (untimed)."""
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

    if tracking is not None and tracking["uri"].startswith("sqlite:"):
        # MLflow imports its SQLAlchemy store on the first call to a database URI: once per worker process (with
        # reuse_actors later trials in the process skip it), so it is timed apart from the trial.
        imported = time.perf_counter()
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        times["store_import"] = time.perf_counter() - imported
    started = time.perf_counter()
    tracker = None
    if tracking is not None:
        tracker = TrialTracker(
            tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], label.replace(" ", "_"),
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
    from study.sweep import ProgressCallback, StateBackupCallback, StudySpace

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


def print_case(label: str, alone: dict, tracked: dict, reports: list[float]) -> float:
    evals = len(tracked["records"])
    log = tracked["log_setup"] + sum(tracked["log"]) + tracked["log_end"]
    ckpt = sum(tracked["checkpoint"])
    report_mean = statistics.fmean(reports)
    report = report_mean * evals
    total = tracked["total"] + report
    print(f"\n{label}: {tracked['steps']} steps, evaluation every {tracked['eval_every']} ({evals} evaluations), "
          f"checkpoint {tracked['checkpoint_bytes'] / 1e3:.0f} kB")
    print(f"  {'':34}{'fit alone':>11}{'trial':>11}   per evaluation")
    print(f"  {'training (fit wall_time)':34}{fmt_s(alone['train'])}{fmt_s(tracked['train'])}   "
          f"{1e3 * tracked['train'] / evals:7.0f} ms")
    print(f"  {'evaluation (+ model building)':34}{fmt_s(sum(alone['evaluation']))}"
          f"{fmt_s(sum(tracked['evaluation']))}   {1e3 * statistics.median(tracked['evaluation']):7.0f} ms median")
    print(f"  {'MLflow logging':34}{'':>11}{fmt_s(log)}   {1e3 * statistics.median(tracked['log']):7.1f} ms median"
          f" send; run set-up {1e3 * tracked['log_setup']:.0f} ms, close {1e3 * tracked['log_end']:.0f} ms")
    print(f"  {'checkpointing':34}{'':>11}{fmt_s(ckpt)}   {1e3 * statistics.median(tracked['checkpoint']):7.1f} ms"
          f" median")
    print(f"  {'Tune report (measured in Tune)':34}{'':>11}{fmt_s(report)}   {1e3 * report_mean:7.1f} ms mean, "
          f"{1e3 * statistics.median(reports):.1f} median, {1e3 * max(reports):.1f} max (n={len(reports)})")
    print(f"  {'total':34}{fmt_s(alone['total'])}{fmt_s(total)}   (fit + on_eval {tracked['total']:.2f} s "
          f"+ Tune reports)")
    share = (log + ckpt) / total
    print(f"  share of logging + checkpointing: {100 * share:.1f}% (target <= 5%); with Tune reports: "
          f"{100 * (log + ckpt + report) / total:.1f}%")
    first = tracked["store_import"]
    if first:
        print(f"  once per worker process, not above: MLflow's SQLite store import {first:.2f} s; logging + "
              f"checkpointing of a trial that pays it (the first in a worker): "
              f"{100 * (log + ckpt + first) / (total + first):.1f}%")
    return share


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
            alone = in_fresh_process(run_fit, label, budgets[label], args.device, args.threads, None, None)
            print(f"{alone['total']:.0f} s; fit + on_eval ...", end=" ", flush=True)
            tracked = in_fresh_process(run_fit, label, budgets[label], args.device, args.threads, where, str(keep))
            print(f"{tracked['total']:.0f} s", flush=True)
            measured[label] = (alone, tracked, keep)

        ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
        try:
            reports = {}
            for label, (_, tracked, keep) in measured.items():
                print(f"{label}: Tune reports ...", end=" ", flush=True)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    reports[label] = tune_report_times(label, tracked, keep, work, args.gap)
                print("done", flush=True)
        finally:
            ray.shutdown()

        shares = {label: print_case(label, alone, tracked, reports[label])
                  for label, (alone, tracked, _) in measured.items()}
        worst = max(shares, key=shares.get)
        print(f"\nlargest share of logging + checkpointing: {100 * shares[worst]:.1f}% ({worst})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
