"""Teachers kdtune does not build: a network file without its class, or precomputed logits.

``teacher: {file: teacher.pt2}`` loads a ``torch.export`` archive (``.pt2``);
``teacher: {file: teacher.pt}`` (or ``.ts``, ``.jit``) a TorchScript file. Neither
needs the teacher's Python class. kdtune checks before the search that the
network maps a batch of the data to ``(batch, num_classes)`` logits, then
evaluates it and caches its logits like any teacher (:mod:`kdtune.core.teacher`).
A file teacher gives logits only: feature distillation (``beta > 0``) needs a
teacher built from a family, whose penultimate features kdtune can read.

``teacher: {logits: teacher_logits.npz}`` is the teacher's output computed
elsewhere (a model too large for the workers, one served by another team, another
framework). The ``.npz`` (read with ``allow_pickle=False``) holds

- ``index``: ``(M,)`` integers, each row's sample index in the dataset as you
  have it (the row of ``x_train`` for the ``arrays`` dataset, the index in the
  official training set for mnist/cifar, in the whole set for digits and a flat
  image folder); any order, a superset of kdtune's training split is fine;
- ``logits``: ``(M, num_classes)`` finite floats, row i belonging to ``index[i]``;
- optionally ``val_index`` and ``val_logits``, the same for (a superset of) the
  validation split, to report the teacher's validation accuracy.

Producing it, e.g. for an ``arrays`` dataset::

    logits = my_teacher(x_train)                      # (N, C), any framework
    np.savez("teacher_logits.npz", index=np.arange(len(x_train)), logits=logits)

Logits are one row per sample: they cannot follow augmented inputs
(:func:`check_logits_without_augmentation`).

What loading protects against (see docs/own_data.md): a ``.npz`` is read
without unpickling. A TorchScript file is read by TorchScript's own loader,
which builds only TorchScript objects and tensors (no Python pickle), but its
TorchScript code runs torch operators when the teacher is evaluated. A ``.pt2``
archive is *not* pickle-free: ``torch.export.load`` unpickles with
``weights_only=False`` any weight or constant the archive flags as pickled,
custom and opaque objects, sample inputs that fail a weights-only load, and
archives of the older format; it also loads AOTInductor native code.
:func:`scan_export_archive` refuses all of these before torch sees the file,
and :func:`load_teacher_file` refuses graphs that call anything but torch
operators and the builtins export itself uses.
"""

from __future__ import annotations

import io
import json
import operator
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdtune.core.data import DatasetSplits, TensorSplit
from kdtune.errors import ConfigError

#: File suffixes of the teacher formats.
EXPORT_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".jit", ".pth")


