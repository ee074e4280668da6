"""Teachers: trained once (or loaded from a checkpoint), evaluated, and cached.

The cache holds each teacher's weights and its logits (and penultimate features
when the search uses a feature term) on the training split, as plain ``.npy``
files, under a key that hashes everything that determines them: the teacher
configs, the checkpoint file's bytes, the data fingerprint and the cache format.
A second search with the same teacher does no teacher work. Every file's sha256
is recorded, so a truncated or corrupted cache is detected and rebuilt, never
silently used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from kdtune.core.augment import VIEWS_STREAM, apply_views, augmentation_key, as_numpy_params, draw_view_params, padding_for
from kdtune.core.data import DatasetSplits
from kdtune.core.distill import RunConfig, TeacherTargets, evaluate, predict_logits, run, select_device
from kdtune.errors import ConfigError
from kdtune.core.models import Network, build_model, count_parameters, model_size_bytes
from kdtune.core.teacher_files import (
    check_teacher_features,
    check_teacher_output,
    load_teacher_file,
    load_teacher_logits,
    teacher_source,
)

CACHE_FORMAT = 1


@dataclass
class TeacherConfig:
    """How to obtain one teacher: train ``family``/``width`` from scratch, load
    ``checkpoint`` into it, load a network ``file`` (TorchScript or torch.export, no
    family needed) or read precomputed ``logits`` (:mod:`kdtune.core.teacher_files`)."""

    family: str = "mlp"
    width: float = 1024
    model_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    lr_schedule: dict[str, Any] | None = None
    augment: dict[str, Any] | None = None
    file: str | None = None
    logits: str | None = None


#: Fields added to :class:`TeacherConfig` after the first cache format, with the
#: value that means "as before": left out of the cache key at that value, so that
#: teachers cached before they existed are still found.
_LATER_FIELDS = {"momentum": 0.9, "nesterov": True, "lr_schedule": None, "augment": None, "file": None,
                 "logits": None}


@dataclass
class PreparedTeachers:
    """Cached teacher outputs plus what the results need to know about the teachers."""

    targets: TeacherTargets
    key: str
    info: list[dict[str, Any]]
    cache_dir: Path
    cache_hit: bool


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_cache_key(teachers: list[TeacherConfig], data_fingerprint: str, with_features: bool) -> str:
    """Hash of everything that determines the cached teacher outputs."""
    described = []
    for teacher in teachers:
        entry = dataclasses.asdict(teacher)
        for name, unchanged in _LATER_FIELDS.items():
            if entry[name] == unchanged:
                del entry[name]
        for name in ("checkpoint", "file", "logits"):
            path = getattr(teacher, name)
            if not path:
                continue
            # Hashing comes before loading, so a missing file must be reported here.
            if not Path(path).is_file():
                raise ConfigError(f"teacher.{name}", f"{path} does not exist or is not a file")
            entry[name] = sha256_file(Path(path))
        described.append(entry)
    payload = json.dumps(
        {"format": CACHE_FORMAT, "teachers": described, "data": data_fingerprint, "features": with_features},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_checkpoint(model: Network, path: str | Path, field_name: str = "teacher.checkpoint") -> None:
    """Load a state_dict saved with ``torch.save`` into ``model`` (``weights_only=True``).

    Accepts a bare state_dict or a dict holding one under ``state_dict``/``model``.
    A checkpoint of another architecture raises :class:`ConfigError` listing the
    mismatched keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field_name, f"{path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(field_name, f"{path} is not a readable weights-only torch checkpoint ({exc.__class__.__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(field_name, f"{path} holds a {type(state).__name__}, expected a state_dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing keys {missing[:4]}{'…' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected keys {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        raise ConfigError(
            field_name,
            f"{path} does not match the teacher architecture ({type(model).__name__}): " + "; ".join(details),
        )
    model.load_state_dict(state)


def build_teacher(config: TeacherConfig, data: DatasetSplits, device: torch.device, log: Callable[[str], None]) -> Network:
    """Train the teacher (or load its checkpoint); returns it in eval mode."""
    if config.checkpoint:
        model = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
        load_checkpoint(model, config.checkpoint)
        return model.to(device).eval()
    run_config = RunConfig(
        family=config.family, width=config.width, model_options=dict(config.model_options),
        alpha=1.0, beta=0.0, lr=config.lr, batch_size=config.batch_size, epochs=config.epochs,
        optimizer=config.optimizer, weight_decay=config.weight_decay, seed=config.seed,
        momentum=config.momentum, nesterov=config.nesterov, lr_schedule=config.lr_schedule,
        augment=config.augment, device=str(device),
    )
    last_log = [0.0]

    def progress(epoch: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if epoch == config.epochs or now - last_log[0] > 5:
            last_log[0] = now
            log(f"  teacher {config.family}(width={config.width}) epoch {epoch}/{config.epochs}: val_acc={metrics['val_acc']:.4f}")

    result = run(run_config, data, teacher=None, report=progress)
    if result.metrics.get("status") == "diverged":
        raise ConfigError("teacher.lr", f"teacher training diverged at lr={config.lr}; lower it")
    return result.student.eval()


def _read_cache(entry: Path) -> tuple[TeacherTargets, list[dict[str, Any]]] | None:
    """The cached outputs if every file is present and matches its recorded hash."""
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        for name, digest in meta["files"].items():
            if sha256_file(entry / name) != digest:
                return None
        logits = np.load(entry / "logits.npy", allow_pickle=False)
        features = np.load(entry / "features.npy", allow_pickle=False) if "features.npy" in meta["files"] else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return TeacherTargets(logits=logits, features=features, key=meta["key"]), meta["teachers"]


_Entry = TypeVar("_Entry")


def prepare_teachers(
    teachers: list[TeacherConfig],
    data: DatasetSplits,
    cache_root: str | Path,
    with_features: bool = False,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> PreparedTeachers:
    """Cached teacher targets for ``data``'s training split, building them if needed.

    Several teachers give logits of shape ``(K, N, C)`` (averaged in probability
    space by the loss); features come from the first teacher. The cache entry is
    written to a temporary folder and renamed into place, so a crash never
    leaves a half-written entry.
    """
    if not teachers:
        raise ConfigError("teacher", "at least one teacher is needed")
    check_teacher_features(teachers, with_features)
    key = teacher_cache_key(teachers, data.fingerprint, with_features)
    cache_root = Path(cache_root)
    entry = cache_root / key
    if entry.exists():
        cached = _read_cache(entry)
        if cached is not None:
            targets, info = cached
            log(f"teacher cache hit: {entry}")
            return PreparedTeachers(targets, key, info, entry, cache_hit=True)
        log(f"teacher cache at {entry} is incomplete or corrupted (hash mismatch): rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)

    torch_device = select_device(device)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root))
    try:
        all_logits, features, info = [], None, []
        for index, config in enumerate(teachers):
            if teacher_source(config) in ("file", "logits"):
                logits, described = external_teacher_outputs(config, data, torch_device, log)
                all_logits.append(logits)
                info.append({"index": index, **described})
                continue
            log(f"teacher {index + 1}/{len(teachers)}: {'loading ' + config.checkpoint if config.checkpoint else 'training'} {config.family}(width={config.width})")
            model = build_teacher(config, data, torch_device, log)
            val_acc, val_loss = evaluate(model, data.val, torch_device)
            if with_features and index == 0:
                logits, feats = predict_logits(model, data.train.x, torch_device, with_features=True)
                features = feats.numpy().astype(np.float32)
            else:
                logits = predict_logits(model, data.train.x, torch_device)
            all_logits.append(logits.numpy().astype(np.float32))
            torch.save(model.state_dict(), staging / f"teacher_{index}.pt")
            info.append({
                "index": index, "family": config.family, "width": config.width,
                "params": count_parameters(model), "bytes": model_size_bytes(model),
                "val_acc": val_acc, "val_loss": val_loss, "checkpoint": config.checkpoint,
                "feature_dim": int(getattr(model, "feature_dim", 0)),
            })
            log(f"teacher {index + 1}: val_acc={val_acc:.4f}, params={info[-1]['params']:,}")
        logits_array = all_logits[0] if len(all_logits) == 1 else np.stack(all_logits)
        np.save(staging / "logits.npy", logits_array)
        if features is not None:
            np.save(staging / "features.npy", features)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        meta = {"key": key, "files": files, "teachers": info, "data": data.fingerprint, "format": CACHE_FORMAT}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        placed = _place_entry(staging, entry, _read_cache)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if placed is not None:
        log(f"teacher cache at {entry} was written meanwhile by another process: using it")
        targets, info = placed
        return PreparedTeachers(targets, key, info, entry, cache_hit=True)
    targets = TeacherTargets(logits=logits_array, features=features, key=key)
    return PreparedTeachers(targets, key, info, entry, cache_hit=False)


def _place_entry(staging: Path, entry: Path, read: Callable[[Path], _Entry | None]) -> _Entry | None:
    """Rename the finished cache folder ``staging`` to ``entry``. ``None`` when it took its place;
    the entry's contents, as ``read`` returns them, when another process (a second search sharing
    the cache) placed the same entry first, which is as good as ours (the key names what it
    holds), and then ``staging`` is removed. An entry found there that does not read back is replaced."""
    try:
        os.replace(staging, entry)
        return None
    except OSError:  # a folder cannot replace a non-empty one: the entry exists now
        cached = read(entry)
        if cached is None:
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(staging, entry)
            return None
        shutil.rmtree(staging, ignore_errors=True)
        return cached


def external_teacher_outputs(config: TeacherConfig, data: DatasetSplits, device: torch.device,
                             log: Callable[[str], None]) -> tuple[np.ndarray, dict[str, Any]]:
    """Training-split logits and the info entry of a teacher kdtune does not build:
    a network file (evaluated here) or precomputed logits (aligned with the split)."""
    if config.logits:
        log(f"teacher: reading precomputed logits {config.logits}")
        loaded = load_teacher_logits(config.logits, data)
        return loaded.train_logits, {
            "family": "logits", "width": None, "params": None, "bytes": None, "val_acc": loaded.val_acc,
            "val_loss": loaded.val_loss, "checkpoint": None, "logits": config.logits, "feature_dim": 0,
        }
    assert config.file is not None
    log(f"teacher: loading {config.file}")
    model = load_teacher_file(config.file)
    check_teacher_output(model, data, config.file)
    model = model.to(device)
    val_acc, val_loss = evaluate(model, data.val, device)
    logits = predict_logits(model, data.train.x, device).numpy().astype(np.float32)
    log(f"teacher {config.file}: val_acc={val_acc:.4f}")
    return logits, {
        "family": "file", "width": None, "params": count_parameters(model), "bytes": model_size_bytes(model),
        "val_acc": val_acc, "val_loss": val_loss, "checkpoint": None, "file": config.file, "feature_dim": 0,
    }


def load_cached_teacher(entry: str | Path, index: int, data: DatasetSplits, config: TeacherConfig) -> Network:
    """A cached teacher network (for online-teacher runs and export), weights-only loaded."""
    model = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
    load_checkpoint(model, Path(entry) / f"teacher_{index}.pt", field_name="teacher cache")
    return model.eval()


# --------------------------------------------------------------------------- augmented targets

VIEWS_FORMAT = 1
VIEWS_FILE, VIEW_PARAMS_FILE = "views.npy", "view_params.npy"


class TeacherEnsemble(nn.Module):
    """Several teachers run as one online teacher: stacked logits ``(T, B, C)``
    (averaged in probability space by the loss) and the first teacher's features."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.feature_dim = getattr(members[0], "feature_dim", None)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs = [member.forward_features(x) for member in self.members]
        return torch.stack([logits for logits, _ in outputs]), outputs[0][1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


def teacher_networks(prepared: PreparedTeachers, teachers: list[TeacherConfig], data: DatasetSplits) -> list[Network]:
    """The prepared teachers' networks, loaded (weights only) from their cache entry, in eval mode."""
    return [load_cached_teacher(prepared.cache_dir, index, data, config) for index, config in enumerate(teachers)]


def online_targets(prepared: PreparedTeachers, teachers: list[TeacherConfig], data: DatasetSplits) -> TeacherTargets:
    """Targets that run the teacher(s) on every batch, on the trial's device (mode ``online``)."""
    models = teacher_networks(prepared, teachers, data)
    model: nn.Module = models[0] if len(models) == 1 else TeacherEnsemble(models).eval()
    return TeacherTargets(online_model=model, key=prepared.key)


def views_bytes(num_teachers: int, views: int, num_images: int, num_classes: int) -> int:
    """Bytes of the cached views: float16 logits of every view of every training image."""
    return int(num_teachers) * int(views) * int(num_images) * int(num_classes) * 2


def views_cache_key(teacher_key: str, augment: dict[str, Any] | None, views: int, seed: int) -> str:
    """Hash of what determines the cached views: the teachers (their cache key), the
    augmentation settings, the number of views and the views' seed."""
    payload = json.dumps({"format": VIEWS_FORMAT, "teachers": teacher_key, "augment": augmentation_key(augment),
                          "views": int(views), "seed": int(seed)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _flat_views(views: np.ndarray) -> np.ndarray:
    """(K, N, C) → (K·N, C) and (T, K, N, C) → (T, K·N, C), without a copy."""
    return views.reshape(views.shape[0] * views.shape[1], -1) if views.ndim == 3 else \
        views.reshape(views.shape[0], views.shape[1] * views.shape[2], -1)


def _read_views(entry: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if sha256_file(entry / name) != digest:
                return None
        views = np.load(entry / VIEWS_FILE, allow_pickle=False)
        params = np.load(entry / VIEW_PARAMS_FILE, allow_pickle=False)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return views, params, meta


def prepare_views(
    prepared: PreparedTeachers,
    teachers: list[TeacherConfig],
    data: DatasetSplits,
    augment: dict[str, Any],
    views: int,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> TeacherTargets:
    """Targets of mode ``views``: the teachers' float16 logits for ``views`` seeded
    augmented views of every training image, computed once and cached next to the
    teachers (``<cache>/views-<key>/``, hash-checked like the logits, rebuilt when
    damaged). View k of every image is drawn with ``seed`` (stream "views", index k),
    so the same key always means the same views.
    """
    if views < 1:
        raise ConfigError("teacher_targets.k", f"must be >= 1, got {views}")
    key = views_cache_key(prepared.key, augment, views, seed)
    entry = prepared.cache_dir.parent / f"views-{key}"
    if entry.exists():
        cached = _read_views(entry)
        if cached is not None:
            array, params, _meta = cached
            log(f"teacher views cache hit: {entry}")
            return TeacherTargets(logits=_flat_views(array), views=views, view_params=params, augment=dict(augment),
                                  key=key)
        log(f"teacher views cache at {entry} is incomplete or corrupted (hash mismatch): rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
    torch_device = select_device(device)
    models = [model.to(torch_device) for model in teacher_networks(prepared, teachers, data)]
    n, side = len(data.train), min(data.input_shape[1:])
    padding = padding_for(augment, side)
    log(f"teacher views: {views} augmented views of {n:,} images ({describe_bytes(views_bytes(len(models), views, n, data.num_classes))})")
    params = torch.stack([draw_view_params(augment, n, side, seed, k, VIEWS_STREAM) for k in range(views)])
    array = np.empty((len(models), views, n, data.num_classes), dtype=np.float16)
    with torch.no_grad():
        for k in range(views):
            for start in range(0, n, 512):
                xb = apply_views(data.train.x[start:start + 512].to(torch_device), params[k, start:start + 512], padding)
                for t, model in enumerate(models):
                    array[t, k, start:start + 512] = model(xb).float().cpu().numpy()
    array = array[0] if len(models) == 1 else array
    staging = Path(tempfile.mkdtemp(prefix=f".views-{key}-", dir=entry.parent))
    try:
        np.save(staging / VIEWS_FILE, array)
        np.save(staging / VIEW_PARAMS_FILE, as_numpy_params(params))
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        meta = {"key": key, "files": files, "teachers": prepared.key, "augment": augment, "views": views,
                "seed": seed, "format": VIEWS_FORMAT}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        placed = _place_entry(staging, entry, _read_views)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if placed is not None:
        log(f"teacher views cache at {entry} was written meanwhile by another process: using it")
        array, stored_params, _meta = placed
        return TeacherTargets(logits=_flat_views(array), views=views, view_params=stored_params,
                              augment=dict(augment), key=key)
    return TeacherTargets(logits=_flat_views(array), views=views, view_params=as_numpy_params(params),
                          augment=dict(augment), key=key)


def describe_bytes(count: float) -> str:
    """A byte count in words: "1.3 GB", "12.0 MB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
