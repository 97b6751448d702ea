"""``mannstudy report``: one study -> a self-contained HTML report, a Markdown summary and the tidy data.

Outputs in ``out_dir``::

    report.html      every figure inline (base64 PNG), no external file, script or stylesheet
    summary.md       the same sections as text and tables (figures are in figures/)
    figures/*.png    the report's figures
    tidy.parquet     the tidy frame (analysis.tidy) the report was computed from
    tidy.csv         the same, for spreadsheets

and the same files as artifacts of the study's MLflow parent run, under ``report/``.

Sections: overview, best configurations, status breakdown, seed stability, hyperparameter
importance (which trials were used, how many), marginals, interaction heatmap, boundary check,
generalization of the best configuration per model (from checkpoints; needs the results folder),
replications. A section without enough data says why in words and shows no figure. A study
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
    study_space,
    tidy_from_runs,
)
from analysis.tidy import final_rows, params_of

SECTIONS = (
    ("overview", "Overview"),
    ("best", "Best configurations"),
    ("status", "Status breakdown"),
    ("stability", "Seed stability"),
    ("importance", "Hyperparameter importance"),
    ("marginals", "Marginals"),
    ("interaction", "Interaction"),
    ("boundary", "Boundary check"),
    ("generalization", "Generalization"),
    ("replication", "Replications"),
)
DPI = 100


@dataclass
class Section:
    """One report section: paragraphs, tables and figures in order, rendered to HTML and Markdown."""

    key: str
    title: str
    parts: list = field(default_factory=list)  # ("p", text) | ("table", frame, rows) | ("figure", name, png, alt)

    def text(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, frame: pd.DataFrame, max_rows: int = 30) -> None:
        self.parts.append(("table", frame.head(max_rows), len(frame)))

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
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.banner { background: #fff3cd; border: 1px solid #e0c36a; padding: 0.6em 1em; border-radius: 4px; }
nav ol { columns: 2; } .muted { color: #666; font-size: 0.9em; }
"""


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
                out.append(f"<p>{html.escape(part[1])}</p>")
            elif part[0] == "table":
                frame, total = part[1], part[2]
                body = frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0,
                                     escape=True)
                out.append(body)
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

    @property
    def search(self) -> pd.DataFrame:
        return self.df[self.df["replication"].isna()]

    @property
    def target(self) -> float:
        values = self.df["target_error"].dropna() if "target_error" in self.df else pd.Series(dtype=float)
        return float(values.median()) if len(values) else 0.1


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


# ----------------------------------------------------------------------------------------------------------
# Sections


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
           f"Objective: final {ctx.metric} ({ctx.direction}). Success: final error at most {ctx.target:g} "
           "(the task's target_error).")
    if ctx.optuna is not None:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(ctx.optuna.states.items()))
        s.text(f"Optuna record: {states or 'no trials'}.")
    elif ctx.optuna_note:
        s.text(f"Optuna record not used ({ctx.optuna_note}).")
    s.text(f"MLflow: {ctx.runs.tracking_uri}, study run {ctx.runs.parent.info.run_id}. "
           f"Results folder: {ctx.results_dir or 'unknown (generalization needs it)'}.")
    return s


