"""One knowledge-distillation run: plain PyTorch, no Ray.

:func:`run` trains one student on a :class:`~kdtune.data.DatasetSplits` against a
teacher's cached soft targets (:class:`TeacherTargets`), reports metrics after every
epoch through a callback, and returns the final metrics with the trained student.
With ``alpha == 1`` and no teacher it is plain hard-label training, which is also
how teachers and the no-distillation baselines are trained.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Container

import numpy as np
import torch
from torch import Tensor, nn

from kdtune.core.augment import apply_views, draw_view_params, padding_for, resolve_augment, view_indices
from kdtune.core.data import DatasetSplits, TensorSplit, student_images, transfer_set_problem
from kdtune.core.method_cache import CACHED_OBJECTIVES
from kdtune.core.objectives import LOSSES, hyperparameter_table, loss_weights
from kdtune.core.schedules import Schedule, parse_schedule
from kdtune.core.size_metrics import count_macs
from kdtune.errors import ConfigError
from kdtune.core.losses import (
    UNLABELLED,
    distillation_loss,
    feature_matching_loss,
    fused_kd_loss_and_grad,
    kd_log_targets,
    kd_loss_scales,
    kd_loss_weights,
    perturb_teacher_logits,
    soft_targets,
)
from kdtune.core.models import MODELS, Network, build_feature_adapter, build_model, count_parameters, model_size_bytes

#: Callback ``report(epoch, metrics)`` called after every epoch (epochs count from 1).
ReportFn = Callable[[int, dict[str, Any]], None]
#: Callback ``on_checkpoint(epoch, state)`` called just before ``report`` on checkpoint epochs.
CheckpointFn = Callable[[int, dict[str, Any]], None]


#: The optimizers a run can use.
OPTIMIZERS = ("adam", "adamw", "sgd")
#: Where a run's teacher targets come from: cached logits of the un-augmented
#: images, cached logits of K replayed augmented views, or the teacher run on
#: every batch (see :class:`TeacherTargets`).
TARGET_MODES = ("logits", "views", "online")
#: How a run picks the cached view a sample replays (see :func:`kdtune.core.augment.view_indices`).
VIEW_PICKS = ("cycle", "random")
#: What a run reports that a search can optimise, and in which direction.
OBJECTIVE_MODES = {"val_acc": "max", "params": "min", "bytes": "min", "macs": "min"}

#: Settings of a run that are not searched hyperparameters, with their defaults.
RUN_SETTINGS: dict[str, Any] = {
    "family": "mlp",
    "model_options": {},
    "optimizer": "adam",
    "momentum": 0.9,
    "nesterov": True,
    "lr_schedule": None,
    "temperature_schedule": None,
    "augment": None,
    "teacher_targets": "logits",
    "view_pick": "cycle",
    "seed": 0,
    "train_subset": None,
    # A transfer set: this many more training images (or "all" the rest) that a student with a
    # teacher term learns from through the teacher alone; their labels are never read.
    "unlabelled": None,
    "data_seed": 0,
    "device": "auto",
    "amp": False,
    "threads": None,
    # With train_subset: also score the final student on the training images outside
    # the subset, which it never saw (pool_acc, pool_n, val_pool_acc): more images, less noise.
    "score_pool": False,
}


class RunConfig:
    """Everything that determines one distillation run: the settings in
    :data:`RUN_SETTINGS` and every hyperparameter of the table in
    :mod:`kdtune.core.objectives` (core ones and those of registered losses),
    each readable as an attribute (``config.temperature``).

    The loss is ``alpha·CE + (1 − alpha)·soft + beta·feature`` (see :mod:`kdtune.core.losses`);
    ``noise`` is the std of Gaussian noise added to the teacher's logits per batch.
    ``train_subset`` is the number of labelled training images the student sees
    (a seeded, class-stratified subset chosen with ``data_seed`` so that every trial
    of a search sees the same images); ``None`` uses the whole training split.
    ``unlabelled`` (with ``train_subset``) adds a transfer set (Hinton et al. 2015, §2): that
    many more training images (``"all"``: the rest of the split), seeded, whose labels are never
    read; they have only the teacher's terms (:data:`~kdtune.core.losses.UNLABELLED`). An epoch
    stays as many images as ``train_subset``, drawn from both sets, so a run takes the same
    steps with or without it; a run without a teacher term (a hard-label baseline) ignores it.
    An unknown key is an error (a misspelt key would otherwise be silently ignored).
    """

    def __init__(self, **values: Any) -> None:
        table = hyperparameter_table()
        unknown = sorted(set(values) - set(RUN_SETTINGS) - set(table))
        if unknown:
            raise ConfigError(unknown[0], "unknown run-config key; allowed: "
                              + ", ".join([*RUN_SETTINGS, *table]))
        for name, default in RUN_SETTINGS.items():
            value = values.get(name, default)
            object.__setattr__(self, name, dict(value) if isinstance(value, dict) else value)
        object.__setattr__(self, "hyperparameters",
                           {name: values.get(name, hp.default) for name, hp in table.items()})

    def __getattr__(self, name: str) -> Any:
        # Called only for names not set on the instance: the hyperparameters.
        if name.startswith("_") or name == "hyperparameters":
            raise AttributeError(name)
        try:
            return self.__dict__["hyperparameters"][name]
        except KeyError:
            raise AttributeError(f"RunConfig has no setting or hyperparameter {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RUN_SETTINGS:
            object.__setattr__(self, name, value)
        elif name in self.hyperparameters:
            self.hyperparameters[name] = value
        else:
            raise AttributeError(f"RunConfig has no setting or hyperparameter {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "RunConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __getstate__(self) -> dict[str, Any]:
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss has a teacher term: an objective with a weight > 0 (alpha < 1, or
        ``kd_weight`` > 0) or a feature term (beta > 0)."""
        return loss_weights(self.hyperparameters)[1] > 0 or self.beta > 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field and what is allowed."""
        table = hyperparameter_table()
        for name, value in self.hyperparameters.items():
            hp = table[name]
            if not hp.allows(value):
                raise ConfigError(name, f"allowed: {hp.allowed()}, got {value!r}")
        checks: list[tuple[str, bool, str]] = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"allowed: {', '.join(OPTIMIZERS)}"),
            ("family", self.family in MODELS, f"allowed: {', '.join(MODELS.names())}"),
            ("train_subset", self.train_subset is None or int(self.train_subset) >= 1, "must be >= 1 or null"),
            ("teacher_targets", self.teacher_targets in TARGET_MODES, f"allowed: {', '.join(TARGET_MODES)}"),
            ("view_pick", self.view_pick in VIEW_PICKS, f"allowed: {', '.join(VIEW_PICKS)}"),
            ("nesterov", not (self.nesterov and self.optimizer == "sgd" and self.momentum <= 0),
             "Nesterov momentum needs momentum > 0; set nesterov: false or a momentum"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(name, f"{allowed}, got {getattr(self, name)!r}")
        problem = transfer_set_problem(self.unlabelled, self.train_subset)
        if problem:
            raise ConfigError("unlabelled", problem)
        parse_schedule(self.lr_schedule)
        parse_schedule(self.temperature_schedule, "temperature_schedule")
        if self.augment is not None and resolve_augment(dict(self.augment), "", "augment") != dict(self.augment):
            raise ConfigError("augment", f"expected resolved settings {{crop, padding, flip}}, got {self.augment!r}")

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (same keys as the constructor)."""
        return RunConfig(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from a flat dict of settings and hyperparameters; an unknown key is an error."""
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON-serialisable): settings, then hyperparameters."""
        settings = {name: getattr(self, name) for name in RUN_SETTINGS}
        settings["model_options"] = dict(settings["model_options"] or {})
        for name in ("lr_schedule", "temperature_schedule", "augment"):
            if settings[name] is not None:
                settings[name] = dict(settings[name])
        return {**settings, **self.hyperparameters}


@dataclass
class TeacherTargets:
    """What a student learns from: the teacher's outputs on the *training split*.

    ``logits`` is ``(N, C)`` for one teacher or ``(K, N, C)`` for K teachers, row i
    belonging to training image i. ``features`` (``(N, ...)``, first teacher only) is
    needed when ``beta > 0``. Arrays may be read-only (shared through Ray's object
    store); they are only ever indexed. ``online_model`` instead runs a teacher
    network on every batch, on the batch the student sees (augmented or not).

    Cached views (``views`` = K > 0): ``logits`` holds the teacher's float16 logits
    of K augmented views of every training image, flattened so that row
    ``k·N + i`` is view k of image i (``(K·N, C)``, or ``(T, K·N, C)`` for T
    teachers), ``view_params`` ``(K, N, 3)`` the crop offsets and flips of those
    views and ``augment`` the settings they were drawn with: a run replays them
    and never runs the teacher (see :mod:`kdtune.core.augment`).
    """

    logits: np.ndarray | None = None
    features: np.ndarray | None = None
    online_model: nn.Module | None = None
    key: str = ""
    views: int = 0
    view_params: np.ndarray | None = None
    augment: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        """Which of :data:`TARGET_MODES` these targets serve."""
        return "online" if self.online_model is not None else "views" if self.views else "logits"

    @property
    def feature_dim(self) -> int | None:
        if self.features is not None:
            return int(self.features.shape[1])
        if self.online_model is not None:
            return int(getattr(self.online_model, "feature_dim"))
        return None

    def batch(self, indices: np.ndarray, x: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Teacher logits (and features, or None) for the training images ``indices``."""
        if self.online_model is not None:
            with torch.no_grad():
                logits, features = self.online_model.forward_features(x)
            return logits, features
        assert self.logits is not None
        logits_all, features_all = self._as_tensors()
        index = torch.from_numpy(indices)
        logits = logits_all.index_select(logits_all.dim() - 2, index).to(device)
        if logits.dtype != torch.float32:  # float16 views: the losses compute in float32
            logits = logits.float()
        features = features_all.index_select(0, index).to(device) if features_all is not None else None
        return logits, features

    def _as_tensors(self) -> tuple[Tensor, Tensor | None]:
        # Zero-copy views of the (possibly read-only, object-store) arrays, made
        # once: indexing a tensor per batch is cheaper than numpy fancy indexing
        # plus a copy. The views are only ever read.
        cached = getattr(self, "_tensors", None)
        if cached is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                logits = torch.from_numpy(self.logits)
                features = torch.from_numpy(self.features) if self.features is not None else None
            cached = self._tensors = (logits, features)
        return cached


class _CachedKD:
    """The KL distillation loss of one run on cached teacher logits, in fused form.

    Without noise the per-sample weights and log targets of
    :func:`~kdtune.losses.fused_kd_loss_and_grad` are built once per run (per batch
    size: the last batch may be smaller) and a step only indexes them. With noise the
    soft targets change every step: the noise is drawn into reused buffers and only
    the labels' rows of the weights are precomputed. Either way the loss's value is
    :func:`~kdtune.losses.distillation_loss`'s up to float rounding and the gradient
    it gives the logits is the same bit for bit.
    """

    def __init__(self, teacher: TeacherTargets, labels: Tensor, config: RunConfig, device: torch.device) -> None:
        self.temperature, self.alpha, self.noise = float(config.temperature), float(config.alpha), float(config.noise)
        self.device, self.labels = device, labels
        self.logits = teacher._as_tensors()[0]
        if self.logits.dtype != torch.float32:  # float16 views: noise and targets in float32
            self.logits = self.logits.float()
        with torch.no_grad():
            self.probs = soft_targets(self.logits, self.temperature)
        self.log_targets = kd_log_targets(self.probs).to(device) if self.noise == 0 else None
        self.tables: dict[int, Any] = {}  # batch size → what its steps index
        self.buffers: dict[tuple[int, ...], Tensor] = {}  # noise draws, by shape

    def _table(self, size: int) -> Any:
        table = self.tables.get(size)
        if table is None:
            weights = kd_loss_weights(self.probs, self.labels, self.temperature, self.alpha, size)
            if self.noise == 0:
                table = weights.to(self.device)
            else:  # the labels' rows of the weights and the soft rows' scale
                _, soft_scale = kd_loss_scales(self.temperature, self.alpha, size)
                table = (weights[:, 0].contiguous().to(self.device), (-soft_scale).to(self.device))
            self.tables[size] = table
        return table

    def loss_and_grad(self, student_logits: Tensor, batch_idx: np.ndarray, idx_t: Tensor,
                      generator: torch.Generator, epoch: int = 1,
                      temperature: float | None = None) -> tuple[Tensor, Tensor]:
        """The batch's loss (no autograd graph) and its gradient with respect to ``student_logits``.

        ``batch_idx`` are the batch's training-split indices, ``idx_t`` the same on the device.
        The temperature is the run's, fixed (a scheduled one takes :class:`_CachedMethod`).
        """
        table = self._table(len(batch_idx))
        if self.noise == 0:
            return fused_kd_loss_and_grad(student_logits, table.index_select(0, idx_t),
                                          self.log_targets.index_select(0, idx_t), self.temperature)
        hard, soft_scale = table
        logits = self.logits.index_select(self.logits.dim() - 2, torch.from_numpy(batch_idx))
        buffer = self.buffers.get(tuple(logits.shape))
        if buffer is None:
            buffer = self.buffers[tuple(logits.shape)] = torch.empty(logits.shape, dtype=logits.dtype)
        with torch.no_grad():
            noisy = perturb_teacher_logits(logits.to(self.device), self.noise, generator, out=buffer)
            probs = soft_targets(noisy, self.temperature)
            weights = torch.stack((hard.index_select(0, idx_t), probs * soft_scale), dim=1)  # as kd_loss_weights
            log_targets = kd_log_targets(probs)
        return fused_kd_loss_and_grad(student_logits, weights, log_targets, self.temperature)


class _CachedMethod:
    """Any objective with a fused form in :mod:`kdtune.core.method_cache` (kd, dkd, dist, with
    explicit loss weights and logit standardization) on cached teacher logits: the whole
    ``ce_weight·CE + kd_weight·objective`` of a batch and its gradient at the logits, with
    the teacher noise drawn as :class:`_CachedKD` draws it. (Plain KD with the alpha split
    keeps :class:`_CachedKD`, which is bit for bit :func:`~kdtune.core.losses.distillation_loss`.)"""

    def __init__(self, teacher: TeacherTargets, labels: Tensor, config: RunConfig, device: torch.device) -> None:
        objective = LOSSES.get(config.soft_loss)
        self.ce_weight, self.kd_weight = loss_weights(config.hyperparameters)
        self.temperature, self.noise, self.device = float(config.temperature), float(config.noise), device
        self.warmup = int(config.hyperparameters.get(objective.options.get("warmup", ""), 0) or 0)
        self.logits = teacher._as_tensors()[0]
        arguments = {arg: config.hyperparameters[name] for arg, name in objective.options.get("cached_args", {}).items()}
        self.cached = CACHED_OBJECTIVES[objective.options["cached"]](
            self.logits, labels, ce_weight=self.ce_weight, standardize=bool(config.standardize), device=device,
            **arguments)

    def loss_and_grad(self, student_logits: Tensor, batch_idx: np.ndarray, idx_t: Tensor,
                      generator: torch.Generator, epoch: int = 1,
                      temperature: float | None = None) -> tuple[Tensor, Tensor]:
        """The batch's loss (no autograd graph) and its gradient with respect to ``student_logits``
        at ``temperature`` (the epoch's, when scheduled; the tables are keyed by T)."""
        noisy = None
        if self.noise > 0:
            logits = self.logits.index_select(self.logits.dim() - 2, torch.from_numpy(batch_idx))
            noisy = perturb_teacher_logits(logits.to(self.device), self.noise, generator)
        warm = min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0
        idx = batch_idx if self.cached.arrays == "numpy" else idx_t  # NumPy's step takes the array as it is
        return self.cached.loss_and_grad(student_logits, idx, self.temperature if temperature is None else temperature,
                                         weight=self.kd_weight * warm, teacher_logits=noisy)


@dataclass
class RunResult:
    """The outcome of :func:`run`: final metrics, per-epoch history and the trained student."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    student: Network


def select_device(requested: str = "auto", cuda_available: bool | None = None) -> torch.device:
    """The device a run uses: ``"auto"`` → CUDA when available, else CPU.

    Asking for CUDA on a machine without it falls back to the CPU with a warning,
    so that a spec written for a GPU cluster still runs on a laptop.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    if requested.startswith("cuda") and not cuda_available:
        warnings.warn(f"device {requested!r} requested but CUDA is not available; using the CPU", stacklevel=2)
        return torch.device("cpu")
    if requested == "cpu" or requested.startswith("cuda"):
        return torch.device(requested)
    raise ConfigError("device", f"unknown device {requested!r}; allowed: auto, cpu, cuda, cuda:N")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it, else all)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def autocast_context(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp`` is set; a no-op context otherwise."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(model: nn.Module, split: TensorSplit, device: torch.device, batch_size: int = 512) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``."""
    logits = predict_logits(model, split.x, device, batch_size)
    labels = split.y
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(dim=1) == labels).float().mean().item()
    return acc, loss


def predict_logits(
    model: nn.Module, x: Tensor, device: torch.device, batch_size: int = 512, with_features: bool = False
) -> Any:
    """Logits of ``model`` on ``x`` (CPU float32), and features too when asked."""
    was_training = model.training
    model.eval()
    outs, feats = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            if with_features:
                logits, features = model.forward_features(xb)
                feats.append(features.float().cpu())
            else:
                logits = model(xb)
            outs.append(logits.float().cpu())
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.empty(0)
    if with_features:
        return logits, torch.cat(feats)
    return logits


def _check_targets(config: RunConfig, teacher: TeacherTargets | None) -> int:
    """The number of cached views the run replays (0: none), after checking that the
    teacher targets can serve the run's augmentation."""
    if teacher is None:
        return 0
    if teacher.views:
        if (dict(teacher.augment) if teacher.augment else None) != (dict(config.augment) if config.augment else None):
            raise ConfigError("augment", f"the cached views were drawn with {teacher.augment!r}, the run augments "
                                         f"with {config.augment!r}; rebuild the views for this augmentation")
        return int(teacher.views)
    if config.augment and teacher.mode == "logits":
        raise ConfigError("teacher_targets", "cached logits belong to the un-augmented images; with augmentation "
                                             "use teacher_targets views (replayed cached views) or online")
    return 0


def _pool_scores(student: nn.Module, data: DatasetSplits, indices: np.ndarray, device: torch.device,
                 val_acc: float) -> dict[str, Any]:
    """Accuracy on the training images the student never saw (outside ``indices``: its
    ``train_subset`` and transfer set), and pooled with the validation accuracy, weighted by image counts."""
    unseen = np.setdiff1d(np.arange(len(data.train)), indices)
    if not len(unseen):
        return {"pool_acc": float("nan"), "pool_n": 0, "val_pool_acc": val_acc}
    index = torch.from_numpy(unseen)
    pool = TensorSplit(data.train.x.index_select(0, index), data.train.y.index_select(0, index))
    pool_acc, _ = evaluate(student, pool, device)
    n_val, n_pool = len(data.val), len(unseen)
    return {"pool_acc": pool_acc, "pool_n": n_pool,
            "val_pool_acc": (val_acc * n_val + pool_acc * n_pool) / (n_val + n_pool)}


def _make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=bool(config.nesterov))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def run(
    config: RunConfig,
    data: DatasetSplits,
    teacher: TeacherTargets | None = None,
    report: ReportFn | None = None,
    *,
    on_checkpoint: CheckpointFn | None = None,
    checkpoint_every: int = 0,
    resume_state: dict[str, Any] | None = None,
    validate_epochs: Container[int] | None = None,
) -> RunResult:
    """Train one student for ``config.epochs`` epochs and return its final metrics.

    After every epoch ``report(epoch, metrics)`` receives at least ``val_acc``,
    ``val_loss``, ``train_loss``, ``params``, ``bytes``, ``epoch_time_s``,
    ``samples_per_s`` and ``status`` ("running", then "completed" on the last epoch,
    or "diverged" when the training loss became NaN/inf, which ends the run early
    instead of raising). ``on_checkpoint(epoch, state)`` gets the resumable state
    every ``checkpoint_every`` epochs, and on the last epoch the student without
    the optimizer state (a finished run is not resumed); ``resume_state``
    continues from such a state. The same config and seed give the same numbers on the CPU.
    ``validate_epochs`` limits scoring the validation split to those epochs and the
    last (which always scores): a caller that reads only the final student, such as
    ``kdtune evaluate``, passes ``()``. The other epochs report ``val_acc`` and
    ``val_loss`` as NaN. The default scores every epoch, for the per-epoch history.
    """
    config.validate()
    needs_teacher = config.needs_teacher
    if needs_teacher and teacher is None:
        raise ConfigError("teacher", f"alpha={config.alpha}, beta={config.beta} need a teacher; none was given")
    if config.beta > 0 and teacher is not None and teacher.features is None and teacher.online_model is None:
        raise ConfigError("beta", "beta > 0 needs teacher features; build the teacher cache with features")
    views = _check_targets(config, teacher if needs_teacher else None)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    device = select_device(config.device)

    torch.manual_seed(config.seed)
    student = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
    params, size_bytes = count_parameters(student), model_size_bytes(student)
    macs = count_macs(student, tuple(data.input_shape))  # one forward pass of one sample
    adapter: nn.Module | None = None
    if config.beta > 0 and teacher is not None:
        adapter = build_feature_adapter(student, int(teacher.feature_dim or 0))
    trainable_params = list(student.parameters()) + (list(adapter.parameters()) if adapter is not None else [])
    optimizer = _make_optimizer(config, trainable_params)
    student.to(device)
    if adapter is not None:
        adapter.to(device)
    if teacher is not None and teacher.online_model is not None:
        teacher.online_model.to(device).eval()

    # The transfer set: images learnt from through the teacher only, their labels replaced by
    # UNLABELLED (no cross-entropy). A run without a teacher term has nothing to learn from them,
    # but they stay out of its pool score, so that every run of a study scores on the same images.
    indices, transfer_set = student_images(len(data.train), config.train_subset, config.unlabelled,
                                           config.data_seed, labels=data.train.y)
    unlabelled = transfer_set if needs_teacher else transfer_set[:0]
    run_labels = data.train.y
    if len(unlabelled):
        run_labels = run_labels.clone()
        run_labels[torch.from_numpy(unlabelled)] = UNLABELLED
    seen_images = np.union1d(indices, unlabelled) if len(unlabelled) else indices
    train_x, train_y = data.train.x.to(device), run_labels.to(device)
    # Separate random streams: initialisation (the global seed above), data order,
    # teacher noise, and augmentation (seeded per epoch by the run seed, so it
    # keeps no state; see kdtune.core.augment). Turning augmentation on leaves the
    # other streams' draws as they were.
    shuffle = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator().manual_seed(config.seed + 1)
    augment = dict(config.augment) if config.augment else None
    n_train = len(data.train)
    padding = padding_for(augment, min(data.input_shape[1:])) if augment else 0
    view_params = torch.from_numpy(np.asarray(teacher.view_params)).long() if views else None
    schedule = Schedule(config.lr, config.epochs, config.lr_schedule)
    # The temperature of each epoch: constant, or a curriculum T0 -> T1 over the full budget.
    temperatures = Schedule(config.temperature, config.epochs, config.temperature_schedule)
    start_epoch, history = 1, []
    if resume_state is not None:
        student.load_state_dict(resume_state["student"])
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
        if adapter is not None and resume_state.get("adapter") is not None:
            adapter.load_state_dict(resume_state["adapter"])
        shuffle.set_state(resume_state["shuffle_rng"])
        noise_gen.set_state(resume_state["noise_rng"])
        start_epoch = int(resume_state["epoch"]) + 1
        history = list(resume_state.get("history", []))

    # Objectives on cached logits take a fused loss (fewer ops per step, no autograd graph for
    # the objective): plain KD with the alpha split the one bit for bit distillation_loss's,
    # KD with explicit weights or standardization, DKD and DIST method_cache's. Online
    # teachers, logit_mse, plugins' losses and hard labels take distillation_loss.
    cached_kd: _CachedKD | _CachedMethod | None = None
    objective = LOSSES.get(config.soft_loss)
    explicit = config.ce_weight is not None or config.kd_weight is not None or bool(config.standardize)
    if (teacher is not None and loss_weights(config.hyperparameters)[1] > 0
            and teacher.online_model is None and teacher.logits is not None):
        # Cached views are K·N rows: view k of image i is row k·N + i.
        labels = run_labels.repeat(views) if views else run_labels
        if objective.options.get("fused") and not explicit and not config.temperature_schedule:
            cached_kd = _CachedKD(teacher, labels, config, device)
        elif objective.options.get("cached"):
            cached_kd = _CachedMethod(teacher, labels, config, device)

    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        student.train()
        lr = schedule.value(epoch)
        temperature = temperatures.value(epoch)
        if config.lr_schedule:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if len(unlabelled):  # as many images as the labelled subset, drawn from both sets
            order = seen_images[torch.randperm(len(seen_images), generator=shuffle).numpy()[:len(indices)]]
        else:
            order = indices[torch.randperm(len(indices), generator=shuffle).numpy()]
        epoch_params, teacher_rows = None, None
        if augment and views:
            picks = view_indices(views, n_train, epoch, config.view_pick, config.seed)
            epoch_params = view_params[picks, torch.arange(n_train)].to(device)
            teacher_rows = (picks * n_train + torch.arange(n_train)).numpy()
        elif augment:
            epoch_params = draw_view_params(augment, n_train, min(data.input_shape[1:]), config.seed, epoch).to(device)
        total_loss, seen, diverged = 0.0, 0, False
        for start in range(0, len(order), config.batch_size):
            batch_idx = order[start : start + config.batch_size]
            idx_t = torch.from_numpy(batch_idx).to(device)
            xb, yb = train_x[idx_t], train_y[idx_t]
            if epoch_params is not None:
                xb = apply_views(xb, epoch_params.index_select(0, idx_t), padding)
            t_idx, t_idx_t = batch_idx, idx_t  # the teacher's rows: the images, or their replayed views
            if teacher_rows is not None:
                t_idx = teacher_rows[batch_idx]
                t_idx_t = torch.from_numpy(t_idx).to(device)
            with autocast_context(device, config.amp):
                if config.beta > 0:
                    s_logits, s_features = student.forward_features(xb)
                else:
                    s_logits, s_features = student(xb), None
                t_logits = t_features = None
                if teacher is not None and needs_teacher and (cached_kd is None or config.beta > 0):
                    t_logits, t_features = teacher.batch(t_idx, xb, device)
                    if cached_kd is None:
                        t_logits = perturb_teacher_logits(t_logits, config.noise, noise_gen)
                feature_term = None
                if adapter is not None and s_features is not None and t_features is not None:
                    feature_term = feature_matching_loss(adapter(s_features), t_features)
                if cached_kd is None:
                    loss = distillation_loss(
                        s_logits, t_logits, yb, temperature, config.alpha,
                        soft_loss_kind=config.soft_loss, beta=config.beta, feature_loss=feature_term,
                        params={**config.hyperparameters, "epoch": epoch}, unlabelled=bool(len(unlabelled)),
                    )
            logits_grad = None
            if cached_kd is not None:  # in float32 whatever the autocast, as distillation_loss computes it
                loss, logits_grad = cached_kd.loss_and_grad(s_logits, t_idx, t_idx_t, noise_gen, epoch, temperature)
                if feature_term is not None:
                    loss = loss + config.beta * feature_term
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            if logits_grad is None:
                loss.backward()
            else:  # the KD term's gradient is known at the logits; only a β·feature term is left to autograd
                roots, grads = [s_logits], [logits_grad]
                if loss.requires_grad:
                    roots.append(loss)
                    grads.append(None)
                torch.autograd.backward(roots, grads)
            optimizer.step()
            total_loss += value * len(batch_idx)
            seen += len(batch_idx)
        elapsed = time.perf_counter() - started
        # An epoch the caller does not read is not scored: the training is the same without it.
        scored = validate_epochs is None or diverged or epoch == config.epochs or epoch in validate_epochs
        val_acc, val_loss = evaluate(student, data.val, device) if scored else (math.nan, math.nan)
        if diverged or (scored and not math.isfinite(val_loss)):
            status = "diverged"
        else:
            status = "completed" if epoch == config.epochs else "running"
        metrics = {
            "epoch": epoch,
            "val_acc": val_acc,
            "val_loss": val_loss if math.isfinite(val_loss) else float("nan"),
            "train_loss": total_loss / seen if seen and not diverged else float("nan"),
            "params": params,
            "bytes": size_bytes,
            "macs": macs,
            "epoch_time_s": elapsed,
            "samples_per_s": seen / elapsed if elapsed > 0 else 0.0,
            "lr": lr,
            "status": status,
        }
        final = status != "running"
        if final and config.score_pool:
            metrics.update(_pool_scores(student, data, np.union1d(indices, transfer_set), device, val_acc))
        history.append(metrics)
        if on_checkpoint is not None and (final or (checkpoint_every and epoch % checkpoint_every == 0)):
            on_checkpoint(epoch, {
                "epoch": epoch,
                "student": student.state_dict(),
                "adapter": adapter.state_dict() if adapter is not None else None,
                # A finished run is never resumed: its checkpoint keeps the student
                # only (for Adam the optimizer state is twice the student's size).
                "optimizer": None if final else optimizer.state_dict(),
                "shuffle_rng": shuffle.get_state(),
                "noise_rng": noise_gen.get_state(),
                "history": history,
                "config": config.to_dict(),
            })
        if report is not None:
            report(epoch, dict(metrics))
        if final:
            break
    student.eval()
    return RunResult(metrics=metrics, history=history, student=student)
