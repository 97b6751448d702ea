"""Seed stability and the tidy schema, on hand-made frames and synthetic studies with known truth."""

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis.plots import PlotError, learning_curves_figure, success_rate_figure
from analysis.stability import (
    bootstrap_ci,
    learning_curves,
    search_vs_seed_variance,
    seed_stability,
    steps_to_target,
)
from analysis.tidy import TidyError, config_id, final_rows, param_columns, params_of, validate_tidy

TARGET = 0.1


def run_rows(run_id, errors, *, params=None, seed=0, status="completed", model="ntm", study="s", steps=None,
             status_step=math.nan, replication=None):
    """Tidy rows of one run: one per evaluation, steps 100, 200, ... unless given."""
    params = {"lr": 1e-3, "model.memory_size": 32} if params is None else params
    steps = [100 * (i + 1) for i in range(len(errors))] if steps is None else steps
    return [
        dict(study=study, replication=replication, run_id=run_id, trial_id=run_id, config_id=config_id(params),
             seed=seed, model=model, status=status, status_step=status_step, step=step, error=error,
             **{"param." + k: v for k, v in params.items()})
        for step, error in zip(steps, errors, strict=True)
    ]


def frame(*runs):
    return pd.DataFrame([row for run in runs for row in run])


A = {"lr": 1e-3, "model.memory_size": 32}
B = {"lr": 1e-2, "model.memory_size": 32}


@pytest.fixture(scope="module")
def hand_made():
    """Config A: 2 successes, 1 completed failure, 1 divergence, 1 stopped early, 1 failed; config B: never."""
    return frame(
        run_rows("a1", [0.5, 0.2, 0.05], params=A, seed=1),  # reaches at 300, success
        run_rows("a2", [0.4, 0.08, 0.09], params=A, seed=2),  # reaches at 200, success
        run_rows("a3", [0.5, 0.3, 0.2], params=A, seed=3),  # never, final 0.2
        run_rows("a4", [0.3, 0.05], params=A, seed=4, status="diverged", status_step=250),  # reaches at 200
        run_rows("a5", [0.6], params=A, seed=5, status="stopped_early", status_step=100),
        run_rows("a6", [math.nan], params=A, seed=6, status="failed", steps=[0]),
        run_rows("b1", [0.5, 0.4], params=B, seed=1),
        run_rows("b2", [0.6, 0.3], params=B, seed=2),
        run_rows("b3", [0.7, 0.2], params=B, seed=3),
    )


# --- tidy ----------------------------------------------------------------------------------------------


def test_config_id_ignores_seed_prefix_number_spelling_and_absent_values():
    base = config_id({"lr": 1e-3, "model.memory_size": 64, "model.controller": "lstm"})
    assert config_id({"param.lr": 1e-3, "param.model.memory_size": 64.0, "model.controller": "lstm"}) == base
    assert config_id({"lr": 1e-3, "model.memory_size": np.int64(64), "model.controller": "lstm", "seed": 7}) == base
    assert config_id({"lr": 1e-3, "model.memory_size": 64, "model.controller": "lstm", "clip": math.nan}) == base
    assert config_id({"lr": 2e-3, "model.memory_size": 64, "model.controller": "lstm"}) != base
    assert config_id({"lr": 1e-3, "model.memory_size": 64, "model.controller": "ff"}) != base
    assert len(base) == 12 and int(base, 16) >= 0


def test_final_rows_take_the_last_evaluation_of_each_run(hand_made):
    finals = final_rows(hand_made)
    assert list(finals["run_id"]) == ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3"]
    assert dict(zip(finals["run_id"], finals["step"], strict=True))["a1"] == 300
    assert finals.loc[finals["run_id"] == "a2", "error"].item() == 0.09
    shuffled = final_rows(hand_made.sample(frac=1.0, random_state=0))
    assert dict(zip(shuffled["run_id"], shuffled["step"], strict=True)) == dict(
        zip(finals["run_id"], finals["step"], strict=True))


