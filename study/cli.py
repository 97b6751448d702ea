"""The ``mannstudy`` command.

Each subcommand is one entry of ``_commands``: a help line, a function that adds its arguments
and a function that runs it and returns the exit code. Handlers import what they need inside
themselves, so ``mannstudy train`` never imports Ray and ``--help`` is instant.

Exit codes: 0 success, 1 a run that diverged, 2 a user mistake (bad key or value, missing or
corrupt file), reported as one line ``mannstudy: <error>`` on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mann.config import ConfigError, one_line, parse_set_args
from study.redact import redact

PROG = "mannstudy"


class UsageError(Exception):
    """A user mistake a handler reports as one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``mannstudy: <error>`` (exit 2) like every other user mistake."""

    def error(self, message: str):
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command}: {message}" if command else message)


# Raised for user mistakes by modules that handlers import lazily (matched by name so that importing this
# module never imports them).
_USER_ERRORS = {"SweepError", "StateError", "TrackingError", "CheckpointError", "SpecError", "TidyError", "ReportError",
                "ReplicationError", "SensitivityError", "SubmitError"}


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------------------------------
# train


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (ntm, dnc, dnc-md, dnc-ms, dnc-mds, lstm); default ntm")
    p.add_argument("--task", help="task name; default copy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (lr=1e-3, model.memory_size=64, task.max_length=5); repeatable")
    p.add_argument("--steps", type=int, help="training steps (the max_steps key)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="the device key")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write DIR/checkpoint.pt at evaluations and at the end")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (file or its directory)")


def _train_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_set_args(args.set)
    for key, value in (("max_steps", args.steps), ("device", args.device), ("checkpoint_dir", args.checkpoint_dir)):
        if value is not None:
            overrides[key] = value
    return overrides


def _train(args: argparse.Namespace) -> int:
    from mann.config import check_limits
    from mann.train import (
        CheckpointError,
        check_checkpoint_dir,
        checkpoint_path,
        config_from_flat_dict,
        load_checkpoint,
        make_train_config,
    )

    overrides = _train_overrides(args)
    try:
        if args.resume:
            # The checkpoint's own config, with --set on top (e.g. more steps); --model/--task must agree with it.
            source = str(checkpoint_path(args.resume))
            stored = load_checkpoint(args.resume)["config"]
            for key in ("model", "task"):
                given = getattr(args, key)
                if given is not None and given != stored[key]:
                    raise ConfigError(f"--{key}", f"the {key} of {source} ({stored[key]!r})", given)
            try:
                config_from_flat_dict(stored)
            except ConfigError as err:  # the stored config itself, not --set: name the checkpoint
                raise err.with_source(source, "config.") from None
            cfg = config_from_flat_dict({**stored, **overrides})
        else:
            cfg = make_train_config(args.model or "ntm", args.task or "copy", overrides)
        check_limits(cfg)
        if cfg.checkpoint_dir is not None:
            check_checkpoint_dir(cfg.checkpoint_dir, resuming=args.resume)
        return _fit_with_progress(cfg, resume_from=args.resume)
    except CheckpointError as err:
        raise UsageError(str(err)) from None


def _fit_with_progress(cfg, resume_from=None, history: list | None = None) -> int:
    """Run fit, printing one line per evaluation and the final status. Returns the exit code."""
    from mann.train import fit, resolve_device

    device = resolve_device(cfg.device)
    print(f"{cfg.model} on {cfg.task}: {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, "
          f"{cfg.max_steps} steps, seed {cfg.seed}, {device.type} {cfg.dtype}", flush=True)

    def on_eval(metrics, save_checkpoint):
        print(progress_line(metrics), flush=True)
        if history is not None:
            history.append(metrics)

    result = fit(cfg, on_eval=on_eval, resume_from=resume_from)
    print(result.message)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 1 if result.status == "diverged" else 0


def progress_line(m: dict) -> str:
    """One evaluation as one line: step, loss, error, accuracy, level, generalization errors, throughput."""
    parts = [
        f"step {m['step']:>7}",
        f"loss {m['train_loss']:.4f}",
        f"error {m['error']:.3f}",
        f"acc {m['accuracy']:.3f}",
        f"level {m['level']:g}",
    ]
    parts += [f"{k.removesuffix('_error')} {v:.3f}" for k, v in m.items() if k.startswith("gen") and
              k.endswith("x_error")]
    rate = m["sequences"] / m["wall_time"] if m["wall_time"] > 0 else math.nan
    parts.append(f"seq/s {rate:.0f}")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# demo

# The first look: the demo study (NTM vs DNC on a short copy task, 8 configurations x 3 seeds; README.md says how
# long it takes), then its report. Run again, it finishes what is missing and rewrites the report.
DEMO_STUDY = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
# --quick (CI's smoke test): the same study shrunk to a few trials of a few steps, in a folder of its own.
DEMO_QUICK = {"num_samples": 3, "max_steps": 20, "eval_every": 10, "grace_period": 10, "reduction_factor": 2}


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few trials of a few steps (a smoke test)")
    p.add_argument("--results-dir", help="where the quick demo writes (default: a new temporary folder)")


def _quick_demo_file(results_dir: str) -> Path:
    import yaml

    data = yaml.safe_load(DEMO_STUDY.read_text())
    data["name"] = "demo-quick"
    data["budget"] = {**data["budget"], **DEMO_QUICK}
    data["results_dir"] = str(Path(results_dir).resolve())
    path = Path(results_dir) / "demo-quick.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _demo(args: argparse.Namespace) -> int:
    import tempfile

    from analysis.report import cli_report
    from study.spec import load_spec
    from study.sweep import experiment_dir, run_sweep

    _quiet_optuna()
    path = _quick_demo_file(args.results_dir or tempfile.mkdtemp(prefix="mannstudy-demo-")) if args.quick \
        else DEMO_STUDY
    spec = load_spec(path)
    resume = Path(experiment_dir(spec)).is_dir()
    if resume:
        print(f"demo: {spec.results_dir} already holds the demo study: resuming it "
              f"(delete that folder for a fresh run)")
    summary = run_sweep(path, resume=resume)
    print(f"demo: {summary.line()}")
    code = cli_report(str(path))
    print(f"demo: open the runs with  mannstudy ui {spec.results_dir}  (then the address it prints)")
    return code


# ---------------------------------------------------------------------------------------------------------------------
# validate


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a study file (YAML), e.g. search_spaces/demo.yaml")


def _validate(args: argparse.Namespace) -> int:
    from study.spec import cli_validate

    return cli_validate(args.file, prefix=f"{PROG}: ")


# ---------------------------------------------------------------------------------------------------------------------
# sweep, ui


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a study file (search_spaces/*.yaml)")
    p.add_argument("--address", help="join a Ray cluster ('auto' on a cluster head, or host:port); "
                                     "default: a local Ray on this machine. With --submit: the cluster's dashboard "
                                     "(default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--resume", action="store_true",
                   help="finish a study whose driver stopped (completed trials are kept, running ones resume)")
    p.add_argument("--submit", action="store_true",
                   help="run the driver on the cluster as a Ray Job (it outlives this shell) and return")


def _sweep(args: argparse.Namespace) -> int:
    if args.submit:
        from study.submit import cli_submit

        return cli_submit(args.file, address=args.address, resume=args.resume)
    from study.sweep import cli_sweep

    _quiet_optuna()
    return cli_sweep(args.file, address=args.address, resume=args.resume)


def _ui_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", nargs="?", default="results",
                   help="a study's results folder (results/<name>) holding mlflow.db; default results")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument("--tracking-uri", help="an MLflow tracking URI instead of the folder's mlflow.db")


def _ui(args: argparse.Namespace) -> int:
    from study.tracking import cli_ui

    return cli_ui(args.results_dir, port=args.port, tracking_uri=args.tracking_uri)


# ---------------------------------------------------------------------------------------------------------------------
# replicate, report


def _replicate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the study file of a finished study")
    p.add_argument("--top", type=int, default=3, metavar="K", help="replicate the K best configurations (default 3)")
    p.add_argument("--seeds", default="3", metavar="S|s1,s2,...",
                   help="a number of fresh seeds, or the seeds themselves (default 3)")
    p.add_argument("--configs", metavar="FILE", help="replicate the configurations listed in this YAML file instead")
    p.add_argument("--address", help="join a Ray cluster ('auto' on a cluster head); default: a local Ray")
    p.add_argument("--resume", action="store_true", help="finish a replication whose driver stopped")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--seeds-per-trial", type=int, metavar="N",
                       help="train N seeds of a configuration as one batched model per Tune trial "
                            "(default: all its seeds in one trial)")
    batch.add_argument("--no-batch", dest="seeds_per_trial", action="store_const", const=1,
                       help="one Tune trial per (configuration, seed): --seeds-per-trial 1")


def _replicate(args: argparse.Namespace) -> int:
    from study.replicate import cli_replicate

    _quiet_optuna()
    seeds = int(args.seeds) if args.seeds.strip().isdigit() else args.seeds
    return cli_replicate(args.file, top_k=args.top, seeds=seeds, configs_file=args.configs,
                         address=args.address, resume=args.resume, seeds_per_trial=args.seeds_per_trial)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study file, or a study's name (with --results-dir)")
    p.add_argument("--results-dir", help="the study's results folder (default: the study file's, or results/<name>)")
    p.add_argument("--out", help="where to write the report (default: <results_dir>/report; ./<name>-report when "
                   "results_dir is in object storage)")


def _report(args: argparse.Namespace) -> int:
    from analysis.report import cli_report

    return cli_report(args.study, results_dir=args.results_dir, out=args.out)


# ---------------------------------------------------------------------------------------------------------------------

_commands: dict[str, Command] = {
    "train": Command("train one model on one task, alone (no Ray)", _train_arguments, _train),
    "demo": Command("run the demo study (NTM vs DNC on copy) and write its report", _demo_arguments, _demo),
    "validate": Command("check a study file; nothing is launched", _validate_arguments, _validate),
    "sweep": Command("run a study: Ray Tune + Optuna + ASHA, every trial in MLflow", _sweep_arguments, _sweep),
    "ui": Command("open the MLflow UI of a study's results on 127.0.0.1", _ui_arguments, _ui),
    "replicate": Command("re-run a study's best configurations with fresh seeds at full budget",
                         _replicate_arguments, _replicate),
    "report": Command("write a study's report: stability, sensitivity, generalization", _report_arguments, _report),
}


def _quiet_optuna() -> None:
    """Optuna logs each study it creates or loads at INFO on stderr; the commands say what happens in their
    own lines. Its warnings and errors still show."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Study memory-augmented RNNs (NTM, DNC).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in _commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow logs its database set-up at INFO on stderr (read when mlflow is imported, here and in every trial
    # process); its warnings and errors still show. A value the user set wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Nor does its progress bar for each artifact read (the report reads the study's spec.json).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        args = build_parser().parse_args(argv)
        return _commands[args.command].run(args)
    except (ConfigError, UsageError) as err:
        print(f"{PROG}: {one_line(redact(str(err)))}", file=sys.stderr)
        return 2
    except Exception as err:
        # User-facing errors of the other packages (a missing database, an unreachable tracking server,
        # a corrupt checkpoint, a study that already has results): one line, exit 2.
        if type(err).__name__ in _USER_ERRORS:
            print(f"{PROG}: {one_line(redact(str(err)))}", file=sys.stderr)
            return 2
        raise
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
