"""The plan of a search: spec → run configs, before anything runs.

Checks everything that can be checked before Ray starts (:func:`preflight`,
:func:`check_inputs`), decides where trials run (:func:`plan_placement`), and
turns the spec into the trials' base config and the no-distillation baselines'
configs. Also the study's lifecycle checks: may this study be created, or resumed
with this spec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdtune import __version__
from kdtune.atomic import write_text_atomic
from kdtune.core.data import DatasetSplits, check_dataset_root, student_images
from kdtune.core.data import DATASETS
from kdtune.core.model_checks import check_family_input
from kdtune.core.models import build_model, check_family_options
from kdtune.core.objectives import (
    SIZE_HYPERPARAMETER,
    baseline_values,
    hyperparameter_table,
    tuned_in_baseline,
)
from kdtune.core.teacher import describe_bytes, load_checkpoint, views_bytes
from kdtune.core.teacher_files import (
    check_teacher_features,
    check_teacher_output,
    load_teacher_file,
    load_teacher_logits,
    teacher_file_kind,
    teacher_source,
)
from kdtune.errors import ConfigError, KdtuneError
from kdtune.search.cluster import known_cluster_resources
from kdtune.search.early_stopping import EARLY_STOPPING
from kdtune.search.sampler import SAMPLERS
from kdtune.spec import Choice, IntRange, LogUniform, SearchSpec, bounds, load_spec_data, parse_spec, possible_values, teacher_configs
from kdtune.study import COMPLETED, META_FILE, SPEC_FILE, update_meta


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
    for key, name, registry in (("early_stopping.rule", spec.early_stopping.rule, EARLY_STOPPING),
                                ("sampler.name", spec.sampler.name, SAMPLERS)):
        if name not in registry:
            raise KdtuneError(f"{source}: {key}: unknown {registry.kind} {name!r}; "
                              f"allowed: {', '.join(registry.names())}")
    widths = [float(w) for w in possible_values(spec.space.width)]
    section = "student"
    try:
        for width in (min(widths), max(widths)):
            _preflight_model(spec, spec.student.family, width, spec.student.options)
        teachers = spec.teachers()
        for index, teacher in enumerate(teachers):
            section = "teacher" if len(teachers) == 1 else f"teacher[{index}]"
            if teacher_source(teacher) in ("file", "logits"):
                _preflight_external_teacher(teacher, section)
                continue
            _preflight_model(spec, teacher.family, teacher.width, teacher.options)
            if teacher.checkpoint and not Path(teacher.checkpoint).expanduser().is_file():
                raise ConfigError("checkpoint", f"{teacher.checkpoint} does not exist or is not a file")
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {_located(exc, section)}") from None
    except TypeError as exc:
        # Keyword arguments a model family does not take (a misspelt option).
        raise KdtuneError(f"{source}: {section}.options: {exc}") from None
    try:
        check_teacher_features(teacher_configs(spec), spec.uses_features())
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {exc}") from None


def _preflight_model(spec: SearchSpec, family: str, width: float, options: dict[str, Any]) -> None:
    """Check a model's family, width and options without data: built for a small image
    when the dataset is one of kdtune's image datasets; for other data (arrays, a
    plugin's) only the family and option names, since the sample shape is known only
    once the data is loaded (:func:`check_input_shapes` builds it then)."""
    if getattr(DATASETS.get(spec.data.dataset), "__module__", "") == "kdtune.core.data":
        build_model(family, (1, 8, 8), 10, width, **options)  # only used to validate names/options cheaply
    else:
        check_family_options(family, options)


def _preflight_external_teacher(teacher: Any, section: str) -> None:
    """A file or logits teacher: its file exists and has a known type (read later)."""
    kind = teacher_source(teacher)
    path = Path(getattr(teacher, kind)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{section}.{kind}", f"{path} does not exist or is not a file")
    if kind == "file":
        teacher_file_kind(path, f"{section}.file")

def check_inputs(spec: SearchSpec, source: str = "spec", address: str | None = None) -> DatasetSplits:
    """The checks after :func:`preflight` that need the data: load it, load every
    teacher checkpoint into its architecture, and check the per-trial resources
    against the cluster when that is known without starting Ray. Writes nothing.
    Returns the data; raises :class:`KdtuneError` naming ``source`` and the key."""
    try:
        data = load_spec_data(spec)
        check_student_images(spec, data)
        check_input_shapes(spec, data)
        check_teacher_checkpoints(spec, data)
        known = known_cluster_resources(address)
        if known is not None:
            plan_placement(spec, known, spec.num_samples)
    except ConfigError as exc:
        raise KdtuneError(f"{source}: {exc}") from None
    return data


def check_student_images(spec: SearchSpec, data: DatasetSplits) -> None:
    """``data.train_subset`` and ``data.unlabelled`` fit this training split (the images the
    students learn from are drawn exactly as every trial draws them)."""
    try:
        student_images(len(data.train), spec.data.train_subset, spec.data.unlabelled, spec.seed, labels=data.train.y)
    except ConfigError as exc:
        raise ConfigError(f"data.{exc.field}", exc.message) from None


def family_warnings(spec: SearchSpec, data: DatasetSplits) -> list[str]:
    """Warnings about the student's and teachers' families on this data's inputs (e.g. the
    8×8 ``cnn`` on 28×28 images), said before the search starts."""
    families = [("student", spec.student.family)] + [("teacher", t.family) for t in spec.teachers()]
    return [f"{role}.family: {warning}" for role, family in dict.fromkeys(families)
            for warning in check_family_input(family, tuple(data.input_shape))]


def check_teacher_checkpoints(spec: SearchSpec, data: DatasetSplits) -> None:
    """Load every teacher checkpoint into its architecture, every teacher file and
    check its output shape, and read and align every logits file, before any
    training starts."""
    configs = teacher_configs(spec)
    for index, config in enumerate(configs):
        section = "teacher" if len(configs) == 1 else f"teacher[{index}]"
        if config.file:
            check_teacher_output(load_teacher_file(config.file, f"{section}.file"), data, config.file,
                                 f"{section}.file")
        if config.logits:
            load_teacher_logits(config.logits, data, f"{section}.logits")
        if config.checkpoint:
            model = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
            load_checkpoint(model, config.checkpoint)

def check_input_shapes(spec: SearchSpec, data: DatasetSplits) -> None:
    """Build the student (smallest width) and every teacher kdtune builds for the
    data's sample shape, so that a family that cannot take it (``cnn`` on vectors)
    is one error naming the spec key before anything runs."""
    width = min(float(w) for w in possible_values(spec.space.width))
    builds = [("student", spec.student.family, width, spec.student.options)]
    teachers = spec.teachers()
    builds += [("teacher" if len(teachers) == 1 else f"teacher[{index}]", t.family, t.width, t.options)
               for index, t in enumerate(teachers) if teacher_source(t) in ("trained", "checkpoint")]
    for section, family, size, options in builds:
        try:
            build_model(family, data.input_shape, data.num_classes, size, **options)
        except ConfigError as exc:
            key, _, rest = _located(exc, section).partition(": ")
            raise ConfigError(key, rest) from None
        except TypeError as exc:
            raise ConfigError(f"{section}.options", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a plugin's factory may raise anything for a shape it cannot take
            raise ConfigError(f"{section}.family", f"building {family!r} for samples of shape "
                                                   f"{tuple(data.input_shape)} failed ({type(exc).__name__}: {exc})") from None


def base_config(spec: SearchSpec, placement: Placement) -> dict[str, Any]:
    """The constant part of every trial's config (fixed hyperparameters included)."""
    fixed = spec.space.fixed()
    return {
        **fixed,
        "family": spec.student.family,
        "model_options": dict(spec.student.options),
        "optimizer": spec.student.optimizer,
        "momentum": spec.student.momentum,
        "nesterov": spec.student.nesterov,
        "lr_schedule": spec.student.lr_schedule,
        "temperature_schedule": spec.student.temperature_schedule,
        "augment": spec.data.augmentation(),
        "teacher_targets": spec.targets_mode(),
        "view_pick": spec.teacher_targets.pick,
        "amp": spec.student.amp,
        "device": placement.device,
        "threads": placement.threads,
        "train_subset": spec.data.train_subset,
        "unlabelled": spec.data.unlabelled,
        "data_seed": spec.seed,
        "seed": spec.seed,
        "phase": "search",
        "checkpoint_every": spec.checkpoint_every,
        "validate_at": spec.early_stopping.validate_at,
    }

