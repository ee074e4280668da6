"""Datasets: seeded stratified splits, normalization from train, real on-disk formats, safe unpickling.

File-based datasets are written here in their real formats (CIFAR python
pickles, MNIST IDX, PNG class folders). Their images are built so that every
training image holds the same multiset of pixel values per channel (each is a
rotation of one base vector): the training mean/std then does not depend on
which images the seeded split moves to validation, and the tests can write down
the expected normalization from the base vector alone.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from kdtune.errors import ConfigError
from kdtune.core.idx_files import read_idx
from kdtune.data import (
    DATASETS,
    DATASETS_NEEDING_ROOT,
    DatasetSplits,
    check_dataset_root,
    load_dataset,
    subset_indices,
)

CIFAR_PIXELS = 3 * 32 * 32


def _rotations(base: np.ndarray, count: int, step: int) -> np.ndarray:
    """``count`` distinct images (rows), each a rotation of ``base`` so all share its multiset of values."""
    return np.stack([np.roll(base, step * (i + 1), axis=-1) for i in range(count)])


def _denormalized_rows(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> list[bytes]:
    """Undo the expected normalization and round back to the written uint8 pixels, one bytes per image."""
    shape = (1, -1, 1, 1)
    pixels = (x.double().numpy() * std.reshape(shape) + mean.reshape(shape)) * 255.0
    return [bytes(row) for row in np.rint(pixels).astype(np.uint8).reshape(len(x), -1)]


def _assert_all_splits_valid(data: DatasetSplits) -> None:
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == data.input_shape
        assert len(split) == split.x.shape[0] == split.y.shape[0]
        assert int(split.y.min()) >= 0 and int(split.y.max()) < data.num_classes


# --- digits -----------------------------------------------------------------------------------


def test_digits_splits_partition_the_dataset() -> None:
    data = load_dataset("digits")
    _assert_all_splits_valid(data)
    # Held-out sizes are ceil(0.2 · 1797) = 360 each.
    assert (len(data.train), len(data.val), len(data.test)) == (1077, 360, 360)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    bunch = load_digits()
    # Pixels are 0..16 integers scaled by 1/16; compare (image, label) multisets so duplicates count too.
    written = Counter(
        (bytes(row.astype(np.uint8)), int(label)) for row, label in zip(bunch.data, bunch.target)
    )
    loaded = Counter(
        (bytes(np.rint(row.numpy() * 16).astype(np.uint8)), int(label))
        for split in (data.train, data.val, data.test)
        for row, label in zip(split.x.reshape(len(split), -1), split.y)
    )
    assert loaded == written
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0


def test_digits_split_is_seeded() -> None:
    first = load_dataset("digits", seed=3)
    again = load_dataset("digits", seed=3)
    other = load_dataset("digits", seed=4)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).x, getattr(again, name).x)
        assert torch.equal(getattr(first, name).y, getattr(again, name).y)
    assert first.fingerprint == again.fingerprint
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0
    assert not torch.equal(first.test.x, other.test.x)
    assert first.fingerprint != other.fingerprint
    smaller_val = load_dataset("digits", seed=3, val_fraction=0.1)
    assert len(smaller_val.val) == math.ceil(1797 * 0.1)
    assert smaller_val.fingerprint != first.fingerprint


def test_digits_split_keeps_class_balance() -> None:
    data = load_dataset("digits", seed=0)
    class_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(data.test.y.numpy(), minlength=10)
    # The test split is carved first: each class gets floor or ceil of its share of 360.
    shares = class_counts * 360 / 1797
    assert np.all(test_counts >= np.floor(shares)) and np.all(test_counts <= np.ceil(shares))
    for split in (data.train, data.val):
        counts = np.bincount(split.y.numpy(), minlength=10)
        assert np.all(np.abs(counts - class_counts * len(split) / 1797) <= 2)


# --- subset_indices ---------------------------------------------------------------------------


def test_subset_indices_is_stratified_sorted_and_seeded() -> None:
    labels = torch.from_numpy(load_digits().target.astype(np.int64))
    n = len(labels)
    chosen = subset_indices(n, 150, seed=7, labels=labels)
    assert chosen.dtype == torch.int64 and len(chosen) == 150
    assert torch.equal(chosen, torch.sort(chosen).values) and len(set(chosen.tolist())) == 150
    counts = np.bincount(labels[chosen].numpy(), minlength=10)
    shares = np.bincount(labels.numpy(), minlength=10) * 150 / n
    assert np.all(counts >= np.floor(shares)) and np.all(counts <= np.ceil(shares))
    assert torch.equal(chosen, subset_indices(n, 150, seed=7, labels=labels))
    assert not torch.equal(chosen, subset_indices(n, 150, seed=8, labels=labels))


def test_subset_indices_without_labels_and_all() -> None:
    chosen = subset_indices(100, 10, seed=0)
    assert chosen.dtype == torch.int64 and len(set(chosen.tolist())) == 10
    assert torch.equal(chosen, torch.sort(chosen).values)
    assert 0 <= int(chosen.min()) and int(chosen.max()) < 100
    assert torch.equal(chosen, subset_indices(100, 10, seed=0))
    assert torch.equal(subset_indices(5, None, seed=0), torch.arange(5))
    assert torch.equal(subset_indices(5, 5, seed=1), torch.arange(5))


@pytest.mark.parametrize("size", [0, 101, -3])
def test_subset_indices_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ConfigError) as info:
        subset_indices(100, size, seed=0)
    assert info.value.field == "train_subset"
    assert "1 to 100" in str(info.value)


# --- CIFAR ------------------------------------------------------------------------------------


class _Python2StylePickler(pickle._Pickler):
    """Writes pickles as Python 2 did for the real CIFAR files.

    Bytes become Python 2 ``str`` opcodes (so keys and the array buffer load as
    latin-1 ``str``) and numpy's rebuilder is named by its numpy 1 path.
    """

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[bytes] = save_bytes


def _dump(path: Path, obj: object, protocol: int | str = pickle.DEFAULT_PROTOCOL) -> None:
    with open(path, "wb") as f:
        if protocol == "python2":
            _Python2StylePickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=protocol)


def _cifar_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 3072 uint8 (channel-major, as in CIFAR) rotating one base per channel, plus the bases."""
    bases = np.random.default_rng(seed).integers(0, 256, size=(3, 1024), dtype=np.uint8)
    images = _rotations(bases, count, step=7)  # (count, 3, 1024)
    return images.reshape(count, CIFAR_PIXELS), bases


