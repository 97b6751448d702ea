"""The mannstudy command: train and demo, exit codes, one-line errors, no Ray in `train`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from study.cli import main

ROOT = Path(__file__).resolve().parents[1]
# A tiny LSTM on 3-bit copy: fast enough to run the real command several times.
TINY = ["--model", "lstm", "--task", "copy", "--device", "cpu",
        "--set", "model.hidden_size=8", "--set", "task.bits=3", "--set", "task.max_length=3",
        "--set", "optimizer=adam", "--set", "lr=1e-2", "--set", "batch_size=4",
        "--set", "eval_every=4", "--set", "eval_batches=1", "--set", "gen_scales=[2]"]


def progress_steps(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("step ")]


def test_train_prints_one_line_per_evaluation_and_resumes_from_its_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "8", "--checkpoint-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert progress_steps(out) == [4, 8]
    line = next(line for line in out.splitlines() if line.startswith("step "))
    for label in ("loss", "error", "acc", "level", "gen2x", "seq/s"):
        assert f" {label} " in line
    assert "completed at step 8" in out and str(tmp_path / "checkpoint.pt") in out

    # --resume takes the checkpoint's config; --steps extends the budget.
    assert main(["train", "--resume", str(tmp_path), "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert progress_steps(out) == [12] and "completed at step 12" in out and "lstm on copy" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "nope=1"], "mannstudy: nope: expected a known key"),
        (["train", "--set", "lr=-1"], "mannstudy: lr: expected a positive number, got -1"),
        (["train", "--set", "model.memory_size=x"], "mannstudy: model.memory_size: expected an integer, got 'x'"),
        (["train", "--set", "lr"], "mannstudy: lr: expected key=value"),
        (["train", "--model", "gru"], "mannstudy: model: expected one of"),
        (["train", "--steps", "x"], "mannstudy: train: argument --steps"),
        (["train", "--resume", "no/such/checkpoint.pt"], "mannstudy: no/such/checkpoint.pt: no such checkpoint"),
        (["fly"], "mannstudy: argument COMMAND: invalid choice"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_on_stderr(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) or message in err, err
    assert err.count("\n") == 1


def test_resume_refuses_a_different_model(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "4", "--checkpoint-dir", str(tmp_path)]) == 0
    assert main(["train", "--resume", str(tmp_path), "--model", "ntm"]) == 2
    ckpt = tmp_path / "checkpoint.pt"
    assert capsys.readouterr().err == f"mannstudy: --model: expected the model of {ckpt} ('lstm'), got 'ntm'\n"


def test_diverged_run_exits_1_naming_its_step(capsys):
    assert main(["train", *TINY, "--steps", "50", "--set", "optimizer=rmsprop", "--set", "lr=1e38",
                 "--set", "clip_value=null"]) == 1
    assert "diverged at step" in capsys.readouterr().out


# Library chatter that must not reach the terminal: MLflow's and Ray's INFO lines, Optuna's INFO lines
# ("[I 2026-...] A new study created"), raw Python warnings (UserWarning and its kinds).
NOISE = re.compile(r"\bINFO\b|^\[I \d|Warning:|warnings\.warn")


@pytest.mark.slow
def test_demo_quick_runs_the_demo_study_writes_its_report_and_keeps_the_terminal_clean(ray_env, tmp_path):
    """The real command in its own process, with its own local Ray, as a user runs it."""
    from conftest import end_ray_folder

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**ray_env, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, "-m", "study.cli", "demo", "--quick", "--results-dir",
                               str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        end_ray_folder(ray_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo: trials:" in proc.stdout and "mannstudy ui" in proc.stdout
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not noise, noise
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "optuna.db").is_file()
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img" in html


def test_console_entry_runs_train_without_importing_ray():
    # -X importtime lists every module the process imports (on stderr): Ray must not be among them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "study.cli", "train", *TINY, "--steps", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "completed at step 2" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mann.train" in imported
    assert not {name for name in imported if name == "ray" or name.startswith("ray.")}
