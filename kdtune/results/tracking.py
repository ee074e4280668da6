"""Log a study to an experiment tracker (MLflow, or W&B), from kdtune's own trial records.

Ray Tune's ``MLflowLoggerCallback`` logs at Ray's report counter and has no
nested runs; kdtune reports to Ray only at rung epochs, so per-epoch metrics
would be lost. The trial records (:mod:`kdtune.records`) hold every epoch, so
the trackers are fed from them instead:

* MLflow (:func:`log_study_to_mlflow`): one parent run per study, with the spec
  as params and the teacher's metrics; one nested run per ended trial, with its
  config as params and each per-epoch metric at ``step = epoch`` (so a trial
  that ran ``epochs_run`` epochs has ``epochs_run`` points per metric). The
  tracking URI defaults to ``sqlite:///<study folder>/mlflow.db``: it needs no
  server; ``mlflow ui --backend-store-uri sqlite:///<study>/mlflow.db`` opens it.
* W&B (:func:`log_study_to_wandb`), when the ``wandb`` package is installed:
  one run per trial, grouped by study, offline by default.

Logging is idempotent: each run is tagged with its trial id and a trial that is
already logged is skipped, so calling these after every phase of a search and
again after ``--resume`` logs each ended trial exactly once. A trial still
running has no record yet; it is logged by the next call after it ends.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from kdtune.errors import ConfigError, KdtuneError

#: Tracker name -> the package it needs (the kdtune extra of the same name installs it); the first is the default.
TRACKER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
DEFAULT_TRACKER = next(iter(TRACKER_PACKAGES))
MLFLOW_DB = "mlflow.db"
#: Tags that identify kdtune's runs in a tracker.
TAG_ROLE, TAG_STUDY, TAG_SPEC, TAG_TRIAL, TAG_DONE = (
    "kdtune.role", "kdtune.study", "kdtune.spec_sha256", "kdtune.trial_id", "kdtune.logged")
_PARENT_TAG = "mlflow.parentRunId"
#: MLflow's log_batch limits per call.
_MAX_METRICS, _MAX_PARAMS = 1000, 100
_MAX_PARAM_VALUE = 6000
#: Per-trial values of the trials table logged once per trial run (not per epoch).
_SUMMARY_COLUMNS = ("best_val_acc", "wall_time_s")


# --------------------------------------------------------------------------- availability


def check_tracker_available(name: str) -> None:
    """Raise one :class:`KdtuneError` when tracker ``name`` is unknown or its package is not
    installed; call it before a search starts, so that a missing tracker fails before any work."""
    if name not in TRACKER_PACKAGES:
        raise ConfigError("tracking", f"unknown tracker {name!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise KdtuneError(f"tracking with {name} needs the optional {package} package, which is not installed: "
                          f"pip install 'kdtune[{name}]'")


# --------------------------------------------------------------------------- study contents


@dataclasses.dataclass(frozen=True)
class TrialLog:
    """What a tracker gets for one ended trial."""

    trial_id: str
    phase: str
    status: str
    epochs_run: int
    name: str
    params: dict[str, str]
    #: metric name -> [(epoch, value)], one point per epoch the trial ran.
    epochs: dict[str, list[tuple[int, float]]]
    summary: dict[str, float]


@dataclasses.dataclass
class TrackingResult:
    """What one call logged: the tracker's location, the study run, trial ids newly logged and skipped."""

    tracker: str
    location: str
    study_run: str | None
    logged: list[str]
    skipped: list[str]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; values as strings (lists as JSON), as trackers store params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:_MAX_PARAM_VALUE]
    return flat


def _study_meta(study_dir: Path) -> dict[str, Any]:
    from kdtune.study import require_study

    return require_study(study_dir)


def _spec_params(study_dir: Path) -> dict[str, str]:
    import yaml

    spec = yaml.safe_load((study_dir / "spec.yaml").read_text(encoding="utf-8")) or {}
    return _flatten(spec if isinstance(spec, dict) else {"spec": spec})


