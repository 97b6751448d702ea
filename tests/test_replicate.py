"""study.replicate's batched path: all seeds of a configuration in one Tune trial (mann.multiseed.fit_seeds), each
seed still its own MLflow child run, with the metrics the one-trial-per-(config, seed) path records for it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from analysis.generalization import GeneralizationError, find_checkpoint
from analysis.load import load_study
from mann.train import load_checkpoint
from study.replicate import (
    TAG_REPLICATION,
    replication_batches,
    run_replication,
    seed_trial_id,
)
from study.spec import load_spec
from study.tracking import (
    TAG_PARENT,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    _client,
    prepare_experiment,
    start_study_run,
)

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


def test_replication_batches_are_one_item_per_configuration():
    from study.replicate import ReplicaConfig

    configs = [ReplicaConfig("c0", {"model": "ntm"}, "x"), ReplicaConfig("c1", {"model": "lstm"}, "y")]
    batches = replication_batches(configs, [5, 6])
    assert batches == [{"config": 0, "label": "c0", "params": {"model": "ntm"}, "seeds": [5, 6]},
                       {"config": 1, "label": "c1", "params": {"model": "lstm"}, "seeds": [5, 6]}]
    assert seed_trial_id("abc_00001", 5) == "abc_00001-s5"


def test_find_checkpoint_finds_a_batched_seed_in_its_trial_folder(tmp_path):
    batch = tmp_path / "ray" / "rep-x" / "replica_abc_00000_c1_x2"
    for n, seed in [(0, 3), (0, 4), (1, 3)]:
        path = batch / f"checkpoint_00000{n}" / f"seed-{seed}" / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(f"{n}-{seed}".encode())
    assert find_checkpoint(tmp_path, "abc_00000-s3").read_bytes() == b"1-3"
    assert find_checkpoint(tmp_path, "abc_00000-s4").read_bytes() == b"0-4"
    with pytest.raises(GeneralizationError):
        find_checkpoint(tmp_path, "abc_00000-s5")


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
    start_study_run(uri, experiment_id, spec.name, data, study_file)  # what a sweep would have left

    out = io.StringIO()  # Tune pickles the progress callback with its stream: pytest's is not picklable
    with contextlib.redirect_stdout(out):
        batched = run_replication(study_file, 0, SEEDS, configs_file=configs_file, name="batched")
        plain = run_replication(study_file, 0, SEEDS, configs_file=configs_file, name="plain", batched=False)
    assert batched.counts == plain.counts == {"completed": 4}

    # one Tune trial per configuration, one child run per (config, seed) in each replication
    exp_dir = Path(batched.experiment_dir)
    assert len(list(exp_dir.glob("replica_*_x2"))) == 2 and not list(exp_dir.glob("replica_*_s3"))
    assert len(list(Path(plain.experiment_dir).glob("replica_*_s*"))) == 4
    for trial in exp_dir.glob("replica_*_x2"):  # Tune's last checkpoint holds each seed's, to resume from
        last = max(trial.glob("checkpoint_*"))
        assert [load_checkpoint(last / f"seed-{s}")["config"]["seed"] for s in SEEDS] == SEEDS
    runs_b = _children(uri, experiment_id, batched.parent_run_id)
    runs_p = _children(uri, experiment_id, plain.parent_run_id)
    assert set(runs_b) == set(runs_p) == {(m, s) for m in ("ntm", "lstm") for s in SEEDS}
    for (model, seed), run in runs_b.items():
        tags, single = run.data.tags, runs_p[(model, seed)]
        assert tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        assert tags[TAG_TRIAL_ID].endswith(f"-s{seed}") and run.data.params["seed"] == str(seed)
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
