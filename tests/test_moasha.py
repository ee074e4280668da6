"""MOASHA's rung decisions (Syne Tune 0.16's Bracket) as shipped and corrected, on hand-worked rung tables."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("syne_tune", reason="syne-tune is not installed: MOASHA (bench/moasha.py) needs its Bracket")

from syne_tune.optimizer.schedulers.asha import Bracket  # noqa: E402
from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import NonDominatedPriority  # noqa: E402
from syne_tune.optimizer.schedulers.multiobjective.non_dominated_priority import (  # noqa: E402
    nondominated_sort,
    pareto_efficient,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from moasha import (  # noqa: E402
    CorrectedPriority,
    MOASHARule,
    efficient_2d,
    nondominated_order,
    normalised_objectives,
    ranks_from_order,
)

#: Rung tables: three recorded (error, normalised size) results at rung 1, then a new trial.
#: Table 1: a chain r0 < r1 < r2, and a new trial that dominates all three.
DOMINATING = ([(0.20, 0.5), (0.30, 0.6), (0.40, 0.7)], (0.10, 0.4))
#: Table 2: r1 and r2 are non-dominated, r0 is dominated by everyone; the new trial is
#: dominated by r1 (0.1 < 0.3, 0.5 < 0.6) and by r2 (0.2 < 0.3, 0.3 < 0.6) and dominates r0.
DOUBLY_DOMINATED = ([(0.50, 0.9), (0.10, 0.5), (0.20, 0.3)], (0.30, 0.6))


def _decide(priority, table) -> str:
    recorded, new = table
    bracket = Bracket(min_t=1, max_t=9, reduction_factor=3, s=0, priority=priority)
    for index, (error, size) in enumerate(recorded):
        bracket.on_result(f"r{index}", 1, {"error": error, "size": size})
    return bracket.on_result("new", 1, {"error": new[0], "size": new[1]})


def test_corrected_ranking_keeps_the_dominating_trial_and_stops_the_doubly_dominated_one():
    # Corrected: the dominating trial has rank 0 of 4 (0 <= 1/3): CONTINUE; the doubly
    # dominated one has rank 2 of 4 (fronts {r1, r2}, {new}, {r0}; 2/4 > 1/3): STOP.
    assert _decide(CorrectedPriority(), DOMINATING) == "CONTINUE"
    assert _decide(CorrectedPriority(), DOUBLY_DOMINATED) == "STOP"


def test_shipped_ranking_gives_the_opposite_answers():
    # Shipped: NonDominatedPriority returns the order [new, r0, r1, r2] (indices [3, 0, 1, 2]);
    # Bracket reads entry -1, i.e. index 2 (r2, the worst), as the new trial's priority: 2/4 > 1/3.
    assert list(NonDominatedPriority()(np.array(DOMINATING[0] + [DOMINATING[1]]))) == [3, 0, 1, 2]
    assert _decide(NonDominatedPriority(), DOMINATING) == "STOP"
    # Order [r1 or r2, r2 or r1, new, r0]: the last index is 0 (r0), read as priority 0/4: CONTINUE.
    assert _decide(NonDominatedPriority(), DOUBLY_DOMINATED) == "CONTINUE"


def test_ranks_are_the_inverse_of_the_order():
    assert list(ranks_from_order(np.array([2, 0, 3, 1]))) == [1, 3, 0, 2]
    table = np.array(DOUBLY_DOMINATED[0] + [DOUBLY_DOMINATED[1]])
    assert list(CorrectedPriority()(table)) == list(ranks_from_order(nondominated_order(table)))


#: ε-net on one front, rows D, A, B, C (all non-dominated) and E, dominated by C.
#: Seed: the lowest first column, A (0, 1). Then the point farthest from {A}: B (distance
#: √2, against C 0.707, D 0.141). Then farthest from {A, B}: C (min distance 0.707; D 0.141).
#: Then D. The second front is E alone. Order: A, B, C, D, E = rows 1, 2, 3, 0, 4.
EPSILON_NET_POINTS = np.array([(0.1, 0.9), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.6, 0.6)])


def test_epsilon_net_orders_a_front_by_spread():
    assert list(nondominated_order(EPSILON_NET_POINTS)) == [1, 2, 3, 0, 4]
    assert list(CorrectedPriority()(EPSILON_NET_POINTS)) == [3, 0, 1, 2, 4]


def test_shipped_nondominated_sort_inverts_the_epsilon_net_order():
    # compute_epsilon_net returns ranks (D 3, A 0, B 1, C 2); nondominated_sort indexes the front
    # with them as if they were an order: rows [3, 0, 1, 2] = C, D, A, B instead of A, B, C, D.
    assert nondominated_sort(EPSILON_NET_POINTS, dim=0) == [3, 0, 1, 2, 4]  # dim=0 as NonDominatedPriority


def test_objectives_are_error_and_log_size_scaled_to_the_unit_interval():
    assert normalised_objectives(0.9, 1000, (10, 100_000)) == pytest.approx({"error": 0.1, "size": 0.5})
    assert normalised_objectives(1.0, 10, (10, 100_000)) == pytest.approx({"error": 0.0, "size": 0.0})
    assert normalised_objectives(0.0, 100_000, (10, 100_000))["size"] == pytest.approx(1.0)


def test_moasha_rule_ranks_accuracy_and_params_through_the_corrected_bracket():
    # Table 1 in accuracy and params (size 10^(1 + 4·s) over the range 10..100,000).
    rule = MOASHARule(max_t=9, params_range=(10, 100_000), corrected=True)
    assert rule.milestones == [1, 3]
    for index, (error, size) in enumerate(DOMINATING[0]):
        result = {"epoch": 1, "val_acc": 1 - error, "params": 10 ** (1 + 4 * size)}
        rule.on_trial_result(None, SimpleNamespace(trial_id=f"r{index}"), result)
    error, size = DOMINATING[1]
    new = {"epoch": 1, "val_acc": 1 - error, "params": 10 ** (1 + 4 * size)}
    assert rule.on_trial_result(None, SimpleNamespace(trial_id="new"), new) == "CONTINUE"
    assert rule.on_trial_result(None, SimpleNamespace(trial_id="new"), {**new, "epoch": 9}) == "CONTINUE"
    assert math.isclose(rule.objectives(new)["size"], 0.4)


def test_fast_pareto_mask_matches_syne_tunes_on_ties_and_duplicates():
    generator = np.random.default_rng(0)
    for _ in range(300):
        points = generator.integers(0, 4, size=(generator.integers(1, 15), 2)).astype(float) / 4
        assert list(efficient_2d(points)) == list(pareto_efficient(points))


def test_early_exit_ranking_gives_the_full_rankings_decision():
    generator = np.random.default_rng(1)
    for _ in range(200):
        points = generator.random((generator.integers(2, 30), 2))
        full = CorrectedPriority()(points)
        quick = CorrectedPriority(reduction_factor=3)(points)
        n = len(points)
        assert (full[-1] / n > 1 / 3) == (quick[-1] / n > 1 / 3)
        assert sorted(quick) == list(range(n))
