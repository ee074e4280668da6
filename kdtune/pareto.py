"""Size-vs-accuracy fronts in plain Python: the one definition of a front's
hypervolume and of power-of-two size buckets.

It sits below every layer: the early-stopping rules decide with it at each
rung, and the results layer measures finished studies with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


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
