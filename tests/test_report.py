"""analysis.report on studies recorded through study.tracking in real SQLite stores, study.replicate's planning,
and (slow) the whole path: a real sweep on the session's Ray -> a replication of its best configurations -> the
report, whose HTML is parsed and whose every figure is decoded."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import math
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from PIL import Image

from analysis.load import load_study
from analysis.plots import marginals_figure
from analysis.report import (
    ESTIMATES,
    SECTIONS,
    Section,
    _interval,
    cli_report,
    generalization_summary,
    interaction_table,
    make_report,
    markdown_table,
    relative_paths,
    render_html,
    shown_location,
)
from analysis.sensitivity import interaction, marginals
from mann.train import config_to_flat_dict, make_train_config
from study.replicate import (
    ReplicationError,
    configs_from_file,
    fresh_seeds,
    parse_seeds,
    replication_grid,
    replication_id,
    top_configs,
)
from study.spec import SpecError, load_spec
from study.tracking import (
    TrialTracker,
    finish_study_run,
    prepare_experiment,
    resolve_tracking_uri,
    start_study_run,
)

STUDY = {
    "name": "rep",
    "models": ["ntm", "lstm"],
    "task": "copy",
    "fixed": {"optimizer": "adam", "batch_size": 4, "eval_batches": 1, "gen_scales": [2.0], "task.bits": 3,
              "task.max_length": 2},
    "model_fixed": {"ntm": {"model.memory_size": 8, "model.controller_size": 8, "model.word_size": 4},
                    "lstm": {"model.hidden_size": 8}},
    "search": {"lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True}},
    "budget": {"num_samples": 4, "max_steps": 10, "eval_every": 5, "early_stopping": False},
    "seeds": [0],
    "resources": {"cpu": 1, "gpu": 0},
    "concurrency": 2,
}


def write_study(folder: Path, **changes) -> Path:
    data = {**STUDY, **changes, "results_dir": str(folder / "results")}
    path = folder / f"{data['name']}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Page(html.parser.HTMLParser):
    """What the tests read from a report: section ids, image sources, link targets, visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.links, self.external, self.text = [], [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "a":
            self.links.append(attrs.get("href", ""))
        if tag in ("script", "link") or (tag == "img" and not attrs.get("src", "").startswith("data:")):
            self.external.append(tag)

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def decode_png(src: str) -> np.ndarray:
    """A data: URI -> the PNG's pixels [H, W, C]; fails unless it is a real, non-blank PNG."""
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"
    raw = base64.b64decode(data, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 5, "a blank figure"
    return pixels


def check_report(paths: dict, paper: bool = False) -> Page:
    """Every section present (the paper comparison only for a study with a ``paper`` block), every image a real
    PNG, no external asset; returns the parsed page."""
    page = Page(paths["html"].read_text())
    sections = [(key, title) for key, title in SECTIONS if paper or key != "paper"]
    assert page.sections == [key for key, _ in sections]
    assert [link.lstrip("#") for link in page.links] == page.sections
    assert page.external == []
    for src in page.images:
        decode_png(src)
    assert "could not be made" not in page.words
    markdown = paths["markdown"].read_text()
    for _, title in sections:
        assert f"## {title}" in markdown
    assert len(list(paths["figures"].glob("*.png"))) == len(page.images)
    return page


# ---------------------------------------------------------------------------------------------------- recorded


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An MLflow database with the study's experiment, made once: creating one runs MLflow's schema migrations
    (seconds on a busy 2-core machine); each recorded study starts from a copy."""
    results = tmp_path_factory.mktemp("template")
    prepare_experiment(resolve_tracking_uri(None, results), STUDY["name"])
    return results / "mlflow.db"


def record_study(folder: Path, runs: list[dict], template: Path, finish: bool = True) -> tuple[str, Path]:
    """A study as a sweep records it, written through study.tracking: one TrialTracker per run."""
    study_file = write_study(folder)
    (folder / "results").mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "results" / "mlflow.db")
    uri = resolve_tracking_uri(None, folder / "results")
    exp = prepare_experiment(uri, STUDY["name"])
    parent = start_study_run(uri, exp, STUDY["name"], STUDY, study_file)
    for i, run in enumerate(runs):
        overrides = {**STUDY["fixed"], **STUDY["model_fixed"][run["model"]], "lr": run["lr"], "seed": run["seed"],
                     "max_steps": 30, "eval_every": 10}
        params = config_to_flat_dict(make_train_config(run["model"], "copy", overrides))
        with TrialTracker(uri, exp, parent, f"t{i}", params=params, flush_every=100) as tracker:
            for step, error in zip((10, 20, 30), run["errors"], strict=False):
                tracker.log_metrics({"error": error, "cost_bits": 2 * error, "accuracy": float(error < 0.1),
                                     "train_loss": error / 5, "gen2x_error": 2 * error}, step)
            if run["status"] != "running":
                tracker.set_status(run["status"], step=10 * len(run["errors"]))
    if finish:
        finish_study_run(uri, parent)
    return uri, study_file


def synthetic_runs(seed: int = 0) -> list[dict]:
    """NTM and LSTM over a range of learning rates: error falls with log lr towards 1e-2, NTM better; two seeds."""
    rng = np.random.default_rng(seed)
    runs = []
    for model, base in (("ntm", 0.05), ("lstm", 0.8)):
        for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
            for s in (0, 1):
                final = base + 0.6 * abs(math.log10(lr) + 2) + 0.05 * rng.random()
                runs.append({"model": model, "lr": lr, "seed": s, "errors": [3 * final, 2 * final, final],
                             "status": "completed"})
    runs[2]["status"], runs[2]["errors"] = "stopped_early", runs[2]["errors"][:1]
    runs[13]["status"] = "diverged"
    runs[13]["errors"] = runs[13]["errors"][:2]
    return runs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, template_db):
    folder = tmp_path_factory.mktemp("recorded")
    uri, study_file = record_study(folder, synthetic_runs(), template_db)
    return {"uri": uri, "folder": folder, "study_file": study_file}


@pytest.fixture(scope="module")
def report(recorded):
    return make_report(recorded["uri"], STUDY["name"], recorded["folder"] / "report")


@pytest.mark.slow
def test_report_has_every_section_real_figures_and_its_data(recorded, report):
    page = check_report(report)
    words = page.words
    assert "still running" not in words
    # importance says which trials it used and refuses below its minimum: 18 full-budget runs (one stopped early,
    # one diverged left out) for 2 parameters (lr, model); at the common rung (step 10) all 20 runs count
    assert ("Full budget. On 18 full-budget trials (completed, final error); excluded: diverged 1, stopped_early 1: "
            "not estimated: 18 trials, needs at least 20") in words
    assert "Common rung. On every trial at step 10, the largest step all of them reached (20 trials" in words
    assert "the surrogate explains" in words
    # fANOVA's share with its bootstrap interval at the rung; PED-ANOVA says why it has no number (20 < 100 trials)
    assert "PED-ANOVA: not estimated: 20 trials, needs at least 100 (PED-ANOVA keeps only the top 10% of" in words
    assert "fANOVA share [95% CI]" in words
    assert re.search(r"\| [\d.]+ \[[\d.]+, [\d.]+\] \| not estimated \|", report["markdown"].read_text())
    # every metric label carries its unit; the stability table says n and the denominator counts the stopped run
    assert "median final error (wrong bits per sequence) [95% CI]" in words and "ended runs (n)" in words
    assert "not estimated: 2 runs, needs at least 6" in words  # two seeds per configuration: no median interval
    # arms: ntm vs lstm on the search runs, one Holm family, Kaplan-Meier figure
    assert "Arms compared pairwise on the search runs (20 runs)" in words and "p (Holm-adjusted)" in words
    # the figures of the sections that have data
    names = {p.stem for p in report["figures"].glob("*.png")}
    assert {"status", "success_rate", "learning_curves", "importance", "marginals", "time_to_target"} <= names
    # no results folder known: generalization says why instead of drawing
    assert "Not evaluated: the results folder" in words and "generalization" not in names
    assert "No replication of this study yet" in words
    tidy = pd.read_parquet(report["parquet"])
    pd.testing.assert_frame_equal(tidy, load_study(recorded["uri"], STUDY["name"]), check_dtype=False)
    assert len(pd.read_csv(report["csv"])) == len(tidy)


def test_best_configurations_rank_by_median_over_seeds(report):
    markdown = report["markdown"].read_text()
    best = markdown.split("## Best configurations")[1].split("## ")[0]
    assert "ntm: ntm:" in best and "lstm: lstm:" in best and "over 2 search runs" in best
    rows = [line for line in best.splitlines() if line.startswith("| ntm:")]
    assert "lr=0.01" in rows[0]  # the lr the synthetic errors favour


def test_report_is_logged_to_the_study_run(recorded, report):
    client = mlflow.MlflowClient(recorded["uri"])
    experiment = client.get_experiment_by_name(STUDY["name"])
    parent = client.search_runs([experiment.experiment_id], "tags.`mannstudy.kind` = 'study'")[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.html", "summary.md", "tidy.parquet", "tidy.csv", "figures"} <= logged


@pytest.mark.slow
def test_a_running_study_says_so_at_the_top_and_covers_what_finished(tmp_path, template_db):
    runs = synthetic_runs()[:6]
    runs[5]["status"] = "running"
    uri, _ = record_study(tmp_path, runs, template_db, finish=False)
    paths = make_report(uri, STUDY["name"], tmp_path / "report", log_artifacts=False)
    page = check_report(paths)
    assert page.words.index("is still running (1 runs in progress)") < page.words.index("Overview")
    assert "> **Study rep is still running" in paths["markdown"].read_text()


def test_sections_without_enough_data_say_why_and_draw_nothing(tmp_path, template_db):
    failed = {"model": "ntm", "lr": 1e-3, "seed": 0, "errors": [], "status": "failed"}
    uri, _ = record_study(tmp_path, [failed], template_db)
    paths = make_report(uri, STUDY["name"], tmp_path / "report", log_artifacts=False)
    page = check_report(paths)
    words = page.words
    assert len(page.images) == 1  # the status breakdown: one failed run is data
    for why in ("No completed run with a finite error yet", "No evaluation has a finite error yet",
                "Not computed: 0 completed search run(s)", "Not drawn: 0 completed", "Not checked: 0 completed"):
        assert why in words, why


@pytest.mark.slow
def test_cli_report_finds_a_study_by_file_or_name(recorded, tmp_path, capsys):
    out = tmp_path / "by_name"
    assert cli_report(STUDY["name"], results_dir=str(recorded["folder"] / "results"), out=str(out)) == 0
    assert (out / "report.html").is_file()
    assert cli_report(str(recorded["study_file"]), out=str(tmp_path / "by_file")) == 0
    assert (tmp_path / "by_file" / "summary.md").is_file()
    assert not (recorded["folder"] / "results" / "optuna.db").exists()  # no Optuna record is created by reading
    capsys.readouterr()
    assert cli_report("nope", results_dir=str(tmp_path / "nothing")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mannstudy: ") and "no MLflow database for study 'nope'" in err and err.count("\n") == 1
    assert cli_report(str(tmp_path / "missing.yaml")) == 2


class Tables(html.parser.HTMLParser):
    """Every table of a report: whether it sits in a scrolling box, its header rows, and its body rows' cells."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self._box, self._part = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            self._box.append(attrs.get("class") == "table")
        elif tag == "table":
            self.tables.append({"boxed": bool(self._box and self._box[-1]), "head": [], "body": []})
        elif tag in ("thead", "tbody"):
            self._part = "head" if tag == "thead" else "body"
        elif tag == "tr" and self.tables:
            self.tables[-1][self._part].append([])
        elif tag in ("th", "td") and self.tables:
            self.tables[-1][self._part][-1].append([tag, ""])

    def handle_endtag(self, tag):
        if tag == "div" and self._box:
            self._box.pop()

    def handle_data(self, data):
        rows = self.tables[-1][self._part] if self.tables and self._part else None
        if rows and rows[-1]:
            rows[-1][-1][1] += data.strip()


SNAKE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)+$")


def test_tables_scroll_have_one_header_row_and_headers_a_reader_says(recorded, report):
    text = report["html"].read_text()
    tables = Tables(text).tables
    assert len(tables) >= 6
    for table in tables:
        assert table["boxed"], "a wide table must scroll in its own box, not run off the page"
        assert len(table["head"]) == 1, "one header row (no stray row for a columns' name)"
        header = [cell for _, cell in table["head"][0]]
        for row in table["body"]:
            assert [kind for kind, _ in row] == ["td"] * len(header), "no header cell over an empty column"
            assert not {text for _, text in row} & {"None", "nan", "NaN"}, "no value is an empty cell"
        snake = [h for h in header if SNAKE.match(h)]
        assert not snake, f"raw column names {snake} in {header}"
    # the status tables: per status, and per model with one column per status present
    by_model = next(t for t in tables if [c for _, c in t["head"][0]][:2] == ["model", "completed"])
    assert "stopped early" in [c for _, c in by_model["head"][0]]
    # each compared outcome says what its estimate measures, in what unit
    arms = next(t for t in tables if "estimate is" in [c for _, c in t["head"][0]])
    column = [c for _, c in arms["head"][0]].index("estimate is")
    assert {row[column][1] for row in arms["body"]} == set(ESTIMATES.values())
    # the report's folders appear relative to the results folder, never as this machine's absolute paths
    for written in (text, report["markdown"].read_text()):
        assert str(recorded["folder"]) not in written and "sqlite:////" not in written


def test_paths_are_shown_relative_to_the_results_folder(tmp_path):
    results = tmp_path / "results" / "demo"
    assert shown_location(f"sqlite:///{results}/mlflow.db", str(results)) == "sqlite: mlflow.db"
    assert shown_location(f"sqlite:///{tmp_path}/other/mlflow.db", str(results)) == \
        "sqlite: mlflow.db (outside the results folder)"
    assert shown_location("postgresql://mann:secret@db:5432/mlflow", str(results)) == \
        "postgresql://mann:***@db:5432/mlflow"
    assert shown_location("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000"
    message = f"{results}/trials/t0/checkpoint_000001: not a checkpoint; see {results}"
    assert relative_paths(message, str(results)) == "trials/t0/checkpoint_000001: not a checkpoint; see the " \
                                                    "results folder"


def synthetic_used(lr_range: tuple[float, float]) -> pd.DataFrame:
    """Final rows of NTM and DNC runs at log-uniform learning rates: the NTM near 0.5, the DNC near 0.1."""
    rng = np.random.default_rng(3)
    rows = []
    for model, level in (("ntm", 0.5), ("dnc", 0.1)):
        for i in range(10):
            lr = float(np.exp(rng.uniform(*np.log(lr_range))))
            rows.append({"run_id": f"{model}{i}", "config_id": f"{model}{i // 2}", "seed": i % 2, "model": model,
                         "param.lr": lr, "param.model.read_heads": (1 + i % 2) if model == "dnc" else np.nan,
                         "error": level + 0.05 * rng.random()})
    return pd.DataFrame(rows)


SPACE = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "model.read_heads": CategoricalDistribution([1, 2]),
         "model": CategoricalDistribution(["dnc", "ntm"])}


@pytest.mark.parametrize("lr_range", [(6e-3, 8.5e-3), (1.2e-4, 9e-2)])
def test_marginals_draw_each_model_apart_with_few_readable_log_ticks(lr_range):
    used = synthetic_used(lr_range)
    fig = marginals_figure(marginals(used, SPACE, "error"), "final error (wrong bits per sequence)")
    fig.canvas.draw()
    lr_axes = next(ax for ax in fig.axes if ax.get_xlabel().startswith("lr"))
    # one colour of dots and one median line per model, each line at its own model's level
    colours = {tuple(np.round(c.get_facecolors()[0], 3)) for c in lr_axes.collections}
    assert len(colours) == 2 and len(lr_axes.lines) == 2
    levels = sorted(float(np.median(line.get_ydata())) for line in lr_axes.lines)
    assert levels[0] == pytest.approx(0.125, abs=0.03) and levels[1] == pytest.approx(0.525, abs=0.03)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dnc (n=10)", "ntm (n=10)"]
    # few plain-number tick labels that do not run into each other
    renderer = fig.canvas.get_renderer()
    shown = [t for t in lr_axes.get_xticklabels(minor=False) + lr_axes.get_xticklabels(minor=True)
             if t.get_visible() and t.get_text()]
    assert 2 <= len(shown) <= 6
    for t in shown:
        float(t.get_text())  # "0.006", not "6x10^-3"
    boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:], strict=False)), [t.get_text() for t in shown]


