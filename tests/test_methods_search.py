"""The distillation method is searched too: DKD and DIST as registered objectives with
their own hyperparameters, drawn only when their method is (a conditional space)."""

from __future__ import annotations

import math
import shutil

import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from ray import cloudpickle

from conftest import TINY_SPEC, write_spec
from kdtune.cli import main
from kdtune.core.distill import RunConfig, run
from kdtune.core.losses import distillation_loss, dkd_loss, standardize_logits
from kdtune.search.sampler import ConditionalSpace, KdOptunaSearch
from kdtune.search.sampler import to_optuna_distribution as dist_of
from kdtune.spec import parse_spec
from kdtune.study import load_records
from kdtune.tables import read_csv_table


def test_published_recipes_are_expressible_as_published():
    """DKD: CE 1 + 1·TCKD + 8·NCKD; logit standardization: CE 0.1 + 9·KD on z-scored logits."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y)
    dkd = distillation_loss(s, t, y, 4.0, 0.5, soft_loss_kind="dkd",
                            params={"ce_weight": 1.0, "kd_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0})
    assert torch.allclose(dkd, ce + dkd_loss(s, t, y, 4.0, 1.0, 8.0))
    ls = distillation_loss(s, t, y, 2.0, 0.5, soft_loss_kind="kd",
                           params={"ce_weight": 0.1, "kd_weight": 9.0, "standardize": True})
    zs, zt = standardize_logits(s), standardize_logits(t)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.softmax(zt / 2, -1), reduction="batchmean")
    assert torch.allclose(ls, 0.1 * ce + 9.0 * 4.0 * kl, rtol=1e-5)


def test_dkd_warm_up_ramps_its_term_over_the_first_epochs():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    params = {"ce_weight": 0.0, "kd_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup": 4}
    full = dkd_loss(s, t, y, 3.0, 1.0, 2.0)
    for epoch, factor in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        value = distillation_loss(s, t, y, 3.0, 0.5, soft_loss_kind="dkd", params={**params, "epoch": epoch})
        assert torch.allclose(value, factor * full)


@pytest.mark.parametrize("method, extra", [("dkd", {"dkd_beta": 4.0, "dkd_warmup": 2}),
                                           ("dist", {"dist_beta": 2.0, "dist_gamma": 2.0}),
                                           ("kd", {"standardize": True, "ce_weight": 0.1, "kd_weight": 9.0})])
def test_the_fused_path_trains_like_the_reference_loss(digits, one_torch_thread, method, extra):
    """A run on cached logits (fused) and the same run through distillation_loss (autograd,
    the online path) end with the same metrics up to float rounding."""
    from kdtune.core.distill import TeacherTargets

    teacher_logits = torch.randn(len(digits.train), 10, generator=torch.Generator().manual_seed(3)) * 3
    common = dict(width=8, temperature=3.0, alpha=0.5, lr=1e-2, batch_size=32, epochs=3, train_subset=150,
                  soft_loss=method, **extra)

    class Fixed(torch.nn.Module):  # an "online" teacher that returns the cached logits by sample
        feature_dim = 1

        def forward_features(self, x):
            rows = [lookup[tuple(r.flatten().tolist())] for r in x]
            return teacher_logits[rows], None

    lookup = {tuple(x.flatten().tolist()): i for i, x in enumerate(digits.train.x)}
    fused = run(RunConfig(**common), digits, TeacherTargets(logits=teacher_logits.numpy()))
    reference = run(RunConfig(**common), digits, TeacherTargets(online_model=Fixed()))
    assert fused.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-3)
    assert fused.metrics["val_acc"] == pytest.approx(reference.metrics["val_acc"], abs=0.02)


def test_a_method_s_parameters_are_drawn_only_when_the_method_is():
    spec = parse_spec({"space": {"method": {"choice": ["kd", "dkd", "dist"]}, "dkd_beta": {"loguniform": [1, 10]},
                                 "dist_gamma": {"uniform": [0.5, 2]}}})
    distributions = {n: dist_of(v) for n, v in spec.space.searched().items()}
    space = ConditionalSpace(distributions, {"dkd_beta": "dkd", "dist_gamma": "dist"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        space(trial)
        method = trial.params["soft_loss"]
        assert ("dkd_beta" in trial.params) == (method == "dkd")
        assert ("dist_gamma" in trial.params) == (method == "dist")
        study.tell(trial, 0.5)
    assert {t.params["soft_loss"] for t in study.trials} == {"kd", "dkd", "dist"}
    # Ray pickles the searcher, and its define-by-run space, with the experiment (for --resume).
    searcher = KdOptunaSearch(space=space, metric="val_acc", mode="max",
                              sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
    restored = cloudpickle.loads(cloudpickle.dumps(searcher))
    assert "soft_loss" in restored.suggest("t1")


@pytest.mark.ray
def test_a_search_over_methods_end_to_end(ray_session, tmp_path):
    spec = {**TINY_SPEC, "study": "methods", "num_samples": 9, "baselines": False,
            "early_stopping": {"rule": "none"}, "sampler": {"name": "random"},
            "space": {**TINY_SPEC["space"], "width": 8, "epochs": 2,
                      "method": {"choice": ["kd", "dkd", "dist"]}, "dkd_beta": {"uniform": [1.0, 8.0]},
                      "dist_gamma": {"uniform": [0.5, 2.0]}}}
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results", str(tmp_path / "r")])
    assert outcome.exit_code == 0, outcome.output
    trials = pd.read_parquet(tmp_path / "r" / "methods" / "trials.parquet")
    assert set(trials["soft_loss"]) == {"kd", "dkd", "dist"}
    assert (trials["status"] == "completed").all()
    # Every student's size in MACs too: one forward pass of the width-8 MLP, in × out per linear layer.
    assert (trials["macs"] == trials["macs"].iloc[0]).all() and trials["macs"].iloc[0] > trials["params"].iloc[0] / 2
    for row in trials.itertuples():
        # A method's own hyperparameters are NaN for the others, not a made-up value.
        assert math.isnan(row.dkd_beta) == (row.soft_loss != "dkd")
        assert math.isnan(row.dist_gamma) == (row.soft_loss != "dist")
    study = optuna.load_study(study_name="methods", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "r" / "methods" / "optuna.journal"))))
    for trial in study.trials:
        assert ("dkd_beta" in trial.params) == (trial.params["soft_loss"] == "dkd")
    # The methods race at the best trial, through the CLI: every method (and no distillation) a
    # contender, each run that method at the best trial's other hyperparameters, verdicts by name.
    raced = CliRunner().invoke(main, ["best-t", str(tmp_path / "r" / "methods"), "--race", "--param", "soft_loss",
                                      "--max-seeds", "3"])
    assert raced.exit_code == 0, raced.output
    contenders = pd.read_csv(tmp_path / "r" / "methods" / "race" / "contenders.csv")
    assert set(contenders["contender"]) == {"kd", "dkd", "dist", "no distillation (α=1)"}
    best = read_csv_table(tmp_path / "r" / "methods" / "race" / "best_t.csv")
    assert best["verdict"].str.len().gt(20).all() and "width 8:" in raced.output
    held = trials.sort_values("val_acc", ascending=False).iloc[0]
    for record in load_records(tmp_path / "r" / "methods", "race").values():
        config = record["config"]
        if config["race"]["contender"] in ("kd", "dkd", "dist"):
            assert config["soft_loss"] == config["race"]["contender"]
            assert config["temperature"] == pytest.approx(held["temperature"])
    # Every method at every T of a 2-point grid (T = 1 and 10), through the CLI, on a copy of the study.
    pair = tmp_path / "pair" / "methods"
    shutil.copytree(tmp_path / "r" / "methods", pair, ignore=shutil.ignore_patterns(".lock", "race", "race_runs"))
    raced = CliRunner().invoke(main, ["best-t", str(pair), "--race", "--param", "soft_loss,temperature",
                                      "--grid", "2", "--max-seeds", "3"])
    assert raced.exit_code == 0, raced.output
    contenders = pd.read_csv(pair / "race" / "contenders.csv")
    assert set(contenders["contender"]) == {f"{m}, T={t}" for m in ("kd", "dkd", "dist") for t in (1, 10)} | {
        "no distillation (α=1)"}
    best = read_csv_table(pair / "race" / "best_t.csv")
    assert best["beyond"].str.startswith("soft_loss ").all() and best["beyond"].str.contains("beyond T").all()
    for record in load_records(pair, "race").values():
        config, label = record["config"], record["config"]["race"]["contender"]
        if label != "no distillation (α=1)":
            assert label == f"{config['soft_loss']}, T={config['temperature']:g}"
            assert config["alpha"] == pytest.approx(held["alpha"])  # the best trial's other values


def test_a_temperature_curriculum_follows_its_schedule_and_keeps_the_fused_path_exact(digits, one_torch_thread):
    """T from 4 down to 1 over the budget: values written out from the formula; a fused
    run on cached logits (per-T tables) equals the same run through the reference loss."""
    from kdtune.core.distill import TeacherTargets
    from kdtune.core.schedules import Schedule, parse_schedule

    spec = parse_schedule({"kind": "ramp", "end_factor": 0.25}, "temperature_schedule")
    assert Schedule(4.0, 4, spec).values() == pytest.approx([4.0, 3.0, 2.0, 1.0])
    cosine = Schedule(4.0, 3, parse_schedule({"kind": "ramp", "end_factor": 0.25, "shape": "cosine"}, "t"))
    assert cosine.values() == pytest.approx([4.0, 2.5, 1.0])
    teacher_logits = torch.randn(len(digits.train), 10, generator=torch.Generator().manual_seed(5)) * 3
    common = dict(width=8, temperature=4.0, alpha=0.3, lr=1e-2, batch_size=32, epochs=3, train_subset=150,
                  temperature_schedule=spec)
    lookup = {tuple(x.flatten().tolist()): i for i, x in enumerate(digits.train.x)}

    class Fixed(torch.nn.Module):
        feature_dim = 1

        def forward_features(self, x):
            return teacher_logits[[lookup[tuple(r.flatten().tolist())] for r in x]], None

    fused = run(RunConfig(**common), digits, TeacherTargets(logits=teacher_logits.numpy()))
    reference = run(RunConfig(**common), digits, TeacherTargets(online_model=Fixed()))
    constant = run(RunConfig(**{**common, "temperature_schedule": None}), digits,
                   TeacherTargets(logits=teacher_logits.numpy()))
    assert fused.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-3)
    assert fused.metrics["train_loss"] != pytest.approx(constant.metrics["train_loss"], rel=1e-3)


#: The published settings, as the papers' configs give them (mdistiller KD and DKD,
#: logit-standardization-KD, DIST_KD), written out here independently of kdtune's table.
PUBLISHED = {
    "kd": {"soft_loss": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False},
    "kd+standardize": {"soft_loss": "kd", "temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0,
                       "standardize": True},
    "dkd": {"soft_loss": "dkd", "temperature": 4.0, "ce_weight": 1.0, "kd_weight": 1.0, "dkd_alpha": 1.0,
            "dkd_beta": 8.0, "dkd_warmup": 20},
    "dist": {"soft_loss": "dist", "temperature": 4.0, "ce_weight": 1.0, "kd_weight": 2.0, "dist_beta": 1.0,
             "dist_gamma": 1.0},
}


def test_a_recipe_race_trains_each_method_as_published_at_the_best_trial_s_budget(tiny_study, tmp_path):

    study = tmp_path / "tiny"
    shutil.copytree(tiny_study[0], study, ignore=shutil.ignore_patterns(".lock", "race", "race_runs", "final*.csv"))
    raced = CliRunner().invoke(main, ["best-t", str(study), "--race", "--param", "recipe", "--widths", "8",
                                      "--max-seeds", "3"])
    assert raced.exit_code == 0, raced.output
    contenders = pd.read_csv(study / "race" / "contenders.csv")
    assert set(contenders["contender"]) == {*PUBLISHED, "no distillation (α=1)"}
    trials = pd.read_parquet(study / "trials.parquet")
    search = trials[(trials["phase"] == "search") & (trials["status"] == "completed") & (trials["width"] == 8)]
    held = search.sort_values("val_acc", ascending=False).iloc[0]
    seen = set()
    for record in load_records(study, "race").values():
        config = record["config"]
        label = config["race"]["contender"]
        if label in PUBLISHED:
            seen.add(label)
            for key, value in PUBLISHED[label].items():
                assert config[key] == value, (label, key)
            assert config["beta"] == 0.0 and config["noise"] == 0.0
            # The size's own budget and optimisation, from its best trial.
            assert (config["width"], config["lr"], config["epochs"]) == (8, held["lr"], held["epochs_run"])
    assert seen == set(PUBLISHED)
    # The race's winner is evaluated as it was raced (recipe included).
    evaluated = CliRunner().invoke(main, ["evaluate", str(study), "--race", "--seeds", "1", "--workers", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    assert (study / "race" / "final.csv").exists()


def test_a_recipe_must_set_declared_hyperparameters_to_allowed_values():
    from kdtune.core.objectives import LOSSES, register_objective

    with pytest.raises(ValueError, match="recipe 'bad' sets temperature=-1"):
        register_objective("bad_recipe_loss", recipes={"bad": {"temperature": -1.0}})(lambda s, t, y, p: s.sum())
    assert "bad_recipe_loss" not in LOSSES
    with pytest.raises(ValueError, match="not soft_loss"):
        register_objective("bad_recipe_loss", recipes={"x": {"soft_loss": "kd"}})(lambda s, t, y, p: s.sum())
