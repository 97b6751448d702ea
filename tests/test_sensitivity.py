"""Hyperparameter sensitivity on synthetic studies whose truth is known, with Optuna's real evaluators."""

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from analysis.plots import (
    PlotError,
    importance_figure,
    interaction_figure,
    marginals_figure,
    status_figure,
)
from analysis.sensitivity import (
    SensitivityError,
    boundary_check,
    build_study,
    hyperparameter_sensitivity,
    importance,
    importance_table,
    infer_distributions,
    interaction,
    marginals,
    min_trials,
    ped_anova_min_trials,
    rank_correlation,
    seed_noise,
    select_at_rung,
    select_trials,
    status_table,
)
from analysis.tidy import config_id

SPACE = {
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "model.memory_size": IntDistribution(16, 128),
    "model.controller": CategoricalDistribution(["lstm", "ff"]),
    "clip": FloatDistribution(1.0, 10.0),
}


def sample(rng):
    """One configuration drawn uniformly from SPACE (log-uniform lr)."""
    return {
        "lr": float(10 ** rng.uniform(-5, -1)),
        "model.memory_size": int(rng.integers(16, 129)),
        "model.controller": str(rng.choice(["lstm", "ff"])),
        "clip": float(rng.uniform(1.0, 10.0)),
    }


def u_lr(params):
    """lr's position in its log range: 0 at 1e-5, 1 at 1e-1."""
    return (math.log10(params["lr"]) + 5) / 4


def rows_of(run_id, params, error, status="completed", seed=0, model="ntm"):
    """Two evaluations per run (the first one worse), the last one carrying ``error``."""
    return [
        dict(study="s", replication=None, run_id=run_id, trial_id=run_id, config_id=config_id(params), seed=seed,
             model=model, status=status, status_step=math.nan if status == "completed" else step, step=step,
             error=value, **{"param." + k: v for k, v in params.items()})
        for step, value in ((500, error + 0.3), (1000, error))
    ]


def study_frame(groups, seed=0):
    """groups: [(status, n_runs, error_of(params, rng))]; one seed per configuration."""
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for status, n, error_of in groups:
        for _ in range(n):
            params = sample(rng)
            rows += rows_of(f"r{k:03d}", params, error_of(params, rng), status)
            k += 1
    df = pd.DataFrame(rows)
    return df.astype({"param.model.memory_size": "Int64"})


def lr_only(params, rng):
    return 0.4 * u_lr(params) + rng.normal(0.0, 0.02)


@pytest.fixture(scope="module")
def mixed_study():
    """80 completed trials where only lr matters; the excluded ones carry other, misleading signals:
    stopped-early trials look best at large memory, diverged ones at small clip."""
    return study_frame(
        [
            ("completed", 80, lr_only),
            ("stopped_early", 30, lambda p, rng: 0.8 * (1 - p["model.memory_size"] / 128)),
            ("diverged", 10, lambda p, rng: p["clip"] / 20),
            ("failed", 2, lambda p, rng: math.nan),
            ("running", 1, lambda p, rng: 0.5),
        ]
    )


@pytest.fixture(scope="module")
def mixed_result(mixed_study):
    return hyperparameter_sensitivity(mixed_study, distributions=SPACE, seed=0, n_boot=20, n_refits=20)


# --- which trials ----------------------------------------------------------------------------------


def test_only_completed_trials_are_used_and_the_rest_counted(mixed_study, mixed_result):
    sel = mixed_result.selection
    completed = set(mixed_study.loc[mixed_study["status"] == "completed", "run_id"])
    assert sel.n_used == 80 and set(sel.run_ids) == completed
    assert sel.excluded == {"stopped_early": 30, "diverged": 10, "failed": 2, "running": 1}
    study = mixed_result.study
    assert len(study.trials) == 80 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {t.user_attrs["run_id"] for t in study.trials} == completed
    assert (mixed_result.importances["n"] == 80).all()
    status = mixed_result.status.set_index("status")
    assert status["n_runs"].to_dict() == {
        "completed": 80, "stopped_early": 30, "diverged": 10, "failed": 2, "running": 1,
    }
    assert status["n_used"].to_dict() == {"completed": 80, "stopped_early": 0, "diverged": 0, "failed": 0, "running": 0}
    # At the common rung (step 1000, which every stopped and diverged run here reached) only the failed
    # run (no finite error) and the running one are left out.
    assert status["n_used_at_rung"].to_dict() == {
        "completed": 80, "stopped_early": 30, "diverged": 10, "failed": 0, "running": 0,
    }
    assert mixed_result.rung.selection.step == 1000 and mixed_result.rung.basis == "step 1000"


