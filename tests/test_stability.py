"""Seed stability and the tidy schema, on hand-made frames and synthetic studies with known truth."""

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis import stats
from analysis.plots import PlotError, learning_curves_figure, success_rate_figure, survival_figure
from analysis.stability import (
    compare_arms,
    learning_curves,
    median_ci,
    rank_configurations,
    seed_stability,
    survival_curves,
)
from analysis.tidy import (
    DEFAULT_STOP_AFTER_EVALS,
    TidyError,
    config_id,
    final_rows,
    param_columns,
    params_of,
    reach_times,
    study_target,
    study_target_setting,
    validate_tidy,
)

TARGET = 0.1


def run_rows(run_id, errors, *, params=None, seed=0, status="completed", model="ntm", study="s", steps=None,
             status_step=math.nan, replication=None, after=1):
    """Tidy rows of one run: one per evaluation, steps 100, 200, ... unless given. ``after``: the run's
    stop_after_evals (1: the first evaluation at or below the target reaches it)."""
    params = {"lr": 1e-3, "model.memory_size": 32} if params is None else params
    steps = [100 * (i + 1) for i in range(len(errors))] if steps is None else steps
    return [
        dict(study=study, replication=replication, run_id=run_id, trial_id=run_id, config_id=config_id(params),
             seed=seed, model=model, status=status, status_step=status_step, step=step, error=error,
             stop_after_evals=after, **{"param." + k: v for k, v in params.items()})
        for step, error in zip(steps, errors, strict=True)
    ]


def frame(*runs):
    return pd.DataFrame([row for run in runs for row in run])


A = {"lr": 1e-3, "model.memory_size": 32}
B = {"lr": 1e-2, "model.memory_size": 32}


@pytest.fixture(scope="module")
def hand_made():
    """Config A: 2 completed successes, 1 completed failure, 1 divergence after it reached the target, 1 stopped
    early, 1 failed; config B: never."""
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


def test_reach_times_report_censored_runs_as_not_reached(hand_made):
    stt = reach_times(hand_made, TARGET).set_index("run_id")
    assert stt.loc["a1", "steps_to_target"] == 300 and stt.loc["a2", "steps_to_target"] == 200
    assert stt.loc["a4", "steps_to_target"] == 200  # reached before it diverged
    for run in ("a3", "a5", "b1", "b3"):
        assert not stt.loc[run, "reached"] and math.isnan(stt.loc[run, "steps_to_target"])
    assert stt.loc["a3", "last_step"] == 300 and stt.loc["a3", "time"] == 300  # censored at its last step
    assert stt.loc["a5", "time"] == 100  # stopped by ASHA at 100: censored there


def test_seed_stability_counts_every_ended_seed(hand_made):
    st = seed_stability(hand_made, TARGET).set_index("config_id")
    a, b = st.loc[config_id(A)], st.loc[config_id(B)]
    # A: a1..a3 completed, a4 diverged, a5 stopped early (censored, in the denominator); a6 failed (apart).
    assert (a["n_runs"], a["n_completed"], a["n_diverged"], a["n_stopped_early"], a["n_failed"]) == (5, 3, 1, 1, 1)
    # success = reached the target (a1, a2, and a4 before it diverged): the same runs as the time to target
    assert a["n_success"] == 3 and a["success_rate"] == pytest.approx(3 / 5)
    assert (a["success_rate_lo"], a["success_rate_hi"]) == pytest.approx(stats.proportion_ci(3, 5))
    assert a["divergence_rate"] == pytest.approx(1 / 5)
    assert a["median_error"] == pytest.approx(0.09)  # finals of completed runs: 0.05, 0.09, 0.2
    assert math.isnan(a["median_error_lo"]) and a["median_error_why"] == "not estimated: 3 runs, needs at least 6"
    assert a["iqr_error"] == pytest.approx(0.145 - 0.07)  # linear quantiles of those three
    assert a["n_reached"] == 3  # a1, a2 and a4 (before it diverged)
    # Kaplan-Meier over 200 (a2, a4), 300 (a1), 300 censored (a3), 100 censored (a5): S = 1, 0.5 at 200
    assert a["median_steps_to_target"] == 200.0
    assert (b["n_runs"], b["success_rate"], b["divergence_rate"]) == (3, 0.0, 0.0)
    assert 0.0 == b["success_rate_lo"] < b["success_rate_hi"] < 0.6  # 0/3: an interval, never zero width
    assert b["median_error"] == pytest.approx(0.3)
    assert b["median_steps_to_target"] == math.inf and b["n_reached"] == 0
    assert a["label"] == "ntm:" + config_id(A)[:6] and a["param.lr"] == 1e-3


