"""The study folder and nothing else: its layout, metadata, lock, per-trial
records, Optuna journal location, trial folders, and the one function that says
how a trial ended. Everything that reads or writes a study goes through here.

A study folder (``results/<study>/`` by default)::

    spec.yaml          the spec as given (--resume reads it back)
    study.json         what the study is: name, teacher info, rungs, state
    .lock              held by the search that owns the folder
    optuna.journal     the live Optuna study (optuna.load_study can open it)
    teacher/           teacher cache (weights + logits as .npy, hash-checked)
    search/            Ray Tune experiment of the search (for --resume)
    baselines/         Ray Tune experiment of the alpha=1 baselines
    records/<phase>/   one JSON record per ended trial (see below)
    trials.parquet     one row per trial
    history.parquet    one row per trial per epoch
    summary.md, *.png  written by `kdtune report`
    final.csv          written by `kdtune evaluate`
    exports/           written by `kdtune export`
    race/, race_runs/  written by `kdtune best-t --race` (records in records/race/)

Durable per-trial records are what make a killed search lose nothing. Ray saves
its experiment state (trial statuses, the searcher, the trials' result logs) in
the background, every few seconds at best: a driver killed in between leaves a
folder up to one period behind. So kdtune keeps its own record: when a trial
ends (completed, stopped early, diverged or errored), the driver writes one
small JSON file, ``records/<phase>/<trial_id>.json``, holding the trial's config,
every result it reported and its error. A record is written once, atomically,
after Ray told the searcher (and so the Optuna journal) the outcome. On ``--resume``:

* the tables take every recorded trial from its record, whether or not Ray's
  restored state knows it;
* a recorded trial that Ray restores as unfinished ends at once without
  training (see :mod:`kdtune.search.trainable`), and the searcher, which told
  Optuna its outcome before the record was written, does not tell it again;
* the searcher counts recorded trials Ray has forgotten, so the search still
  ends with exactly ``num_samples`` trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kdtune.atomic import write_text_atomic
from kdtune.core.distill import RunConfig
from kdtune.errors import KdtuneError, ResultsError

SPEC_FILE = "spec.yaml"
META_FILE = "study.json"
LOCK_FILE = ".lock"
JOURNAL_FILE = "optuna.journal"
TEACHER_DIR = "teacher"
RECORDS_DIR = "records"
TRIALS_TABLE = "trials.parquet"
HISTORY_TABLE = "history.parquet"
SUMMARY_FILE = "summary.md"
FINAL_FILE = "final.csv"
FINAL_RUNS_FILE = "final_runs.csv"
EXPORTS_DIR = "exports"
FAULTS_DIR = "faults"
#: The phases of a study: the search's trials, then the no-distillation baselines.
PHASES = ("search", "baseline")
#: The phase of a race's runs (``kdtune best-t --race``; not part of the tables).
RACE_PHASE = "race"
#: Ray experiment folder of each phase, under the study folder or --storage.
EXPERIMENT_FOLDERS = {"search": "search", "baseline": "baselines", RACE_PHASE: "race_runs"}
#: What a race writes: its folder, one row per size, one row per size and contender.
RACE_DIR = "race"
RACE_TABLE = f"{RACE_DIR}/best_t.csv"
RACE_CONTENDERS_TABLE = f"{RACE_DIR}/contenders.csv"
RACE_PLOT = f"{RACE_DIR}/best_t.png"
RACE_FINAL_FILE = f"{RACE_DIR}/final.csv"
RACE_FINAL_RUNS_FILE = f"{RACE_DIR}/final_runs.csv"
#: ``kdtune evaluate --full-data``: the same configurations re-trained on the whole training split.
FULL_FINAL_FILE = "final_full.csv"
FULL_FINAL_RUNS_FILE = "final_full_runs.csv"
RACE_FULL_FINAL_FILE = f"{RACE_DIR}/{FULL_FINAL_FILE}"
RACE_FULL_FINAL_RUNS_FILE = f"{RACE_DIR}/{FULL_FINAL_RUNS_FILE}"
#: What a study folder must hold for the results commands to work, and why.
REQUIRED_FILES = {META_FILE: "what the study is", SPEC_FILE: "the spec it was run with"}

#: How a trial ended (the ``status`` column of the tables).
COMPLETED, STOPPED_EARLY, DIVERGED, ERROR, RUNNING = "completed", "stopped_early", "diverged", "error", "running"
#: The statuses of a trial that has ended.
FINISHED = (COMPLETED, STOPPED_EARLY, DIVERGED, ERROR)


def trial_status(last: Mapping[str, Any] | None, budget: int | None, *, ended: bool, error: bool = False) -> str:
    """How a trial ended, the one definition every part of kdtune uses.

    ``last`` is the trial's last reported result, ``budget`` its epoch budget;
    ``ended`` says whether the trial is over (Ray terminated it), ``error``
    whether it raised. A trial is "completed" only when it reported its last
    budgeted epoch; one that ended earlier without diverging or raising was
    stopped by the early-stopping rule ("stopped_early").
    """
    if error:
        return ERROR
    if last and last.get("status") == DIVERGED:
        return DIVERGED
    if last and budget is not None and last.get("epoch") is not None and int(last["epoch"]) >= int(budget):
        return COMPLETED
    return STOPPED_EARLY if ended else RUNNING


#: Keys of a trial's config that steer the trial rather than the run: every other
#: key is a RunConfig setting or hyperparameter (a misspelt one is an error).
TRIAL_KEYS = ("phase", "report_epochs", "validate_at", "fault", "checkpoint_every", "overrides", "race")


def final_files(race: bool = False, full_data: bool = False) -> tuple[str, str]:
    """The (table, runs) files ``kdtune evaluate`` writes, relative to the study folder."""
    return {(False, False): (FINAL_FILE, FINAL_RUNS_FILE),
            (True, False): (RACE_FINAL_FILE, RACE_FINAL_RUNS_FILE),
            (False, True): (FULL_FINAL_FILE, FULL_FINAL_RUNS_FILE),
            (True, True): (RACE_FULL_FINAL_FILE, RACE_FULL_FINAL_RUNS_FILE)}[(bool(race), bool(full_data))]


def trial_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's effective config: baseline trials carry their per-width values in ``overrides``."""
    return {**config, **(config.get("overrides") or {})}