def max_epochs(spec: SearchSpec) -> int:
    """The largest epoch budget a trial can have."""
    return int(max(possible_values(spec.space.epochs)))

@dataclass(frozen=True)
class Budget:
    """A compute budget for a search: epochs of search trials, and/or wall-clock
    seconds of this run. Once spent, no new trial starts; running ones finish."""

    epochs: int | None = None
    seconds: float | None = None

    def spent(self, epochs_run: float, elapsed_s: float) -> bool:
        """Whether ``epochs_run`` epochs or ``elapsed_s`` seconds use the budget up."""
        return ((self.epochs is not None and epochs_run >= self.epochs)
                or (self.seconds is not None and elapsed_s >= self.seconds))

    def describe(self) -> str:
        parts = ([f"{self.epochs} epochs"] if self.epochs is not None else []) + (
            [f"{self.seconds / 3600:g} h"] if self.seconds is not None else [])
        return " or ".join(parts)


def parse_budget(text: str) -> Budget:
    """``--budget``: a number of epochs (``500``) or wall-clock time (``2h``, ``90m``, ``1.5h``)."""
    raw = str(text).strip().lower()
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    try:
        if raw and raw[-1] in units:
            seconds = float(raw[:-1]) * units[raw[-1]]
            if seconds > 0:
                return Budget(seconds=seconds)
        elif int(raw) >= 1:
            return Budget(epochs=int(raw))
    except ValueError:
        pass
    raise KdtuneError(f"--budget {text!r}: expected a number of epochs (e.g. 500) or a time (e.g. 2h, 90m)")


