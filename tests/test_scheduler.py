"""The early-stopping rules, checked against hand-worked rung decisions."""

from __future__ import annotations

from pathlib import Path

from types import SimpleNamespace

import math

import pandas as pd
import pytest

from kdtune.scheduler import (
    CONTINUE,
    STOP,
    HalvingRungs,
    ParetoASHA,
    ParetoRungs,
    SizeAwareASHA,
    params_bucket,
    rung_milestones,
)
from kdtune.searcher import trial_outcome


def test_rung_milestones_are_grace_times_powers_of_eta_below_budget():
    assert rung_milestones(1, 27, 3) == [1, 3, 9]
    assert rung_milestones(1, 28, 3) == [1, 3, 9, 27]
    assert rung_milestones(2, 10, 2) == [2, 4, 8]
    assert rung_milestones(5, 5, 3) == []
    assert rung_milestones(1, 27, 2) == [1, 2, 4, 8, 16]


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
        assert scheduler.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.90 + i / 100}) == CONTINUE
    # Stock ASHA would stop every narrow student here (all far below 0.9);
    # within their own bucket the first continues, and so does the best one.
    decisions = [
        scheduler.on_trial_result(None, trial, {"epoch": 1, "val_acc": acc})
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
                  if aware.on_trial_result(None, t, {"epoch": 1, "val_acc": a}) == CONTINUE]
    assert "n0" not in stock_kept and "n1" not in stock_kept
    assert "n0" in aware_kept and "n1" in aware_kept


def test_params_buckets_are_powers_of_two():
    assert params_bucket(1024) == "2^10–2^11"
    assert params_bucket(2047) == "2^10–2^11"
    assert params_bucket(2048) == "2^11–2^12"
    scheduler = SizeAwareASHA(size_key="params", max_t=9)
    assert scheduler.bucket_of({"width": 0.5}, {"params": 3000}) == ("params", "2^11–2^12")


def test_sizeaware_restore_history_replays_rung_scores():
    history = pd.DataFrame({"trial_id": ["tA", "tB", "tA"], "epoch": [1, 1, 2], "val_acc": [0.5, 0.4, 0.6],
                            "width": [8, 8, 8], "params": [682, 682, 682]})
    restored = SizeAwareASHA(max_t=9, grace_period=1, reduction_factor=3)
    assert restored.restore_history(history) == 2  # epoch 2 is no rung of [1, 3]
    # 2/3 quantile of [0.4, 0.5] is 0.4667: a new width-8 trial at 0.45 stops,
    # where a search without the replayed history would let it continue.
    assert restored.on_trial_result(None, _trial("tC", 8), {"epoch": 1, "val_acc": 0.45}) == STOP
    fresh = SizeAwareASHA(max_t=9, grace_period=1, reduction_factor=3)
    assert fresh.on_trial_result(None, _trial("tC", 8), {"epoch": 1, "val_acc": 0.45}) == CONTINUE


# ------------------------------------------------------------------ Pareto halving (the default)


def test_front_hypervolume_of_points_and_of_a_table_match_a_hand_computation():
    from kdtune.analysis import front_hypervolume, hypervolume

    points = [(10, 0.5), (100, 0.8), (1000, 0.6), (100, 0.7)]
    # Front (10, .5), (100, .8); reference 2000: (2-1)*.5 + (log10 2000 - 2)*.8.
    expected = 0.5 + (math.log10(2000) - 2) * 0.8
    assert front_hypervolume(points, 2000) == pytest.approx(expected)
    frame = pd.DataFrame(points, columns=["params", "val_acc"])
    assert hypervolume(frame, reference=(2000, 0.0)) == pytest.approx(expected)


def test_pareto_rungs_stop_a_trial_that_a_smaller_trial_beats_or_its_own_size_outranks():
    # η = 3: a trial must reach the 2/3 quantile of the scores its own size recorded
    # at the rung before it; only strictly smaller trials are compared across sizes.
    rungs = ParetoRungs([1], max_t=9, mode="max", hv_epsilon=0.0, reduction_factor=3)
    decisions = [(key, rungs.on_result(key, 1, size, score, None)) for key, size, score in [
        ("a", 100, 0.50),  # first at the rung
        ("b", 200, 0.40),  # a is smaller and better
        ("c", 50, 0.30),   # nobody is smaller; larger, better a and b do not count
        ("d", 100, 0.60),  # own size: quantile of [.5] is .5; smaller c is worse
        ("e", 50, 0.30),   # ties c: quantile of [.3] is .3, not below it (the old rule stopped it)
        ("g", 50, 0.25),   # own size [.3, .3]: quantile .3
        ("h", 50, 0.35),   # own size [.25, .3, .3]: position 4/3, quantile .3
        ("i", 100, 0.55),  # own size [.5, .6]: .5 + .1·2/3 = .5667
        ("j", 100, 0.58),  # own size [.5, .55, .6]: .55 + .05·1/3 = .5667 (the old rule stopped it: d is better)
        ("k", 400, 0.34),  # first of its size, but smaller h (50, .35) did better
        ("f", 400, 0.90),  # the best score so far
    ]]
    assert decisions == [("a", CONTINUE), ("b", STOP), ("c", CONTINUE), ("d", CONTINUE), ("e", CONTINUE),
                         ("g", STOP), ("h", CONTINUE), ("i", STOP), ("j", CONTINUE), ("k", STOP), ("f", CONTINUE)]
    assert rungs.outranked("i", 1) and not rungs.outranked("j", 1)


