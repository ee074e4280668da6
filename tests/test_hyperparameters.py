"""One hyperparameter table drives the spec, the run config, the tables and the baseline."""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch
import pytest

from kdtune.core.distill import RunConfig
from kdtune.core.objectives import CORE_HYPERPARAMETERS, baseline_values, hyperparameter_table
from kdtune.core.teacher import TeacherConfig
from kdtune.errors import ConfigError
from kdtune.search.plan import baseline_configs
from kdtune.spec import TeacherSpec, parse_spec
from kdtune.tables import config_columns


def test_the_table_keeps_the_order_optuna_draws_in():
    # Reordering the table would change every seeded search's draws.
    # The first ten are the first version's, in its order; new ones only ever go after them.
    assert [hp.name for hp in CORE_HYPERPARAMETERS][:10] == [
        "temperature", "alpha", "beta", "noise", "width", "lr", "weight_decay", "batch_size", "epochs", "soft_loss"]
    spec = parse_spec({"space": {"lr": {"loguniform": [0.001, 0.1]}, "noise": {"uniform": [0, 1]}}})
    assert list(spec.space.searched()) == ["temperature", "alpha", "noise", "width", "lr"]


def test_a_misspelt_run_config_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"width": 8, "temprature": 4.0})
    assert "temprature" in str(error.value) and "temperature" in str(error.value)


def test_run_config_values_are_checked_against_the_declarations():
    with pytest.raises(ConfigError, match="alpha"):
        RunConfig(alpha=1.5).validate()
    with pytest.raises(ConfigError, match="one of: dist, dkd, kd, kl, logit_mse"):
        RunConfig(soft_loss="cosine").validate()


def test_the_soft_loss_choices_come_from_the_losses_registry():
    with pytest.raises(Exception) as error:
        parse_spec({"space": {"soft_loss": "cosine"}})
    assert "dist, dkd, kd, kl, logit_mse" in str(error.value)


def test_columns_and_baseline_come_from_the_table():
    assert config_columns() == [*hyperparameter_table(), "seed"]
    # Written out independently: what a no-distillation baseline fixes.
    assert baseline_values() == {"temperature": 1.0, "alpha": 1.0, "beta": 0.0, "noise": 0.0,
                                 "ce_weight": 1.0, "kd_weight": 0.0}


def test_baselines_copy_the_tuned_hyperparameters_of_their_width():
    spec = parse_spec({"baselines": "all", "space": {"width": {"choice": [8, 16]},
                                                     "lr": {"loguniform": [0.001, 0.1]}, "epochs": 5}})
    trials = pd.DataFrame([
        {"status": "completed", "width": 8, "val_acc": 0.9, "lr": 0.02},
        {"status": "completed", "width": 8, "val_acc": 0.8, "lr": 0.05},
    ])
    by_width = {c["width"]: c for c in baseline_configs(spec, trials)}
    assert by_width[8] == {"width": 8, "temperature": 1.0, "alpha": 1.0, "beta": 0.0, "noise": 0.0,
                           "ce_weight": 1.0, "kd_weight": 0.0, "lr": 0.02, "epochs": 5}
    assert by_width[16]["lr"] == pytest.approx(0.01)  # no completed trial: the geometric middle of [0.001, 0.1]


def test_teacher_spec_and_teacher_config_hold_the_same_settings():
    spec_fields = set(TeacherSpec.model_fields) - {"options"}
    config_fields = {f.name for f in dataclasses.fields(TeacherConfig)} - {"model_options"}
    assert spec_fields == config_fields
    config = TeacherSpec(family="cnn", width=16, options={"depth": 1}, epochs=3).to_config()
    assert (config.family, config.width, config.model_options, config.epochs) == ("cnn", 16, {"depth": 1}, 3)


def test_baselines_only_for_widths_with_a_completed_trial_unless_all_are_asked_for():
    trials = pd.DataFrame([
        {"status": "completed", "width": 8, "val_acc": 0.9, "lr": 0.02},
        {"status": "stopped_early", "width": 32, "val_acc": 0.5, "lr": 0.02},
    ])
    space = {"width": {"choice": [8, 16, 32]}, "epochs": 5}
    assert [c["width"] for c in baseline_configs(parse_spec({"space": space}), trials)] == [8]
    every = parse_spec({"space": space, "baselines": "all"})
    assert [c["width"] for c in baseline_configs(every, trials)] == [8, 16, 32]


def test_every_run_reports_its_macs_and_macs_can_be_the_size_objective(digits, one_torch_thread):
    from kdtune.core.distill import run

    result = run(RunConfig(width=8, alpha=1.0, epochs=1, train_subset=100, model_options={"depth": 2}), digits)
    linears = [m for m in result.student.modules() if isinstance(m, torch.nn.Linear)]
    # An MLP's multiply-accumulates on one sample: in × out of each linear layer.
    assert result.metrics["macs"] == sum(m.in_features * m.out_features for m in linears)
    assert parse_spec({"sampler": {"objectives": ["val_acc", "macs"]}}).sampler.objectives == ["val_acc", "macs"]
