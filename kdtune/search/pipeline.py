"""The search: a spec in, a results folder out.

Order of work: validate the spec and everything it points at (no Ray yet) →
load the data → prepare the teacher(s) once (cached) → start or join Ray →
run the Optuna-driven trials under the size-aware scheduler → run the
no-distillation baselines → write the tables. Everything lands under
``results/<study>/``::

    spec.yaml          the spec as given (resume reads it back)
    study.json         what the study is: name, teacher info, rungs, state
    optuna.journal     the live Optuna study (optuna.load_study can open it)
    teacher/           teacher cache (weights + logits as .npy, hash-checked)
    search/            Ray Tune experiment of the search (for --resume)
    baselines/         Ray Tune experiment of the α=1 baselines
    trials.parquet     one row per trial
    history.parquet    one row per trial per epoch
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import yaml

from kdtune import __version__
from kdtune.atomic import write_text_atomic
from kdtune.data import DatasetSplits, check_dataset_root, load_dataset
from kdtune.errors import ConfigError, KdtuneError
from kdtune.models import build_model
from kdtune.spec import Choice, IntRange, SearchSpec, bounds, load_spec, parse_spec, possible_values
from kdtune.tables import EXPERIMENT_FOLDERS
from kdtune.teacher import TeacherConfig, load_checkpoint, prepare_teachers

Log = Callable[[str], None]
SEARCH_DIR, BASELINE_DIR = EXPERIMENT_FOLDERS["search"], EXPERIMENT_FOLDERS["baseline"]


@dataclass
class SearchResult:
    """What :func:`search` returns: the study folder and its tables."""

    study_dir: Path
    trials: pd.DataFrame
    history: pd.DataFrame
    teachers: list[dict[str, Any]]
    interrupted: bool = False
    resume_command: str = ""

    def pareto_front(self, size: str = "params", score: str = "val_acc") -> pd.DataFrame:
        """The validation Pareto front of student size against accuracy."""
        from kdtune.analysis import pareto_front

        return pareto_front(self.trials, size=size, score=score)


@dataclass
class Placement:
    """Where trials run: per-trial Ray resources, device, and how many at once."""

    resources: dict[str, float]
    device: str
    max_concurrent: int
    threads: int
    warnings: list[str] = field(default_factory=list)


def plan_placement(spec: SearchSpec, cluster: dict[str, float], num_samples: int,
                   joined_cluster: bool = False) -> Placement:
    """Decide per-trial resources and concurrency from the spec and the cluster.

    GPUs asked for on a cluster without any are dropped with a warning (the same
    spec runs on a laptop); more GPUs per trial than the cluster has is an error.
    Without ``max_concurrent_trials`` Ray runs one trial at a time behind a custom
    searcher, so it is set from how many trials fit at once.
    """
    cpus, gpus = spec.resources.cpus, spec.resources.gpus
    notes: list[str] = []
    total_cpu, total_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if gpus > 0 and total_gpu == 0 and joined_cluster:
        # On a cluster (--address) a missing GPU means the GPU workers have not
        # joined yet: silently training on CPUs would waste the whole search.
        raise ConfigError("resources.gpus", f"{gpus:g} GPUs per trial but the cluster has no GPU registered; "
                                            "start the GPU workers first (see `ray status`), or set resources.gpus: 0")
    if gpus > 0 and total_gpu == 0:
        notes.append(f"resources.gpus={gpus} but the cluster has no GPU: running on the CPU")
        gpus = 0.0
    if gpus > total_gpu > 0:
        raise ConfigError("resources.gpus", f"{gpus:g} GPUs per trial but the cluster has {total_gpu:g}; "
                                            f"allowed: at most {total_gpu:g} (fractions share a GPU)")
    if cpus > total_cpu:
        raise ConfigError("resources.cpus", f"{cpus:g} CPUs per trial but the cluster has {total_cpu:g}; "
                                            f"allowed: at most {total_cpu:g}")
    fit = math.floor(total_cpu / cpus)
    if gpus > 0:
        fit = min(fit, math.floor(total_gpu / gpus + 1e-9))
    concurrent = spec.resources.max_concurrent_trials or max(1, fit)
    resources = {"cpu": cpus, "gpu": gpus}
    return Placement(resources, "cuda" if gpus > 0 else "cpu", max(1, min(concurrent, num_samples)),
                     max(1, int(cpus)), notes)


def _located(exc: ConfigError, section: str) -> str:
    """A model/dataset error re-keyed to where it sits in the spec, e.g. the
    ``depth`` error of ``build_model`` becomes ``student.options.depth``."""
    message = str(exc)
    rest = message[len(exc.field) + 2:] if message.startswith(f"{exc.field}: ") else message
    if exc.field in ("model", "family"):
        key = f"{section}.family"
    elif exc.field == "dataset":
        key = f"{section}.dataset"
    elif exc.field in ("width", "checkpoint") or exc.field.startswith(section.split("[")[0] + "."):
        key = exc.field if "." in exc.field else f"{section}.{exc.field}"
    else:
        key = f"{section}.options.{exc.field}"
    return f"{key}: {rest}"


def preflight(spec: SearchSpec, source: str = "spec") -> None:
    """Check everything that can be checked without data or Ray; raise on the first problem
    (a :class:`KdtuneError` naming ``source`` and the spec key)."""
    try:
        check_dataset_root(spec.data.dataset, spec.data.root, spec.data.download)
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {_located(exc, 'data')}") from None
    if not spec.space.searched():
        raise KdtuneError(f"{source}: space: nothing to search (every hyperparameter is fixed); "
                          f"make at least one a distribution, e.g. temperature: {{loguniform: [1, 20]}}")
    widths = [float(w) for w in possible_values(spec.space.width)]
    input_shape, classes = (1, 8, 8), 10  # only used to validate names/options cheaply
    section = "student"
    try:
        for width in (min(widths), max(widths)):
            build_model(spec.student.family, input_shape, classes, width, **spec.student.options)
        teachers = spec.teachers()
        for index, teacher in enumerate(teachers):
            section = "teacher" if len(teachers) == 1 else f"teacher[{index}]"
            build_model(teacher.family, input_shape, classes, teacher.width, **teacher.options)
            if teacher.checkpoint and not Path(teacher.checkpoint).expanduser().is_file():
                raise ConfigError("checkpoint", f"{teacher.checkpoint} does not exist or is not a file")
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {_located(exc, section)}") from None
    except TypeError as exc:
        # Keyword arguments a model family does not take (a misspelt option).
        raise KdtuneError(f"{source}: {section}.options: {exc}") from None


def check_inputs(spec: SearchSpec, source: str = "spec", address: str | None = None) -> DatasetSplits:
    """The checks after :func:`preflight` that need the data: load it, load every
    teacher checkpoint into its architecture, and check the per-trial resources
    against the cluster when that is known without starting Ray. Writes nothing.
    Returns the data; raises :class:`KdtuneError` naming ``source`` and the key."""
    try:
        data = load_spec_data(spec)
        check_teacher_checkpoints(spec, data)
        known = known_cluster_resources(address)
        if known is not None:
            plan_placement(spec, known, spec.num_samples)
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {exc}") from None
    return data


def teacher_configs(spec: SearchSpec) -> list[TeacherConfig]:
    """The spec's teachers as :class:`TeacherConfig` objects (checkpoint paths absolute)."""
    return [
        TeacherConfig(
            family=t.family, width=t.width, model_options=dict(t.options),
            checkpoint=str(Path(t.checkpoint).expanduser().resolve()) if t.checkpoint else None,
            epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, optimizer=t.optimizer,
            weight_decay=t.weight_decay, seed=t.seed,
        )
        for t in spec.teachers()
    ]


