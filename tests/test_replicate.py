"""study.replicate's batched path: all seeds of a configuration in one Tune trial (mann.multiseed.fit_seeds), each
seed still its own MLflow child run, with the metrics the one-trial-per-(config, seed) path records for it; and
run keys: a resumed replication finds the run of a pair that failed and finishes it there."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from analysis.generalization import GeneralizationError, find_checkpoint
from analysis.load import load_study
from mann.train import config_to_flat_dict, load_checkpoint, make_train_config
from study.record import TAG_ATTEMPTS, TAG_PARENT, TAG_REPLICATION, TAG_SEED, TAG_STATUS, TAG_TRIAL_ID
from study.replicate import (
    configs_from_file,
    replication_grid,
    replication_points,
    run_key,
    run_replication,
    start_replication_run,
)
from study.spec import load_spec, trial_overrides
from study.state import mark_begun
from study.sweep import experiment_dir
from study.tracking import TrialTracker, _client, prepare_experiment, start_study_run

STUDY = {
    "name": "batched",
    "models": ["ntm", "lstm"],
    "task": "copy",
    # float64: the batched forward sums in another order than a plain one; in float64 that is ~1e-12 relative
    "fixed": {"optimizer": "adam", "batch_size": 4, "eval_batches": 1, "gen_scales": [2.0], "task.bits": 3,
              "task.max_length": 3, "dtype": "float64", "device": "cpu"},
    "model_fixed": {"ntm": {"model.memory_size": 8, "model.controller_size": 8, "model.word_size": 4},
                    "lstm": {"model.hidden_size": 8}},
    "search": {"lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True}},
    "budget": {"num_samples": 2, "max_steps": 6, "eval_every": 3, "early_stopping": False},
    "seeds": [0],
    "resources": {"cpu": 1, "gpu": 0},
    "concurrency": 2,
}
CONFIGS = [{"model": "ntm", "lr": 3.0e-2}, {"model": "lstm", "lr": 1.0e-2}]
SEEDS = [3, 4]


def test_replication_points_batch_each_configurations_seeds_under_their_run_keys():
    from study.replicate import ReplicaConfig, ReplicationError

    configs = [ReplicaConfig("c0", {"model": "ntm"}, "x"), ReplicaConfig("c1", {"model": "lstm"}, "y")]
    grid = replication_grid(configs, [5, 6, 7])
    assert replication_points("rep-x", grid) == [
        {"key": "rep-x.c0", "config": {"model": "ntm"}, "seeds": [5, 6, 7],
         "keys": ["rep-x.c0.s5", "rep-x.c0.s6", "rep-x.c0.s7"]},
        {"key": "rep-x.c1", "config": {"model": "lstm"}, "seeds": [5, 6, 7],
         "keys": ["rep-x.c1.s5", "rep-x.c1.s6", "rep-x.c1.s7"]}]
    assert [(p["key"], p["seeds"]) for p in replication_points("rep-x", grid, 2)] == [
        ("rep-x.c0", [5, 6]), ("rep-x.c0.s7", [7]), ("rep-x.c1", [5, 6]), ("rep-x.c1.s7", [7])]
    singles = replication_points("rep-x", grid, 1)
    assert [p["keys"] for p in singles] == [[p["key"]] for p in singles] and len(singles) == 6
    assert run_key("rep-x", "c1", 5) == "rep-x.c1.s5"
    with pytest.raises(ReplicationError, match="seeds_per_trial"):
        replication_points("rep-x", grid, 0)


def test_find_checkpoint_finds_a_seed_by_its_run_key_in_its_points_folder(tmp_path):
    batch = tmp_path / "ray" / "rep-x" / "run_point_rep-x.c1_x2_abc_00000"
    single = tmp_path / "ray" / "rep-x" / "run_point_rep-x.c0.s3_abc_00001" / "checkpoint_000002" / "checkpoint.pt"
    old = tmp_path / "ray" / "rep-y" / "replica_abc_00000_c1_x2"  # recorded before run keys
    for n, seed in [(0, 3), (0, 4), (1, 3)]:
        for folder in (batch, old):
            path = folder / f"checkpoint_00000{n}" / f"seed-{seed}" / "checkpoint.pt"
            path.parent.mkdir(parents=True)
            path.write_bytes(f"{folder.parent.name}-{n}-{seed}".encode())
    single.parent.mkdir(parents=True)
    single.write_bytes(b"single")
    assert find_checkpoint(tmp_path, "rep-x.c1.s3").read_bytes() == b"rep-x-1-3"
    assert find_checkpoint(tmp_path, "rep-x.c1.s4").read_bytes() == b"rep-x-0-4"
    assert find_checkpoint(tmp_path, "rep-x.c0.s3").read_bytes() == b"single"
    assert find_checkpoint(tmp_path, "abc_00000-s3").read_bytes() == b"rep-y-1-3"
    for missing in ("rep-x.c1.s5", "rep-x.c0.s4", "abc_00000-s5"):
        with pytest.raises(GeneralizationError):
            find_checkpoint(tmp_path, missing)


def _children(uri: str, experiment_id: str, parent: str) -> dict[tuple[str, int], object]:
    client = _client(uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'", max_results=100)
    return {(r.data.params["model"], int(r.data.tags[TAG_SEED])): r for r in runs}


@pytest.mark.slow
def test_batched_replication_records_each_seed_as_the_unbatched_path_does(ray_cluster, tmp_path):
    data = {**STUDY, "results_dir": str(tmp_path / "results")}
    study_file = tmp_path / "batched.yaml"
    study_file.write_text(yaml.safe_dump(data, sort_keys=False))
    configs_file = tmp_path / "configs.yaml"
    configs_file.write_text(yaml.safe_dump({"configs": CONFIGS}))
    spec = load_spec(study_file)
    Path(spec.results_dir).mkdir(parents=True)
    uri = spec.tracking_uri
    experiment_id = prepare_experiment(uri, spec.name, Path(spec.results_dir) / "mlartifacts")
    study_run = start_study_run(uri, experiment_id, spec.name, data, study_file)  # what a sweep would have left
    # The one-trial-per-pair replication begins as a driver left it that recorded (lstm, seed 4) failed and was
    # killed before Tune saved its state: its --resume finds that pair's run by its run key and finishes it there.
    mark_begun(experiment_dir(spec, "rep-plain"))
    plain_parent = start_replication_run(uri, experiment_id, spec, study_run, "rep-plain",
                                         configs_from_file(configs_file, spec), SEEDS)
    model, overrides = trial_overrides(spec, {**CONFIGS[1], "seed": 4})
    failed = TrialTracker(uri, experiment_id, plain_parent, run_key("rep-plain", "c1", 4),
                          params=config_to_flat_dict(make_train_config(model, spec.task, overrides)))
    failed.set_status("failed", step=0, message="RuntimeError: a lost node")
    failed.close()

    out = io.StringIO()  # Tune pickles the progress callback with its stream: pytest's is not picklable
    with contextlib.redirect_stdout(out):
        batched = run_replication(study_file, 0, SEEDS, configs_file=configs_file, name="batched")
        plain = run_replication(study_file, 0, SEEDS, configs_file=configs_file, name="plain", seeds_per_trial=1,
                                resume=True)
    assert batched.counts == plain.counts == {"completed": 4}
    assert plain.parent_run_id == plain_parent
    plain_runs = _client(uri).search_runs([experiment_id], f"tags.`{TAG_PARENT}` = '{plain_parent}'")
    assert len(plain_runs) == 4  # the failed pair ran again in its own run, not beside it
    (retried,) = [r for r in plain_runs if r.info.run_id == failed.run_id]
    assert retried.data.tags[TAG_STATUS] == "completed" and retried.data.tags[TAG_ATTEMPTS] == "2"

    # one Tune trial per configuration, one child run per (config, seed) in each replication
    exp_dir = Path(batched.experiment_dir)
    assert len(list(exp_dir.glob("run_point_*_x2_*"))) == 2 and not list(exp_dir.glob("run_point_*.s3_*"))
    assert len(list(Path(plain.experiment_dir).glob("run_point_*.s[0-9]_*"))) == 4
    for trial in exp_dir.glob("run_point_*_x2_*"):  # Tune's last checkpoint holds each seed's, to resume from
        last = max(trial.glob("checkpoint_*"))
        assert [load_checkpoint(last / f"seed-{s}")["config"]["seed"] for s in SEEDS] == SEEDS
    runs_b = _children(uri, experiment_id, batched.parent_run_id)
    runs_p = _children(uri, experiment_id, plain.parent_run_id)
    assert set(runs_b) == set(runs_p) == {(m, s) for m in ("ntm", "lstm") for s in SEEDS}
    for (model, seed), run in runs_b.items():
        tags, single = run.data.tags, runs_p[(model, seed)]
        assert tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        label = f"c{[c['model'] for c in CONFIGS].index(model)}"
        assert tags[TAG_TRIAL_ID] == run_key("rep-batched", label, seed) and run.data.params["seed"] == str(seed)
        assert single.data.tags[TAG_TRIAL_ID] == run_key("rep-plain", label, seed)
        assert run.data.params == single.data.params  # the same flat config, seed included
        finals = {k: v for k, v in run.data.metrics.items() if k != "wall_time"}
        expected = {k: v for k, v in single.data.metrics.items() if k != "wall_time"}
        assert finals.keys() == expected.keys() and {"error", "cost_bits", "curriculum_error"} <= finals.keys()
        # the final evaluation, logged at the last step
        assert {"final_error", "final_cost_bits", "final_accuracy", "final_gen2x_error"} <= finals.keys()
        assert [m.step for m in _client(uri).get_metric_history(run.info.run_id, "final_error")] == [6]
        for key, value in finals.items():
            assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (model, seed, key)
        # the curve too: every evaluation step was logged once
        history = _client(uri).get_metric_history(run.info.run_id, "error")
        assert sorted(m.step for m in history) == [3, 6]
        # the generalization harness finds the seed's last checkpoint, and it is this seed's, at the end
        checkpoint = load_checkpoint(find_checkpoint(spec.results_dir, tags[TAG_TRIAL_ID]))
        assert checkpoint["step"] == 6

    # the analysis loader reads both replications the same way
    tidy = load_study(uri, spec.name)
    runs = tidy.drop_duplicates("run_id")
    for rep in ("rep-batched", "rep-plain"):
        mine = runs[runs["replication"] == rep]
        assert sorted(zip(mine["model"], mine["seed"], strict=True)) == sorted(runs_b)
        assert set(mine["status"]) == {"completed"}
    client = _client(uri)
    assert client.get_run(batched.parent_run_id).data.tags[TAG_REPLICATION] == "rep-batched"