def test_final_error_is_the_end_of_run_evaluation_but_success_is_the_periodic_one(hand_made):
    # b1's final evaluation says 0.01, its periodic ones never reached the target: not a success;
    # a1's says 0.5 after its periodic ones reached it: a success (and reached at 300).
    final = np.select([hand_made["run_id"].eq("b1") & hand_made["step"].eq(200),
                       hand_made["run_id"].eq("a1") & hand_made["step"].eq(300)], [0.01, 0.5], np.nan)
    st = seed_stability(hand_made.assign(final_error=final), TARGET).set_index("config_id")
    a, b = st.loc[config_id(A)], st.loc[config_id(B)]
    assert b["n_success"] == 0 and b["median_error"] == pytest.approx(0.2)  # finals 0.01, 0.2, 0.3
    assert a["n_success"] == a["n_reached"] == 3 and a["median_error"] == pytest.approx(0.2)  # 0.5, 0.09, 0.2


def test_one_definition_of_success_and_steps_to_target():
    """Two consecutive evaluations at or below the target (stop_after_evals 2), whatever final_error says."""
    runs = [
        run_rows("x", [0.05, 0.5, 0.05, 0.04], after=2),  # a lone dip at 100 does not count; reached at 300
        run_rows("y", [0.5, 0.05], after=2),  # one evaluation below: not reached ...
        run_rows("z", [0.5, 0.05, 0.06, 0.3], seed=1, after=2),  # reached at 200, then got worse
        run_rows("w", [0.05, 0.07], seed=2, after=2, status="stopped_early", status_step=200),  # reached, stopped
        run_rows("v", [0.5], seed=3, after=2, status="stopped_early", status_step=100),  # stopped: censored
    ]
    df = frame(*runs)
    df["final_error"] = np.where(df["run_id"].eq("y") & df["step"].eq(200), 0.0, np.nan)  # ... final_error 0
    df.loc[df["run_id"].eq("z") & df["step"].eq(400), "final_error"] = 0.3
    reach = reach_times(df, TARGET).set_index("run_id")
    assert reach["steps_to_target"].to_dict() == pytest.approx(
        {"x": 300, "y": math.nan, "z": 200, "w": 100, "v": math.nan}, nan_ok=True)
    assert reach.loc["v", "time"] == 100 and reach.loc["y", "time"] == 200  # censored at the last step
    assert reach_times(df, TARGET, after=1).loc[0, "steps_to_target"] == 100  # x's dip counts with a streak of 1
    st = seed_stability(df, TARGET).iloc[0]
    assert (st["n_runs"], st["n_success"], st["n_reached"], st["n_stopped_early"]) == (5, 3, 3, 2)
    times = reach["time"].to_numpy(dtype=float)
    assert st["median_steps_to_target"] == stats.median_time(times, reach["reached"].to_numpy())[0] == 300
    ranked = rank_configurations(df, TARGET).iloc[0]
    assert (ranked["n_success"], ranked["n_runs"], ranked["runs"]) == (3, 5, 3)  # judged on 3 completed runs


def test_study_target_is_stop_at_error_else_the_task_target():
    df = frame(run_rows("x", [0.5]), run_rows("y", [0.5], seed=1))
    assert study_target(df) is None
    df["target_error"] = 0.05
    assert study_target(df) == 0.05
    df["stop_at_error"] = [0.2, None]
    assert study_target(df) == 0.2
    assert study_target_setting(df) == ("stop_at_error", 0.2)
    df = df.drop(columns="stop_at_error").assign(**{"param.stop_at_error": 0.3})
    assert study_target(df) == 0.3 and study_target_setting(df) == ("stop_at_error", 0.3)


