"""The ``arrays`` dataset: a user's own .npz of vectors, sequences or images, split
and normalised like the built-in datasets, and searched end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import TINY_SPEC, assert_one_clean_error, write_spec
from kdtune.cli import main
from kdtune.core.data import load_dataset
from kdtune.errors import ConfigError


def blobs(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent Gaussian inputs of any sample shape, with an offset and scale per feature."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(size=(classes, *shape))
    x = centres[y] + 0.8 * rng.normal(size=(n, *shape))
    return (x * 3.0 + 5.0).astype(np.float32), y.astype(np.int64)


def write_arrays(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_vectors_are_split_stratified_and_standardised_per_feature_from_train(tmp_path):
    x, y = blobs(300, (6,))
    data = load_dataset("arrays", str(write_arrays(tmp_path / "v.npz", x_train=x, y_train=y)),
                        seed=3, val_fraction=0.2, test_fraction=0.2)
    assert data.input_shape == (6,) and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (180, 60, 60)
    for split in (data.train, data.val, data.test):
        assert np.bincount(split.y.numpy()).tolist() == [len(split) // 3] * 3  # stratified
    train_rows = x[data.train.index.numpy()]
    mean, std = train_rows.astype(np.float64).mean(0), train_rows.astype(np.float64).std(0)
    for split in (data.train, data.val, data.test):
        expected = (x[split.index.numpy()] - mean) / std
        np.testing.assert_allclose(split.x.numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(split.y.numpy(), y[split.index.numpy()])
    ids = np.concatenate([s.index.numpy() for s in (data.train, data.val, data.test)])
    assert sorted(ids.tolist()) == list(range(300))  # a partition of the rows
    again = load_dataset("arrays", str(tmp_path / "v.npz"), seed=3)
    assert again.fingerprint == data.fingerprint


def test_images_get_a_channel_axis_and_are_standardised_per_channel(tmp_path):
    x, y = blobs(90, (2, 4, 4))
    data = load_dataset("arrays", str(write_arrays(tmp_path / "i.npz", x_train=x, y_train=y)))
    assert data.input_shape == (2, 4, 4)
    train = x[data.train.index.numpy()].astype(np.float64)
    for channel in range(2):
        values = train[:, channel]
        expected = (x[data.val.index.numpy(), channel] - values.mean()) / values.std()
        np.testing.assert_allclose(data.val.x[:, channel].numpy(), expected, rtol=1e-5, atol=1e-5)
    gray, labels = blobs(90, (4, 4))
    data = load_dataset("arrays", str(write_arrays(tmp_path / "g.npz", x_train=(gray * 10).astype(np.uint8),
                                                   y_train=labels)))
    assert data.input_shape == (1, 4, 4)


def test_an_official_test_split_is_kept_as_given(tmp_path):
    x, y = blobs(120, (5,))
    xt, yt = blobs(30, (5,), seed=1)
    data = load_dataset("arrays", str(write_arrays(tmp_path / "t.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)))
    assert len(data.test) == 30 and len(data.train) + len(data.val) == 120
    np.testing.assert_array_equal(data.test.y.numpy(), yt)
    np.testing.assert_array_equal(data.test.index.numpy(), np.arange(30))


@pytest.mark.parametrize(("arrays", "needle"), [
    (lambda x, y: {"x_train": x}, "missing y_train"),
    (lambda x, y: {"x_train": x, "y_train": y[:-1]}, "one per row"),
    (lambda x, y: {"x_train": x, "y_train": y - 1}, "negative labels"),
    (lambda x, y: {"x_train": np.where(np.arange(len(x))[:, None] == 4, np.nan, x), "y_train": y}, "NaN"),
    (lambda x, y: {"x_train": x, "y_train": y, "x_test": x}, "only one of x_test and y_test"),
    (lambda x, y: {"x_train": np.array([object()] * len(x)), "y_train": y}, "without unpickling"),
])
def test_bad_arrays_are_config_errors_on_data_root(tmp_path, arrays, needle):
    x, y = blobs(30, (4,))
    path = write_arrays(tmp_path / "bad.npz", **arrays(x, y))
    with pytest.raises(ConfigError) as info:
        load_dataset("arrays", str(path))
    assert info.value.field == "data.root" and needle in str(info.value)


def test_a_cnn_student_on_vectors_is_one_clean_error_naming_what_it_takes(tmp_path):
    x, y = blobs(60, (6,))
    spec = write_spec(tmp_path, {**TINY_SPEC, "data": {"dataset": "arrays",
                                                       "root": str(write_arrays(tmp_path / "v.npz", x_train=x, y_train=y))},
                                 "student": {"family": "cnn"}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "student.family", "takes images", "(6,)", "mlp")


def test_arrays_without_a_root_file_are_one_clean_error(tmp_path):
    spec = write_spec(tmp_path, {**TINY_SPEC, "data": {"dataset": "arrays", "root": str(tmp_path / "none.npz")}})
    outcome = CliRunner().invoke(main, ["validate", str(spec)])
    assert_one_clean_error(outcome, "data.root", "none.npz", "does not exist")


SEQUENCE_PLUGIN = """
from torch import nn

from kdtune.core.models import MODELS, Network


class SeqConv(Network):
    feature_kind = "vector"

    def __init__(self, num_classes, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                                  nn.Flatten())
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward_features(self, x):
        features = self.body(x.unsqueeze(1))
        return self.head(features), features


@MODELS.register("seqconv_test")
def seqconv(input_shape, num_classes, width):
    return SeqConv(num_classes, max(1, round(width)))
"""


@pytest.mark.ray
@pytest.mark.parametrize(("kind", "shape", "student"), [("vectors", (12,), "mlp"), ("sequences", (40,), "seqconv_test")])
def test_a_search_runs_on_an_array_dataset(kind, shape, student, ray_session, tmp_path):
    """Vectors with kdtune's mlp; sequences with a 1-D conv student from a plugin, which
    the workers of this already started Ray import from its path (no runtime env)."""
    x, y = blobs(240, shape)
    root = write_arrays(tmp_path / f"{kind}.npz", x_train=x, y_train=y)
    (tmp_path / "seqconv_plugin.py").write_text(SEQUENCE_PLUGIN)
    spec = {**TINY_SPEC, "study": kind, "num_samples": 2, "baselines": False,
            "plugins": ["seqconv_plugin.py"] if student != "mlp" else [],
            "data": {"dataset": "arrays", "root": str(root)},
            "teacher": {"family": "mlp", "width": 32, "epochs": 3, "lr": 0.01},
            "student": {"family": student},
            "space": {**TINY_SPEC["space"], "width": 8, "epochs": 2},
            "early_stopping": {"rule": "none"}}
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results",
                                        str(tmp_path / "results")])
    assert outcome.exit_code == 0, outcome.output
    trials = pd.read_parquet(tmp_path / "results" / kind / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    assert trials["val_acc"].gt(1 / 3).all()  # better than chance on separable blobs
