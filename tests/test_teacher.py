"""Teacher preparation: the on-disk cache, its integrity check, and user checkpoints.

Teachers here are tiny (a few epochs of a narrow MLP on digits) so that training
one costs well under a second; what is tested is the caching, not the teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdtune.data import DatasetSplits, load_dataset
from kdtune.errors import ConfigError
from kdtune.models import MLP, MODELS, Network, build_model
from kdtune.teacher import TeacherConfig, prepare_teachers, teacher_cache_key

COUNTING = "counting_mlp_test"


class CountingMLP(MLP):
    """kdtune's MLP that counts every image passed through it (training, evaluation, prediction)."""

    images_seen = 0  # one total over all instances: the teacher is rebuilt inside prepare_teachers

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        CountingMLP.images_seen += int(x.shape[0])
        return super().forward_features(x)


if COUNTING not in MODELS:

    @MODELS.register(COUNTING)
    def counting_mlp(input_shape: tuple[int, int, int], num_classes: int, width: float, depth: int = 2) -> Network:
        channels, height, width_px = input_shape
        return CountingMLP(channels * height * width_px, num_classes, max(1, round(width)), depth)


def _counting_teacher(**overrides) -> TeacherConfig:
    values = {"family": COUNTING, "width": 32, "epochs": 2, "lr": 2e-3, "batch_size": 64}
    return TeacherConfig(**(values | overrides))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mlp_from_file(path: Path, data: DatasetSplits, width: int) -> Network:
    model = build_model("mlp", data.input_shape, data.num_classes, width)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------- cache hits


def test_second_prepare_is_a_cache_hit_without_teacher_forward_passes(digits, tmp_path) -> None:
    logs: list[str] = []
    config = _counting_teacher()
    before = CountingMLP.images_seen
    first = prepare_teachers([config], digits, tmp_path, log=logs.append)
    after_first = CountingMLP.images_seen
    assert first.cache_hit is False
    assert after_first - before >= config.epochs * len(digits.train)  # it really trained

    logs.clear()
    second = prepare_teachers([config], digits, tmp_path, log=logs.append)
    assert second.cache_hit is True
    assert CountingMLP.images_seen == after_first  # not one teacher forward pass
    assert any("cache hit" in line for line in logs)
    assert second.key == first.key and second.cache_dir == first.cache_dir
    assert np.array_equal(second.targets.logits, first.targets.logits)
    assert second.info == first.info

    # The cache holds what it claims: the saved weights reproduce the cached logits and val accuracy,
    # and meta.json records the true sha256 of every file.
    entry = first.cache_dir
    assert first.targets.logits.shape == (len(digits.train), digits.num_classes)
    teacher = _mlp_from_file(entry / "teacher_0.pt", digits, 32)
    with torch.no_grad():
        logits = teacher(digits.train.x)
        val_acc = (teacher(digits.val.x).argmax(1) == digits.val.y).float().mean().item()
    np.testing.assert_allclose(first.targets.logits, logits.numpy(), rtol=1e-5, atol=1e-5)
    assert first.info[0]["val_acc"] == pytest.approx(val_acc)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["files"] == {name: _sha256(entry / name) for name in ("logits.npy", "teacher_0.pt")}


RACING = "racing_mlp_test"


class _SecondProcess:
    """What a second search sharing the cache does, played while this process trains its teacher:
    it places its finished entry (a copy of ``source``) at ``target`` first."""

    source: Path | None = None
    target: Path | None = None


if RACING not in MODELS:

    @MODELS.register(RACING)
    def racing_mlp(input_shape: tuple[int, int, int], num_classes: int, width: float, depth: int = 2) -> Network:
        if _SecondProcess.source is not None and not _SecondProcess.target.exists():
            shutil.copytree(_SecondProcess.source, _SecondProcess.target)
        channels, height, width_px = input_shape
        return MLP(channels * height * width_px, num_classes, max(1, round(width)), depth)