def test_param_columns_and_params_of_leave_the_seed_out(hand_made):
    df = hand_made.assign(**{"param.seed": 3})
    assert param_columns(df) == ["param.lr", "param.model.memory_size"]
    assert params_of(df.iloc[0]) == A


def test_validate_tidy_names_missing_columns_and_bad_statuses(hand_made):
    with pytest.raises(TidyError, match=r"missing columns config_id, seed\b"):
        validate_tidy(hand_made.drop(columns=["config_id", "seed"]))
    with pytest.raises(TidyError, match="missing columns cost_bits"):
        validate_tidy(hand_made, metrics=["cost_bits"])
    with pytest.raises(TidyError, match="got pruned"):
        validate_tidy(hand_made.assign(status="pruned"))
    with pytest.raises(TidyError, match="expected a pandas DataFrame"):
        validate_tidy([1, 2])
    assert validate_tidy(hand_made, metrics=["error"]) is hand_made


# --- hand-computed statistics ----------------------------------------------------------------------------


def test_steps_to_target_reports_censored_runs_as_not_reached(hand_made):
    stt = steps_to_target(hand_made, TARGET).set_index("run_id")
    assert stt.loc["a1", "steps_to_target"] == 300 and stt.loc["a2", "steps_to_target"] == 200
    assert stt.loc["a4", "steps_to_target"] == 200  # reached before it diverged
    for run in ("a3", "a5", "b1", "b3"):
        assert not stt.loc[run, "reached"] and math.isnan(stt.loc[run, "steps_to_target"])
    assert stt.loc["a3", "last_step"] == 300


def test_seed_stability_equals_hand_computed_values(hand_made):
    st = seed_stability(hand_made, TARGET, n_boot=500).set_index("config_id")
    a, b = st.loc[config_id(A)], st.loc[config_id(B)]
    # Full-budget runs of A: a1..a3 completed, a4 diverged; a5 (stopped) and a6 (failed) counted apart.
    assert (a["n_seeds"], a["n_stopped_early"], a["n_failed"], a["n_running"]) == (4, 1, 1, 0)
    assert a["success_rate"] == pytest.approx(2 / 4)
    assert a["divergence_rate"] == pytest.approx(1 / 4)
    assert a["median_error"] == pytest.approx(0.09)  # finals of completed runs: 0.05, 0.09, 0.2
    assert a["iqr_error"] == pytest.approx(0.145 - 0.07)  # linear quantiles of those three
    assert a["reached_rate"] == pytest.approx(3 / 4)
    assert a["median_steps_to_target"] == pytest.approx(250.0)  # 200, 200, 300, inf
    assert (b["n_seeds"], b["success_rate"], b["divergence_rate"]) == (3, 0.0, 0.0)
    assert b["median_error"] == pytest.approx(0.3)
    assert b["median_steps_to_target"] == math.inf and b["reached_rate"] == 0.0
    assert a["label"] == "ntm:" + config_id(A)[:6] and a["param.lr"] == 1e-3
    for row in (a, b):
        for name in ("success_rate", "median_error", "divergence_rate", "reached_rate"):
            assert row[name + "_lo"] <= row[name] <= row[name + "_hi"], name
    assert 0.0 <= a["success_rate_lo"] < 0.5 < a["success_rate_hi"] <= 1.0


def test_seed_stability_is_seeded(hand_made):
    first = seed_stability(hand_made, TARGET, n_boot=300, seed=3)
    pd.testing.assert_frame_equal(first, seed_stability(hand_made, TARGET, n_boot=300, seed=3))
    assert not first.equals(seed_stability(hand_made, TARGET, n_boot=300, seed=4))


def test_configuration_without_full_budget_runs_has_nan_statistics():
    df = frame(run_rows("x", [0.5], status="stopped_early"), run_rows("y", [0.4], params=B))
    st = seed_stability(df, TARGET, n_boot=100).set_index("config_id").loc[config_id(A)]
    assert st["n_seeds"] == 0 and st["n_stopped_early"] == 1
    assert math.isnan(st["success_rate"]) and math.isnan(st["median_error_lo"])


