"""Turn Ray experiment folders into kdtune's tidy tables.

``trials``: one row per trial (config, size, final/best validation accuracy,
status, node, seed, KD gain over the same width's baseline). ``history``: one row
per trial per epoch. Both are written as Parquet (``trials.parquet``,
``history.parquet``) in the study folder, readable by ``pandas.read_parquet``
without kdtune. Column meanings are documented in the README.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

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


def _error_message(trial: Any) -> str | None:
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return None
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    # The last line of Ray's error file is the exception itself, e.g. "RuntimeError: ...".
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else None


def experiment_tables(experiment_dir: str | Path, study: str, phase: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and history rows of one Ray experiment folder (``search`` or ``baselines``).

    Reads Ray's experiment state with ``ExperimentAnalysis``, which unpickles it:
    only use it on folders you created.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    frames = analysis.trial_dataframes
    trial_rows, history_rows = [], []
    for trial in analysis.trials:
        config = trial_config(trial.config or {})
        df = frames.get(trial.trial_id, pd.DataFrame())
        records = df.to_dict("records") if len(df) else []
        # A trial restored from a checkpoint re-reports nothing twice, but a retried
        # trial restarted from scratch reports epoch 1 again: keep the latest run.
        by_epoch: dict[int, dict[str, Any]] = {}
        for record in records:
            if "epoch" in record and not (isinstance(record["epoch"], float) and math.isnan(record["epoch"])):
                by_epoch[int(record["epoch"])] = record
        ordered = [by_epoch[e] for e in sorted(by_epoch)]
        last = ordered[-1] if ordered else {}
        error = _error_message(trial)
        budget = config.get("epochs")
        status = _trial_status(str(trial.status), last, budget, error is not None and str(trial.status) == "ERROR")
        accs = [r.get("val_acc") for r in ordered if r.get("val_acc") is not None]
        row = {
            "study": study,
            "trial_id": trial.trial_id,
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
        trial_rows.append(row)
        for record in ordered:
            history_rows.append({
                "study": study, "trial_id": trial.trial_id, "phase": phase,
                "epoch": int(record["epoch"]),
                **{k: record.get(k) for k in ("val_acc", "val_loss", "train_loss", "params", "bytes",
                                               "epoch_time_s", "samples_per_s", "status", "node_id", "seed")},
                "width": config.get("width"), "temperature": config.get("temperature"),
            })
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
    known: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables of a study, from the ``search`` and ``baselines`` experiments under
    ``experiment_root`` (the study folder, or the ``--storage`` location: a path or URI).

    Only the experiments of ``phases`` are read; ``known`` (tables built earlier,
    e.g. of the finished search) is combined with them, so a finished phase is
    not parsed again.
    """
    trial_frames, history_frames = [], []
    if known is not None:
        trial_frames.append(known[0])
        history_frames.append(known[1])
    for phase in phases:
        location = f"{str(experiment_root).rstrip('/')}/{EXPERIMENT_FOLDERS[phase]}"
        if "://" not in location and not any(Path(location).glob("experiment_state-*.json")):
            continue
        try:
            trials, history = experiment_tables(location, study, phase)
        except (ValueError, FileNotFoundError):
            continue
        trial_frames.append(trials)
        history_frames.append(history)
    trials = pd.concat(trial_frames, ignore_index=True) if trial_frames else pd.DataFrame(columns=TRIAL_COLUMNS)
    history = pd.concat(history_frames, ignore_index=True) if history_frames else pd.DataFrame(columns=HISTORY_COLUMNS)
    if len(trials):
        trials = add_kd_gain(trials)
    return trials.reindex(columns=TRIAL_COLUMNS), history.reindex(columns=HISTORY_COLUMNS)


def write_frame_atomic(df: pd.DataFrame, path: str | Path, fmt: str = "parquet") -> None:
    """Write ``df`` as Parquet or CSV via a temporary file in the same folder and a
    rename, so readers never see half a file and a crash leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(
    study_dir: str | Path, study: str, experiment_root: str | None = None,
    phases: tuple[str, ...] = ("search", "baseline"), known: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build both tables (see :func:`build_tables`) and write ``trials.parquet`` and
    ``history.parquet`` into ``study_dir``."""
    trials, history = build_tables(experiment_root or study_dir, study, phases, known)
    write_frame_atomic(trials, Path(study_dir) / "trials.parquet")
    write_frame_atomic(history, Path(study_dir) / "history.parquet")
    return trials, history