def _rewrite_logits(entry: Path, logits: np.ndarray) -> None:
    """Replace an entry's logits and record their hash, as a valid entry with other numbers."""
    np.save(entry / "logits.npy", logits)
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"]["logits.npy"] = _sha256(entry / "logits.npy")
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("theirs_readable", [True, False], ids=["theirs-used", "theirs-damaged-replaced"])
def test_an_entry_another_process_placed_first_is_used_and_nothing_is_left_behind(
        digits, tmp_path, monkeypatch, theirs_readable: bool) -> None:
    config = _counting_teacher(family=RACING)
    theirs = prepare_teachers([config], digits, tmp_path / "theirs", log=lambda m: None).cache_dir
    marked = np.full((len(digits.train), digits.num_classes), 0.25, dtype=np.float32)
    _rewrite_logits(theirs, marked)  # distinguishable from what this process computes
    if not theirs_readable:
        (theirs / "logits.npy").write_bytes(b"damaged")
    mine = tmp_path / "mine"
    monkeypatch.setattr(_SecondProcess, "source", theirs)
    monkeypatch.setattr(_SecondProcess, "target", mine / theirs.name)
    logs: list[str] = []
    prepared = prepare_teachers([config], digits, mine, log=logs.append)
    assert sorted(p.name for p in mine.iterdir()) == [theirs.name]  # no staging folder left
    if theirs_readable:
        assert prepared.cache_hit is True
        assert np.array_equal(prepared.targets.logits, marked)
        assert any("written meanwhile by another process" in line for line in logs)
    else:  # their entry does not read back: this process's own replaces it
        assert prepared.cache_hit is False and not np.array_equal(prepared.targets.logits, marked)
    again = prepare_teachers([config], digits, mine, log=lambda m: None)
    assert again.cache_hit is True and np.array_equal(again.targets.logits, prepared.targets.logits)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    # The last byte lies in the array data, so np.load still succeeds: only the hash can tell.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "target"),
    [
        (_truncate, "logits.npy"),
        (_flip_last_byte, "logits.npy"),
        (_flip_last_byte, "teacher_0.pt"),
        (Path.unlink, "meta.json"),
    ],
    ids=["truncated-logits", "flipped-logits", "flipped-weights", "missing-meta"],
)
def test_damaged_cache_is_detected_and_rebuilt(digits, tmp_path, damage, target: str) -> None:
    config = _counting_teacher()
    first = prepare_teachers([config], digits, tmp_path, log=lambda message: None)
    original = np.array(first.targets.logits)
    damage(first.cache_dir / target)
    if target == "logits.npy" and damage is _flip_last_byte:
        tampered = np.load(first.cache_dir / target)
        assert tampered.shape == original.shape and not np.array_equal(tampered, original)

    logs: list[str] = []
    before = CountingMLP.images_seen
    rebuilt = prepare_teachers([config], digits, tmp_path, log=logs.append)
    assert rebuilt.cache_hit is False
    assert CountingMLP.images_seen > before  # the teacher was trained again
    assert any("rebuilding" in line for line in logs)
    assert rebuilt.cache_dir == first.cache_dir
    # Training is seeded, so the rebuilt cache holds the original logits, not the damaged ones.
    assert np.array_equal(rebuilt.targets.logits, original)
    assert np.array_equal(np.load(rebuilt.cache_dir / "logits.npy"), original)

    again = prepare_teachers([config], digits, tmp_path, log=lambda message: None)
    assert again.cache_hit is True
    # Only the one entry is left: no staging folders, no second copy.
    assert [p.name for p in tmp_path.iterdir()] == [first.key]


# ---------------------------------------------------------------- cache keys


def test_key_changes_with_teacher_config_and_data(digits, tmp_path) -> None:
    base = TeacherConfig(family="mlp", width=32, epochs=2)
    key = teacher_cache_key([base], digits.fingerprint, False)
    assert teacher_cache_key([TeacherConfig(family="mlp", width=32, epochs=2)], digits.fingerprint, False) == key

    variants = [
        TeacherConfig(family="mlp", width=33, epochs=2),
        TeacherConfig(family="mlp", width=32, epochs=3),
        TeacherConfig(family="mlp", width=32, epochs=2, lr=2e-3),
        TeacherConfig(family="mlp", width=32, epochs=2, seed=1),
        TeacherConfig(family="mlp", width=32, epochs=2, model_options={"depth": 3}),
        TeacherConfig(family="cnn", width=32, epochs=2),
    ]
    keys = {teacher_cache_key([v], digits.fingerprint, False) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    assert teacher_cache_key([base], digits.fingerprint, True) != key
    assert teacher_cache_key([base, base], digits.fingerprint, False) != key

    other_data = load_dataset("digits", seed=1)
    assert other_data.fingerprint != digits.fingerprint
    assert teacher_cache_key([base], other_data.fingerprint, False) != key

    # Through prepare_teachers: other data is a separate entry, not a hit on the first one.
    first = prepare_teachers([base], digits, tmp_path, log=lambda message: None)
    second = prepare_teachers([base], other_data, tmp_path, log=lambda message: None)
    assert second.cache_hit is False and second.key != first.key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.key, second.key])


def test_checkpoint_key_follows_file_contents_not_path(digits, tmp_path) -> None:
    torch.manual_seed(0)
    path_a = tmp_path / "a.pt"
    torch.save(build_model("mlp", digits.input_shape, digits.num_classes, 16).state_dict(), path_a)
    path_copy = tmp_path / "copy.pt"
    shutil.copy(path_a, path_copy)
    path_b = tmp_path / "b.pt"
    torch.save(build_model("mlp", digits.input_shape, digits.num_classes, 16).state_dict(), path_b)

    def key(path: Path) -> str:
        return teacher_cache_key([TeacherConfig(width=16, checkpoint=str(path))], digits.fingerprint, False)

    # The path is part of the config, but it is replaced by the file's hash.
    assert key(path_copy) == key(path_a)
    assert key(path_b) != key(path_a)


