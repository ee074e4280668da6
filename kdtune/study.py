"""Durable per-trial records: what makes a killed search lose nothing.

Ray saves its experiment state (trial statuses, the searcher, the trials' result
logs) in the background, every few seconds at best: a driver killed in between
leaves a folder up to one period behind. Saving it on every step closes that
window but costs the driver milliseconds per step, more as trials accumulate.

So kdtune keeps its own record instead. When a trial ends (completed, stopped
early, diverged or errored), the driver writes one small JSON file,
``<study>/records/<phase>/<trial_id>.json``, holding the trial's config, every
result it reported and its error. A record is written once, atomically, after
Ray told the searcher (and so the Optuna journal) the outcome. On ``--resume``:

* the tables take every recorded trial from its record, whether or not Ray's
  restored state knows it;
* a recorded trial that Ray restores as unfinished ends at once without
  training (see :mod:`kdtune.trainable`), and the searcher, which told Optuna
  its outcome before the record was written, does not tell it again: no
  finished trial runs twice;
* the searcher counts recorded trials Ray has forgotten, so the search still ends
  with exactly ``num_samples`` trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdtune.atomic import write_text_atomic

RECORDS_DIR = "records"
PHASES = ("search", "baseline")


def records_dir(study_dir: str | Path, phase: str) -> Path:
    """Where the records of one phase ("search" or "baseline") of a study live."""
    return Path(study_dir) / RECORDS_DIR / phase


def record_path(folder: str | Path, trial_id: str) -> Path:
    """The record file of one trial in one phase's records folder."""
    return Path(folder) / f"{trial_id}.json"


def json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot hold dropped (objects) or made null (NaN, inf)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items() if _storable(v)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value if _storable(v)]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def _storable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, dict, list, tuple)) or (
        hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0)


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    """Write one trial's record atomically and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, record["trial_id"])
    write_text_atomic(path, json.dumps(json_safe(record)))
    return path


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "trial_id" in record else None


def load_records(study_dir: str | Path, phase: str) -> dict[str, dict[str, Any]]:
    """Every record of one phase, by Ray trial id (unreadable files are skipped: a
    record is renamed into place whole, so only foreign files can be partial)."""
    records = {}
    for path in sorted(records_dir(study_dir, phase).glob("*.json")):
        record = _read(path)
        if record is not None:
            records[str(record["trial_id"])] = record
    return records


def load_record(study_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The record of one trial, search or baseline; None if it has none."""
    for phase in PHASES:
        path = record_path(records_dir(study_dir, phase), trial_id)
        if path.is_file():
            return _read(path)
    return None


def recorded_ids(folder: str | Path) -> set[str]:
    """The trial ids with a record in one phase's records folder."""
    return {path.stem for path in Path(folder).glob("*.json")}


def recording_callback(study_dir: str | Path, phase: str):
    """A Ray Tune callback that writes each trial's record when the trial ends."""
    from ray.tune import Callback

    from kdtune.tables import error_message

    folder = records_dir(study_dir, phase)

    class TrialRecorder(Callback):
        """Keeps each trial's reported results and writes its record when it ends."""

        def __init__(self) -> None:
            self.results: dict[str, list[dict[str, Any]]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # Ray repeats the trial's config in every result: the record keeps it once.
            report = {k: v for k, v in result.items() if k != "config"}
            self.results.setdefault(trial.trial_id, []).append(json_safe(report))

        def _write(self, trial, ray_status: str, error: str | None) -> None:
            if record_path(folder, trial.trial_id).exists():
                # A trial that had ended before a restart: keep its original record.
                self.results.pop(trial.trial_id, None)
                return
            write_record(folder, {
                "trial_id": trial.trial_id,
                "phase": phase,
                "ray_status": ray_status,
                "config": json_safe(dict(trial.config or {})),
                "results": self.results.pop(trial.trial_id, []),
                "error": error,
            })

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, "TERMINATED", None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trial, "ERROR", error_message(trial) or "the trial raised an error")

    return TrialRecorder()
