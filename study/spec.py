"""Study files: one YAML file per study -> a validated, frozen :class:`StudySpec`.

A study file says which models to compare on which task, what is fixed, what is searched and how
much compute each trial gets. docs/study-files.md is the reference; in short::

    name: demo                          # results/<name>, MLflow experiment, Optuna study name
    description: NTM vs DNC on a short copy task
    models: [ntm, dnc]                  # several models become a categorical parameter "model"
    task: copy
    fixed:                              # dotted keys: lr, batch_size, ..., model.<field>, task.<field>
      task.max_length: 3
    model_fixed:                        # fixed values for one model only
      ntm: {model.shift_range: 1}
    search:                             # the search space, as data
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      model.memory_size: {choices: [16, 32]}
      model.read_heads: {low: 1, high: 4, models: [dnc]}   # conditional: only suggested for dnc
    objective: {metric: error, mode: min}
    budget: {num_samples: 8, max_steps: 2000, eval_every: 100, grace_period: 400, reduction_factor: 2}
    seeds: [0]                          # every sampled configuration runs once per seed; or "trial"
    sampler: tpe                        # tpe | random | grid (every combination of choices, once per seed)
    search_seed: 0                      # Optuna sampler seed
    resources: {cpu: 1, gpu: 0}         # per trial; gpu 0.25 packs four trials on one GPU
    concurrency: 2                      # trials running at once (null: as many as resources allow)

Every mistake raises :class:`SpecError`, one line: ``<file>: <key>: expected <what>, got <value>``.
Keys are checked against the real config classes: every ``model.<field>`` must be a field of every
model the entry applies to, and ``mann.train.make_train_config`` must accept the fixed values
together with corner samples of the search space (each range's ends, each choice) for every model.

Storage. ``results_dir`` defaults to ``$MANNSTUDY_RESULTS_DIR/<name>`` or ``results/<name>`` (made
absolute from the working directory); ``tracking_uri`` to ``$MLFLOW_TRACKING_URI`` or a SQLite file
in results_dir; ``storage`` to ``$MANNSTUDY_STORAGE`` or another SQLite file there. So the same file
runs on a laptop and on the cluster, whose head writes the three into ``~/mannstudy.env``
(cluster.yaml), read where the process's environment lacks them (:func:`cluster_env`).
``${VAR}`` in these three values is replaced by the environment variable.

Seeds. ``seeds: [0, 1, 2]`` runs every sampled configuration once per seed: the define-by-run
function queues the repeats in Optuna (same parameters, user attribute ``seed``; ``repeat_of``
names the trial that sampled the configuration), so seed stability is measured on identical
configurations. ``budget.num_samples`` counts trials, so it must be a multiple of the number of
seeds. ``seeds: trial`` gives each trial its own seed (its Optuna trial number) and never repeats.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Union, get_args, get_origin

import yaml

from mann.config import SEED_RANGE, ConfigError, _type_name, check_limits, coerce, field_types, one_line

if TYPE_CHECKING:
    import optuna

SEED_ATTR = "seed"  # Optuna user attribute: the trial's seed
REPEAT_ATTR = "repeat_of"  # Optuna user attribute: number of the trial that sampled this configuration
MODEL_PARAM = "model"  # the categorical parameter when a study compares several models

# Keys of TrainConfig that a study sets elsewhere, and where.
_RESERVED = {
    "model": "a model name under models",
    "task": "the task name under task",
    "model_cfg": "model.<field> keys",
    "task_cfg": "task.<field> keys",
    "max_steps": "budget.max_steps",
    "eval_every": "budget.eval_every",
    "seed": "the seeds list",
    "checkpoint_dir": "nothing: the trainable sets it (Tune's trial directory)",
}
_METRIC = re.compile(r"^(train_loss|error|cost_bits|accuracy|gen\d+(\.\d+)?x_(error|cost_bits|accuracy))$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Defaults a cluster sets for every study (cluster.yaml writes them on the head); a file's own value wins.
TRACKING_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable
STORAGE_ENV = "MANNSTUDY_STORAGE"  # Optuna storage URL
RESULTS_ENV = "MANNSTUDY_RESULTS_DIR"  # parent of results_dir: <it>/<name>
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Where a cluster writes those defaults for processes that do not inherit a login shell's environment
# (``ray job submit``'s driver, a KubeRay pod sets them as container variables instead).
ENV_FILE_ENV = "MANNSTUDY_ENV_FILE"  # the file; set empty to read none
ENV_FILE = "~/mannstudy.env"
# Ray places a trial's resources on one machine; the largest have a few hundred cores and 8-16 GPUs.
MAX_TRIAL_CPUS = 1024
MAX_TRIAL_GPUS = 16


class SpecError(ConfigError):
    """A mistake in a study file: ``<file>: <key>: expected <what>, got <value>``."""


@dataclass(frozen=True)
class Param:
    """One searched key: a range ``[low, high]`` (log-uniform if ``log``) or a list of ``choices``."""

    key: str  # dotted key, as in fixed: lr, model.memory_size, task.max_length
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False  # the target field is an integer: suggest_int, else suggest_float
    choices: tuple[Any, ...] | None = None
    models: tuple[str, ...] = ()  # the models this entry applies to; empty: all of the study's models

    def applies_to(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True)
class Objective:
    metric: str = "error"  # a metric reported by mann.train.fit at each evaluation
    mode: str = "min"


@dataclass(frozen=True)
class Budget:
    num_samples: int  # trials in the study (all seeds included)
    max_steps: int  # training steps per trial (ASHA's max_t)
    eval_every: int  # steps between evaluations; each evaluation is one report to Tune
    early_stopping: bool = True  # ASHA on; false runs every trial to max_steps (e.g. for seed studies)
    grace_period: int | None = None  # steps before ASHA may stop a trial; required with early_stopping
    reduction_factor: float = 3.0  # ASHA keeps 1/reduction_factor of the trials at each rung
    time_budget_s: float | None = None  # wall-clock limit for the whole study; null: none


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0  # CPUs per trial
    gpu: float = 0.0  # GPUs per trial: 0, a whole number, or 1/n (n trials share one GPU)


@dataclass(frozen=True)
class StudySpec:
    source: str  # the file it was read from, for messages
    name: str
    models: tuple[str, ...]
    task: str
    budget: Budget
    description: str = ""
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> value, every model
    model_fixed: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # model -> fixed
    search: tuple[Param, ...] = ()
    objective: Objective = Objective()
    seeds: tuple[int, ...] | str = (0,)  # or "trial"
    sampler: str = "tpe"  # tpe | random | grid (every entry a list of choices, each combination once per seed)
    search_seed: int = 0
    resources: Resources = Resources()
    concurrency: int | None = None
    results_dir: str = ""  # absolute path, or a URI (s3://...) for shared storage on a cluster
    tracking_uri: str = ""  # MLflow; default sqlite:///<results_dir>/mlflow.db
    storage: str = ""  # Optuna (SQLAlchemy URL); default sqlite:///<results_dir>/optuna.db
    # A replication's published claims (cite, arms, claims), as the file wrote them once validated; the
    # report sets them against the runs (analysis/paper.py documents the block). None: not a replication.
    paper: Mapping[str, Any] | None = None

    def parameter_keys(self, model: str) -> list[str]:
        """The searched keys that apply to ``model``."""
        return [p.key for p in self.search if p.applies_to(model)]


# --------------------------------------------------------------------------------------------- loading


# A study file is a few hundred lines; these bounds refuse a wrong file (a log, a data set, a binary) or a YAML
# alias bomb (nested &a [*b, *b, ...] that expands to billions of values) before anything large is built.
MAX_FILE_BYTES = 1 << 20  # 1 MiB: the shipped studies are under 2 KiB
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings after expanding aliases (a grid of thousands fits)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a number (YAML 1.2), refuses duplicate and non-scalar keys, and refuses a
    document that expands to more than MAX_YAML_VALUES values."""

    def construct_document(self, node: yaml.Node) -> Any:
        expanded = _expanded_size(node)
        if expanded > MAX_YAML_VALUES:
            raise SpecError("yaml", f"at most {MAX_YAML_VALUES:,} values after expanding aliases (*name)",
                            f"{expanded:,.3g} values")
        return super().construct_document(node)


