"""MOASHA (Syne Tune 0.16) as shipped, and corrected, for kdtune's offline comparison.

Syne Tune's MOASHA ranks the trials at a rung by non-dominated sorting, ties
within a front broken by an ε-net, and keeps the top 1/η
(``syne_tune.optimizer.schedulers.asha.Bracket`` with
``multiobjective.NonDominatedPriority``). As shipped in 0.16.0 it has two bugs:

1. ``NonDominatedPriority`` returns trial *indices in best-first order*, while
   ``Bracket.on_result`` reads that array as *one priority per trial* (lower is
   better). The decision for the new trial then depends on which trial happens
   to be ranked last, not on the new trial's own rank: a new trial that
   dominates every recorded one can be stopped, one dominated by two of three
   can continue.
2. Inside ``nondominated_sort``, ``compute_epsilon_net`` returns per-item
   *ranks*, which are then used as an *ordering* (``pareto_front[ranks]``): the
   ε-net order within each front is inverted.

:class:`CorrectedPriority` fixes both, using Syne Tune's own
``pareto_efficient`` and ``compute_epsilon_net`` (the ordering turned into
per-trial ranks); :class:`MOASHARule` drives Syne Tune's own ``Bracket`` with
either priority, behind the interface of kdtune's Ray schedulers that
``bench/scheduler_sim.py`` replays (``milestones`` and ``on_trial_result``).
Objectives are normalised to [0, 1] first (:func:`normalised_objectives`): the
ε-net is Euclidean on raw values, so raw parameter counts would swamp accuracy.
MOASHA's ``do_minimize`` is one flag for all objectives, hence error = 1 −
accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:
    from syne_tune.optimizer.schedulers.asha import Bracket
    from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import (
        MOPriority,
        NonDominatedPriority,
    )
    from syne_tune.optimizer.schedulers.multiobjective.non_dominated_priority import (
        compute_epsilon_net,
        pareto_efficient,
    )
except ImportError as error:  # pragma: no cover - depends on the environment
    SYNE_TUNE_ERROR: ImportError | None = error
    MOPriority = object  # type: ignore[misc,assignment]
else:
    SYNE_TUNE_ERROR = None


def efficient_2d(points: np.ndarray) -> np.ndarray:
    """Syne Tune's ``pareto_efficient`` for two minimised objectives, in O(n log n):
    a point is dominated if another is <= in both and < in one (duplicates dominate
    neither). Syne Tune's loops over every point, which a rung of a thousand trials
    cannot afford at every decision."""
    order = np.lexsort((points[:, 1], points[:, 0]))  # by the first objective, then the second
    first, second = points[order, 0], points[order, 1]
    group_start = np.searchsorted(first, first, side="left")  # first row with the same first objective
    before = np.concatenate([[np.inf], np.minimum.accumulate(second)[:-1]])  # min second over rows before
    strictly_smaller_first = before[group_start]
    dominated = (strictly_smaller_first <= second) | (second[group_start] < second)
    mask = np.empty(len(points), dtype=bool)
    mask[order] = ~dominated
    return mask


def nondominated_order(objectives: np.ndarray, dim: int | None = 0, stop_after: int | None = None) -> np.ndarray:
    """Row indices of ``objectives`` (all minimised) best first: successive Pareto
    fronts, each ordered by Syne Tune's ε-net (seeded with the lowest value in
    column ``dim``, then always the point farthest from those already chosen).

    With ``stop_after``, sorting stops once more than that many rows are ordered
    (the rest are left out)."""
    objectives = np.asarray(objectives, dtype=float)
    efficient = efficient_2d if objectives.shape[1] == 2 else pareto_efficient
    remaining = np.arange(len(objectives))
    order: list[int] = []
    while remaining.size and (stop_after is None or len(order) <= stop_after):
        mask = efficient(objectives[remaining])
        front = remaining[mask]
        # compute_epsilon_net returns each point's rank; argsort turns ranks into an order.
        order.extend(front[np.argsort(compute_epsilon_net(objectives[front], dim=dim))].tolist())
        remaining = remaining[~mask]
    return np.array(order, dtype=int)


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    """The inverse permutation: ``ranks[order[i]] = i`` (one priority per row, lower first)."""
    ranks = np.empty(len(order), dtype=int)
    ranks[np.asarray(order, dtype=int)] = np.arange(len(order))
    return ranks


class CorrectedPriority(MOPriority):
    """Non-dominated sort with ε-net tie-breaks, returned as Bracket expects it: one
    priority (rank, 0 = best) per trial.

    ``Bracket.on_result`` reads only the last row's priority (the new trial's) and
    stops it when that rank exceeds ``n/η``. With ``reduction_factor`` given, the sort
    stops once more than ``n/η`` rows are ordered without the new trial among them:
    it is stopped whatever its exact rank, so it gets rank ``n − 1``, and the rows
    left unsorted get the remaining ranks in index order (read by nobody)."""

    def __init__(self, dim: int | None = 0, reduction_factor: float | None = None) -> None:
        super().__init__(metrics=None)
        self.dim = dim
        self.reduction_factor = reduction_factor

    def priority_unsafe(self, objectives: np.ndarray) -> np.ndarray:
        n = len(objectives)
        stop_after = None if self.reduction_factor is None else int(n / self.reduction_factor)
        order = nondominated_order(objectives, self.dim, stop_after)
        if len(order) < n:
            placed = set(order.tolist())
            rest = [i for i in range(n) if i not in placed and i != n - 1]
            last = [] if n - 1 in placed else [n - 1]
            order = np.concatenate([order, rest, last]).astype(int)
        return ranks_from_order(order)


def normalised_objectives(accuracy: float, params: float, params_range: tuple[float, float]) -> dict[str, float]:
    """MOASHA's objectives, both minimised and scaled to [0, 1]: error = 1 − accuracy, and
    log10 params mapped linearly from the space's (smallest, largest) size onto [0, 1]."""
    low, high = (math.log10(float(p)) for p in params_range)
    size = (math.log10(float(params)) - low) / (high - low) if high > low else 0.0
    return {"error": 1.0 - float(accuracy), "size": min(max(size, 0.0), 1.0)}