def baseline_widths(spec: SearchSpec, search_trials: pd.DataFrame) -> list[float]:
    """Widths that get an alpha = 1 baseline: those with a completed search trial
    (``baselines: true``), or every width the space allows when that is a short list
    (``baselines: "all"``; a continuous width range still gives the completed ones)."""
    done = search_trials[search_trials["status"] == COMPLETED] if len(search_trials) else search_trials
    completed = sorted(set(done[SIZE_HYPERPARAMETER].dropna().tolist())) if len(done) else []
    if spec.baselines != "all":
        return completed
    width = spec.space.width
    if isinstance(width, Choice):
        return sorted(set(width.choice))
    if isinstance(width, IntRange) and width.int[1] - width.int[0] < 12:
        return list(range(width.int[0], width.int[1] + 1))
    if bounds(width) is None:
        return [width]
    return completed


def baseline_configs(spec: SearchSpec, search_trials: pd.DataFrame) -> list[dict[str, Any]]:
    """One config per width: the baseline values the hyperparameter table declares
    (alpha = 1, beta = 0, no noise, T = 1), and the tuned hyperparameters (lr, weight
    decay, batch size, epochs) of that width's best completed search trial, so the
    baseline is tuned as well as the students it is compared with. A width without
    a completed trial gets the middle of each searched range (geometric for a
    log-uniform one)."""
    searched = spec.space.searched()
    table = hyperparameter_table()
    tuned = [name for name in tuned_in_baseline() if name in searched]
    overrides = []
    for width in baseline_widths(spec, search_trials):
        entry: dict[str, Any] = {SIZE_HYPERPARAMETER: width, **baseline_values()}
        pool = (search_trials[(search_trials["status"] == COMPLETED) & (search_trials[SIZE_HYPERPARAMETER] == width)]
                if len(search_trials) else search_trials)
        best = pool.sort_values("val_acc", ascending=False).iloc[0] if len(pool) else None
        for key in tuned:
            value = best[key] if best is not None else _middle(searched[key])
            entry[key] = int(value) if table[key].kind == "int" else float(value)
        entry.setdefault("epochs", max_epochs(spec))
        overrides.append(entry)
    return overrides


