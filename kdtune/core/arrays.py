"""The ``arrays`` dataset: your own arrays from a ``.npz`` file.

``data.root`` is a ``.npz`` file (``numpy.savez``) holding

- ``x_train``: the inputs, one row per sample, any numeric dtype: images
  ``(N, C, H, W)`` or ``(N, H, W)`` (read as one channel), vectors ``(N, D)``,
  sequences ``(N, L)``, or any ``(N, ...)`` a model family accepts;
- ``y_train``: integer class labels ``(N,)`` in ``0..K-1`` (K = the largest label + 1);
- optionally ``x_test`` and ``y_test`` (both or neither): an official test split.
  Without them the test split is carved from the training arrays like digits'.

The file is read with ``numpy.load(allow_pickle=False)``: an object array (a
pickle) is refused, never unpickled. Validation (and test, when carved) splits
are seeded and stratified by class like the built-in datasets'.

Normalisation uses the training split's statistics only: for inputs of rank 2
(``(N, D)``: vectors and sequences alike) each feature, i.e. each column, is
standardised on its own; for inputs of rank 3 or more (images) each channel
(axis 1) is standardised over all its other axes, as for CIFAR. A constant
feature or channel is only centred. A sample's index in ``x_train`` is its
index for a precomputed-logits teacher.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from kdtune.core.data import DATASETS, DatasetSplits, TensorSplit, _seeded_split, make_splits
from kdtune.errors import ConfigError

#: The arrays a file must (and may) hold.
REQUIRED_KEYS = ("x_train", "y_train")
OPTIONAL_KEYS = ("x_test", "y_test")


def check_arrays_root(root: str | None, download: bool = False) -> None:
    """Cheap check that ``root`` names a readable file (the arrays are read later)."""
    if download:
        raise ConfigError("data.download", "the arrays dataset reads your own .npz file and cannot be "
                                           "downloaded; set download: false")
    if root is None:
        raise ConfigError("data.root", "dataset 'arrays' needs data.root: a .npz file holding x_train and "
                                       "y_train (optionally x_test and y_test)")
    path = Path(root).expanduser()
    if not path.is_file():
        raise ConfigError("data.root", f"{path.absolute()} does not exist or is not a file; dataset 'arrays' "
                                       f"reads a .npz file holding x_train and y_train")


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file, without unpickling anything; checks their keys,
    shapes and values (a :class:`ConfigError` on ``data.root`` naming the file)."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ConfigError("data.root", f"{path}: a single .npy array; expected a .npz file holding "
                                               f"x_train and y_train (numpy.savez)")
            missing = [key for key in REQUIRED_KEYS if key not in archive.files]
            if missing:
                raise ConfigError("data.root", f"{path}: missing {', '.join(missing)}; it holds "
                                               f"{', '.join(archive.files) or 'nothing'}")
            arrays = {key: archive[key] for key in REQUIRED_KEYS + OPTIONAL_KEYS if key in archive.files}
    except ConfigError:
        raise
    except ValueError as exc:
        # numpy says "Object arrays cannot be loaded when allow_pickle=False".
        raise ConfigError("data.root", f"{path}: not readable without unpickling ({exc}); save plain numeric "
                                       f"arrays with numpy.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError("data.root", f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError("data.root", f"{path}: holds only one of x_test and y_test; give both or neither")
    for part in ("train", "test"):
        if f"x_{part}" in arrays:
            _check_pair(path, part, arrays[f"x_{part}"], arrays[f"y_{part}"])
    if "x_test" in arrays and arrays["x_test"].shape[1:] != arrays["x_train"].shape[1:]:
        raise ConfigError("data.root", f"{path}: x_test samples have shape {arrays['x_test'].shape[1:]}, "
                                       f"x_train samples {arrays['x_train'].shape[1:]}; they must match")
    return arrays


def _check_pair(path: Path, part: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise ConfigError("data.root", f"{path}: x_{part} must be a real numeric array (N, ...) with one row "
                                       f"per sample, got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise ConfigError("data.root", f"{path}: y_{part} must be integer class labels ({len(x)},), one per row "
                                       f"of x_{part}, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise ConfigError("data.root", f"{path}: y_{part} has negative labels (smallest {int(y.min())}); "
                                       f"labels are 0..K-1")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise ConfigError("data.root", f"{path}: x_{part} has NaN or infinite values in {bad} sample(s)")


def sample_shape(x: np.ndarray) -> tuple[int, ...]:
    """The shape one sample gets: (N, H, W) arrays gain a channel axis, (1, H, W)."""
    return (1, *x.shape[1:]) if x.ndim == 3 else tuple(x.shape[1:])


def _statistics(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training split, per feature (rank 2) or per channel (rank ≥ 3),
    shaped to broadcast against a batch; a constant feature or channel keeps std 1."""
    axes = (0,) if train.ndim == 2 else tuple(a for a in range(train.ndim) if a != 1)
    mean = train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return mean, std


def _normalised(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


def load_arrays(
    root: str | None, *, seed: int, val_fraction: float, test_fraction: float, download: bool,
    image_size: int | None,
) -> DatasetSplits:
    """The ``arrays`` dataset from the ``.npz`` file ``root`` (see the module docstring)."""
    check_arrays_root(root, download)
    if image_size is not None:
        raise ConfigError("data.image_size", "the arrays dataset keeps your arrays' shape; leave image_size unset")
    assert root is not None
    arrays = read_arrays(root)
    pool_x, pool_y = arrays["x_train"], arrays["y_train"].astype(np.int64)
    shape = sample_shape(pool_x)
    pool_x = pool_x.reshape(len(pool_x), *shape)
    has_test = "x_test" in arrays
    num_classes = int(max(pool_y.max(initial=0), arrays["y_test"].max(initial=0) if has_test else 0)) + 1
    train_idx, val_idx, test_idx = _seeded_split("arrays", pool_y, seed, val_fraction,
                                                 None if has_test else test_fraction)
    if has_test:
        test_x = arrays["x_test"].reshape(len(arrays["x_test"]), *shape)
        test_y, test_idx = arrays["y_test"].astype(np.int64), np.arange(len(arrays["y_test"]))
    else:
        assert test_idx is not None
        test_x, test_y = pool_x[test_idx], pool_y[test_idx]
    mean, std = _statistics(pool_x[train_idx].astype(np.float64))

    def split(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> TensorSplit:
        return TensorSplit(_normalised(x, mean, std), torch.from_numpy(np.ascontiguousarray(y)),
                           torch.from_numpy(index.astype(np.int64)))

    return make_splits(
        "arrays",
        split(pool_x[train_idx], pool_y[train_idx], train_idx),
        split(pool_x[val_idx], pool_y[val_idx], val_idx),
        split(test_x, test_y, test_idx),
        num_classes=num_classes, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        image_size=image_size,
    )


load_arrays.check_root = check_arrays_root  # type: ignore[attr-defined]  # see check_dataset_root
DATASETS.register("arrays")(load_arrays)
