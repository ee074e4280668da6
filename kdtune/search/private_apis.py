"""The private parts of Ray and Optuna that kdtune relies on, in one place.

Each is wrapped with a check that fails loudly, naming the library version, when
a release changes it, instead of silently doing nothing; ``tests/test_private_apis.py``
runs every check in a fraction of a second, so an upgrade that breaks one fails
the suite at once.

* ``OptunaSearch._ot_study`` and ``._ot_trials``: Ray's Optuna searcher keeps its
  study and its Ray-id → Optuna-trial map there, with no public accessor. kdtune
  needs them to tell Optuna honest outcomes (PRUNED, FAIL) and to enqueue one
  trial per student size.
* ``OptunaSearch._completed_trials``: the set of Ray ids already told to Optuna.
* ``ray._raylet.Config.initialize``: Ray reads ``RAY_AUTH_MODE`` once, at import;
  after setting it (to send the token to a cluster joined by address) it must be
  re-read, as Ray's own token setup does.
"""

from __future__ import annotations

from typing import Any


class PrivateApiChanged(RuntimeError):
    """A private attribute kdtune depends on is gone or changed in this Ray/Optuna release."""


def _library_versions() -> str:
    import optuna
    import ray

    return f"ray {ray.__version__}, optuna {optuna.__version__}"


def _require(owner: Any, name: str, what: str) -> Any:
    if not hasattr(owner, name):
        raise PrivateApiChanged(f"{type(owner).__name__}.{name} ({what}) is missing in {_library_versions()}; "
                                f"kdtune.search.private_apis needs updating for this release")
    return getattr(owner, name)


def optuna_study(searcher: Any) -> Any:
    """The Optuna study of a Ray ``OptunaSearch`` (None before its space is set)."""
    return _require(searcher, "_ot_study", "the Optuna study")


def optuna_trials(searcher: Any) -> dict[str, Any]:
    """The Ray trial id → Optuna trial map of a Ray ``OptunaSearch``."""
    trials = _require(searcher, "_ot_trials", "Ray trial id → Optuna trial")
    if not isinstance(trials, dict):
        raise PrivateApiChanged(f"OptunaSearch._ot_trials is a {type(trials).__name__}, not a dict, "
                                f"in {_library_versions()}")
    return trials


def told_trials(searcher: Any) -> set[str]:
    """The Ray trial ids a Ray ``OptunaSearch`` has already told Optuna about."""
    return _require(searcher, "_completed_trials", "the trials already told")


def fail_lost_trial(study: Any, trial: Any, attribute: str) -> None:
    """Mark a RUNNING/WAITING Optuna trial FAIL with the user attribute ``attribute``,
    through the study's storage (``study.tell`` cannot set an attribute first)."""
    storage = _require(study, "_storage", "the study's storage")
    trial_id = _require(trial, "_trial_id", "the trial's storage id")
    from optuna.trial import TrialState

    storage.set_trial_user_attr(trial_id, attribute, True)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def reload_ray_auth_mode() -> None:
    """Make Ray re-read ``RAY_AUTH_MODE`` from the environment (Ray reads it once, at import)."""
    from ray import _raylet

    config = _require(_raylet, "Config", "Ray's runtime config")
    _require(config, "initialize", "re-reading Ray's config")("")