def teacher_file_kind(path: str | Path, field: str = "teacher.file") -> str:
    """"export" or "torchscript" from the file's suffix; a :class:`ConfigError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        return "export"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise ConfigError(field, f"{path}: unknown teacher file type {suffix or '(no suffix)'}; allowed: .pt2 "
                             f"(torch.export.save) or {', '.join(TORCHSCRIPT_SUFFIXES)} (torch.jit.save)")


# --------------------------------------------------------------------------- torch.export archives

#: Archive members torch.export.load reads without unpickling, under the archive's folder.
_PLAIN_MEMBERS = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")


def scan_export_archive(content: bytes, name: str = "teacher.pt2", field: str = "teacher.file") -> None:
    """Refuse a ``torch.export`` archive whose loading would unpickle or run code.

    ``torch.export.load`` (torch 2.14) calls ``torch.load(weights_only=False)`` on
    weights and constants flagged ``use_pickle``, ``pickle.loads`` on opaque
    constants, the TorchScript unpickler on custom objects, falls back to
    ``weights_only=False`` for sample inputs that fail a weights-only load and for
    archives of the older format, and loads AOTInductor shared libraries. Every
    member must be one torch reads as JSON, text or raw tensor bytes, or a sample
    input that loads with ``weights_only=True``; the error names the member.
    """
    def refuse(member: str, why: str) -> ConfigError:
        return ConfigError(field, f"{name}: refused to load: archive entry {member!r} {why}; kdtune loads only "
                                  f"archives whose weights and constants are plain tensors (torch.export.save of "
                                  f"a plain nn.Module)")

    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise ConfigError(field, f"{name}: not a torch.export archive (not a zip file)") from None
    members = [info.filename for info in archive.infolist() if not info.is_dir()]
    roots = {PurePosixPath(m).parts[0] for m in members if len(PurePosixPath(m).parts) > 1}
    if len(roots) != 1 or any(len(PurePosixPath(m).parts) < 2 for m in members):
        flat = next((m for m in members if len(PurePosixPath(m).parts) < 2), members[0] if members else "")
        raise refuse(flat, "is outside the archive's folder: this is the older torch.export format, which torch "
                           "loads with weights_only=False")
    (root,) = roots

    def inner(member: str) -> str:
        return str(PurePosixPath(*PurePosixPath(member).parts[1:]))

    names = {inner(m): m for m in members}
    models = [n[len("models/"):-len(".json")] for n in names if n.startswith("models/") and n.endswith(".json")]
    if not models:
        raise ConfigError(field, f"{name}: not a torch.export archive (no models/*.json)")
    allowed: set[str] = set(_PLAIN_MEMBERS) | {f"models/{m}.json" for m in models}
    for model in models:
        for kind, folder in (("weights", "data/weights"), ("constants", "data/constants")):
            config_name = f"{folder}/{model}_{kind}_config.json"
            if f"{folder}/{model}.pt" in names:
                raise refuse(names[f"{folder}/{model}.pt"], "is a legacy pickled state dict, which torch loads with "
                                                           "weights_only=False")
            if config_name not in names:
                raise ConfigError(field, f"{name}: not a torch.export archive kdtune can read (no {config_name})")
            allowed.add(config_name)
            try:
                config = json.loads(archive.read(names[config_name]))["config"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(field, f"{name}: {config_name} is not a payload config") from None
            for fqn, meta in config.items():
                path_name = str(meta.get("path_name", ""))
                member = f"{folder}/{path_name}"
                if meta.get("use_pickle"):
                    raise refuse(names.get(member, member), f"({kind[:-1]} {fqn!r}) is flagged as pickled, which "
                                                            f"torch loads with weights_only=False")
                if kind == "constants" and not path_name.startswith("tensor_"):
                    raise refuse(names.get(member, member), f"(constant {fqn!r}) is a custom or opaque object, "
                                                            f"which torch unpickles")
                allowed.add(member)
        sample = f"data/sample_inputs/{model}.pt"
        if sample in names:
            try:
                torch.load(io.BytesIO(archive.read(names[sample])), weights_only=True)
            except Exception:  # noqa: BLE001 - whatever fails here, torch would retry unrestricted
                raise refuse(names[sample], "is not loadable with weights_only=True, and torch would then load it "
                                            "with weights_only=False") from None
            allowed.add(sample)
    for member_inner, member in names.items():
        if member_inner in allowed or member_inner.startswith("extra/"):
            continue
        if member_inner.startswith("data/aotinductor/"):
            raise refuse(member, "is AOTInductor compiled code, which torch loads as a native library")
        raise refuse(member, f"is not part of a torch.export archive of plain tensors (under {root}/)")


def _allowed_graph_target(target: Any) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return True
    return getattr(target, "__module__", None) in ("_operator", "operator", "math") or target is operator.getitem


class ExportedTeacher(nn.Module):
    """The module of an exported program. Its mode (eval: BatchNorm's running
    statistics, no dropout) is the one it was exported in, and torch refuses
    ``eval()``/``train()`` on it, so this wrapper keeps them from reaching it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.exported = module
        self.training = False

    def train(self, mode: bool = True) -> "ExportedTeacher":
        self.training = mode  # the exported graph's mode is fixed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exported(x)


def _load_export(content: bytes, name: str, field: str) -> nn.Module:
    scan_export_archive(content, name, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(content))
    except Exception as exc:  # noqa: BLE001 - a malformed archive can raise anything
        raise ConfigError(field, f"{name}: torch.export.load failed ({type(exc).__name__}: {exc})") from None
    # The deserializer resolves call targets by name in torch, operator and math:
    # anything but an operator (torch.os.system, torch.hub.load) is refused before it runs.
    bad = [str(node.target) for node in program.graph.nodes
           if node.op == "call_function" and not _allowed_graph_target(node.target)]
    if bad:
        raise ConfigError(field, f"{name}: refused to run: its graph calls {bad[0]}, which is not a torch operator")
    return ExportedTeacher(program.module())