def _write_cifar10(root: Path, per_batch: int = 8, test_count: int = 6) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train, bases = _cifar_images(5 * per_batch + test_count, seed=0)
    test = train[5 * per_batch :]
    train = train[: 5 * per_batch]
    labels = np.arange(5 * per_batch) % 10
    # Mixed pickle styles: the real files are Python 2 pickles; protocol 5 rebuilds arrays differently.
    for batch, protocol in zip(range(5), ("python2", 2, 3, 4, 5)):
        rows = slice(batch * per_batch, (batch + 1) * per_batch)
        _dump(
            folder / f"data_batch_{batch + 1}",
            {
                b"batch_label": f"training batch {batch + 1} of 5".encode(),
                b"labels": [int(v) for v in labels[rows]],
                b"data": train[rows],
                b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
            },
            protocol,
        )
    test_labels = np.array([3, 1, 4, 1, 5, 9][:test_count])
    _dump(folder / "test_batch", {b"labels": [int(v) for v in test_labels], b"data": test}, "python2")
    _dump(folder / "batches.meta", {b"label_names": [b"class%d" % i for i in range(10)], b"num_vis": 3072})
    return {"train": train, "labels": labels, "test": test, "test_labels": test_labels, "bases": bases}


def test_cifar10_tiny_files_load_with_train_statistics(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path)
    check_dataset_root("cifar10", str(tmp_path))
    data = load_dataset("cifar10", str(tmp_path), seed=1, val_fraction=0.25)
    _assert_all_splits_valid(data)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 6)  # val = ceil(40 · 0.25)
    # Official test split keeps the file's order and labels.
    assert data.test.y.tolist() == written["test_labels"].tolist()
    # Every training image is a rotation of the per-channel bases, so train mean/std are theirs.
    mean = written["bases"].mean(axis=1) / 255.0
    std = (written["bases"] / 255.0).std(axis=1)
    raw = written["test"][4]
    channel, row, col = 2, 5, 17
    expected = (raw[channel * 1024 + row * 32 + col] / 255.0 - mean[channel]) / std[channel]
    assert float(data.test.x[4, channel, row, col]) == pytest.approx(expected, abs=1e-5)
    assert _denormalized_rows(data.test.x, mean, std) == [bytes(r) for r in written["test"]]
    # Train and val together are exactly the written training images with their labels.
    loaded = Counter(
        zip(
            _denormalized_rows(data.train.x, mean, std) + _denormalized_rows(data.val.x, mean, std),
            data.train.y.tolist() + data.val.y.tolist(),
        )
    )
    assert loaded == Counter(zip([bytes(r) for r in written["train"]], written["labels"].tolist()))
    same = load_dataset("cifar10", str(tmp_path), seed=1, val_fraction=0.25)
    assert same.fingerprint == data.fingerprint and torch.equal(same.val.x, data.val.x)


