"""What a Ray experiment folder adds to a study's records: the trials that had
not ended (an interrupted search) and the reports a trial made before a restart.

The study's tables are built from its records (:mod:`kdtune.tables`); during a
search the driver also reads Ray's experiment, which only this layer may do.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdtune.study import experiment_path, load_records
from kdtune.tables import TrialView, build_tables, error_message, record_views, write_tables


def experiment_views(experiment_dir: str | None) -> dict[str, TrialView]:
    """Trial views of one Ray experiment folder (None or unreadable: none).

    Reads Ray's experiment state with ``ExperimentAnalysis``, which unpickles it:
    only use it on folders you created.
    """
    if experiment_dir is None:
        return {}
    if "://" not in experiment_dir and not any(Path(experiment_dir).glob("experiment_state-*.json")):
        return {}
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(experiment_dir))
        frames = analysis.trial_dataframes
    except (ValueError, FileNotFoundError):
        # Ray's folder is unreadable (a driver killed while writing it): the records remain.
        return {}
    views: dict[str, TrialView] = {}
    for trial in analysis.trials:
        df = frames.get(trial.trial_id, pd.DataFrame())
        results = df.to_dict("records") if len(df) else []
        views[trial.trial_id] = (trial.config or {}, str(trial.status), results, error_message(trial))
    return views


def study_tables(study_dir: str | Path, study: str, experiment_root: str | Path,
                 phases: tuple[str, ...], known: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                 write: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables of a study from the Ray experiments of ``phases`` under
    ``experiment_root`` and the study's records, combined with ``known`` tables;
    written into the study folder unless ``write`` is False."""
    views = {phase: record_views(load_records(study_dir, phase),
                                 experiment_views(experiment_path(experiment_root, phase)))
             for phase in phases}
    trials, history = build_tables(study, views, known)
    if write:
        write_tables(study_dir, trials, history)
    return trials, history