def test_interaction_table_holds_the_median_of_each_cell_and_its_runs():
    used = synthetic_used((1.2e-4, 9e-2))
    table = interaction(used, SPACE, ("model", "lr"), "error", n_bins=2)  # lr bins split at 10^-2.5
    shown = interaction_table(table)
    low, high = (str(c) for c in table.median.columns)
    assert list(shown.columns) == ["model \\ lr", low, high] and list(shown["model \\ lr"]) == ["dnc", "ntm"]
    for _, row in shown.iterrows():
        runs = used[used["model"] == row["model \\ lr"]]
        for column, in_bin in ((low, runs["param.lr"] < 10 ** -2.5), (high, runs["param.lr"] >= 10 ** -2.5)):
            cell = runs.loc[in_bin, "error"]
            assert row[column] == (f"{cell.median():.4g} (n={len(cell)})" if len(cell) else "")


def test_generalization_summary_lists_the_evaluated_conditions_only():
    rows = [("ntm", "length", scale, 0.0, scale, seed, 0.5 * scale + seed, math.nan)
            for scale in (1.0, 2.0) for seed in (0, 1)]
    rows += [("ntm", "noise", 1.0, noise, 1.0, seed, 1.0 + noise, 0.1 * noise)
             for noise in (0.0, 0.1) for seed in (0, 1)]
    table = pd.DataFrame(rows, columns=["model", "axis", "scale", "noise", "memory_factor", "seed", "error",
                                        "noise_floor"])
    summary = generalization_summary(table)
    assert len(summary) == 4  # length x2 and noise x2, not the 2 x 2 x 2 x 2 product of the axes' values
    assert summary.loc[(summary["axis"] == "length") & (summary["scale"] == 2.0), "error"].item() == 1.5
    assert summary.loc[(summary["axis"] == "noise") & (summary["noise"] == 0.1), "noise_floor"].item() == \
        pytest.approx(0.01)


