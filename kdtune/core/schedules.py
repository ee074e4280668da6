"""Per-epoch schedules of a run's settings: the learning rate today, the temperature next.

A :class:`Schedule` is a pure function of the epoch and the run's *full* budget,
so a trial stopped early by the early-stopping rule was on exactly the same
schedule as one that ran to the end, and a resumed run recomputes the value of
its next epoch instead of restoring any state. Three kinds:

- ``constant``: the base value every epoch;
- ``cosine``: a linear warm-up over ``warmup`` epochs (base·e/warmup), then a
  half cosine from the base down to ``base·min_factor`` at the end of the budget;
- ``multistep``: the base times ``gamma`` once for every milestone the epoch is
  past.
- ``ramp``: from the base at epoch 1 to ``base·end_factor`` at the last epoch of
  the budget, ``shape`` linear or a half cosine (a temperature curriculum, T₀ → T₁). Milestones are epochs (``[150, 180, 210]``) or fractions of the budget
  (``[0.625, 0.75, 0.875]``, the same points of a 240-epoch budget).

Epochs count from 1, as in :func:`kdtune.core.distill.run`. "×0.1 at epoch 150"
follows RepDistiller's ``adjust_learning_rate`` (and torch's ``MultiStepLR``):
epoch 150 still runs at the base value, epoch 151 at a tenth of it.

A schedule is written as a name (``"cosine"``) or a mapping
(``{"kind": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}``);
:func:`parse_schedule` checks it and returns the normalised mapping a
:class:`~kdtune.core.distill.RunConfig` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from kdtune.errors import ConfigError

#: The schedule kinds and the settings each takes, with their defaults.
SCHEDULE_KINDS: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"warmup": 0, "min_factor": 0.0},
    "multistep": {"milestones": [], "gamma": 0.1},
    # A curriculum from the base to base·end_factor over the budget (up or down), the
    # temperature's: linear, or a half cosine.
    "ramp": {"end_factor": 1.0, "shape": "linear"},
}
RAMP_SHAPES = ("linear", "cosine")


def parse_schedule(raw: Any, field: str = "lr_schedule") -> dict[str, Any] | None:
    """The normalised mapping of a schedule given as a name or a mapping; None for
    ``None`` or ``"constant"`` (a constant schedule changes nothing).

    Raises :class:`ConfigError` naming ``field``, the bad key and what is allowed.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(field, f"a schedule is one of {', '.join(SCHEDULE_KINDS)} or a mapping with kind: ..., "
                                 f"got {raw!r}")
    kind = raw.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"{field}.kind", f"allowed: {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
    allowed = SCHEDULE_KINDS[kind]
    unknown = sorted(set(raw) - {"kind"} - set(allowed))
    if unknown:
        keys = ", ".join(allowed) or "none"
        raise ConfigError(f"{field}.{unknown[0]}", f"unknown setting of a {kind} schedule; allowed: {keys}")
    if kind == "constant":
        return None
    values = {"kind": kind, **allowed, **{k: v for k, v in raw.items() if k != "kind"}}
    if kind == "ramp":
        if not _is_number(values["end_factor"]) or values["end_factor"] <= 0:
            raise ConfigError(f"{field}.end_factor", f"must be a number > 0, got {values['end_factor']!r}")
        if values["shape"] not in RAMP_SHAPES:
            raise ConfigError(f"{field}.shape", f"allowed: {', '.join(RAMP_SHAPES)}, got {values['shape']!r}")
        return values
    if kind == "cosine":
        warmup, floor = values["warmup"], values["min_factor"]
        if not _is_number(warmup) or warmup < 0:
            raise ConfigError(f"{field}.warmup", f"must be a number of epochs >= 0 (or a fraction of the budget "
                                                 f"below 1), got {warmup!r}")
        if not _is_number(floor) or not 0 <= floor <= 1:
            raise ConfigError(f"{field}.min_factor", f"must be a number in [0, 1], got {floor!r}")
    else:
        milestones, gamma = values["milestones"], values["gamma"]
        if not isinstance(milestones, (list, tuple)) or not all(_is_number(m) and m > 0 for m in milestones):
            raise ConfigError(f"{field}.milestones", "must be a list of epochs (>= 1) or fractions of the budget "
                                                     f"(between 0 and 1), got {milestones!r}")
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"{field}.milestones", f"must be increasing, got {list(milestones)!r}")
        if not _is_number(gamma) or not 0 < gamma <= 1:
            raise ConfigError(f"{field}.gamma", f"must be a number in (0, 1], got {gamma!r}")
        values["milestones"] = list(milestones)
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epochs(value: float, budget: int) -> float:
    """An epoch count given as epochs (>= 1) or as a fraction of the budget (< 1)."""
    return value * budget if 0 < value < 1 else float(value)


@dataclass(frozen=True)
class Schedule:
    """A setting's value per epoch over a run's full budget (see the module docstring).

    ``base`` is the value a constant schedule keeps (the run's ``lr``), ``budget``
    the run's full epoch budget, ``spec`` the mapping :func:`parse_schedule` returns
    (None: constant).
    """

    base: float
    budget: int
    spec: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        """The schedule's kind: constant, cosine or multistep."""
        return "constant" if not self.spec else str(self.spec["kind"])

    def value(self, epoch: int) -> float:
        """The value during epoch ``epoch`` (counted from 1)."""
        spec, base, budget = self.spec, float(self.base), int(self.budget)
        if not spec or spec["kind"] == "constant":
            return base
        if spec["kind"] == "multistep":
            passed = sum(1 for m in spec["milestones"] if epoch > _epochs(float(m), budget))
            return base * float(spec["gamma"]) ** passed
        if spec["kind"] == "ramp":
            progress = min(max((epoch - 1) / max(budget - 1, 1), 0.0), 1.0)
            end = base * float(spec["end_factor"])
            if spec["shape"] == "cosine":
                return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
            return base + (end - base) * progress
        warmup = _epochs(float(spec["warmup"]), budget)
        if warmup > 0 and epoch <= warmup:
            return base * epoch / warmup
        floor = base * float(spec["min_factor"])
        span = max(budget - warmup, 1.0)
        progress = min(max((epoch - 1 - warmup) / span, 0.0), 1.0)
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def values(self) -> list[float]:
        """The value of every epoch of the budget, in order."""
        return [self.value(epoch) for epoch in range(1, int(self.budget) + 1)]