def load_spec_data(spec: SearchSpec) -> DatasetSplits:
    """The dataset a spec names, split with its split seed."""
    root = str(Path(spec.data.root).expanduser().resolve()) if spec.data.root else None
    return load_dataset(
        spec.data.dataset, root, seed=spec.data.split_seed, val_fraction=spec.data.val_fraction,
        test_fraction=spec.data.test_fraction, download=spec.data.download, image_size=spec.data.image_size,
    )


def check_teacher_checkpoints(spec: SearchSpec, data: DatasetSplits) -> None:
    """Load every teacher checkpoint into its architecture before any training starts."""
    for config in teacher_configs(spec):
        if config.checkpoint:
            model = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
            load_checkpoint(model, config.checkpoint)


def base_config(spec: SearchSpec, placement: Placement) -> dict[str, Any]:
    """The constant part of every trial's config (fixed hyperparameters included)."""
    fixed = spec.space.fixed()
    return {
        **fixed,
        "family": spec.student.family,
        "model_options": dict(spec.student.options),
        "optimizer": spec.student.optimizer,
        "amp": spec.student.amp,
        "device": placement.device,
        "threads": placement.threads,
        "train_subset": spec.data.train_subset,
        "data_seed": spec.seed,
        "seed": spec.seed,
        "phase": "search",
        "checkpoint_every": spec.checkpoint_every,
    }


