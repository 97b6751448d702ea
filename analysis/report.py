"""``mannstudy report``: one study -> a self-contained HTML report, a Markdown summary and the tidy data.

Outputs in ``out_dir``::

    report.html      every figure inline (base64 PNG), no external file, script or stylesheet
    summary.md       the same sections as text and tables (figures are in figures/)
    figures/*.png    the report's figures
    tidy.parquet     the tidy frame (analysis.tidy) the report was computed from
    tidy.csv         the same, for spreadsheets

and the same files as artifacts of the study's MLflow parent run, under ``report/``.

Sections: overview, best configurations, status breakdown, seed stability, arms compared (models
or replicated configurations pairwise, Holm-adjusted, with Kaplan-Meier time to target),
hyperparameter importance (full budget and common rung: which trials were used, how many, and
"not estimated" below the minimum), marginals, interaction heatmap, boundary check,
generalization of the best configuration per model (from checkpoints; needs the results folder),
replications. A section without enough data says why in words and shows no figure; every metric
label carries its unit (:func:`metric_label`) and every table its n. A study
still running is marked at the top; the report then covers the runs finished so far (running
runs are counted, never analysed).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis import plots
from analysis.load import (
    LoadError,
    OptunaInfo,
    StudyRuns,
    export,
    find_study_runs,
    load_optuna,
    recorded_spec,
    study_space,
    tidy_from_runs,
)
from analysis.tidy import final_rows, params_of, study_target, study_target_setting
from study.record import REPORT_DIR, TAG_RESULTS_DIR

SECTIONS = (
    ("paper", "Paper comparison"),  # only for a study whose file has a ``paper`` block
    ("overview", "Overview"),
    ("best", "Best configurations"),
    ("status", "Status breakdown"),
    ("stability", "Seed stability"),
    ("arms", "Arms compared"),
    ("importance", "Hyperparameter importance"),
    ("marginals", "Marginals"),
    ("interaction", "Interaction"),
    ("boundary", "Boundary check"),
    ("generalization", "Generalization"),
    ("replication", "Replications"),
)
DPI = 100

# Table headers as a reader says them (the analysis functions' snake_case columns), units where they have one.
COLUMN_NAMES = {
    "label": "configuration",
    "param": "parameter",
    "kind": "kind",
    "log": "log scale",
    "n_runs": "runs (n)",
    "n_used": "used by full-budget importance (n)",
    "n_used_at_rung": "used at the common rung (n)",
    "stopped_early": "stopped early",
    "low": "low bound",
    "high": "high bound",
    "bounds": "range from",
    "best_value": "best run's value",
    "best_position": "best run's position (0 = low, 1 = high)",
    "n_top": "top runs (n)",
    "top_median_position": "top runs' median position (0 = low, 1 = high)",
    "at_boundary": "at a bound",
    "axis": "axis",
    "scale": "length (x training difficulty)",
    "noise": "input noise (flip prob. / std)",
    "memory_factor": "memory (x trained slots)",
    "p_holm": "p (Holm-adjusted)",
}


@dataclass
class Section:
    """One report section: paragraphs, tables and figures in order, rendered to HTML and Markdown."""

    key: str
    title: str
    parts: list = field(default_factory=list)  # ("p", text) | ("table", frame, rows) | ("figure", name, png, alt)

    def text(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, frame: pd.DataFrame, max_rows: int = 30) -> None:
        """Add ``frame`` (index not shown) with readable headers: one header row, one name per column."""
        shown = frame.head(max_rows).copy()
        shown.columns = [COLUMN_NAMES.get(str(c), str(c)) for c in shown.columns]  # drops a columns' name too
        self.parts.append(("table", shown, len(frame)))

    def figure(self, name: str, fig: Figure, alt: str) -> None:
        self.parts.append(("figure", name, _png(fig), alt))


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(value) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def html_table(frame: pd.DataFrame) -> str:
    """An HTML table of ``frame`` (index not shown): one header row; numbers right-aligned, text left; no value
    (None, NaN) an empty cell."""
    def cell(value) -> str:
        number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
        return f'<td class="num">{_fmt(value)}</td>' if number else f"<td>{html.escape(_fmt(value))}</td>"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (index not shown)."""
    cols = [str(c) for c in frame.columns]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(esc(_fmt(v)) for v in row) + " |")
    return "\n".join(lines)