# ---------------------------------------------------------------- user checkpoints


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "wrapped-state_dict"])
def test_checkpoint_is_loaded_and_not_trained(digits, tmp_path, wrapped: bool) -> None:
    torch.manual_seed(3)
    model = build_model("mlp", digits.input_shape, digits.num_classes, 24).eval()
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": model.state_dict()} if wrapped else model.state_dict(), path)

    logs: list[str] = []
    before = CountingMLP.images_seen
    prepared = prepare_teachers(
        [_counting_teacher(width=24, epochs=30, checkpoint=str(path))], digits, tmp_path / "cache", log=logs.append
    )
    # One pass over the validation split (its accuracy) and one over the training split (the logits):
    # thirty training epochs would have been 30 × len(train) more.
    assert CountingMLP.images_seen - before == len(digits.val) + len(digits.train)
    assert any("loading" in line for line in logs)
    with torch.no_grad():
        expected = model(digits.train.x).numpy()
        val_acc = (model(digits.val.x).argmax(1) == digits.val.y).float().mean().item()
    np.testing.assert_allclose(prepared.targets.logits, expected, rtol=1e-5, atol=1e-5)
    assert prepared.info[0]["val_acc"] == pytest.approx(val_acc)
    assert prepared.info[0]["checkpoint"] == str(path)


def test_checkpoint_of_another_width_is_a_config_error(digits, tmp_path) -> None:
    path = tmp_path / "narrow.pt"
    torch.save(build_model("mlp", digits.input_shape, digits.num_classes, 16).state_dict(), path)
    with pytest.raises(ConfigError) as info:
        prepare_teachers([TeacherConfig(width=24, checkpoint=str(path))], digits, tmp_path / "cache", log=lambda m: None)
    assert info.value.field == "teacher.checkpoint"
    message = str(info.value)
    assert "does not match" in message
    assert "checkpoint (16,) vs model (24,)" in message  # a first-layer shape, checkpoint vs model
    # Nothing half-built is left in the cache.
    assert not any((tmp_path / "cache").iterdir())


def test_checkpoint_of_another_depth_names_the_missing_keys(digits, tmp_path) -> None:
    path = tmp_path / "shallow.pt"
    torch.save(build_model("mlp", digits.input_shape, digits.num_classes, 16, depth=1).state_dict(), path)
    with pytest.raises(ConfigError) as info:
        prepare_teachers([TeacherConfig(width=16, checkpoint=str(path))], digits, tmp_path / "cache", log=lambda m: None)
    assert info.value.field == "teacher.checkpoint"
    assert "missing keys" in str(info.value)


def _write_text(path: Path) -> None:
    path.write_text("these are not weights\n")


def _write_untrusted_pickle(path: Path) -> None:
    # A pickle of an arbitrary object: weights_only loading must refuse it.
    torch.save(argparse.Namespace(payload="anything"), path)


def _write_bare_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize(
    ("write", "phrase"),
    [
        (_write_text, "not a readable"),
        (_write_untrusted_pickle, "not a readable"),
        (_write_bare_tensor, "expected a state_dict"),
        (None, "does not exist"),
    ],
    ids=["text-file", "arbitrary-pickle", "bare-tensor", "missing-file"],
)
def test_non_checkpoint_file_is_a_config_error(digits, tmp_path, write, phrase: str) -> None:
    path = tmp_path / "teacher.pt"
    if write is not None:
        write(path)
    with pytest.raises(ConfigError) as info:
        prepare_teachers([TeacherConfig(width=16, checkpoint=str(path))], digits, tmp_path / "cache", log=lambda m: None)
    assert info.value.field == "teacher.checkpoint"
    assert phrase in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------- several teachers


def test_two_teachers_give_stacked_logits(digits, tmp_path) -> None:
    first = TeacherConfig(family="mlp", width=32, epochs=2, lr=2e-3)
    second = TeacherConfig(family="mlp", width=16, epochs=2, lr=2e-3, seed=1)
    both = prepare_teachers([first, second], digits, tmp_path, with_features=True, log=lambda m: None)
    n, c = len(digits.train), digits.num_classes
    assert both.targets.logits.shape == (2, n, c)
    assert [entry["width"] for entry in both.info] == [32, 16]
    # Features come from the first teacher: its 32 hidden units.
    assert both.targets.features.shape == (n, 32)

    # Each slice is that teacher's own logits, as cached by the weights it saved.
    for index, width in enumerate((32, 16)):
        teacher = _mlp_from_file(both.cache_dir / f"teacher_{index}.pt", digits, width)
        with torch.no_grad():
            np.testing.assert_allclose(both.targets.logits[index], teacher(digits.train.x).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(both.targets.logits[0], both.targets.logits[1])

    alone = prepare_teachers([first], digits, tmp_path, log=lambda m: None)
    assert alone.key != both.key
    np.testing.assert_allclose(alone.targets.logits, both.targets.logits[0], rtol=1e-5, atol=1e-5)


def test_no_teacher_is_a_config_error(digits, tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        prepare_teachers([], digits, tmp_path, log=lambda m: None)
    assert info.value.field == "teacher"