def test_pareto_rungs_over_one_size_are_successive_halving():
    # With one student size rule 1 is ASHA's quantile rule, decision for decision.
    scores = [0.50, 0.40, 0.90, 0.60, 0.70, 0.65, 0.95, 0.30]
    halving = HalvingRungs([1, 3], reduction_factor=3)
    pareto = ParetoRungs([1, 3], max_t=9, mode="max", hv_epsilon=0.04, reduction_factor=3)
    expected = [halving.on_result(str(i), 1, s) for i, s in enumerate(scores)]
    assert expected == [CONTINUE, STOP, CONTINUE, STOP, CONTINUE, STOP, CONTINUE, STOP]
    assert [pareto.on_result(str(i), 1, 682, s, s) for i, s in enumerate(scores)] == expected


def test_pareto_rungs_min_mode_ranks_a_loss():
    rungs = ParetoRungs([1], max_t=9, mode="min", hv_epsilon=0.0)
    assert rungs.on_result("a", 1, 100, 1.0, None) == CONTINUE
    assert rungs.on_result("b", 1, 200, 1.5, None) == STOP  # larger and a higher loss than a
    assert rungs.on_result("c", 1, 200, 0.5, None) == CONTINUE


def test_pareto_rungs_judge_each_rung_once_even_when_epochs_are_skipped():
    rungs = ParetoRungs([1, 2, 4], max_t=8, mode="max", hv_epsilon=0.0)
    assert rungs.on_result("a", 1, 10, 0.5, 0.5) == CONTINUE
    assert rungs.on_result("b", 1, 10, 0.4, 0.4) == STOP
    assert rungs.on_result("a", 3, 10, 0.6, 0.6) == CONTINUE  # epoch 2 not reported: judged at rung 2
    assert set(rungs.recorded[2]) == {"a"}
    assert rungs.on_result("c", 2, 10, 0.7, 0.7) == CONTINUE
    assert rungs.on_result("d", 2, 10, 0.65, 0.65) == STOP  # c did better with the same size
    assert rungs.on_result("a", 3, 10, 0.1, 0.1) == CONTINUE  # rung 2 already judged for a
    assert rungs.on_result("a", 8, 10, None, 0.9) == CONTINUE  # the end: recorded as finished
    assert rungs.finished == {"a": (10.0, 0.9)}


def test_pareto_rungs_stop_a_wide_trial_that_could_add_little_hypervolume():
    rungs = ParetoRungs([1, 3], max_t=9, mode="max", hv_epsilon=0.1, min_gain=0.05)
    assert rungs.on_result("A", 1, 10, 0.2, 0.2) == CONTINUE
    assert rungs.on_result("A", 9, 10, None, 0.5) == CONTINUE
    # B: front {A (10, .5)}, reference 2*100: HV (log10 200 - 1)*.5 = 0.6505; a perfect
    # B adds (log10 200 - 2)*(1 - .5) = 0.1505 >= 10% of it.
    assert rungs.on_result("B", 1, 100, 0.3, 0.3) == CONTINUE
    assert rungs.on_result("B", 9, 100, None, 0.8) == CONTINUE
    # C (1000 params) is not dominated at rung 1 (best score there), but with the
    # front {A (10, .5), B (100, .8)} and reference 2000 a perfect C adds too little:
    base = 1 * 0.5 + (math.log10(2000) - 2) * 0.8  # 1.5408
    gain = (math.log10(2000) - 3) * (1.0 - 0.8)  # 0.0602 < 0.1541
    assert rungs.optimistic_gain("C", 1000) == pytest.approx((gain, base))
    # C's accuracy at rung 1 (.34) is .04 above the best smaller trial's there (B, .3): no
    # more than min_gain .05, so the bound applies.
    assert rungs.on_result("C", 1, 1000, 0.9, 0.34) == STOP
    assert rungs.lift("C", 1) == pytest.approx(0.04)
    # E, of the same size, is .06 ahead of every smaller trial at rung 1: its size could
    # lift the front by more than min_gain, so the bound may not stop it.
    assert rungs.on_result("E", 1, 1000, 0.95, 0.36) == CONTINUE
    # A small student is never stopped by the bound: a perfect D would own the
    # whole axis, (log10 2000 - 1)*1.0 - 1.5408 = 0.7602 >= 0.1541.
    assert rungs.on_result("D", 1, 10, 0.25, 0.25) == CONTINUE


