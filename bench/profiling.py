"""Where a Ray Tune driver spends its time: timers wrapped around Ray's and kdtune's methods.

:class:`DriverProfile` is a context manager for the benchmark process only: it
wraps a fixed list of methods (experiment-state writes, result processing,
scheduler, searcher, logger callbacks, trial start/stop, waiting for workers)
with wall-clock timers, records when each trial started, reported and finished,
and restores every method on exit. Nothing in kdtune is changed; the wrappers
cost a few microseconds per call.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

#: (module, class, method, label). Labels starting with two spaces are part of
#: the label above them (their time is included there too).
PROBES: list[tuple[str, str | None, str, str]] = [
    ("kdtune.search", None, "load_spec_data", "search(): load the data"),
    ("kdtune.search", None, "prepare_teachers", "search(): teacher cache check"),
    ("ray.tune.tuner", "Tuner", "fit", "search(): Tuner.fit"),
    ("ray.tune.execution.tune_controller", "TuneController", "step", "  driver loop (TuneController.step)"),
    ("ray", None, "wait", "    waiting for workers (ray.wait)"),
    ("ray.tune.execution.tune_controller", "TuneController", "save_to_dir", "    experiment-state write (save_to_dir)"),
    ("ray.tune.search.search_generator", "SearchGenerator", "save_to_dir", "      of which: searcher pickle"),
    ("ray.tune.callback", "CallbackList", "save_to_dir", "      of which: callback state pickle"),
    ("ray.tune.execution.tune_controller", "TuneController", "_on_training_result", "    result processing (per report)"),
    ("kdtune.scheduler", "ParetoASHA", "on_trial_result", "      of which: Pareto ASHA decision"),
    ("kdtune.scheduler", "SizeAwareASHA", "on_trial_result", "      of which: size-aware ASHA decision"),
    ("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler", "on_trial_result", "      of which: stock ASHA decision"),
    ("ray.tune.callback", "CallbackList", "on_trial_result", "      of which: callbacks (JSON/CSV loggers, progress line)"),
    ("ray.tune.search.search_generator", "SearchGenerator", "next_trial", "    sampler suggest + trial creation"),
    ("kdtune.searcher", "KdOptunaSearch", "suggest", "      of which: Optuna ask"),
    ("ray.tune.search.search_generator", "SearchGenerator", "on_trial_complete", "    Optuna tell (journal write)"),
    ("ray.tune.execution.tune_controller", "TuneController", "_schedule_trial_actor", "    trial start: schedule actor"),
    ("ray.tune.execution.tune_controller", "TuneController", "_schedule_trial_reset", "    trial start: reuse actor (reset)"),
    ("ray.tune.execution.tune_controller", "TuneController", "_schedule_trial_stop", "    trial stop"),
    ("ray.tune.callback", "CallbackList", "on_trial_complete", "    callbacks on trial complete"),
    ("kdtune.tables", None, "write_tables", "search(): write trials/history tables"),
    ("kdtune.searcher", None, "reconcile_journal", "search(): reconcile the Optuna journal"),
]


def _resolve(module_name: str, class_name: str | None) -> Any:
    module = importlib.import_module(module_name)
    return getattr(module, class_name) if class_name else module


@dataclass
class Stat:
    calls: int = 0
    total_s: float = 0.0


@dataclass
class TrialEvents:
    """Driver-side timestamps (time.perf_counter) of one trial."""

    start: float | None = None
    complete: float | None = None


class DriverProfile:
    """Context manager timing the Tune driver's work (see the module docstring)."""

    def __init__(self) -> None:
        self.stats: dict[str, Stat] = defaultdict(Stat)
        self.trials: dict[str, TrialEvents] = defaultdict(TrialEvents)
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth: dict[str, int] = defaultdict(int)
        self.started = self.stopped = 0.0

    def _wrap(self, owner: Any, method: str, label: str) -> None:
        original = owner.__dict__.get(method) if isinstance(owner, type) else getattr(owner, method)
        if original is None:  # inherited, not defined on this class: nothing of its own to time
            return
        stats, depth = self.stats, self._depth

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            # Count only the outermost call of a label (subclasses calling super()).
            depth[label] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                depth[label] -= 1
                if depth[label] == 0:
                    stat = stats[label]
                    stat.calls += 1
                    stat.total_s += time.perf_counter() - started

        self._saved.append((owner, method, original))
        setattr(owner, method, timed)

    def _wrap_events(self) -> None:
        from ray.tune.callback import CallbackList

        trials = self.trials
        for method, kind in (("on_trial_start", "start"), ("on_trial_complete", "complete"),
                             ("on_trial_error", "complete")):
            original = CallbackList.__dict__[method]

            def recorder(self_, *args: Any, _original=original, _kind=kind, **info: Any) -> Any:
                trial = info.get("trial")
                if trial is not None:
                    now, events = time.perf_counter(), trials[trial.trial_id]
                    if _kind == "start":
                        events.start = events.start or now
                    else:
                        events.complete = now
                return _original(self_, *args, **info)

            self._saved.append((CallbackList, method, original))
            setattr(CallbackList, method, functools.wraps(original)(recorder))

    def __enter__(self) -> "DriverProfile":
        self._wrap_events()
        for module_name, class_name, method, label in PROBES:
            try:
                owner = _resolve(module_name, class_name)
            except (ImportError, AttributeError):
                continue
            self._wrap(owner, method, label)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped = time.perf_counter()
        for owner, method, original in reversed(self._saved):
            setattr(owner, method, original)
        self._saved.clear()

    # ------------------------------------------------------------------ summaries

    def active_window(self) -> tuple[float, float]:
        """(first trial start, last trial completion), perf_counter seconds."""
        starts = [e.start for e in self.trials.values() if e.start is not None]
        ends = [e.complete for e in self.trials.values() if e.complete is not None]
        if not starts or not ends:
            return (self.started, self.stopped)
        return (min(starts), max(ends))

    def rows(self, wall_s: float, trials: int) -> list[list[Any]]:
        """Table rows: label, calls, total s, ms per call, share of wall, s per trial."""
        rows = []
        for _, _, _, label in PROBES:
            stat = self.stats.get(label)
            if stat is None or stat.calls == 0:
                continue
            rows.append([label.replace(" ", "\u00a0", len(label) - len(label.lstrip())), stat.calls, stat.total_s,
                         1000 * stat.total_s / stat.calls, stat.total_s / wall_s if wall_s else float("nan"),
                         stat.total_s / trials if trials else float("nan")])
        return rows

    def total(self, label_prefix: str) -> float:
        """Total seconds of the first probe whose label (stripped) starts with ``label_prefix``."""
        for label, stat in self.stats.items():
            if label.strip().startswith(label_prefix):
                return stat.total_s
        return 0.0

    def calls(self, label_prefix: str) -> int:
        for label, stat in self.stats.items():
            if label.strip().startswith(label_prefix):
                return stat.calls
        return 0
