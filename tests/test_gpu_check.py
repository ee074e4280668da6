"""The prepared GPU script (bench/gpu_check.py) in its CPU smoke mode.

No GPU is needed: every section runs on the CPU at tiny sizes, in a fresh
interpreter, which must not import Ray, Optuna, pydantic, pandas or torchvision
(the machine the script is written for has only torch and numpy, and pandas).
The real-task section reads Fashion-MNIST from small ``.gz`` IDX files written
here in the format as distributed.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO


def _write_gz_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as distributed: big-endian magic (0x08 unsigned byte, number of dims), dims, bytes; gzipped."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.slow
def test_the_gpu_script_runs_every_section_with_the_core_alone(tmp_path: Path) -> None:
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 10
    images = rng.integers(0, 256, size=(80, 28, 28))
    images[:, :4, :4] = labels[:, None, None] * 25  # a learnable corner, not needed by the check
    for prefix, sl in (("train", slice(0, 60)), ("t10k", slice(60, 80))):
        _write_gz_idx(fmnist / f"{prefix}-images-idx3-ubyte.gz", images[sl])
        _write_gz_idx(fmnist / f"{prefix}-labels-idx1-ubyte.gz", labels[sl])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out),
                           "--fmnist-root", str(fmnist), "--front", str(tmp_path / "none.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    sections = results["sections"]
    # Nothing the GPU machine lacks was imported, by the script or by any process it started.
    assert results["imported_extras"] == []
    children = sections["real_task"]["trials"]
    assert children and all(child["imported_extras"] == [] for child in children), children
    assert list(sections) == ["device", "amp", "augment", "share", "real_task"]
    assert not [name for name, section in sections.items() if "error" in section]
    assert sections["device"]["device"] == "cpu"
    # The batched crop + flip on the device reads the CPU's pixels; the views gather reads row k·N + i.
    assert sections["augment"]["identical_to_cpu"] and sections["augment"]["views_gather_ok"]
    # Autocast is CUDA-only in kdtune: on the CPU both runs are the same run.
    assert sections["amp"]["loss_gap_epoch1"] == 0.0
    for mode in ("views", "online"):
        rates = sections["share"][mode]["per_process_samples_per_s"]
        assert len(rates) == 2 and all(rate > 0 for rate in rates), sections["share"]
    real = sections["real_task"]
    assert sorted(t["name"] for t in real["trials"]) == ["hard-w0.25", "hard-w0.5", "kd-w0.25", "kd-w0.5"]
    assert all(0.0 <= t["test_acc"] <= 1.0 and "error" not in t for t in real["trials"])
    # The same student sizes kd and hard: ResNet-8 x0.25 has 4,934 parameters on 28x28 greyscale.
    assert {t["params"] for t in real["trials"] if t["name"].endswith("w0.25")} == {4934}
    assert 0.0 <= real["teacher_test_acc"] <= 1.0
    assert real["published"]["networks"] and "Zalando" in real["published"]["source"]
