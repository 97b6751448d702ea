"""Study files: loading, one-line errors, and the search space as Optuna sees it (real Optuna, Ray's OptunaSearch)."""

import textwrap
from pathlib import Path

import optuna
import pytest

from mann.train import make_train_config
from study.spec import (
    REPEAT_ATTR,
    SEED_ATTR,
    SpecError,
    cli_validate,
    define_by_run,
    grid_points,
    load_spec,
    make_sampler,
    trial_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
ENV = ("MLFLOW_TRACKING_URI", "MANNSTUDY_STORAGE", "MANNSTUDY_RESULTS_DIR")

BASE = """\
name: t
models: [ntm, dnc]
task: copy
fixed:
  optimizer: adam
  task.max_length: 3
model_fixed:
  ntm: {model.shift_range: 2}
search:
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  batch_size: {choices: [8, 16]}
  model.memory_size: {low: 8, high: 32}
  model.read_heads: {low: 1, high: 3, models: [dnc]}
budget: {num_samples: 6, max_steps: 200, eval_every: 20, grace_period: 40}
seeds: [0, 1, 2]
"""


@pytest.fixture(autouse=True)
def no_cluster_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_validates(path, capsys):
    assert cli_validate(path) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok (") and out.count("\n") == 1
    spec = load_spec(path)
    # each model builds a TrainConfig from its trial overrides
    for model in spec.models:
        _, overrides = trial_overrides(spec, {"model": model})
        assert make_train_config(model, spec.task, overrides).max_steps == spec.budget.max_steps


def test_the_expected_studies_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "ntm_copy", "dnc_recall", "lstm_vs_mann", "graves2014_copy", "graves2014_copy_small",
            "collier_beel2018_init", "collier_beel2018_init_small", "csordas2019_recall",
            "csordas2019_recall_small"} <= names


def test_a_study_loads_with_its_defaults(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    assert spec.models == ("ntm", "dnc") and spec.task == "copy"
    assert spec.fixed == {"optimizer": "adam", "task.max_length": 3}
    assert [p.key for p in spec.search] == ["lr", "batch_size", "model.memory_size", "model.read_heads"]
    lr, batch, memory, heads = spec.search
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 1e-2, True, False)  # 1.0e-4 and 1e-4 are numbers
    assert batch.choices == (8, 16) and memory.integer and heads.models == ("dnc",)
    assert spec.seeds == (0, 1, 2) and spec.sampler == "tpe" and spec.objective.mode == "min"
    assert spec.budget.reduction_factor == 3 and spec.budget.time_budget_s is None
    assert spec.resources.cpu == 1 and spec.resources.gpu == 0
    results = tmp_path / "results" / "t"
    assert spec.results_dir == str(results)
    assert spec.tracking_uri == f"sqlite:///{results}/mlflow.db"
    assert spec.storage == f"sqlite:///{results}/optuna.db"
    assert spec.parameter_keys("ntm") == ["lr", "batch_size", "model.memory_size"]


def test_cluster_environment_supplies_storage_unless_the_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    monkeypatch.setenv("MANNSTUDY_STORAGE", "postgresql://u:pw@localhost:5432/optuna")
    monkeypatch.setenv("MANNSTUDY_RESULTS_DIR", "s3://bucket/results/")
    spec = load_spec(write(tmp_path, BASE))
    assert (spec.tracking_uri, spec.storage, spec.results_dir) == (
        "http://10.0.0.1:5000", "postgresql://u:pw@localhost:5432/optuna", "s3://bucket/results/t")
    monkeypatch.setenv("DBPW", "secret")
    spec = load_spec(write(tmp_path, BASE + "storage: postgresql://u:${DBPW}@db/optuna\nresults_dir: out\n"))
    assert spec.storage == "postgresql://u:secret@db/optuna" and spec.results_dir == str(tmp_path / "out")


ERRORS = [
    # (old text, new text, key in the message, part of what was expected)
    ("task: copy", "task: copy\ncolour: red", "colour", "a known key"),
    ("grace_period: 40}", "grace_period: 40, patience: 3}", "budget.patience", "a known key"),
    ("{choices: [8, 16]}", "{choice: [8, 16]}", "search.batch_size.choice", "a known key"),
    ("num_samples: 6", "num_samples: many", "budget.num_samples", "an integer"),
    ("optimizer: adam", "optimizer: sgd", "fixed.optimizer", "one of 'rmsprop', 'adam'"),
    ("low: 1.0e-4, high: 1.0e-2", "low: 1.0e-2, high: 1.0e-4", "search.lr.low", "at most high"),
    ("low: 1.0e-4, high: 1.0e-2", "low: 0, high: 1.0e-2", "search.lr.low", "positive number with log"),
    ("{choices: [8, 16]}", "{choices: []}", "search.batch_size.choices", "a non-empty list"),
    ("{choices: [8, 16]}", "{choices: [8, [16]]}", "search.batch_size.choices", "scalar values"),
    ("{choices: [8, 16]}", "{choices: [8, 8]}", "search.batch_size.choices", "each value once"),
    ("{choices: [8, 16]}", "{low: 8, high: 16, choices: [8]}", "search.batch_size.low", "not both"),
    ("{choices: [8, 16]}", "16", "search.batch_size", "{low, high, log} or {choices"),
    ("models: [ntm, dnc]", "models: [ntm, dnd]", "models", "model names among"),
    ("models: [ntm, dnc]", "models: ntm", "models", "a non-empty list"),
    ("task: copy", "task: cpy", "task", "one of associative_recall"),
    ("high: 3, models: [dnc]}", "high: 3, models: [lstm]}", "search.model.read_heads.models", "models of this study"),
    ("model.read_heads: {low: 1, high: 3, models: [dnc]}", "model.shift_range: {low: 1, high: 3}",
     "search.model.shift_range", "but dnc has no 'shift_range'; add models: [ntm]"),
    ("task.max_length: 3", "task.max_length: 3\n  model.shift_range: 1", "fixed.model.shift_range",
     "under model_fixed"),
    ("task.max_length: 3", "task.max_len: 3", "fixed.task.max_len", "a field of task copy"),
    ("optimizer: adam", "optimiser: adam", "fixed.optimiser", "a training key"),
    ("optimizer: adam", "max_steps: 10", "fixed.max_steps", "budget.max_steps"),
    ("batch_size: {choices: [8, 16]}", "seed: {choices: [1, 2]}", "search.seed", "the seeds list"),
    ("batch_size: {choices: [8, 16]}", "optimizer: {choices: [sgd]}", "search.optimizer.choices", "one of"),
    ("batch_size: {choices: [8, 16]}", "optimizer: {low: 1, high: 2}", "search.optimizer", "{choices: [...]}"),
    ("batch_size: {choices: [8, 16]}", "model: {choices: [ntm]}", "search.model", "models listed under models"),
    ("optimizer: adam", "optimizer: adam\n  lr: 0.1", "search.lr", "not also fixed"),
    ("ntm: {model.shift_range: 2}", "ntm: {model.memory_size: 16}", "search.model.memory_size",
     "not also in model_fixed.ntm"),
    ("ntm: {model.shift_range: 2}", "lstm: {model.layers: 2}", "model_fixed.lstm", "one of the study's models"),
    # impossible values, caught by the config classes' own checks
    ("task.max_length: 3", "task.max_length: 3\n  model.word_size: 0", "fixed.model.word_size", "positive"),
    ("model.memory_size: {low: 8", "model.memory_size: {low: 0", "search.model.memory_size", "positive"),
    ("task.max_length: 3", "task.max_length: 3\n  task.min_length: 5", "fixed.task.max_length", ">= task.min_length"),
    ("ntm: {model.shift_range: 2}", "ntm: {model.shift_range: -1}", "model_fixed.ntm.model.shift_range", ""),
    ("grace_period: 40", "grace_period: 400", "budget.grace_period", "between budget.eval_every"),
    ("grace_period: 40", "grace_period: 10", "budget.grace_period", "between budget.eval_every"),
    (", grace_period: 40", "", "budget.grace_period", "early_stopping: false"),
    ("eval_every: 20", "eval_every: 500", "budget.eval_every", "at most budget.max_steps"),
    ("grace_period: 40", "grace_period: 40, reduction_factor: 1", "budget.reduction_factor", "above 1"),
    ("max_steps: 200", "max_steps: 0", "budget.max_steps", "a positive integer"),
    ("num_samples: 6", "num_samples: 7", "budget.num_samples", "a multiple of the number of seeds (3)"),
    ("seeds: [0, 1, 2]", "seeds: [0, 0, 1]", "seeds", "each seed once"),
    ("seeds: [0, 1, 2]", "seeds: sometimes", "seeds", "or 'trial'"),
    ("seeds: [0, 1, 2]", "seeds: 3", "seeds", "a non-empty list of integers"),
    ("seeds: [0, 1, 2]", "seeds: [0, 1.5, 2]", "seeds", "an integer"),
    ("task: copy", "task: copy\nresources: {gpu: -1}", "resources.gpu", "1/n"),
    ("task: copy", "task: copy\nresources: {gpu: 0.3}", "resources.gpu", "1/n"),
    ("task: copy", "task: copy\nresources: {gpu: 1.5}", "resources.gpu", "a whole number"),
    ("task: copy", "task: copy\nresources: {cpu: 0}", "resources.cpu", "positive"),
    ("optimizer: adam", "device: cuda", "fixed.device", "resources.gpu is 0"),
    ("task: copy", "task: copy\nobjective: {metric: accuracy, mode: min}", "objective.mode", "max for accuracy"),
    ("task: copy", "task: copy\nobjective: {metric: loss}", "objective.metric", "a metric of mann.train.fit"),
    ("task: copy", "task: copy\nobjective: {metric: gen3x_error}", "objective.metric", "gen2x, gen4x"),
    ("task: copy", "task: copy\nconcurrency: 0", "concurrency", "a positive integer"),
    ("task: copy", "task: copy\nsampler: cmaes", "sampler", "tpe, random or grid"),
    ("task: copy", "task: copy\nsampler: grid", "search.lr", "{choices: [...]} with sampler: grid"),
    ("name: t", "name: my study", "name", "letters, digits"),
    ("name: t\n", "", "name", "required"),
    ("task: copy", "task: copy\nresults_dir: s3://bucket/r", "tracking_uri", "when results_dir is remote"),
    ("task: copy", "task: copy\ntracking_uri: mlflow.db", "tracking_uri", "a URI such as"),
    ("task: copy", "task: copy\nstorage: file:///tmp/x", "storage", "not a plain file store"),
    ("task: copy", "task: copy\nstorage: postgresql://u:${NO_SUCH_VAR_42}@h/db", "storage", "NO_SUCH_VAR_42"),
]


@pytest.mark.parametrize("old, new, key, expected", ERRORS, ids=[e[2] + ":" + e[3][:20] for e in ERRORS])
def test_each_mistake_is_one_line_naming_file_key_and_expectation(tmp_path, capsys, old, new, key, expected):
    path = write(tmp_path, edit(BASE, old, new))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key == key
    assert expected in info.value.expected
    line = str(info.value)
    assert line.startswith(f"{path}: {key}: expected ") and "\n" not in line
    assert cli_validate(path) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_parameter_of_one_model_is_fine_when_conditional(tmp_path):
    text = edit(BASE, "model.read_heads: {low: 1, high: 3, models: [dnc]}",
                "model.shift_range: {choices: [1, 3], models: [ntm]}")
    text = edit(text, "ntm: {model.shift_range: 2}", "dnc: {model.read_heads: 2}")
    spec = load_spec(write(tmp_path, text))
    assert spec.parameter_keys("dnc") == ["lr", "batch_size", "model.memory_size"]


@pytest.mark.parametrize("gpu", [0, 0.5, 0.33, 0.25, 0.2, 0.125, 0.1, 1, 2])
def test_gpu_fractions_that_pack_whole_trials_are_accepted(tmp_path, gpu):
    spec = load_spec(write(tmp_path, BASE + f"resources: {{cpu: 2, gpu: {gpu}}}\n"))
    assert spec.resources.gpu == gpu


def test_yaml_mistakes_name_the_line(tmp_path):
    path = write(tmp_path, BASE.replace("task: copy", "task: copy\n  oops: [1,"))
    with pytest.raises(SpecError, match=rf"^{path}: line \d+: expected valid YAML"):
        load_spec(path)
    path = write(tmp_path, BASE + "task: reverse\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: line 16: expected each key once in a mapping, got 'task'"


def test_missing_and_empty_files(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli_validate(missing) == 2
    assert capsys.readouterr().err.startswith(f"{missing}: file: expected a readable study file")
    with pytest.raises(SpecError, match="an empty file"):
        load_spec(write(tmp_path, "# nothing\n"))
    with pytest.raises(SpecError, match=r": \(top level\): expected a YAML mapping"):
        load_spec(write(tmp_path, "- a list\n"))


def test_define_by_run_suggests_conditional_entries_and_repeats_each_configuration_per_seed(tmp_path):
    spec = load_spec(write(tmp_path, BASE.replace("num_samples: 6", "num_samples: 30")))
    study = optuna.create_study(sampler=make_sampler(spec))
    space = define_by_run(spec)
    trials = []
    for _ in range(30):
        trial = study.ask()
        constants = space(trial)
        trials.append((trial, constants))
        study.tell(trial, 1.0)
    for group in range(10):
        (first, c0), *repeats = trials[3 * group: 3 * group + 3]
        assert [c["seed"] for _, c in trials[3 * group: 3 * group + 3]] == [0, 1, 2]
        for t, c in repeats:  # same configuration, other seed
            assert t.params == first.params and t.user_attrs == {SEED_ATTR: c["seed"], REPEAT_ATTR: first.number}
        assert first.user_attrs == {SEED_ATTR: 0, REPEAT_ATTR: first.number}
        model = first.params["model"]
        assert ("model.read_heads" in first.params) == (model == "dnc")
        assert 1e-4 <= first.params["lr"] <= 1e-2 and first.params["batch_size"] in (8, 16)
        assert isinstance(first.params["model.memory_size"], int) and 8 <= first.params["model.memory_size"] <= 32
    assert {t.params["model"] for t, _ in trials} == {"ntm", "dnc"}
    dist = study.trials[0].distributions
    assert isinstance(dist["lr"], optuna.distributions.FloatDistribution) and dist["lr"].log
    assert isinstance(dist["model.memory_size"], optuna.distributions.IntDistribution)


def test_seeds_trial_gives_each_trial_its_number(tmp_path):
    spec = load_spec(write(tmp_path, BASE.replace("seeds: [0, 1, 2]", "seeds: trial")))
    study = optuna.create_study(sampler=make_sampler(spec))
    seeds = []
    for _ in range(3):
        trial = study.ask()
        seeds.append(define_by_run(spec)(trial)["seed"])
        study.tell(trial, 0.0)
    assert seeds == [0, 1, 2] and len(study.trials) == 3  # nothing queued


def test_trial_overrides_build_the_train_config(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    model, overrides = trial_overrides(spec, {"model": "ntm", "seed": 2, "lr": 0.003, "model.memory_size": 9})
    cfg = make_train_config(model, spec.task, overrides)
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.seed, cfg.max_steps, cfg.eval_every) == ("ntm", "adam", 0.003, 2,
                                                                                        200, 20)
    assert (cfg.model_cfg.shift_range, cfg.model_cfg.memory_size, cfg.task_cfg.max_length) == (2, 9, 3)
    # model_fixed applies to its model only
    model, overrides = trial_overrides(spec, {"model": "dnc", "seed": 0})
    assert model == "dnc" and "model.shift_range" not in overrides
    with pytest.raises(SpecError, match="model: expected one of ntm, dnc, got 'lstm'"):
        trial_overrides(spec, {"model": "lstm"})


def test_ray_optuna_search_runs_a_grid_once_per_seed(tmp_path):
    """Through Ray's own OptunaSearch (its define-by-run captor and points_to_evaluate), no Ray session."""
    from ray.tune.search.optuna import OptunaSearch

    text = edit(BASE, "num_samples: 6", "num_samples: 18")
    text = edit(text, "lr: {low: 1.0e-4, high: 1.0e-2, log: true}", "lr: {choices: [1.0e-3, 1.0e-2]}")
    text = edit(text, "model.memory_size: {low: 8, high: 32}", "model.memory_size: {choices: [8]}")
    text = edit(text, "{low: 1, high: 3, models: [dnc]}", "{choices: [1, 2], models: [dnc]}")
    text = edit(text, "batch_size: {choices: [8, 16]}", "batch_size: {choices: [16]}")
    spec = load_spec(write(tmp_path, text + "sampler: grid\n"))
    points = grid_points(spec)
    assert len(points) == 2 + 4  # ntm: 2 learning rates; dnc: 2 learning rates x 2 read heads
    assert {"model": "dnc", "lr": 1e-3, "batch_size": 16, "model.memory_size": 8, "model.read_heads": 2} in points
    searcher = OptunaSearch(space=define_by_run(spec), metric="error", mode="min", sampler=make_sampler(spec),
                            points_to_evaluate=points)
    configs = [searcher.suggest(f"t{i}") for i in range(spec.budget.num_samples)]
    runs = sorted((str(sorted((k, v) for k, v in c.items() if k != "seed")), c["seed"]) for c in configs)
    expected = sorted((str(sorted(p.items())), s) for p in points for s in spec.seeds)
    assert runs == expected  # every grid point exactly once with each seed
    for config in configs:
        model, overrides = trial_overrides(spec, config)
        assert make_train_config(model, spec.task, overrides).seed == config["seed"]


def test_single_model_study_returns_the_model_as_a_constant(tmp_path):
    text = edit(BASE, "models: [ntm, dnc]", "models: [dnc]")
    text = edit(text, "ntm: {model.shift_range: 2}", "dnc: {model.write_heads: 2}")
    spec = load_spec(write(tmp_path, text))
    study = optuna.create_study(sampler=make_sampler(spec))
    trial = study.ask()
    constants = define_by_run(spec)(trial)
    assert constants == {"model": "dnc", "seed": 0} and "model" not in trial.params
    assert "model.read_heads" in trial.params
    model, overrides = trial_overrides(spec, {**trial.params, **constants})
    assert make_train_config(model, spec.task, overrides).model_cfg.write_heads == 2


def test_mannstudy_validate_command(tmp_path, capsys):
    from study.cli import main

    good = write(tmp_path, BASE)
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (2 models, 4 parameters, 6 trials)\n"
    bad = write(tmp_path, edit(BASE, "task: copy", "task: cpy"), "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"mannstudy: {bad}: task: expected one of ")


def test_the_documented_examples_validate(tmp_path):
    import re

    import study.spec

    doc = (ROOT / "docs" / "study-files.md").read_text()
    examples = [re.search(r"## A complete file\n\n```yaml\n(.*?)```", doc, re.S).group(1),
                textwrap.dedent(re.search(r"in short::\n\n(.*?)\n\n", study.spec.__doc__, re.S).group(1))]
    for i, example in enumerate(examples):
        spec = load_spec(write(tmp_path, example, f"example{i}.yaml"))
        assert spec.name == "demo" and spec.models == ("ntm", "dnc")