class _RunsShellCommand:
    """Pickles to a call of os.system: what a planted batch file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_cifar_pickle_with_foreign_global_is_refused_not_run(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"labels": [0], b"data": _RunsShellCommand(f"touch {marker}")}
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", evil)
    assert b"system" in (tmp_path / "cifar-10-batches-py" / "data_batch_3").read_bytes()
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10", str(tmp_path))
    assert info.value.field == "data.root"
    assert "data_batch_3" in str(info.value) and "refused" in str(info.value)
    assert "system" in str(info.value)
    assert not marker.exists()


def test_cifar_batch_with_wrong_contents_is_a_config_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"labels": [1, 2], b"data": np.zeros((2, 10), np.uint8)})
    # The cheap root check only looks for file names ...
    check_dataset_root("cifar10", str(tmp_path))
    # ... loading reads them and says what the file should hold.
    with pytest.raises(ConfigError, match="uint8 \\(N, 3072\\)") as info:
        load_dataset("cifar10", str(tmp_path))
    assert info.value.field == "data.root"


def test_cifar100_tiny_files_use_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images, bases = _cifar_images(25, seed=5)
    fine = (np.arange(25) * 37) % 100
    coarse = fine // 5
    train, test = slice(0, 20), slice(20, 25)
    for name, rows in (("train", train), ("test", test)):
        _dump(
            folder / name,
            {
                b"filenames": [b"x.png"] * len(fine[rows]),
                b"fine_labels": [int(v) for v in fine[rows]],
                b"coarse_labels": [int(v) for v in coarse[rows]],
                b"data": images[rows],
            },
            "python2" if name == "train" else 4,
        )
    data = load_dataset("cifar100", str(tmp_path), seed=0, val_fraction=0.2)
    _assert_all_splits_valid(data)
    assert data.num_classes == 100 and data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 5)
    assert data.test.y.tolist() == fine[test].tolist()
    assert sorted(data.train.y.tolist() + data.val.y.tolist()) == sorted(fine[train].tolist())
    mean = bases.mean(axis=1) / 255.0
    std = (bases / 255.0).std(axis=1)
    expected = (images[21, 0 * 1024 + 31 * 32 + 0] / 255.0 - mean[0]) / std[0]
    assert float(data.test.x[1, 0, 31, 0]) == pytest.approx(expected, abs=1e-5)


def test_missing_cifar_root_names_data_root(tmp_path: Path) -> None:
    for root in (None, str(tmp_path / "nowhere"), str(tmp_path)):
        for call in (lambda: check_dataset_root("cifar10", root), lambda: load_dataset("cifar10", root)):
            with pytest.raises(ConfigError) as info:
                call()
            assert info.value.field == "data.root"
            assert "cifar-10-batches-py/data_batch_1" in str(info.value)
            assert "download: true" in str(info.value)
    with pytest.raises(ConfigError, match=str(tmp_path)):
        check_dataset_root("cifar100", str(tmp_path))
    # With download the files may be missing, but a folder to put them in is still needed.
    check_dataset_root("cifar10", str(tmp_path), download=True)
    with pytest.raises(ConfigError):
        check_dataset_root("cifar10", None, download=True)


# --- MNIST ------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file: big-endian magic (0x08 = unsigned byte, then the number of dims), dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_load_through_torchvision(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    base = np.random.default_rng(2).integers(0, 256, size=28 * 28, dtype=np.uint8)
    images = _rotations(base, 26, step=5).reshape(26, 28, 28)
    labels = (np.arange(26) * 3) % 10
    _write_idx(raw / "train-images-idx3-ubyte", images[:20])
    _write_idx(raw / "train-labels-idx1-ubyte", labels[:20])
    _write_idx(raw / "t10k-images-idx3-ubyte", images[20:])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[20:])
    check_dataset_root(name, str(tmp_path))
    data = load_dataset(name, str(tmp_path), seed=0)
    _assert_all_splits_valid(data)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    assert data.test.y.tolist() == labels[20:].tolist()
    assert sorted(data.train.y.tolist() + data.val.y.tolist()) == sorted(labels[:20].tolist())
    mean, std = base.mean() / 255.0, (base / 255.0).std()
    expected = (images[23] / 255.0 - mean) / std
    np.testing.assert_allclose(data.test.x[3, 0].numpy(), expected, atol=1e-5)


def test_mnist_missing_files_name_the_raw_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist", str(tmp_path))
    assert info.value.field == "data.root"
    assert "MNIST/raw/train-images-idx3-ubyte" in str(info.value)


def _write_fashion_idx(folder: Path, gzipped: bool) -> tuple[np.ndarray, np.ndarray]:
    """The four Fashion-MNIST files in ``folder`` (``.gz`` as distributed, or unpacked); returns images, labels."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(5).integers(0, 256, size=28 * 28, dtype=np.uint8)
    images = _rotations(base, 30, step=7).reshape(30, 28, 28)
    labels = (np.arange(30) * 7) % 10
    for name, array in (
        ("train-images-idx3-ubyte", images[:24]), ("train-labels-idx1-ubyte", labels[:24]),
        ("t10k-images-idx3-ubyte", images[24:]), ("t10k-labels-idx1-ubyte", labels[24:]),
    ):
        _write_idx(folder / name, array)
        if gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress((folder / name).read_bytes()))
            (folder / name).unlink()
    return images, labels