def test_a_paragraphs_strong_words_render_as_html_not_as_asterisks():
    s = Section("paper", "Paper comparison")
    s.text("Verdict: **partly reproduced** for a < b.")
    page = render_html("t", [s], None, "")
    assert "<p>Verdict: <strong>partly reproduced</strong> for a &lt; b.</p>" in page and "**" not in page


def test_intervals_print_step_counts_as_integers():
    assert _interval(1500.0, 1500.0, math.inf) == "1500 [1500, inf]"
    assert _interval(0.08697, 0.01, 0.2) == "0.087 [0.01, 0.2]"
    assert _interval(math.inf, 900.0, math.inf) == "not reached [900, inf]"
    assert _interval(0.0, 0.0, 0.5, math.nan) == "0 [0, 0.5]"  # a why read back from a DataFrame cell
    assert _interval(0.5, math.nan, math.nan, "not estimated: 2 runs") == "0.5 (interval not estimated: 2 runs)"


def test_markdown_table_escapes_and_formats():
    table = markdown_table(pd.DataFrame({"a|b": ["x|y", None], "v": [0.123456789, math.nan]}))
    assert table.splitlines() == ["| a\\|b | v |", "|---|---|", "| x\\|y | 0.1235 |", "|  |  |"]


# ---------------------------------------------------------------------------------------------------- replicate


