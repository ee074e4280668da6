"""The size-aware halving rule, checked against hand-worked rung decisions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kdtune.scheduler import CONTINUE, STOP, HalvingRungs, SizeAwareASHA, params_bucket, rung_milestones
from kdtune.searcher import trial_outcome


def test_rung_milestones_are_grace_times_powers_of_eta_below_budget():
    assert rung_milestones(1, 27, 3) == [1, 3, 9]
    assert rung_milestones(1, 28, 3) == [1, 3, 9, 27]
    assert rung_milestones(2, 10, 2) == [2, 4, 8]
    assert rung_milestones(5, 5, 3) == []


def test_halving_keeps_the_top_third_at_a_rung():
    rungs = HalvingRungs([1], reduction_factor=3)
    # The first trial at a rung always continues; later ones must reach the
    # 2/3 quantile of the scores recorded before them.
    assert rungs.on_result("a", 1, 0.50) == CONTINUE
    assert rungs.on_result("b", 1, 0.40) == STOP  # below 0.50
    assert rungs.on_result("c", 1, 0.90) == CONTINUE  # quantile of [0.4, 0.5] is 0.4667
    # recorded [0.4, 0.5, 0.9]: 2/3 quantile = 0.5 + (0.9-0.5)*(4/3-1) = 0.6333
    assert rungs.cutoff(1) == pytest.approx(0.5 + 0.4 / 3)
    assert rungs.on_result("d", 1, 0.60) == STOP
    assert rungs.on_result("e", 1, 0.70) == CONTINUE


def test_min_mode_flips_the_comparison():
    rungs = HalvingRungs([1], reduction_factor=2, mode="min")
    assert rungs.on_result("a", 1, 1.0) == CONTINUE
    assert rungs.on_result("b", 1, 2.0) == STOP
    assert rungs.on_result("c", 1, 0.5) == CONTINUE


def test_a_trial_is_judged_once_per_rung():
    rungs = HalvingRungs([1, 3], reduction_factor=3)
    assert rungs.on_result("a", 1, 0.9) == CONTINUE
    assert rungs.on_result("b", 1, 0.1) == STOP
    assert rungs.on_result("a", 2, 0.1) == CONTINUE  # between rungs: no decision
    assert rungs.on_result("a", 3, 0.9) == CONTINUE


def _trial(trial_id, width):
    return SimpleNamespace(trial_id=trial_id, config={"width": width})


def test_small_students_compete_only_with_small_students():
    scheduler = SizeAwareASHA(metric="val_acc", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    wide = [_trial(f"w{i}", 64) for i in range(3)]
    narrow = [_trial(f"n{i}", 4) for i in range(3)]
    for i, trial in enumerate(wide):
        assert scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": 0.90 + i / 100}) == CONTINUE
    # Stock ASHA would stop every narrow student here (all far below 0.9);
    # within their own bucket the first continues, and so does the best one.
    decisions = [
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": acc})
        for trial, acc in zip(narrow, [0.30, 0.20, 0.40])
    ]
    assert decisions == [CONTINUE, STOP, CONTINUE]


def test_stock_asha_stops_the_narrow_students_that_size_aware_keeps():
    from ray.tune.schedulers import ASHAScheduler

    stock = ASHAScheduler(metric="val_acc", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    aware = SizeAwareASHA(metric="val_acc", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    trials = [_trial(f"w{i}", 64) for i in range(3)] + [_trial("n0", 4), _trial("n1", 4)]
    accs = [0.90, 0.91, 0.92, 0.40, 0.45]
    for scheduler in (stock, aware):
        for trial in trials:
            scheduler.on_trial_add(None, trial)
    stock_kept = [t.trial_id for t, a in zip(trials, accs)
                  if stock.on_trial_result(None, t, {"training_iteration": 1, "val_acc": a}) == CONTINUE]
    aware_kept = [t.trial_id for t, a in zip(trials, accs)
                  if aware.on_trial_result(None, t, {"training_iteration": 1, "val_acc": a}) == CONTINUE]
    assert "n0" not in stock_kept and "n1" not in stock_kept
    assert "n0" in aware_kept and "n1" in aware_kept


def test_params_buckets_are_powers_of_two():
    assert params_bucket(1024) == "2^10"
    assert params_bucket(2047) == "2^10"
    assert params_bucket(2048) == "2^11"
    scheduler = SizeAwareASHA(size_key="params", max_t=9)
    assert scheduler.bucket_of({"width": 0.5}, {"params": 3000}) == ("params", "2^11")


@pytest.mark.parametrize(
    "result, error, expected",
    [
        ({"epoch": 27, "epochs": 27, "status": "completed"}, False, "complete"),
        ({"epoch": 3, "epochs": 27, "status": "running"}, False, "pruned"),
        ({"epoch": 2, "epochs": 27, "status": "diverged"}, False, "fail"),
        ({"epoch": 5, "epochs": 27, "status": "running"}, True, "fail"),
        (None, False, "fail"),
    ],
)
def test_trial_outcome_told_to_optuna(result, error, expected):
    assert trial_outcome(result, error) == expected