def test_learning_curves_median_and_band_per_step(hand_made):
    curves = learning_curves(hand_made).set_index(["config_id", "step"])
    at = curves.loc[(config_id(A), 100)]
    # step 100: a1..a4 (full budget) have 0.5, 0.4, 0.5, 0.3
    assert at["n"] == 4 and at["median"] == pytest.approx(0.45)
    assert at["lo"] == pytest.approx(np.quantile([0.5, 0.4, 0.5, 0.3], 0.25))
    assert at["hi"] == pytest.approx(np.quantile([0.5, 0.4, 0.5, 0.3], 0.75))
    assert curves.loc[(config_id(A), 200), "n"] == 4
    assert curves.loc[(config_id(A), 300), "n"] == 3  # the diverged run dropped out
    assert (config_id(A), 0) not in curves.index  # the failed run's row is not a curve point


# --- synthetic truth ---------------------------------------------------------------------------------------


def test_bootstrap_intervals_of_the_median_cover_the_truth_at_the_nominal_rate():
    """200 configurations x 20 seeds, final error = mu_c + N(0, 0.05^2): the 95% interval of the
    median final error should cover mu_c for about 95% of configurations."""
    rng = np.random.default_rng(1)
    n_configs, n_seeds = 200, 20
    mu = rng.uniform(0.1, 0.5, n_configs)
    error = mu[:, None] + 0.05 * rng.standard_normal((n_configs, n_seeds))
    df = pd.DataFrame(
        {
            "study": "s", "replication": None,
            "run_id": [f"r{c}-{s}" for c in range(n_configs) for s in range(n_seeds)],
            "trial_id": np.arange(n_configs * n_seeds),
            "config_id": np.repeat([f"c{c:03d}" for c in range(n_configs)], n_seeds),
            "seed": np.tile(np.arange(n_seeds), n_configs), "model": "ntm", "status": "completed",
            "status_step": math.nan, "step": 1000, "error": error.ravel(), "param.mu": np.repeat(mu, n_seeds),
        }
    )
    st = seed_stability(df, target=0.3, n_boot=1000, seed=0).set_index("config_id")
    truth = pd.Series(mu, index=[f"c{c:03d}" for c in range(n_configs)])
    covered = (st["median_error_lo"] <= truth) & (truth <= st["median_error_hi"])
    assert 0.90 <= covered.mean() <= 0.98, covered.mean()
    # The success rate's truth is P(N(mu, 0.05^2) <= 0.3); its intervals should cover it too.
    from statistics import NormalDist

    p = pd.Series([NormalDist(m, 0.05).cdf(0.3) for m in mu], index=truth.index)
    # Away from 0 and 1: there a rate's percentile interval collapses to a point (documented).
    inside = (p > 0.2) & (p < 0.8)
    covered_rate = (st["success_rate_lo"] <= p) & (p <= st["success_rate_hi"])
    assert inside.sum() >= 30 and covered_rate[inside].mean() >= 0.85, covered_rate[inside].mean()


def test_bootstrap_ci_of_a_mean_is_seeded_and_brackets_it():
    x = np.random.default_rng(0).normal(1.0, 1.0, 50)
    lo, hi = bootstrap_ci(x, np.mean, rng=0)
    assert (lo, hi) == bootstrap_ci(x, np.mean, rng=0)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / math.sqrt(50), rel=0.25)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([]), np.mean))


