"""Kill the ``mannstudy sweep`` (and ``replicate``) driver at random moments, resume, and check the records.

Each schedule runs a small study (a tiny LSTM on the copy task, ASHA; TPE with one seed, or with
``--grid-every N`` every N-th a grid of learning rates x two seeds) in a folder of its own. A
seeded random schedule draws 1-5 SIGKILLs to the driver process, each at a moment of one phase:

    startup    0.3-8 s after the driver started (Ray starting, the Tuner being built, the first trials)
    mid        once 1-3 more trials have ended (read from the Optuna database), plus 0-1.5 s
    shutdown   once every trial has ended, plus 0-1 s (reconcile, the parent run being ended)

The first driver runs ``mannstudy sweep FILE``, every later one ``--resume`` (so every kill after the first
lands during a resume; a driver killed before it recorded anything left nothing to resume, and the command is
run again as it was, as its one-line refusal of ``--resume`` says); a final ``--resume`` must then finish the
study with exit code 0. The records are then checked from the databases themselves (:func:`check_sweep`): one
MLflow child run per trial with a terminal status, Optuna agreeing with it, no trial that had ended trained
again (each metric has one point per evaluation, none beyond the step the trial ended at), no run RUNNING, the
parent run FINISHED, Tune's state complete, and each configuration and seed run once (for the grid: every
point with every seed). With ``--replicate-every N``, every N-th schedule also replicates the finished study
(2 configurations x 2 seeds) under its own kill schedule and checks the replication the same way
(:func:`check_replication`).

    python bench/chaos.py --schedules 20 --seed 0 --parallel 3   # one line per schedule, then the summary

Ray's processes of each driver are marked by a private ``RAY_TMPDIR``; after each kill the harness
counts those still alive 15 s later (the driver's reaper should have ended them) and ends any left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PHASES = ("startup", "mid", "shutdown")
STUDY = {
    "name": "chaos",
    "description": "a tiny LSTM copy study for bench/chaos.py",
    "models": ["lstm"],
    "task": "copy",
    "fixed": {"optimizer": "adam", "batch_size": 8, "eval_batches": 1, "gen_scales": [2.0],
              "model.hidden_size": 16, "task.max_length": 3, "task.bits": 4},
    "search": {"lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}},
    "objective": {"metric": "error", "mode": "min"},
    "budget": {"num_samples": 12, "max_steps": 30, "eval_every": 10, "grace_period": 10, "reduction_factor": 3},
    "seeds": [0],
    "resources": {"cpu": 1, "gpu": 0},
    "concurrency": 2,
}
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
       # Ray's memory monitor kills workers when the machine's memory is nearly full (other programs' use counts):
       # a kill the harness did not schedule
       "RAY_memory_monitor_refresh_ms": "0"}
GRID_SEEDS = (0, 1)  # the seeds of the grid study (write_study)
STUDY_ENV = ("MLFLOW_TRACKING_URI", "MANNSTUDY_STORAGE", "MANNSTUDY_RESULTS_DIR")
RAY_START_FAILED = "The current node timed out during startup"  # ray.init's error on an overloaded machine


@dataclass
class Outcome:
    """What one schedule did and found."""

    kills: list[str]
    drivers: int = 0
    problems: list[str] = field(default_factory=list)
    trials: int = 0  # trials the study asked for
    once: int = 0  # trials accounted for exactly once
    lingering: int = 0  # Ray processes alive 15 s after a kill
    ray_retries: int = 0  # final drivers run again because their local Ray did not start (an overloaded machine)
    wall_s: float = 0.0


# ------------------------------------------------------------------------------------------------ processes


def marked(key: str, value: str) -> list[int]:
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def end_marked(ray_tmp: str) -> None:
    for _ in range(20):
        pids = marked("RAY_TMPDIR", ray_tmp)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)


def optuna_finished(db: Path) -> int:
    """Trials the Optuna database records as ended (read-only: the driver may be creating it)."""
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            query = "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
            return con.execute(query).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


class Driver:
    """One ``mannstudy`` driver process, in its own session, output appended to ``log``."""

    def __init__(self, args: list[str], folder: Path, ray_tmp: str, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV}
        env.update(ENV, RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
        with open(log, "ab") as out:
            out.write(f"\n$ mannstudy {' '.join(args)}\n".encode())
            self.process = subprocess.Popen([sys.executable, "-m", "study.cli", *args], cwd=folder, stdout=out,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)  # the driver only: its reaper must end Ray's processes
        self.process.wait(timeout=60)


def wait_for(driver: Driver, condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while driver.alive() and time.monotonic() < deadline and not condition():
        time.sleep(0.05)


def run_schedule(args: list[str], kills: list[str], rng: random.Random, folder: Path, db: Path | None,
                 total: int, out: Outcome, timeout_s: float) -> int:
    """Run the driver under ``kills`` (``args`` first, ``args + --resume`` after), then a final --resume;
    return its exit code. ``db``: the Optuna database whose ended trials the mid/shutdown phases wait for
    (None: the replication's, read from Tune's result files)."""
    log = folder / "drivers.log"
    killed: list[tuple[str, float]] = []  # (RAY_TMPDIR of a killed driver, when)
    tmps: list[str] = []

    def ended() -> int:
        if db is not None:
            return optuna_finished(db)
        return sum(1 for p in folder.glob("results/ray/rep-*/*/result.json")
                   if '"trial_status": "completed"' in p.read_text(errors="replace"))

    def start() -> Driver:
        """``--resume`` once the run has begun (a driver killed before it recorded anything left nothing to
        resume: the command is run again as it was, as its one-line refusal says)."""
        tmps.append(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # one per driver: what each one left is told apart
        out.drivers += 1
        begun = any(folder.glob(f"results/ray/.mannstudy/{'tune' if db is not None else 'rep-*'}/begun"))
        return Driver(args + (["--resume"] if begun else []), folder, tmps[-1], log)

    try:
        for phase in kills:
            driver = start()
            if phase == "startup":
                wait_for(driver, lambda: False, rng.uniform(0.3, 8.0))
            elif phase == "mid":
                target = min(total - 1, ended() + rng.randint(1, 3))
                wait_for(driver, lambda t=target: ended() >= t, timeout_s)
                wait_for(driver, lambda: False, rng.uniform(0.0, 1.5))
            else:
                wait_for(driver, lambda: ended() >= total, timeout_s)
                wait_for(driver, lambda: False, rng.uniform(0.0, 1.0))
            if driver.alive():
                driver.kill()
                killed.append((tmps[-1], time.monotonic()))
        for _ in range(3):
            final = start()
            try:
                final.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                final.kill()
                out.problems.append(f"the final --resume did not end in {timeout_s:.0f} s")
            if final.process.returncode == 0 or RAY_START_FAILED not in log.read_text(errors="replace")[-3000:]:
                break
            out.ray_retries += 1
        for ray_tmp, at in killed:  # the killed drivers' reapers had 15 s to end their Ray
            time.sleep(max(0.0, at + 15 - time.monotonic()))
            out.lingering += len(marked("RAY_TMPDIR", ray_tmp))
        return final.process.returncode
    finally:
        for ray_tmp in tmps:
            end_marked(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ checks


def _steps(client, run) -> dict[str, list[int]]:
    return {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def _check_series(client, run, last: int, every: int, what: str, problems: list[str], exact: bool) -> None:
    """One point per evaluation step of each metric (no step logged twice, none after the end); the final
    evaluation's metrics once, at the end."""
    from mann.train import END_METRICS

    for key, steps in _steps(client, run).items():
        if len(steps) != len(set(steps)):
            problems.append(f"{what}: {key} has a step logged twice: {steps}")
        elif steps and steps[-1] > last:
            problems.append(f"{what}: {key} logged beyond its end at step {last}: {steps}")
        elif exact and key.startswith(END_METRICS) and steps != [last]:
            problems.append(f"{what}: {key} steps {steps}, expected once, at the end ({last})")
        elif exact and not key.startswith(END_METRICS) and steps != list(range(every, last + 1, every)):
            problems.append(f"{what}: {key} steps {steps}, expected every {every} to {last}")


