"""Turn Ray experiment folders into kdtune's tidy tables.

``trials``: one row per trial (config, size, final/best validation accuracy,
status, node, seed, KD gain over the same width's baseline). ``history``: one row
per trial per epoch. Both are written as Parquet (``trials.parquet``,
``history.parquet``) in the study folder, readable by ``pandas.read_parquet``
without kdtune. Column meanings are documented in the README.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from kdtune.atomic import atomic_path

CONFIG_COLUMNS = ["temperature", "alpha", "beta", "noise", "width", "lr", "weight_decay", "batch_size", "soft_loss", "epochs", "seed"]
TRIAL_COLUMNS = (
    ["study", "trial_id", "phase", "status"]
    + CONFIG_COLUMNS
    + ["params", "bytes", "val_acc", "best_val_acc", "val_loss", "epochs_run", "wall_time_s", "node_id", "error",
       "baseline_val_acc", "kd_gain"]
)
#: Ray experiment folder of each phase, under the study folder or --storage.
EXPERIMENT_FOLDERS = {"search": "search", "baseline": "baselines"}
HISTORY_COLUMNS = [
    "study", "trial_id", "phase", "epoch", "val_acc", "val_loss", "train_loss", "params", "bytes",
    "epoch_time_s", "samples_per_s", "width", "temperature", "status", "node_id", "seed",
]


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's effective config: baseline trials carry their per-width values in ``overrides``."""
    return {**config, **(config.get("overrides") or {})}


def _trial_status(ray_status: str, last: dict[str, Any], budget: int | None, has_error: bool) -> str:
    if has_error or ray_status == "ERROR":
        return "error"
    if last.get("status") == "diverged":
        return "diverged"
    if last and budget is not None and int(last.get("epoch", 0)) >= int(budget):
        return "completed"
    if ray_status == "TERMINATED":
        return "stopped_early"
    return "running"