def test_the_default_streak_is_trainings():
    from dataclasses import fields

    from mann.train import TrainConfig

    assert DEFAULT_STOP_AFTER_EVALS == next(f.default for f in fields(TrainConfig) if f.name == "stop_after_evals")


def test_reach_times_agree_with_the_converged_step_training_logs():
    """A real run: the step training stopped on (converged_step) is the step reach_times finds in its logged
    evaluations, with a threshold chosen so that a streak is broken on the way."""
    from mann.train import fit, make_train_config

    base = {"task.bits": 3, "task.max_length": 3, "optimizer": "adam", "lr": 3e-2, "batch_size": 4,
            "max_steps": 60, "eval_every": 2, "eval_batches": 1, "gen_scales": [], "device": "cpu",
            "final_eval_sequences": 4, "model.hidden_size": 8, "stop_after_evals": 3}
    errors = []
    fit(make_train_config("lstm", "copy", base), on_eval=lambda m, save: errors.append(m["error"]))
    # the lowest threshold at which some evaluation is below it while the next is not, and a streak follows
    candidates = sorted({e for e, nxt in zip(errors, errors[1:], strict=False) if nxt > e})
    for threshold in candidates:
        logged = []
        cfg = make_train_config("lstm", "copy", {**base, "stop_at_error": threshold})
        result = fit(cfg, on_eval=lambda m, save, seen=logged: seen.append(m))
        converged = result.metrics.get("converged_step", math.inf)
        if math.isfinite(converged) and any(m["error"] <= threshold for m in logged if m["step"] < converged):
            break  # converged, after a streak that was broken
    else:
        pytest.fail(f"no threshold gives a broken streak before convergence: errors {errors}")
    df = pd.DataFrame([dict(study="s", replication=None, run_id="r", trial_id="r", config_id="c", seed=0,
                            model="lstm", status="completed", status_step=math.nan, stop_at_error=threshold,
                            stop_after_evals=3, **m) for m in logged])
    reach = reach_times(df, study_target(df)).iloc[0]
    assert reach["reached"] and reach["steps_to_target"] == result.metrics["converged_step"]
def test_asha_stopped_seeds_stay_in_the_denominator_as_censored():
    """Ten seeds of one configuration: four succeed, six are stopped by ASHA before the target."""
    runs = [run_rows(f"ok{s}", [0.5, 0.05], seed=s) for s in range(4)]
    runs += [run_rows(f"st{s}", [0.5], seed=10 + s, status="stopped_early", status_step=100) for s in range(6)]
    st = seed_stability(frame(*runs), TARGET).iloc[0]
    assert (st["n_runs"], st["n_stopped_early"], st["n_success"]) == (10, 6, 4)
    assert st["success_rate"] == pytest.approx(0.4)
    # 4 of 10 reached the target (at 200); the 6 stopped at 100 are censored before: KM survival after 200
    # is 0 (every run still at risk reached it), so the median is 200.
    assert st["n_reached"] == 4 and st["median_steps_to_target"] == 200.0


def test_a_configuration_without_ended_runs_has_no_rates():
    df = frame(run_rows("x", [0.5], status="running"), run_rows("y", [0.4], params=B))
    st = seed_stability(df, TARGET).set_index("config_id").loc[config_id(A)]
    assert st["n_runs"] == 0 and st["n_running"] == 1
    assert math.isnan(st["success_rate"]) and math.isnan(st["median_error"])


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


def test_median_ci_is_exact_and_refuses_below_six_runs():
    assert median_ci([0.3, 0.1, 0.2])[3] == "not estimated: 3 runs, needs at least 6"
    med, lo, hi, why = median_ci(np.arange(6.0))
    assert why is None and (lo, hi) == (0.0, 5.0) and med == 2.5  # 1 - 2/64 = 0.969 >= 0.95
    med, lo, hi, _ = median_ci(np.arange(20.0))
    assert (lo, hi) == (5.0, 14.0)  # j = 6: 1 - 2 P(Bin(20, 1/2) <= 5) = 0.959; j = 7 gives 0.885
    # coverage at 6, 10 and 20 runs over 4000 simulated studies of a skewed distribution: at least nominal
    rng = np.random.default_rng(0)
    for n in (6, 10, 20):
        j = int(median_ci(np.arange(float(n)))[1])  # the interval is (x_(j+1), x_(n-j)), 0-based j
        x = np.sort(rng.exponential(1.0, (4000, n)), axis=1)
        truth = math.log(2.0)
        covered = (x[:, j] <= truth) & (truth <= x[:, n - 1 - j])
        assert 0.95 <= covered.mean() <= 0.99, (n, covered.mean())