def _middle(distribution: Any) -> float:
    """The middle of a searched range: geometric for a log-uniform one, else arithmetic
    (of both ends of a range, or of the first and last choice)."""
    b = bounds(distribution)
    lo, hi = (b[0], b[-1]) if isinstance(b, list) else b
    if isinstance(distribution, LogUniform) or (isinstance(distribution, IntRange) and distribution.log):
        return math.sqrt(lo * hi)
    return (lo + hi) / 2
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
    marker = study_dir / META_FILE
    if marker.exists() and not resume:
        raise KdtuneError(
            f"study '{study_dir.name}' already exists at {study_dir}: pass --resume to continue it, "
            f"or --name NEW to start a separate study"
        )
    if not resume:
        return
    if not marker.exists():
        raise KdtuneError(f"--resume: no study at {study_dir} (nothing to resume); run without --resume to start it")
    stored_path = study_dir / SPEC_FILE
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
        stored = json.loads((study_dir / META_FILE).read_text()).get("num_samples")
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
    # Plugin paths are relative to the spec file: the stored copy names them by
    # absolute path, so that --resume, evaluate and export find them from the study.
    text = (spec_source.read_text() if spec_source and not spec.plugins
            else yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    write_text_atomic(study_dir / SPEC_FILE, text)
    update_meta(study_dir, {"study": study_dir.name, "kdtune_version": __version__, "state": "starting",
                            "num_samples": spec.num_samples})


# --------------------------------------------------------------------------- teacher targets

#: The share of a node's object store the cached views may fill (Ray needs the rest
#: for the data arrays, results and checkpoints in flight).
VIEWS_STORE_SHARE = 0.8


def node_object_stores(nodes: list[dict[str, Any]]) -> list[float]:
    """The object-store bytes of each alive node that runs trials (has CPUs), from ``ray.nodes()``."""
    return [float(node.get("Resources", {}).get("object_store_memory", 0.0)) for node in nodes
            if node.get("Alive", True) and node.get("Resources", {}).get("CPU", 0) > 0]


def check_views_fit(spec: SearchSpec, data: DatasetSplits, object_stores: list[float]) -> str:
    """One line saying how much memory the cached views need (empty without views);
    a :class:`ConfigError` when they would not fit the smallest node's object store,
    saying what would (a smaller k, online targets, or a larger store).

    Every node holds one copy of the views (and of the data arrays) in its object store.
    """
    if spec.targets_mode() != "views":
        return ""
    k, n, classes, teachers = spec.teacher_targets.k, len(data.train), data.num_classes, len(spec.teachers())
    need = views_bytes(teachers, k, n, classes)
    data_bytes = sum(t.element_size() * t.nelement() for t in (data.train.x, data.train.y, data.val.x, data.val.y))
    line = (f"teacher views: {k} views x {n:,} images x {classes} classes x {teachers} teacher(s) x 2 bytes = "
            f"{describe_bytes(need)} in each node's object store (plus {describe_bytes(data_bytes)} of data)")
    if not object_stores:
        return line
    usable = VIEWS_STORE_SHARE * min(object_stores) - data_bytes
    if need > usable:
        per_view = views_bytes(teachers, 1, n, classes)
        fits = max(0, int(usable // per_view))
        raise ConfigError("teacher_targets.k", (
            f"{line}, but the smallest node's object store holds {describe_bytes(min(object_stores))} "
            f"({VIEWS_STORE_SHARE:.0%} usable). What would fit: "
            + (f"k <= {fits}; " if fits else "")
            + "teacher_targets: {mode: online} (no cache: the teacher runs on every batch); or a larger object "
              "store (ray start --object-store-memory)"))
    return line