def error_message(trial: Any) -> str | None:
    """The exception line of a Ray trial's error file, e.g. "RuntimeError: ..."."""
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return None
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    # The last line of Ray's error file is the exception itself, e.g. "RuntimeError: ...".
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def epoch_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch from a trial's reports, in report order.

    A report carries the epochs held back since the previous one in
    ``unreported_epochs`` (JSON). A run restarted from scratch or from an earlier
    checkpoint reports epochs again: each report replaces every row from its
    first epoch on, so the rows are those of the latest run.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for result in results:
        if _is_missing(result.get("epoch")):
            continue
        held_text = result.get("unreported_epochs")
        held = json.loads(held_text) if isinstance(held_text, str) and held_text else []
        shared = {k: result.get(k) for k in ("node_id", "seed")}
        rows = [{**shared, **row} for row in held] + [result]
        first = min(int(row["epoch"]) for row in rows)
        for epoch in [e for e in by_epoch if e >= first]:
            del by_epoch[epoch]
        for row in rows:
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _trial_rows(study: str, phase: str, trial_id: str, config: dict[str, Any], ray_status: str,
                results: list[dict[str, Any]], error: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = trial_config(config)
    ordered = epoch_rows(results)
    last = ordered[-1] if ordered else {}
    status = _trial_status(ray_status, last, config.get("epochs"), error is not None and ray_status == "ERROR")
    accs = [r.get("val_acc") for r in ordered if not _is_missing(r.get("val_acc"))]
    row = {
        "study": study,
        "trial_id": trial_id,
        "phase": phase,
        "status": status,
        **{c: config.get(c) for c in CONFIG_COLUMNS},
        "params": last.get("params"),
        "bytes": last.get("bytes"),
        "val_acc": last.get("val_acc"),
        "best_val_acc": max(accs) if accs else None,
        "val_loss": last.get("val_loss"),
        "epochs_run": int(last.get("epoch", 0)) if last else 0,
        "wall_time_s": float(sum(r.get("time_this_iter_s", 0.0) or 0.0 for r in ordered)),
        "node_id": last.get("node_id"),
        "error": error if status == "error" else None,
    }
    history = [{
        "study": study, "trial_id": trial_id, "phase": phase,
        "epoch": int(record["epoch"]),
        **{k: record.get(k) for k in ("val_acc", "val_loss", "train_loss", "params", "bytes",
                                       "epoch_time_s", "samples_per_s", "status", "node_id", "seed")},
        "width": config.get("width"), "temperature": config.get("temperature"),
    } for record in ordered]
    return row, history


def experiment_tables(experiment_dir: str | Path | None, study: str, phase: str,
                      records: dict[str, dict[str, Any]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and history rows of one phase: its Ray experiment folder (``search`` or
    ``baselines``) and its trial records (see :mod:`kdtune.records`).

    A trial's record, written when it ended, is authoritative; Ray's folder adds
    the trials that had not ended (an interrupted search) and the reports a
    trial made before a restart. ``experiment_dir`` may be None (no Ray state was
    saved). Reads Ray's experiment state with ``ExperimentAnalysis``, which
    unpickles it: only use it on folders you created.
    """
    records = records or {}
    views: dict[str, tuple[dict[str, Any], str, list[dict[str, Any]], str | None]] = {}
    if experiment_dir is not None:
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(experiment_dir))
        frames = analysis.trial_dataframes
        for trial in analysis.trials:
            df = frames.get(trial.trial_id, pd.DataFrame())
            results = df.to_dict("records") if len(df) else []
            views[trial.trial_id] = (trial.config or {}, str(trial.status), results, error_message(trial))
    for trial_id, record in records.items():
        earlier = views.get(trial_id, ({}, "", [], None))[2]
        views[trial_id] = (record.get("config") or {}, str(record.get("ray_status")),
                           earlier + list(record.get("results") or []), record.get("error"))
    trial_rows, history_rows = [], []
    for trial_id, (config, ray_status, results, error) in views.items():
        row, history = _trial_rows(study, phase, trial_id, config, ray_status, results, error)
        trial_rows.append(row)
        history_rows.extend(history)
    return pd.DataFrame(trial_rows), pd.DataFrame(history_rows)


def add_kd_gain(trials: pd.DataFrame) -> pd.DataFrame:
    """Add ``baseline_val_acc`` (the completed baseline of the same width) and ``kd_gain``."""
    trials = trials.copy()
    baselines = trials[(trials["phase"] == "baseline") & (trials["status"] == "completed")]
    by_width = baselines.groupby("width")["val_acc"].mean() if len(baselines) else pd.Series(dtype=float)
    trials["baseline_val_acc"] = trials["width"].map(by_width).astype(float)
    trials["kd_gain"] = trials["val_acc"].astype(float) - trials["baseline_val_acc"]
    return trials


def build_tables(
    experiment_root: str | Path, study: str, phases: tuple[str, ...] = ("search", "baseline"),
    known: tuple[pd.DataFrame, pd.DataFrame] | None = None, study_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables of a study, from the ``search`` and ``baselines`` experiments under
    ``experiment_root`` (the study folder, or the ``--storage`` location: a path or URI)
    and the trial records in ``study_dir`` (by default ``experiment_root``).

    Only the experiments of ``phases`` are read; ``known`` (tables built earlier,
    e.g. of the finished search) is combined with them, so a finished phase is
    not parsed again.
    """
    from kdtune.records import load_records

    trial_frames, history_frames = [], []
    if known is not None:
        trial_frames.append(known[0])
        history_frames.append(known[1])
    for phase in phases:
        records = load_records(study_dir or experiment_root, phase)
        location: str | None = f"{str(experiment_root).rstrip('/')}/{EXPERIMENT_FOLDERS[phase]}"
        if "://" not in location and not any(Path(location).glob("experiment_state-*.json")):
            location = None
        try:
            trials, history = experiment_tables(location, study, phase, records)
        except (ValueError, FileNotFoundError):
            # Ray's folder is unreadable (a driver killed while writing it): the records remain.
            trials, history = experiment_tables(None, study, phase, records)
        if not len(trials):
            continue
        trial_frames.append(trials)
        history_frames.append(history)
    trials = pd.concat(trial_frames, ignore_index=True) if trial_frames else pd.DataFrame(columns=TRIAL_COLUMNS)
    history = pd.concat(history_frames, ignore_index=True) if history_frames else pd.DataFrame(columns=HISTORY_COLUMNS)
    if len(trials):
        trials = add_kd_gain(trials)
    return trials.reindex(columns=TRIAL_COLUMNS), history.reindex(columns=HISTORY_COLUMNS)


def write_frame_atomic(df: pd.DataFrame, path: str | Path, fmt: str = "parquet") -> None:
    """Write ``df`` as Parquet or CSV atomically (see :func:`kdtune.atomic.atomic_path`)."""
    with atomic_path(path) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def write_tables(
    study_dir: str | Path, study: str, experiment_root: str | None = None,
    phases: tuple[str, ...] = ("search", "baseline"), known: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build both tables (see :func:`build_tables`) and write ``trials.parquet`` and
    ``history.parquet`` into ``study_dir``."""
    trials, history = build_tables(experiment_root or study_dir, study, phases, known, study_dir=study_dir)
    write_frame_atomic(trials, Path(study_dir) / "trials.parquet")
    write_frame_atomic(history, Path(study_dir) / "history.parquet")
    return trials, history
