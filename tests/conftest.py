"""Shared fixtures: one local Ray instance and one tiny finished study per test session.

Starting Ray costs seconds on a 2-core machine, so every in-process search in
the suite shares one instance (kdtune.search reuses an initialised Ray), and the
tests that only read a finished study share one small digits search.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import Result

#: The repository root.
REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = {
    "study": "tiny",
    "seed": 0,
    "num_samples": 6,
    "data": {"dataset": "digits", "train_subset": 150},
    "teacher": {"family": "mlp", "width": 256, "options": {"depth": 2}, "epochs": 8, "lr": 0.002},
    "student": {"family": "mlp", "options": {"depth": 2}},
    "space": {
        "temperature": {"loguniform": [1, 10]},
        "alpha": {"uniform": [0.0, 0.5]},
        "noise": 0.0,
        "width": {"choice": [8, 32]},
        "lr": 0.01,
        "batch_size": 32,
        "epochs": 4,
    },
    "sampler": {"name": "tpe", "n_startup_trials": 4},
    "early_stopping": {"rule": "size_aware_asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpus": 1},
    "baselines": True,
}


def assert_one_clean_error(outcome: Result, *needles: str) -> str:
    """Exit 2, nothing on stdout, one error line on stderr naming ``needles``, no traceback."""
    assert outcome.exit_code == 2, (outcome.exit_code, outcome.output, outcome.exception)
    assert outcome.stdout == "", outcome.stdout
    stderr = outcome.stderr
    assert "Traceback" not in stderr
    starts = [line for line in stderr.splitlines() if line.startswith(("kdtune: error:", "Error:"))]
    assert len(starts) == 1, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    """Write a spec dict as YAML into ``folder`` and return its path."""
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes extra threads spin."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits():
    """The bundled digits dataset with kdtune's default split (tests only read it)."""
    from kdtune.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the whole test session (token auth left on)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_study(ray_session, tmp_path_factory):
    """A finished tiny search on digits: (study_dir, SearchResult)."""
    from kdtune.search import search

    root = tmp_path_factory.mktemp("tiny_results")
    spec_path = write_spec(root, TINY_SPEC)
    result = search(spec_path, results_root=root / "results", log=lambda m: None)
    return result.study_dir, result