def test_the_common_rung_is_the_last_step_every_used_trial_reached():
    """A stopped trial evaluated at 500 only sets the rung to 500; a run that diverged before it is left out."""
    df = study_frame([("completed", 3, lr_only)])
    stopped = pd.DataFrame(rows_of("s1", sample(np.random.default_rng(9)), 0.7, "stopped_early")[:1])
    early = pd.DataFrame(rows_of("d1", sample(np.random.default_rng(8)), 0.7, "diverged")).assign(step=[100, 200])
    sel = select_at_rung(pd.concat([df, stopped, early], ignore_index=True))
    assert sel.step == 500 and sorted(sel.run_ids) == ["r000", "r001", "r002", "s1"]
    assert sel.excluded == {"diverged before step 500": 1}
    at_500 = df[df["step"] == 500].set_index("run_id")["error"]
    got = sel.used.set_index("run_id")["error"]
    assert got["r000"] == at_500["r000"] and got["s1"] == pytest.approx(1.0)  # 0.7 + 0.3 at the first evaluation


def test_completed_trials_without_a_finite_objective_are_excluded_and_counted():
    df = study_frame([("completed", 5, lr_only), ("completed", 2, lambda p, rng: math.nan)])
    sel = select_trials(df)
    assert sel.n_used == 5 and sel.excluded == {"completed, non-finite error": 2}
    assert status_table(df).set_index("status").loc["completed"].tolist() == [7, 5, 5]


# --- known truth -------------------------------------------------------------------------------------


def test_the_one_driving_hyperparameter_ranks_first_with_an_interval_excluding_zero(mixed_result):
    full = mixed_result.full
    table = full.table
    assert full.estimated and table.index[0] == "lr"
    assert table.loc["lr", "importance_lo"] > 0.3 and bool(table.loc["lr", "above_noise"])
    assert not table.drop(index="lr")["above_noise"].any()  # the others are within noise
    # lr explains nearly everything: the surrogate's R^2 is high and lr's importance approaches it
    assert full.explained > 0.8 and full.explained_ci[0] > 0.6
    assert table.loc["lr", "importance"] <= full.explained_ci[1] + 0.1
    for column in ("fanova", "abs_rank_corr"):
        assert table[column].idxmax() == "lr", column
    assert table.loc["lr", "rank_corr"] > 0.9  # error rises with lr in this synthetic study
    assert table["fanova"].sum() == pytest.approx(1.0)
    # fANOVA's share of lr with its bootstrap interval over trials: away from 0, and above every other's
    assert table.loc["lr", "fanova_lo"] > 0.5 > table.drop(index="lr")["fanova_hi"].max()
    assert (table["fanova_lo"] <= table["fanova_hi"]).all() and full.n_refits == 20
    # 80 trials: PED-ANOVA, which keeps only the top 10%, is not estimated
    assert table[["ped_anova", "ped_anova_lo", "ped_anova_hi"]].isna().all().all()
    assert full.evaluator_why == {"ped_anova": "not estimated: 80 trials, needs at least 100 (PED-ANOVA keeps only "
                                               "the top 10% of the trials)"}
    assert table.loc["model.controller", "kind"] == "categorical" and table.loc["lr", "log"]


def test_ped_anova_ranks_the_driver_first_with_an_interval_from_its_minimum_on():
    df = study_frame([("completed", ped_anova_min_trials(), lr_only)], seed=3)
    imp = importance(select_trials(df), SPACE, evaluators=("ped_anova",), n_boot=10)
    table = imp.table
    assert imp.evaluator_why == {} and table["ped_anova"].idxmax() == "lr"
    assert table.loc["lr", "ped_anova_lo"] > 0.3 > table.drop(index="lr")["ped_anova_hi"].max()
    assert table["ped_anova"].sum() == pytest.approx(1.0)
    assert ped_anova_min_trials(0.1) == 100 and ped_anova_min_trials(0.05) == 200


