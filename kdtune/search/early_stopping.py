"""Early-stopping rules by name: the :data:`EARLY_STOPPING` registry.

A rule is one registered factory. Given the spec's ``early_stopping`` settings,
the trials' epoch budget and the study folder, it returns a :class:`StoppingRule`:
the Ray Tune scheduler and the epochs at which it needs results (a trial reports
to Ray only at those epochs and its last one, see :mod:`kdtune.search.trainable`).
A scheduler that keeps state across trials rebuilds it from the study's records
on its first use after a ``--resume`` (Ray does not save schedulers), as
:class:`kdtune.search.rules.ParetoASHA` does. Adding a rule::

    @EARLY_STOPPING.register("my_rule")
    def my_rule(settings, max_epochs, study_dir):
        return StoppingRule(MyScheduler(...), report_epochs=[...])

Its name is then allowed as ``early_stopping.rule`` in a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from kdtune.registry import Registry
from kdtune.search.rules import ParetoASHA, SizeAwareASHA, rung_milestones
from kdtune.spec import EarlyStoppingSpec


@dataclass
class StoppingRule:
    """What a rule factory returns: the Ray scheduler and the epochs it decides at."""

    scheduler: TrialScheduler
    report_epochs: list[int] = field(default_factory=list)


#: A rule factory: (settings, the trials' largest epoch budget, the study folder) → rule.
RuleFactory = Callable[[EarlyStoppingSpec, int, Path], StoppingRule]

EARLY_STOPPING: Registry[RuleFactory] = Registry("early-stopping rule")


@EARLY_STOPPING.register("none")
def no_stopping(settings: EarlyStoppingSpec, max_epochs: int, study_dir: Path) -> StoppingRule:
    """Every trial runs its full budget."""
    return StoppingRule(FIFOScheduler(), [])


@EARLY_STOPPING.register("asha")
def stock_asha(settings: EarlyStoppingSpec, max_epochs: int, study_dir: Path) -> StoppingRule:
    """Ray's stock ASHA on validation accuracy (every trial against every other)."""
    scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=max_epochs,
                              grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    return StoppingRule(scheduler, rung_milestones(settings.grace_period, max_epochs, settings.reduction_factor))


@EARLY_STOPPING.register("pareto_asha")
def pareto_asha(settings: EarlyStoppingSpec, max_epochs: int, study_dir: Path) -> StoppingRule:
    """Asynchronous Pareto halving over (parameters, validation loss); kdtune's default."""
    scheduler = ParetoASHA(metric="val_loss", mode="min", front_metric="val_acc", size_attr="params",
                           max_t=max_epochs, grace_period=settings.grace_period,
                           reduction_factor=settings.reduction_factor, hv_epsilon=settings.hv_epsilon,
                           min_gain=settings.min_gain, time_attr="epoch", study_dir=study_dir)
    return StoppingRule(scheduler, scheduler.milestones)


@EARLY_STOPPING.register("size_aware_asha")
def size_aware_asha(settings: EarlyStoppingSpec, max_epochs: int, study_dir: Path) -> StoppingRule:
    """ASHA rungs, each trial competing only with trials of its own size bucket."""
    scheduler = SizeAwareASHA(metric="val_acc", mode="max", max_t=max_epochs, grace_period=settings.grace_period,
                              reduction_factor=settings.reduction_factor, size_key=settings.size_key,
                              time_attr="epoch", study_dir=study_dir)
    return StoppingRule(scheduler, scheduler.milestones)


def build_rule(settings: EarlyStoppingSpec, max_epochs: int, study_dir: Path) -> StoppingRule:
    """The rule the spec names (a :class:`~kdtune.errors.ConfigError` listing the
    registered names when it is unknown)."""
    return EARLY_STOPPING.get(settings.rule)(settings, max_epochs, Path(study_dir))


def describe(name: str) -> str:
    """The first line of a rule's docstring."""
    doc: Any = EARLY_STOPPING.get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name
