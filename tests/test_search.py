"""TruthfulOptunaSearch against a real Optuna SQLite database (no Ray session needed)."""

import optuna
import pytest
from optuna.trial import TrialState

from study.search import TruthfulOptunaSearch, fail_running_trials


def space(trial):
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)


@pytest.fixture
def searcher(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    s = TruthfulOptunaSearch(space=space, metric="error", mode="min", storage=storage, study_name="t", seed=0)
    return s


def frozen(searcher, tid):
    return searcher._ot_study._storage.get_trial(searcher._ot_trials[tid]._trial_id)


def test_completed_stopped_diverged_failed_are_told_as_such(searcher):
    for tid in "abcde":
        assert "lr" in searcher.suggest(tid)
    for tid in "abcd":
        searcher.on_trial_result(tid, {"error": 0.9, "step": 100})
    searcher.on_trial_complete("a", {"error": 0.1, "step": 400, "trial_status": "completed"})
    # ASHA: the stopping result never reaches on_trial_result; it must still be recorded.
    searcher.on_trial_complete("b", {"error": 0.7, "step": 200})
    searcher.on_trial_complete("c", {"error": float("inf"), "step": 150, "trial_status": "diverged"})
    searcher.on_trial_complete("d", None, error=True)
    searcher.on_trial_complete("e", None)

    a, b, c, d, e = (frozen(searcher, t) for t in "abcde")
    assert (a.state, a.value, a.user_attrs["status"]) == (TrialState.COMPLETE, 0.1, "completed")
    assert a.intermediate_values == {100: 0.9, 400: 0.1}
    assert b.state == TrialState.PRUNED and b.user_attrs == {"tune_trial_id": "b", "status": "stopped_early",
                                                              "status_step": 200}
    assert b.intermediate_values == {100: 0.9, 200: 0.7}
    assert c.state == TrialState.FAIL and c.user_attrs["status"] == "diverged" and c.user_attrs["status_step"] == 150
    assert d.state == TrialState.FAIL and d.user_attrs["status"] == "failed"
    assert e.state == TrialState.FAIL and e.user_attrs["status"] == "not_run"
    # Importance and the sampler see only the full-budget trial as COMPLETE.
    assert [t.number for t in searcher._ot_study.get_trials(states=(TrialState.COMPLETE,))] == [a.number]


def test_tell_is_idempotent_when_storage_is_ahead_of_restored_state(searcher, tmp_path):
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the state Ray snapshotted before the crash
    searcher.on_trial_complete("a", {"error": 0.2, "step": 400, "trial_status": "completed"})

    restored = TruthfulOptunaSearch(space=space, metric="error", mode="min", seed=0)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"error": 0.3, "step": 500})  # no UpdateFinishedTrialError
    restored.on_trial_complete("a", {"error": 0.2, "step": 400, "trial_status": "completed"})
    trial = frozen(restored, "a")
    assert trial.state == TrialState.COMPLETE and trial.value == 0.2


def test_orphaned_running_trials_are_failed_with_a_reason(searcher):
    searcher.suggest("a")
    orphan = searcher._ot_study.ask()  # asked by a driver that died before Tune recorded the trial
    searcher.on_trial_complete("a", {"error": 0.2, "step": 400, "trial_status": "completed"})
    assert fail_running_trials(searcher._ot_study, "driver crashed") == [orphan.number]
    trial = searcher._ot_study.get_trials()[orphan.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["status_message"] == "driver crashed"
    assert trial.user_attrs["status"] == "not_run"
    assert frozen(searcher, "a").state == TrialState.COMPLETE
    assert fail_running_trials(searcher._ot_study, "again") == []


def test_a_grid_pair_lost_with_a_killed_driver_is_queued_again_when_the_queue_runs_dry(tmp_path):
    from study.spec import SEED_ATTR, load_spec, make_sampler
    from study.sweep import StudySpace

    path = tmp_path / "grid.yaml"
    path.write_text("name: grid\nmodels: [lstm]\ntask: copy\nsearch:\n  lr: {choices: [0.001, 0.01, 0.1]}\n"
                    "sampler: grid\nseeds: [0, 1]\nbudget: {num_samples: 6, max_steps: 20, eval_every: 10, "
                    "early_stopping: false}\n")
    spec = load_spec(path)
    grid = [({"lr": lr}, seed) for lr in (0.001, 0.01, 0.1) for seed in (0, 1)]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    searcher = TruthfulOptunaSearch(space=StudySpace(spec), metric="error", mode="min", sampler=make_sampler(spec),
                                    points_to_evaluate=[p for p, seed in grid if seed == 0], storage=storage,
                                    study_name="grid", grid=grid)
    # a driver asked the first point (its trial popped from the queue) and was killed before Tune saved it:
    # --resume fails that trial as not_run
    lost = searcher._ot_study.ask()
    assert fail_running_trials(searcher._ot_study, "lost") == [lost.number]

    asked = []
    for tid in "abcdef":  # the restored Tune asks the six trials it counts on
        config = searcher.suggest(tid)
        asked.append((config["lr"], config["seed"]))
        searcher.on_trial_complete(tid, {"error": 0.5, "step": 20, "trial_status": "completed"})
    assert sorted(asked) == sorted((p["lr"], seed) for p, seed in grid), asked
    ran = [(t.params["lr"], t.user_attrs[SEED_ATTR]) for t in searcher._ot_study.get_trials()
           if t.state == TrialState.COMPLETE]
    assert sorted(ran) == sorted(asked)
