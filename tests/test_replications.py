"""The replication study files (search_spaces/graves2014_copy*, collier_beel2018_init*, csordas2019_recall*).

Every full-protocol file validates as ``mannstudy validate`` checks it and trains each of its arms for two
steps; every ``_small`` file runs end to end through the real sweep (the session's Ray, Optuna and MLflow in
SQLite) when cut to a few steps: one seed, four steps, an evaluation every two, one evaluation batch and a
final evaluation of one batch. Everything else (models, sizes, optimizers, arms, convergence stop) is the
file's.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import yaml

from study.cli import main as cli_main
from study.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "search_spaces"
FULL = ["graves2014_copy", "collier_beel2018_init", "csordas2019_recall"]
# each study's arms as (model, (the MLflow param that tells them apart, its value))
ARMS = {
    "graves2014_copy": {("ntm", ("lr", "1e-04")), ("lstm", ("lr", "3e-05"))},
    "collier_beel2018_init": {("ntm", ("model.memory_init", v)) for v in ("constant_trained", "learned",
                                                                          "random_trained")},
    "csordas2019_recall": {("dnc", ("model.masking", "false")), ("dnc", ("model.masking", "true")),
                           ("dnc-md", ("model.masking", "true")), ("dnc-mds", ("model.masking", "true"))},
}
STEPS, EVERY = 4, 2


@pytest.mark.parametrize("name", FULL)
def test_every_full_protocol_file_validates(name, capsys):
    path = STUDIES / f"{name}.yaml"
    assert cli_main(["validate", str(path)]) == 0
    assert "ok (" in capsys.readouterr().out


def test_each_replication_has_a_small_variant_that_asks_the_same_question():
    """The _small file differs from its full protocol only in the sizes it scales, never in the arms or seeds."""
    for name in FULL:
        full = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
        small = yaml.safe_load((STUDIES / f"{name}_small.yaml").read_text())
        assert small["name"] == f"{name}_small"
        for key in ("models", "task", "search", "model_fixed", "sampler", "seeds", "objective"):
            assert small.get(key) == full.get(key), (name, key)
        assert small["budget"]["num_samples"] == full["budget"]["num_samples"]
        assert small["budget"]["early_stopping"] is full["budget"]["early_stopping"] is False
        for key in ("stop_at_error", "stop_after_evals", "optimizer", "batch_size"):
            assert small["fixed"][key] == full["fixed"][key], (name, key)
        assert small["concurrency"] == 2 and small["resources"] == {"cpu": 1, "gpu": 0}


def cut(name: str, folder: Path, mlflow_db: Path) -> Path:
    """search_spaces/<name>.yaml cut to one seed and STEPS steps, with its results in ``folder``."""
    data = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    arms = data["budget"]["num_samples"] // len(data["seeds"])
    data["seeds"] = [0]
    data["budget"].update(num_samples=arms, max_steps=STEPS, eval_every=EVERY)
    data["fixed"].update(eval_batches=1, final_eval_sequences=data["fixed"]["batch_size"])
    data["concurrency"] = 2
    data["results_dir"] = str(folder / "results")
    Path(data["results_dir"]).mkdir(parents=True)
    shutil.copy(mlflow_db, Path(data["results_dir"]) / "mlflow.db")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", FULL)
def test_every_arm_of_each_full_protocol_trains_a_few_steps(name):
    """Each arm of the full-protocol file, built from the file as a trial of its sweep builds it (its model, task,
    optimizer and sizes), trains two steps and runs its final evaluation. The sweep around it is the _small
    file's, run end to end below: the two files differ only in sizes (test above)."""
    from mann.train import fit, make_train_config
    from study.spec import grid_points, load_spec, trial_overrides

    spec = load_spec(STUDIES / f"{name}.yaml")
    seen = set()
    for point in grid_points(spec):
        model, overrides = trial_overrides(spec, {**point, "seed": 0})
        overrides.update(max_steps=2, eval_every=2, eval_batches=1, final_eval_sequences=overrides["batch_size"])
        result = fit(make_train_config(model, spec.task, overrides))
        assert result.status == "completed" and result.step == 2, (name, point, result.message)
        assert "final_error" in result.metrics
        seen.add((model, tuple(sorted(point.items()))))
    assert len(seen) == len(ARMS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n + "_small" for n in FULL])
def test_each_study_file_runs_end_to_end_cut_to_a_few_steps(name, ray_cluster, mlflow_template, record, tmp_path):
    path = cut(name, tmp_path, mlflow_template)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_sweep(path)
    rec = record(path)
    arms = ARMS[name.removesuffix("_small")]
    assert summary.counts == {"completed": len(arms)}
    assert {t.user_attrs["status"] for t in rec.trials()} == {"completed"}
    children = rec.children()
    seen = set()
    for run in children:
        params, metrics = run.data.params, run.data.metrics
        model = params["model"]
        key = next(k for _, (k, _) in arms)
        value = params[key]  # MLflow keeps booleans as YAML spells them: true, false
        if key == "lr":
            value = f"{float(value):.0e}"
        seen.add((model, (key, value)))
        assert params["max_steps"] == str(STEPS) and params["seed"] == "0"
        assert float(params["stop_at_error"]) > 0  # the convergence stop is on
        assert "final_error" in metrics and "converged_step" not in metrics  # four steps converge nothing
    assert seen == arms
    if name == "csordas2019_recall_small":  # the report opens with the paper comparison: each arm found (arms
        # told apart by model and by a parameter some models lack), none converged; one study suffices
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
        summary_md = (tmp_path / "report" / "summary.md").read_text()
        assert summary_md.index("## Paper comparison") < summary_md.index("## Overview")
        assert "Verdict: **not estimated**" in summary_md
        arms_named = yaml.safe_load(path.read_text())["paper"]["arms"]
        assert all(f"| {arm} | 1 | 0/1" in summary_md for arm in arms_named)


def test_study_cost_prices_every_arm_and_adds_them_up():
    """bench/study_cost.py (the budgets in the _small files' headers): one line per arm, per-trial figures that
    follow from its step, evaluation and final times, and a total over the trials."""
    import re
    import subprocess
    import sys

    study = REPO / "tests" / "studies" / "asha.yaml"  # a grid of six learning rates, 60 steps, evaluation every 10
    out = subprocess.run([sys.executable, str(REPO / "bench" / "study_cost.py"), str(study), "--steps", "2",
                          "--warmup", "1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    arm = re.compile(r"^  model=lstm, lr=(\S+): ([\d.]+) ms/step, ([\d.]+) s/evaluation, ([\d.]+) s final -> at most "
                     r"([\d.]+) min per trial x 1$")
    lines = [m for m in map(arm.match, out.stdout.splitlines()) if m]
    assert sorted(float(m[1]) for m in lines) == sorted([3e-2, 1e-2, 3e37, 3e-3, 1e-3, 1e-4])
    total = 0.0
    for m in lines:
        step, evaluation, final, minutes = (float(v) for v in m.groups()[1:])
        trial = 60 * step / 1e3 + 6 * evaluation + final
        assert abs(trial / 60 - minutes) <= 0.06 + 0.01 * minutes, m[0]  # figures printed rounded
        total += trial
    (bound,) = re.findall(r"upper bound: ([\d.]+) CPU core-hours, (\d+) min wall at 2 trials at once", out.stdout)
    assert abs(float(bound[0]) - total / 3600) <= 0.006