def test_the_rung_analysis_sees_what_the_survivors_hide():
    """Small memories make the error 0.5 worse; ASHA stopped every small-memory trial at its first rung
    (step 500). Among the survivors memory hardly varies and shows nothing; at the rung it is found."""
    rng = np.random.default_rng(11)
    rows = []
    for k in range(80):
        params = sample(rng)
        small = params["model.memory_size"] < 72
        error = 0.4 * u_lr(params) + 0.5 * small + rng.normal(0.0, 0.02)
        run = rows_of(f"r{k:03d}", params, error, "stopped_early" if small else "completed")
        rows += run[:1] if small else run  # a stopped run has its first evaluation only
    result = hyperparameter_sensitivity(pd.DataFrame(rows), distributions=SPACE, n_boot=20, n_refits=0)
    rung, full = result.rung, result.full
    assert rung.selection.step == 500 and rung.selection.n_used == 80
    assert rung.table.index[0] == "model.memory_size" and bool(rung.table.loc["model.memory_size", "above_noise"])
    assert full.selection.n_used < 80 and full.table.index[0] == "lr"
    assert full.table.loc["model.memory_size", "importance"] < rung.table.loc["model.memory_size", "importance"] / 3


def test_a_null_study_puts_no_parameter_above_noise():
    df = study_frame([("completed", 40, lambda p, rng: rng.normal(0.3, 0.05))], seed=5)
    full = hyperparameter_sensitivity(df, distributions=SPACE, n_boot=20, n_refits=0).full
    assert full.estimated and full.selection.n_used == min_trials(4) == 40
    assert not full.table["above_noise"].any(), full.table[["importance", "importance_lo", "importance_hi"]]
    assert full.explained_ci[0] < 0  # the surrogate explains nothing it can show


def test_a_driver_is_found_at_the_minimum_number_of_trials():
    df = study_frame([("completed", 40, lr_only)], seed=6)
    table = hyperparameter_sensitivity(df, distributions=SPACE, n_boot=20, n_refits=0).full.table
    assert table.index[0] == "lr" and bool(table.loc["lr", "above_noise"])


def test_below_the_minimum_importance_is_not_estimated_and_holds_no_number():
    df = study_frame([("completed", 3, lr_only), ("stopped_early", 2, lr_only)])
    result = hyperparameter_sensitivity(df, distributions=SPACE, n_boot=10)
    for analysis, n in ((result.full, 3), (result.rung, 5)):
        assert not analysis.estimated
        assert analysis.why == (f"not estimated: {n} trials, needs at least 40 (10 per searched parameter, "
                                "4 searched, and never fewer than 20)")
        numbers = analysis.table.drop(columns=["kind", "log", "n"])
        assert numbers.isna().all().all() and "fanova_lo" in numbers and "ped_anova_hi" in numbers
        assert analysis.evaluator_why == {"fanova": analysis.why, "ped_anova": analysis.why}
        assert math.isnan(analysis.explained)
    assert result.interaction is None
    assert min_trials(1) == 20 and min_trials(3) == 30


