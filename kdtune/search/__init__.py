"""The search layer: Ray Tune and Optuna orchestrate distillation runs.

Modules: :mod:`~kdtune.search.plan` (spec → run configs, baselines, checks before
Ray starts), :mod:`~kdtune.search.cluster` (the Ray session, auth, resources),
:mod:`~kdtune.search.trainable` (one trial), :mod:`~kdtune.search.rules` and
:mod:`~kdtune.search.early_stopping` (the schedulers and their registry),
:mod:`~kdtune.search.sampler` (Optuna), :mod:`~kdtune.search.callbacks`
(records, progress), :mod:`~kdtune.search.experiment` (Ray's experiment folder
read into the tables) and :mod:`~kdtune.search.pipeline` (:func:`search`).

``from kdtune.search import search`` is the Python entry point.
"""

from kdtune.search.cluster import ray_auth_environment, ray_init_kwargs, ray_session
from kdtune.search.pipeline import SearchInterrupted, SearchResult, resume_command, search
from kdtune.search.plan import (
    Placement,
    base_config,
    baseline_configs,
    check_inputs,
    max_epochs,
    plan_placement,
    preflight,
)
from kdtune.spec import load_spec_data, teacher_configs

__all__ = [
    "Placement", "SearchInterrupted", "SearchResult", "base_config", "baseline_configs", "check_inputs",
    "load_spec_data", "max_epochs", "plan_placement", "preflight", "ray_auth_environment", "ray_init_kwargs",
    "ray_session", "resume_command", "search", "teacher_configs",
]
