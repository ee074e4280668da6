"""Adding a distillation loss with a weight of its own is one registration: this
module registers a toy loss and runs it end to end through ``kdtune search``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_SPEC, write_spec
from kdtune.cli import main
from kdtune.core.objectives import LOSSES, Hyperparameter, hyperparameter_table, register_objective
from kdtune.core.losses import distillation_loss


def toy_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
           params: Mapping[str, Any]) -> torch.Tensor:
    """toy_weight · mean |softmax(s/T) − softmax(t/T)|, summed over classes."""
    t = params["temperature"]
    gap = torch.softmax(student_logits.float() / t, -1) - torch.softmax(teacher_logits.float() / t, -1)
    return params["toy_weight"] * gap.abs().sum(-1).mean()


@pytest.fixture
def toy_loss():
    register_objective("toy_l1", hyperparameters=(
        Hyperparameter("toy_weight", "float", 1.0, minimum=0.0, search_default=1.0),))(toy_l1)
    yield
    LOSSES.unregister("toy_l1")


def test_a_registered_loss_declares_its_weight_and_computes_the_soft_term(toy_loss):
    assert "toy_weight" in hyperparameter_table()
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss = distillation_loss(s, t, labels, 2.0, 0.25, soft_loss_kind="toy_l1", params={"toy_weight": 3.0})
    ce = torch.nn.functional.cross_entropy(s, labels)
    gap = (torch.softmax(s / 2, -1) - torch.softmax(t / 2, -1)).abs().sum(-1).mean()
    assert torch.allclose(loss, 0.25 * ce + 0.75 * 3.0 * gap)


@pytest.mark.ray
def test_a_toy_loss_runs_end_to_end_through_kdtune_search(toy_loss, ray_session, tmp_path):
    spec = {**TINY_SPEC, "study": "toy", "num_samples": 3, "baselines": False,
            "space": {**TINY_SPEC["space"], "soft_loss": "toy_l1", "toy_weight": {"uniform": [0.5, 2.0]},
                      "width": 8, "epochs": 2},
            "early_stopping": {"rule": "none"}}
    path = write_spec(tmp_path, spec)
    outcome = CliRunner().invoke(main, ["search", str(path), "--results", str(tmp_path / "results")])
    assert outcome.exit_code == 0, outcome.output
    trials = pd.read_parquet(tmp_path / "results" / "toy" / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    assert set(trials["soft_loss"]) == {"toy_l1"}
    assert trials["toy_weight"].between(0.5, 2.0).all() and trials["toy_weight"].nunique() == 3
