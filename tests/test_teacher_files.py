"""Teachers kdtune does not build: TorchScript and torch.export files (no class
needed), and precomputed logits keyed by the dataset's own sample index."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import TINY_SPEC, assert_one_clean_error, write_spec
from kdtune.cli import main
from kdtune.core.teacher import TeacherConfig, prepare_teachers
from kdtune.core.teacher_files import (
    check_logits_without_augmentation,
    load_teacher_file,
    load_teacher_logits,
    scan_export_archive,
)
from kdtune.errors import ConfigError

QUIET = {"log": lambda message: None}


def make_teacher() -> nn.Module:
    """A small trained-looking teacher for 8×8 digits whose class kdtune never sees."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def save_torchscript(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def save_export(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("save", [save_torchscript, save_export], ids=["torchscript", "export"])
def test_a_teacher_file_gives_the_cached_logits_of_the_module_it_came_from(save, digits, tmp_path):
    model = make_teacher()
    path = save(model, tmp_path / ("teacher.pt2" if save is save_export else "teacher.pt"))
    prepared = prepare_teachers([TeacherConfig(file=str(path))], digits, tmp_path / "cache", **QUIET)
    with torch.no_grad():
        expected = model(digits.train.x).numpy()
    np.testing.assert_allclose(prepared.targets.logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        val = model(digits.val.x)
    assert prepared.info[0]["val_acc"] == pytest.approx((val.argmax(1) == digits.val.y).float().mean().item())
    assert prepared.info[0]["params"] == 64 * 32 + 32 + 32 * 10 + 10
    again = prepare_teachers([TeacherConfig(file=str(path))], digits, tmp_path / "cache", **QUIET)
    assert again.cache_hit and again.key == prepared.key


class WritesAFile:
    """A pickle that writes a file when unpickled: what a malicious archive carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def tamper(archive: Path, out: Path, marker: Path, where: str) -> str:
    """A copy of ``archive`` carrying :class:`WritesAFile` as a weight flagged
    ``use_pickle`` (``where="weight"``) or as the sample inputs; returns the entry."""
    payload = io.BytesIO()
    torch.save(WritesAFile(marker), payload)
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as target:
        names = source.namelist()
        config_name = next(n for n in names if n.endswith("model_weights_config.json"))
        config = json.loads(source.read(config_name))
        first = next(iter(config["config"]))
        weight_entry = config_name.rsplit("/", 1)[0] + "/" + config["config"][first]["path_name"]
        sample_entry = next(n for n in names if "sample_inputs" in n)
        if where == "weight":
            config["config"][first]["use_pickle"] = True
        replaced = weight_entry if where == "weight" else sample_entry
        for name in names:
            data = source.read(name)
            if name == replaced:
                data = payload.getvalue()
            elif name == config_name:
                data = json.dumps(config).encode()
            target.writestr(name, data)
    return replaced


@pytest.mark.parametrize("where", ["weight", "sample_inputs"])
def test_an_export_archive_that_would_run_code_is_refused_before_torch_reads_it(where, tmp_path):
    marker = tmp_path / "pwned.txt"
    crafted = tmp_path / "evil.pt2"
    entry = tamper(save_export(make_teacher(), tmp_path / "good.pt2"), crafted, marker, where)
    with pytest.raises(ConfigError) as info:
        load_teacher_file(crafted)
    assert entry in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()
    # The archive is a real attack: torch.export.load itself runs the code.
    try:
        torch.export.load(str(crafted))
    except Exception:  # noqa: BLE001 - what happens after the code ran does not matter
        pass
    assert marker.read_text() == "code ran"


def test_an_archive_with_members_outside_its_folder_is_refused(tmp_path):
    good = save_export(make_teacher(), tmp_path / "good.pt2")
    content = good.read_bytes()
    scan_export_archive(content)  # the plain archive passes
    crafted = tmp_path / "old.pt2"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(crafted, "w") as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
        target.writestr("serialized_state_dict.pt", b"not checked by torch's new path")
    with pytest.raises(ConfigError, match="serialized_state_dict.pt"):
        load_teacher_file(crafted)


def test_a_teacher_file_with_the_wrong_output_shape_is_one_clean_error(tmp_path):
    torch.manual_seed(0)
    seven = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    path = save_torchscript(seven, tmp_path / "seven.pt")
    spec = write_spec(tmp_path, {**TINY_SPEC, "teacher": {"file": str(path)}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "teacher.file", "seven.pt", "(2, 7)", "(2, 10)")


def test_a_file_teacher_with_feature_distillation_is_refused(tmp_path):
    path = save_torchscript(make_teacher(), tmp_path / "teacher.pt")
    spec = write_spec(tmp_path, {**TINY_SPEC, "teacher": {"file": str(path)},
                                 "space": {**TINY_SPEC["space"], "beta": {"uniform": [0.0, 1.0]}}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "teacher.file", "no features", "beta")


def test_checkpoint_and_file_together_are_refused(tmp_path):
    spec = write_spec(tmp_path, {**TINY_SPEC, "teacher": {"file": "a.pt", "checkpoint": "b.pt"}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "teacher", "at most one of checkpoint, file and logits")


# --------------------------------------------------------------------------- precomputed logits


def teacher_logits(x: torch.Tensor) -> np.ndarray:
    """Any fixed function of the inputs stands in for a teacher trained elsewhere."""
    return make_teacher()(x).detach().numpy()


def write_logits(path: Path, index: np.ndarray, logits: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, index=index, logits=logits, **extra)
    return path


def test_logits_in_another_order_with_extra_ids_are_realigned_and_cached(digits, tmp_path):
    ids, rows = digits.train.index.numpy(), teacher_logits(digits.train.x)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(ids))
    extra_ids = np.array([100_000, 100_001])  # a superset is fine
    val_ids, val_rows = digits.val.index.numpy(), teacher_logits(digits.val.x)
    path = write_logits(tmp_path / "t.npz", np.concatenate([ids[order], extra_ids]),
                        np.concatenate([rows[order], np.zeros((2, 10), np.float32)]),
                        val_index=val_ids[::-1], val_logits=val_rows[::-1])
    prepared = prepare_teachers([TeacherConfig(logits=str(path))], digits, tmp_path / "cache", **QUIET)
    np.testing.assert_array_equal(prepared.targets.logits, rows)
    expected_acc = float((val_rows.argmax(1) == digits.val.y.numpy()).mean())
    assert prepared.info[0]["val_acc"] == pytest.approx(expected_acc)
    assert prepared.info[0]["family"] == "logits"


def test_logits_of_the_wrong_shape_are_refused(digits, tmp_path):
    ids = digits.train.index.numpy()
    path = write_logits(tmp_path / "t.npz", ids, np.zeros((len(ids), 7), np.float32))
    with pytest.raises(ConfigError, match=r"logits must be floats of shape \(samples, 10\).*\(\d+, 7\)"):
        load_teacher_logits(path, digits)


def test_missing_ids_are_refused_saying_which_and_how_many(digits, tmp_path):
    ids, rows = digits.train.index.numpy(), teacher_logits(digits.train.x)
    keep = np.ones(len(ids), bool)
    keep[[3, 10, 11]] = False
    path = write_logits(tmp_path / "t.npz", ids[keep], rows[keep])
    with pytest.raises(ConfigError) as info:
        load_teacher_logits(path, digits)
    message = str(info.value)
    missing = sorted(ids[~keep])
    assert f"3 of the {len(ids)} samples of kdtune's training split" in message
    assert ", ".join(map(str, missing)) in message


def test_nan_logits_are_refused_naming_the_samples(digits, tmp_path):
    ids, rows = digits.train.index.numpy(), teacher_logits(digits.train.x)
    rows[5, 2] = np.nan
    path = write_logits(tmp_path / "t.npz", ids, rows)
    with pytest.raises(ConfigError, match=rf"NaN or infinite values for 1 sample\(s\) \(indices {ids[5]}\)"):
        load_teacher_logits(path, digits)


def test_a_logits_teacher_with_missing_ids_is_one_clean_error_from_the_cli(digits, tmp_path):
    ids, rows = digits.train.index.numpy(), teacher_logits(digits.train.x)
    path = write_logits(tmp_path / "t.npz", ids[1:], rows[1:])
    spec = write_spec(tmp_path, {**TINY_SPEC, "teacher": {"logits": str(path)}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "teacher.logits", "1 of the", str(ids[0]))


def test_a_pickled_logits_file_is_refused(digits, tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, index=np.array([{"not": "numbers"}], dtype=object), logits=np.zeros((1, 10)))
    with pytest.raises(ConfigError, match="not a .npz of plain arrays"):
        load_teacher_logits(path, digits)


def test_logits_and_augmentation_together_are_refused_naming_the_alternatives():
    check_logits_without_augmentation([TeacherConfig(logits="t.npz")], augmentation=None)
    check_logits_without_augmentation([TeacherConfig(file="t.pt")], augmentation={"flip": True})
    with pytest.raises(ConfigError) as info:
        check_logits_without_augmentation([TeacherConfig(logits="t.npz")], augmentation={"flip": True})
    assert str(info.value).startswith("teacher.logits:")
    for alternative in ("augmentation off", "teacher.file", "checkpoint"):
        assert alternative in str(info.value)