def test_front_estimate_drops_exactly_the_pairwise_dominated_rung_points():
    import random

    generator = random.Random(0)
    for _ in range(200):
        rungs = ParetoRungs([1], max_t=9, mode="max", hv_epsilon=0.0)
        table = [(key, generator.choice([10, 20, 30]), generator.choice([0.1, 0.2, 0.3])) for key in range(12)]
        for key, size, score in table:
            rungs.record(key, 1, size, score, score + 0.5)
        # Dominated: another point at most as large with at least the score (ties dominate each other).
        kept = sorted((size, score + 0.5) for key, size, score in table
                      if not any(k != key and s <= size and v >= score for k, s, v in table))
        assert sorted(rungs.front_points()) == kept


def test_pareto_rungs_pickled_before_the_quantile_rule_still_decide():
    import pickle

    rungs = ParetoRungs([1], max_t=9, mode="max", hv_epsilon=0.0)
    state = {k: v for k, v in vars(rungs).items() if k not in ("reduction_factor", "min_gain")}
    old = ParetoRungs.__new__(ParetoRungs)
    old.__dict__.update(state)  # what unpickling an instance of the earlier class gives
    restored = pickle.loads(pickle.dumps(old))
    assert (restored.reduction_factor, restored.min_gain) == (3.0, 0.01)
    assert [restored.on_result(k, 1, 50, s, s) for k, s in [("a", .3), ("b", .3), ("c", .2)]] == [
        CONTINUE, CONTINUE, STOP]


def _result(epoch, loss, acc, params):
    return {"epoch": epoch, "val_loss": loss, "val_acc": acc, "params": params}


#: An interrupted search: t1 (width 8, 682 params) finished; t2 (width 128) was
#: at rung 2; one baseline row that must not count.
HISTORY = pd.DataFrame(
    [("t2", 2, 0.8, 0.7, 128, 26122, "search"), ("t1", 1, 2.0, 0.3, 8, 682, "search"),
     ("t1", 2, 1.5, 0.5, 8, 682, "search"), ("t1", 3, 1.2, 0.6, 8, 682, "search"),
     ("t1", 4, 1.0, 0.7, 8, 682, "search"), ("t1", 8, 0.6, 0.85, 8, 682, "search"),
     ("t2", 1, 1.2, 0.5, 128, 26122, "search"), ("b1", 1, 0.1, 0.9, 8, 682, "baseline")],
    columns=["trial_id", "epoch", "val_loss", "val_acc", "width", "params", "phase"],
)
#: What happens next, and the hand-worked decisions (milestones [1, 2, 4], ε 0.04):
AFTER_RESUME = [
    # t3: t1 has the same size and a lower loss (2.0) at rung 1.
    ("t3", 682, _result(1, 2.2, 0.2, 682), STOP),
    # t4: lower loss than t1 at rung 1; front {t1 (682, .85)} (t2's .7 at rung 2
    # lies below it), reference 52,244: a perfect t4 adds (4.718-2.834)*.15, 18% of it.
    ("t4", 682, _result(1, 1.9, 0.35, 682), CONTINUE),
    # t2 restarted without a checkpoint reports rung 1 again: judged already.
    ("t2", 26122, _result(1, 5.0, 0.1, 26122), CONTINUE),
    # t5 (width 128) has the lowest loss at rung 1; a perfect t5 would add only
    # (4.718-4.417)*(1-.85) = 0.0452 < 4% of (4.718-2.834)*.85 = 0.0641, but its accuracy
    # there is .45 above every smaller trial's (t4's .35 the best): more than min_gain .01.
    ("t5", 26122, _result(1, 0.5, 0.8, 26122), CONTINUE),
    # t6 (width 128): in the top third of its width at rung 1 (the cutoff between t2's loss
    # 1.2 and t5's 0.5 is 1.2 - .7·2/3 = 0.733), only .005 above t4 in accuracy: the bound stops it.
    ("t6", 26122, _result(1, 0.5, 0.355, 26122), STOP),
]


