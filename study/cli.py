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
import sys
from collections.abc import Callable
from typing import NamedTuple

from mann.config import ConfigError, parse_set_args

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
_USER_ERRORS = {"SweepError", "TrackingError", "CheckpointError", "SpecError", "TidyError", "ReportError",
                "ReplicationError", "SensitivityError"}


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
    from mann.train import CheckpointError, config_from_flat_dict, load_checkpoint, make_train_config

    overrides = _train_overrides(args)
    try:
        if args.resume:
            # The checkpoint's own config, with --set on top (e.g. more steps); --model/--task must agree with it.
            flat = dict(load_checkpoint(args.resume)["config"])
            for key in ("model", "task"):
                given = getattr(args, key)
                if given is not None and given != flat[key]:
                    raise ConfigError(key, f"the checkpoint's {key} {flat[key]!r}", given)
            flat.update(overrides)
            cfg = config_from_flat_dict(flat)
        else:
            cfg = make_train_config(args.model or "ntm", args.task or "copy", overrides)
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

# Until the sweep exists: one small NTM learning to copy 6-bit sequences of length 1..5 (curriculum from 2),
# tested on lengths 6..10 and 6..20; about 1-2 minutes on one CPU core. Measured here: bit error 0 at the
# full length after ~2,250 steps (seed 0).
DEMO_MODEL, DEMO_TASK = "ntm", "copy"
DEMO_OVERRIDES = {
    "model.controller_size": 32,
    "model.memory_size": 16,
    "model.word_size": 8,
    "task.bits": 6,
    "task.max_length": 5,
    "optimizer": "adam",
    "lr": 3e-3,
    "max_steps": 3000,
    "eval_every": 250,
    "gen_scales": [2, 4],
    "device": "cpu",
}
DEMO_QUICK_STEPS = 20


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"{DEMO_QUICK_STEPS} steps only (a smoke test)")


def _demo(args: argparse.Namespace) -> int:
    from mann.train import make_train_config

    overrides = dict(DEMO_OVERRIDES)
    if args.quick:
        overrides.update(max_steps=DEMO_QUICK_STEPS, eval_every=DEMO_QUICK_STEPS // 2)
    cfg = make_train_config(DEMO_MODEL, DEMO_TASK, overrides)
    history: list[dict] = []
    code = _fit_with_progress(cfg, history=history)
    print()
    print(learning_curve(history))
    return code


def learning_curve(history: list[dict], key: str = "bit_error", width: int = 50) -> str:
    """A text plot of ``key`` against step, one row per evaluation (with the curriculum level)."""
    values = [m[key] for m in history if math.isfinite(m[key])]
    if not values:
        return f"(no finite {key} to plot)"
    top = max(values) or 1.0
    rows = [f"{'step':>7}  {key}  level"]
    for m in history:
        v = m[key]
        bar = "#" * round(width * v / top) if math.isfinite(v) else "?"
        rows.append(f"{m['step']:>7}  {v:9.3f}  {m['level']:>5g}  {bar}".rstrip())
    return "\n".join(rows)


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
                                     "default: a local Ray on this machine")
    p.add_argument("--resume", action="store_true",
                   help="finish a study whose driver stopped (completed trials are kept, running ones resume)")


def _sweep(args: argparse.Namespace) -> int:
    from study.sweep import cli_sweep

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

_commands: dict[str, Command] = {
    "train": Command("train one model on one task, alone (no Ray)", _train_arguments, _train),
    "demo": Command("train a small NTM on copy and print its learning curve", _demo_arguments, _demo),
    "validate": Command("check a study file; nothing is launched", _validate_arguments, _validate),
    "sweep": Command("run a study: Ray Tune + Optuna + ASHA, every trial in MLflow", _sweep_arguments, _sweep),
    "ui": Command("open the MLflow UI of a study's results on 127.0.0.1", _ui_arguments, _ui),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Study memory-augmented RNNs (NTM, DNC).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in _commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _commands[args.command].run(args)
    except (ConfigError, UsageError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # User-facing errors of the other packages (a missing database, an unreachable tracking server,
        # a corrupt checkpoint, a study that already has results): one line, exit 2.
        if type(err).__name__ in _USER_ERRORS:
            print(f"{PROG}: {err}", file=sys.stderr)
            return 2
        raise
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