@pytest.mark.parametrize("layout", ["gz_in_root", "torchvision_raw"])
def test_fashion_mnist_reads_gzipped_files_as_shipped_and_torchvision_layout(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "gz_in_root" else tmp_path / "FashionMNIST" / "raw"
    images, labels = _write_fashion_idx(folder, gzipped=layout == "gz_in_root")
    check_dataset_root("fashion_mnist", str(tmp_path))
    data = load_dataset("fashion_mnist", str(tmp_path), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (19, 5, 6)
    assert data.test.y.tolist() == labels[24:].tolist()
    mean, std = images[0].mean() / 255.0, (images[0] / 255.0).std()
    np.testing.assert_allclose(data.test.x[2, 0].numpy(), (images[26] / 255.0 - mean) / std, atol=1e-5)


def test_read_idx_reads_other_types_and_rejects_a_short_file(tmp_path: Path) -> None:
    values = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
    # Type code 0x0C: big-endian int32.
    path = tmp_path / "ints-idx2"
    path.write_bytes(struct.pack(">I", 0x0C02) + struct.pack(">2I", 2, 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3) - 3)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ConfigError) as info:
        read_idx(path)
    assert "IDX header says shape (2, 3)" in str(info.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError) as info:
        read_idx(tmp_path / "bad.gz")
    assert "bad.gz: cannot read" in str(info.value)


def test_fashion_mnist_missing_files_name_both_layouts(tmp_path: Path) -> None:
    _write_fashion_idx(tmp_path, gzipped=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError) as info:
        load_dataset("fashion_mnist", str(tmp_path))
    message = str(info.value)
    assert "missing t10k-labels-idx1-ubyte" in message
    assert "t10k-labels-idx1-ubyte.gz, in data.root itself" in message
    assert "FashionMNIST/raw/t10k-labels-idx1-ubyte" in message
    assert "dataset-fashion-mnist" in message


REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (puts it in {REAL_FASHION_MNIST})",
)
def test_real_fashion_mnist_files_load_with_the_official_split() -> None:
    data = load_dataset("fashion_mnist", str(REAL_FASHION_MNIST), seed=0)
    _assert_all_splits_valid(data)
    # 60,000 training images (12,000 held out for validation) and the official 10,000 test images,
    # 6,000 and 1,000 of each of the ten classes.
    assert (len(data.train), len(data.val), len(data.test)) == (48_000, 12_000, 10_000)
    assert data.input_shape == (1, 28, 28)
    assert np.bincount(data.test.y.numpy(), minlength=10).tolist() == [1000] * 10
    assert np.bincount(torch.cat([data.train.y, data.val.y]).numpy(), minlength=10).tolist() == [6000] * 10
    assert abs(float(data.train.x.mean())) < 1e-4 and abs(float(data.train.x.std()) - 1.0) < 1e-4