def _pareto():
    return ParetoASHA(max_t=8, grace_period=1, reduction_factor=2, hv_epsilon=0.04)


def test_pareto_asha_defaults_need_results_only_at_rungs_and_the_end():
    scheduler = ParetoASHA()
    assert scheduler.time_attr == "epoch" and scheduler.max_t == 27
    assert scheduler.milestones == rung_milestones(1, 27, 3) == [1, 3, 9]
    assert ParetoASHA(max_t=81).milestones == [1, 3, 9, 27]


def test_pareto_asha_restore_history_gives_the_uninterrupted_decisions():
    restored = _pareto()
    assert restored.restore_history(HISTORY) == 6  # 2 rungs of t2, 3 of t1, t1's end
    assert restored.rungs.finished == {"t1": (682.0, 0.85)}
    decisions = [restored.on_trial_result(None, _trial(key, 0), result) for key, _, result, _ in AFTER_RESUME]
    assert decisions == [expected for *_, expected in AFTER_RESUME]

    # The same results fed live, in the order they happened, lead to the same decisions.
    live = _pareto()
    for key, epoch in [("t1", 1), ("t2", 1), ("t1", 2), ("t2", 2), ("t1", 3), ("t1", 4), ("t1", 8)]:
        row = HISTORY[(HISTORY["trial_id"] == key) & (HISTORY["epoch"] == epoch)].iloc[0]
        assert live.on_trial_result(None, _trial(key, 0), _result(epoch, row["val_loss"], row["val_acc"],
                                                                   row["params"])) == CONTINUE
    assert [live.on_trial_result(None, _trial(key, 0), result) for key, _, result, _ in AFTER_RESUME] == decisions

    # Without the replayed history, t3 would be the first at rung 1 and continue.
    assert _pareto().on_trial_result(None, _trial("t3", 0), AFTER_RESUME[0][2]) == CONTINUE


def test_restore_history_names_missing_columns():
    with pytest.raises(ValueError, match="val_loss"):
        _pareto().restore_history(HISTORY.drop(columns=["val_loss"]))


def test_early_stopping_spec_defaults_and_allowed_rules():
    from kdtune.errors import KdtuneError
    from kdtune.search.early_stopping import EARLY_STOPPING
    from kdtune.search.plan import preflight
    from kdtune.spec import EarlyStoppingSpec, parse_spec

    default = EarlyStoppingSpec()
    assert (default.rule, default.reduction_factor, default.hv_epsilon) == ("pareto_asha", 3.0, 0.0)
    assert EarlyStoppingSpec(rule="size_aware_asha").reduction_factor == 3.0
    assert EarlyStoppingSpec(rule="asha", reduction_factor=4).reduction_factor == 4.0
    assert {"pareto_asha", "size_aware_asha", "asha", "none"} <= set(EARLY_STOPPING.names())
    # The allowed rules are the registry's names, checked before anything runs.
    with pytest.raises(KdtuneError) as error:
        preflight(parse_spec({"early_stopping": {"rule": "hyperband"}}))
    assert "early_stopping.rule" in str(error.value)
    for allowed in EARLY_STOPPING.names():
        assert allowed in str(error.value)


@pytest.mark.parametrize(
    ("width", "early_stopping", "expected"),
    [
        ({"choice": [8, 16, 32]}, None, ("pareto_asha", ParetoASHA)),
        ({"int": [8, 64]}, {"grace_period": 2}, ("pareto_asha", ParetoASHA)),
        # One size: the default is no special case any more; its fixed rule 1 halves within the size.
        (32, None, ("pareto_asha", ParetoASHA)),
        ({"choice": [16, 16]}, {"grace_period": 2}, ("pareto_asha", ParetoASHA)),
        (32, {"rule": "size_aware_asha"}, ("size_aware_asha", SizeAwareASHA)),  # an explicit rule is kept
    ],
)
def test_the_default_rule_whatever_the_sizes(width, early_stopping, expected):
    # pareto_asha over one student size is successive halving within it (see
    # test_pareto_rungs_over_one_size_are_successive_halving), so no special case.
    from kdtune.search.early_stopping import build_rule
    from kdtune.spec import SearchSpec

    raw = {"space": {"width": width, "epochs": 27}}
    if early_stopping is not None:
        raw["early_stopping"] = early_stopping
    spec = SearchSpec.model_validate(raw)
    rule = build_rule(spec.early_stopping, 27, Path("unused"))
    scheduler, rungs = rule.scheduler, rule.report_epochs
    assert (spec.early_stopping.rule, type(scheduler)) == expected
    grace = (early_stopping or {}).get("grace_period", 1)
    assert rungs == [grace * 3**k for k in range(4) if grace * 3**k < 27]


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
