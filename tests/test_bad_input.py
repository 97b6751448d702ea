"""Every bad input the command line can meet: one line naming the file and the key, exit 2, nothing written.

The corpus below is built in a scratch folder that also holds recorded results (a study's results folder
and a training checkpoint). One test walks the whole corpus through ``study.cli.main`` in-process and checks,
for each entry: exit code 2; exactly one line on stderr, ``mannstudy: ...``; the file and the key it names;
a bounded length (quoted values are cut, so an alias bomb or a 2 MB file never reaches the terminal whole);
and that no file or folder in the scratch folder was created, changed or removed. A few entries run again as
real processes to check that the console sees the same single line and no traceback.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from mann.config import QUOTE_CHARS
from study.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = ("MLFLOW_TRACKING_URI", "MANNSTUDY_STORAGE", "MANNSTUDY_RESULTS_DIR")
MAX_LINE = 1000  # the command line's cap on one message (mann.config.one_line)

BASE = """\
name: t
models: [ntm, dnc]
task: copy
fixed:
  optimizer: adam
  task.max_length: 3
model_fixed:
  ntm: {model.shift_range: 1}
search:
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  model.memory_size: {low: 8, high: 32}
budget: {num_samples: 4, max_steps: 100, eval_every: 10, grace_period: 20}
seeds: [0, 1]
"""
# A tiny LSTM on 3-bit copy: the checkpoint the --resume entries start from takes a second to write.
TINY = ["--model", "lstm", "--task", "copy", "--device", "cpu",
        "--set", "model.hidden_size=8", "--set", "task.bits=3", "--set", "task.max_length=3",
        "--set", "optimizer=adam", "--set", "lr=1e-2", "--set", "batch_size=4",
        "--set", "eval_every=4", "--set", "eval_batches=1", "--set", "gen_scales=[2]"]


class Case(NamedTuple):
    name: str
    argv: list[str]
    needles: tuple[str, ...]  # the file and the key the line must name (and anything else it must say)
    short: bool = False  # the input is huge: the line must stay far below MAX_LINE


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new)


# (name, the study file's text or bytes, the key the message names)
STUDY_FILES: list[tuple[str, str | bytes, str]] = [
    # the file itself
    ("binary", bytes(random.Random(0).randrange(256) for _ in range(4096)), "file"),
    ("utf16", BASE.encode("utf-16"), "file"),
    ("nul character", "name: t\x00\n", "yaml"),
    ("empty", "", "file"),
    ("only comments", "# a study\n# nothing else\n", "file"),
    ("top-level list", "- name: t\n- models: [ntm]\n", "(top level)"),
    ("top-level text", "2026-01-01 12:00:00 INFO something happened\n", "(top level)"),
    ("plain text under the size cap", "word " * 20_000, "(top level)"),
    ("plain text over the size cap", "x" * (2 << 20), "file"),
    ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i > 1 else '*a'] * 9)}]\n" for i in range(1, 10))
        + "models: *b9\n", "yaml"),
    ("recursive alias", "name: &a [*a]\n", "yaml"),
    ("deep nesting", "x: " + "[" * 5_000 + "]" * 5_000 + "\n", "yaml"),
    # YAML
    ("unclosed bracket", edit("task: copy", "task: [copy"), "line"),
    ("tab indentation", edit("  optimizer: adam", "\toptimizer: adam"), "line"),
    ("duplicate key", BASE + "task: reverse\n", "line"),
    ("list as a key", BASE + "? [a, b]\n: 1\n", "line"),
    ("mapping as a key", edit("  optimizer: adam", "  ? {lr: 1}\n  : 2\n  optimizer: adam"), "line"),
    # every top-level key with a wrong type or value
    ("unknown key", BASE + "colour: red\n", "colour"),
    ("non-string key", BASE + "3: three\n", "3"),
    ("name a list", edit("name: t", "name: [t]"), "name"),
    ("name with a space", edit("name: t", "name: my study"), "name"),
    ("description a list", BASE + "description: [a]\n", "description"),
    ("models a string", edit("models: [ntm, dnc]", "models: ntm"), "models"),
    ("models nested list", edit("models: [ntm, dnc]", "models: [[ntm], dnc]"), "models"),
    ("models a list of mappings", edit("models: [ntm, dnc]", "models: [{ntm: 1}]"), "models"),
    ("models unknown", edit("models: [ntm, dnc]", "models: [ntm, gru]"), "models"),
    ("models empty", edit("models: [ntm, dnc]", "models: []"), "models"),
    ("task a list", edit("task: copy", "task: [copy]"), "task"),
    ("task unknown", edit("task: copy", "task: cpy"), "task"),
    ("fixed a list", edit("fixed:\n  optimizer: adam\n  task.max_length: 3", "fixed: [1, 2]"), "fixed"),
    ("fixed unknown key", edit("optimizer: adam", "optimiser: adam"), "fixed.optimiser"),
    ("fixed integer .inf", edit("optimizer: adam", "batch_size: .inf"), "fixed.batch_size"),
    ("fixed integer .nan", edit("optimizer: adam", "batch_size: .nan"), "fixed.batch_size"),
    ("fixed number .nan", edit("optimizer: adam", "eps: .nan"), "fixed.eps"),
    ("fixed number .inf", edit("optimizer: adam", "clip_value: .inf"), "fixed.clip_value"),
    ("fixed list nested", edit("optimizer: adam", "gen_scales: [[2]]"), "fixed.gen_scales"),
    ("fixed memory no machine holds", edit("task.max_length: 3", "task.max_length: 3\n  model.memory_size: 1000000000")
     .replace("  model.memory_size: {low: 8, high: 32}\n", ""), "fixed.model.memory_size"),
    ("fixed batch no machine holds", edit("optimizer: adam", "batch_size: 1000000000000"), "fixed.batch_size"),
    ("model_fixed a list", edit("ntm: {model.shift_range: 1}", "- ntm"), "model_fixed"),
    ("model_fixed other model", edit("ntm: {model.shift_range: 1}", "lstm: {model.layers: 2}"), "model_fixed.lstm"),
    ("search a list", edit("  lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n  model.memory_size: {low: 8, high: 32}",
                           "  - lr"), "search"),
    ("search low .inf", edit("{low: 8, high: 32}", "{low: .inf, high: 32}"), "search.model.memory_size.low"),
    ("search high .nan", edit("{low: 8, high: 32}", "{low: 8, high: .nan}"), "search.model.memory_size.high"),
    ("search memory no machine holds", edit("{low: 8, high: 32}", "{low: 8, high: 10000000}"),
     "search.model.memory_size"),
    ("search choices nested", edit("{low: 8, high: 32}", "{choices: [8, [16]]}"), "search.model.memory_size.choices"),
    ("search models nested", edit("{low: 8, high: 32}", "{low: 8, high: 32, models: [[ntm]]}"),
     "search.model.memory_size.models"),
    ("objective a list", BASE + "objective: [error]\n", "objective"),
    ("objective metric unknown", BASE + "objective: {metric: loss}\n", "objective.metric"),
    ("budget a list", edit("budget: {num_samples: 4, max_steps: 100, eval_every: 10, grace_period: 20}",
                           "budget: [4, 100]"), "budget"),
    ("budget missing", edit("budget: {num_samples: 4, max_steps: 100, eval_every: 10, grace_period: 20}\n", ""),
     "budget"),
    ("budget num_samples .inf", edit("num_samples: 4", "num_samples: .inf"), "budget.num_samples"),
    ("budget max_steps .nan", edit("max_steps: 100", "max_steps: .nan"), "budget.max_steps"),
    ("budget max_steps negative", edit("max_steps: 100", "max_steps: -100"), "budget.max_steps"),
    ("budget time .inf", edit("grace_period: 20}", "grace_period: 20, time_budget_s: .inf}"),
     "budget.time_budget_s"),
    ("seeds .inf", edit("seeds: [0, 1]", "seeds: [0, .inf]"), "seeds"),
    ("seeds nested", edit("seeds: [0, 1]", "seeds: [[0], [1]]"), "seeds"),
    ("seeds beyond 64 bits", edit("seeds: [0, 1]", "seeds: [0, 100000000000000000000000]"), "seeds"),
    ("fixed eval_seed beyond 64 bits", edit("optimizer: adam", "eval_seed: -100000000000000000000000"),
     "fixed.eval_seed"),
    ("fixed task length no task needs", edit("task.max_length: 3", "task.max_length: 100000000"),
     "fixed.task.max_length"),
    ("sampler a list", BASE + "sampler: [tpe]\n", "sampler"),
    ("search_seed .nan", BASE + "search_seed: .nan\n", "search_seed"),
    ("resources a list", BASE + "resources: [1, 0]\n", "resources"),
    ("resources cpu .inf", BASE + "resources: {cpu: .inf}\n", "resources.cpu"),
    ("resources cpu no machine has", BASE + "resources: {cpu: 100000}\n", "resources.cpu"),
    ("resources gpu .nan", BASE + "resources: {gpu: .nan}\n", "resources.gpu"),
    ("resources gpu no machine has", BASE + "resources: {gpu: 1000}\n", "resources.gpu"),
    ("concurrency .inf", BASE + "concurrency: .inf\n", "concurrency"),
    ("tracking_uri a list", BASE + "tracking_uri: [a]\n", "tracking_uri"),
    ("storage a number", BASE + "storage: 5\n", "storage"),
    ("storage with an unset variable", BASE + "storage: postgresql://mannstudy_user:a-long-secret-password@"
     "database.example.internal:5432/${NO_SUCH_VARIABLE_42}\n", "storage"),
    ("results_dir a mapping", BASE + "results_dir: {a: 1}\n", "results_dir"),
]


def study_file_cases(root: Path) -> list[Case]:
    cases = []
    for i, (name, content, key) in enumerate(STUDY_FILES):
        path = root / "studies" / f"bad{i:02d}.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content) if content.startswith(" ") else content)
        huge = len(content) > 50_000 or name == "alias bomb"
        cases.append(Case(f"study: {name}", ["validate", str(path)], (str(path), f": {key}"), short=huge))
    # the same checks behind the other commands that read a study file (before anything is started)
    index = {name: i for i, (name, _, _) in enumerate(STUDY_FILES)}
    binary, bomb, nested = (root / "studies" / f"bad{index[name]:02d}.yaml"
                            for name in ("binary", "alias bomb", "models nested list"))
    cases += [
        Case("study: directory", ["validate", str(root / "studies")], (str(root / "studies"), ": file")),
        Case("study: missing", ["validate", str(root / "none.yaml")], (str(root / "none.yaml"), ": file")),
        Case("sweep: binary study file", ["sweep", str(binary)], (str(binary), ": file")),
        Case("sweep: alias bomb", ["sweep", str(bomb)], (str(bomb), ": yaml"), short=True),
        Case("replicate: nested models", ["replicate", str(nested)], (str(nested), ": models")),
        Case("report: binary study file", ["report", str(binary)], (str(binary), ": file")),
    ]
    return cases


def set_cases() -> list[Case]:
    """--set and flag mistakes of ``mannstudy train``: no file, so the line names the key."""
    sets = [
        ("model.memory_size=.inf", "model.memory_size: expected an integer"),
        ("batch_size=.nan", "batch_size: expected an integer"),
        ("lr=.inf", "lr: expected a finite number"),
        ("eval_every=1e400", "eval_every: expected an integer"),
        ("model.memory_size=1000000000", "model.memory_size: expected a size that fits on one device"),
        ("seed=100000000000000000000000", "seed: expected a 64-bit integer"),
        ("task.max_length=100000000", "task.max_length: expected at most 65,536"),
        ("gen_scales=[1e10]", "gen_scales: expected scales that keep task."),
        ("lr", "lr: expected key=value"),
        ("=3", "=3: expected key=value"),
        ("nope=1", "nope: expected a known key"),
        ("gen_scales=[[2]]", "gen_scales: expected"),
        ("task.max_length={a: 1}", "task.max_length: expected an integer"),
    ]
    cases = [Case(f"--set {s}", ["train", "--set", s], (needle,)) for s, needle in sets]
    cases.append(Case("--set hidden_size no machine holds", ["train", "--model", "lstm", "--set",
                                                             "model.hidden_size=10000000"],
                      ("model.hidden_size: expected a size that fits",)))
    cases += [
        Case("--steps 0", ["train", "--steps", "0"], ("max_steps: expected a positive integer",)),
        Case("--steps x", ["train", "--steps", "x"], ("--steps",)),
        Case("--device tpu", ["train", "--device", "tpu"], ("--device",)),
        Case("--model gru", ["train", "--model", "gru"], ("model: expected one of",)),
        Case("unknown command", ["fly"], ("COMMAND",)),
        Case("unknown flag", ["train", "--colour", "red"], ("--colour",)),
    ]
    return cases


def checkpoint_cases(root: Path, good: Path) -> list[Case]:
    """``train --resume`` with bad checkpoints, and ``--checkpoint-dir`` that cannot (or must not) be written."""
    bad = root / "checkpoints"
    state = torch.load(good, weights_only=True)
    made: dict[str, Path] = {}

    def save(name: str, obj) -> None:
        made[name] = bad / f"{name}.pt"
        torch.save(obj, made[name])

    def write(name: str, data: bytes) -> None:
        made[name] = bad / f"{name}.pt"
        made[name].write_bytes(data)

    write("random bytes", random.Random(1).randbytes(5000))
    write("truncated", good.read_bytes()[:2000])
    write("empty", b"")
    write("text", BASE.encode())
    save("a tensor", torch.zeros(3))
    save("no format", {"weights": torch.zeros(2)})
    save("format wrong and long", {**state, "format": "x" * 10_000})
    save("keys missing", {"format": state["format"], "config": state["config"]})
    save("config a list", {**state, "config": [1, 2, 3]})
    save("config without a model", {**state, "config": {"lr": 1e-3}})
    save("config value bad", {**state, "config": {**state["config"], "lr": -1.0}})
    save("config of another model", {**state, "config": {**state["config"], "model": "ntm"}})
    save("a pickled object", {**state, "extra": Path("x")})
    with zipfile.ZipFile(bad / "zip.pt", "w") as z:
        z.writestr("data.txt", "not torch")
    made["a zip that is not torch's"] = bad / "zip.pt"
    key = {"random bytes": "file", "truncated": "file", "empty": "file", "text": "file", "a tensor": "format",
           "no format": "format", "format wrong and long": "format", "keys missing": "step",
           "config a list": "config", "config without a model": "config", "config value bad": "config.lr",
           "config of another model": "config.model", "a pickled object": "file", "a zip that is not torch's": "file"}
    cases = [Case(f"--resume {name}", ["train", "--resume", str(path)], (str(path), f": {key[name]}"),
                  short=name == "format wrong and long") for name, path in made.items()]
    empty_dir = bad / "empty_dir"
    empty_dir.mkdir()
    a_file = root / "a_file"
    a_file.write_text("recorded\n")
    other = root / "other_run"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(good.read_bytes())
    cases += [
        Case("--resume missing", ["train", "--resume", str(root / "nope.pt")], (str(root / "nope.pt"),)),
        Case("--resume a folder without a checkpoint", ["train", "--resume", str(empty_dir)], (str(empty_dir),)),
        Case("--resume, other model flag", ["train", "--resume", str(good), "--model", "ntm"], (str(good), "--model")),
        Case("--resume, other task flag", ["train", "--resume", str(good), "--task", "reverse"], (str(good), "--task")),
        Case("--resume, weights of another size", ["train", "--resume", str(good), "--set", "model.hidden_size=9"],
             (str(good), ": model")),
        Case("--checkpoint-dir an existing file", ["train", *TINY, "--steps", "4", "--checkpoint-dir", str(a_file)],
             (str(a_file), "checkpoint_dir")),
        Case("--checkpoint-dir under a file", ["train", *TINY, "--steps", "4", "--checkpoint-dir",
                                               str(a_file / "sub")], (str(a_file / "sub"), "checkpoint_dir")),
        Case("--checkpoint-dir holding another run", ["train", *TINY, "--steps", "4", "--checkpoint-dir", str(other)],
             (str(other), "checkpoint_dir")),
        Case("--resume into another run's folder", ["train", "--resume", str(good), "--checkpoint-dir", str(other)],
             (str(other), "checkpoint_dir")),
    ]
    return cases


def report_cases(root: Path) -> list[Case]:
    good = root / "studies" / "good.yaml"
    return [
        Case("report: a study with no results", ["report", str(good)],
             (str(root / "results" / "t" / "mlflow.db"), "'t'", "mannstudy sweep")),
        Case("report: a study name with no results", ["report", "t"], ("mlflow.db", "'t'")),
        Case("report: a missing study file", ["report", str(root / "no.yaml")], (str(root / "no.yaml"),)),
        Case("ui: a folder with no results", ["ui", str(root / "results" / "t")], ("mlflow.db",)),
        Case("sweep --resume with nothing to resume", ["sweep", str(good), "--resume"], (str(good), "--resume")),
    ]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: kind, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (path.is_dir(), st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        mp.chdir(root)  # a study's default results folder is results/<name> here
        (root / "studies").mkdir()
        (root / "checkpoints").mkdir()
        (root / "studies" / "good.yaml").write_text(BASE)
        # Results already recorded, which no bad input may touch: another study's folder and a run's checkpoint.
        (root / "results" / "other").mkdir(parents=True)
        (root / "results" / "other" / "mlflow.db").write_bytes(b"recorded")
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            assert main(["train", *TINY, "--steps", "4", "--checkpoint-dir", str(root / "run")]) == 0
        good = root / "run" / "checkpoint.pt"
        cases = [*study_file_cases(root), *set_cases(), *checkpoint_cases(root, good), *report_cases(root)]
        yield root, cases


def check(case: Case, code: int, err: str) -> list[str]:
    """What is wrong with one entry's outcome (empty when it is refused as it should be)."""
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if not err.endswith("\n") or err.count("\n") != 1:
        problems.append(f"{err.count(chr(10))} lines on stderr")
    line = err.rstrip("\n")
    if not line.startswith("mannstudy: ") or "Traceback" in err:
        problems.append("not a 'mannstudy: ' line")
    problems += [f"does not say {needle!r}" for needle in case.needles if needle not in line]
    if "secret" in line:
        problems.append("shows a password")
    limit = 400 if case.short else MAX_LINE
    if len(line) > limit:
        problems.append(f"{len(line)} characters (limit {limit})")
    return problems