@pytest.fixture()
def searched(tmp_path):
    """A study file and an Optuna record of its search: two configurations under two seeds, one pruned."""
    study_file = write_study(tmp_path, seeds=[0, 1], budget={**STUDY["budget"], "num_samples": 6})
    spec = load_spec(study_file)
    Path(spec.results_dir).mkdir(parents=True)
    study = optuna.create_study(study_name=spec.name, storage=spec.storage)
    model = optuna.distributions.CategoricalDistribution(["ntm", "lstm"])
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    for params, seed, state, value in [({"model": "ntm", "lr": 1e-3}, 0, "COMPLETE", 0.5),
                                       ({"model": "ntm", "lr": 1e-3}, 1, "COMPLETE", 0.2),
                                       ({"model": "lstm", "lr": 1e-2}, 0, "COMPLETE", 0.3),
                                       ({"model": "lstm", "lr": 1e-2}, 1, "COMPLETE", 0.9),
                                       ({"model": "ntm", "lr": 1e-1}, 0, "PRUNED", None),
                                       ({"model": "lstm", "lr": 1e-4}, 7, "FAIL", None)]:
        study.add_trial(optuna.trial.create_trial(params=params, distributions={"model": model, "lr": lr},
                                                  value=value, state=optuna.trial.TrialState[state],
                                                  user_attrs={"seed": seed}))
    return spec, study


