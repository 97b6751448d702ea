"""The driver SIGKILLed at fixed kinds of moments, resumed, and the records checked (bench/chaos.py's schedules).

Three schedules on a 4-trial study (a tiny LSTM on copy, ASHA), each driver a real ``mannstudy`` process with
its own local Ray: a kill mid-sweep, a ``--resume``, a second kill during that resume, a final ``--resume`` (a
grid of 2 learning rates x 2 seeds); a kill during start-up then one during shut-down (TPE); and a replication
of the finished study killed mid-run and during its resume. Every invariant is read from the stores themselves
(MLflow, Optuna, Tune's state): see :func:`chaos.check_sweep` and :func:`chaos.check_replication`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.slow

TRIALS = 4


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mlflow_template):
    """A study finished under a kill during start-up and one during shut-down (its folder and outcome)."""
    folder = tmp_path_factory.mktemp("chaos") / "startup-shutdown"
    return folder, chaos.sweep_schedule(folder, ["startup", "shutdown"], seed=2, trials=TRIALS,
                                        template=mlflow_template)


def test_a_kill_a_resume_a_kill_during_it_and_a_final_resume_account_for_every_trial_once(tmp_path, mlflow_template):
    # the grid study (2 learning rates x 2 seeds): its queued points and repeats must not run twice after a kill
    out = chaos.sweep_schedule(tmp_path / "mid-mid", ["mid", "mid"], seed=1, trials=TRIALS, template=mlflow_template,
                               grid=True)
    assert out.problems == [] and out.drivers == 3 + out.ray_retries  # a Ray that did not start is retried
    assert out.once == out.trials == TRIALS


def test_kills_during_start_up_and_shut_down_account_for_every_trial_once(finished):
    _, out = finished
    assert out.problems == [] and out.drivers == 3 + out.ray_retries  # a Ray that did not start is retried
    assert out.once == out.trials == TRIALS


def test_a_replication_killed_mid_run_and_during_its_resume_runs_each_seed_once(finished):
    folder, sweep = finished
    assert sweep.problems == []
    out = chaos.replicate_schedule(folder, ["mid", "startup"], seed=3, top=1, seeds=2)
    assert out.problems == [] and out.drivers == 3 + out.ray_retries  # a Ray that did not start is retried
    assert out.once == out.trials == 2