def max_epochs(spec: SearchSpec) -> int:
    """The largest epoch budget a trial can have."""
    return int(max(possible_values(spec.space.epochs)))


def baseline_widths(spec: SearchSpec, search_trials: pd.DataFrame) -> list[float]:
    """Widths that get an α=1 baseline: every width the space allows when that is a
    short list, else every width that a completed search trial used."""
    width = spec.space.width
    if isinstance(width, Choice):
        return sorted(set(width.choice))
    if isinstance(width, IntRange) and width.int[1] - width.int[0] < 12:
        return list(range(width.int[0], width.int[1] + 1))
    if bounds(width) is None:
        return [width]
    done = search_trials[search_trials["status"] == "completed"] if len(search_trials) else search_trials
    return sorted(set(done["width"].dropna().tolist())) if len(done) else []


def baseline_configs(spec: SearchSpec, search_trials: pd.DataFrame) -> list[dict[str, Any]]:
    """One config per width: α=1, β=0, no noise; the non-KD hyperparameters (lr, weight
    decay, batch size, epochs) of that width's best completed search trial, so the
    baseline is tuned as well as the students it is compared with."""
    searched = spec.space.searched()
    overrides = []
    for width in baseline_widths(spec, search_trials):
        entry: dict[str, Any] = {"width": width, "alpha": 1.0, "beta": 0.0, "noise": 0.0, "temperature": 1.0}
        pool = search_trials[(search_trials["status"] == "completed") & (search_trials["width"] == width)] if len(search_trials) else search_trials
        best = pool.sort_values("val_acc", ascending=False).iloc[0] if len(pool) else None
        for key in ("lr", "weight_decay", "batch_size", "epochs"):
            if key not in searched:
                continue
            if best is not None:
                value = best[key]
            else:
                lo, hi = (bounds(searched[key]) if isinstance(bounds(searched[key]), tuple) else (searched[key].choice[0],) * 2)
                value = math.sqrt(lo * hi) if key in ("lr",) and lo > 0 else (lo + hi) / 2
            entry[key] = int(value) if key in ("batch_size", "epochs") else float(value)
        if "epochs" not in entry:
            entry["epochs"] = max_epochs(spec)
        overrides.append(entry)
    return overrides


def _in_use_error(study_dir: Path, owner: str) -> KdtuneError:
    return KdtuneError(f"study folder {study_dir} is in use by another kdtune search ({owner or 'another process'}); "
                       f"wait for it to finish, or use --name NEW for a separate study")


def check_not_locked(study_dir: Path) -> None:
    """Fail at once, without creating anything, if another search holds the study's lock."""
    path = study_dir / ".lock"
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use_error(study_dir, handle.read().strip()) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the study folder for the whole search.

    A second search on the same study (another terminal, another user) fails at
    once instead of interleaving writes. The lock dies with the process.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    handle = open(study_dir / ".lock", "a+")
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


def _spec_identity(spec: SearchSpec) -> dict[str, Any]:
    # The folder names the study (--name may differ from the spec's `study`), and
    # num_samples is checked on its own (see resumed_num_samples): neither makes
    # it another search.
    data = spec.model_dump(mode="json")
    data.pop("num_samples", None)
    data.pop("study", None)
    return data