def test_top_configs_rank_distinct_completed_configurations(searched):
    spec, study = searched
    top = top_configs(spec, 5, study)
    assert [c.params for c in top] == [{"model": "ntm", "lr": 1e-3}, {"model": "lstm", "lr": 1e-2}]
    assert [c.label for c in top] == ["c0", "c1"] and top[0].source == "optuna trial 1 (error 0.2)"
    assert len(top_configs(spec, 1, study)) == 1
    with pytest.raises(ReplicationError, match="top_k"):
        top_configs(spec, 0, study)


def test_fresh_seeds_follow_every_seed_the_study_used(searched):
    spec, study = searched
    assert fresh_seeds(spec, 3, study) == [8, 9, 10]  # the failed trial used seed 7
    assert fresh_seeds(spec, 2) == [2, 3]  # the study file's seeds [0, 1] only
    assert parse_seeds("4") == 4 and parse_seeds(3) == 3
    assert parse_seeds("10,12") == [10, 12] and parse_seeds([5]) == [5]
    for bad in ("", "a,b", [1, 1]):
        with pytest.raises(ReplicationError, match="seeds"):
            parse_seeds(bad)


def test_replication_grid_is_every_config_with_every_seed_and_its_id_is_stable(searched):
    spec, study = searched
    configs = top_configs(spec, 2, study)
    grid = replication_grid(configs, [8, 9, 10])
    assert [(g["config"], g["seed"]) for g in grid] == [(0, 8), (0, 9), (0, 10), (1, 8), (1, 9), (1, 10)]
    assert grid[4]["params"] == {"model": "lstm", "lr": 1e-2} and grid[4]["label"] == "c1"
    assert replication_id(grid) == replication_id(replication_grid(configs, [8, 9, 10]))
    assert replication_id(grid) != replication_id(replication_grid(configs, [8, 9]))
    assert replication_id(grid).startswith("rep-")


