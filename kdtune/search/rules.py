"""Early-stopping rules for Ray Tune that keep the size-vs-accuracy front.

Stock ASHA compares every trial with every other on accuracy alone. In a
distillation search the widest students are always the most accurate, so stock
ASHA stops nearly every small student and the size-vs-accuracy front collapses
(measured offline on digits: 14% of the full-budget front's hypervolume kept).

Two front-preserving rules live here, each as a plain-Python decision object
(testable without Ray) plus a thin Ray scheduler:

* :class:`ParetoASHA` (kdtune's default, rule ``pareto_asha``; decisions in
  :class:`ParetoRungs`): at each rung a trial continues only if no trial with
  fewer parameters did at least as well after the same epochs and it is in the
  top 1/η of its own size there (ASHA within a size), and only if even a
  perfect final score could add a noticeable share of hypervolume to the
  current front or its size is clearly ahead of every smaller one.
* :class:`SizeAwareASHA` (rule ``size_aware_asha``; decisions in
  :class:`HalvingRungs`): the same rungs as ASHA, but a trial competes only
  with trials of its own size bucket (the same ``width``, or the same
  power-of-two bucket of parameter count). About the same front for 2.5 times
  the epochs on digits, but more trials run to the end: more evidence for
  choosing T.

Both decide only at rung epochs (:func:`rung_milestones`) and the last epoch, so
a trial may report only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Iterable

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from kdtune.pareto import front_hypervolume, params_bucket
from kdtune.study import PHASES, load_records
from kdtune.tables import phase_tables, record_views

if TYPE_CHECKING:
    import pandas as pd

CONTINUE = TrialScheduler.CONTINUE
STOP = TrialScheduler.STOP


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """Epochs at which trials are compared: grace·η^k for every k with grace·η^k < max_t."""
    milestones, k = [], 0
    while True:
        milestone = int(round(grace_period * reduction_factor**k))
        if milestone >= max_t:
            return milestones
        if not milestones or milestone > milestones[-1]:
            milestones.append(milestone)
        k += 1


class HalvingRungs:
    """Asynchronous successive halving within one group of comparable trials.

    At each milestone a trial's score is recorded; the trial continues only if it
    is not below the ``1 − 1/η`` quantile of the scores already recorded at that
    milestone (the first trials to reach a rung always continue, as in ASHA).
    """

    def __init__(self, milestones: list[int], reduction_factor: float, mode: str = "max") -> None:
        self.milestones = list(milestones)
        self.reduction_factor = reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        self.recorded: dict[int, dict[Hashable, float]] = {m: {} for m in self.milestones}

    def cutoff(self, milestone: int) -> float | None:
        """The score a trial must reach at ``milestone`` to continue (in 'max' orientation)."""
        return halving_cutoff(self.recorded[milestone].values(), self.reduction_factor)

    def record(self, trial_key: Hashable, iteration: int, score: float | None) -> int | None:
        """Record ``score`` at the rung ``iteration`` reaches, without a decision
        (replaying a history); the rung it was recorded at, or None (no score, no
        rung reached yet, or this trial's score at that rung already recorded)."""
        rung = _rung_of(self.milestones, iteration)
        if not _finite(score) or rung is None or trial_key in self.recorded[rung]:
            return None
        self.recorded[rung][trial_key] = self.sign * float(score)  # type: ignore[arg-type]
        return rung

    def on_result(self, trial_key: Hashable, iteration: int, score: float | None) -> str:
        """CONTINUE or STOP for a trial that reported ``score`` after ``iteration`` epochs:
        the first time it reaches a rung, it stops if below the rung's cutoff so far."""
        rung = _rung_of(self.milestones, iteration)
        cut = self.cutoff(rung) if rung is not None else None
        if self.record(trial_key, iteration, score) is None or cut is None:
            return CONTINUE
        return STOP if self.recorded[rung][trial_key] < cut else CONTINUE


def halving_cutoff(scores: Iterable[float], reduction_factor: float) -> float | None:
    """The ``1 − 1/η`` quantile of ``scores`` ('max' orientation), None for no scores:
    the score a trial must reach to be kept by successive halving."""
    values = sorted(scores)
    if not values:
        return None
    quantile = 1 - 1 / reduction_factor
    # Linear interpolation, as numpy.percentile's default.
    position = quantile * (len(values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def _rung_of(milestones: list[int], epoch: int) -> int | None:
    """The largest milestone at or below ``epoch`` (None before the first): the rung
    a result after ``epoch`` epochs is judged at, even when earlier epochs were
    not reported."""
    reached = [m for m in milestones if m <= epoch]
    return reached[-1] if reached else None


class _RungScheduler(FIFOScheduler):
    """What kdtune's Ray schedulers share: their own metric, rungs at
    :func:`rung_milestones` in ``time_attr`` units, the trials they stopped, and
    rung state that survives a restart.

    Ray does not save schedulers with the experiment: ``Tuner.restore`` brings back
    the one pickled when the search started, with empty rungs. So on its first use
    (the first trial added) a scheduler replays the search records of ``study_dir``
    into its rungs (:meth:`restore_history`): after a resume its decisions are
    those of an uninterrupted search. A new search has no records yet.
    """

    #: Class-level defaults, so that schedulers pickled by older kdtune versions
    #: (without these attributes) still load: they have no study to restore from.
    study_dir: str | None = None
    restored_from_records = False

    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float,
                 time_attr: str, study_dir: str | None = None) -> None:
        super().__init__()
        self.study_dir = str(study_dir) if study_dir is not None else None
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self._metric = metric
        self._mode = mode
        self.max_t = max_t
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor
        self.time_attr = time_attr
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The scheduler keeps its own single metric; the searcher may be multi-objective.
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.restore_from_records()
        super().on_trial_add(tune_controller, trial)

    def restore_from_records(self) -> int:
        """Replay the study's search records into the rungs, once; the number of results restored."""
        if self.restored_from_records or self.study_dir is None:
            return 0
        self.restored_from_records = True
        views = record_views(load_records(self.study_dir, PHASES[0]))
        if not views:
            return 0
        _, history = phase_tables("", PHASES[0], views)
        restored = self.restore_history(history) if len(history) else 0
        if restored:
            # The scheduler runs in the driver, whose output is the search's log.
            print(f"early stopping: restored {restored} rung result(s) of the trials run before the restart",
                  flush=True)
        return restored

    def restore_history(self, history: "pd.DataFrame") -> int:  # pragma: no cover - every rule overrides it
        raise NotImplementedError

    def _decided(self, trial: Any, decision: str) -> str:
        if decision == STOP:
            self.stopped.add(trial.trial_id)
        return decision


class SizeAwareASHA(_RungScheduler):
    """Ray Tune scheduler: ASHA rungs, but trials compete only within their size bucket.

    Args:
        metric: the reported score to compare (``"val_acc"``).
        mode: ``"max"`` or ``"min"``.
        max_t: the full budget in ``time_attr`` units (epochs).
        grace_period: the first milestone.
        reduction_factor: η; about a 1/η fraction of each bucket survives each rung.
        size_key: ``"width"`` groups by the trial config's width; ``"params"`` by the
            power-of-two bucket of the reported parameter count.
        time_attr: the result field that counts epochs (``"epoch"``; results may
            arrive only at the rung epochs and the last epoch).
    """

    def __init__(
        self,
        metric: str = "val_acc",
        mode: str = "max",
        max_t: int = 27,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        size_key: str = "width",
        time_attr: str = "epoch",
        study_dir: str | None = None,
    ) -> None:
        super().__init__(metric, mode, max_t, grace_period, reduction_factor, time_attr, study_dir)
        self.size_key = size_key
        self._groups: dict[Any, HalvingRungs] = {}

    def bucket_of(self, config: dict[str, Any], result: dict[str, Any]) -> Any:
        """The size bucket a trial competes in."""
        if self.size_key == "width" and "width" in config:
            return ("width", config["width"])
        return ("params", params_bucket(result.get("params", 1)))

    def _group(self, config: dict[str, Any], result: dict[str, Any]) -> HalvingRungs:
        bucket = self.bucket_of(config, result)
        if bucket not in self._groups:
            self._groups[bucket] = HalvingRungs(self.milestones, self.reduction_factor, self._mode)
        return self._groups[bucket]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if self._metric not in result or self.time_attr not in result:
            return CONTINUE
        if result[self.time_attr] >= self.max_t:
            return CONTINUE
        group = self._group(trial.config, result)
        return self._decided(trial, group.on_result(trial.trial_id, int(result[self.time_attr]), result[self._metric]))

    def restore_history(self, history: "pd.DataFrame") -> int:
        """Replay the rung scores of an interrupted search into the rung state.

        Ray does not save a scheduler with the experiment, so a resumed search
        starts with empty rungs. ``history`` holds one row per trial per reported
        epoch with the columns ``trial_id``, ``epoch``, the metric (``val_acc``),
        and ``width`` (or ``params`` with ``size_key="params"``). Each trial's score
        at each rung it reached is recorded, as it was before the interruption;
        a trial that reports a rung again after the resume is not judged twice.
        Returns the number of rung scores recorded.
        """
        size_column = "width" if self.size_key == "width" else "params"
        rows = _history_rows(history, ["trial_id", "epoch", self._metric, size_column])
        recorded = 0
        for row in rows:
            epoch = int(row["epoch"])
            if epoch >= self.max_t:
                continue
            config = {"width": row[size_column]} if size_column == "width" else {}
            group = self._group(config, {"params": row.get("params", 1)})
            recorded += group.record(row["trial_id"], epoch, row[self._metric]) is not None
        return recorded

    def debug_string(self) -> str:
        return f"SizeAwareASHA: {len(self._groups)} size buckets, rungs at {self.milestones}, {len(self.stopped)} stopped"


# --------------------------------------------------------------------------- Pareto halving


@dataclass(frozen=True)
class RungRecord:
    """What a trial reported at a rung: its size, its score in 'max' orientation,
    and its front score (accuracy) at that epoch."""

    size: float
    score: float
    front_score: float


#: ``hv_epsilon`` of 0: rule 2 of :class:`ParetoRungs` off, the default of both rule classes
#: (bench/anytime.py: with it on, the widest sizes' regret exceeded the seed-to-seed spread).
RULE_2_OFF = 0.0


class ParetoRungs:
    """Asynchronous Pareto halving over (size, score): the decisions of :class:`ParetoASHA`.

    Rungs are :func:`rung_milestones`. When a trial first reports at (or past) a
    rung, its (size, score) is recorded there and it is stopped if

    1. **it is outranked at the rung** (:meth:`outranked`): a trial with *fewer*
       parameters recorded at the same rung has at least as good a score after
       the same number of epochs, or it is below the ``1 − 1/η`` quantile of the
       scores that trials of its *own* size recorded there before it (successive
       halving within the size, as ASHA; the first trial of a size at a rung is
       never stopped by the quantile); or
    2. **it could not matter to the front** (only with ``hv_epsilon`` > 0; off by
       default, see :class:`~kdtune.spec.EarlyStoppingSpec`): adding the point (its size,
       ``score_bound``), i.e. this student ending with a perfect front score
       (accuracy 1.0), to the current front estimate would raise the front's
       hypervolume by less than ``hv_epsilon`` of it, *and* its size shows no
       lift at this rung (:meth:`lift`): its front score there is at most
       ``min_gain`` above the best front score that a smaller trial recorded at
       the same rung.

    Otherwise it continues. Rule 1 compares sizes only in one direction, so the
    best small student so far always survives however accurate wide ones are
    (the reason stock ASHA fails here), and trials of one size compete as in
    ASHA, so a search over a single size is plain successive halving. Rule 2 is
    an optimistic bound that stops wide students once smaller ones are nearly as
    accurate, since a wide point then owns only a thin slab of hypervolume (a
    narrow slab in log size times the accuracy a perfect student would add);
    ``min_gain`` keeps it from stopping a size that is ahead of every smaller
    size by more than the seed-to-seed spread, however thin its slab: in
    hypervolume, 3 points of accuracy lost at the widest size cost about 0.1%,
    3 points at the smallest about 0.6%.

    The front estimate is order-free, so that a history can be replayed in any
    order (:meth:`record`): every finished trial at its final front score, and
    every other trial at its latest rung, with that rung's front score, when it
    is not dominated there (:meth:`dominated`; a trial stopped by rule 2 keeps
    its point: by that rule it changes the front's hypervolume by less than
    ``hv_epsilon``). Hypervolume is measured as in
    :func:`kdtune.results.analysis.hypervolume`: (log10 size, front score) space,
    reference point (2 × the largest size seen, 0).

    ``mode`` orients the score (``"min"`` for a loss); front scores are always
    'larger is better' (accuracy).
    """

    #: Class-level defaults of the attributes added after the first release, so
    #: that an instance pickled before them (restored by Ray on resume) still works.
    reduction_factor: float = 3.0
    min_gain: float = 0.01

    def __init__(self, milestones: list[int], max_t: int, mode: str = "min", hv_epsilon: float = RULE_2_OFF,
                 score_bound: float = 1.0, reduction_factor: float = 3.0, min_gain: float = 0.01) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if not 0 <= hv_epsilon < 1:
            raise ValueError(f"hv_epsilon must be in [0, 1), got {hv_epsilon!r}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor!r}")
        if not min_gain >= 0:
            raise ValueError(f"min_gain must be >= 0, got {min_gain!r}")
        self.milestones = list(milestones)
        self.max_t = int(max_t)
        self.sign = 1.0 if mode == "max" else -1.0
        self.hv_epsilon = float(hv_epsilon)
        self.score_bound = float(score_bound)
        self.reduction_factor = float(reduction_factor)
        self.min_gain = float(min_gain)
        self.recorded: dict[int, dict[Hashable, RungRecord]] = {m: {} for m in self.milestones}
        self.finished: dict[Hashable, tuple[float, float]] = {}
        self.largest_size = 0.0

    # ------------------------------------------------------------------ state

    def record(self, trial_key: Hashable, epoch: int, size: float, score: float | None,
               front_score: float | None) -> int | None:
        """Record a result without deciding; returns the rung it was recorded at, or None.

        A result at or past ``max_t`` marks the trial finished (with its front
        score); a result at a rung the trial has not reported before is recorded
        there; anything else (between rungs, a rung already recorded, a missing
        score) changes nothing.
        """
        if not _finite(size) or float(size) <= 0:
            return None
        size = float(size)
        self.largest_size = max(self.largest_size, size)
        if epoch >= self.max_t:
            if _finite(front_score):
                self.finished[trial_key] = (size, float(front_score))
            return None
        rung = _rung_of(self.milestones, epoch)
        if rung is None or trial_key in self.recorded[rung] or not _finite(score):
            return None
        accuracy = float(front_score) if _finite(front_score) else math.nan
        self.recorded[rung][trial_key] = RungRecord(size, self.sign * float(score), accuracy)
        return rung

    def dominated(self, trial_key: Hashable, rung: int) -> bool:
        """Whether another trial at ``rung`` has size <= and score >= this trial's there."""
        mine = self.recorded[rung][trial_key]
        return any(other.size <= mine.size and other.score >= mine.score
                   for key, other in self.recorded[rung].items() if key != trial_key)

    def outranked(self, trial_key: Hashable, rung: int) -> bool:
        """Rule 1: whether a smaller trial at ``rung`` has a score >= this trial's there, or
        this trial is below the ``1 − 1/η`` quantile of the other same-size scores there.

        In :meth:`on_result` the other trials are those recorded before this one."""
        mine = self.recorded[rung][trial_key]
        same_size = []
        for key, other in self.recorded[rung].items():
            if key == trial_key:
                continue
            if other.size < mine.size and other.score >= mine.score:
                return True
            if other.size == mine.size:
                same_size.append(other.score)
        cut = halving_cutoff(same_size, self.reduction_factor)
        return cut is not None and mine.score < cut

    def lift(self, trial_key: Hashable, rung: int) -> float:
        """How far this trial's front score at ``rung`` is above the best front score of
        the smaller trials recorded there (infinite when none is, or the scores are missing)."""
        mine = self.recorded[rung][trial_key]
        smaller = [other.front_score for key, other in self.recorded[rung].items()
                   if key != trial_key and other.size < mine.size and _finite(other.front_score)]
        if not smaller or not _finite(mine.front_score):
            return math.inf
        return mine.front_score - max(smaller)

    def front_points(self, exclude: Hashable | None = None) -> list[tuple[float, float]]:
        """The (size, front score) points of the current front estimate (see the class docstring)."""
        points = [point for key, point in self.finished.items() if key != exclude]
        latest: dict[Hashable, int] = {}
        for rung in self.milestones:
            for key in self.recorded[rung]:
                latest[key] = rung
        dominated = {rung: self._dominated_keys(rung) for rung in self.milestones}
        for key, rung in latest.items():
            if key == exclude or key in self.finished:
                continue
            record = self.recorded[rung][key]
            if _finite(record.front_score) and key not in dominated[rung]:
                points.append((record.size, record.front_score))
        return points

    def _dominated_keys(self, rung: int) -> set[Hashable]:
        """The trials :meth:`dominated` holds for at ``rung``, found in one pass by size
        (a search of thousands of trials would otherwise compare every pair per decision)."""
        by_size: dict[float, list[tuple[float, Hashable]]] = {}
        for key, record in self.recorded[rung].items():
            by_size.setdefault(record.size, []).append((record.score, key))
        dominated: set[Hashable] = set()
        best_smaller = -math.inf
        for size in sorted(by_size):
            group = sorted(by_size[size], key=lambda item: item[0], reverse=True)
            for index, (score, key) in enumerate(group):
                # Within a size the best is dominated only by a tie; everything else by the best.
                tied = index == 0 and len(group) > 1 and group[1][0] >= score
                if best_smaller >= score or index > 0 or tied:
                    dominated.add(key)
            best_smaller = max(best_smaller, group[0][0])
        return dominated

    def optimistic_gain(self, trial_key: Hashable, size: float) -> tuple[float, float]:
        """(hypervolume a perfect final score at ``size`` would add, current hypervolume),
        both without ``trial_key``'s own points."""
        points = self.front_points(exclude=trial_key)
        if not points:
            return math.inf, 0.0
        reference = 2.0 * max(self.largest_size, size)
        base = front_hypervolume(points, reference)
        return front_hypervolume(points + [(size, self.score_bound)], reference) - base, base

    # ------------------------------------------------------------------ decisions

    def on_result(self, trial_key: Hashable, epoch: int, size: float, score: float | None,
                  front_score: float | None) -> str:
        """CONTINUE or STOP for a trial of ``size`` that reported ``score`` (and
        ``front_score``) after ``epoch`` epochs. Only the first result at each rung
        is judged; results between rungs, at the end, or without a score continue."""
        rung = self.record(trial_key, epoch, size, score, front_score)
        if rung is None:
            return CONTINUE
        if self.outranked(trial_key, rung):
            return STOP
        if self.hv_epsilon > 0 and self.lift(trial_key, rung) <= self.min_gain:
            gain, base = self.optimistic_gain(trial_key, float(size))
            if gain < self.hv_epsilon * base:
                return STOP
        return CONTINUE


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _history_rows(history: "pd.DataFrame", columns: list[str]) -> list[dict[str, Any]]:
    """The rows of a history frame as dicts, search phase only, after checking ``columns``."""
    missing = [c for c in columns if c not in history.columns]
    if missing:
        raise ValueError(f"history is missing column(s) {', '.join(missing)}; needed: {', '.join(columns)}")
    frame = history
    if "phase" in frame.columns:
        frame = frame[frame["phase"].fillna("search") == "search"]
    return [row for row in frame.to_dict("records") if _finite(row["epoch"])]


class ParetoASHA(_RungScheduler):
    """Ray Tune scheduler: asynchronous Pareto halving over (params, score) (``rule: pareto_asha``).

    The decisions are :class:`ParetoRungs`'s: at each rung a trial continues only
    if no trial with fewer parameters did at least as well after the same epochs
    and it is in the top ``1/η`` of its own size there, and (with ``hv_epsilon`` > 0;
    off by default) if even a perfect final accuracy at its size could add at least
    ``hv_epsilon`` of the current front's hypervolume (or its size is ahead of every
    smaller one by more than ``min_gain``).

    Args:
        metric: the reported score that ranks trials at a rung (``"val_loss"``:
            after a few epochs the validation loss predicts the final accuracy
            better than the accuracy does; measured on digits).
        mode: ``"min"`` or ``"max"`` for ``metric``.
        front_metric: the reported accuracy the front is built from (``"val_acc"``).
        size_attr: the reported model size (``"params"``).
        max_t: the full budget in ``time_attr`` units (epochs).
        grace_period: the first rung.
        reduction_factor: η, the rung spacing: rungs at grace·η^k below ``max_t``.
        hv_epsilon: the least share of the front's hypervolume a trial must be able
            to add to continue; 0, the default, turns the bound (rule 2) off.
        score_bound: the best ``front_metric`` a trial could reach (1.0 for accuracy).
        time_attr: the result field that counts epochs (``"epoch"``). Results are
            needed only at :attr:`milestones` and at ``max_t``.
        min_gain: the ``hv_epsilon`` bound never stops a trial whose ``front_metric``
            at a rung is more than this above every smaller trial's there (see
            :class:`ParetoRungs`).
    """

    def __init__(
        self,
        metric: str = "val_loss",
        mode: str = "min",
        front_metric: str = "val_acc",
        size_attr: str = "params",
        max_t: int = 27,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        hv_epsilon: float = RULE_2_OFF,
        score_bound: float = 1.0,
        time_attr: str = "epoch",
        min_gain: float = ParetoRungs.min_gain,
        study_dir: str | None = None,
    ) -> None:
        super().__init__(metric, mode, max_t, grace_period, reduction_factor, time_attr, study_dir)
        self.front_metric = front_metric
        self.size_attr = size_attr
        self.rungs = ParetoRungs(self.milestones, max_t, mode, hv_epsilon, score_bound, reduction_factor, min_gain)

    def _results_held(self) -> int:
        return len(self.rungs.finished) + sum(len(r) for r in self.rungs.recorded.values())

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if self.time_attr not in result or self.size_attr not in result:
            return CONTINUE
        return self._decided(trial, self.rungs.on_result(
            trial.trial_id, int(result[self.time_attr]), result[self.size_attr],
            result.get(self._metric), result.get(self.front_metric)))

    def restore_history(self, history: "pd.DataFrame") -> int:
        """Replay the results of an interrupted search into the rung state.

        Ray does not save a scheduler with the experiment, so a resumed search
        starts with empty rungs. ``history`` holds one row per trial per reported
        epoch with the columns ``trial_id`` (Ray's), ``epoch``, the metric
        (``val_loss``), the front metric (``val_acc``) and the size (``params``),
        in any order; rows of other phases (a ``phase`` column other than
        "search") are skipped. Every rung result and every finished trial is
        recorded as it was before the interruption, so the next decisions equal
        those of an uninterrupted search; a trial that reports a rung again after
        the resume is not judged twice. Returns the number of rung and final
        results added.
        """
        rows = _history_rows(history, ["trial_id", "epoch", self._metric, self.front_metric, self.size_attr])
        before = self._results_held()
        for row in rows:
            self.rungs.record(row["trial_id"], int(row["epoch"]), row[self.size_attr], row[self._metric],
                              row[self.front_metric])
        return self._results_held() - before

    def debug_string(self) -> str:
        return (f"ParetoASHA: rungs at {self.milestones}, {self._results_held()} rung and final results, "
                f"{len(self.stopped)} stopped")