def arm_study(rng, rates, n, final_of=None):
    """A study whose arms (models) succeed with the given rates: success reaches the target at step 200."""
    runs = []
    for model, p in rates.items():
        for s in range(n):
            ok = rng.random() < p
            errors = [0.5, 0.05] if ok else [0.5, 0.4 + 0.2 * rng.random()]
            runs.append(run_rows(f"{model}{s}", errors, seed=s, model=model, params={"lr": 1e-3}))
    return frame(*runs)


def test_a_much_better_arm_is_detected_after_holm():
    """20 seeds each: ntm succeeds at 0.9, lstm at 0.1. Every outcome favours ntm, Holm-adjusted p < 0.05."""
    df = arm_study(np.random.default_rng(1), {"ntm": 0.9, "lstm": 0.1}, 20)
    table = compare_arms(df, TARGET).set_index("outcome")
    assert list(table["arm_a"]) == ["lstm"] * 3  # pairs in sorted order: lstm vs ntm
    rate = table.loc["success rate"]
    assert rate["estimate"] < -0.5 and rate["hi"] < 0 and rate["p_holm"] < 0.05
    value = table.loc["final error"]
    assert value["estimate"] > 0.5 and value["lo"] > 0 and value["p_holm"] < 0.05  # lstm's errors are higher
    assert table.loc["steps to target", "p_holm"] < 0.05
    assert (table["p_holm"] >= table["p"]).all() and table["n_a"].tolist() == [20, 20, 20]


def test_equal_arms_are_rarely_declared_different():
    """30 simulated studies of three equal arms (10 seeds, rate 0.5): the Holm family (9 tests) rejects
    anything in about 5% of them (1.5 expected; 4 or more has probability 0.06 under a 5% rate)."""
    rng = np.random.default_rng(2)
    rejected = 0
    for _ in range(30):
        table = compare_arms(arm_study(rng, {"ntm": 0.5, "dnc": 0.5, "lstm": 0.5}, 10), TARGET)
        rejected += bool((table["p_holm"] < 0.05).any())
    assert rejected <= 3, rejected


def test_survival_curves_per_arm(hand_made):
    curves = survival_curves(hand_made.assign(model=np.where(hand_made["run_id"].str.startswith("a"), "ntm", "dnc")),
                             TARGET)
    assert set(curves) == {"ntm", "dnc"}
    ntm = curves["ntm"]
    assert list(ntm.t) == [100.0, 200.0, 300.0] and ntm.survival[1] == pytest.approx(0.5)
    assert (ntm.lo <= ntm.survival).all() and (ntm.survival <= ntm.hi).all()
    assert (curves["dnc"].survival == 1.0).all()


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
    fig = success_rate_figure(seed_stability(hand_made, TARGET))
    assert _drawn(fig) and len(fig.axes[0].patches) == 2
    fig = survival_figure(survival_curves(hand_made, TARGET), "study s")
    assert _drawn(fig) and fig.axes[0].lines and fig.axes[0].collections  # curve and band


def test_stability_plots_say_no_data_and_refuse_wrong_input(hand_made):
    empty = learning_curves(hand_made.iloc[0:0])
    fig = learning_curves_figure(empty)
    assert _drawn(fig) and "no data" in fig.axes[0].texts[0].get_text()
    st = seed_stability(frame(run_rows("x", [0.5], status="running")), TARGET)
    assert "no data" in success_rate_figure(st).axes[0].texts[0].get_text()
    assert "no data" in survival_figure({}, "s").axes[0].texts[0].get_text()
    with pytest.raises(PlotError, match="missing columns"):
        learning_curves_figure(hand_made)