def test_configs_file_is_checked_against_the_study(searched, tmp_path):
    spec, _ = searched
    good = tmp_path / "configs.yaml"
    good.write_text("configs:\n  - {model: ntm, lr: 1.0e-3}\n  - {model: lstm, lr: 2.0e-3, model.hidden_size: 16}\n")
    configs = configs_from_file(good, spec)
    assert [c.params["model"] for c in configs] == ["ntm", "lstm"] and configs[1].source == "configs.yaml[1]"
    for text, match in [("configs:\n  - {model: ntm, lr: -1}\n", r"configs\[0\]\.lr"),
                        ("configs:\n  - {model: dnc, lr: 0.001}\n", r"configs\[0\]\.model"),
                        ("configs:\n  - {model: ntm, model.hidden_size: 4}\n", r"configs\[0\]\.model\.hidden_size"),
                        ("configs:\n  - {model: ntm, seed: 3}\n", r"configs\[0\]\.seed"),
                        ("configs: []\n", "configs: expected a non-empty list")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SpecError, match=match) as err:
            configs_from_file(bad, spec)
        assert str(err.value).startswith(str(bad))


def test_cli_replicate_refuses_what_cannot_start_before_starting_ray(searched, tmp_path, capsys):
    from study.replicate import cli_replicate

    spec, _ = searched
    assert cli_replicate(spec.source, top_k=1, seeds=2, resume=True) == 2
    assert "--resume: no replication state" in capsys.readouterr().err
    unsearched = write_study(tmp_path / "other", name="other")
    assert cli_replicate(str(unsearched), top_k=1, seeds=2) == 2
    err = capsys.readouterr().err
    assert "study 'other' has no Optuna record" in err and err.count("\n") == 1
    assert not (tmp_path / "other" / "results").exists()  # nothing was created


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sweep_then_replicate_then_report(ray_cluster, tmp_path):
    from study.replicate import run_replication
    from study.sweep import run_sweep

    study_file = write_study(
        tmp_path / "e2e", name="e2e", models=["ntm", "dnc", "lstm"], sampler="grid",
        model_fixed={**STUDY["model_fixed"], "dnc": {"model.memory_size": 8, "model.controller_size": 8,
                                                     "model.word_size": 4, "model.read_heads": 1}},
        search={"lr": {"choices": [3.0e-2, 3.0e-3]}},
        budget={"num_samples": 6, "max_steps": 10, "eval_every": 5, "early_stopping": False},
    )
    out = io.StringIO()  # the progress callback keeps its stream, and Tune pickles it: pytest's is not picklable
    with contextlib.redirect_stdout(out):
        summary = run_sweep(study_file)
        assert summary.counts == {"completed": 6}
        replication = run_replication(study_file, top_k=1, seeds=2)
        assert replication.counts == {"completed": 2} and replication.seeds == [1, 2]
        # the same request again: refused without --resume; resumed, Tune restores it and reruns nothing
        with pytest.raises(ReplicationError, match="already has results"):
            run_replication(study_file, top_k=1, seeds=2)
        resumed = run_replication(study_file, top_k=1, seeds=2, resume=True)
    assert resumed.replication_id == replication.replication_id and resumed.counts == {"completed": 2}
    assert "replicate e2e: 1 configs x 2 seeds [1, 2] = 2 runs to 10 steps" in out.getvalue()
    spec = load_spec(study_file)

    paths = make_report(spec.tracking_uri, spec.name, tmp_path / "report", optuna_storage=spec.storage)
    page = check_report(paths)
    words = page.words
    names = {p.stem for p in paths["figures"].glob("*.png")}
    assert {"status", "generalization", f"replication_{replication.replication_id}"} <= names
    assert f"Replication {replication.replication_id}: 1 configurations x 2 seeds (1, 2); runs: completed 2" in words
    gen = words.split("Generalization")[-1]
    assert "Skipped" not in gen  # every evaluated run's checkpoint was found in Tune's trial folders
    tidy = pd.read_parquet(paths["parquet"])
    assert set(tidy["model"]) == {"ntm", "dnc", "lstm"}
    runs = tidy.drop_duplicates("run_id")
    assert runs["replication"].isna().sum() == 6 and (runs["replication"] == replication.replication_id).sum() == 2
    # each replicated configuration is one of the search's: the same config_id, now with three seeds
    finals = tidy.sort_values("step").groupby("run_id").tail(1)
    per_config = finals.groupby("config_id")["seed"].apply(sorted)
    assert sum(seeds == [0, 1, 2] for seeds in per_config) == 1
