"""kdtune's tidy tables, built from a study's trial records (and, during a search,
from the trials Ray still runs).

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
from kdtune.core.objectives import hyperparameter_table, owner_of
from kdtune.errors import KdtuneError, ResultsError
from kdtune.study import (
    HISTORY_TABLE,
    PHASES,
    TRIALS_TABLE,
    load_records,
    read_meta,
    trial_config,
    trial_run_config,
    trial_status,
)

#: Columns of ``trials.parquet`` before and after the hyperparameters.
_TRIAL_HEAD = ["study", "trial_id", "phase", "status"]
_TRIAL_TAIL = ["teacher_targets", "params", "bytes", "macs", "val_acc", "best_val_acc", "val_loss", "epochs_run", "wall_time_s", "node_id",
               "error", "baseline_val_acc", "kd_gain"]
HISTORY_COLUMNS = [
    "study", "trial_id", "phase", "epoch", "val_acc", "val_loss", "train_loss", "params", "bytes",
    "epoch_time_s", "samples_per_s", "lr", "width", "temperature", "status", "node_id", "seed",
]


def applicable(name: str, config: dict[str, Any]) -> bool:
    """Whether hyperparameter ``name`` acts in a trial of ``config``: a core one always, one
    declared by an objective only when the trial uses that objective (``soft_loss``)."""
    owner = owner_of(name)
    return owner is None or config.get("soft_loss") == owner


def config_columns() -> list[str]:
    """The configuration columns: every hyperparameter of the table (registered losses'
    included), in its order, then the seed."""
    return [*hyperparameter_table(), "seed"]


def trial_columns() -> list[str]:
    """The columns of ``trials.parquet``, in order."""
    return [*_TRIAL_HEAD, *config_columns(), *_TRIAL_TAIL]


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


def targets_used(config: dict[str, Any]) -> str:
    """Where a trial's teacher targets came from (the ``teacher_targets`` column):
    logits, views or online, or "none" for a run without a teacher (a baseline)."""
    try:
        run = trial_run_config(config)
    except KdtuneError:  # a study of another version: its settings may differ
        return str(config.get("teacher_targets") or "logits")
    return run.teacher_targets if run.needs_teacher else "none"


def _trial_rows(study: str, phase: str, trial_id: str, config: dict[str, Any], ray_status: str,
                results: list[dict[str, Any]], error: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = trial_config(config)
    ordered = epoch_rows(results)
    last = ordered[-1] if ordered else {}
    status = trial_status(last, config.get("epochs"), ended=ray_status == "TERMINATED", error=ray_status == "ERROR")
    accs = [r.get("val_acc") for r in ordered if not _is_missing(r.get("val_acc"))]
    row = {
        "study": study,
        "trial_id": trial_id,
        "phase": phase,
        "status": status,
        # A hyperparameter the trial's config does not hold, or one of an objective the
        # trial does not use, is missing, not given a made-up value.
        **{c: config.get(c) if applicable(c, config) else None for c in config_columns()},
        "teacher_targets": targets_used(config),
        "params": last.get("params"),
        "bytes": last.get("bytes"),
        "macs": last.get("macs"),
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
                                       "epoch_time_s", "samples_per_s", "lr", "status", "node_id", "seed")},
        "width": config.get("width"), "temperature": config.get("temperature"),
    } for record in ordered]
    return row, history


#: What the tables are built from, per trial: (config, Ray status, reported results, error).
TrialView = tuple[dict[str, Any], str, list[dict[str, Any]], "str | None"]


def record_views(records: dict[str, dict[str, Any]],
                 earlier: dict[str, TrialView] | None = None) -> dict[str, TrialView]:
    """Trial views from a phase's records (see :mod:`kdtune.study`), over ``earlier``
    views (e.g. of Ray's experiment folder, which adds the trials that had not ended
    and the reports a trial made before a restart). A record is authoritative."""
    views = dict(earlier or {})
    for trial_id, record in records.items():
        before = views.get(trial_id, ({}, "", [], None))[2]
        views[trial_id] = (record.get("config") or {}, str(record.get("ray_status")),
                           before + list(record.get("results") or []), record.get("error"))
    return views


def phase_tables(study: str, phase: str, views: dict[str, TrialView]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and history rows of one phase from its trial views."""
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


def build_tables(study: str, views: dict[str, dict[str, TrialView]],
                 known: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables of a study from its trial views by phase (``{"search": {...}, "baseline": {...}}``),
    combined with ``known`` tables built earlier (a finished phase is not parsed again)."""
    trial_frames, history_frames = [], []
    if known is not None:
        trial_frames.append(known[0])
        history_frames.append(known[1])
    for phase, phase_views in views.items():
        trials, history = phase_tables(study, phase, phase_views)
        if len(trials):
            trial_frames.append(trials)
            history_frames.append(history)
    columns = trial_columns()
    trials = pd.concat(trial_frames, ignore_index=True) if trial_frames else pd.DataFrame(columns=columns)
    history = pd.concat(history_frames, ignore_index=True) if history_frames else pd.DataFrame(columns=HISTORY_COLUMNS)
    if len(trials):
        trials = add_kd_gain(trials)
    return trials.reindex(columns=columns), history.reindex(columns=HISTORY_COLUMNS)


def tables_from_records(study_dir: str | Path, study: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables from the study's trial records alone (no Ray): what a search that
    was killed before it wrote its tables leaves readable."""
    return build_tables(study, {phase: record_views(load_records(study_dir, phase)) for phase in PHASES})


def write_frame_atomic(df: pd.DataFrame, path: str | Path, fmt: str = "parquet") -> None:
    """Write ``df`` as Parquet or CSV atomically (see :func:`kdtune.atomic.atomic_path`)."""
    with atomic_path(path) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


#: Columns of the study's CSV tables that hold identifiers or labels: read back as text.
TEXT_COLUMNS = ("trial_id", "best_trial", "recommended")


def read_csv_table(path: str | Path) -> pd.DataFrame:
    """A CSV table of the study (``final.csv``, ``race/best_t.csv``, ...), its :data:`TEXT_COLUMNS`
    kept as text: a trial id such as ``1234e567`` would otherwise be read as the float ``inf``."""
    return pd.read_csv(path, dtype={name: str for name in TEXT_COLUMNS})


def write_tables(study_dir: str | Path, trials: pd.DataFrame, history: pd.DataFrame) -> None:
    """Write ``trials.parquet`` and ``history.parquet`` into ``study_dir`` (atomically each)."""
    write_frame_atomic(trials, Path(study_dir) / TRIALS_TABLE)
    write_frame_atomic(history, Path(study_dir) / HISTORY_TABLE)


def load_tables(study_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A study's two tables: its Parquet files, or, when the search never wrote them,
    rebuilt from its records (nothing is written)."""
    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    trials_path, history_path = study_dir / TRIALS_TABLE, study_dir / HISTORY_TABLE
    if trials_path.is_file() and history_path.is_file():
        return pd.read_parquet(trials_path), pd.read_parquet(history_path)
    trials, history = tables_from_records(study_dir, meta["study"])
    if not len(trials):
        present = ", ".join(sorted(p.name for p in study_dir.iterdir())) or "nothing"
        raise ResultsError(
            f"{study_dir}: study '{meta['study']}' has no {TRIALS_TABLE} and no trial records yet; "
            f"it holds: {present}. The search stopped before any trial ended: resume it with kdtune search SPEC --resume"
        )
    return trials, history
