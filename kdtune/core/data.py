"""Datasets as in-memory tensors with a fixed, seeded train/validation/test split.

Every dataset is loaded whole into CPU tensors once, split with
``numpy.random.default_rng(seed)`` and normalized with statistics of the
*training* split only, so that the validation and test splits leak nothing into
training. The same name, root, seed and fractions always give the same tensors,
and :attr:`DatasetSplits.fingerprint` identifies them for cache keys.

Built-in datasets (``DATASETS.names()``):

- ``digits``: scikit-learn's bundled 8×8 digits (pixels/16), no files needed.
  Test and validation splits are carved from the whole set, stratified by class.
- ``mnist``, ``fashion_mnist``: the four IDX files, either gzipped as
  distributed in ``root`` itself (Debian's ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist/``) or unpacked in torchvision's layout
  ``root/MNIST/raw/`` or ``root/FashionMNIST/raw/``; read by
  :mod:`kdtune.core.idx_files`. Official test split; validation carved from the
  official training set.
- ``cifar10``, ``cifar100``: the python-version batch files under
  ``root/cifar-10-batches-py/`` or ``root/cifar-100-python/`` (fine labels),
  read with an unpickler that can only rebuild numpy arrays.
- ``imagefolder``: ``root/<class>/<image>`` (split like digits) or
  ``root/train/<class>/...`` plus ``root/test/<class>/...`` (official test
  split), converted to RGB and resized to ``image_size`` square (default 32).
- ``arrays``: your own arrays in a ``.npz`` file (:mod:`kdtune.core.arrays`):
  images, vectors or sequences.

Adding a dataset is one decorated function that returns :func:`make_splits`::

    @DATASETS.register("my_data")
    def my_data(root, *, seed, val_fraction, test_fraction, download, image_size): ...
"""

from __future__ import annotations

import codecs
import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdtune.errors import ConfigError
from kdtune.core.idx_files import MNIST_FILE_NAMES, find_mnist_files, mnist_file_candidates, read_idx
from kdtune.registry import Registry

DatasetLoader = Callable[..., "DatasetSplits"]

DATASETS: Registry[DatasetLoader] = Registry("dataset")