def _expanded_size(root: yaml.Node) -> float:
    """How many nodes the document holds once every alias is replaced by what it names (inf: an alias inside
    its own anchor, ``&a [*a]``, which never ends).

    An alias is the same node object as its anchor, so sizes are memoized per node: the count is cheap however
    large the expansion. Iterative (a deeply nested document must not exhaust Python's recursion).
    """
    size: dict[int, float] = {}
    open_: set[int] = set()  # nodes whose children are being counted
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            size[id(node)] = 1
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            open_.discard(id(node))
        elif id(node) in open_:
            return math.inf
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        line = f"line {key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: no study key is one
            raise SpecError(line, "a key that is a name, not a list or mapping", loader.construct_object(key_node,
                                                                                                       deep=True))
        key = loader.construct_object(key_node)
        if key in seen:
            raise SpecError(line, "each key once in a mapping", key)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parsed YAML, or a SpecError naming the file (missing, too large, not UTF-8 text, syntax error with its
    line, too many values)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise SpecError("file", "a readable study file", err.strerror or str(err), source) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError("file", f"a study file of at most {MAX_FILE_BYTES >> 20} MiB (a YAML file of a few hundred "
                        "lines)", f"{os.path.getsize(path):,} bytes", source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError("file", "a YAML text file (UTF-8)", f"binary data (byte {err.start} is not UTF-8)",
                        source) from None
    try:
        return yaml.load(text, Loader=_Loader)
    except SpecError as err:
        raise SpecError(err.key, err.expected, err.got, source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(where, "valid YAML", problem, source) from None
    except RecursionError:
        raise SpecError("yaml", "lists and mappings nested less deeply", "nesting too deep to read",
                        source) from None


def load_spec(path: str | os.PathLike) -> StudySpec:
    """Read, validate and return the study in ``path``; raises SpecError (one line) on any mistake."""
    return _Reader(str(path)).spec(read_yaml(path))


def cli_validate(path: str | os.PathLike, prefix: str = "") -> int:
    """``mannstudy validate FILE``: print one line; 0 if the file is valid, 2 if not (``prefix`` before errors)."""
    import sys

    from study.redact import redact

    try:
        spec = load_spec(path)
    except ConfigError as err:
        if not err.source:
            err = err.with_source(str(path))
        print(f"{prefix}{one_line(redact(str(err)))}", file=sys.stderr)
        return 2

    def count(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    print(f"{path}: ok ({count(len(spec.models), 'model')}, {count(len(spec.search), 'parameter')}, "
          f"{count(spec.budget.num_samples, 'trial')})")
    return 0


def cluster_env() -> dict[str, str]:
    """The cluster defaults (TRACKING_ENV, STORAGE_ENV, RESULTS_ENV) that have a value, by name.

    The process's environment wins; a variable it lacks is read from ``$MANNSTUDY_ENV_FILE`` (default
    ``~/mannstudy.env``): lines ``KEY=value`` or ``export KEY=value``, an optional pair of quotes around
    the value, ``#`` comments; nothing is expanded. So ``ray exec``, ``ray job submit`` and a KubeRay pod
    give a study the same defaults.
    """
    names = (TRACKING_ENV, STORAGE_ENV, RESULTS_ENV)
    found = {name: os.environ[name] for name in names if os.environ.get(name)}
    path = Path(os.environ.get(ENV_FILE_ENV, ENV_FILE)).expanduser()
    if len(found) < len(names) and os.environ.get(ENV_FILE_ENV, ENV_FILE) and path.is_file():
        for line in path.read_text().splitlines():
            key, eq, value = line.strip().removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip()
            if eq and key in names and key not in found:
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                if value:
                    found[key] = value
    return found


# --------------------------------------------------------------------------------------------- sampling


def define_by_run(spec: StudySpec) -> Callable[[optuna.Trial], dict[str, Any]]:
    """The search space as an Optuna define-by-run function (Ray's OptunaSearch takes it as ``space``).

    It suggests ``model`` (when the study has several models), then every entry that applies to the
    chosen model, and returns the constants of the trial: ``seed``, and ``model`` when there is only
    one. With several seeds, a newly sampled configuration runs with the first seed and its repeats
    with the others are queued in the study (see the module docstring).
    """

    def space(trial: optuna.Trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        if len(spec.models) > 1:
            model = trial.suggest_categorical(MODEL_PARAM, list(spec.models))
        else:
            model = constants[MODEL_PARAM] = spec.models[0]
        for p in spec.search:
            if not p.applies_to(model):
                continue
            if p.choices is not None:
                trial.suggest_categorical(p.key, list(p.choices))
            elif p.integer:
                trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
            else:
                trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)
        constants["seed"] = _trial_seed(spec, trial)
        return constants

    return space


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every configuration of a ``sampler: grid`` study, as Optuna parameters (``model`` first when searched).

    Queue them in a new Optuna study (Ray's OptunaSearch ``points_to_evaluate``); the define-by-run
    function then queues each point's repeats with the other seeds.
    """
    points = []
    for model in spec.models:
        params = [p for p in spec.search if p.applies_to(model)]
        for values in itertools.product(*(p.choices or () for p in params)):
            head = {MODEL_PARAM: model} if len(spec.models) > 1 else {}
            points.append({**head, **{p.key: v for p, v in zip(params, values, strict=True)}})
    return points


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler, seeded with ``search_seed``.

    TPE is multivariate and grouped because the space is conditional (per-model entries), and
    uses the constant liar so that trials asked while others run are spread out. A grid study's
    trials all come from the queue (grid_points); its sampler only fills in if the queue runs dry.
    """
    import warnings

    import optuna

    if spec.sampler != "tpe":
        return optuna.samplers.RandomSampler(seed=spec.search_seed)
    with warnings.catch_warnings():  # these TPE options are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=spec.search_seed, multivariate=True, group=True, constant_liar=True)


def _trial_seed(spec: StudySpec, trial: optuna.Trial) -> int:
    if spec.seeds == "trial":
        seed = trial.number
    elif SEED_ATTR in trial.user_attrs:  # a queued repeat of an earlier configuration
        return int(trial.user_attrs[SEED_ATTR])
    else:
        # A new configuration: run it now with the first seed, queue it with the others (but a repeat that a
        # killed driver already queued, or that ran, is not queued twice).
        seed = spec.seeds[0]
        planned = planned_runs(trial.study, seed) if len(spec.seeds) > 1 else set()
        for other in spec.seeds[1:]:
            if (params_key(trial.params), other) not in planned:
                trial.study.enqueue_trial(dict(trial.params), user_attrs={SEED_ATTR: other, REPEAT_ATTR: trial.number})
    trial.set_user_attr(SEED_ATTR, seed)
    trial.set_user_attr(REPEAT_ATTR, trial.number)
    return seed


def params_key(params: Mapping[str, Any]) -> tuple:
    """A configuration's Optuna parameters as a hashable key (order-free)."""
    return tuple(sorted(params.items()))


def planned_runs(study: optuna.Study, first_seed: int | None) -> set[tuple[tuple, int | None]]:
    """(``params_key``, seed) of every trial of ``study`` that is queued, running or ran: what a search started
    again over the study (its driver killed before Tune saved a state) must not queue a second time.

    A trial failed as ``not_run`` (asked by a driver that died before the trial started) is left out: its
    configuration and seed are still to be run. A queued trial without a seed attribute (a grid point) runs
    with ``first_seed``. With ``seeds: trial`` pass None: configurations are then compared without seeds.
    """
    from optuna.trial import TrialState

    out = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and t.user_attrs.get("status") == "not_run":
            continue
        params = t.params or t.system_attrs.get("fixed_params", {})  # a queued trial holds its values there
        out.add((params_key(params), None if first_seed is None else t.user_attrs.get(SEED_ATTR, first_seed)))
    return out


def trial_overrides(spec: StudySpec, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model name, dotted overrides for ``make_train_config``) of one trial.

    ``params`` is what the define-by-run function produced (Tune's trial config): ``model``,
    ``seed`` and the searched keys. Fixed values and the budget's step counts are added here.
    """
    params = dict(params)
    model = params.pop(MODEL_PARAM, spec.models[0])
    if model not in spec.models:
        raise SpecError(MODEL_PARAM, "one of " + ", ".join(spec.models), model, spec.source)
    overrides = {**spec.fixed, **spec.model_fixed.get(model, {})}
    overrides["max_steps"] = spec.budget.max_steps
    overrides["eval_every"] = spec.budget.eval_every
    overrides["seed"] = spec.seeds[0] if spec.seeds != "trial" else 0
    overrides.update(params)
    return model, overrides


# --------------------------------------------------------------------------------------------- validation


def _is_uri(text: str) -> bool:
    return bool(_URI.match(text)) and not text.startswith("file://")


def _numeric_type(tp: Any) -> type | None:
    """int or float for a field a range can target (``float | None`` counts as float), else None."""
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if float in args:
        return float
    if int in args:
        return int
    return None


class _Reader:
    """Turns parsed YAML into a StudySpec; every check raises SpecError naming ``source``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, got: Any = dataclasses.MISSING) -> NoReturn:
        from study.redact import redact_values

        # masked before the message cuts it: a connection string cut before its '@' no longer looks like one
        raise SpecError(key, expected, redact_values(got), self.source)

    def mapping(self, value: Any, key: str, allowed: set[str], required: tuple[str, ...] = (),
                what: str = "a mapping") -> dict:
        if not isinstance(value, dict):
            self.fail(key, what, value)
        where = f"{key}." if key else ""
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                self.fail(f"{where}{k}", "a known key (" + ", ".join(sorted(allowed)) + ")")
        for k in required:
            if k not in value:
                self.fail(f"{where}{k}", "a value (this key is required)")
        return value

    def names(self, value: Any, key: str, what: str) -> tuple[str, ...]:
        """A non-empty list of names (strings), before any of them is looked up."""
        if not isinstance(value, list) or not value:
            self.fail(key, what, value)
        for item in value:
            if not isinstance(item, str):
                self.fail(key, "a list of names (strings, not nested lists or mappings)", item)
        return tuple(value)

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        try:
            return coerce(value, tp, key)
        except ConfigError as err:
            self.fail(err.key, err.expected, err.got)

    def positive(self, value: Any, tp: type, key: str, what: str) -> Any:
        got = self.coerce(value, tp, key)
        if not got > 0:
            self.fail(key, what, value)
        return got

    # ---- top level

    TOP = {"name", "description", "models", "task", "fixed", "model_fixed", "search", "objective", "budget",
           "seeds", "sampler", "search_seed", "resources", "concurrency", "tracking_uri", "storage", "results_dir",
           "paper"}

    def spec(self, data: Any) -> StudySpec:
        if data is None:
            self.fail("file", "a study (a YAML mapping with name, models, task, budget)", "an empty file")
        data = self.mapping(data, "", self.TOP, ("name", "models", "task", "budget"),
                            what="a YAML mapping with name, models, task, budget")
        name = self.coerce(data["name"], str, "name")
        if not _NAME.match(name):
            self.fail("name", "letters, digits, '_', '-', '.' (it names a folder and a study)", name)
        models = self.models(data["models"])
        task = self.task(data["task"])
        budget = self.budget(data["budget"])
        seeds = self.seeds(data.get("seeds", [0]), budget)
        fixed = self.fixed(data.get("fixed") or {}, "fixed", models, task)
        model_fixed = self.model_fixed(data.get("model_fixed") or {}, models, task)
        search = self.search(data.get("search") or {}, models, task, fixed, model_fixed)
        defaults = cluster_env()
        results_root = defaults.get(RESULTS_ENV, "results")
        results_dir = self.location(data.get("results_dir") or f"{results_root.rstrip('/')}/{name}", "results_dir")
        remote = _is_uri(results_dir)
        spec = StudySpec(
            source=self.source,
            name=name,
            description=self.coerce(data.get("description", ""), str, "description"),
            models=models,
            task=task,
            fixed=fixed,
            model_fixed=model_fixed,
            search=search,
            objective=self.objective(data.get("objective") or {}),
            budget=budget,
            seeds=seeds,
            sampler=self.sampler(data.get("sampler", "tpe"), search, models, budget, seeds),
            search_seed=self.coerce(data.get("search_seed", 0), int, "search_seed"),
            resources=self.resources(data.get("resources") or {}),
            concurrency=self.concurrency(data.get("concurrency")),
            results_dir=results_dir,
            tracking_uri=self.uri(data, "tracking_uri", TRACKING_ENV, results_dir, remote, "mlflow.db", defaults),
            storage=self.uri(data, "storage", STORAGE_ENV, results_dir, remote, "optuna.db", defaults),
            paper=self.paper(data["paper"], models, search) if data.get("paper") is not None else None,
        )
        self.check_configs(spec)
        return spec

    def paper(self, value: Any, models: tuple[str, ...], search: tuple[Param, ...]) -> dict[str, Any]:
        """The ``paper`` block: ``cite``, named ``arms`` (selectors on ``model`` and searched keys), ``claims``."""
        raw = self.mapping(value, "paper", {"cite", "arms", "claims"}, ("cite", "arms", "claims"))
        cite = self.coerce(raw["cite"], str, "paper.cite")
        arms = self.mapping(raw["arms"], "paper.arms", set(raw["arms"]) if isinstance(raw["arms"], dict) else set(),
                            what="a mapping of arm names to selectors, e.g. {ntm: {model: ntm}}")
        if len(arms) < 2:
            self.fail("paper.arms", "at least two named arms", arms)
        searched = {p.key: p for p in search}
        for name, selector in arms.items():
            where = f"paper.arms.{name}"
            if not isinstance(name, str):
                self.fail(where, "an arm name", name)
            selector = self.mapping(selector, where, {"model", *searched},
                                    what="a mapping of model / searched keys to values, e.g. {model: ntm}")
            if not selector:
                self.fail(where, "at least one key (model or a searched key)", selector)
            for key, want in selector.items():
                if key == "model" and want not in models:
                    self.fail(f"{where}.model", "one of the study's models (" + ", ".join(models) + ")", want)
                if key in searched and searched[key].choices is not None and want not in searched[key].choices:
                    self.fail(f"{where}.{key}", "one of search." + key + "'s choices", want)
        claims = raw["claims"]
        if not isinstance(claims, list) or not claims:
            self.fail("paper.claims", "a non-empty list of claims", claims)
        checked = []
        for i, claim in enumerate(claims):
            where = f"paper.claims[{i}]"
            claim = self.mapping(claim, where, {"claim", "reported", "outcome", "arm", "against", "expected"},
                                 ("claim", "outcome", "arm", "against"))
            outcome = self.coerce(claim["outcome"], str, f"{where}.outcome")
            final = outcome.startswith("final_") and _METRIC.match(outcome[len("final_"):])
            if outcome not in ("steps", "success") and not final:
                self.fail(f"{where}.outcome", "steps, success or final_<metric> (e.g. final_gen2x_error)", outcome)
            if outcome.startswith("final_") and outcome.endswith("accuracy"):
                self.fail(f"{where}.outcome", "a lower-is-better metric (error, cost_bits)", outcome)
            arm = claim["arm"]
            if arm not in arms:
                self.fail(f"{where}.arm", "a name in paper.arms (" + ", ".join(arms) + ")", arm)
            against = self.names(claim["against"], f"{where}.against", "a non-empty list of arm names")
            for other in against:
                if other not in arms or other == arm:
                    self.fail(f"{where}.against", f"names in paper.arms other than {arm}", other)
            expected = claim.get("expected")
            if expected is not None:
                expected = self.coerce(expected, float, f"{where}.expected")
                if not math.isfinite(expected):
                    self.fail(f"{where}.expected", "a finite number (the paper's figure on our scale)", expected)
            checked.append({"claim": self.coerce(claim["claim"], str, f"{where}.claim"),
                            "reported": self.coerce(claim.get("reported", ""), str, f"{where}.reported"),
                            "outcome": outcome, "arm": arm, "against": list(against), "expected": expected})
        return {"cite": cite, "arms": {k: dict(v) for k, v in arms.items()}, "claims": checked}

    def models(self, value: Any) -> tuple[str, ...]:
        from mann.registry import MODELS

        value = self.names(value, "models", "a non-empty list of model names, e.g. [ntm, dnc]")
        for m in value:
            if m not in MODELS:
                self.fail("models", "model names among " + ", ".join(sorted(MODELS)), m)
        if len(set(value)) != len(value):
            self.fail("models", "each model once", value)
        return value

    def task(self, value: Any) -> str:
        from mann.tasks import TASKS

        if not isinstance(value, str) or value not in TASKS:
            self.fail("task", "one of " + ", ".join(sorted(TASKS)), value)
        return value

    def budget(self, value: Any) -> Budget:
        keys = {f.name for f in dataclasses.fields(Budget)}
        raw = self.mapping(value, "budget", keys, ("num_samples", "max_steps", "eval_every"))
        integer = "a positive integer"
        num_samples = self.positive(raw["num_samples"], int, "budget.num_samples", integer)
        max_steps = self.positive(raw["max_steps"], int, "budget.max_steps", integer)
        eval_every = self.positive(raw["eval_every"], int, "budget.eval_every", integer)
        if eval_every > max_steps:
            self.fail("budget.eval_every", f"at most budget.max_steps ({max_steps})", eval_every)
        early = self.coerce(raw.get("early_stopping", True), bool, "budget.early_stopping")
        grace = raw.get("grace_period")
        if grace is not None:
            grace = self.positive(grace, int, "budget.grace_period", integer)
            # ASHA judges a trial on its reports: a rung before the first evaluation sees nothing.
            if not eval_every <= grace <= max_steps:
                self.fail("budget.grace_period", f"between budget.eval_every ({eval_every}) and "
                          f"budget.max_steps ({max_steps})", grace)
        elif early:
            self.fail("budget.grace_period", "steps before ASHA may stop a trial (or early_stopping: false)")
        rf = self.coerce(raw.get("reduction_factor", 3.0), float, "budget.reduction_factor")
        if not rf > 1:
            self.fail("budget.reduction_factor", "a number above 1", rf)
        time_budget = raw.get("time_budget_s")
        if time_budget is not None:
            time_budget = self.positive(time_budget, float, "budget.time_budget_s", "a positive number of seconds")
        return Budget(num_samples, max_steps, eval_every, early, grace, rf, time_budget)

    def seeds(self, value: Any, budget: Budget) -> tuple[int, ...] | str:
        if value == "trial":
            return "trial"
        # a bare integer is refused: is `seeds: 3` seed 3 or three seeds?
        if not isinstance(value, list) or not value:
            self.fail("seeds", "a non-empty list of integers, or 'trial'", value)
        seeds = self.coerce(value, tuple[int, ...], "seeds")
        for seed in seeds:
            if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                self.fail("seeds", "64-bit integers (torch.manual_seed's seeds: -2**63 to 2**64 - 1)", seed)
        if len(set(seeds)) != len(seeds):
            self.fail("seeds", "each seed once", value)
        if budget.num_samples % len(seeds):
            self.fail("budget.num_samples", f"a multiple of the number of seeds ({len(seeds)}): every "
                      "configuration runs once per seed", budget.num_samples)
        return seeds

    def sampler(self, value: Any, search: tuple[Param, ...], models: tuple[str, ...], budget: Budget,
                seeds: tuple[int, ...] | str) -> str:
        if value not in ("tpe", "random", "grid"):
            self.fail("sampler", "tpe, random or grid", value)
        if value == "grid":
            for p in search:
                if p.choices is None:
                    self.fail(f"search.{p.key}", "{choices: [...]} with sampler: grid", "a range")
            configs = sum(math.prod(len(p.choices) for p in search if p.applies_to(m)) for m in models)
            runs = configs * (1 if seeds == "trial" else len(seeds))
            if budget.num_samples != runs:
                per = "" if seeds == "trial" else f" x {len(seeds)} seeds"
                self.fail("budget.num_samples", f"{runs} for the grid ({configs} configurations{per})",
                          budget.num_samples)
        return value

    def objective(self, value: Any) -> Objective:
        raw = self.mapping(value, "objective", {"metric", "mode"})
        metric = self.coerce(raw.get("metric", "error"), str, "objective.metric")
        if not _METRIC.match(metric):
            self.fail("objective.metric", "a metric of mann.train.fit (error, cost_bits, accuracy, train_loss, "
                      "gen<s>x_error, ...)", metric)
        natural = "max" if metric.endswith("accuracy") else "min"
        mode = raw.get("mode", natural)
        if mode not in ("min", "max"):
            self.fail("objective.mode", "min or max", mode)
        if mode != natural:
            self.fail("objective.mode", f"{natural} for {metric}", mode)
        return Objective(metric, mode)

    def resources(self, value: Any) -> Resources:
        raw = self.mapping(value, "resources", {"cpu", "gpu"})
        cpu = self.positive(raw.get("cpu", 1.0), float, "resources.cpu", "a positive number of CPUs")
        if cpu > MAX_TRIAL_CPUS:
            self.fail("resources.cpu", f"at most {MAX_TRIAL_CPUS} CPUs (a trial runs on one machine)", cpu)
        gpu = self.coerce(raw.get("gpu", 0.0), float, "resources.gpu")
        if not _sensible_gpu(gpu):
            self.fail("resources.gpu", "0, a whole number, or 1/n to pack n trials per GPU (0.5, 0.33, 0.25, "
                      "0.2, ...)", raw.get("gpu"))
        if gpu > MAX_TRIAL_GPUS:
            self.fail("resources.gpu", f"at most {MAX_TRIAL_GPUS} GPUs (a trial runs on one machine)", gpu)
        return Resources(cpu, gpu)

    def concurrency(self, value: Any) -> int | None:
        if value is None:
            return None
        return self.positive(value, int, "concurrency", "a positive integer (or null: as resources allow)")

    def location(self, value: Any, key: str) -> str:
        text = self.expand(self.coerce(value, str, key), key)
        if _is_uri(text):
            return text.rstrip("/")
        return str(Path(text.removeprefix("file://")).expanduser().resolve())

    def uri(self, data: dict, key: str, env: str, results_dir: str, remote: bool, filename: str,
            defaults: Mapping[str, str]) -> str:
        if data.get(key) is not None:
            text = self.expand(self.coerce(data[key], str, key), key)
        elif defaults.get(env):
            text, key = defaults[env], f"{key} (from ${env})"
        elif remote:  # SQLite cannot live in an object store
            self.fail(key, f"a database URI (or ${env}) when results_dir is remote ({results_dir})")
        else:
            return f"sqlite:///{results_dir}/{filename}"
        if not _URI.match(text):
            self.fail(key, "a URI such as sqlite:////abs/path.db, postgresql://user@host/db or http://host:5000",
                      text)
        if text.startswith("file:"):
            self.fail(key, "a database or server URI, not a plain file store", text)
        return text

    def expand(self, text: str, key: str) -> str:
        """``${VAR}`` -> the environment variable's value (cluster addresses and passwords stay out of files)."""
        def value(match: re.Match) -> str:
            if match.group(1) not in os.environ:
                self.fail(key, f"environment variable {match.group(1)} to be set", text)
            return os.environ[match.group(1)]

        return _ENV.sub(value, text)

    # ---- keys, against the real config classes

    def target_type(self, key: str, path: str, models: tuple[str, ...], task: str, hint: str = "") -> Any:
        """The type of the config field ``key`` names, for every model in ``models``; refuses other keys."""
        from mann.registry import make_model_config
        from mann.tasks import make_task_config
        from mann.train import TrainConfig

        if not isinstance(key, str):
            self.fail(path, "a dotted key (lr, model.<field>, task.<field>)", key)
        if key in _RESERVED:
            self.fail(path, f"{_RESERVED[key]} (not a key here)", key)
        prefix, dot, field = key.partition(".")
        if not dot:
            train = {k: v for k, v in field_types(TrainConfig).items() if k not in _RESERVED}
            if key not in train:
                self.fail(path, "a training key (" + ", ".join(sorted(train)) + "), model.<field> or task.<field>")
            return train[key]
        if prefix == "task":
            fields = field_types(type(make_task_config(task, {})))
            if field not in fields:
                self.fail(path, f"a field of task {task} (" + ", ".join(sorted(fields)) + ")")
            return fields[field]
        if prefix != "model":
            self.fail(path, "a dotted key (lr, model.<field>, task.<field>)", key)
        types_ = {m: field_types(type(make_model_config(m, {}))) for m in models}
        have = [m for m in models if field in types_[m]]
        if len(have) < len(models):
            lacking = next(m for m in models if m not in have)
            more = hint.format(have=", ".join(have)) if have and hint else ""
            self.fail(path, f"a field of every model it applies to, but {lacking} has no '{field}'{more}")
        tp = types_[have[0]][field]
        return tp

    def fixed(self, value: Any, path: str, models: tuple[str, ...], task: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, "a mapping of dotted keys to values (lr: 1.0e-3, model.memory_size: 64)", value)
        out = {}
        for key, val in value.items():
            hint = "; fix it per model under model_fixed" if path == "fixed" else ""
            tp = self.target_type(key, f"{path}.{key}", models, task, hint)
            if isinstance(val, dict):
                self.fail(f"{path}.{key}", "a value (ranges and choices go under search)", val)
            out[key] = self.coerce(val, tp, f"{path}.{key}")
        return out

    def model_fixed(self, value: Any, models: tuple[str, ...], task: str) -> dict[str, dict[str, Any]]:
        if not isinstance(value, dict):
            self.fail("model_fixed", "a mapping of model name to fixed values (ntm: {model.shift_range: 1})", value)
        out = {}
        for m, fixed in value.items():
            if m not in models:
                self.fail(f"model_fixed.{m}", "one of the study's models (" + ", ".join(models) + ")")
            out[m] = self.fixed(fixed or {}, f"model_fixed.{m}", (m,), task)
        return out

    def search(self, value: Any, models: tuple[str, ...], task: str, fixed: dict,
               model_fixed: dict[str, dict]) -> tuple[Param, ...]:
        if not isinstance(value, dict):
            self.fail("search", "a mapping of dotted keys to {low, high, log} or {choices: [...]}", value)
        params = []
        for key, entry in value.items():
            path = f"search.{key}"
            if key == MODEL_PARAM:
                self.fail(path, "models listed under models (several models are searched as 'model')")
            p = self.param(key, entry, path, models, task)
            if key in fixed:
                self.fail(path, "a key that is not also fixed", key)
            for m in p.models or models:
                if key in model_fixed.get(m, {}):
                    self.fail(path, f"a key that is not also in model_fixed.{m}", key)
            params.append(p)
        return tuple(params)

    def param(self, key: str, entry: Any, path: str, models: tuple[str, ...], task: str) -> Param:
        entry = self.mapping(entry, path, {"low", "high", "log", "choices", "models"},
                             what="{low, high, log} or {choices: [...]} (constants go under fixed)")
        only: tuple[str, ...] = ()
        if "models" in entry:
            only = self.names(entry["models"], f"{path}.models", "a non-empty list of the study's models")
            for m in only:
                if m not in models:
                    self.fail(f"{path}.models", "models of this study (" + ", ".join(models) + ")", m)
        tp = self.target_type(key, path, only or models, task, "; add models: [{have}] to make it conditional")
        if "choices" in entry:
            for k in ("low", "high", "log"):
                if k in entry:
                    self.fail(f"{path}.{k}", "either {low, high, log} or {choices}, not both")
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                self.fail(f"{path}.choices", "a non-empty list", choices)
            values = []
            for c in choices:
                # Optuna stores categorical values as they are: scalars only.
                if not (c is None or isinstance(c, bool | int | float | str)):
                    self.fail(f"{path}.choices", "scalar values (numbers, strings, true/false, null)", c)
                values.append(self.coerce(c, tp, f"{path}.choices"))
            if len(set(values)) != len(values):
                self.fail(f"{path}.choices", "each value once", choices)
            return Param(key, choices=tuple(values), models=only)
        for k in ("low", "high"):
            if k not in entry:
                self.fail(f"{path}.{k}", "a value ({low, high} or {choices: [...]})")
        num = _numeric_type(tp)
        if num is None:
            self.fail(path, f"{{choices: [...]}} for a key of type {_type_name(tp)}", entry)
        low = self.coerce(entry["low"], num, f"{path}.low")
        high = self.coerce(entry["high"], num, f"{path}.high")
        log = self.coerce(entry.get("log", False), bool, f"{path}.log")
        if not (math.isfinite(low) and math.isfinite(high)):
            self.fail(path, "finite low and high", entry)
        if low > high:
            self.fail(f"{path}.low", f"at most high ({high})", low)
        if log and low <= 0:
            self.fail(f"{path}.low", "a positive number with log: true", low)
        return Param(key, low=low, high=high, log=log, integer=num is int, models=only)

    def check_configs(self, spec: StudySpec) -> None:
        """``make_train_config`` must accept, for every model, the fixed values with each corner of the space.

        Corners: all entries at their low end (first choice), all at their high end (last choice), and
        each value of each entry (range ends, every choice) with the others at their low end.
        """
        from mann.train import make_train_config

        seed = spec.seeds[0] if spec.seeds != "trial" else 0
        for model in spec.models:
            params = [p for p in spec.search if p.applies_to(model)]
            low = {p.key: p.choices[0] if p.choices else p.low for p in params}
            high = {p.key: p.choices[-1] if p.choices else p.high for p in params}
            samples = [low, high]
            for p in params:
                for v in p.choices or (p.low, p.high):
                    samples.append({**low, p.key: v})
            origin = {k: f"fixed.{k}" for k in spec.fixed}
            origin |= {k: f"model_fixed.{model}.{k}" for k in spec.model_fixed.get(model, {})}
            origin |= {"max_steps": "budget.max_steps", "eval_every": "budget.eval_every", "seed": "seeds"}
            origin |= {p.key: f"search.{p.key}" for p in params}
            seen = []
            for sample in samples:
                if sample in seen:
                    continue
                seen.append(sample)
                _, overrides = trial_overrides(spec, {MODEL_PARAM: model, "seed": seed, **sample})
                try:
                    cfg = make_train_config(model, spec.task, overrides)
                    check_limits(cfg)
                except ConfigError as err:
                    suffix = f" (model {model})" if len(spec.models) > 1 else ""
                    self.fail(origin.get(err.key, err.key), err.expected + suffix, err.got)
                self.check_objective(spec, cfg)
            if spec.resources.gpu == 0 and spec.fixed.get("device") == "cuda":
                self.fail("fixed.device", "cpu or auto when resources.gpu is 0 (such a trial sees no GPU)",
                          "cuda")

    def check_objective(self, spec: StudySpec, cfg: Any) -> None:
        """A generalization metric must be one that fit evaluates (its scale in gen_scales)."""
        metric = spec.objective.metric
        if metric.startswith("gen"):
            scales = [f"gen{s:g}x" for s in cfg.gen_scales]
            if metric.split("_")[0] not in scales:
                self.fail("objective.metric", "a generalization scale in gen_scales (" + ", ".join(scales) + ")",
                          metric)


def _sensible_gpu(gpu: float) -> bool:
    """0, a whole number of GPUs, or a fraction that packs n trials on a GPU leaving under 1% of it idle.

    Ray keeps resources to 4 decimals and refuses fractions above 1 that are not whole.
    """
    if not math.isfinite(gpu) or gpu < 0 or abs(round(gpu * 10_000) - gpu * 10_000) > 1e-6:
        return False
    if gpu == 0 or gpu == int(gpu):
        return True
    if gpu > 1:
        return False
    n = math.floor(1 / gpu + 1e-9)
    return 1 - n * gpu <= 0.01 + 1e-9