def test_search_vs_seed_variance_matches_hand_computed_spreads():
    studies = {"s0": [0.30, 0.20], "s1": [0.25, 0.40], "s2": [0.10, 0.50]}  # best: 0.20, 0.25, 0.10
    runs = []
    for name, errors in studies.items():
        for i, e in enumerate(errors):
            runs.append(run_rows(f"{name}-{i}", [e], params={"lr": 0.1 * (i + 1), "k": name}, study=name))
    # Replications (`mannstudy replicate`): a config over 3 seeds and another over 2, plus a stopped
    # run that must not count; they give the seed spread and are no search of their own.
    for s, e in enumerate([0.2, 0.3, 0.4]):
        runs.append(run_rows(f"rep-a{s}", [e], params=A, seed=s, study="s0", replication="r1"))
    for s, e in enumerate([0.1, 0.2]):
        runs.append(run_rows(f"rep-b{s}", [e], params=B, seed=s, study="s0", replication="r1"))
    runs.append(run_rows("rep-x", [0.0], params=B, seed=9, study="s1", replication="r1", status="stopped_early"))
    runs.append(run_rows("s2-x", [0.01], params=B, seed=9, study="s2", status="diverged"))
    result = search_vs_seed_variance(frame(*runs))
    best = result.best_per_study.set_index("study")["best"]
    assert best.to_dict() == {"s0": 0.20, "s1": 0.25, "s2": 0.10}
    assert result.n_studies == 3
    assert result.between_study_sd == pytest.approx(np.std([0.20, 0.25, 0.10], ddof=1))
    pooled = math.sqrt((0.02 + 0.005) / (2 + 1))  # SS of A: 0.02 (2 df); of B: 0.005 (1 df)
    assert result.n_configs_replicated == 2 and result.within_config_sd == pytest.approx(pooled)
    assert result.ratio == pytest.approx(result.between_study_sd / pooled)
    assert result.within_config_sd_ci[0] <= pooled <= result.within_config_sd_ci[1]


def test_search_variance_reflects_a_noisy_search():
    """Studies whose best-found error varies as much as seeds do give a ratio near 1 or below; a study
    set with wildly different outcomes gives a ratio well above 1."""
    rng = np.random.default_rng(2)
    runs = [run_rows(f"rep{s}", [0.2 + 0.05 * rng.standard_normal()], params=A, seed=s, replication="r")
            for s in range(12)]
    calm = [run_rows(f"c{k}", [0.2 + 0.05 * rng.standard_normal()], params={"k": k}, study=f"calm{k}")
            for k in range(10)]
    wild = [run_rows(f"w{k}", [0.2 + 0.5 * k], params={"k": k}, study=f"wild{k}") for k in range(10)]
    calm_ratio = search_vs_seed_variance(frame(*runs, *calm)).ratio
    wild_ratio = search_vs_seed_variance(frame(*runs, *wild)).ratio
    assert calm_ratio < 1.6 and wild_ratio > 10


# --- plots -----------------------------------------------------------------------------------------------


def _drawn(fig: Figure) -> bool:
    """Every axes that is shown has at least one artist (line, patch, collection, image or text)."""
    shown = [ax for ax in fig.axes if ax.get_visible()]
    return bool(shown) and all(
        ax.lines or ax.patches or ax.collections or ax.images or ax.texts for ax in shown
    )


def test_stability_plots_draw_something(hand_made, tmp_path):
    curves = learning_curves(hand_made)
    fig = learning_curves_figure(curves, target=TARGET)
    assert isinstance(fig, Figure) and _drawn(fig)
    assert len(fig.axes[0].lines) >= 2 and fig.axes[0].collections  # medians and bands
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    fig = success_rate_figure(seed_stability(hand_made, TARGET, n_boot=200))
    assert _drawn(fig) and len(fig.axes[0].patches) == 2


def test_stability_plots_say_no_data_and_refuse_wrong_input(hand_made):
    empty = learning_curves(hand_made.iloc[0:0])
    fig = learning_curves_figure(empty)
    assert _drawn(fig) and "no data" in fig.axes[0].texts[0].get_text()
    st = seed_stability(frame(run_rows("x", [0.5], status="stopped_early")), TARGET, n_boot=50)
    assert "no data" in success_rate_figure(st).axes[0].texts[0].get_text()
    with pytest.raises(PlotError, match="missing columns"):
        learning_curves_figure(hand_made)
