"""Benchmark 4: does bookkeeping scale to hundreds of trials?

One search of 500 tiny trials (``--quick``: 100) on the local default (Ray on
this machine, 1 CPU per trial): the default digits spec with 3 epochs of a
width-8 or width-16 student, multi-objective TPE and kdtune's default early
stopping, no baselines. Measured: wall time, trials finished per minute in consecutive
blocks (does the driver slow down as the study grows?), the driver's peak
memory (resident set size sampled every 0.2 s with psutil, and the process's
lifetime peak from ``resource.getrusage``), what the driver spent its time on,
the size of what the study folder holds, and how long ``load_results`` and
``pareto_front`` take on the finished study (medians of repeats).
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import Report, markdown_table, median, ratio
from profiling import DriverProfile

MEMORY_TARGET_BYTES = 2 * 2**30
ANALYSIS_TARGET_S = 2.0


class PeakRss:
    """Sample this process's resident set size in a background thread; keep the peak."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.start_rss = self.peak_rss = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)


def folder_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def throughput_blocks(profile: DriverProfile, block: int) -> list[list[Any]]:
    """Trials finished per minute in consecutive blocks of ``block`` completions."""
    ends = sorted(e.complete for e in profile.trials.values() if e.complete is not None)
    rows, previous = [], profile.started
    for start in range(0, len(ends), block):
        chunk = ends[start:start + block]
        span = chunk[-1] - previous
        rows.append([f"{start + 1}–{start + len(chunk)}", span, 60 * ratio(len(chunk), span)])
        previous = chunk[-1]
    return rows