def _config_table(ctx: StudyContext, finals: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (model, config_id): completed runs, median and best final metric, params."""
    done = finals[(finals["status"] == "completed") & np.isfinite(finals[ctx.metric].astype(float))]
    rows = []
    for (model, cid), runs in done.groupby(["model", "config_id"], sort=False):
        values = runs[ctx.metric].astype(float)
        rows.append({"config": _config_label(model, cid), "model": model, "completed runs": len(runs),
                     f"median {ctx.metric}": values.median(),
                     f"best {ctx.metric}": values.min() if _better(ctx.direction) else values.max(),
                     "seeds": ",".join(str(s) for s in sorted(runs["seed"])),
                     "params": _params_text(runs.iloc[0])})
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"median {ctx.metric}", ascending=_better(ctx.direction), kind="stable")
    return table.reset_index(drop=True)


def best_section(ctx: StudyContext) -> Section:
    s = Section("best", "Best configurations")
    finals = final_rows(ctx.df)
    table = _config_table(ctx, finals)
    if table.empty:
        s.text(f"No completed run with a finite {ctx.metric} yet: nothing to rank "
               f"({len(finals)} runs, none finished its budget).")
        return s
    s.text(f"Configurations ranked by the median final {ctx.metric} of their completed runs (search and "
           "replications); stopped-early, diverged, failed and running runs do not rank.")
    per_model = table.groupby("model", sort=False).head(1)
    median = f"median {ctx.metric}"
    s.text("Best per model: " + "; ".join(f"{r['model']}: {r['config']} ({median} {_fmt(r[median])})"
                                          for _, r in per_model.iterrows()) + ".")
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


def stability_section(ctx: StudyContext) -> Section:
    from analysis.stability import learning_curves, seed_stability

    s = Section("stability", "Seed stability")
    if not np.isfinite(ctx.df["error"].astype(float)).any():
        s.text("No evaluation has a finite error yet: no stability to measure.")
        return s
    table = seed_stability(ctx.df, ctx.target, "error")
    full = table[table["n_seeds"] > 0]
    if full.empty:
        s.text("No configuration has a full-budget run (completed or diverged) yet: stability is measured over "
               "full-budget runs only.")
        return s
    replicated = int((full["n_seeds"] >= 2).sum())
    s.text(f"Per configuration over its full-budget runs (seeds): success rate (final error <= {ctx.target:g}), "
           "median and IQR of the final error, divergence rate, median steps to the target, each with a 95% "
           f"percentile-bootstrap interval over seeds. {replicated} of {len(full)} configurations ran with two "
           "or more seeds" + ("" if replicated else
                              ": intervals need seeds [0, 1, ...] in the study file or `mannstudy replicate`") + ".")
    cols = ["label", "n_seeds", "success_rate", "success_rate_lo", "success_rate_hi", "median_error",
            "median_error_lo", "median_error_hi", "iqr_error", "divergence_rate", "median_steps_to_target",
            "n_stopped_early", "n_failed"]
    shown = full.sort_values(["success_rate", "median_error"], ascending=[False, True], kind="stable")
    s.table(shown[[c for c in cols if c in shown.columns]].reset_index(drop=True), max_rows=20)
    s.figure("success_rate", plots.success_rate_figure(full), "success rate per configuration with its interval")
    curves = learning_curves(ctx.df, "error")
    if len(curves):
        s.figure("learning_curves", plots.learning_curves_figure(curves, "error", ctx.target),
                 "learning curves: median over seeds with quantile band")
    return s


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
    what = ("full-budget trials (completed, final " if imp.selection.step is None
            else f"every trial at step {imp.selection.step}, the largest step all of them reached (") + ctx.metric + ")"
    head = f"On {imp.selection.n_used} {what}; {_excluded_text(imp.selection)}: "
    if not imp.estimated:
        return head + imp.why + "."
    above = [p for p in imp.table.index if bool(imp.table.loc[p, "above_noise"])]
    lo, hi = imp.explained_ci
    return (head + f"the surrogate explains {imp.explained:.2f} of the variance [{lo:.2f}, {hi:.2f}] "
            f"({imp.n_boot} bootstrap refits); above noise (interval excludes 0): "
            + (", ".join(above) if above else "no parameter") + ".")


def importance_section(ctx: StudyContext, sens: _Sensitivity) -> Section:
    from analysis.sensitivity import MIN_TRIALS, TRIALS_PER_PARAM

    s = Section("importance", "Hyperparameter importance")
    if sens.result is None:
        s.text(f"Not computed: {sens.why}.")
        return s
    r = sens.result
    s.text("Importance = the fraction of the objective's variance a hyperparameter carries: half the increase "
           "of a random-forest surrogate's error on left-out trials when that parameter is shuffled, with a 95% "
           "bootstrap interval over trials (the surrogate is refitted on each resample). Estimated only from "
           f"max({MIN_TRIALS}, {TRIALS_PER_PARAM} x searched parameters) trials. fANOVA and PED-ANOVA (Optuna) "
           "are shares of what their model explains, summing to 1: read them as a ranking, not as a size. "
           "Replication runs are left out.")
    if not r.space_known:
        s.text("Search space: not recorded with the study; ranges are the values seen, on a linear scale.")
    for imp in (r.full, r.rung):
        s.text(("Full budget. " if imp.selection.step is None else "Common rung. ") + _importance_text(ctx, imp))
    noise = r.seed_noise
    if np.isfinite(noise.share):
        s.text(f"Seed noise: reseeding one configuration accounts for {noise.share:.2f} of the full-budget "
               f"variance [{noise.ci[0]:.2f}, {noise.ci[1]:.2f}] ({noise.n_configs} configurations with several "
               "seeds): no hyperparameter can explain that part; compare it with the surrogate's explained variance.")
    else:
        s.text("Seed noise: not estimated (no configuration ran with two seeds among the full-budget trials).")
    for imp in (r.full, r.rung):
        if imp.estimated and len(imp.table):
            table = imp.table.reset_index()
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
    s.text(f"Final {ctx.metric} against each hyperparameter (most important first): every used run as a dot, "
           "the binned median as a line.")
    s.figure("marginals", plots.marginals_figure(sens.result.marginals, ctx.metric), "objective per hyperparameter")
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
    s.text(f"Median final {ctx.metric} over bins of the two most important hyperparameters, {a} and {b} "
           "(empty cells: no run).")
    s.figure("interaction", plots.interaction_figure(table, ctx.metric), f"{a} x {b}")
    counts = table.count.reset_index()
    counts.columns = [str(c) for c in counts.columns]
    s.table(counts)
    return s


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


def generalization_figure(table: pd.DataFrame, target: float | None = None) -> Figure:
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
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=1)
        ax.set(xlabel=label, ylabel="error")
        if axis == "memory":
            scale = rows["scale"].iloc[0]
            ax.set_title(f"at {scale:g}x length", fontsize="small")
    axes[0].legend(fontsize="small")
    return fig


def generalization_section(ctx: StudyContext, **kwargs) -> Section:
    from analysis.generalization import evaluate_study

    s = Section("generalization", "Generalization")
    if not ctx.results_dir or not Path(ctx.results_dir).is_dir():
        where = f" ({ctx.results_dir} does not exist here)" if ctx.results_dir else ""
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
    s.text("The best configuration of each model (by median final error of its completed runs), each seed's last "
           "checkpoint evaluated on: longer sequences than trained (scale s: sizes beyond the training range "
           "up to s times it; memory grows with s as in training's own generalization metrics), corrupted inputs "
           f"({kinds}: data bits flipped with the given probability before the first scored step, or Gaussian "
           "noise of the given std), and a larger memory at the longest length. Lines: median over seeds; "
           "band: min to max.")
    if absent:
        s.text("No completed run to evaluate for: " + ", ".join(absent) + ".")
    s.figure("generalization", generalization_figure(result.table, ctx.target), "error against length, noise, memory")
    summary = result.table.pivot_table(index=["model", "axis", "scale", "noise", "memory_factor"], values="error",
                                       aggfunc="median").reset_index()
    s.table(summary.rename(columns={"error": "median error"}), max_rows=60)
    return s


def replication_figure(rep: pd.DataFrame, search_best: dict[str, float], metric: str, target: float) -> Figure:
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
    ax.set(xlabel=f"final {metric}", title="Replications: each seed's final value vs the search's")
    ax.legend(fontsize="small")
    return fig


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
        if (table["n_seeds"] > 0).sum() == 0:
            s.text("No replication run has finished its budget yet.")
            continue
        search_value = {}
        for _, row in table.iterrows():
            same = search_finals[(search_finals["config_id"] == row["config_id"])
                                 & (search_finals["status"] == "completed")] if len(search_finals) else search_finals
            values = same[ctx.metric].astype(float) if len(same) else pd.Series(dtype=float)
            best = (values.min() if _better(ctx.direction) else values.max()) if len(values) else math.nan
            search_value[row["label"]] = best
        table["search " + ctx.metric] = table["label"].map(search_value)
        table["search rank"] = table["search " + ctx.metric].rank(ascending=_better(ctx.direction), method="min")
        table["replication rank"] = table["median_error"].rank(ascending=True, method="min")
        table["search value in interval"] = [
            bool(lo <= v <= hi) if np.isfinite(v) and np.isfinite(lo) else None
            for v, lo, hi in zip(table["search " + ctx.metric], table["median_error_lo"], table["median_error_hi"],
                                 strict=True)
        ]
        cols = ["label", "n_seeds", "search " + ctx.metric, "median_error", "median_error_lo", "median_error_hi",
                "success_rate", "success_rate_lo", "success_rate_hi", "divergence_rate", "search rank",
                "replication rank", "search value in interval"]
        s.table(table[cols])
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
            s.figure(f"replication_{rid}", replication_figure(done, marks, "error", ctx.target),
                     f"replication {rid}: final error per seed")
    return s


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _guarded(key: str, title: str, make) -> Section:
    """The section, or one that says why it could not be made: one broken analysis must not sink the report."""
    try:
        return make()
    except Exception as err:
        s = Section(key, title)
        s.text(f"This section could not be made: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        return s


def build_context(tracking_uri: str, study_name: str, optuna_storage: str | None = None,
                  results_dir: str | os.PathLike | None = None) -> StudyContext:
    """Load the study (MLflow runs, Optuna record when given) and the facts every section needs."""
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
    results = results_dir if results_dir is not None else runs.parent.data.tags.get("mannstudy.results_dir")
    running = runs.running or bool(optuna_info and optuna_info.running) or bool((df["status"] == "running").any())
    space = study_space(runs) or (dict(optuna_info.distributions) if optuna_info else None)
    return StudyContext(study_name, df, runs, optuna_info, metric, "minimize" if mode == "min" else "maximize",
                        str(results) if results else None, running, optuna_note, space)


def make_report(
    tracking_uri: str,
    study_name: str,
    out_dir: str | os.PathLike,
    optuna_storage: str | None = None,
    results_dir: str | os.PathLike | None = None,
    log_artifacts: bool = True,
    generalization: dict | None = None,
) -> dict[str, Path]:
    """Write the report of ``study_name`` into ``out_dir``; return ``{"html", "markdown", "parquet", "csv",
    "figures"}`` paths. ``results_dir`` (default: the study run's ``mannstudy.results_dir`` tag) holds the
    checkpoints the generalization section reads; ``generalization``: keyword arguments for
    :func:`analysis.generalization.evaluate_study` (scales, noises, memory_factors, max_seeds, device, ...).
    With ``log_artifacts`` the files are also logged to the study's MLflow parent run under ``report/``.
    """
    ctx = build_context(tracking_uri, study_name, optuna_storage, results_dir)
    out = Path(out_dir)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    sens = _sensitivity(ctx)
    makers = {
        "overview": lambda: overview_section(ctx),
        "best": lambda: best_section(ctx),
        "status": lambda: status_section(ctx),
        "stability": lambda: stability_section(ctx),
        "importance": lambda: importance_section(ctx, sens),
        "marginals": lambda: marginals_section(ctx, sens),
        "interaction": lambda: interaction_section(ctx, sens),
        "boundary": lambda: boundary_section(ctx, sens),
        "generalization": lambda: generalization_section(ctx, **(generalization or {})),
        "replication": lambda: replication_section(ctx),
    }
    sections = [_guarded(key, title, makers[key]) for key, title in SECTIONS]
    banner = None
    if ctx.running:
        n_running = int((final_rows(ctx.df)["status"] == "running").sum()) if len(ctx.df) else 0
        banner = (f"Study {study_name} is still running ({n_running} runs in progress): this report covers the "
                  "runs finished so far; running runs are counted, not analysed.")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"mannstudy report, generated {stamp} from {tracking_uri}"
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
            log_study_artifacts(tracking_uri, ctx.runs.parent.info.run_id, list(paths.values()), "report")
        except TrackingError as err:
            print(f"mannstudy: warning: report not logged to MLflow: {err}", file=sys.stderr)
    return paths


def _locate(study_file_or_name: str, results_dir: str | None) -> tuple[str, str, str | None, str]:
    """(tracking URI, study name, Optuna storage or None, results folder) from a study file or a study name."""
    from study.spec import RESULTS_ENV, load_spec
    from study.tracking import resolve_tracking_uri

    path = Path(study_file_or_name)
    if path.is_file():
        spec = load_spec(path)
        return spec.tracking_uri, spec.name, _existing(spec.storage), str(results_dir or spec.results_dir)
    if path.suffix in (".yaml", ".yml") or os.sep in study_file_or_name:
        raise LoadError(f"{study_file_or_name}: no such study file")
    name = study_file_or_name
    root = Path(results_dir) if results_dir else Path(os.environ.get(RESULTS_ENV, "results")) / name
    uri = resolve_tracking_uri(None, root)
    if not (root / "mlflow.db").is_file():
        raise LoadError(f"{root / 'mlflow.db'}: no MLflow database for study {name!r} (pass the study file, or "
                        "--results-dir)")
    storage = f"sqlite:///{(root / 'optuna.db').resolve()}" if (root / "optuna.db").is_file() else None
    return uri, name, storage, str(root)


def _existing(storage: str) -> str | None:
    """The Optuna storage URL, or None for a SQLite file that does not exist (opening it would create one)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return None
    return storage


def cli_report(study_file_or_name: str, results_dir: str | None = None, out: str | None = None) -> int:
    """``mannstudy report FILE|NAME [--results-dir DIR] [--out DIR]``: write the report, print where; 0, or 2
    with one line for a study that cannot be found."""
    try:
        uri, name, storage, results = _locate(study_file_or_name, results_dir)
        out_dir = Path(out) if out else Path(results) / "report"
        paths = make_report(uri, name, out_dir, storage, results)
    except LoadError as err:
        print(f"mannstudy: {err}", file=sys.stderr)
        return 2
    print(f"report: {paths['html']}")
    print(f"summary: {paths['markdown']}")
    print(f"data: {paths['parquet']}, {paths['csv']}")
    return 0
