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


class TrialRecorder(Callback):
    """Keeps each trial's reported results and writes its record when it ends
    (see :mod:`kdtune.study`)."""

    def __init__(self, study_dir: str | Path, phase: str) -> None:
        self.folder = records_dir(study_dir, phase)
        self.phase = phase
        self.results: dict[str, list[dict[str, Any]]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Ray repeats the trial's config in every result: the record keeps it once.
        report = {k: v for k, v in result.items() if k != "config"}
        self.results.setdefault(trial.trial_id, []).append(json_safe(report))

    def _write(self, trial, ray_status: str, error: str | None) -> None:
        if record_path(self.folder, trial.trial_id).exists():
            # A trial that had ended before a restart: keep its original record.
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
