"""Size-vs-accuracy fronts in plain Python: the one definition of a front's
hypervolume and of power-of-two size buckets.

Also the front of a trials table (:func:`pareto_front`). It sits below every layer: the early-stopping rules decide with it at each
rung, and the results layer measures finished studies with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from kdtune.errors import ConfigError, ResultsError


def front_hypervolume(points: Iterable[tuple[float, float]], reference_size: float, reference_score: float = 0.0,
                      log_size: bool = True) -> float:
    """Area of (size, score) space dominated by the front of ``points``, bounded by
    the reference (``reference_size``, ``reference_score``).

    The front is taken first (smallest size for each reachable score); it is the
    union over front points (s, y) of the rectangles [s, size_ref] × [score_ref, y],
    measured in (log10(size), score) space (``log_size``, sizes > 0) or (size, score).
    """
    front: list[tuple[float, float]] = []
    best = -math.inf
    for size, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((math.log10(size) if log_size else float(size), float(score)))
            best = score
    right = math.log10(reference_size) if log_size else float(reference_size)
    total = 0.0
    # Scores strictly increase along the front: each point owns the slab from its
    # own size to the next point's size (or the reference).
    for i, (x, y) in enumerate(front):
        edge = min(front[i + 1][0], right) if i + 1 < len(front) else right
        if x < right and y > reference_score:
            total += (edge - x) * (y - reference_score)
    return total


def power_of_two_exponent(params: float) -> int:
    """The bucket of a parameter count: ``e`` such that ``2^e <= params < 2^(e+1)``."""
    return int(math.floor(math.log2(max(float(params), 1.0))))


def power_of_two_label(exponent: int) -> str:
    """The label of a power-of-two bucket, e.g. ``"2^10–2^11"`` for 1024–2047 parameters."""
    return f"2^{exponent}–2^{exponent + 1}"


def params_bucket(params: float) -> str:
    """The labelled power-of-two bucket of a parameter count."""
    return power_of_two_label(power_of_two_exponent(params))


def require_columns(df: pd.DataFrame, **columns: str) -> None:
    """ConfigError naming the argument whose column is not in ``df``."""
    for argument, column in columns.items():
        if column not in df.columns:
            raise ConfigError(
                argument,
                f"column {column!r} is not in the table; available: {', '.join(map(str, df.columns))}",
            )


def counted_trials(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows the analyses count: completed, search-phase, with ``columns`` not NaN.

    ``status`` and ``phase`` filter only when the table has those columns.
    """
    mask = pd.Series(True, index=df.index)
    if "status" in df.columns:
        mask &= df["status"] == "completed"
    if "phase" in df.columns:
        mask &= df["phase"] == "search"
    rows = df[mask]
    return rows.dropna(subset=list(columns))


def pareto_front(df: pd.DataFrame, size: str = "params", score: str = "val_acc") -> pd.DataFrame:
    """The non-dominated rows of ``df``: smallest ``size`` for each reachable ``score``.

    Only completed search-phase rows count (:func:`counted_trials`). A row is
    dominated when another row has ``size <=`` and ``score >=`` with at least one
    inequality strict. Rows with exactly the same (size, score) as an earlier row
    of ``df`` are dropped: the front keeps the first occurrence only, so every
    point of the front appears once.

    Returns the front's rows with all of ``df``'s columns and original index,
    sorted by ``size`` ascending (so ``score`` strictly increases too).

    Raises :class:`ResultsError` when no completed search-phase row is left, and
    :class:`ConfigError` when ``size`` or ``score`` is not a column.
    """
    require_columns(df, size=size, score=score)
    rows = counted_trials(df, size, score)
    if rows.empty:
        raise ResultsError(
            f"no completed search trials with {size!r} and {score!r} "
            f"({len(df)} rows in the table): nothing to build a Pareto front from"
        )
    # Smallest size first, best score first within a size, then input order, so
    # that the sweep below keeps the first of exact duplicates.
    order = np.lexsort((np.arange(len(rows)), -rows[score].to_numpy(float), rows[size].to_numpy(float)))
    ordered = rows.iloc[order]
    keep = []
    best_score = -math.inf
    for position, value in enumerate(ordered[score].to_numpy(float)):
        # Every earlier row is no larger; this one survives only if it scores strictly higher.
        if value > best_score:
            keep.append(position)
            best_score = value
    return ordered.iloc[keep]