def _teacher_metrics(meta: dict[str, Any]) -> dict[str, float]:
    teacher = meta.get("teacher") or {}
    return {f"teacher_{key}": float(teacher[key]) for key in ("val_acc", "val_loss", "params", "bytes")
            if isinstance(teacher.get(key), (int, float)) and not isinstance(teacher.get(key), bool)}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def study_trials(study_dir: str | Path) -> list[TrialLog]:
    """Every ended trial of a study (search then baselines), from its records: config as
    flat string params, per-epoch metrics, status and summary values.

    The per-epoch metrics are the numeric columns of the study's history table
    (:func:`kdtune.tables.phase_tables`) other than the epoch and the
    trial's config values; a missing value (a diverged epoch) is NaN.
    """
    import pandas as pd

    from kdtune.study import PHASES, load_records, trial_config
    from kdtune.tables import config_columns, phase_tables, record_views
    from kdtune.trial_names import trial_name

    study_dir = Path(study_dir)
    study = str(_study_meta(study_dir)["study"])
    logs: list[TrialLog] = []
    for phase in PHASES:
        records = load_records(study_dir, phase)
        if not records:
            continue
        trials, history = phase_tables(study, phase, record_views(records))
        metrics = [c for c in history.columns if c != "epoch" and c not in config_columns()
                   and pd.api.types.is_numeric_dtype(history[c]) and not pd.api.types.is_bool_dtype(history[c])]
        by_trial = dict(tuple(history.groupby("trial_id", sort=False))) if len(history) else {}
        for row in trials.itertuples(index=False):
            record = records[str(row.trial_id)]
            rows = by_trial.get(row.trial_id, pd.DataFrame(columns=["epoch"])).sort_values("epoch")
            # An epoch that was not scored (validate_at: rungs, a baseline before its end) has no
            # value: it is left out rather than logged as NaN.
            epochs = {m: [(int(e), float(v)) for e, v in zip(rows["epoch"], rows[m])
                          if pd.notna(v) and math.isfinite(float(v))] for m in metrics}
            summary = {c: float(getattr(row, c)) for c in _SUMMARY_COLUMNS
                       if _number(getattr(row, c, None)) is not None and math.isfinite(float(getattr(row, c)))}
            config = record.get("config") or {}
            effective = {k: v for k, v in trial_config(config).items() if k != "overrides"}
            logs.append(TrialLog(
                trial_id=str(row.trial_id), phase=phase, status=str(row.status), epochs_run=int(row.epochs_run),
                name=trial_name(SimpleNamespace(config=config, trial_id=row.trial_id)),
                params=_flatten(effective), epochs=epochs, summary=summary,
            ))
    return logs


# --------------------------------------------------------------------------- MLflow


def default_mlflow_uri(study_dir: str | Path) -> str:
    """``sqlite:///<absolute study folder>/mlflow.db``: MLflow's database store, no server needed."""
    return f"sqlite:///{(Path(study_dir).resolve() / MLFLOW_DB).as_posix()}"


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _all_runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log_batch(client: Any, run_id: str, metrics: list, params: list, tags: list) -> None:
    for chunk in _chunks(params, _MAX_PARAMS):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(tags, _MAX_PARAMS):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(metrics, _MAX_METRICS):
        client.log_batch(run_id, metrics=chunk)


def _mlflow_status(status: str) -> str:
    """kdtune's trial status as an MLflow run status (the exact one is in the kdtune.status tag)."""
    return "FAILED" if status in ("error", "diverged") else "FINISHED"