def _png(fig: Figure) -> bytes:
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.table { overflow-x: auto; max-width: 100%; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
td { white-space: nowrap; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; vertical-align: bottom; min-width: 4em; max-width: 14em; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.banner { background: #fff3cd; border: 1px solid #e0c36a; padding: 0.6em 1em; border-radius: 4px; }
nav ol { columns: 2; } .muted { color: #666; font-size: 0.9em; }
"""


def _paragraph(text: str) -> str:
    """A paragraph's text as HTML: escaped, with Markdown's **strong** kept (the Markdown summary shows it too)."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def render_html(title: str, sections: Sequence[Section], banner: str | None, subtitle: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", f'<p class="muted">{html.escape(subtitle)}</p>']
    if banner:
        out.append(f'<p class="banner" id="running">{html.escape(banner)}</p>')
    out.append("<nav><ol>" + "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for s in sections)
               + "</ol></nav>")
    for s in sections:
        out.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        for part in s.parts:
            if part[0] == "p":
                out.append(f"<p>{_paragraph(part[1])}</p>")
            elif part[0] == "table":
                frame, total = part[1], part[2]
                out.append(f'<div class="table">{html_table(frame)}</div>')  # a wide table scrolls in its own box
                if total > len(frame):
                    out.append(f'<p class="muted">first {len(frame)} of {total} rows (all in tidy data)</p>')
            else:
                _, name, png, alt = part
                data = base64.b64encode(png).decode("ascii")
                out.append(f'<img alt="{html.escape(alt)}" data-name="{html.escape(name)}" '
                           f'src="data:image/png;base64,{data}">')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(title: str, sections: Sequence[Section], banner: str | None, subtitle: str) -> str:
    out = [f"# {title}", "", subtitle, ""]
    if banner:
        out += [f"> **{banner}**", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for part in s.parts:
            if part[0] == "p":
                out += [part[1], ""]
            elif part[0] == "table":
                out += [markdown_table(part[1]), ""]
                if part[2] > len(part[1]):
                    out += [f"_first {len(part[1])} of {part[2]} rows (all in tidy data)_", ""]
            else:
                out += [f"![{part[3]}](figures/{part[1]}.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# The study's context


@dataclass
class StudyContext:
    """What every section reads: the tidy frame and the facts about the study around it."""

    name: str
    df: pd.DataFrame
    runs: StudyRuns
    optuna: OptunaInfo | None
    metric: str
    direction: str  # minimize | maximize
    results_dir: str | None
    running: bool
    optuna_note: str | None = None  # why the Optuna record is not used, when it was asked for
    space: dict | None = None  # the search space as Optuna distributions: the study file's, else Optuna's
    spec: dict | None = None  # the study as recorded (spec.json), when the record has it
    paper: dict | None = None  # a replication's ``paper`` block (analysis/paper.py): the study file's, else spec's

    @property
    def search(self) -> pd.DataFrame:
        return self.df[self.df["replication"].isna()]

    @property
    def task(self) -> str | None:
        tasks = self.df["task"].dropna().unique() if "task" in self.df else []
        return str(tasks[0]) if len(tasks) == 1 else None

    @property
    def arm_runs(self) -> tuple[pd.DataFrame, str]:
        """The runs arms are compared on: the replications where there are any, else the search; and which."""
        rep = self.df[self.df["replication"].notna()]
        return (rep, "replication runs") if len(rep) else (self.search, "search runs")

    @property
    def target(self) -> float:
        """The study's target (:func:`analysis.tidy.study_target`); 0.1 for a frame that records none."""
        target = study_target(self.df)
        return 0.1 if target is None else target

    @property
    def target_source(self) -> str:
        """Where :attr:`target` comes from, in words."""
        setting = study_target_setting(self.df)  # where self.target's value comes from
        if setting is None:
            return "a default: the runs record no stop_at_error or target_error"
        return {"stop_at_error": "the study's stop_at_error", "target_error": "the task's target_error"}[setting[0]]


def _spec_param(runs: StudyRuns, key: str, default: str) -> str:
    value = runs.parent.data.params.get(key, default)
    try:
        parsed = json.loads(value)
        return parsed if isinstance(parsed, str) else value
    except (TypeError, ValueError):
        return value


def _config_label(model: str, cid: str) -> str:
    return f"{model}:{cid[:6]}"


def _params_text(row: pd.Series) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params_of(row).items())


def _better(direction: str) -> bool:
    return direction == "minimize"


def metric_unit(metric: str, task: str | None) -> str:
    """The unit of ``metric`` for ``task`` (:data:`mann.tasks.METRIC_UNITS`, the bit- or class-task side)."""
    from mann.tasks import TASKS
    from mann.tasks import metric_unit as unit_of

    unit = unit_of(metric)
    if " | " in unit:
        entry = TASKS.get(task or "")
        kind = getattr(entry.task_class, "targets_kind", None) if entry else None
        bits, classes = (u.rsplit(" (", 1)[0] for u in unit.split(" | ", 1))
        unit = bits if kind == "bits" else classes if kind == "classes" else unit
    return unit


def metric_label(ctx: StudyContext, metric: str, prefix: str = "") -> str:
    """``prefix metric (unit)``, e.g. "final error (wrong bits per sequence)": every metric label carries its unit."""
    unit = metric_unit(metric, ctx.task)
    name = f"{prefix} {metric}".strip()
    return f"{name} ({unit})" if unit else name


def _interval(value: float, lo: float, hi: float, why: str | None = None, digits: int = 3) -> str:
    """"v [lo, hi]"; "v (interval not estimated: ...)" when ``why``; "" for no value. A missing ``why`` may come
    as None or, from a DataFrame cell, as NaN."""
    why = why if isinstance(why, str) and why else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return why or ""
    def num(x: float) -> str:  # a count of steps as the integer it is (1500, not 1.5e+03)
        return "inf" if x == math.inf else str(int(x)) if float(x).is_integer() and abs(x) < 1e9 else f"{x:.{digits}g}"

    if value == math.inf:
        return "not reached" + (f" [{num(lo)}, inf]" if math.isfinite(lo) else "")
    if why:
        return f"{num(value)} (interval {why})"
    return f"{num(value)} [{num(lo)}, {num(hi)}]"


# ----------------------------------------------------------------------------------------------------------
# Sections


_OUTCOME_TEXT = {
    "steps": ("steps to convergence", "ratio of median steps, {arm} / {against}"),
    "success": ("runs converged within the budget", "difference of rates, {arm} - {against}"),
}


def _outcome_text(outcome: str) -> tuple[str, str]:
    if outcome in _OUTCOME_TEXT:
        return _OUTCOME_TEXT[outcome]
    return (outcome.replace("_", " "), "Cliff's delta of " + outcome.replace("_", " ") + ", {arm} vs {against}")


def study_cost(ctx: StudyContext) -> dict[str, float]:
    """Trials, training steps, the sweep's wall time (hours) and the trials' CPU core-hours.

    Wall: the study run's start to its end (to now while it runs). Core-hours: each trial run's wall
    time times the CPUs it held (the study's ``resources.cpu``), summed: what a cluster would bill.
    """
    import time

    cpu = float(((ctx.spec or {}).get("resources") or {}).get("cpu") or 1.0)
    info = ctx.runs.parent.info
    end = info.end_time or time.time() * 1000
    trial_s = sum(((r.info.end_time or end) - r.info.start_time) / 1000 for r in ctx.runs.trials if r.info.start_time)
    steps = float(final_rows(ctx.df)["step"].sum()) if len(ctx.df) else 0.0
    return {"trials": len(ctx.runs.trials), "steps": steps, "wall_hours": (end - info.start_time) / 3.6e6,
            "core_hours": cpu * trial_s / 3600}


def paper_section(ctx: StudyContext) -> Section:
    from analysis.paper import arm_summary, compare_claims, paper_verdict, survival_by_arm

    paper = ctx.paper or {}
    s = Section("paper", "Paper comparison")
    verdicts = compare_claims(ctx.df, paper)
    s.text(f"{paper.get('cite', '')}. Verdict: **{paper_verdict(verdicts)}**" + (
        " (the study is still running: a provisional verdict)." if ctx.running else "."))
    rows = []
    for claim, v in zip(paper.get("claims") or (), verdicts, strict=True):  # one verdict per claim, in order
        what, scale = _outcome_text(v.outcome)
        ours = _interval(v.estimate, v.lo, v.hi) if math.isfinite(v.estimate) else "not estimated"
        rows.append({"claim": v.claim, "verdict": v.verdict,  # what a reader looks for first, before the scroll
                     "ours": f"{ours}: {scale.format(arm=v.arm, against=v.against)} ({what}; n = {v.n_arm} and "
                             f"{v.n_against})",
                     "p (Holm)": _fmt(v.p_holm), "because": v.why,
                     "expected": "" if v.expected is None else f"{v.expected:g}", "paper": claim.get("reported", "")})
    s.table(pd.DataFrame(rows))
    s.text("How to read it: a claim is reproduced when our difference is significant in the paper's direction "
           "(Holm-adjusted p < 0.05 over the claims) and the paper's figure, where it gives one, lies inside our "
           "95% interval; partly reproduced when the direction holds but the size does not; inconclusive when "
           "the direction holds without significance at this n; not reproduced otherwise. Steps to convergence: "
           "the first of the stop_after_evals consecutive evaluations at or below the study's stop_at_error; a run "
           "that never converged (its budget spent, stopped early, diverged) is censored at its last step "
           "(Kaplan-Meier, log-rank test, ratio of medians with a bootstrap interval). The arm a claim is set "
           "against is the best of those it names.")
    batch = ((ctx.spec or {}).get("fixed") or {}).get("batch_size")
    summary = arm_summary(ctx.df, paper)
    shown = pd.DataFrame({
        "arm": summary["arm"], "runs": summary["runs"],
        "converged [95% CI of the rate]": [
            f"{int(k)}/{n} [{lo:.2f}, {hi:.2f}]" if n else "no runs"
            for k, n, lo, hi in zip(summary["converged"].fillna(0), summary["runs"], summary["rate lo"],
                                    summary["rate hi"], strict=True)],
        "median steps to convergence [95% CI]": [
            _interval(m, lo, hi) if n else "" for m, lo, hi, n in zip(
                summary["median steps"], summary["steps lo"], summary["steps hi"], summary["runs"], strict=True)],
    })
    if batch:
        shown[f"median sequences (x {int(batch)})"] = [
            f"{m * int(batch):,.0f}" if math.isfinite(m) else "not reached" if n else ""
            for m, n in zip(summary["median steps"].fillna(math.inf), summary["runs"], strict=True)]
    s.table(shown)
    curves = survival_by_arm(ctx.df, paper)
    if curves:
        s.figure("paper_convergence", plots.survival_figure(curves, ctx.name, "training steps"),
                 "steps to convergence per arm: Kaplan-Meier curves with 95% bands")
    cost = study_cost(ctx)
    s.text(f"Cost: {cost['trials']} trials, {cost['steps']:,.0f} training steps, {cost['wall_hours']:.2f} h wall, "
           f"{cost['core_hours']:.2f} CPU core-hours (trial wall time x CPUs per trial).")
    return s


def overview_section(ctx: StudyContext) -> Section:
    s = Section("overview", "Overview")
    finals = final_rows(ctx.df) if len(ctx.df) else ctx.df
    description = _spec_param(ctx.runs, "description", "")
    if description:
        s.text(description)
    models = ", ".join(sorted(finals["model"].unique())) if len(finals) else "none"
    tasks = ", ".join(sorted(finals["task"].unique())) if len(finals) and "task" in finals else "unknown"
    n_search = int(finals["replication"].isna().sum()) if len(finals) else 0
    n_rep = len(finals) - n_search
    s.text(f"Study {ctx.name}: {n_search} search runs and {n_rep} replication runs of {models} on {tasks}. "
           f"Objective: {metric_label(ctx, ctx.metric, 'final')}, {ctx.direction}d. Target: error at most "
           f"{ctx.target:g} ({ctx.target_source}).")
    s.text("error is measured at the task's full training difficulty (its longest sequences, most items or "
           "nodes), whatever a run's curriculum reached, on held-out sequences fixed by the evaluation seed: every "
           "run is scored on the same task. Final values are the end-of-run evaluation on 640 held-out sequences "
           "where a run logged one (final_error), else its last evaluation. Success and steps to target have one "
           "definition: a run reaches the target at the first of stop_after_evals (default 2) consecutive "
           "evaluations with error at most the target, as training's convergence stop counts; a run that never "
           "got there (its budget spent, stopped early, diverged) is censored at its last step and counts as not "
           "successful.")
    if ctx.optuna is not None:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(ctx.optuna.states.items()))
        s.text(f"Optuna record: {states or 'no trials'}.")
    elif ctx.optuna_note:
        s.text(f"Optuna record not used ({ctx.optuna_note}).")
    where = (f"Results folder: {Path(ctx.results_dir).name}/ (paths below are relative to it). "
             if ctx.results_dir else "Results folder: unknown (generalization needs it). ")
    s.text(where + f"MLflow: {shown_location(ctx.runs.tracking_uri, ctx.results_dir)}, study run "
           f"{ctx.runs.parent.info.run_id}.")
    return s


def shown_location(uri_or_path: str, results_dir: str | None) -> str:
    """A tracking URI or path as the report prints it: relative to the results folder, never the absolute path of
    the machine the report was made on. A SQLite file elsewhere shows its name; a server's URI, its password
    masked."""
    from study.redact import redact

    text = str(uri_or_path)
    path = text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text if "://" not in text else None
    if path is None:
        return redact(text)
    scheme = "sqlite: " if text.startswith("sqlite:///") else ""
    if results_dir and "://" not in results_dir:
        try:
            return scheme + Path(os.path.abspath(path)).relative_to(os.path.abspath(results_dir)).as_posix()
        except ValueError:
            pass
    return scheme + Path(path).name + (" (outside the results folder)" if results_dir else "")


def relative_paths(text: str, results_dir: str | None) -> str:
    """``text`` with the results folder's absolute path (as given and as resolved) cut from every path in it."""
    if not results_dir or "://" in results_dir:
        return text
    for root in dict.fromkeys((os.path.abspath(results_dir), str(Path(results_dir).resolve()))):
        text = text.replace("sqlite:///" + root + os.sep, "sqlite: ").replace(root + os.sep, "")
        text = text.replace(root, "the results folder")
    return text


def best_section(ctx: StudyContext) -> Section:
    from analysis.stability import rank_configurations

    s = Section("best", "Best configurations")
    ranked = rank_configurations(ctx.df, ctx.target, ctx.metric, ctx.direction)
    if ranked.empty:
        s.text(f"No completed run with a finite {ctx.metric} yet: nothing to rank "
               f"({ctx.df['run_id'].nunique()} runs, none finished its budget).")
        return s
    s.text(f"Configurations ranked per model by the median {metric_label(ctx, ctx.metric, 'final')} of their "
           "completed runs. A configuration with replications is judged on its replication runs only (the search "
           "run that selected it is left out: it was chosen for looking best), and where a model has replicated "
           "configurations only those compete. Ties go to the better configuration: higher success rate (runs "
           "that reached the target, over every ended run: success k/n), then lower mean, then more runs.")
    finals = final_rows(ctx.df).drop_duplicates("config_id").set_index("config_id")
    table = pd.DataFrame({
        "config": ranked["label"], "model": ranked["model"], "judged on": ranked["source"],
        "runs (n)": ranked["runs"], f"median {metric_label(ctx, ctx.metric, 'final')}": ranked["median"],
        f"mean {metric_label(ctx, ctx.metric, 'final')}": ranked["mean"],
        "success k/n": [f"{k}/{n}" for k, n in zip(ranked["n_success"], ranked["n_runs"], strict=True)],
        "params": [_params_text(finals.loc[c]) for c in ranked["config_id"]],
    })
    best = table[ranked["rank"] == 0]
    median = f"median {metric_label(ctx, ctx.metric, 'final')}"
    s.text("Best per model: " + "; ".join(f"{r['model']}: {r['config']} ({median} {_fmt(r[median])} over "
                                          f"{r['runs (n)']} {r['judged on']} runs)" for _, r in best.iterrows()) + ".")
    s.table(table, max_rows=15)
    return s


def status_section(ctx: StudyContext) -> Section:
    from analysis.sensitivity import status_table

    s = Section("status", "Status breakdown")
    table = status_table(ctx.df, ctx.metric)
    if table["n_runs"].sum() == 0:
        s.text("No runs recorded yet.")
        return s
    s.text("Runs per status. Completed runs used their whole budget; stopped-early runs were stopped by "
           "ASHA; diverged runs hit NaN/Inf (counted as outcomes of their configuration); failed runs raised; "
           "running runs had not finished when this report was made.")
    finals = final_rows(ctx.df)
    by_model = pd.crosstab(finals["model"], finals["status"]).reset_index()
    s.table(table)
    s.table(by_model)
    s.figure("status", plots.status_figure(table), "runs per status")
    return s


def _stability_table(ctx: StudyContext, table: pd.DataFrame, name: str = "label") -> pd.DataFrame:
    """seed_stability rows as a readable table: each statistic with its interval, n beside it."""
    steps = "median steps to target (optimizer updates) [95% CI]"
    return pd.DataFrame({
        name: table[name],
        "ended runs (n)": table["n_runs"],
        "success k/n": [f"{k}/{n}" for k, n in zip(table["n_success"], table["n_runs"], strict=True)],
        "success rate [95% CI]": [_interval(v, lo, hi) for v, lo, hi in
                                  zip(table["success_rate"], table["success_rate_lo"], table["success_rate_hi"],
                                      strict=True)],
        f"median final error ({metric_unit('error', ctx.task)}) [95% CI]": [
            _interval(v, lo, hi, why) for v, lo, hi, why in
            zip(table["median_error"], table["median_error_lo"], table["median_error_hi"], table["median_error_why"],
                strict=True)],
        "completed (n)": table["n_final"],
        steps: [_interval(v, lo, hi) for v, lo, hi in
                zip(table["median_steps_to_target"], table["median_steps_to_target_lo"],
                    table["median_steps_to_target_hi"], strict=True)],
        "stopped early (censored)": table["n_stopped_early"],
        "diverged": table["n_diverged"],
        "failed (left out)": table["n_failed"],
    })


STABILITY_TEXT = (
    "Every run that ended counts: the denominator n of each rate is the completed, diverged and stopped-early "
    "runs; a run stopped by ASHA before it reached the target counts as not successful and as censored at its "
    "last step, never dropped. Failed runs (an exception) are counted apart. Intervals: Wilson for rates; the "
    "exact order-statistic interval for a median error (needs 6 runs at 95%); Kaplan-Meier with the "
    "Brookmeyer-Crowley interval for the median steps to target (inf: fewer than half are known to reach the "
    "target, or the data cannot bound it)."
)


def stability_section(ctx: StudyContext) -> Section:
    from analysis.stability import learning_curves, seed_stability

    s = Section("stability", "Seed stability")
    if not np.isfinite(ctx.df["error"].astype(float)).any():
        s.text("No evaluation has a finite error yet: no stability to measure.")
        return s
    table = seed_stability(ctx.df, ctx.target, "error")
    ended = table[table["n_runs"] > 0]
    if ended.empty:
        s.text("No configuration has an ended run (completed, diverged or stopped early) yet.")
        return s
    replicated = int((ended["n_runs"] >= 2).sum())
    s.text(f"Per configuration over its seeds (search and replications): success (reached error <= {ctx.target:g}), "
           f"median final error, steps to target. {STABILITY_TEXT} {replicated} of {len(ended)} configurations ran "
           "with two or more seeds" + ("" if replicated else
                                       ": more seeds need seeds [0, 1, ...] in the study file or `mannstudy "
                                       "replicate`") + ".")
    shown = ended.sort_values(["success_rate", "median_error"], ascending=[False, True], kind="stable")
    s.table(_stability_table(ctx, shown.reset_index(drop=True)), max_rows=20)
    s.figure("success_rate", plots.success_rate_figure(ended), "success rate per configuration with its interval")
    curves = learning_curves(ctx.df, "error")
    if len(curves):
        s.figure("learning_curves", plots.learning_curves_figure(curves, metric_label(ctx, "error"), ctx.target),
                 "learning curves: median over seeds with quantile band")
    return s


def arms_section(ctx: StudyContext) -> Section:
    from analysis.stability import compare_arms, seed_stability, survival_curves

    s = Section("arms", "Arms compared")
    runs, which = ctx.arm_runs
    arms = [("model", "model")] if runs["model"].nunique() > 1 else []
    if which == "replication runs" and runs["config_id"].nunique() > 1:
        arms.append(("label", "replicated configuration"))
    if not arms:
        s.text("One arm only (one model" + (", no replicated configurations" if which == "search runs" else "")
               + "): nothing to compare.")
        return s
    runs = runs.assign(label=[f"{m}:{c[:6]}" for m, c in zip(runs["model"], runs["config_id"], strict=True)])
    s.text(f"Arms compared pairwise on the {which} ({runs['run_id'].nunique()} runs). {STABILITY_TEXT} Success "
           "rates: difference with Newcombe's interval and Boschloo's exact test. Final error: Cliff's delta "
           "(P(a > b) - P(a < b); negative: arm a has lower errors) with its interval and the Mann-Whitney test; "
           "a diverged run ranks worst, a stopped one is left out (its final evaluation is of fewer steps). Steps "
           "to target: ratio of the Kaplan-Meier medians and the log-rank test. All p-values of one table form one "
           "family, Holm-adjusted (p Holm-adjusted).")
    for column, what in arms:
        summary = seed_stability(runs, ctx.target, "error", by=(column,))
        s.text(f"Per {what}:")
        s.table(_stability_table(ctx, summary, column))
        table = compare_arms(runs, ctx.target, column, "error")
        if len(table):
            shown = table.rename(columns={"arm_a": f"{what} a", "arm_b": f"{what} b", "n_a": "runs a (n)",
                                          "n_b": "runs b (n)", "estimate": "estimate (a vs b)",
                                          "lo": "95% CI lo", "hi": "95% CI hi", "why": "not estimated"})
            shown.insert(3, "estimate is", shown["outcome"].map(ESTIMATES).fillna(""))
            s.table(shown, max_rows=60)
            found = table[table["p_holm"] < 0.05]
            s.text(f"{len(found)} of {int(table['p'].notna().sum())} comparisons differ at Holm-adjusted p < 0.05"
                   + (": " + "; ".join(f"{r['arm_a']} vs {r['arm_b']} on {r['outcome']}"
                                       for _, r in found.iterrows()) if len(found) else "") + ".")
        if column == "model":
            s.figure("time_to_target", plots.survival_figure(survival_curves(runs, ctx.target, column), ctx.name),
                     "time to target per model: Kaplan-Meier curves with 95% bands")
    return s


# What compare_arms' estimate measures, per outcome (its unit).
ESTIMATES = {
    "success rate": "difference of rates a - b (fraction)",
    "final error": "Cliff's delta (-1 to 1; < 0: a lower)",
    "steps to target": "ratio of median steps a / b",
}


@dataclass
class _Sensitivity:
    result: object | None  # analysis.sensitivity.Sensitivity, or None with the reason in ``why``
    why: str | None


def _sensitivity(ctx: StudyContext) -> _Sensitivity:
    from analysis.sensitivity import hyperparameter_sensitivity, select_at_rung, select_trials
    from analysis.tidy import param_columns

    search = ctx.search
    if search.empty:
        return _Sensitivity(None, "no search runs recorded yet")
    selection = select_trials(search, ctx.metric)
    rung = select_at_rung(search, ctx.metric)
    if max(selection.n_used, rung.n_used) < 2:
        return _Sensitivity(None, f"{selection.n_used} completed search run(s) with a finite {ctx.metric} "
                                  f"({_excluded_text(selection)}) and {rung.n_used} at a common step; "
                                  "a sensitivity needs at least 2")
    trials = selection.used if selection.n_used >= 2 else rung.used
    if not param_columns(trials) and trials["model"].nunique() < 2:
        return _Sensitivity(None, "no hyperparameter (nor the model) varies among the search runs")
    try:
        result = hyperparameter_sensitivity(search, ctx.metric, ctx.direction, distributions=ctx.space)
    except Exception as err:  # an evaluator that cannot fit these trials must not sink the whole report
        return _Sensitivity(None, f"the analysis failed on these trials ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:200]})")
    return _Sensitivity(result, None)


def _excluded_text(selection) -> str:
    if not selection.excluded:
        return "none excluded"
    return "excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(selection.excluded.items()))


def _importance_text(ctx: StudyContext, imp) -> str:
    n = imp.selection.n_used
    what = (f"{n} full-budget trials (completed, final {ctx.metric})" if imp.selection.step is None else
            f"every trial at step {imp.selection.step}, the largest step all of them reached ({n} trials, "
            f"{ctx.metric} at that step)")
    head = f"On {what}; {_excluded_text(imp.selection)}: "
    if not imp.estimated:
        return head + imp.why + "."
    above = [p for p in imp.table.index if bool(imp.table.loc[p, "above_noise"])]
    lo, hi = imp.explained_ci
    evaluators = "".join(f" {EVALUATOR_NAMES.get(e, e)}: {why}." for e, why in imp.evaluator_why.items())
    return (head + f"the surrogate explains {imp.explained:.2f} of the variance [{lo:.2f}, {hi:.2f}] "
            f"({imp.n_boot} bootstrap refits); above noise (interval excludes 0): "
            + (", ".join(above) if above else "no parameter") + "." + evaluators)


EVALUATOR_NAMES = {"fanova": "fANOVA", "ped_anova": "PED-ANOVA"}


def _share(value: float, lo: float, hi: float, why: str | None) -> str:
    """An evaluator's share with its interval; "not estimated" (the sentence is in the text) or "not rated"."""
    if why:
        return "not estimated"
    if not math.isfinite(value):
        return "not rated"  # e.g. fANOVA and a conditional parameter
    return _interval(value, lo, hi) if math.isfinite(lo) and math.isfinite(hi) else f"{value:.3g}"


def importance_table_shown(imp) -> pd.DataFrame:
    """An Importance's table as the report shows it: each evaluator's share with its 95% interval in one column."""
    from analysis.sensitivity import EVALUATORS

    table = imp.table.copy()
    for e in [e for e in EVALUATORS if e in table]:
        why = imp.evaluator_why.get(e)
        table[e] = [_share(v, lo, hi, why) for v, lo, hi in zip(table[e], table[f"{e}_lo"], table[f"{e}_hi"],
                                                                 strict=True)]
        table = table.drop(columns=[f"{e}_lo", f"{e}_hi"])
    return table.reset_index().rename(columns={
        "n": "trials with it (n)", "importance": "importance (fraction of variance)",
        "importance_lo": "95% CI lo", "importance_hi": "95% CI hi", "above_noise": "above noise",
        "fanova": "fANOVA share [95% CI]", "ped_anova": "PED-ANOVA share [95% CI]", "rank_corr": "rank corr.",
        "abs_rank_corr": "|rank corr.|"})


def importance_section(ctx: StudyContext, sens: _Sensitivity) -> Section:
    from analysis.sensitivity import MIN_TRIALS, N_REFITS, TRIALS_PER_PARAM, ped_anova_min_trials

    s = Section("importance", "Hyperparameter importance")
    if sens.result is None:
        s.text(f"Not computed: {sens.why}.")
        return s
    r = sens.result
    s.text("Importance = the fraction of the objective's variance a hyperparameter carries: half the increase "
           "of a random-forest surrogate's error on left-out trials when that parameter is shuffled, with a 95% "
           "bootstrap interval over trials (the surrogate is refitted on each resample). Estimated only from "
           f"max({MIN_TRIALS}, {TRIALS_PER_PARAM} x searched parameters) trials. fANOVA and PED-ANOVA (Optuna) "
           "are shares of what their model explains, summing to 1: read them as a ranking, not as a size; each "
           f"with a 95% bootstrap interval over trials ({N_REFITS} refits on resampled trials). fANOVA needs the "
           f"same minimum, PED-ANOVA at least {ped_anova_min_trials()} trials (it keeps only the top 10%). "
           "Replication runs are left out.")
    if not r.space_known:
        s.text("Search space: not recorded with the study; ranges are the values seen, on a linear scale.")
    for imp in (r.full, r.rung):
        s.text(("Full budget. " if imp.selection.step is None else "Common rung. ") + _importance_text(ctx, imp))
    noise = r.seed_noise
    if noise.why is None:
        s.text(f"Seed noise: reseeding one configuration accounts for {noise.share:.2f} of the full-budget "
               f"variance [{noise.ci[0]:.2f}, {noise.ci[1]:.2f}] ({noise.n_configs} configurations with several "
               "seeds, one-way random effects): no hyperparameter can explain that part, so set it against the "
               "surrogate's explained variance (together they approach 1 when the surrogate explains what there "
               "is to explain), not against the fANOVA / PED-ANOVA shares.")
    else:
        s.text(f"Seed noise: {noise.why}.")
    for imp in (r.full, r.rung):
        if imp.estimated and len(imp.table):
            table = importance_table_shown(imp)
            table.insert(0, "trials", imp.basis)
            s.table(table)
    if r.full.estimated or r.rung.estimated:
        s.figure("importance", plots.importance_figure([r.full, r.rung], seed_noise=r.seed_noise),
                 "hyperparameter importance with bootstrap intervals")
    used = ", ".join(r.selection.run_ids[:50])
    s.text(f"Full-budget run ids: {used}" + (" ..." if r.selection.n_used > 50 else "") + ".")
    return s


def marginals_section(ctx: StudyContext, sens: _Sensitivity) -> Section:
    s = Section("marginals", "Marginals")
    if sens.result is None:
        s.text(f"Not drawn: {sens.why}.")
        return s
    shown = [m for m in sens.result.marginals if not m.points.empty]
    if not shown:
        s.text("Not drawn: no used trial has a searched hyperparameter.")
        return s
    s.text(f"{metric_label(ctx, ctx.metric, 'final').capitalize()} against each hyperparameter (most important "
           "first), one colour per model: every full-budget run as a dot; per model, the median of the runs in each "
           "bin of the parameter's range as a line (a point with its interquartile whisker per choice). Models are "
           "drawn apart: their levels differ, and one line through both would follow the mix of models in each bin.")
    s.figure("marginals", plots.marginals_figure(sens.result.marginals, metric_label(ctx, ctx.metric, "final")),
             "objective per hyperparameter")
    return s


def interaction_section(ctx: StudyContext, sens: _Sensitivity) -> Section:
    s = Section("interaction", "Interaction")
    if sens.result is None:
        s.text(f"Not drawn: {sens.why}.")
        return s
    table = sens.result.interaction
    if table is None or table.median.isna().all().all():
        s.text("Not drawn: full-budget importance did not rate two hyperparameters (not estimated, or fewer than "
               "two with a positive importance).")
        return s
    a, b = table.params
    label = metric_label(ctx, ctx.metric, "final")
    s.text(f"Median {label} over bins of the two most important hyperparameters, {a} (rows) and {b} (columns); "
           "each bin is labelled by its centre. Empty cells: no run.")
    s.figure("interaction", plots.interaction_figure(table, label), f"{a} x {b}")
    s.text(f"The same cells as numbers: median {label} (runs in the cell).")
    s.table(interaction_table(table))
    return s


def interaction_table(table) -> pd.DataFrame:
    """An Interaction as a table of "median (n=count)" cells: rows the bins of params[0], columns params[1]'s."""
    a, b = table.params
    cells = {str(col): [f"{_fmt(m)} (n={int(n)})" if n else "" for m, n in
                        zip(table.median[col], table.count[col], strict=True)] for col in table.median.columns}
    return pd.DataFrame({f"{a} \\ {b}": [str(i) for i in table.median.index], **cells})


def boundary_section(ctx: StudyContext, sens: _Sensitivity) -> Section:
    s = Section("boundary", "Boundary check")
    if sens.result is None:
        s.text(f"Not checked: {sens.why}.")
        return s
    table = sens.result.boundary
    if table.empty:
        s.text("Not checked: no numeric hyperparameter was searched.")
        return s
    flagged = table[table["at_boundary"] != ""]
    if len(flagged):
        s.text("At a boundary: " + ", ".join(f"{r['param']} ({r['at_boundary']} end of the {r['bounds']} range)"
                                              for _, r in flagged.iterrows())
               + ". Most of the best runs sit there: the optimum may lie outside the range; widen it.")
    else:
        s.text("No numeric hyperparameter has most of the best runs at an end of its range.")
    s.table(table)
    return s


def generalization_figure(table: pd.DataFrame, target: float | None = None, unit: str = "") -> Figure:
    """Error against test length, input noise and memory size: per model the median over seeds, band = min..max."""
    import seaborn as sns

    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, squeeze=True)
    panels = (("length", "scale", "test length (x training difficulty)"),
              ("noise", "noise", "input noise (flip prob. / std)"),
              ("memory", "memory_factor", "memory (x trained slots)"))
    models = sorted(table["model"].unique())
    colors = dict(zip(models, sns.color_palette("colorblind", len(models)), strict=True))
    for ax, (axis, x, label) in zip(axes, panels, strict=True):
        rows = table[table["axis"] == axis]
        if rows.empty:
            plots.no_data(ax, f"{axis} not evaluated")
            continue
        for model in models:
            g = rows[rows["model"] == model].groupby(x)["error"]
            if not len(g):
                continue
            stats = g.agg(["median", "min", "max", "count"]).reset_index()
            n = int(rows[rows["model"] == model]["seed"].nunique())
            ax.plot(stats[x], stats["median"], marker="o", color=colors[model], label=f"{model} (n={n})")
            ax.fill_between(stats[x], stats["min"], stats["max"], color=colors[model], alpha=0.2, linewidth=0)
        if axis == "noise" and rows["noise_floor"].notna().any():
            floor = rows.groupby(x)["noise_floor"].median()
            ax.plot(floor.index, floor.to_numpy(), color="grey", linestyle=":", label="noise floor (copying the noise)")
            ax.legend(handles=ax.get_lines()[-1:], fontsize="small")
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=1)
        ax.set(xlabel=label, ylabel=f"error ({unit})" if unit else "error")
        if axis == "memory":
            scale = rows["scale"].iloc[0]
            ax.set_title(f"at {scale:g}x length", fontsize="small")
    axes[0].legend(fontsize="small")
    return fig


def generalization_section(ctx: StudyContext, **kwargs) -> Section:
    from analysis.generalization import evaluate_study

    s = Section("generalization", "Generalization")
    if not ctx.results_dir or ("://" not in ctx.results_dir and not Path(ctx.results_dir).is_dir()):
        where = " (the folder recorded with the study is not on this machine)" if ctx.results_dir else ""
        s.text(f"Not evaluated: the results folder with the trials' checkpoints is not available{where}; "
               "pass --results-dir.")
        return s
    result = evaluate_study(ctx.df, ctx.results_dir, "error", **kwargs)
    if result.runs.empty:
        s.text("Not evaluated: no completed run (a model is evaluated from the completed runs of its best "
               "configuration).")
        return s
    absent = sorted(set(ctx.df["model"]) - set(result.runs["model"]))
    if result.missing:
        s.text("Skipped (no usable checkpoint): " + "; ".join(f"{k}: {v}" for k, v in result.missing.items()) + ".")
    if result.table.empty:
        s.text("Not evaluated: none of the best runs has a checkpoint in the results folder.")
        return s
    kinds = ", ".join(sorted(result.table["noise_kind"].unique()))
    s.text("The best configuration of each model (as in Best configurations: judged on its replication runs where "
           "it has any), each seed's last "
           "checkpoint evaluated on: longer sequences than trained (scale s: sizes beyond the training range "
           "up to s times it; memory grows with s as in training's own generalization metrics), corrupted inputs "
           f"({kinds}: data bits flipped with the given probability before the first scored step, or Gaussian "
           "noise of the given std), and a larger memory at the longest length. Lines: median over seeds; "
           "band: min to max.")
    if absent:
        s.text("No completed run to evaluate for: " + ", ".join(absent) + ".")
    s.figure("generalization", generalization_figure(result.table, ctx.target, metric_unit("error", ctx.task)),
             "error against length, noise, memory")
    unit = metric_unit("error", ctx.task)
    s.text(f"Error in {unit}, median over the evaluated seeds. Input noise: noise floor = the error that copying "
           "the noise would give (flip probability x scored bits per sequence), beside the model's error; a model "
           "at its floor reproduces its corrupted input faithfully. Gaussian noise (class tasks) has no such floor.")
    summary = generalization_summary(result.table)
    summary = summary.rename(columns={"error": f"median error ({unit})", "noise_floor": f"noise floor ({unit})"})
    s.table(summary, max_rows=60)
    return s


def generalization_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and evaluated condition (axis, scale, noise, memory factor): the median error and noise floor
    over seeds. Only the conditions evaluated: not every combination of the values the three axes took."""
    summary = table.pivot_table(index=["model", "axis", "scale", "noise", "memory_factor"],
                                values=["error", "noise_floor"], aggfunc="median", dropna=False).reset_index()
    return summary[summary["error"].notna()].reset_index(drop=True)


def replication_figure(rep: pd.DataFrame, search_best: dict[str, float], metric: str, target: float,
                       unit: str = "") -> Figure:
    """Final metric of every replication run per configuration (dots) with the search's value (cross)."""
    fig = Figure(figsize=(6.4, max(2.6, 0.5 * rep["label"].nunique() + 1.4)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = list(dict.fromkeys(rep["label"]))
    for i, label in enumerate(labels):
        values = rep.loc[rep["label"] == label, metric].astype(float)
        jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
        ax.scatter(values, np.full(len(values), i) + jitter, s=18, alpha=0.7, color="#4c72b0",
                   label="replication runs" if i == 0 else None)
        if label in search_best and np.isfinite(search_best[label]):
            ax.scatter([search_best[label]], [i], marker="x", s=70, color="#d62728",
                       label="search" if i == 0 else None)
    ax.axvline(target, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.set(xlabel=f"final {metric}" + (f" ({unit})" if unit else ""),
           title="Replications: each seed's final value vs the search's")
    ax.legend(fontsize="small")
    return fig


def _replication_seed_noise(runs: pd.DataFrame):
    from analysis.sensitivity import seed_noise, select_trials

    return seed_noise(select_trials(runs, "error").used, "error")


def replication_section(ctx: StudyContext) -> Section:
    from analysis.stability import seed_stability

    s = Section("replication", "Replications")
    rep_df = ctx.df[ctx.df["replication"].notna()]
    if rep_df.empty:
        s.text("No replication of this study yet (`mannstudy replicate FILE --top K --seeds S` re-runs the K best "
               "configurations with S fresh seeds to full budget).")
        return s
    search_finals = final_rows(ctx.search) if len(ctx.search) else ctx.search
    for rid, runs in rep_df.groupby("replication", sort=True):
        finals = final_rows(runs)
        counts = ", ".join(f"{k} {v}" for k, v in finals["status"].value_counts().sort_index().items())
        s.text(f"Replication {rid}: {finals['config_id'].nunique()} configurations x "
               f"{finals['seed'].nunique()} seeds ({', '.join(str(x) for x in sorted(finals['seed'].unique()))}); "
               f"runs: {counts}.")
        table = seed_stability(runs, ctx.target, "error")
        if (table["n_runs"] > 0).sum() == 0:
            s.text("No replication run has ended yet.")
            continue
        s.text("Statistics over the replication runs only: the search run that selected a configuration is shown "
               "beside them (search error), never pooled with them. " + STABILITY_TEXT)
        search_value = {}
        for _, row in table.iterrows():
            same = search_finals[(search_finals["config_id"] == row["config_id"])
                                 & (search_finals["status"] == "completed")] if len(search_finals) else search_finals
            values = same[ctx.metric].astype(float) if len(same) else pd.Series(dtype=float)
            best = (values.min() if _better(ctx.direction) else values.max()) if len(values) else math.nan
            search_value[row["label"]] = best
        search_col = f"search {metric_label(ctx, ctx.metric)}"
        table[search_col] = table["label"].map(search_value)
        table["search rank"] = table[search_col].rank(ascending=_better(ctx.direction), method="min")
        table["replication rank"] = table["median_error"].rank(ascending=True, method="min")
        table["search value in interval"] = [
            bool(lo <= v <= hi) if np.isfinite(v) and np.isfinite(lo) else None
            for v, lo, hi in zip(table[search_col], table["median_error_lo"], table["median_error_hi"], strict=True)
        ]
        shown = _stability_table(ctx, table)
        for column in (search_col, "search rank", "replication rank", "search value in interval"):
            shown[column] = table[column].to_numpy()
        s.table(shown)
        noise = _replication_seed_noise(runs)
        s.text("Seed noise across these configurations: " + (
            f"reseeding accounts for {noise.share:.2f} of the final error's variance [{noise.ci[0]:.2f}, "
            f"{noise.ci[1]:.2f}] ({noise.n_configs} configurations, {noise.n_runs} runs; one-way random effects)."
            if noise.why is None else noise.why + "."))
        outside = [label for label, ok in zip(table["label"], table["search value in interval"], strict=True)
                   if ok is False]
        if outside:
            s.text("The search's value lies outside the replication interval of the median error for: "
                   + ", ".join(outside) + " (a lucky or unlucky search seed).")
        done = final_rows(runs)
        done = done[done["status"] == "completed"].copy()
        if len(done) and np.isfinite(done["error"].astype(float)).any():
            done["label"] = [_config_label(m, c) for m, c in zip(done["model"], done["config_id"], strict=True)]
            marks = search_value if ctx.metric == "error" else {}  # the figure shows the error
            s.figure(f"replication_{rid}", replication_figure(done, marks, "error", ctx.target,
                                                              metric_unit("error", ctx.task)),
                     f"replication {rid}: final error per seed")
    return s


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _relative_cells(frame: pd.DataFrame, results_dir: str | None) -> pd.DataFrame:
    out = frame.copy()
    for i in range(out.shape[1]):
        if pd.api.types.is_object_dtype(out.iloc[:, i]):
            out.iloc[:, i] = [relative_paths(v, results_dir) if isinstance(v, str) else v for v in out.iloc[:, i]]
    return out


def _guarded(key: str, title: str, make) -> Section:
    """The section, or one that says why it could not be made: one broken analysis must not sink the report."""
    try:
        return make()
    except Exception as err:
        s = Section(key, title)
        s.text(f"This section could not be made: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        return s


def build_context(tracking_uri: str, study_name: str, optuna_storage: str | None = None,
                  results_dir: str | os.PathLike | None = None, paper: dict | None = None) -> StudyContext:
    """Load the study (MLflow runs, Optuna record when given) and the facts every section needs; ``paper``
    (a study file's ``paper`` block) overrides the recorded one."""
    runs = find_study_runs(tracking_uri, study_name, include_replications=True)
    optuna_info, optuna_note = None, None
    if optuna_storage:
        try:
            optuna_info = load_optuna(optuna_storage, study_name)
        except LoadError as err:  # the MLflow record alone still makes a report
            optuna_note = str(err)
    df = tidy_from_runs(runs, optuna_info)
    metric = str(_spec_param(runs, "objective.metric", "error"))
    mode = str(_spec_param(runs, "objective.mode", "max" if metric.endswith("accuracy") else "min"))
    if metric not in df.columns:
        df[metric] = np.nan
    if "error" not in df.columns:
        df["error"] = np.nan
    results = results_dir if results_dir is not None else runs.parent.data.tags.get(TAG_RESULTS_DIR)
    running = runs.running or bool(optuna_info and optuna_info.running) or bool((df["status"] == "running").any())
    spec = recorded_spec(runs)
    space = study_space(runs, spec) or (dict(optuna_info.distributions) if optuna_info else None)
    return StudyContext(study_name, df, runs, optuna_info, metric, "minimize" if mode == "min" else "maximize",
                        str(results) if results else None, running, optuna_note, space, spec,
                        paper if paper is not None else (spec or {}).get("paper"))


def make_report(
    tracking_uri: str,
    study_name: str,
    out_dir: str | os.PathLike,
    optuna_storage: str | None = None,
    results_dir: str | os.PathLike | None = None,
    log_artifacts: bool = True,
    generalization: dict | None = None,
    paper: dict | None = None,
) -> dict[str, Path]:
    """Write the report of ``study_name`` into ``out_dir``; return ``{"html", "markdown", "parquet", "csv",
    "figures"}`` paths. ``results_dir`` (default: the study run's ``mannstudy.results_dir`` tag) holds the
    checkpoints the generalization section reads; ``generalization``: keyword arguments for
    :func:`analysis.generalization.evaluate_study` (scales, noises, memory_factors, max_seeds, device, ...).
    With ``log_artifacts`` the files are also logged to the study's MLflow parent run under ``report/``.
    """
    ctx = build_context(tracking_uri, study_name, optuna_storage, results_dir, paper)
    out = Path(out_dir)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    sens = _sensitivity(ctx)
    makers = {
        "paper": lambda: paper_section(ctx),
        "overview": lambda: overview_section(ctx),
        "best": lambda: best_section(ctx),
        "status": lambda: status_section(ctx),
        "stability": lambda: stability_section(ctx),
        "arms": lambda: arms_section(ctx),
        "importance": lambda: importance_section(ctx, sens),
        "marginals": lambda: marginals_section(ctx, sens),
        "interaction": lambda: interaction_section(ctx, sens),
        "boundary": lambda: boundary_section(ctx, sens),
        "generalization": lambda: generalization_section(ctx, **(generalization or {})),
        "replication": lambda: replication_section(ctx),
    }
    sections = [_guarded(key, title, makers[key]) for key, title in SECTIONS if key != "paper" or ctx.paper]
    banner = None
    if ctx.running:
        n_running = int((final_rows(ctx.df)["status"] == "running").sum()) if len(ctx.df) else 0
        banner = (f"Study {study_name} is still running ({n_running} runs in progress): this report covers the "
                  "runs finished so far; running runs are counted, not analysed.")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"mannstudy report, generated {stamp} from {shown_location(tracking_uri, ctx.results_dir)}"
    for s in sections:  # error messages and the like may quote a path: relative to the results folder too
        s.parts = [("p", relative_paths(part[1], ctx.results_dir)) if part[0] == "p" else
                   ("table", _relative_cells(part[1], ctx.results_dir), part[2]) if part[0] == "table" else part
                   for part in s.parts]
    title = f"Study {study_name}"

    for s in sections:
        for part in s.parts:
            if part[0] == "figure":
                (figures_dir / f"{part[1]}.png").write_bytes(part[2])
    paths = {
        "html": out / "report.html",
        "markdown": out / "summary.md",
        "parquet": export(ctx.df, out / "tidy.parquet"),
        "csv": export(ctx.df, out / "tidy.csv"),
        "figures": figures_dir,
    }
    paths["html"].write_text(render_html(title, sections, banner, subtitle), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(title, sections, banner, subtitle), encoding="utf-8")
    if log_artifacts:
        from study.tracking import TrackingError, log_study_artifacts

        try:
            log_study_artifacts(tracking_uri, ctx.runs.parent.info.run_id, list(paths.values()), REPORT_DIR)
        except TrackingError as err:
            print(f"mannstudy: warning: report not logged to MLflow: {err}", file=sys.stderr)
    return paths


def _locate(study_file_or_name: str, results_dir: str | None) -> tuple[str, str, str | None, str, dict | None]:
    """(tracking URI, study name, Optuna storage or None, results folder, the file's ``paper`` block or None) from
    a study file or a study name. A study file's ``paper`` block wins over the recorded one: a block added to the
    file after the sweep started still reaches the report."""
    from study.spec import RESULTS_ENV, load_spec
    from study.tracking import resolve_tracking_uri

    path = Path(study_file_or_name)
    if path.is_file():
        spec = load_spec(path)
        return (spec.tracking_uri, spec.name, _existing(spec.storage), str(results_dir or spec.results_dir),
                spec.paper)
    if path.suffix in (".yaml", ".yml") or os.sep in study_file_or_name:
        raise LoadError(f"{study_file_or_name}: no such study file")
    name = study_file_or_name
    root = Path(results_dir) if results_dir else Path(os.environ.get(RESULTS_ENV, "results")) / name
    uri = resolve_tracking_uri(None, root)
    if not (root / "mlflow.db").is_file():
        raise LoadError(f"{root / 'mlflow.db'}: no MLflow database for study {name!r} (pass the study file, or "
                        "--results-dir)")
    storage = f"sqlite:///{(root / 'optuna.db').resolve()}" if (root / "optuna.db").is_file() else None
    return uri, name, storage, str(root), None


def _existing(storage: str) -> str | None:
    """The Optuna storage URL, or None for a SQLite file that does not exist (opening it would create one)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return None
    return storage


def cli_report(study_file_or_name: str, results_dir: str | None = None, out: str | None = None) -> int:
    """``mannstudy report FILE|NAME [--results-dir DIR] [--out DIR]``: write the report, print where; 0, or 2
    with one line for a study that cannot be found."""
    try:
        uri, name, storage, results, paper = _locate(study_file_or_name, results_dir)
        # a results_dir in object storage: the report is written here, in ./<name>-report (and logged to MLflow)
        out_dir = Path(out) if out else Path(f"{name}-report") if "://" in results else Path(results) / "report"
        paths = make_report(uri, name, out_dir, storage, results, paper=paper)
    except LoadError as err:
        print(f"mannstudy: {err}", file=sys.stderr)
        return 2
    print(f"report: {paths['html']}")
    print(f"summary: {paths['markdown']}")
    print(f"data: {paths['parquet']}, {paths['csv']}")
    return 0
