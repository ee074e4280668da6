"""The anytime benchmark's arithmetic (bench/anytime.py) on synthetic traces with known answers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import anytime  # noqa: E402

#: Trials completing their full budget: (epochs spent by then, params, val_acc).
TRACE = [(100, 10, 0.5), (300, 1000, 0.8), (500, 100, 0.7)]


def test_hypervolume_at_each_budget_counts_only_the_trials_completed_by_then():
    # Reference size 2000, accuracy 0; HV in (log10 params, accuracy).
    log_ref = math.log10(2000)
    expected = [
        0.0,  # nothing completed by 50 epochs
        (log_ref - 1) * 0.5,  # {(10, .5)}
        (log_ref - 1) * 0.5,  # still the same at 299
        (3 - 1) * 0.5 + (log_ref - 3) * 0.8,  # + (1000, .8)
        (2 - 1) * 0.5 + (3 - 2) * 0.7 + (log_ref - 3) * 0.8,  # + (100, .7) between them
    ]
    got = anytime.hv_at_budgets(TRACE, [50, 100, 299, 300, 500], 2000)
    assert got == pytest.approx(expected)


def test_area_is_the_mean_height_from_five_percent_to_the_end():
    assert anytime.area(np.ones_like(anytime.GRID)) == pytest.approx(1.0)
    # y = x from 0.05 to 1: mean height (0.05 + 1) / 2, exact for trapezoids.
    assert anytime.area(anytime.GRID.copy()) == pytest.approx(0.525)
    step = np.where(anytime.GRID >= 0.5, 1.0, 0.0)  # 0 until half the budget, then 1
    # trapezoids: 0 on [.05, .49], a ramp over [.49, .5] (area .005), 1 on [.5, 1]
    assert anytime.area(step) == pytest.approx((0.005 + 0.5) / 0.95)


def test_regret_per_size_compares_the_best_at_that_size_or_smaller():
    method = [(10, 0.5), (1000, 0.8)]
    reference = [(10, 0.6), (100, 0.75), (1000, 0.78)]
    assert anytime.regret_per_size(method, reference, [10, 100, 1000]) == pytest.approx([0.1, 0.25, -0.02])
    # Nothing at or below a size counts as accuracy 0 for the method, NaN for the reference.
    got = anytime.regret_per_size([(1000, 0.9)], [(100, 0.7)], [10, 100, 1000])
    assert math.isnan(got[0]) and got[1:] == pytest.approx([0.7, -0.2])


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    a = np.array([0.9, 0.8, 0.95, 0.7])
    assert anytime.paired_bootstrap(a, a - 0.02) == pytest.approx((0.02, 0.02, 0.02))


def test_hyperband_spends_the_epochs_of_successive_halving_brackets():
    # max_t 9, η 3: s_max 2; the first bracket starts 9 configurations at 1 epoch, keeps
    # the best 3 to epoch 3 (2 more each) and the best 1 to epoch 9 (6 more): 9 + 6 + 6 = 21.
    configs = [{"params": 100, "val_acc": [a / 100, a / 100 + 0.1, a / 100 + 0.2, *[a / 100 + 0.3] * 6]}
               for a in (10, 50, 20, 60, 30, 40, 5, 15, 25)]
    order: list[int] = []
    events = anytime.hyperband(configs, max_t=9, budget=21, completed=order)
    assert events == [(21, 100.0, pytest.approx(0.9))]  # the config at .60 after 1 epoch wins
    assert order == [3]  # ... the fourth configuration


def test_an_extra_method_is_replayed_on_the_same_streams_as_the_others():
    # bench/rule_sweep.py replays variants through replay(extra=...): a variant that runs every
    # configuration to the end is the reference itself, so its curve must be the reference's.
    rng = np.random.default_rng(0)
    curves = [{"seed": seed, "width": width, "params": width * 100,
               "val_acc": list(np.sort(rng.uniform(0.1, 0.9, 9))), "val_loss": list(np.sort(rng.uniform(0.2, 2.0, 9))[::-1])}
              for seed in (0, 1) for width in (1, 2, 4) for _ in range(5)]
    out = anytime.replay(curves, draws=2, only="no other method", extra={"again, run to the end": anytime.RunToEnd})
    reference = "random, full budget (reference)"
    assert set(out["curves"]) == {reference, anytime.KDTUNE, anytime.MOASHA, "again, run to the end"}
    for mine, theirs in zip(out["curves"]["again, run to the end"], out["curves"][reference]):
        np.testing.assert_array_equal(mine, theirs)
    assert out["curves"][reference][0][-1] == pytest.approx(1.0)  # the reference's own final HV
    # Budget 40 × 9 epochs; by 10% of it (36 epochs) the two workers, whose epochs take about
    # as long (±15%), have trained about 18 epochs each: at most 2 runs of 9 each, so every
    # completion by then is one of the first 4 configurations started.
    for done, first in out["early10"][reference]:
        assert 1 <= done <= 4 and first == done


def test_sizes_beyond_the_spread_compare_each_size_median_regret_with_its_own_spread():
    # Three draws, three sizes: medians 0.02, 0.0, 0.01 against spreads 0.03, 0.001, 0.005.
    regret = np.array([[0.01, 0.0, 0.01], [0.02, 0.0, 0.02], [0.05, 0.01, 0.0]])
    spread = np.array([0.03, 0.001, 0.005])
    assert anytime.sizes_beyond_spread(regret, spread, [100, 1000, 10000]) == "1 of 3: 10,000"
    assert anytime.sizes_beyond_spread(regret, spread + 0.01, [100, 1000, 10000]) == "none"


def test_hindsight_ceiling_takes_the_best_configuration_of_each_size_in_the_best_subset():
    # Reference size 2000 (log10 3.301), accuracy 0; two configurations of size 10, the better counts.
    pool = [(10, 0.5), (10, 0.6), (100, 0.7), (1000, 0.8)]
    right = math.log10(2000)
    assert anytime.hindsight_ceiling(pool, 1, 2000) == pytest.approx((right - 1) * 0.6)  # (10, .6) alone
    # Two trials: (10, .6) + (100, .7) beats (10, .6) + (1000, .8) and (100, .7) + (1000, .8).
    assert anytime.hindsight_ceiling(pool, 2, 2000) == pytest.approx(1 * 0.6 + (right - 2) * 0.7)
    # More trials than sizes: every size's best.
    assert anytime.hindsight_ceiling(pool, 5, 2000) == pytest.approx(0.6 + 0.7 + (right - 3) * 0.8)


def test_median_bootstrap_of_equal_values_is_that_value_and_brackets_the_median():
    assert anytime.median_bootstrap([0.97] * 5) == pytest.approx((0.97, 0.97, 0.97))
    median, low, high = anytime.median_bootstrap([0.90, 0.95, 0.96, 0.97, 0.99])
    assert median == 0.96
    # A resampled median is one of the values, never outside them.
    assert 0.90 <= low <= median <= high <= 0.99


def test_budgets_behind_lists_grid_points_from_five_percent_where_one_curve_is_lower():
    grid = np.array([0.01, 0.05, 0.10, 0.15, 0.20, 1.0])
    mine = np.array([0.0, 0.90, 0.95, 0.99, 0.98, 1.00])
    other = np.array([0.5, 0.91, 0.95, 0.97, 0.99, 1.00])
    # 1% is before the area's start; ties (10%, 100%) are not behind.
    assert anytime.budgets_behind(mine, other, grid) == [0.05, 0.20]


def test_spans_join_consecutive_budgets():
    assert anytime.spans([0.10, 0.11, 0.12, 0.30, 0.50, 0.51]) == "10–12%, 30%, 50–51%"
    assert anytime.spans([]) == "none"


def test_hv_lost_by_size_splits_the_shortfall_into_slabs_that_sum_to_it():
    sizes, ref_size = [10, 100, 1000], 2000
    reference = [(10, 0.6), (100, 0.8), (1000, 0.9)]
    method = [(100, 0.7)]  # nothing at 10; 0.1 short at 100; 0.2 short at 1000 (its best there is 0.7)
    log_ref = math.log10(ref_size)
    ref_hv = 1 * 0.6 + 1 * 0.8 + (log_ref - 3) * 0.9
    expected = np.array([0.6 * 1, 0.1 * 1, 0.2 * (log_ref - 3)]) / ref_hv
    lost = anytime.hv_lost_by_size(method, reference, sizes, ref_size)
    assert lost == pytest.approx(expected)
    method_hv = anytime.hv_at_budgets([(0, p, a) for p, a in method], [0], ref_size)[0]
    assert lost.sum() == pytest.approx(1 - method_hv / ref_hv)
