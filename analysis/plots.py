"""Figures for the report: each function takes an analysis result and returns a matplotlib Figure.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot: no
global figure registry to leak memory in a long report run, no display needed, and the caller's
pyplot backend is left alone. ``fig.savefig(path)`` writes PNG/SVG.

No empty figures. Input of the wrong kind (a frame without the expected columns) raises
:class:`PlotError`; input that is valid but empty (no completed trial, no replicated config)
draws an explicit "no data: <why>" message in the axes instead, so a report section still
says what is missing rather than failing or showing blank axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

from analysis.sensitivity import MODEL_PARAM, Importance, Interaction, Marginal, SeedNoise
from analysis.stats import Survival

STATUS_COLORS = {
    "completed": "#2ca02c",
    "stopped_early": "#7f7f7f",
    "diverged": "#d62728",
    "failed": "#000000",
    "running": "#1f77b4",
}


class PlotError(ValueError):
    """A plot was given input of the wrong kind; the message names what was expected."""


def _figure(width: float = 6.4, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise PlotError(f"{what}: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlotError(f"{what}: missing columns {', '.join(missing)}")


def no_data(ax, why: str) -> None:
    """Write an explicit "no data" message in ``ax`` (and hide its empty frame)."""
    ax.text(0.5, 0.5, f"no data: {why}", ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def learning_curves_figure(
    curves: pd.DataFrame, metric: str = "error", target: float | None = None, max_configs: int = 8
) -> Figure:
    """Median learning curve per configuration with its seed band (from stability.learning_curves).

    With more than ``max_configs`` configurations, the ones with the lowest final median are drawn.
    """
    _require(curves, ["label", "step", "n", "median", "lo", "hi"], "learning curves")
    fig = _figure()
    ax = fig.add_subplot()
    if curves.empty:
        no_data(ax, "no evaluations of full-budget runs")
        return fig
    final = curves.sort_values("step").groupby("label", sort=False)["median"].last().sort_values(kind="stable")
    labels = list(final.index[:max_configs])
    palette = sns.color_palette("colorblind", len(labels))
    for label, color in zip(labels, palette, strict=True):
        c = curves[curves["label"] == label].sort_values("step")
        ax.plot(c["step"], c["median"], color=color, label=f"{label} (n={int(c['n'].max())})")
        ax.fill_between(c["step"], c["lo"], c["hi"], color=color, alpha=0.2, linewidth=0)
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    shown = "" if len(final) <= max_configs else f" (best {max_configs} of {len(final)})"
    ax.set(xlabel="step", ylabel=metric, title=f"{metric}: median over seeds, band = quantiles{shown}")
    ax.legend(fontsize="small")
    return fig


def success_rate_figure(stability: pd.DataFrame, max_configs: int = 20) -> Figure:
    """Success rate per configuration (or arm) with its Wilson interval (from stability.seed_stability).

    The denominator of each rate, every ended run (stopped-early ones included), is in the label.
    """
    _require(stability, ["label", "n_runs", "success_rate", "success_rate_lo", "success_rate_hi"], "success rate")
    rows = stability[stability["n_runs"] > 0].sort_values("success_rate", ascending=False, kind="stable")
    rows = rows.head(max_configs).iloc[::-1]  # best at the top of a horizontal bar chart
    fig = _figure(6.4, max(2.5, 0.35 * len(rows) + 1.2))
    ax = fig.add_subplot()
    if rows.empty:
        no_data(ax, "no configuration has an ended run")
        return fig
    rate = rows["success_rate"].to_numpy(dtype=float)
    err = np.vstack([rate - rows["success_rate_lo"].to_numpy(dtype=float),
                     rows["success_rate_hi"].to_numpy(dtype=float) - rate])
    y = np.arange(len(rows))
    bars = ax.barh(y, rate, xerr=err, color="#4c72b0", ecolor="black", capsize=3)
    # Written out so a rate of 0 (an invisible bar) still reads as a value.
    ax.bar_label(bars, labels=[f"{k}/{n} [{lo:.2f}, {hi:.2f}]" for k, n, lo, hi in
                               zip(rows["n_success"], rows["n_runs"], rows["success_rate_lo"],
                                   rows["success_rate_hi"], strict=True)],
                 padding=4, fontsize="small")
    ax.set_yticks(y, [f"{label} (n={n})" for label, n in zip(rows["label"], rows["n_runs"], strict=True)])
    ax.set_xticks(np.linspace(0.0, 1.0, 6))
    ax.set(xlim=(0, 1.45), xlabel="success rate (fraction of ended runs; 95% Wilson interval)",
           title="Success over seeds")
    return fig


def survival_figure(curves: Mapping[str, Survival], title: str, xlabel: str = "step (optimizer updates)") -> Figure:
    """Kaplan-Meier curves per arm (fraction of runs not yet at the target) with their 95% bands.

    curves: {arm: analysis.stats.Survival} (from stability.survival_curves); steps, drawn from (0, 1).
    """
    fig = _figure()
    ax = fig.add_subplot()
    if not curves:
        no_data(ax, "no ended run")
        return fig
    palette = sns.color_palette("colorblind", len(curves))
    for (arm, km), color in zip(curves.items(), palette, strict=True):
        t = np.concatenate([[0.0], km.t])
        ax.step(t, np.concatenate([[1.0], km.survival]), where="post", color=color, label=arm)
        ax.fill_between(t, np.concatenate([[1.0], km.lo]), np.concatenate([[1.0], km.hi]), step="post",
                        color=color, alpha=0.2, linewidth=0)
    ax.set(xlabel=xlabel, ylabel="fraction not yet at the target", ylim=(-0.02, 1.02),
           title=f"Time to target, {title} (Kaplan-Meier, 95% band)")
    ax.legend(fontsize="small")
    return fig


def importance_figure(analyses: Sequence[Importance], seed_noise: SeedNoise | None = None) -> Figure:
    """Permutation importance with its interval, one panel per analysis (full budget, common rung).

    Bars: each parameter's share of the objective's variance lost when it is shuffled; whiskers: the
    bootstrap interval; the dashed line: the surrogate's explained variance R^2 (the most any
    parameter can reach). An analysis that was not estimated says why in its panel. The seed-noise
    share, when known, is in the title: it bounds what any hyperparameter can explain (1 - share).
    """
    if not all(isinstance(a, Importance) for a in analyses):
        raise PlotError("importance: expected a list of analysis.sensitivity.Importance")
    params = list(dict.fromkeys(p for a in analyses for p in a.table.index))[::-1]
    fig = _figure(4.2 * max(1, len(analyses)), max(2.5, 0.35 * len(params) + 1.6))
    if not analyses:
        no_data(fig.add_subplot(), "no importance analysis")
        return fig
    axes = fig.subplots(1, len(analyses), sharey=True, squeeze=False)[0]
    for ax, a in zip(axes, analyses, strict=True):
        title = f"{a.basis} (n={a.selection.n_used})"
        if not a.estimated or not params:
            no_data(ax, a.why or "no hyperparameters")
            ax.set_title(title)
            continue
        t = a.table.reindex(params)
        value = t["importance"].to_numpy(dtype=float)
        err = np.vstack([value - t["importance_lo"].to_numpy(dtype=float),
                         t["importance_hi"].to_numpy(dtype=float) - value])
        colors = ["#55a868" if bool(x) else "#bbbbbb" for x in t["above_noise"].fillna(False)]
        y = np.arange(len(params))
        ax.barh(y, np.nan_to_num(value), xerr=np.nan_to_num(err), color=colors, ecolor="black", capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(a.explained, color="#4c72b0", linestyle="--", linewidth=1,
                   label=f"surrogate R^2 {a.explained:.2f} [{a.explained_ci[0]:.2f}, {a.explained_ci[1]:.2f}]")
        ax.set_yticks(y, params)
        ax.set(title=title, xlabel="variance lost when shuffled (fraction)")
        ax.legend(fontsize="x-small", loc="lower right")
    if seed_noise is not None and np.isfinite(seed_noise.share):
        lo, hi = seed_noise.ci
        fig.suptitle(f"seed noise: {seed_noise.share:.2f} of the variance [{lo:.2f}, {hi:.2f}] "
                     f"({seed_noise.n_configs} configurations with several seeds)")
    return fig


def readable_log_ticks(ax, axis: str = "x", min_gap: float = 0.2) -> None:
    """A log axis labelled with a few plain numbers, minor ticks unlabelled: over less than a decade matplotlib
    labels its minor ticks, and labels such as "6x10^-3" then run together.

    Ticks: the roundest of 10^k, then {1, 2, 5} x 10^k, then {1, ..., 9} x 10^k inside the axis limits that
    gives three ticks, each at least ``min_gap`` of the axis length from the one before.
    """
    which = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    if not (lo > 0 and hi > lo and np.isfinite(hi)):
        return
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    gap = min_gap * math.log10(hi / lo)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        spaced: list[float] = []
        for t in sorted(float(f"{m}e{k}") for k in decades for m in mantissas):
            if lo <= t <= hi and (not spaced or math.log10(t / spaced[-1]) >= gap):
                spaced.append(t)
        if len(spaced) > len(ticks):
            ticks = spaced
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # a range too narrow for round numbers: its two ends, to two significant digits
        ticks = [t for t in (float(f"{lo:.2g}"), float(f"{hi:.2g}")) if lo <= t <= hi] or [math.sqrt(lo * hi)]
    which.set_major_locator(FixedLocator(ticks))
    which.set_major_formatter(FixedFormatter([f"{t:.2g}" for t in ticks]))
    which.set_minor_formatter(NullFormatter())
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)


def marginals_figure(marginals: Sequence[Marginal], metric: str = "error", max_params: int = 6,
                     ncols: int = 3) -> Figure:
    """Objective against each hyperparameter, one colour per model: every trial as a dot and, per model, the
    median of each bin (a line for a numeric parameter; a point with its interquartile whisker per choice).

    Models are drawn apart: one line through the runs of several models would mix their different levels.
    """
    if not all(isinstance(m, Marginal) for m in marginals):
        raise PlotError("marginals: expected a list of analysis.sensitivity.Marginal")
    shown = [m for m in marginals if not m.points.empty][:max_params]
    if not shown:
        fig = _figure()
        no_data(fig.add_subplot(), "no completed trial with hyperparameters")
        return fig
    ncols = min(ncols, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = _figure(3.6 * ncols, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    panels = [m.points.assign(model=m.points["model"].astype(str) if "model" in m.points else "") for m in shown]
    models = sorted({x for points in panels for x in points["model"]})
    colors = dict(zip(models, sns.color_palette("colorblind", len(models)), strict=True))
    rng = np.random.default_rng(0)
    for ax, m, points in zip(axes, shown, panels, strict=False):
        present = [x for x in models if (points["model"] == x).any()]
        dodge = m.kind == "categorical" and m.param != MODEL_PARAM and len(present) > 1
        for k, model in enumerate(present):
            pts = points[points["model"] == model]
            color = colors[model]
            per_bin = pts.groupby("bin")["objective"].agg(
                median="median", q25=lambda v: v.quantile(0.25), q75=lambda v: v.quantile(0.75))
            if m.kind == "categorical":
                offset = (k - (len(present) - 1) / 2) * 0.25 if dodge else 0.0
                x = pts["bin"].to_numpy(dtype=float) + offset
                ax.scatter(x + rng.uniform(-0.06, 0.06, len(x)), pts["objective"], s=12, alpha=0.45, color=color)
                centre = per_bin.index.to_numpy(dtype=float) + offset
                ax.errorbar(centre, per_bin["median"], yerr=[per_bin["median"] - per_bin["q25"],
                                                             per_bin["q75"] - per_bin["median"]],
                            fmt="o", color=color, markeredgecolor="black", capsize=3)
            else:
                ax.scatter(pts["value"].astype(float), pts["objective"], s=12, alpha=0.45, color=color)
                centre = m.summary["centre"].to_numpy(dtype=float)[per_bin.index.to_numpy(dtype=int)]
                ax.plot(centre, per_bin["median"], color=color, marker="o", markersize=3)
        if m.kind == "categorical":
            ax.set_xticks(np.arange(len(m.summary)), m.summary["label"])
            ax.set_xlim(-0.6, len(m.summary) - 0.4)
        elif m.log:
            ax.set_xscale("log")
            readable_log_ticks(ax, "x")
        ax.set(xlabel=m.param + (" (log scale)" if m.log else ""), ylabel=metric)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    if models != [""]:
        runs = pd.concat(panels)[["model", "config_id", "seed"]].drop_duplicates()["model"].value_counts()
        handles = [Line2D([], [], color=colors[x], marker="o", label=f"{x} (n={runs[x]})") for x in models]
        fig.legend(handles=handles, loc="outside upper center", ncols=len(models), fontsize="small",
                   title="model: runs (dots) and median per bin (line)", title_fontsize="small")
    return fig


def interaction_figure(table: Interaction | None, metric: str = "error") -> Figure:
    """Heatmap of the median objective over the bins of the top pair of hyperparameters."""
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    if table is not None and not isinstance(table, Interaction):
        raise PlotError("interaction: expected an analysis.sensitivity.Interaction or None")
    if table is None or table.median.isna().all().all():
        no_data(ax, "fewer than two rated hyperparameters")
        return fig
    sns.heatmap(table.median, ax=ax, annot=True, fmt=".3g", cmap="viridis_r", cbar_kws={"label": f"median {metric}"})
    ax.set(title=f"{table.params[0]} x {table.params[1]}")
    return fig


def status_figure(status: pd.DataFrame) -> Figure:
    """Runs per status (from sensitivity.status_table), with how many importance used."""
    _require(status, ["status", "n_runs", "n_used"], "status table")
    fig = _figure(5.6, 3.2)
    ax = fig.add_subplot()
    if status["n_runs"].sum() == 0:
        no_data(ax, "no runs")
        return fig
    x = np.arange(len(status))
    colors = [STATUS_COLORS.get(s, "#8172b2") for s in status["status"]]
    bars = ax.bar(x, status["n_runs"], color=colors)
    ax.bar_label(bars, labels=[f"{n} ({u} used)" if u else str(n) for n, u in
                               zip(status["n_runs"], status["n_used"], strict=True)], fontsize="small")
    ax.set_xticks(x, status["status"])
    ax.margins(y=0.15)  # room for the labels above the bars
    ax.set(ylabel="runs", title="Trial status (n used: full-budget importance)")
    return fig