def trial_run_config(config: Mapping[str, Any]) -> RunConfig:
    """The :class:`~kdtune.core.distill.RunConfig` a trial's config describes."""
    return RunConfig.from_dict({k: v for k, v in trial_config(config).items() if k not in TRIAL_KEYS})


# --------------------------------------------------------------------------- metadata


def study_path(study_dir: str | Path, name: str) -> Path:
    """A file or folder of the study, by its name in this module (e.g. :data:`JOURNAL_FILE`)."""
    return Path(study_dir) / name


def experiment_path(experiment_root: str | Path, phase: str) -> str:
    """The Ray experiment of ``phase`` under ``experiment_root`` (a path or a URI)."""
    return f"{str(experiment_root).rstrip('/')}/{EXPERIMENT_FOLDERS[phase]}"


def read_meta(study_dir: str | Path) -> dict[str, Any]:
    """The parsed ``study.json`` of a study folder.

    Raises :class:`ResultsError` when the file is missing, is not JSON, or has no
    ``"study"`` name.
    """
    path = Path(study_dir) / META_FILE
    if not path.is_file():
        raise ResultsError(f"{path}: not found; is {study_dir} a kdtune study folder?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("study"), str):
        raise ResultsError(f'{path}: expected an object with a "study" name')
    return meta


def update_meta(study_dir: str | Path, info: dict[str, Any]) -> None:
    """Atomically merge ``info`` into ``study.json``."""
    path = Path(study_dir) / META_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(info)
    write_text_atomic(path, json.dumps(current, indent=2, default=str))


def require_study(study_dir: str | Path) -> dict[str, Any]:
    """The parsed ``study.json`` of ``study_dir``, after checking it is a kdtune study folder.

    Raises :class:`ResultsError` saying what the folder holds and what is missing.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ResultsError(f"{study_dir}: no such folder; give the folder of a study, e.g. results/digits")
    missing = [name for name in REQUIRED_FILES if not (study_dir / name).is_file()]
    if missing:
        present = sorted(p.name for p in study_dir.iterdir())
        shown = ", ".join(present[:12]) + (f", … ({len(present) - 12} more)" if len(present) > 12 else "")
        wanted = ", ".join(f"{name} ({REQUIRED_FILES[name]})" for name in missing)
        raise ResultsError(
            f"{study_dir} is not a kdtune study folder: it holds {shown or 'nothing'} but is missing {wanted}. "
            f"A study folder is what `kdtune search SPEC` writes under results/<study>/"
        )
    return read_meta(study_dir)


# --------------------------------------------------------------------------- lock


def _in_use_error(study_dir: Path, owner: str) -> KdtuneError:
    return KdtuneError(f"study folder {study_dir} is in use by another kdtune search ({owner or 'another process'}); "
                       f"wait for it to finish, or use --name NEW for a separate study")


def check_not_locked(study_dir: str | Path) -> None:
    """Fail at once, without creating anything, if another search holds the study's lock."""
    path = Path(study_dir) / LOCK_FILE
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use_error(Path(study_dir), handle.read().strip()) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def study_lock(study_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the study folder for the whole search.

    A second search on the same study (another terminal, another user) fails at
    once instead of interleaving writes. The lock dies with the process.
    """
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    handle = open(study_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise _in_use_error(study_dir, owner) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- trial folders


def _experiment_roots(study_dir: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Where trial folders may live: the study folder first (it may have been copied or
    moved), then the ``--storage`` location the search recorded, when it is a local path."""
    roots = [study_dir]
    recorded = meta.get("experiment_root")
    if recorded and "://" not in str(recorded) and Path(recorded) != study_dir:
        roots.append(Path(recorded))
    return roots


def _recorded_trial_id(folder: Path) -> str | None:
    """The trial id in the first line of a trial folder's ``result.json`` (None when it is empty)."""
    try:
        with open(folder / "result.json", encoding="utf-8") as handle:
            first = handle.readline().strip()
        return json.loads(first).get("trial_id") if first else None
    except (OSError, ValueError, AttributeError):
        return None


def folder_patterns(trial_id: str) -> list[str]:
    """Glob patterns matching the folder of ``trial_id`` in a Ray experiment folder,
    under Ray's default naming (``<trainable>_<id>_<index>_<params>_<date>``) and
    under :func:`kdtune.trial_names.trial_dirname` (``...-<id>``, or the bare id)."""
    escaped = glob.escape(str(trial_id))
    return [f"*_{escaped}_*", f"*-{escaped}", escaped]


def trial_folder(study_dir: str | Path, trial_id: str, meta: Mapping[str, Any] | None = None) -> Path:
    """The Ray trial folder of ``trial_id`` (search or baseline) that holds its ``params.json``.

    Folders are found by the trial id in their name, whatever else the name holds
    (Ray's long ``<trainable>_<trial_id>_<index>_<params>_<date>`` or kdtune's short
    ``...-<trial_id>``). Raises :class:`ResultsError` when no such folder exists.
    """
    study_dir = Path(study_dir)
    meta = meta if meta is not None else require_study(study_dir)
    roots = _experiment_roots(study_dir, meta)
    candidates = [folder for root in roots for sub in EXPERIMENT_FOLDERS.values()
                  for pattern in folder_patterns(trial_id)
                  for folder in sorted((root / sub).glob(pattern))]
    for folder in candidates:
        if (folder / "params.json").is_file() and _recorded_trial_id(folder) in (None, trial_id):
            return folder
    # A trial that ended just before its search was killed has a record but may
    # lack Ray's params.json (Ray copies it in the background); its checkpoint,
    # which the trial uploads itself, is there.
    if load_record(study_dir, trial_id) is not None:
        for folder in candidates:
            if latest_checkpoint(folder) is not None:
                return folder
    recorded = str(meta.get("experiment_root") or "")
    hint = (
        f"; the search kept its trials at {recorded}: copy that experiment into {study_dir} first"
        if "://" in recorded else ""
    )
    searched = ", ".join(str(root / sub) for root in roots for sub in EXPERIMENT_FOLDERS.values())
    raise ResultsError(f"trial {trial_id}: no trial folder with params.json in {searched}{hint}")


def recorded_trial_config(study_dir: str | Path, trial_id: str, meta: Mapping[str, Any] | None = None,
                          folder: Path | None = None) -> dict[str, Any]:
    """The exact config a trial ran with, baseline ``overrides`` merged in: from its
    record, or else from the ``params.json`` of its folder (``folder`` when the
    caller has found it already, else :func:`trial_folder`)."""
    record = load_record(study_dir, trial_id)
    if record is not None and record.get("config"):
        return trial_config(record["config"])
    return read_trial_config(folder or trial_folder(study_dir, trial_id, meta))


def read_trial_config(folder: str | Path) -> dict[str, Any]:
    """The exact config a trial ran with: its ``params.json``, baseline ``overrides`` merged in."""
    path = Path(folder) / "params.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read the trial's config ({exc})") from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return trial_config(raw)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint_*/state.pt`` of a trial folder, or None when it has none."""
    found = sorted(Path(folder).glob("checkpoint_*/state.pt"))
    return found[-1] if found else None