def log_study_to_mlflow(
    study_dir: str | Path, tracking_uri: str | None = None, experiment: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> TrackingResult:
    """Log a study to MLflow and return what was logged.

    Creates (or finds again) experiment ``experiment`` (default: the study name)
    at ``tracking_uri`` (default :func:`default_mlflow_uri`), a parent run for
    the study (tagged ``kdtune.study`` and ``kdtune.spec_sha256``; the spec's
    values as params, the teacher's ``val_acc``, ``val_loss``, ``params`` and
    ``bytes`` as ``teacher_*`` metrics), and under it one nested run per ended
    trial that is not logged yet (tag ``kdtune.trial_id``): the trial's config as
    params, every per-epoch metric with ``step = epoch``, ``summary.*`` metrics
    (one point each), and tags ``kdtune.phase``, ``kdtune.status``,
    ``kdtune.epochs_run``. A trial run left half-written by an interrupted call
    (no ``kdtune.logged`` tag) is deleted and logged again. The parent run is
    FINISHED once the study's state is complete, RUNNING before.

    Raises :class:`~kdtune.errors.ResultsError` for a folder that is not a study
    and :class:`KdtuneError` when mlflow is not installed.
    """
    check_tracker_available("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from kdtune.core.teacher import sha256_file

    study_dir = Path(study_dir)
    meta = _study_meta(study_dir)
    study = str(meta["study"])
    uri = tracking_uri or default_mlflow_uri(study_dir)
    client = MlflowClient(tracking_uri=uri)
    name = experiment or study
    found = client.get_experiment_by_name(name)
    if found is None:
        # Artifacts beside the study, not in ./mlruns of whatever folder the command ran in.
        experiment_id = client.create_experiment(name, artifact_location=(study_dir.resolve() / "mlartifacts").as_uri())
    else:
        experiment_id = found.experiment_id

    spec_sha = sha256_file(study_dir / "spec.yaml")
    parents = _all_runs(client, experiment_id, f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study}' "
                                               f"and tags.`{TAG_SPEC}` = '{spec_sha}'")
    if parents:
        parent_id = parents[0].info.run_id
    else:
        parent = client.create_run(experiment_id, run_name=study,
                                   tags={TAG_ROLE: "study", TAG_STUDY: study, TAG_SPEC: spec_sha})
        parent_id = parent.info.run_id
        now = int(time.time() * 1000)
        _log_batch(client, parent_id,
                   [Metric(k, v, now, 0) for k, v in _teacher_metrics(meta).items()],
                   [Param(k, v) for k, v in _spec_params(study_dir).items()], [])

    children = _all_runs(client, experiment_id, f"tags.`{_PARENT_TAG}` = '{parent_id}'")
    done: set[str] = set()
    for run in children:
        trial_id = run.data.tags.get(TAG_TRIAL)
        if run.data.tags.get(TAG_DONE) == "1" and trial_id:
            done.add(trial_id)
        else:
            client.delete_run(run.info.run_id)  # left half-written by an interrupted call: log it again

    logged, skipped = [], []
    for trial in study_trials(study_dir):
        if trial.trial_id in done:
            skipped.append(trial.trial_id)
            continue
        run = client.create_run(experiment_id, run_name=trial.name, tags={
            _PARENT_TAG: parent_id, TAG_ROLE: "trial", TAG_STUDY: study, TAG_TRIAL: trial.trial_id,
            "kdtune.phase": trial.phase, "kdtune.status": trial.status, "kdtune.epochs_run": str(trial.epochs_run),
        })
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, epoch) for key, points in trial.epochs.items() for epoch, value in points]
        metrics += [Metric(f"summary.{key}", value, now, trial.epochs_run) for key, value in trial.summary.items()]
        _log_batch(client, run.info.run_id, metrics, [Param(k, v) for k, v in trial.params.items()], [])
        client.set_tag(run.info.run_id, TAG_DONE, "1")  # last: marks the run complete
        client.set_terminated(run.info.run_id, status=_mlflow_status(trial.status))
        logged.append(trial.trial_id)

    if meta.get("state") == "complete":
        client.set_terminated(parent_id, status="FINISHED")
    else:
        client.update_run(parent_id, status="RUNNING")
    log(f"mlflow: {len(logged)} trial run(s) logged, {len(skipped)} already there, under run {parent_id} of "
        f"experiment '{name}' at {uri}")
    return TrackingResult("mlflow", uri, parent_id, logged, skipped)