def check_study(spec: SearchSpec, study_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing study, to resume a missing one, or to resume
    with another spec. Reads only; safe to call before anything is written."""
    marker = study_dir / "study.json"
    if marker.exists() and not resume:
        raise KdtuneError(
            f"study '{study_dir.name}' already exists at {study_dir}: pass --resume to continue it, "
            f"or --name NEW to start a separate study"
        )
    if not resume:
        return
    if not marker.exists():
        raise KdtuneError(f"--resume: no study at {study_dir} (nothing to resume); run without --resume to start it")
    stored_path = study_dir / "spec.yaml"
    try:
        stored = parse_spec(yaml.safe_load(stored_path.read_text()), str(stored_path))
    except (OSError, yaml.YAMLError) as exc:
        raise KdtuneError(f"--resume: cannot read the spec the study was started with ({stored_path}: {exc})") from None
    if _spec_identity(stored) != _spec_identity(spec):
        changed = sorted(k for k, v in _spec_identity(spec).items() if _spec_identity(stored).get(k) != v)
        raise KdtuneError(
            f"--resume: the spec differs from the one study '{study_dir.name}' was started with "
            f"(changed: {', '.join(changed)}); Ray cannot change a search space on resume. "
            f"Start a new study with --name instead"
        )


def resumed_num_samples(study_dir: Path, requested: int | None, default: int) -> int:
    """The number of trials a resumed study runs to: the one it was started with.

    Ray restores a search with its original number of samples, so asking for
    another one with ``--num-samples`` is refused rather than silently ignored.
    """
    try:
        stored = json.loads((study_dir / "study.json").read_text()).get("num_samples")
    except (OSError, ValueError):
        stored = None
    if stored is None:
        return requested if requested is not None else default
    if requested is not None and int(requested) != int(stored):
        raise KdtuneError(
            f"--num-samples {requested}: study '{study_dir.name}' was started with {stored} trials and Ray "
            f"cannot change that on resume; resume without --num-samples (or with --num-samples {stored}), "
            f"or start a new study with --name")
    return int(stored)


def create_study(spec: SearchSpec, spec_source: Path | None, study_dir: Path) -> None:
    """Create the study folder: spec.yaml, then study.json in state "starting"
    (after :func:`check_study` said it may be created).

    ``study.json`` is written before any long work, so that a search killed while
    its teacher trains can already be resumed with ``--resume``.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    text = spec_source.read_text() if spec_source else yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    write_text_atomic(study_dir / "spec.yaml", text)
    write_study_json(study_dir, {"study": study_dir.name, "kdtune_version": __version__, "state": "starting",
                                 "num_samples": spec.num_samples})


def write_study_json(study_dir: Path, info: dict[str, Any]) -> None:
    """Atomically update ``study.json``."""
    path = study_dir / "study.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(info)
    write_text_atomic(path, json.dumps(current, indent=2, default=str))


def _quiet_ray_environment() -> None:
    # The new console output prints a config table per trial even at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray's experiment state keeps its own period (TUNE_GLOBAL_CHECKPOINT_S, 10 s
    # or more): kdtune's trial records, written as each trial ends, are what make
    # a killed search lose nothing (see kdtune.records).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")


def ray_init_kwargs(address: str | None, dashboard: bool, num_cpus: int | None = None) -> dict[str, Any]:
    """The keyword arguments kdtune passes to ``ray.init``.

    Token authentication is never turned off: kdtune sets no auth option at all,
    so Ray 2.59+ enables it for the local cluster it starts. The dashboard (an
    HTTP server that accepts jobs) is off unless asked for, and then bound to
    127.0.0.1 only. Joining ``address`` passes no resource counts (Ray forbids
    them when connecting to an existing cluster).
    """
    kwargs: dict[str, Any] = dict(
        include_dashboard=dashboard, logging_level=logging.WARNING, log_to_driver=False,
        configure_logging=True,
    )
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    return kwargs


def ray_auth_environment(address: str | None, environ: dict[str, str], home: Path) -> dict[str, str]:
    """Environment variables to set before joining ``address`` so that the token is sent.

    Ray enables token authentication on the client side only for clusters it finds
    itself (no address, or "auto"); joining an explicit ``host:port`` sends no token,
    and a cluster with token auth refuses the connection. When a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)
    and ``RAY_AUTH_MODE`` is unset, this turns token mode on. It never turns it off.
    """
    if not address or address == "auto" or address.startswith("ray://") or "RAY_AUTH_MODE" in environ:
        return {}
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool(environ.get("RAY_AUTH_TOKEN")) or (token_path is not None and Path(token_path).is_file()) \
        or (home / ".ray" / "auth_token").is_file()
    return {"RAY_AUTH_MODE": "token"} if has_token else {}


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool, log: Log) -> Iterator[None]:
    """Start a local Ray instance (or join ``address``) and shut it down afterwards.

    The local default keeps Ray's token authentication on and the dashboard off;
    ``dashboard=True`` binds it to 127.0.0.1 only (see :func:`ray_init_kwargs`).
    An already initialised Ray (a notebook, kdtune's tests) is reused and left running.
    """
    import ray

    _quiet_ray_environment()
    if ray.is_initialized():
        yield
        return
    if address:
        auth = ray_auth_environment(address, dict(os.environ), Path.home())
        if auth:
            os.environ.update(auth)
            # Ray reads RAY_AUTH_MODE once, at import; re-read it as Ray's own
            # token setup does after changing it.
            from ray._raylet import Config

            Config.initialize("")
        log(f"joining the Ray cluster at {address}")
    try:
        ray.init(**ray_init_kwargs(address, dashboard))
    except ConnectionError as exc:
        if not address:
            raise
        raise KdtuneError(f"--address {address}: cannot connect to a Ray cluster there ({exc}); "
                          f"check the address and that this machine has the cluster's auth token") from None
    try:
        yield
    finally:
        ray.shutdown()


