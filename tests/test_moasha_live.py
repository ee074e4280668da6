"""The live MOASHA adapter (bench/moasha_live.py): its Ray decisions on hand-worked rung
tables, the epochs its trials report at, and the anytime events read from a search's log."""

from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("syne_tune", reason="syne-tune is not installed: MOASHA (bench/moasha.py) needs its Bracket")

from conftest import REPO  # noqa: E402
from test_moasha import DOMINATING, DOUBLY_DOMINATED  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))

from moasha_live import (  # noqa: E402
    EVENTS_FILE,
    LoggedParetoASHA,
    MOASHAScheduler,
    completion_events,
    load_events,
    logged,
    register_rules,
)
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from kdtune.scheduler import ParetoASHA, rung_milestones  # noqa: E402
from kdtune.search.early_stopping import EARLY_STOPPING  # noqa: E402
from kdtune.spec import EarlyStoppingSpec  # noqa: E402
from kdtune.study import SPEC_FILE  # noqa: E402

PARAMS_RANGE = (10, 100_000)  # normalised size s ↔ 10^(1 + 4·s) parameters


def _result(epoch: int, error: float, size: float) -> dict:
    return {"epoch": epoch, "val_acc": 1 - error, "params": 10 ** (1 + 4 * size)}


def _decide(table) -> str:
    recorded, new = table
    scheduler = MOASHAScheduler(max_t=9, params_range=PARAMS_RANGE)
    for index, (error, size) in enumerate(recorded):
        # The first trial at a rung always continues; the others here are not judged by the test.
        scheduler.on_trial_result(None, SimpleNamespace(trial_id=f"r{index}"), _result(1, error, size))
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id="new"), _result(1, *new))


def test_adapter_continues_a_dominating_trial_and_stops_a_doubly_dominated_one():
    # As tests/test_moasha.py, through Ray's interface: rank 0 of 4 continues (0 <= 1/3);
    # the doubly dominated trial has rank 2 of 4 (fronts {r1, r2}, {new}, {r0}): 2/4 > 1/3, STOP.
    assert _decide(DOMINATING) == TrialScheduler.CONTINUE
    assert _decide(DOUBLY_DOMINATED) == TrialScheduler.STOP


def test_adapter_does_not_rank_the_last_epoch_or_incomplete_results():
    scheduler = MOASHAScheduler(max_t=9, params_range=PARAMS_RANGE)
    recorded, new = DOUBLY_DOMINATED
    for index, (error, size) in enumerate(recorded):
        scheduler.on_trial_result(None, SimpleNamespace(trial_id=f"r{index}"), _result(9, error, size))
    assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="new"), _result(9, *new)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="x"), {"epoch": 1, "val_acc": 0.5}) == "CONTINUE"
    assert scheduler.stopped == set()


def test_rungs_are_the_epochs_kdtune_trials_report_at(tmp_path):
    register_rules()
    shutil.copy(REPO / "search_spaces" / "digits.yaml", tmp_path / SPEC_FILE)
    settings = EarlyStoppingSpec()
    rule = EARLY_STOPPING.get("moasha")(settings, 81, tmp_path)
    # η = 3, grace 1, 81 epochs: the same rungs as kdtune's own rules, passed to the trials.
    assert rule.report_epochs == rule.scheduler.milestones == [1, 3, 9, 27] == rung_milestones(1, 81, 3)
    assert rule.report_epochs == EARLY_STOPPING.get("pareto_asha")(settings, 81, tmp_path).report_epochs
    # The digits space: width 8 (682 parameters) to width 128 (26,122).
    assert rule.scheduler.rule.params_range == (682, 26_122)