def test_every_bad_input_is_one_line_naming_file_and_key_exit_2_and_writes_nothing(corpus, capsys):
    root, cases = corpus
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    before = snapshot(root)
    failures = []
    for case in cases:
        code = main(case.argv)
        captured = capsys.readouterr()
        problems = check(case, code, captured.err)
        after = snapshot(root)
        if after != before:
            changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
            problems.append(f"changed {changed[:5]}")
            before = after
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}\n    {captured.err.strip()[:300]}")
    assert not failures, f"{len(failures)} of {len(cases)} bad inputs:\n" + "\n".join(failures)


def test_quoted_values_are_cut(corpus, capsys):
    """The value a message quotes is at most QUOTE_CHARS characters and '…', whatever its size."""
    root, cases = corpus
    text = next(c for c in cases if c.name == "study: plain text under the size cap")
    assert main(text.argv) == 2
    line = capsys.readouterr().err.strip()
    got = line.split(", got ", 1)[1]
    assert got.endswith("…") and len(got) == QUOTE_CHARS + 1


def test_the_console_shows_one_line_and_no_traceback(corpus):
    """As a user sees it: real processes, their exit codes and their whole stderr."""
    root, cases = corpus
    chosen = ["study: alias bomb", "--resume random bytes", "report: a study with no results"]
    env = {**{k: v for k, v in os.environ.items() if k not in ENV}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    before = snapshot(root)
    for case in (c for c in cases if c.name in chosen):
        proc = subprocess.run([sys.executable, "-m", "study.cli", *case.argv], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert check(case, proc.returncode, proc.stderr) == [], (case.name, proc.stderr[-2000:])
        assert "INFO" not in proc.stderr and "WARNING" not in proc.stderr
    assert snapshot(root) == before