def run(quick: bool = False) -> Report:
    """Run the bookkeeping benchmark and return its report."""
    from kdtune.analysis import hypervolume, load_history, load_results, pareto_front

    report = Report("bookkeeping", "Bookkeeping at scale: hundreds of trials", quick=quick)
    trials_n = 100 if quick else 500
    spec = common.digits_spec({
        "baselines": False, "num_samples": trials_n,
        "space": {"width": {"choice": [8, 16]}, "epochs": 3},
    })
    root = Path(tempfile.mkdtemp(prefix="kdtune-bench-bookkeeping-"))
    teachers = common.shared_teachers()
    teachers.seed(spec.model_copy(update={"study": "scale"}), root / "scale")  # train/copy before measuring memory

    lifetime_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakRss() as memory, DriverProfile() as profile:
        result, wall = common.timed_search(spec, root, "scale", teachers)
    lifetime_peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trials = result.trials[result.trials["phase"] == "search"]
    statuses = trials["status"].value_counts().to_dict()

    repeats = 5
    timings: dict[str, list[float]] = {"load_results": [], "load_history": [], "pareto_front": [], "hypervolume": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        table = load_results(result.study_dir)
        t1 = time.perf_counter()
        load_history(result.study_dir)
        t2 = time.perf_counter()
        front = pareto_front(table)
        t3 = time.perf_counter()
        hypervolume(table)
        t4 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[key].append(value)
    analysis_s = median(timings["load_results"]) + median(timings["pareto_front"])

    # The same functions when the Parquet tables are missing and must be rebuilt from Ray's files.
    for name in ("trials.parquet", "history.parquet"):
        (result.study_dir / name).rename(result.study_dir / f"{name}.bak")
    t0 = time.perf_counter()
    load_results(result.study_dir)
    rebuild_s = time.perf_counter() - t0

    growth = memory.peak_rss - memory.start_rss
    report.add(
        f"{trials_n} trials × up to 3 epochs (MLP width 8/16, multi-objective TPE, {spec.early_stopping.rule}), "
        f"{int(trials['epochs_run'].sum())} epochs run",
        markdown_table(["measure", "value"], [
            ["search wall time s", wall],
            ["trials finished", f"{len(trials)} ({', '.join(f'{v} {k}' for k, v in statuses.items())})"],
            ["seconds per trial (wall ÷ trials)", ratio(wall, len(trials))],
            ["driver RSS before the search MiB", memory.start_rss / 2**20],
            ["driver RSS peak during the search MiB (sampled every 0.2 s)", memory.peak_rss / 2**20],
            ["driver RSS growth during the search MiB", growth / 2**20],
            ["driver lifetime peak RSS MiB (getrusage, before → after)",
             f"{lifetime_peak_before / 2**20:,.0f} → {lifetime_peak_after / 2**20:,.0f}"],
            ["load_results s (median of 5)", median(timings["load_results"])],
            ["load_history s (median of 5)", median(timings["load_history"])],
            ["pareto_front s (median of 5)", median(timings["pareto_front"])],
            ["hypervolume s (median of 5)", median(timings["hypervolume"])],
            ["load_results with the Parquet tables missing (rebuilt from Ray's files) s", rebuild_s],
            ["front size", len(front)],
        ]),
    )
    report.add("Throughput as the study grows (trials finished per minute, per block of completions)",
               markdown_table(["trials", "block s", "trials/min"], throughput_blocks(profile, max(10, trials_n // 5))))
    files, size = folder_size(result.study_dir)
    sizes = [["whole study folder", files, size / 2**20]]
    for pattern in ("search/experiment_state-*.json", "search/searcher-state-*.pkl", "optuna.journal",
                    "records/search/*.json"):
        matches = list(result.study_dir.glob(pattern))
        if matches:
            sizes.append([pattern, len(matches), sum(p.stat().st_size for p in matches) / 2**20])
    report.add("What the study folder holds", markdown_table(["files", "count", "MiB"], sizes))
    report.add("Driver profile",
               markdown_table(["where", "calls", "total s", "ms/call", "share of wall", "s per trial"],
                              profile.rows(wall, len(trials))))

    # The same search with the experiment state written on every driver step (kdtune's earlier default),
    # for its first `compare_n` trials: what the write on every step would cost at this scale.
    compare_n = 100
    compare_spec = spec.model_copy(update={"num_samples": compare_n})
    with common.EnvVar("TUNE_GLOBAL_CHECKPOINT_S", "0"), DriverProfile() as step_profile:
        common.timed_search(compare_spec, root, "scale-every-step", teachers)
    ends = sorted(e.complete for e in profile.trials.values() if e.complete is not None)
    step_ends = sorted(e.complete for e in step_profile.trials.values() if e.complete is not None)
    default_k = ends[min(compare_n, len(ends)) - 1] - profile.started
    step_k = step_ends[-1] - step_profile.started
    report.add(
        f"Experiment-state period: Ray's default (auto, kdtune's default) vs every driver step (0), first {compare_n} trials",
        markdown_table(["TUNE_GLOBAL_CHECKPOINT_S", f"s to finish {compare_n} trials", "experiment-state writes",
                        "write s total", "ms per write"], [
            ["auto (kdtune default; the run above, up to its trial " + str(compare_n) + ")", default_k,
             "-", "-", "-"],
            ["0 (every driver step; kdtune's earlier default)", step_k, step_profile.calls("experiment-state write"),
             step_profile.total("experiment-state write"),
             1000 * ratio(step_profile.total("experiment-state write"), step_profile.calls("experiment-state write"))],
        ]) + f"\n\nSlow-down from writing on every step: {ratio(step_k, default_k):.2f}× on the first {compare_n} trials.",
    )

    report.target("a search of this size completes", f"{len(trials)} of {trials_n} trials finished",
                  len(trials) == trials_n)
    report.target("driver memory under 2 GB", f"peak RSS {memory.peak_rss / 2**30:.2f} GiB (grew {growth / 2**20:,.0f} MiB)",
                  memory.peak_rss < MEMORY_TARGET_BYTES)
    report.target(f"load_results + pareto_front under {ANALYSIS_TARGET_S:g} s",
                  f"{analysis_s:.3f} s", analysis_s < ANALYSIS_TARGET_S)
    return report
