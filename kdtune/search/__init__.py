"""The search layer: Ray Tune and Optuna orchestrate distillation runs.

Modules: :mod:`~kdtune.search.plan` (spec → run configs, baselines, checks before
Ray starts), :mod:`~kdtune.search.cluster` (the Ray session, auth, resources),
:mod:`~kdtune.search.trainable` (one trial), :mod:`~kdtune.search.rules` and
:mod:`~kdtune.search.early_stopping` (the schedulers and their registry),
:mod:`~kdtune.search.sampler` (Optuna), :mod:`~kdtune.search.callbacks`
(records, progress), :mod:`~kdtune.search.experiment` (Ray's experiment folder
read into the tables) and :mod:`~kdtune.search.pipeline` (:func:`search`).

``from kdtune.search import search`` is the Python entry point. The names below
load their module on first use, so that a Ray worker importing
:mod:`kdtune.search.trainable` does not import the whole driver side.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "search": "kdtune.search.pipeline",
    "SearchResult": "kdtune.search.pipeline",
    "SearchInterrupted": "kdtune.search.pipeline",
    "resume_command": "kdtune.search.pipeline",
    "Placement": "kdtune.search.plan",
    "Budget": "kdtune.search.plan",
    "base_config": "kdtune.search.plan",
    "baseline_configs": "kdtune.search.plan",
    "check_inputs": "kdtune.search.plan",
    "max_epochs": "kdtune.search.plan",
    "plan_placement": "kdtune.search.plan",
    "preflight": "kdtune.search.plan",
    "ray_auth_environment": "kdtune.search.cluster",
    "ray_init_kwargs": "kdtune.search.cluster",
    "ray_session": "kdtune.search.cluster",
    "load_spec_data": "kdtune.spec",
    "teacher_configs": "kdtune.spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdtune.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