def test_rank_correlation_spearman_and_categorical_eta():
    x = pd.Series([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(x, pd.Series([1.0, 3.0, 2.0, 4.0]), categorical=False) == pytest.approx(0.8)
    assert rank_correlation(x, pd.Series([4.0, 3.0, 2.0, 1.0]), categorical=False) == pytest.approx(-1.0)
    # Two categories: eta on the ranks equals |rho| with the categories coded 0/1.
    cat = pd.Series(["a", "b", "a", "b", "b", "a"])
    y = pd.Series([0.1, 0.5, 0.3, 0.2, 0.9, 0.4])
    coded = (cat == "b").astype(float)
    assert rank_correlation(cat, y, categorical=True) == pytest.approx(
        abs(rank_correlation(coded, y, categorical=False)))
    assert rank_correlation(pd.Series(["a", "b", "c"]), pd.Series([1.0, 1.0, 1.0]), categorical=True) != 1.0


def test_seed_noise_share_is_estimated_near_the_truth():
    """40 configs x 5 seeds; error = 0.4 u + N(0, 0.08^2), u ~ U(0, 1): the seeds' share of the
    variance is 0.08^2 / (0.4^2 / 12 + 0.08^2) ~ 0.32."""
    rng = np.random.default_rng(3)
    rows = []
    for c in range(40):
        params = sample(rng)
        for s in range(5):
            rows += rows_of(f"c{c}-s{s}", params, 0.4 * u_lr(params) + rng.normal(0.0, 0.08), seed=s)
    used = select_trials(pd.DataFrame(rows)).used
    noise = seed_noise(used)
    truth = 0.08**2 / (0.4**2 / 12 + 0.08**2)
    assert noise.n_configs == 40 and noise.n_runs == 200
    assert noise.share == pytest.approx(truth, abs=0.1)
    assert noise.ci[0] <= truth <= noise.ci[1] and noise.ci[1] - noise.ci[0] < 0.4
    assert noise.within_var == pytest.approx(0.08**2, rel=0.25)


def test_seed_noise_is_not_estimated_without_replicated_configs(mixed_result):
    noise = mixed_result.seed_noise
    assert noise.n_configs == 0 and math.isnan(noise.share)
    assert noise.why == "not estimated: 0 configurations, needs at least 3 (configurations with two or more seeds)"


def test_seed_noise_and_the_surrogates_explained_variance_add_up_to_about_one():
    """20 configurations x 3 seeds, error = 0.4 u + N(0, 0.08^2): the surrogate can explain the
    configurations' share (~0.68) and no more; the seeds carry the rest (~0.32)."""
    rng = np.random.default_rng(12)
    rows = []
    for c in range(20):
        params = sample(rng)
        for s in range(3):
            rows += rows_of(f"c{c}-s{s}", params, 0.4 * u_lr(params) + rng.normal(0.0, 0.08), seed=s)
    result = hyperparameter_sensitivity(pd.DataFrame(rows), distributions=SPACE, n_boot=20, n_refits=0)
    noise, full = result.seed_noise, result.full
    assert noise.n_configs == 20 and noise.why is None
    assert full.estimated and full.explained + noise.share == pytest.approx(1.0, abs=0.25)
    assert full.table.index[0] == "lr" and bool(full.table.loc["lr", "above_noise"])


def test_boundary_check_flags_an_edge_optimum_and_not_a_middle_one():
    """error falls toward lr's low bound (optimum on the edge) and is best at memory_size 72 (middle)."""
    def error(p, rng):
        return u_lr(p) + 0.2 * ((p["model.memory_size"] - 72) / 56) ** 2 + rng.normal(0.0, 0.01)

    used = select_trials(study_frame([("completed", 120, error)], seed=4)).used
    for known in (SPACE, {}):
        dists = infer_distributions(used, known)
        check = boundary_check(used, dists, known=list(known)).set_index("param")
        assert check.loc["lr", "at_boundary"] == "low"
        assert check.loc["model.memory_size", "at_boundary"] == ""
        assert check.loc["clip", "at_boundary"] == ""
        assert "model.controller" not in check.index  # categorical: no boundary
        assert check.loc["lr", "bounds"] == ("search space" if known else "observed")
    assert check.loc["lr", "n_top"] == 12


# --- distributions, study, marginals, interaction ------------------------------------------------------


def test_distributions_are_inferred_from_the_values_unless_given(mixed_result):
    used = mixed_result.selection.used
    inferred = infer_distributions(used)
    # lr spans ~4 decades, but a log scale comes from the study file only, never from the values
    assert isinstance(inferred["lr"], FloatDistribution) and not inferred["lr"].log
    assert isinstance(inferred["model.memory_size"], IntDistribution) and not inferred["model.memory_size"].log
    assert isinstance(inferred["clip"], FloatDistribution) and not inferred["clip"].log
    assert set(inferred["model.controller"].choices) == {"lstm", "ff"}
    assert inferred["lr"].low == used["param.lr"].min() and inferred["lr"].high == used["param.lr"].max()
    assert mixed_result.distributions == SPACE
    two_models = pd.concat([used.assign(model="ntm"), used.assign(model="dnc", run_id=used["run_id"] + "d")])
    assert infer_distributions(two_models)["model"].choices == ("dnc", "ntm")


def test_a_value_outside_the_given_search_space_is_a_one_line_error(mixed_result):
    used = mixed_result.selection.used
    narrow = {**SPACE, "clip": FloatDistribution(1.0, 2.0)}
    with pytest.raises(SensitivityError, match=r"^param\.clip: run r\d+ has .*, outside the search space"):
        build_study(used, narrow)


def test_marginals_and_interaction_tables(mixed_result):
    used = mixed_result.selection.used
    by_param = {m.param: m for m in mixed_result.marginals}
    assert list(by_param) == list(mixed_result.importances.index)
    lr = by_param["lr"]
    assert len(lr.points) == 80 and lr.summary["n"].sum() == 80 and lr.log
    medians = lr.summary["median"].dropna().to_numpy()
    assert (np.diff(medians) > 0).all()  # error rises with lr, bin by bin
    assert list(by_param["model.controller"].summary["label"]) == ["lstm", "ff"]  # the study file's order
    table = mixed_result.interaction
    assert table is None or (table.params[0] == "lr" and table.count.to_numpy().sum() == 80)
    assert table.median.shape == table.count.shape
    direct = interaction(used, mixed_result.distributions, ("lr", "clip"), n_bins=3)
    assert direct.count.shape == (3, 3) and direct.count.to_numpy().sum() == 80
    # The lr bins order the median error whatever the clip bin.
    assert (np.diff(direct.median.to_numpy(), axis=0) > 0).all()
    assert [m.param for m in marginals(used, mixed_result.distributions, params=["clip"])] == ["clip"]


def test_fanova_is_seeded(mixed_result):
    used, dists = mixed_result.selection.used.head(30), mixed_result.distributions
    a, b = (importance_table(build_study(used, dists), used, dists, evaluators=("fanova",), seed=1) for _ in "ab")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(SensitivityError, match="evaluators: expected some of fanova, ped_anova, got shap"):
        importance_table(mixed_result.study, used, dists, evaluators=("shap",))


def test_numeric_choices_keep_the_study_files_order():
    """Choices [64, 16, 32] as written: ranks and bins follow that order, not the values' order."""
    space = {"model.memory_size": CategoricalDistribution([64, 16, 32])}
    rng = np.random.default_rng(7)
    rows = []
    for k in range(30):
        m = int(rng.choice([64, 16, 32]))
        rows += rows_of(f"m{k}", {"model.memory_size": m}, {64: 0.1, 16: 0.2, 32: 0.3}[m])
    used = select_trials(pd.DataFrame(rows)).used
    table = hyperparameter_sensitivity(pd.DataFrame(rows), distributions=space, n_boot=10, n_refits=0).full.table
    assert table.loc["model.memory_size", "rank_corr"] == pytest.approx(1.0)  # rises along 64, 16, 32
    m = marginals(used, space)[0]
    assert list(m.summary["label"]) == ["64", "16", "32"]


# --- plots -----------------------------------------------------------------------------------------------


def _drawn(fig: Figure) -> bool:
    """Every axes that is shown has at least one artist (line, patch, collection, image or text)."""
    shown = [ax for ax in fig.axes if ax.axison or ax.texts]
    return bool(shown) and all(ax.lines or ax.patches or ax.collections or ax.images or ax.texts for ax in shown)


def test_sensitivity_plots_draw_something(mixed_result, tmp_path):
    figures = {
        "importance": importance_figure([mixed_result.full, mixed_result.rung], seed_noise=mixed_result.seed_noise),
        "marginals": marginals_figure(mixed_result.marginals),
        "interaction": interaction_figure(mixed_result.interaction),
        "status": status_figure(mixed_result.status),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure) and _drawn(fig), name
    figures["marginals"].savefig(tmp_path / "marginals.png")
    assert (tmp_path / "marginals.png").stat().st_size > 0
    assert len(figures["importance"].axes) == 2  # full budget, common rung
    assert len(figures["importance"].axes[0].patches) == 4
    assert len(figures["status"].axes[0].patches) == 5
    assert len(figures["marginals"].axes) >= 4


def test_sensitivity_plots_say_no_data_and_refuse_wrong_input():
    result = hyperparameter_sensitivity(study_frame([("diverged", 3, lr_only)]), n_boot=10)
    for fig in (importance_figure([result.full, result.rung]), marginals_figure(result.marginals),
                interaction_figure(result.interaction)):
        assert _drawn(fig) and any("no data" in t.get_text() for ax in fig.axes for t in ax.texts)
    with pytest.raises(PlotError, match="missing columns n_used"):
        status_figure(pd.DataFrame({"status": ["completed"], "n_runs": [1]}))
    with pytest.raises(PlotError):
        marginals_figure([1, 2])
    with pytest.raises(PlotError):
        importance_figure([result.full.table])
