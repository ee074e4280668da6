"""Ray Tune callbacks of a search: each ended trial's record, and the progress line."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdtune.study import (
    COMPLETED,
    ERROR,
    FINISHED,
    json_safe,
    record_path,
    records_dir,
    trial_config,
    trial_status,
    write_record,
)
from kdtune.tables import error_message

Log = Callable[[str], None]


#: The recorder of each records folder in this driver, so the searcher can have a
#: trial's record written before it tells Optuna (see :func:`record_ended_trial`).
#: Ray pickles the searcher and the callbacks apart, so a reference between them
#: would not survive a restore; the folder does.
_RECORDERS: dict[str, TrialRecorder] = {}


class TrialRecorder(Callback):
    """Keeps each trial's reported results and writes its record when it ends
    (see :mod:`kdtune.study`)."""

    def __init__(self, study_dir: str | Path, phase: str) -> None:
        self.folder = records_dir(study_dir, phase)
        self.phase = phase
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.trials: dict[str, Any] = {}
        _RECORDERS[str(self.folder)] = self

    def __getstate__(self) -> dict[str, Any]:
        # Ray keeps the callbacks in its tuner state: live trials are not part of it.
        return {**self.__dict__, "trials": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"trials": {}, **state})
        _RECORDERS[str(self.folder)] = self

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials[trial.trial_id] = trial

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials[trial.trial_id] = trial
        # Ray repeats the trial's config in every result: the record keeps it once.
        report = {k: v for k, v in result.items() if k != "config"}
        self.results.setdefault(trial.trial_id, []).append(json_safe(report))

    def _write(self, trial, ray_status: str, error: str | None) -> None:
        self.trials.pop(trial.trial_id, None)
        if record_path(self.folder, trial.trial_id).exists():
            # Written already: by the searcher's call just before (see
            # record_ended_trial), or before a restart (keep the original record).
            self.results.pop(trial.trial_id, None)
            return
        write_record(self.folder, {
            "trial_id": trial.trial_id,
            "phase": self.phase,
            "ray_status": ray_status,
            "config": json_safe(dict(trial.config or {})),
            "results": self.results.pop(trial.trial_id, []),
            "error": error,
        })

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "TERMINATED", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "ERROR", error_message(trial) or "the trial raised an error")

    def write_ended(self, trial_id: str, error: bool) -> bool:
        """Write the record of a trial Ray is ending now, ahead of the callback;
        False when this recorder has not seen the trial run."""
        trial = self.trials.get(trial_id)
        if trial is None:
            return False
        if error:
            self.on_trial_error(0, [], trial)
        else:
            self.on_trial_complete(0, [], trial)
        return True


def record_ended_trial(folder: str | Path, trial_id: str, error: bool) -> bool:
    """Have the record of a trial that is ending written now, by this driver's
    recorder of ``folder``.

    Ray tells the searcher a trial's outcome before its callbacks. The searcher
    calls this first, so a record always exists before Optuna's journal holds the
    outcome: a driver killed in between leaves a record and a RUNNING journal
    trial, which :func:`kdtune.search.sampler.reconcile_journal` completes from the
    record. The other order would leave an outcome in the journal for a trial
    whose record, and whose place in Ray's state, could both be lost.
    """
    recorder = _RECORDERS.get(str(folder))
    return recorder is not None and recorder.write_ended(trial_id, error)


def recording_callback(study_dir: str | Path, phase: str) -> TrialRecorder:
    """A Ray Tune callback that writes each trial's record when the trial ends."""
    return TrialRecorder(study_dir, phase)


class ProgressLine(Callback):
    """One line per finished trial (and every ``interval_s`` while busy), counting
    trials by the status the tables will give them."""

    def __init__(self, total: int, log: Log, interval_s: float = 15.0) -> None:
        self.total, self.log, self.interval_s = total, log, interval_s
        self.counts = {status: 0 for status in FINISHED}
        self.best: dict[Any, float] = {}
        self.running: set[str] = set()
        self.last_print = 0.0

    def _line(self) -> str:
        done = sum(self.counts.values())
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if v)
        best = " ".join(f"{k:g}:{v:.3f}" if isinstance(k, (int, float)) else f"{k}:{v:.3f}"
                        for k, v in sorted(self.best.items()))
        return (f"[{done}/{self.total} done{': ' + counts if counts else ''}; {len(self.running)} running] "
                f"best val_acc by width {best or '-'}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == COMPLETED:
            width = trial_config(trial.config).get("width")
            self.best[width] = max(self.best.get(width, 0.0), float(result.get("val_acc", 0.0)))

    def _finish(self, trial, status: str) -> None:
        self.running.discard(trial.trial_id)
        self.counts[status] += 1
        self.log(self._line())
        self.last_print = time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        budget = trial_config(trial.config).get("epochs")
        self._finish(trial, trial_status(trial.last_result, budget, ended=True))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, ERROR)

    def on_step_end(self, iteration, trials, **info):
        if self.running and time.monotonic() - self.last_print > self.interval_s:
            self.last_print = time.monotonic()
            self.log(self._line())


def progress_callback(total: int, log: Log, interval_s: float = 15.0) -> ProgressLine:
    """The progress line of a phase of ``total`` trials."""
    return ProgressLine(total, log, interval_s)
