"""A short search on the real Fashion-MNIST files as Debian ships them (``.gz`` in
/usr/share/datasets/fashion-mnist): the files are read, the teacher trained on the
full training split reaches 0.80 validation accuracy after its few epochs, and the
students' trials complete. CI installs the package (``.ci/run``); elsewhere the test
skips, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import write_spec
from kdtune.cli import main

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                       reason="real Fashion-MNIST not installed: apt-get install dataset-fashion-mnist "
                              f"(puts it in {REAL_FASHION_MNIST})"),
]


def test_a_short_search_on_the_real_files_gets_a_teacher_worth_distilling(ray_session, tmp_path):
    spec = {
        "study": "fmnist_short", "seed": 0, "num_samples": 2,
        "data": {"dataset": "fashion_mnist", "root": str(REAL_FASHION_MNIST), "val_fraction": 0.1,
                 "train_subset": 500},
        # A wide MLP learns Fashion-MNIST to about 0.85 in two epochs of the 54,000 images.
        "teacher": {"family": "mlp", "width": 256, "options": {"depth": 2}, "epochs": 2, "lr": 0.001,
                    "batch_size": 128},
        "student": {"family": "mlp", "options": {"depth": 2}},
        "space": {"width": 16, "temperature": {"loguniform": [1, 10]}, "alpha": 0.3, "lr": 0.003,
                  "batch_size": 64, "epochs": 2},
        "sampler": {"name": "random"},
        "early_stopping": {"rule": "none"},
        "resources": {"cpus": 1},
        "baselines": False,
    }
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results", str(tmp_path / "r")])
    assert outcome.exit_code == 0, outcome.output
    study = tmp_path / "r" / "fmnist_short"
    teacher = json.loads((study / "study.json").read_text())["teacher"]
    assert teacher["val_acc"] >= 0.80, teacher
    trials = pd.read_parquet(study / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    # A 784-16-16-10 MLP: the students were built for 28x28 greyscale images.
    assert set(trials["params"]) == {784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10}
    # Well above chance (0.10) after two epochs (16 steps) on 500 labelled images.
    assert trials["val_acc"].min() > 0.3