DATASETS_NEEDING_ROOT: frozenset[str] = frozenset(
    {"mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "arrays"}
)

DEFAULT_IMAGE_SIZE = 32
_DOWNLOAD_HINT = "set download: true to fetch it (needs internet)"


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split: normalized inputs ``x`` float32 and class labels ``y`` (N,) int64.

    ``x`` is (N, C, H, W) for images, (N, D) for vectors or sequences, or any
    (N, ...) a model family accepts. ``index`` (optional, (N,) int64) is each
    sample's index in the dataset as the user has it (its training pool or its
    test set), which a precomputed-logits teacher is keyed by; it is not part of
    the data's fingerprint (the split seed and parameters are).

    Compare splits by their tensors (``torch.equal``); ``==`` is identity.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() < 2:
            raise ValueError(f"x must be float32 (N, ...) such as (N, C, H, W) or (N, D), got {self.x.dtype} "
                             f"{tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or tuple(self.y.shape) != (self.x.shape[0],):
            raise ValueError(
                f"y must be int64 ({self.x.shape[0]},) to match x, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.index is not None and (self.index.dtype != torch.int64 or tuple(self.index.shape) != tuple(self.y.shape)):
            raise ValueError(f"index must be int64 ({self.x.shape[0]},) to match x, got {self.index.dtype} "
                             f"{tuple(self.index.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset's three splits plus what a model needs to know about them.

    ``fingerprint`` is the sha256 hex of the dataset name, the split parameters
    and the bytes of every split's tensors: equal fingerprints mean equal data,
    so it is the dataset's part of any cache key. Compare splits by fingerprint.
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    #: One sample's shape: (C, H, W) for images, (D,) for vectors, ...
    input_shape: tuple[int, ...]
    fingerprint: str


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    download: bool = False,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load dataset ``name`` and split it into train/val/test with ``seed``.

    ``val_fraction`` is the share of the training pool held out for validation;
    ``test_fraction`` is the share of the whole set held out for testing and is
    used only by datasets without an official test split (digits, flat
    imagefolder), though it must be valid everywhere. Both lie in (0, 1) with a
    sum below 1. ``root`` is the data folder of file-based datasets
    (``DATASETS_NEEDING_ROOT``); ``download`` lets mnist, fashion_mnist and
    cifar fetch missing files; ``image_size`` applies to imagefolder only.

    Raises :class:`ConfigError` for an unknown name, bad fractions or seed, or a
    root that lacks the dataset's files (before reading anything large).
    """
    loader = DATASETS.get(name)
    _check_seed(seed)
    _check_fractions(val_fraction, test_fraction)
    return loader(
        root,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        download=download,
        image_size=image_size,
    )


def make_splits(
    name: str,
    train: TensorSplit,
    val: TensorSplit,
    test: TensorSplit,
    *,
    num_classes: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    image_size: int | None,
) -> DatasetSplits:
    """Bundle three splits into a :class:`DatasetSplits`, computing its input shape and fingerprint."""
    shapes = {tuple(split.x.shape[1:]) for split in (train, val, test)}
    if len(shapes) != 1:
        raise ValueError(f"{name}: splits have different image shapes {sorted(shapes)}")
    digest = hashlib.sha256()
    params = f"kdtune-data-v1|{name}|seed={seed}|val={val_fraction!r}|test={test_fraction!r}|size={image_size}"
    digest.update(params.encode())
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        for tensor in (split.x, split.y):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"|{split_name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(memoryview(array).cast("B"))
    (input_shape,) = shapes
    return DatasetSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=input_shape,  # type: ignore[arg-type]
        fingerprint=digest.hexdigest(),
    )


def subset_indices(
    n: int, size: int | None, seed: int, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """A seeded subset of ``range(n)`` with ``size`` elements, as sorted int64 indices.

    With ``labels`` (length ``n``) the subset is stratified: every class gets
    the floor or the ceiling of its proportional share of ``size``. ``size``
    None means all ``n`` indices. Raises ``ConfigError("train_subset", ...)``
    unless ``1 <= size <= n``.
    """
    if size is None:
        return torch.arange(n, dtype=torch.int64)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= n:
        raise ConfigError(
            "train_subset",
            f"must be an integer from 1 to {n} (the number of training examples) or null for all, got {size!r}",
        )
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    if labels is None:
        chosen = rng.choice(n, size=int(size), replace=False)
    else:
        label_array = labels.detach().cpu().numpy()
        if label_array.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {label_array.shape}")
        chosen, _rest = _stratified_split(label_array, [int(size)], rng)
    return torch.from_numpy(np.sort(chosen).astype(np.int64))


def transfer_set_problem(unlabelled: Any, train_subset: int | None) -> str | None:
    """What is wrong with a transfer-set setting (``unlabelled``, with ``train_subset``) before any
    data is read, or None: the one statement of the rule, for the spec and for :class:`RunConfig`.
    Whether the number fits the training split is :func:`unlabelled_indices`'s check."""
    if unlabelled is None:
        return None
    if unlabelled != "all" and (isinstance(unlabelled, bool) or not isinstance(unlabelled, (int, np.integer))
                                or unlabelled < 1):
        return f"must be an integer >= 1, 'all' or null, got {unlabelled!r}"
    if train_subset is None:
        return ("needs train_subset: the labelled images a student sees; the unlabelled ones are drawn from "
                "the rest of the training split")
    return None


def unlabelled_indices(n: int, labelled: np.ndarray | torch.Tensor, size: int | str | None, seed: int) -> np.ndarray:
    """The transfer set's unlabelled images: ``size`` training indices outside ``labelled`` (the
    student's ``train_subset``), or all of them for ``"all"``, sorted; empty for None.

    A plain seeded sample, not stratified: stratifying would read the labels the student may
    not see. The draw uses its own stream (``seed`` + 1), so the labelled subset of a seed is
    the same with or without a transfer set. Raises ``ConfigError("unlabelled", ...)`` unless
    ``size`` is None, ``"all"`` or an integer from 1 to the images outside the subset.
    """
    rest = np.setdiff1d(np.arange(n), np.asarray(labelled))
    if size is None:
        return rest[:0]
    if size == "all":
        return rest
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= len(rest):
        raise ConfigError("unlabelled", f"must be an integer from 1 to {len(rest)} (the training images outside "
                                        f"train_subset), 'all' or null, got {size!r}")
    _check_seed(seed)
    chosen = np.random.default_rng(seed + 1).choice(len(rest), size=int(size), replace=False)
    return np.sort(rest[chosen])


def student_images(n: int, train_subset: int | None, unlabelled: int | str | None, seed: int,
                   labels: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training images a student learns from: ``(labelled, unlabelled)`` sorted indices, the
    :func:`subset_indices` of ``train_subset`` (stratified by ``labels``) and the
    :func:`unlabelled_indices` of the transfer set outside it (empty without one)."""
    labelled = subset_indices(n, train_subset, seed, labels=labels).numpy()
    return labelled, unlabelled_indices(n, labelled, unlabelled, seed)


def check_dataset_root(name: str, root: str | None, download: bool = False) -> None:
    """Check cheaply that ``root`` holds dataset ``name``'s files; never loads data.

    Raises ``ConfigError("data.root", ...)`` saying which files are expected
    when the dataset needs a root and it is unset or lacks them. With
    ``download`` the files may be missing (they will be fetched), but a root is
    still needed to put them in. Datasets that need no root accept any. A loader
    with a ``check_root(root, download)`` attribute (``arrays``, a plugin's) checks
    its own root.
    """
    own_check = getattr(DATASETS.get(name), "check_root", None)
    if own_check is not None:
        own_check(root, download)
        return
    if name not in DATASETS_NEEDING_ROOT:
        return
    if name == "imagefolder":
        _check_imagefolder_root(root, download)
        return
    required = _REQUIRED_FILES[name]
    expected = ", ".join(required)
    if root is None:
        raise ConfigError(
            "data.root",
            f"dataset {name!r} is read from files and data.root is not set; expected {expected} "
            f"under data.root; set data.root, and download: true to fetch it there (needs internet)",
        )
    base = Path(root).expanduser()
    if download:
        if base.exists() and not base.is_dir():
            raise ConfigError("data.root", f"{base.absolute()} is a file; {name} needs a folder to download into")
        return
    if name in _MNIST_CLASSES:
        _check_mnist_root(name, base)
        return
    missing = [path for path in required if not (base / path).is_file()]
    if missing:
        which = "" if len(missing) == len(required) else f" (missing {', '.join(missing)})"
        raise ConfigError(
            "data.root",
            f"{base.absolute()} lacks the {name} files{which}; expected {expected} under it "
            f"(data.root is the folder that contains {Path(required[0]).parts[0]}/); {_DOWNLOAD_HINT}",
        )


def _check_mnist_root(name: str, base: Path) -> None:
    """Raise naming both accepted layouts unless all four IDX files of ``name`` lie under ``base``."""
    folder = _MNIST_CLASSES[name]
    if find_mnist_files(base, folder) is not None:
        return
    missing = [
        file for file, candidates in mnist_file_candidates(base, folder).items()
        if not any(p.is_file() for p in candidates)
    ]
    which = "" if len(missing) == len(MNIST_FILE_NAMES) else f" (missing {', '.join(missing)})"
    hint = " (on Debian: apt-get install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    raise ConfigError(
        "data.root",
        f"{base.absolute()} lacks the {name} IDX files{which}; expected either the files as distributed, "
        f"{', '.join(f + '.gz' for f in MNIST_FILE_NAMES)}, in data.root itself{hint}, or torchvision's "
        f"unpacked layout {', '.join(_REQUIRED_FILES[name])} under it; {_DOWNLOAD_HINT}",
    )


# --- splitting --------------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for field, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ConfigError(field, f"must be a number strictly between 0 and 1, got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            "data.val_fraction",
            f"val_fraction + test_fraction must be below 1 to leave training data, got "
            f"{val_fraction} + {test_fraction}",
        )


def _count_for(n: int, fraction: float) -> int:
    # Rounded up like scikit-learn's train_test_split; the epsilon keeps 100 * 0.2 at 20.
    return min(n, math.ceil(n * fraction - 1e-9))


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``counts``: each gets floor or ceil of its share."""
    scaled = counts.astype(np.int64) * total
    pool = int(counts.sum())
    shares = scaled // pool
    # Largest remainders get the leftover units; exact integer remainders avoid float ties,
    # and a seeded random order breaks the real ties so low class ids are not favoured.
    leftover = total - int(shares.sum())
    order = np.lexsort((rng.permutation(len(counts)), -(scaled % pool)))
    shares[order[:leftover]] += 1
    return shares


def _stratified_split(
    labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Carve parts of the given sizes from ``range(len(labels))``, stratified by label.

    Returns one sorted index array per size, then the sorted remainder.
    """
    _classes, class_of = np.unique(labels, return_inverse=True)
    members = [rng.permutation(np.flatnonzero(class_of == k)) for k in range(len(_classes))]
    remaining = np.array([len(m) for m in members], dtype=np.int64)
    taken = np.zeros_like(remaining)
    parts = []
    for size in sizes:
        counts = _allocate(remaining, size, rng)
        parts.append(
            np.sort(np.concatenate([m[t : t + c] for m, t, c in zip(members, taken, counts)]))
        )
        taken += counts
        remaining -= counts
    parts.append(np.sort(np.concatenate([m[t:] for m, t in zip(members, taken)])))
    return parts


def _seeded_split(
    name: str,
    labels: np.ndarray,
    seed: int,
    val_fraction: float,
    test_fraction: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Train/val(/test) indices of a labelled pool; ``test_fraction`` None means an official test split exists."""
    n = len(labels)
    n_test = 0 if test_fraction is None else _count_for(n, test_fraction)
    n_val = _count_for(n, val_fraction)
    if n - n_test - n_val < 1 or n_val < 1:
        raise ConfigError(
            "data.val_fraction",
            f"{name} has {n} examples to split, too few for val_fraction={val_fraction}"
            + ("" if test_fraction is None else f" and test_fraction={test_fraction}")
            + ": every split needs at least one example",
        )
    rng = np.random.default_rng(seed)
    if test_fraction is None:
        val_idx, train_idx = _stratified_split(labels, [n_val], rng)
        return train_idx, val_idx, None
    test_idx, val_idx, train_idx = _stratified_split(labels, [n_test, n_val], rng)
    return train_idx, val_idx, test_idx


def _standardize(train: np.ndarray, others: Sequence[np.ndarray], per_channel: bool) -> list[torch.Tensor]:
    """Scale uint8 (N, C, H, W) pixels to [0, 1], then standardize with the training split's statistics.

    The std is the population std over all training pixels (of each channel when
    ``per_channel``); a constant channel keeps std 1 instead of dividing by zero.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    groups = [train[:, c] for c in range(train.shape[1])] if per_channel else [train]
    means, stds = [], []
    for values in groups:
        # A histogram of the 256 levels gives exact statistics without a float copy of the data.
        counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
        mean = float(counts @ levels / counts.sum())
        std = math.sqrt(float(counts @ (levels - mean) ** 2 / counts.sum()))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    mean_t = torch.tensor(means, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(stds, dtype=torch.float32).view(1, -1, 1, 1)
    return [torch.from_numpy(a).float().div_(255.0).sub_(mean_t).div_(std_t) for a in (train, *others)]


def _splits_from_uint8(
    name: str,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test: tuple[np.ndarray, np.ndarray] | None,
    *,
    num_classes: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    image_size: int | None,
    per_channel: bool,
) -> DatasetSplits:
    """Split a uint8 pool (and an official test set, if any), normalize from train, and bundle."""
    if test is None:
        train_idx, val_idx, test_idx = _seeded_split(name, pool_y, seed, val_fraction, test_fraction)
        test_x, test_y = pool_x[test_idx], pool_y[test_idx]
    else:
        train_idx, val_idx, _none = _seeded_split(name, pool_y, seed, val_fraction, None)
        test_x, test_y = test
        test_idx = np.arange(len(test_y))
    train_t, val_t, test_t = _standardize(pool_x[train_idx], [pool_x[val_idx], test_x], per_channel)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return make_splits(
        name,
        TensorSplit(train_t, labels(pool_y[train_idx]), labels(train_idx)),
        TensorSplit(val_t, labels(pool_y[val_idx]), labels(val_idx)),
        TensorSplit(test_t, labels(test_y), labels(test_idx)),
        num_classes=num_classes,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        image_size=image_size,
    )


def _reject_image_size(name: str, image_size: int | None) -> None:
    if image_size is not None:
        raise ConfigError(
            "data.image_size",
            f"only the imagefolder dataset resizes images; {name} has a fixed size, so leave image_size unset",
        )


def _check_label_range(name: str, where: Path, y: np.ndarray, num_classes: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            "data.root",
            f"{where}: labels must lie in 0..{num_classes - 1} for {name}, found {int(y.min())}..{int(y.max())}",
        )


# --- digits -----------------------------------------------------------------------------------


@DATASETS.register("digits")
def _load_digits(
    root: str | None,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """scikit-learn's bundled 8×8 digits as (1, 8, 8) pixels/16; ``root`` and ``download`` are ignored."""
    from sklearn.datasets import load_digits

    _reject_image_size("digits", image_size)
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, val_idx, test_idx = _seeded_split("digits", y, seed, val_fraction, test_fraction)
    assert test_idx is not None

    def split(idx: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), torch.from_numpy(idx.astype(np.int64)))

    return make_splits(
        "digits",
        split(train_idx),
        split(val_idx),
        split(test_idx),
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        image_size=image_size,
    )


# --- MNIST / Fashion-MNIST --------------------------------------------------------------------

_MNIST_FILES = MNIST_FILE_NAMES
# torchvision reads root/<its class name>/raw/.
_MNIST_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _load_mnist_like(
    name: str, root: str | None, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    _reject_image_size(name, image_size)
    check_dataset_root(name, root, download)
    assert root is not None
    base = Path(root).expanduser()
    folder = _MNIST_CLASSES[name]
    files = find_mnist_files(base, folder)
    if files is None:  # only with download (check_dataset_root passed): fetch into torchvision's layout
        _download_mnist_like(name, base)
        files = find_mnist_files(base, folder)
        assert files is not None
    arrays = []
    for split in ("train", "t10k"):
        images_path, labels_path = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
        x, y = read_idx(images_path), read_idx(labels_path)
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(
                "data.root",
                f"{images_path}, {labels_path}: {x.dtype} images of shape {x.shape} and {y.dtype} labels of shape "
                f"{y.shape}; expected uint8 (N, H, W) images and N labels",
            )
        y = y.astype(np.int64)
        _check_label_range(name, labels_path, y, 10)
        arrays.append((x[:, None], y))
    (pool_x, pool_y), test_xy = arrays
    return _splits_from_uint8(
        name, pool_x, pool_y, test_xy, num_classes=10, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, image_size=image_size, per_channel=False,
    )


def _download_mnist_like(name: str, base: Path) -> None:
    """Fetch the files with torchvision (its mirrors and checksums) into ``base/<Class>/raw/``."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, _MNIST_CLASSES[name])
    try:
        dataset_class(str(base), train=True, download=True)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            "data.download",
            f"downloading {name} into {base.absolute()} failed ({type(exc).__name__}: {exc}); "
            f"check the internet connection or put the IDX files there yourself",
        ) from None


@DATASETS.register("mnist")
def _load_mnist(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """MNIST from its IDX files (``.gz`` in ``root``, or unpacked in ``root/MNIST/raw/``): official test split, val carved from train."""
    return _load_mnist_like("mnist", root, seed, val_fraction, test_fraction, download, image_size)


@DATASETS.register("fashion_mnist")
def _load_fashion_mnist(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """Fashion-MNIST from its IDX files (``.gz`` in ``root``, or unpacked in ``root/FashionMNIST/raw/``): official test split, val carved from train."""
    return _load_mnist_like("fashion_mnist", root, seed, val_fraction, test_fraction, download, image_size)


# --- CIFAR ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    torchvision_class: str


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10,
        "CIFAR10",
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "fine_labels", 100, "CIFAR100"),
}

_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    **{name: tuple(f"{folder}/raw/{f}" for f in _MNIST_FILES) for name, folder in _MNIST_CLASSES.items()},
    **{
        name: tuple(f"{layout.folder}/{f}" for f in layout.train_files + layout.test_files)
        for name, layout in _CIFAR_LAYOUTS.items()
    },
}


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle may name: numpy's array and scalar rebuilders.

    Pickles name them by module path, which moved from numpy.core to numpy._core
    in numpy 2, so both spellings map to the same objects.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(text, "latin1") under pickle protocol 2.
        ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # arrays pickled with protocol 5
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_ALLOWED_PICKLE_GLOBALS = _numpy_pickle_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files that refuses every global except numpy's array rebuilders.

    A pickle can name any importable callable and have it called while loading
    (``os.system`` via ``__reduce__``); refusing unknown globals means a planted
    or corrupted batch file cannot run code, only fail to load.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: CIFAR batch files may contain only numpy arrays, "
                "lists and dicts"
            ) from None


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one python-version CIFAR batch file."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # a malformed pickle can raise almost any exception type
        raise ConfigError(
            "data.root", f"{path}: not a readable CIFAR batch file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(entry, dict):
        raise ConfigError("data.root", f"{path}: expected a pickled dict, found {type(entry).__name__}")
    # Python 2 pickles read with latin1 have str keys; Python 3 pickles have bytes keys.
    fields = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in fields or label_key not in fields:
        raise ConfigError(
            "data.root", f"{path}: expected keys b'data' and b'{label_key}', found {sorted(map(str, fields))}"
        )
    data = fields["data"]
    labels = np.asarray(fields[label_key])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (data.shape[0],)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        shape = getattr(data, "shape", None)
        raise ConfigError(
            "data.root",
            f"{path}: expected b'data' uint8 (N, 3072) and N integer b'{label_key}', found data "
            f"{getattr(data, 'dtype', type(data).__name__)} {shape} and {labels.shape} labels",
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar(
    name: str, root: str | None, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    _reject_image_size(name, image_size)
    check_dataset_root(name, root, download)
    assert root is not None
    layout = _CIFAR_LAYOUTS[name]
    base = Path(root).expanduser()
    folder = base / layout.folder
    if download and not all((base / f).is_file() for f in _REQUIRED_FILES[name]):
        _download_cifar(name, layout, base)

    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        batches = [_read_cifar_batch(folder / f, layout.label_key) for f in files]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        _check_label_range(name, folder, y, layout.num_classes)
        return x, y

    pool_x, pool_y = read(layout.train_files)
    test_xy = read(layout.test_files)
    return _splits_from_uint8(
        name, pool_x, pool_y, test_xy, num_classes=layout.num_classes, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, image_size=image_size, per_channel=True,
    )


def _download_cifar(name: str, layout: _CifarLayout, base: Path) -> None:
    """Fetch and unpack the archive with torchvision's URL and checksum, without its unrestricted unpickling."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        download_and_extract_archive(source.url, str(base), filename=source.filename, md5=source.tgz_md5)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(
            "data.download",
            f"downloading {name} into {base.absolute()} failed ({type(exc).__name__}: {exc}); "
            f"check the internet connection or put {layout.folder}/ there yourself",
        ) from None


@DATASETS.register("cifar10")
def _load_cifar10(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py/``: official test split, val carved from train."""
    return _load_cifar("cifar10", root, seed, val_fraction, test_fraction, download, image_size)


@DATASETS.register("cifar100")
def _load_cifar100(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python/``: official test split, val carved from train."""
    return _load_cifar("cifar100", root, seed, val_fraction, test_fraction, download, image_size)


# --- image folders ----------------------------------------------------------------------------

_IMAGEFOLDER_LAYOUT = (
    "class folders of images (root/<class>/<image>.png), or root/train/<class>/... "
    "and root/test/<class>/..."
)


def _has_subfolder(path: Path) -> bool:
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def _has_split_folders(base: Path) -> bool:
    return (base / "train").is_dir() and (base / "test").is_dir()


def _check_imagefolder_root(root: str | None, download: bool) -> None:
    if download:
        raise ConfigError(
            "data.download", "the imagefolder dataset reads your own images and cannot be downloaded; "
            "set download: false"
        )
    if root is None:
        raise ConfigError("data.root", f"dataset 'imagefolder' needs data.root: a folder with {_IMAGEFOLDER_LAYOUT}")
    base = Path(root).expanduser()
    folders = [base / "train", base / "test"] if _has_split_folders(base) else [base]
    for folder in folders:
        if not _has_subfolder(folder):
            raise ConfigError(
                "data.root", f"{folder.absolute()} has no class folders; expected {_IMAGEFOLDER_LAYOUT}"
            )


def _check_image_size(image_size: int | None) -> int:
    if image_size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError("data.image_size", f"must be a positive integer (pixels per side), got {image_size!r}")
    return int(image_size)


def _scan_image_folder(path: Path) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError("data.root", f"{path.absolute()}: {exc}; expected {_IMAGEFOLDER_LAYOUT}") from None


def _read_images(samples: Sequence[tuple[str, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images as RGB uint8 (N, 3, size, size) plus labels, from (path, label) pairs."""
    from PIL import Image

    x = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    for i, (path, _label) in enumerate(samples):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as exc:
            raise ConfigError("data.root", f"{path}: cannot read image ({exc})") from None
        x[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    y = np.array([label for _path, label in samples], dtype=np.int64)
    return x, y


@DATASETS.register("imagefolder")
def _load_imagefolder(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """Class folders of images, resized to ``image_size`` square RGB, normalized per channel from train.

    With ``root/train`` and ``root/test`` those are the training pool and the
    official test split; otherwise ``root`` itself is split like digits. Class
    ids follow the sorted training class folder names.
    """
    size = _check_image_size(image_size)
    check_dataset_root("imagefolder", root, download)
    assert root is not None
    base = Path(root).expanduser()
    test_xy = None
    if _has_split_folders(base):
        train_folder = _scan_image_folder(base / "train")
        test_folder = _scan_image_folder(base / "test")
        unknown = sorted(set(test_folder.classes) - set(train_folder.classes))
        if unknown:
            raise ConfigError(
                "data.root",
                f"{(base / 'test').absolute()} has classes missing from train/: {', '.join(unknown)}; "
                "every test class needs training images",
            )
        # ImageFolder numbers each folder's classes on its own; map test classes to the training ids.
        to_train_id = {test_folder.class_to_idx[c]: train_folder.class_to_idx[c] for c in test_folder.classes}
        test_samples = [(path, to_train_id[label]) for path, label in test_folder.samples]
        test_xy = _read_images(test_samples, size)
    else:
        train_folder = _scan_image_folder(base)
    pool_x, pool_y = _read_images(train_folder.samples, size)
    return _splits_from_uint8(
        "imagefolder", pool_x, pool_y, test_xy, num_classes=len(train_folder.classes), seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, image_size=size, per_channel=True,
    )