# --------------------------------------------------------------------------- W&B


WANDB_LEDGER = "kdtune_logged.json"


def _wandb_id(text: str) -> str:
    # W&B run ids: letters, digits, "-" and "_" only.
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:128]


def log_study_to_wandb(
    study_dir: str | Path, project: str | None = None, mode: str = "offline", entity: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> TrackingResult:
    """Log a study to Weights & Biases (needs ``pip install 'kdtune[wandb]'``).

    One run per ended trial in project ``project`` (default ``kdtune-<study>``),
    grouped by study, ``job_type`` its phase, named as :func:`kdtune.trial_names.trial_name`,
    with its config, each per-epoch metric logged at ``step = epoch`` and the
    ``summary.*`` values in the run summary; plus one ``study`` run with the
    spec as config and the teacher's metrics in its summary. ``mode`` is W&B's:
    "offline" (default; files under ``<study>/wandb``, ``wandb sync`` uploads
    them) or "online" (needs ``wandb login``). Trials already logged, listed in
    ``<study>/wandb/kdtune_logged.json``, are skipped.
    """
    check_tracker_available("wandb")
    import wandb

    from kdtune.atomic import write_text_atomic

    study_dir = Path(study_dir)
    meta = _study_meta(study_dir)
    study = str(meta["study"])
    project = project or f"kdtune-{study}"
    folder = study_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    ledger_path = folder / WANDB_LEDGER
    try:
        ledger = set(json.loads(ledger_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        ledger = set()

    def finish(key: str) -> None:
        ledger.add(key)
        write_text_atomic(ledger_path, json.dumps(sorted(ledger)))

    common = {"project": project, "entity": entity, "group": study, "dir": str(study_dir), "mode": mode}
    if "__study__" not in ledger:
        run = wandb.init(name=study, id=_wandb_id(f"{study}-study"), job_type="study",
                         config=_spec_params(study_dir), **common)
        run.summary.update(_teacher_metrics(meta))
        run.finish()
        finish("__study__")
    logged, skipped = [], []
    for trial in study_trials(study_dir):
        if trial.trial_id in ledger:
            skipped.append(trial.trial_id)
            continue
        run = wandb.init(name=trial.name, id=_wandb_id(f"{study}-{trial.trial_id}"), job_type=trial.phase,
                         config=trial.params, tags=[trial.status], **common)
        steps = sorted({epoch for points in trial.epochs.values() for epoch, _ in points})
        for epoch in steps:
            values = {key: value for key, points in trial.epochs.items() for e, value in points if e == epoch}
            run.log(values, step=epoch)
        run.summary.update({f"summary.{k}": v for k, v in trial.summary.items()}
                           | {"kdtune.status": trial.status, "kdtune.epochs_run": trial.epochs_run})
        run.finish(exit_code=1 if _mlflow_status(trial.status) == "FAILED" else 0)
        finish(trial.trial_id)
        logged.append(trial.trial_id)
    log(f"wandb ({mode}): {len(logged)} trial run(s) logged, {len(skipped)} already there, project '{project}'")
    return TrackingResult("wandb", f"{mode}:{folder}", None, logged, skipped)


def log_study(study_dir: str | Path, tracker: str = DEFAULT_TRACKER, uri: str | None = None,
              log: Callable[[str], None] = lambda message: None) -> TrackingResult:
    """Log a study to ``tracker`` (see :data:`TRACKER_PACKAGES`); ``uri`` is MLflow's tracking URI
    (W&B takes none: a :class:`ConfigError`)."""
    check_tracker_available(tracker)
    if tracker == "mlflow":
        return log_study_to_mlflow(study_dir, tracking_uri=uri, log=log)
    if uri is not None:
        raise ConfigError("uri", f"only the mlflow tracker takes a URI; {tracker} logs to its own service")
    return log_study_to_wandb(study_dir, log=log)