def test_each_report_lands_in_its_own_rung_with_a_fractional_reduction_factor():
    # η = 2.5, 40 epochs: Bracket's levels are 1, 2.5, 6.25, 15.625 (and 39.06, not ranked:
    # a report at epoch 40 is the end). Reporting at their ceilings, 1, 3, 7, 16, puts each
    # report at its own level. kdtune's rounded rungs (1, 2, 6, 16, 39) would not: epoch 2
    # reaches no level beyond 1.
    scheduler = MOASHAScheduler(max_t=40, params_range=PARAMS_RANGE, reduction_factor=2.5)
    assert scheduler.milestones == [1, 3, 7, 16]
    assert rung_milestones(1, 40, 2.5) == [1, 2, 6, 16, 39]
    trial = SimpleNamespace(trial_id="t")
    errors = {1: 0.9, 3: 0.7, 7: 0.5, 16: 0.3}
    for epoch, error in errors.items():
        scheduler.on_trial_result(None, trial, _result(epoch, error, 0.5))
    recorded = {round(level, 3): rung["t"]["error"] for level, rung in scheduler.rule.bracket.rungs if "t" in rung}
    assert recorded == pytest.approx({1.0: 0.9, 2.5: 0.7, 6.25: 0.5, 15.625: 0.3})


def test_logged_rule_keeps_the_registered_rules_decisions_and_logs_them(tmp_path):
    register_rules()
    settings = EarlyStoppingSpec()
    rule = logged("pareto_asha")(settings, 81, tmp_path)
    plain = EARLY_STOPPING.get("pareto_asha")(settings, 81, tmp_path).scheduler
    assert type(rule.scheduler) is LoggedParetoASHA and isinstance(plain, ParetoASHA)
    assert rule.report_epochs == [1, 3, 9, 27]
    # Width 8 first (continues: first at its rung), then a wider trial with a worse loss:
    # rule 1 stops it (a smaller trial did at least as well after the same epochs).
    results = [("a", {"epoch": 1, "params": 682, "val_loss": 1.0, "val_acc": 0.6}),
               ("b", {"epoch": 1, "params": 26_122, "val_loss": 1.2, "val_acc": 0.5})]
    decisions = []
    for trial_id, result in results:
        trial = SimpleNamespace(trial_id=trial_id, config={"width": 8 if trial_id == "a" else 128})
        rule.scheduler.on_trial_add(None, trial)
        decisions.append(rule.scheduler.on_trial_result(None, trial, result))
        assert plain.on_trial_result(None, trial, result) == decisions[-1]
    assert decisions == ["CONTINUE", "STOP"]
    events = load_events(tmp_path / EVENTS_FILE)
    assert [(e["kind"], e["trial"], e.get("decision")) for e in events] == [
        ("add", "a", None), ("result", "a", "CONTINUE"), ("add", "b", None), ("result", "b", "STOP")]


def test_completion_events_interpolate_the_epochs_of_running_trials():
    # max_t 3. A and B added at 0; B stops at epoch 1 (t 2); C added at 2 reports epoch 1 at 4.
    # A completes at t 3: A 3 epochs, B 1, C halfway through its first epoch (0.5) = 4.5.
    # C completes at t 6: 3 + 1 + 3 = 7.
    log = [
        {"t": 10.0, "kind": "add", "trial": "A"}, {"t": 10.0, "kind": "add", "trial": "B"},
        {"t": 11.0, "kind": "result", "trial": "A", "epoch": 1, "params": 100, "val_acc": 0.5},
        {"t": 12.0, "kind": "result", "trial": "B", "epoch": 1, "params": 200, "val_acc": 0.4},
        {"t": 12.0, "kind": "add", "trial": "C"},
        {"t": 13.0, "kind": "result", "trial": "A", "epoch": 3, "params": 100, "val_acc": 0.9},
        {"t": 14.0, "kind": "result", "trial": "C", "epoch": 1, "params": 50, "val_acc": 0.3},
        {"t": 16.0, "kind": "result", "trial": "C", "epoch": 3, "params": 50, "val_acc": 0.8},
    ]
    by_epochs, by_seconds, epochs, seconds = completion_events(log, max_t=3)
    assert by_epochs == [pytest.approx((4.5, 100, 0.9)), pytest.approx((7.0, 50, 0.8))]
    assert by_seconds == [pytest.approx((3.0, 100, 0.9)), pytest.approx((6.0, 50, 0.8))]
    assert (epochs, seconds) == pytest.approx((7.0, 6.0))
    assert completion_events([], max_t=3) == ([], [], 0.0, 0.0)