def _load_torchscript(content: bytes, name: str, field: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.14: "deprecated. Please switch to torch.export"
            return torch.jit.load(io.BytesIO(content), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - anything torch.jit.load raises means "not TorchScript"
        hint = " (a state_dict or a pickled model is not a TorchScript file: save it with torch.jit.save)" \
            if zipfile.is_zipfile(io.BytesIO(content)) else ""
        raise ConfigError(field, f"{name}: not a readable TorchScript file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from None


def load_teacher_file(path: str | Path, field: str = "teacher.file") -> nn.Module:
    """The network in a ``torch.export`` archive (``.pt2``) or TorchScript file, in
    eval mode on the CPU. The file is read once into memory and loaded from there,
    so what was scanned is what is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"{path} does not exist or is not a file")
    kind = teacher_file_kind(path, field)
    content = path.read_bytes()
    model = _load_export(content, str(path), field) if kind == "export" else _load_torchscript(content, str(path), field)
    return model.eval()


def check_teacher_output(model: nn.Module, data: DatasetSplits, name: str, field: str = "teacher.file") -> None:
    """Run ``model`` on two and three training samples and check it gives ``(batch,
    num_classes)`` logits (both sizes: an archive exported with a fixed batch size fails)."""
    for size in (2, 3):
        x = data.train.x[:size]
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:  # noqa: BLE001 - the user's network can raise anything
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(field, f"{name}: running it on a batch of {size} samples of shape "
                                     f"{tuple(data.input_shape)} failed ({type(exc).__name__}: {first}); it must take "
                                     f"(batch, *sample shape) inputs with a dynamic batch size (torch.export: "
                                     f"dynamic_shapes=({{0: torch.export.Dim('batch')}},))") from None
        expected = (len(x), data.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(field, f"{name}: gives {got} for a batch of {len(x)}; expected logits of shape "
                                     f"{expected} (batch, num_classes) for dataset {data.name!r}")


# --------------------------------------------------------------------------- precomputed logits


@dataclass
class LogitsTeacher:
    """A precomputed-logits teacher aligned with kdtune's split: ``train_logits`` row i
    belongs to training sample i; validation accuracy and loss when the file has them."""

    train_logits: np.ndarray
    val_acc: float | None
    val_loss: float | None


def _aligned(ids: np.ndarray, logits: np.ndarray, wanted: torch.Tensor | None, split: str, keys: tuple[str, str],
             path: Path, field: str) -> np.ndarray:
    """The rows of ``logits`` for the sample indices ``wanted``, in their order."""
    id_key, logits_key = keys
    if wanted is None:
        raise ConfigError(field, f"{path}: the dataset does not record each sample's index (TensorSplit.index), "
                                 f"so precomputed logits cannot be matched to its {split} split; use a dataset "
                                 f"that does (the built-ins and arrays do) or a teacher file")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(field, f"{path}: {id_key} must be a 1-D integer array of sample indices, got "
                                 f"{ids.dtype} {ids.shape}")
    if logits.ndim != 2 or len(logits) != len(ids):
        raise ConfigError(field, f"{path}: {logits_key} must be ({len(ids)}, num_classes), one row per "
                                 f"{id_key} entry, got {logits.shape}")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1]
        raise ConfigError(field, f"{path}: {id_key} repeats {len(repeated)} sample index(es) "
                                 f"({', '.join(map(str, repeated[:5]))}{', …' if len(repeated) > 5 else ''})")
    wanted_ids = wanted.numpy()
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    position = np.clip(np.searchsorted(sorted_ids, wanted_ids), 0, max(len(ids) - 1, 0))
    found = (sorted_ids[position] == wanted_ids) if len(ids) else np.zeros(len(wanted_ids), dtype=bool)
    if not found.all():
        missing = np.sort(wanted_ids[~found])
        raise ConfigError(field, f"{path}: {len(missing)} of the {len(wanted_ids)} samples of kdtune's {split} "
                                 f"split have no row in {id_key} (indices {', '.join(map(str, missing[:8]))}"
                                 f"{', …' if len(missing) > 8 else ''}); give logits for every sample of the "
                                 f"dataset (a superset is fine)")
    rows = logits[order[position]]
    if np.issubdtype(rows.dtype, np.floating) and not np.isfinite(rows).all():
        bad = np.sort(wanted_ids[~np.isfinite(rows).all(axis=1)])
        raise ConfigError(field, f"{path}: {logits_key} has NaN or infinite values for {len(bad)} sample(s) "
                                 f"(indices {', '.join(map(str, bad[:8]))}{', …' if len(bad) > 8 else ''})")
    return rows.astype(np.float32)


def load_teacher_logits(path: str | Path, data: DatasetSplits, field: str = "teacher.logits") -> LogitsTeacher:
    """Read a precomputed-logits file (see the module docstring) and align it with
    ``data``'s training split (and validation split, when it has ``val_*``).

    Checks the shape against ``(·, data.num_classes)``, that the values are finite
    and that every sample of the split has a row; raises :class:`ConfigError`
    saying which and how many samples are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"{path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ConfigError(field, f"{path}: a single array; expected a .npz holding index and logits")
            files = set(archive.files)
            missing = [key for key in ("index", "logits") if key not in files]
            if missing:
                raise ConfigError(field, f"{path}: missing {', '.join(missing)}; it holds {', '.join(sorted(files))}")
            arrays = {key: archive[key] for key in ("index", "logits", "val_index", "val_logits") if key in files}
    except ConfigError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(field, f"{path}: not a .npz of plain arrays ({type(exc).__name__}: {exc})") from None
    if ("val_index" in arrays) != ("val_logits" in arrays):
        raise ConfigError(field, f"{path}: holds only one of val_index and val_logits; give both or neither")
    for key in ("logits", "val_logits"):
        if key in arrays:
            logits = arrays[key]
            if not np.issubdtype(logits.dtype, np.floating) or logits.ndim != 2 or logits.shape[1] != data.num_classes:
                raise ConfigError(field, f"{path}: {key} must be floats of shape (samples, {data.num_classes}) for "
                                         f"dataset {data.name!r} with {data.num_classes} classes, got "
                                         f"{logits.dtype} {logits.shape}")
    train = _aligned(arrays["index"], arrays["logits"], data.train.index, "training", ("index", "logits"), path, field)
    val_acc = val_loss = None
    if "val_index" in arrays:
        val = _aligned(arrays["val_index"], arrays["val_logits"], data.val.index, "validation",
                       ("val_index", "val_logits"), path, field)
        val_acc, val_loss = logits_accuracy(val, data.val)
    return LogitsTeacher(train, val_acc, val_loss)


def logits_accuracy(logits: np.ndarray, split: TensorSplit) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``logits`` against ``split``'s labels."""
    tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    loss = torch.nn.functional.cross_entropy(tensor, split.y).item()
    return float((tensor.argmax(dim=1) == split.y).float().mean().item()), float(loss)


# --------------------------------------------------------------------------- what each teacher source allows


def teacher_source(config: Any) -> str:
    """"logits", "file", "checkpoint" or "trained": where a teacher config's outputs come from."""
    for kind in ("logits", "file", "checkpoint"):
        if getattr(config, kind, None):
            return kind
    return "trained"


def check_teacher_features(configs: Sequence[Any], with_features: bool, field: str = "teacher") -> None:
    """Feature distillation (beta > 0) needs the first teacher's penultimate features,
    which only a teacher kdtune builds from a family has."""
    if not with_features or not configs:
        return
    source = teacher_source(configs[0])
    if source in ("logits", "file"):
        raise ConfigError(f"{field}.{source}", f"a teacher given as {source} has no features, and space.beta > 0 "
                                               f"(feature distillation) needs them; set beta: 0, or give this "
                                               f"teacher as family + checkpoint so kdtune can read its "
                                               f"penultimate features")


def check_logits_without_augmentation(configs: Sequence[Any], augmentation: Any, field: str = "teacher") -> None:
    """Refuse a precomputed-logits teacher together with input augmentation.

    Logits hold one row per sample, computed on the unaugmented input; a student
    trained on a flipped or cropped sample would learn the teacher's answer for
    another input. To be called wherever augmentation is configured (``augmentation``
    truthy means some augmentation is on).
    """
    if not augmentation:
        return
    for index, config in enumerate(configs):
        if teacher_source(config) == "logits":
            where = field if len(configs) == 1 else f"{field}[{index}]"
            raise ConfigError(f"{where}.logits", "precomputed logits cannot follow augmented inputs (one row per "
                                                 "sample, computed without augmentation); turn augmentation off, or "
                                                 "give the teacher as a file (teacher.file: a TorchScript or "
                                                 "torch.export file) or as family + checkpoint, so that kdtune runs "
                                                 "it on the augmented inputs")