def _progress_callback(total: int, log: Log, interval_s: float = 15.0):
    from ray.tune import Callback

    from kdtune.tables import trial_config

    class ProgressLine(Callback):
        """One line per finished trial (and every ``interval_s`` while busy)."""

        def __init__(self) -> None:
            self.counts = {"completed": 0, "stopped early": 0, "diverged": 0, "error": 0}
            self.best: dict[Any, float] = {}
            self.running: set[str] = set()
            self.last_print = 0.0

        def _line(self) -> str:
            done = sum(self.counts.values())
            counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
            best = " ".join(f"{k:g}:{v:.3f}" if isinstance(k, (int, float)) else f"{k}:{v:.3f}" for k, v in sorted(self.best.items()))
            return f"[{done}/{total} done{': ' + counts if counts else ''}; {len(self.running)} running] best val_acc by width {best or '-'}"

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "completed":
                width = trial_config(trial.config).get("width")
                self.best[width] = max(self.best.get(width, 0.0), float(result.get("val_acc", 0.0)))

        def _finish(self, trial, kind: str) -> None:
            self.running.discard(trial.trial_id)
            self.counts[kind] += 1
            log(self._line())
            self.last_print = time.monotonic()

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("status") == "diverged":
                kind = "diverged"
            elif int(last.get("epoch", 0)) >= int(trial_config(trial.config).get("epochs", 0) or 0):
                kind = "completed"
            else:
                kind = "stopped early"
            self._finish(trial, kind)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, "error")

        def on_step_end(self, iteration, trials, **info):
            if self.running and time.monotonic() - self.last_print > interval_s:
                self.last_print = time.monotonic()
                log(self._line())

    return ProgressLine()