# --- image folders ----------------------------------------------------------------------------

# Solid colours per class; cherry is written grayscale to check the conversion to RGB.
COLOURS = {"apple": (200, 30, 10), "banana": (250, 220, 40), "cherry": (90, 90, 90)}


def _write_class_images(folder: Path, per_class: dict[str, int]) -> None:
    for label, count in per_class.items():
        (folder / label).mkdir(parents=True)
        for i in range(count):
            if label == "cherry":
                image = Image.new("L", (9, 6), COLOURS[label][0])
            else:
                image = Image.new("RGB", (9, 6), COLOURS[label])
            image.save(folder / label / f"{i:03d}.png")


def _expected_class_images(labels: torch.Tensor, size: int) -> np.ndarray:
    """Each image is its class colour; train holds every class equally often, so stats are the colours'."""
    colours = np.array([COLOURS[c] for c in sorted(COLOURS)], dtype=np.float64) / 255.0
    mean, std = colours.mean(axis=0), colours.std(axis=0)
    normalized = (colours - mean) / std
    return np.broadcast_to(normalized[labels.numpy()][:, :, None, None], (len(labels), 3, size, size))


def test_imagefolder_flat_layout_is_split_like_digits(tmp_path: Path) -> None:
    _write_class_images(tmp_path, {"apple": 10, "banana": 10, "cherry": 10})
    data = load_dataset("imagefolder", str(tmp_path), seed=0, image_size=4)
    _assert_all_splits_valid(data)
    assert data.input_shape == (3, 4, 4) and data.num_classes == 3
    # ceil(30 · 0.2) = 6 for test and val, two of each class; classes numbered by sorted folder name.
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 6)
    assert np.bincount(data.test.y.numpy()).tolist() == [2, 2, 2]
    assert np.bincount(data.train.y.numpy()).tolist() == [6, 6, 6]
    for split in (data.train, data.val, data.test):
        np.testing.assert_allclose(split.x.numpy(), _expected_class_images(split.y, 4), atol=1e-5)


def test_imagefolder_train_test_layout_uses_training_class_ids(tmp_path: Path) -> None:
    _write_class_images(tmp_path / "train", {"apple": 5, "banana": 5, "cherry": 5})
    # The test folder lacks "apple": its banana and cherry must keep training ids 1 and 2.
    _write_class_images(tmp_path / "test", {"banana": 2, "cherry": 2})
    data = load_dataset("imagefolder", str(tmp_path), seed=0)
    _assert_all_splits_valid(data)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 4)
    assert data.test.y.tolist() == [1, 1, 2, 2]
    assert np.bincount(data.val.y.numpy()).tolist() == [1, 1, 1]
    for split in (data.train, data.val, data.test):
        np.testing.assert_allclose(split.x.numpy(), _expected_class_images(split.y, 32), atol=1e-5)


def test_imagefolder_root_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_dataset_root("imagefolder", str(tmp_path))
    assert info.value.field == "data.root" and "class folders" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_dataset("imagefolder", None)
    assert info.value.field == "data.root"
    _write_class_images(tmp_path, {"apple": 2, "banana": 2})
    (tmp_path / "banana" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_dataset("imagefolder", str(tmp_path), image_size=0)
    assert info.value.field == "data.image_size"


# --- registry and arguments -------------------------------------------------------------------


def test_unknown_dataset_lists_allowed_names() -> None:
    for call in (lambda: load_dataset("svhn"), lambda: check_dataset_root("svhn", None)):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "svhn" in message
        for name in ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"):
            assert name in message
    assert set(DATASETS.names()) == DATASETS_NEEDING_ROOT | {"digits"}
    check_dataset_root("digits", None)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"test_fraction": -0.1}, "data.test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction"),
        ({"seed": -1}, "seed"),
        ({"image_size": 16}, "data.image_size"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("digits", **kwargs)
    assert info.value.field == field