def bracket_milestones(bracket: Any, max_t: int) -> list[int]:
    """The epochs at which trials must report so that each report lands in its own rung of
    ``bracket``: the ceiling of each rung level below ``max_t``, ascending.

    Bracket's levels are grace·η^k unrounded (2.5, 6.25, … for η = 2.5), and a result is
    recorded at the highest level at or below its epoch not yet holding the trial. kdtune's
    :func:`~kdtune.scheduler.rung_milestones` rounds (2, 6, …): a report at epoch 2 would
    reach no level, and the one at 6 would be ranked at level 2.5. For integer η both agree."""
    levels = sorted(float(level) for level, _ in bracket.rungs)
    epochs = [math.ceil(round(level, 9)) for level in levels]
    return sorted({epoch for epoch in epochs if epoch < max_t})


class MOASHARule:
    """MOASHA's decisions on Syne Tune's own ``Bracket`` (one bracket, as MOASHA's default),
    with kdtune's scheduler interface: ``on_trial_result(controller, trial, result)``
    with ``result`` holding ``epoch``, ``params`` and ``metric`` (``val_acc``).

    Args:
        max_t: the full budget (epochs); results at ``max_t`` are not ranked.
        params_range: the smallest and largest parameter count of the space.
        corrected: :class:`CorrectedPriority` if True, Syne Tune's shipped
            ``NonDominatedPriority`` if False.
        grace_period, reduction_factor: as ASHA (rungs grace·η^k below ``max_t``).
        metric: the accuracy-like result ranked as ``1 − metric`` (``"val_acc"``);
            with ``mode="min"`` a loss is ranked as is (scaled by ``loss_scale``).
    """

    def __init__(self, max_t: int, params_range: tuple[float, float], corrected: bool = True,
                 grace_period: int = 1, reduction_factor: int = 3, metric: str = "val_acc", mode: str = "max",
                 loss_scale: float = 1.0) -> None:
        if SYNE_TUNE_ERROR is not None:
            raise ImportError(f"MOASHA needs syne-tune: {SYNE_TUNE_ERROR}")
        self.max_t = int(max_t)
        self.params_range = params_range
        self.metric, self.mode, self.loss_scale = metric, mode, float(loss_scale)
        priority = CorrectedPriority(reduction_factor=reduction_factor) if corrected else NonDominatedPriority()
        self.bracket = Bracket(grace_period, max_t, reduction_factor, 0, priority)
        self.milestones = bracket_milestones(self.bracket, self.max_t)

    def objectives(self, result: dict[str, Any]) -> dict[str, float]:
        """The normalised objectives of one result."""
        score = float(result[self.metric])
        accuracy = score if self.mode == "max" else 1.0 - min(score / self.loss_scale, 1.0)
        return normalised_objectives(accuracy, result["params"], self.params_range)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if int(result["epoch"]) >= self.max_t:
            return "CONTINUE"
        decision = self.bracket.on_result(trial.trial_id, int(result["epoch"]), self.objectives(result))
        return "STOP" if decision == "STOP" else "CONTINUE"
