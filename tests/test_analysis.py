"""Pareto front, hypervolume, size buckets, best temperature and parameter importance.

Expected values are worked out by hand in each test (areas, means, t statistics)
from small synthetic tables in the search's schema.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kdtune.analysis import (
    best_temperature,
    hypervolume,
    parameter_importance,
    pareto_front,
    size_buckets,
    temperature_curve,
    untested_sizes,
)
from kdtune.errors import ConfigError, ResultsError


def trials_table(points: list[tuple], **columns) -> pd.DataFrame:
    """A trials table from (trial_id, params, val_acc[, status[, phase]]) tuples."""
    rows = []
    for point in points:
        trial_id, params, acc, *rest = point
        status = rest[0] if len(rest) > 0 else "completed"
        phase = rest[1] if len(rest) > 1 else "search"
        rows.append({"trial_id": trial_id, "params": params, "val_acc": acc, "status": status, "phase": phase})
    df = pd.DataFrame(rows)
    for name, value in columns.items():
        df[name] = value
    return df


# Front by hand: a (100, .5), b (200, .7), e (400, .9).
# c: same size as b, lower score; d: larger than b, same score; f stopped early and
# g a baseline would dominate everything but do not count; h duplicates e.
MIXED = [
    ("a", 100, 0.5),
    ("b", 200, 0.7),
    ("c", 200, 0.6),
    ("d", 300, 0.7),
    ("e", 400, 0.9),
    ("f", 50, 0.95, "stopped_early"),
    ("g", 150, 0.99, "completed", "baseline"),
    ("h", 400, 0.9),
    ("i", 500, math.nan),
]


def test_pareto_front_keeps_only_non_dominated_completed_search_rows() -> None:
    front = pareto_front(trials_table(MIXED))
    assert list(front["trial_id"]) == ["a", "b", "e"]
    assert list(front["params"]) == [100, 200, 400]


def test_pareto_front_keeps_the_first_of_exact_duplicates() -> None:
    df = trials_table([("late_small", 300, 0.4), ("first", 100, 0.8), ("second", 100, 0.8)])
    front = pareto_front(df)
    assert list(front["trial_id"]) == ["first"]
    assert front.index.tolist() == [1]  # original index kept


def test_pareto_front_ties_in_score_keep_the_smaller_and_ties_in_size_the_better() -> None:
    df = trials_table([("big", 50, 0.8), ("small", 10, 0.8), ("worse", 10, 0.7), ("better", 50, 0.85)])
    assert list(pareto_front(df)["trial_id"]) == ["small", "better"]


def test_pareto_front_of_a_single_point_is_that_point() -> None:
    df = trials_table([("only", 42, 0.6)])
    assert list(pareto_front(df)["trial_id"]) == ["only"]


def test_pareto_front_on_other_columns() -> None:
    df = trials_table([("a", 100, 0.5), ("b", 200, 0.7)], bytes=[800, 400])
    # Measured in bytes, b is both smaller and better.
    assert list(pareto_front(df, size="bytes")["trial_id"]) == ["b"]


def test_pareto_front_without_completed_search_rows_raises_results_error() -> None:
    with pytest.raises(ResultsError, match="no completed search trials"):
        pareto_front(trials_table([]).reindex(columns=["trial_id", "params", "val_acc", "status", "phase"]))
    with pytest.raises(ResultsError):
        pareto_front(trials_table([("f", 50, 0.9, "stopped_early"), ("g", 60, 0.9, "completed", "baseline")]))


def test_pareto_front_names_an_unknown_column() -> None:
    with pytest.raises(ConfigError, match="size: column 'flops'"):
        pareto_front(trials_table(MIXED), size="flops")


def test_hypervolume_of_the_mixed_front_in_log_and_linear_size() -> None:
    df = trials_table(MIXED)
    expected_log = (
        (math.log10(200) - math.log10(100)) * 0.5
        + (math.log10(400) - math.log10(200)) * 0.7
        + (math.log10(1000) - math.log10(400)) * 0.9
    )
    assert hypervolume(df, reference=(1000, 0.0)) == pytest.approx(expected_log)
    expected_linear = (200 - 100) * 0.5 + (400 - 200) * 0.7 + (1000 - 400) * 0.9
    assert hypervolume(df, reference=(1000, 0.0), log_size=False) == pytest.approx(expected_linear)


def test_hypervolume_of_a_single_point() -> None:
    df = trials_table([("only", 10, 0.8)])
    assert hypervolume(df, reference=(1000, 0.1)) == pytest.approx((3 - 1) * (0.8 - 0.1))
    # Default reference: twice the largest size, score 0.
    assert hypervolume(df) == pytest.approx((math.log10(20) - math.log10(10)) * 0.8)


def test_hypervolume_ignores_points_beyond_the_reference() -> None:
    df = trials_table(MIXED)
    # e (400 params) lies right of the reference size.
    size_cut = (math.log10(200) - math.log10(100)) * 0.5 + (math.log10(300) - math.log10(200)) * 0.7
    assert hypervolume(df, reference=(300, 0.0)) == pytest.approx(size_cut)
    # a (score 0.5) lies below the reference score: b's slab starts at b.
    score_cut = (math.log10(400) - math.log10(200)) * (0.7 - 0.6) + (3 - math.log10(400)) * (0.9 - 0.6)
    assert hypervolume(df, reference=(1000, 0.6)) == pytest.approx(score_cut)
    assert hypervolume(df, reference=(50, 0.0)) == 0.0


def test_hypervolume_of_an_empty_table_raises_results_error() -> None:
    with pytest.raises(ResultsError):
        hypervolume(trials_table([("f", 50, 0.9, "error")]))


def test_size_buckets_use_discrete_widths_as_they_are() -> None:
    df = pd.DataFrame({"width": [8.0, 4.0, 32.0, 8.0], "params": [1, 2, 3, 4]})
    buckets = size_buckets(df)
    assert buckets.tolist() == [8, 4, 32, 8]
    assert list(buckets.cat.categories) == [4, 8, 32]


def test_size_buckets_bin_params_on_a_log2_scale_when_widths_are_continuous() -> None:
    widths = np.arange(1, 15)  # 14 distinct widths: more than 12
    params = [1023, 1024, 2047, 2048, 5000] + [4096] * 9
    buckets = size_buckets(pd.DataFrame({"width": widths, "params": params}))
    assert buckets.tolist()[:5] == ["2^9–2^10", "2^10–2^11", "2^10–2^11", "2^11–2^12", "2^12–2^13"]
    assert list(buckets.cat.categories) == ["2^9–2^10", "2^10–2^11", "2^11–2^12", "2^12–2^13"]


def temperature_table(scores_by_t: dict[float, list[float]], width: int = 8) -> pd.DataFrame:
    rows = [
        {"trial_id": f"w{width}-T{t}-{i}", "width": width, "params": 10 * width, "temperature": t,
         "val_acc": score, "status": "completed", "phase": "search"}
        for t, scores in scores_by_t.items()
        for i, score in enumerate(scores)
    ]
    return pd.DataFrame(rows)


def peaked_scores(rng: np.random.Generator, temperatures, seeds: int = 6, noise: float = 0.002) -> dict:
    # Accuracy falls off quadratically in log2(T / 4): 4 wins by 0.004 over 2 and 8,
    # by 0.016 over 1 and by 0.02 over 20, each several noise standard errors.
    return {
        t: list(0.9 - 0.004 * math.log2(t / 4) ** 2 + rng.normal(0.0, noise, seeds)) for t in temperatures
    }


def test_best_temperature_finds_a_peak_at_4() -> None:
    rng = np.random.default_rng(0)
    df = temperature_table(peaked_scores(rng, [1, 2, 4, 8, 20]))
    # Trials that did not complete, and baselines, would move the answer if they counted.
    noise = temperature_table({1: [0.99, 0.99, 0.99]})
    noise["status"] = "stopped_early"
    baseline = temperature_table({20: [0.99, 0.99]})
    baseline["phase"] = "baseline"
    result = best_temperature(pd.concat([df, noise, baseline], ignore_index=True))
    assert len(result) == 1
    row = result.iloc[0]
    assert row["bucket"] == 8
    assert row["recommended_t"] == 4
    assert 1 < row["t_low"] <= 4 <= row["t_high"] < 20
    assert row["t_matters"]
    assert "best T ≈ 4" in row["verdict"]
    assert row["n_trials"] == 30


def test_untested_sizes_are_those_where_no_two_temperatures_could_be_compared() -> None:
    one_t = temperature_table({2: [0.80, 0.82]}, width=8)  # a single temperature tried
    one_per_bin = temperature_table({1: [0.80], 16: [0.85]}, width=16)  # no bin with two trials
    testable = temperature_table({1: [0.80, 0.81], 16: [0.90, 0.91]}, width=32)
    table = best_temperature(pd.concat([one_t, one_per_bin, testable], ignore_index=True))
    assert untested_sizes(table) == [8, 16]
    assert untested_sizes(best_temperature(testable)) == []


def test_best_temperature_interval_from_hand_computed_welch_tests() -> None:
    # Same spread (sample std 0.0158) in every bin, n = 5:
    # T=2 vs T=4: t = 0.01 / sqrt(2 * 0.00025 / 5) = 1.0 -> p ≈ 0.35, indistinguishable;
    # T=8 vs T=4: t = 10 -> p < 1e-4, distinguishable.
    scores = {
        2: [0.88, 0.89, 0.90, 0.91, 0.92],
        4: [0.89, 0.90, 0.91, 0.92, 0.93],
        8: [0.80, 0.81, 0.82, 0.83, 0.84],
    }
    row = best_temperature(temperature_table(scores)).iloc[0]
    assert (row["recommended_t"], row["t_low"], row["t_high"]) == (4, 2, 4)
    assert row["best_mean"] == pytest.approx(0.91)
    assert row["best_std"] == pytest.approx(np.std(scores[4], ddof=1))
    assert row["t_matters"]

    curve = temperature_curve(temperature_table(scores))
    assert curve["t_bin_center"].tolist() == [2, 4, 8]
    assert curve["mean"].tolist() == pytest.approx([0.90, 0.91, 0.82])
    assert curve["count"].tolist() == [5, 5, 5]


@pytest.mark.parametrize(("single", "included"), [(0.905, True), (0.70, False)])
def test_best_temperature_compares_a_single_trial_with_the_pooled_std(single: float, included: bool) -> None:
    # Pooled std 0.0158; se = sqrt(0.00025 / 5 + 0.00025 / 1) = 0.0173.
    # 0.905 is 0.3 se from the best mean (kept); 0.70 is 12 se away (excluded).
    scores = {
        2: [0.88, 0.89, 0.90, 0.91, 0.92],
        4: [0.89, 0.90, 0.91, 0.92, 0.93],
        8: [0.80, 0.81, 0.82, 0.83, 0.84],
        16: [single],
    }
    row = best_temperature(temperature_table(scores)).iloc[0]
    assert row["recommended_t"] == 4
    assert row["t_high"] == (16 if included else 4)


def test_best_temperature_says_when_t_makes_no_difference() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 0.01, 6)
    # Every temperature gets the same noisy draws in another order: any difference
    # between bins is rounding, so no test may call one of them better.
    scores = {t: list(0.85 + rng.permutation(noise)) for t in [1, 2, 4, 8, 16]}
    row = best_temperature(temperature_table(scores)).iloc[0]
    assert not row["t_matters"]
    assert row["verdict"] == "T makes no measurable difference for this size"
    assert (row["t_low"], row["t_high"]) == (1, 16)


def test_best_temperature_gives_one_row_per_width() -> None:
    rng = np.random.default_rng(2)
    noise = rng.normal(0.0, 0.01, 6)
    peaked = temperature_table(peaked_scores(rng, [1, 2, 4, 8, 20]), width=8)
    flat = temperature_table({t: list(0.95 + rng.permutation(noise)) for t in [1, 2, 4, 8, 20]}, width=32)
    result = best_temperature(pd.concat([flat, peaked], ignore_index=True))
    assert result["bucket"].tolist() == [8, 32]
    assert result["t_matters"].tolist() == [True, False]
    assert result["recommended_t"].iloc[0] == 4


def test_best_temperature_bins_continuous_temperatures_on_a_log_scale() -> None:
    rng = np.random.default_rng(3)
    temperatures = np.exp(rng.uniform(math.log(1.0), math.log(20.0), 120))
    temperatures[:2] = [1.0, 20.0]  # pin the bin range to [1, 20]
    scores = 0.9 - 0.03 * np.log2(temperatures / 4) ** 2 + rng.normal(0.0, 0.003, temperatures.size)
    df = pd.DataFrame({"width": 8, "params": 80, "temperature": temperatures, "val_acc": scores,
                       "status": "completed", "phase": "search"})
    curve = temperature_curve(df)
    edges = np.logspace(0, math.log10(20), 9)
    assert curve["t_bin_center"].tolist() == pytest.approx(list(np.sqrt(edges[:-1] * edges[1:])))
    assert curve["count"].sum() == 120
    row = best_temperature(df).iloc[0]
    # The bin holding T=4 spans [3.06, 4.44]; its neighbours lose ≥ 0.004 on average.
    assert row["recommended_t"] == pytest.approx(math.sqrt(edges[3] * edges[4]))
    assert 1 < row["t_low"] <= 4 <= row["t_high"] < 20


def test_best_temperature_of_no_completed_trials_is_empty() -> None:
    df = temperature_table({4: [0.9]})
    df["status"] = "running"
    assert best_temperature(df).empty


def test_parameter_importance_ranks_the_parameter_that_drives_accuracy_first(tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(
        study_name="demo", storage=storage, directions=["maximize", "minimize"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial):
        temperature = trial.suggest_float("temperature", 1.0, 20.0, log=True)
        alpha = trial.suggest_float("alpha", 0.0, 1.0)
        width = trial.suggest_int("width", 4, 64, log=True)
        accuracy = 0.9 - 0.2 * math.log2(temperature / 4) ** 2 + 0.001 * alpha + 0.0001 * width
        return accuracy, width

    study.optimize(objective, n_trials=30)
    (tmp_path / "study.json").write_text(json.dumps({"study": "demo"}))

    importance = parameter_importance(tmp_path)
    assert importance.index[0] == "temperature"
    assert set(importance.index) == {"temperature", "alpha", "width"}
    assert importance.sum() == pytest.approx(1.0)
    assert importance.iloc[0] > 0.8


def test_parameter_importance_needs_two_complete_trials(tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize", "minimize"])
    trial = study.ask()
    trial.suggest_float("temperature", 1.0, 20.0)
    study.tell(trial, [0.9, 10.0])
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    (tmp_path / "study.json").write_text(json.dumps({"study": "tiny"}))
    with pytest.raises(ResultsError, match="1 complete trial"):
        parameter_importance(tmp_path)


def test_parameter_importance_without_a_journal_raises_results_error(tmp_path) -> None:
    (tmp_path / "study.json").write_text(json.dumps({"study": "demo"}))
    with pytest.raises(ResultsError, match="optuna.journal"):
        parameter_importance(tmp_path)