def check_sweep(study_file: Path) -> tuple[list[str], int, int]:
    """(problems, trials asked for, trials accounted for exactly once) of a finished sweep, from its stores."""
    import mlflow
    import optuna

    from study.record import STATUS_TO_RUN_STATUS, TAG_KIND, TAG_STATUS, TAG_STATUS_PREFIX, TAG_STUDY, TAG_TRIAL_ID
    from study.spec import SEED_ATTR, grid_points, load_spec, params_key
    from study.sweep import experiment_dir

    spec = load_spec(study_file)
    total, every = spec.budget.num_samples, spec.budget.eval_every
    problems: list[str] = []
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials(deepcopy=False)
    for t in trials:
        if not t.state.is_finished():
            problems.append(f"optuna trial {t.number} is {t.state.name}")
    ran = [t for t in trials if t.user_attrs.get("status") != "not_run"]
    tune_ids = Counter(t.user_attrs.get("tune_trial_id") for t in ran)
    if len(ran) != total:
        problems.append(f"optuna: {len(ran)} trials ran, expected {total}")
    # each configuration and seed ran once; a grid study ran every point with every seed
    pairs = Counter((params_key(t.params), t.user_attrs.get(SEED_ATTR)) for t in ran)
    twice = sorted(str(pair) for pair, n in pairs.items() if n > 1)
    if twice:
        problems.append(f"optuna: ran more than once: {', '.join(twice)}")
    if spec.sampler == "grid":
        expected = {(params_key(p), seed) for p in grid_points(spec) for seed in spec.seeds}
        if set(pairs) != expected:
            problems.append(f"optuna: grid points x seeds not run: {sorted(map(str, expected - set(pairs)))}")
    client = mlflow.MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{TAG_KIND}` = 'study' and tags.`{TAG_STUDY}` = '{spec.name}'")
    if [p.info.status for p in parents] != ["FINISHED"]:
        problems.append(f"parent runs: {[p.info.status for p in parents]}, expected one FINISHED")
    children = client.search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = 'trial'", max_results=10_000)
    runs_per_id = Counter(r.data.tags.get(TAG_TRIAL_ID) for r in children)
    runs = {r.data.tags.get(TAG_TRIAL_ID): r for r in children}
    for run in children:
        if run.info.status == "RUNNING":
            problems.append(f"MLflow run of {run.data.tags.get(TAG_TRIAL_ID)} is RUNNING")
    once = 0
    for t in trials:
        tune_id = t.user_attrs.get("tune_trial_id")
        status = t.user_attrs.get("status")
        run = runs.get(tune_id)
        what = f"trial {tune_id} ({status})"
        before = len(problems)
        if status == "not_run":
            if run is not None and run.info.status != "FAILED":
                problems.append(f"{what}: Optuna says not_run, its MLflow run is {run.info.status}")
            continue
        if tune_ids[tune_id] != 1 or runs_per_id[tune_id] != 1:
            problems.append(f"{what}: {tune_ids[tune_id]} Optuna trials, {runs_per_id[tune_id]} MLflow runs")
            continue
        tags = run.data.tags
        if tags.get(TAG_STATUS) != status or run.info.status != STATUS_TO_RUN_STATUS.get(status):
            problems.append(f"{what}: MLflow says {tags.get(TAG_STATUS)} / {run.info.status}")
            continue
        step = t.user_attrs.get("status_step")
        if step is not None and tags.get(TAG_STATUS_PREFIX + "step") != str(step):
            problems.append(f"{what}: ended at step {step} in Optuna, {tags.get(TAG_STATUS_PREFIX + 'step')} in MLflow")
        if status in ("completed", "stopped_early"):
            _check_series(client, run, int(step), every, what, problems, exact=True)
            if not set(t.intermediate_values) <= set(range(every, int(step) + 1, every)):
                problems.append(f"{what}: Optuna's intermediate steps {sorted(t.intermediate_values)}")
        if len(problems) == before:
            once += 1
    # Tune's results: after a trial reported its end, no attempt trained it again (an attempt that finds the
    # recorded end reports it once, from the step it ended at: start_step == step)
    for result in Path(experiment_dir(spec)).glob("*/result.json"):
        rows = [json.loads(row) for row in result.read_text().splitlines() if row.strip()]
        ends = [i for i, r in enumerate(rows) if r.get("trial_status") in ("completed", "diverged")]
        again = [r["step"] for r in rows[ends[0] + 1:] if r.get("start_step") != r.get("step")] if ends else []
        if again:
            problems.append(f"trial {rows[0]['trial_id']}: trained again after it ended (steps {again})")
    # Tune's state: every trial of its newest experiment state ended
    states = sorted(Path(experiment_dir(spec)).glob("experiment_state-*.json"))
    if not states:
        problems.append("no Tune experiment state")
    else:
        data = json.loads(states[-1].read_text())["trial_data"]
        statuses = Counter(json.loads(trial_json)["status"] for trial_json, _ in data)
        if sum(statuses.values()) != total or set(statuses) - {"TERMINATED"}:
            problems.append(f"Tune's state: {dict(statuses)}, expected {total} TERMINATED")
    return problems, total, once


def check_replication(study_file: Path, seeds: int, top: int) -> tuple[list[str], int, int]:
    """(problems, runs asked for, runs accounted for exactly once) of a finished replication."""
    import mlflow

    from study.record import (
        KIND_REPLICATION,
        STATUS_TO_RUN_STATUS,
        TAG_KIND,
        TAG_PARENT,
        TAG_SEED,
        TAG_STATUS,
        TAG_STATUS_PREFIX,
    )
    from study.spec import load_spec

    spec = load_spec(study_file)
    client = mlflow.MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    problems: list[str] = []
    parents = client.search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_REPLICATION}'")
    if [p.info.status for p in parents] != ["FINISHED"]:
        problems.append(f"replication runs: {[p.info.status for p in parents]}, expected one FINISHED")
        return problems, top * seeds, 0
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`{TAG_PARENT}` = '{parents[0].info.run_id}'", max_results=10_000)
    pairs = Counter((r.data.params.get("lr"), r.data.tags.get(TAG_SEED)) for r in children)
    once = 0
    for run in children:
        pair = (run.data.params.get("lr"), run.data.tags.get(TAG_SEED))
        what = f"replica lr {pair[0]} seed {pair[1]}"
        before = len(problems)
        status = run.data.tags.get(TAG_STATUS)
        if pairs[pair] != 1:
            problems.append(f"{what}: {pairs[pair]} runs")
        elif run.info.status != STATUS_TO_RUN_STATUS.get(status):
            problems.append(f"{what}: {status} / {run.info.status}")
        elif status == "completed":
            step = int(run.data.tags.get(TAG_STATUS_PREFIX + "step", -1))
            if step != spec.budget.max_steps:
                problems.append(f"{what}: completed at step {step}")
            _check_series(client, run, spec.budget.max_steps, spec.budget.eval_every, what, problems, exact=True)
        if len(problems) == before:
            once += 1
    if len(pairs) != top * seeds:
        problems.append(f"replication: {len(pairs)} (config, seed) pairs, expected {top * seeds}")
    return problems, top * seeds, min(once, top * seeds)


# ------------------------------------------------------------------------------------------------ schedules


def draw(rng: random.Random) -> list[str]:
    return [rng.choice(PHASES) for _ in range(rng.randint(1, 5))]


def mlflow_template(folder: Path) -> Path:
    """An MLflow SQLite database with its schema in place (creating one runs MLflow's migrations, seconds):
    each schedule's study starts from a copy."""
    from study.tracking import prepare_experiment, resolve_tracking_uri

    db = folder / "template" / "mlflow.db"
    if not db.is_file():
        prepare_experiment(resolve_tracking_uri(None, db.parent), "template")
    return db


def write_study(folder: Path, trials: int, template: Path | None = None, grid: bool = False) -> Path:
    """The chaos study in ``folder``: TPE, one seed; or with ``grid``, a grid of ``trials / 2`` learning rates
    x seeds 0 and 1 (the grid queued in Optuna at start-up, each point's repeat queued when it is asked)."""
    data = json.loads(json.dumps(STUDY))
    data["budget"]["num_samples"] = trials
    if grid:
        if trials % len(GRID_SEEDS):
            raise ValueError(f"--trials {trials}: a grid study needs a multiple of {len(GRID_SEEDS)}")
        points = trials // len(GRID_SEEDS)
        lrs = [float(f"{1e-4 * (3e-2 / 1e-4) ** (k / max(1, points - 1)):.3g}") for k in range(points)]
        data.update(search={"lr": {"choices": lrs}}, sampler="grid", seeds=list(GRID_SEEDS))
    data["results_dir"] = str(folder / "results")
    path = folder / "chaos.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if template is not None:
        (folder / "results").mkdir(exist_ok=True)
        shutil.copy(template, folder / "results" / "mlflow.db")
    return path


def sweep_schedule(folder: Path, kills: list[str], seed: int, trials: int, timeout_s: float = 900,
                   template: Path | None = None, grid: bool = False) -> Outcome:
    """One sweep under ``kills``; the study is left finished in ``folder`` (its records checked). ``grid``: the
    grid study with two seeds (:func:`write_study`)."""
    started = time.monotonic()
    path = write_study(folder, trials, template, grid)
    out = Outcome(kills=list(kills))
    code = run_schedule(["sweep", str(path)], kills, random.Random(seed), folder,
                        folder / "results" / "optuna.db", trials, out, timeout_s)
    if code != 0:
        out.problems.append(f"the final --resume exited {code} (see {folder / 'drivers.log'})")
    problems, out.trials, out.once = check_sweep(path)
    out.problems += problems
    out.wall_s = time.monotonic() - started
    return out


def replicate_schedule(folder: Path, kills: list[str], seed: int, top: int = 2, seeds: int = 2,
                       timeout_s: float = 900) -> Outcome:
    """Replicate the finished study in ``folder`` under ``kills``, then check the replication."""
    started = time.monotonic()
    path = folder / "chaos.yaml"
    out = Outcome(kills=list(kills))
    code = run_schedule(["replicate", str(path), "--top", str(top), "--seeds", str(seeds)], kills,
                        random.Random(seed), folder, None, top, out, timeout_s)
    if code != 0:
        out.problems.append(f"the final replicate --resume exited {code} (see {folder / 'drivers.log'})")
    problems, out.trials, out.once = check_replication(path, seeds, top)
    out.problems += problems
    out.wall_s = time.monotonic() - started
    return out


def line(label: str, out: Outcome) -> str:
    verdict = "clean" if not out.problems else f"{len(out.problems)} problems: " + "; ".join(out.problems[:4])
    return (f"{label}: kills {','.join(out.kills)} ({len(out.kills)}), {out.drivers} drivers, {out.wall_s:.0f} s; "
            f"trials {out.once}/{out.trials} exactly once; Ray processes left 15 s after a kill: {out.lingering}; "
            + (f"final driver rerun after Ray failed to start: {out.ray_retries}; " if out.ray_retries else "")
            + verdict)


def schedule(work: Path, i: int, seed0: int, trials: int, replicate_every: int, keep: bool,
             template: Path, grid_every: int = 0) -> tuple[int, list[tuple[str, Outcome]]]:
    """Schedule ``i``: a sweep under a random kill schedule (every ``grid_every``-th of the grid study with two
    seeds, the others TPE), and every ``replicate_every``-th a replication."""
    seed = seed0 * 1000 + i
    rng = random.Random(seed)
    folder = work / f"schedule-{i:02d}"
    grid = bool(grid_every) and i % grid_every == grid_every - 1
    outs = [("sweep", sweep_schedule(folder, draw(rng), seed, trials, template=template, grid=grid))]
    if replicate_every and i % replicate_every == replicate_every - 1 and not outs[0][1].problems:
        outs.append(("replicate", replicate_schedule(folder, draw(rng), seed + 500)))
    if all(not out.problems for _, out in outs) and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return seed, outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=12, help="trials per study (default 12)")
    parser.add_argument("--replicate-every", type=int, default=5, metavar="N",
                        help="every N-th schedule also replicates its study under kills (0: never; default 5)")
    parser.add_argument("--grid-every", type=int, default=2, metavar="N",
                        help="every N-th schedule runs the grid study with two seeds (0: never; default 2)")
    parser.add_argument("--parallel", type=int, default=1, help="schedules run at once (default 1)")
    parser.add_argument("--workdir", help="where the schedules' folders go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folders of clean schedules")
    parser.add_argument("--only", type=int, metavar="I", help="run schedule I alone (one process per schedule)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mannstudy-chaos-"))
    if args.only is not None:
        seed, outs = schedule(work, args.only, args.seed, args.trials, args.replicate_every, args.keep,
                              work / "template" / "mlflow.db", args.grid_every)
        for kind, out in outs:
            print(line(f"schedule {args.only:02d} seed {seed} {kind}", out), flush=True)
        record = [{"kind": kind, "clean": not out.problems, "trials": out.trials, "once": out.once}
                  for kind, out in outs]
        (work / f"schedule-{args.only:02d}.json").write_text(json.dumps(record))
        return 0
    from mann import native

    native.prepare()  # once, before any driver (each driver checks; none then builds)
    mlflow_template(work)
    started = time.monotonic()
    common = ["--seed", str(args.seed), "--trials", str(args.trials), "--replicate-every", str(args.replicate_every),
              "--grid-every", str(args.grid_every), "--workdir", str(work)] + (["--keep"] if args.keep else [])
    todo, running = list(range(args.schedules)), []
    while todo or running:
        running = [p for p in running if p.poll() is None]
        while todo and len(running) < args.parallel:
            running.append(subprocess.Popen([sys.executable, __file__, "--only", str(todo.pop(0)), *common]))
        time.sleep(1)
    clean = 0
    counts = {"sweep": [0, 0], "replicate": [0, 0]}  # kind -> [accounted for once, asked for]
    for i in range(args.schedules):
        path = work / f"schedule-{i:02d}.json"
        record = json.loads(path.read_text()) if path.is_file() else [
            {"kind": "sweep", "clean": False, "trials": args.trials, "once": 0}]
        clean += all(r["clean"] for r in record)
        for r in record:
            counts[r["kind"]][0] += r["once"]
            counts[r["kind"]][1] += r["trials"]
    (once, asked), (rep_once, rep_asked) = counts["sweep"], counts["replicate"]
    print(f"schedules {clean}/{args.schedules} clean, trials {once}/{asked} exactly once, replicated runs "
          f"{rep_once}/{rep_asked} exactly once ({time.monotonic() - started:.0f} s; folders in {work})", flush=True)
    return 0 if clean == args.schedules else 1


if __name__ == "__main__":
    sys.exit(main())