def _scheduler(spec: SearchSpec):
    """The Ray scheduler of the spec's early-stopping rule and the epochs it needs results at.

    Every scheduler counts time in the results' ``epoch`` field: trials report only
    at the returned rung epochs and at their last epoch.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from kdtune.scheduler import ParetoASHA, SizeAwareASHA, rung_milestones

    rule = spec.early_stopping
    if rule.rule == "none":
        return FIFOScheduler(), []
    if rule.rule == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                                  max_t=max_epochs(spec), grace_period=rule.grace_period,
                                  reduction_factor=rule.reduction_factor)
        return scheduler, rung_milestones(rule.grace_period, max_epochs(spec), rule.reduction_factor)
    if rule.rule == "pareto_asha":
        scheduler = ParetoASHA(metric="val_loss", mode="min", front_metric="val_acc", size_attr="params",
                               max_t=max_epochs(spec), grace_period=rule.grace_period,
                               reduction_factor=rule.reduction_factor, hv_epsilon=rule.hv_epsilon, time_attr="epoch")
        return scheduler, scheduler.milestones
    scheduler = SizeAwareASHA(metric="val_acc", mode="max", max_t=max_epochs(spec), grace_period=rule.grace_period,
                              reduction_factor=rule.reduction_factor, size_key=rule.size_key, time_attr="epoch")
    return scheduler, scheduler.milestones


def _searcher(spec: SearchSpec, journal: Path, study: str, records: Path):
    from kdtune.searcher import OBJECTIVE_MODES, KdOptunaSearch, build_sampler, journal_storage, to_optuna_distribution

    objectives = list(spec.sampler.objectives)
    multi = len(objectives) > 1
    space = {name: to_optuna_distribution(value) for name, value in spec.space.searched().items()}
    if not space:
        raise KdtuneError("space: nothing to search (every hyperparameter is fixed); make at least one a distribution")
    return KdOptunaSearch(
        space=space,
        metric=objectives if multi else objectives[0],
        mode=[OBJECTIVE_MODES[o] for o in objectives] if multi else OBJECTIVE_MODES[objectives[0]],
        sampler=build_sampler(spec.sampler, spec.seed, multi),
        study_name=study,
        storage=journal_storage(journal),
        size_values=list(spec.space.width.choice) if isinstance(spec.space.width, Choice) else None,
        num_samples=spec.num_samples,
        records=records,
    )


def _run_config(name: str, storage_path: str, spec: SearchSpec, callbacks: list):
    from ray import tune

    # A trial checkpoints once, at its end, unless checkpoint_every asks for more.
    # num_to_keep makes Ray save the whole experiment state, synchronously, each
    # time a trial has made that many checkpoints: set it only when old
    # checkpoints need deleting.
    keep = 2 if spec.checkpoint_every else None
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        callbacks=callbacks,
        verbose=0,
    )


def can_restore(experiment: str) -> bool:
    """Whether a Ray experiment folder holds a run to resume.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, which Ray writes before the
    first experiment state: a driver killed in between leaves a folder that
    ``Tuner.restore`` cannot resume (it then runs a broken, near-empty search).
    """
    from ray import tune

    if not tune.Tuner.can_restore(experiment):
        return False
    if "://" in experiment:
        return True
    return any(Path(experiment).glob("experiment_state-*.json"))


def _fit(tuner_factory: Callable[[], Any], experiment: str, restore: Callable[[], Any] | None) -> Any:
    from ray import tune

    if restore is not None and can_restore(experiment):
        tuner = restore()
    else:
        tuner = tuner_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuner.fit()


FINISHED = ("completed", "stopped_early", "diverged", "error")


class SearchInterrupted(KdtuneError):
    """Ctrl-C before the trials started; the study folder can be resumed."""

    exit_code = 130

    def __init__(self, study_dir: Path, resume_cmd: str) -> None:
        self.study_dir, self.resume_command = study_dir, resume_cmd
        super().__init__(f"search interrupted; everything finished so far is kept in {study_dir}.\n"
                         f"resume with: {resume_cmd}")


def resume_command(spec_source: Path | None, study_dir: Path, name: str | None) -> str:
    """The command line that resumes a study (printed when a search is interrupted)."""
    spec_arg = str(spec_source) if spec_source is not None else str(study_dir / "spec.yaml")
    parts = ["kdtune", "search", spec_arg, "--resume"]
    if name or spec_source is None:
        parts += ["--name", study_dir.name]
    if study_dir.parent != Path("results").resolve():
        parts += ["--results", str(study_dir.parent)]
    return " ".join(shlex.quote(p) for p in parts)


def known_cluster_resources(address: str | None) -> dict[str, float] | None:
    """The resources of the cluster a search will use, if known without starting Ray:
    an already initialised Ray's, or what a new local instance will have (all CPUs,
    the visible GPUs). None when joining another cluster."""
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if address:
        return None
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def search(
    spec: SearchSpec | str | Path,
    *,
    num_samples: int | None = None,
    name: str | None = None,
    address: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    dashboard: bool = False,
    results_root: str | Path = "results",
    log: Log = print,
) -> SearchResult:
    """Run (or resume) a distillation search and return its tables.

    ``spec`` is a path to a YAML spec or a validated :class:`SearchSpec`.
    ``address`` joins an existing Ray cluster ("auto", "ray://host:10001", host:port);
    ``storage`` is where Ray keeps the experiment (a path every node sees, or a
    pyarrow URI such as s3://bucket/kdtune), by default the study folder.
    Bad input raises :class:`KdtuneError` before Ray starts (a joined cluster's
    resources are checked right after joining) and before anything is written.
    Ctrl-C before the trials start raises :class:`SearchInterrupted`; during the
    trials Ray stops them, and the result has ``interrupted=True``.
    """
    from kdtune.searcher import clear_stale_journal_lock, reconcile_journal

    spec_source = None
    if not isinstance(spec, SearchSpec):
        spec_source = Path(spec)
        spec = load_spec(spec_source)
    if num_samples is not None:
        if num_samples < 1:
            raise KdtuneError(f"--num-samples: must be >= 1, got {num_samples}")
        spec = spec.model_copy(update={"num_samples": num_samples})
    study = name or spec.study
    if name is not None:
        spec = parse_spec({**spec.model_dump(mode="json"), "study": name}, "--name")
    source = str(spec_source or "spec")
    preflight(spec, source)
    results_root = Path(results_root).expanduser().resolve()
    study_dir = results_root / study
    resume_cmd = resume_command(spec_source, study_dir, name)

    # Everything that can reject the input runs before anything is written, so a
    # rejected spec leaves no study folder behind.
    check_study(spec, study_dir, resume)
    if resume:
        spec = spec.model_copy(update={"num_samples": resumed_num_samples(study_dir, num_samples, spec.num_samples)})
    check_not_locked(study_dir)
    data = check_inputs(spec, source, address)
    experiment_root = f"{storage.rstrip('/')}/{study}" if storage else str(study_dir)

    with ray_session(address, dashboard, log), study_lock(study_dir):
        import ray

        try:
            placement = plan_placement(spec, ray.cluster_resources(), spec.num_samples,
                                       joined_cluster=address is not None)
        except ConfigError as exc:
            raise KdtuneError(f"{source}: {exc}") from None
        for note in placement.warnings:
            log(f"warning: {note}")
        try:
            # Again under the lock: another search may have created the study since.
            check_study(spec, study_dir, resume)
            if not resume:
                create_study(spec, spec_source, study_dir)
            if clear_stale_journal_lock(study_dir / "optuna.journal"):
                log("removed the Optuna journal lock left by a killed search")
            prepared = prepare_teachers(teacher_configs(spec), data, study_dir / "teacher",
                                        with_features=spec.uses_features(), log=log)
        except KeyboardInterrupt:
            if (study_dir / "study.json").exists():
                write_study_json(study_dir, {"state": "interrupted"})
            raise SearchInterrupted(study_dir, resume_cmd) from None
        scheduler, rungs = _scheduler(spec)
        write_study_json(study_dir, {
            "study": study, "kdtune_version": __version__, "state": "running",
            "teacher": prepared.info[0], "teachers": prepared.info, "teacher_key": prepared.key,
            "rungs": rungs, "num_samples": spec.num_samples, "experiment_root": experiment_root,
            "early_stopping": spec.early_stopping.rule, "objectives": list(spec.sampler.objectives),
        })
        interrupted, trials, history = _run_trials(spec, study, study_dir, experiment_root, data, prepared,
                                                   placement, scheduler, rungs, resume, log)
        if not interrupted:
            ray_ids = set(trials.loc[trials["phase"] == "search", "trial_id"]) if len(trials) else set()
            lost = reconcile_journal(study_dir / "optuna.journal", study, ray_ids)
            if lost:
                log(f"optuna journal: {lost} trial(s) asked before the restart and never run marked FAIL")
        write_study_json(study_dir, {"state": "interrupted" if interrupted else "complete"})
    return SearchResult(study_dir, trials, history, prepared.info, interrupted, resume_cmd)


def restore_rungs(tuner: Any, study_dir: Path, study: str, experiment_root: str, log: Log) -> int:
    """Give a restored search's scheduler the rung results of the trials run so far.

    Ray does not save schedulers: ``Tuner.restore`` brings back the one pickled
    when the search started, with empty rungs, so trials after a resume would be
    compared only with each other. Returns the number of rung results restored.
    """
    from kdtune.tables import build_tables

    # Ray keeps no public handle on a restored Tuner's scheduler.
    scheduler = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "scheduler", None)
    if not hasattr(scheduler, "restore_history"):
        return 0
    _, history = build_tables(experiment_root, study, phases=("search",), study_dir=study_dir)
    restored = scheduler.restore_history(history) if len(history) else 0
    if restored:
        log(f"early stopping: restored {restored} rung result(s) of the trials run before the restart")
    return restored


def _run_trials(spec: SearchSpec, study: str, study_dir: Path, experiment_root: str, data: DatasetSplits,
                prepared: Any, placement: Placement, scheduler: Any, rungs: list[int], resume: bool,
                log: Log) -> tuple[bool, pd.DataFrame, pd.DataFrame]:
    """Run (or resume) the search trials, then the baselines, writing the tables after
    each; returns (stopped before the end, trials, history)."""
    from ray import tune

    from kdtune.records import PHASES, recorded_ids, recording_callback, records_dir
    from kdtune.tables import write_tables
    from kdtune.trainable import DataArrays, distill_trainable

    search_path = f"{experiment_root}/{SEARCH_DIR}"
    baseline_path = f"{experiment_root}/{BASELINE_DIR}"
    config = {**base_config(spec, placement), "report_epochs": list(rungs)}
    if spec.faults is not None and spec.faults.raise_at_epoch:
        config["fault"] = {**spec.faults.model_dump(), "dir": str(study_dir / "faults")}
    # Trials that ended before a restart end at once: their records hold their outcome.
    replays = frozenset()
    if resume:
        replays = frozenset().union(*(recorded_ids(records_dir(study_dir, phase)) for phase in PHASES))
    trainable = tune.with_resources(
        tune.with_parameters(distill_trainable, data=DataArrays.from_splits(data), teacher=prepared.targets,
                             replays=replays),
        placement.resources,
    )
    log(f"study '{study}': {spec.num_samples} trials, up to {placement.max_concurrent} at a time, "
        f"{spec.early_stopping.rule} early stopping, results in {study_dir}")

    def new_search_tuner():
        return tune.Tuner(
            trainable,
            param_space=config,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec, study_dir / "optuna.journal", study, records_dir(study_dir, "search")),
                scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=placement.max_concurrent,
                reuse_actors=True,
            ),
            run_config=_run_config(SEARCH_DIR, experiment_root, spec, [
                recording_callback(study_dir, "search"), _progress_callback(spec.num_samples, log)]),
        )

    def restore_search_tuner():
        log(f"resuming the search from {search_path}")
        tuner = tune.Tuner.restore(search_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        restore_rungs(tuner, study_dir, study, experiment_root, log)
        return tuner

    _fit(new_search_tuner, search_path, restore_search_tuner if resume else None)
    trials, history = write_tables(study_dir, study, experiment_root)
    search_trials = trials[trials["phase"] == "search"] if len(trials) else trials
    finished = search_trials[search_trials["status"].isin(FINISHED)] if len(search_trials) else search_trials
    if len(finished) < spec.num_samples:
        return True, trials, history
    overrides = baseline_configs(spec, search_trials) if spec.baselines else []
    if not overrides:
        return False, trials, history
    log(f"baselines: {len(overrides)} no-distillation runs (alpha=1) of widths "
        + ", ".join(f"{o['width']:g}" for o in overrides))
    baseline_space = {**config, "phase": "baseline", "report_epochs": [], "overrides": tune.grid_search(overrides)}
    baseline_space.pop("fault", None)

    def new_baseline_tuner():
        return tune.Tuner(
            trainable, param_space=baseline_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=placement.max_concurrent, reuse_actors=True),
            run_config=_run_config(BASELINE_DIR, experiment_root, spec, [
                recording_callback(study_dir, "baseline"), _progress_callback(len(overrides), log)]),
        )

    def restore_baseline_tuner():
        return tune.Tuner.restore(baseline_path, trainable, resume_unfinished=True, resume_errored=False)

    _fit(new_baseline_tuner, baseline_path, restore_baseline_tuner)
    # The search's rows are already built: read only the baselines' experiment.
    search_history = history[history["phase"] == "search"] if len(history) else history
    trials, history = write_tables(study_dir, study, experiment_root, phases=("baseline",),
                                   known=(search_trials, search_history))
    baselines = trials[(trials["phase"] == "baseline") & trials["status"].isin(FINISHED)]
    return len(baselines) < len(overrides), trials, history
