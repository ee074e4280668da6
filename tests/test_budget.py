"""A compute budget for ``kdtune search``: once spent, no new trial starts, the
running ones finish, the baselines run, and the study is complete."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import TINY_SPEC, write_spec
from kdtune.cli import main
from kdtune.search.plan import Budget, parse_budget


def test_budget_text_is_epochs_or_time():
    assert parse_budget("500") == Budget(epochs=500)
    assert parse_budget("2h") == Budget(seconds=7200.0)
    assert parse_budget("1.5h") == Budget(seconds=5400.0)
    assert parse_budget("90m") == Budget(seconds=5400.0)
    assert Budget(epochs=10).spent(10, 0.0) and not Budget(epochs=10).spent(9, 1e9)
    assert Budget(seconds=60).spent(0, 60.0) and not Budget(seconds=60).spent(1e9, 59.0)


@pytest.mark.parametrize("text", ["lots", "0", "-3", "2d", "h"])
def test_a_bad_budget_is_one_clear_error(text, tmp_path):
    path = write_spec(tmp_path, TINY_SPEC)
    outcome = CliRunner().invoke(main, ["search", str(path), "--budget", text, "--results", str(tmp_path / "r")])
    assert outcome.exit_code == 2 and "--budget" in outcome.output
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
def test_a_spent_epoch_budget_stops_sampling_and_completes_the_study(ray_session, tmp_path):
    spec = {**TINY_SPEC, "study": "budget", "num_samples": 8, "resources": {"cpus": 1, "max_concurrent_trials": 1},
            "early_stopping": {"rule": "none"}}
    path = write_spec(tmp_path, spec)
    outcome = CliRunner().invoke(main, ["search", str(path), "--budget", "6", "--results", str(tmp_path / "r")])
    assert outcome.exit_code == 0, outcome.output
    study_dir = tmp_path / "r" / "budget"
    meta = json.loads((study_dir / "study.json").read_text())
    trials = pd.read_parquet(study_dir / "trials.parquet")
    search = trials[trials["phase"] == "search"]
    # One trial at a time, 4 epochs each: the budget of 6 is spent after the second trial.
    assert len(search) == 2 and meta["state"] == "complete"
    assert meta["budget"] == {"epochs": 6, "seconds": None}
    assert meta["epochs_spent"]["search"] == 8
    assert meta["epochs_spent"]["baseline"] == 4 * (trials["phase"] == "baseline").sum()


def test_the_epochs_of_a_trial_stopped_early_count_toward_the_budget(tmp_path):
    """Ray gives the result a scheduler stops a trial on only to the searcher's
    on_trial_complete, not to on_trial_result (ray.tune's TuneController): a trial
    stopped at its first rung must still count its epoch."""
    from test_faults import small_searcher

    searcher = small_searcher(tmp_path, budget=Budget(epochs=4))
    for trial_id in ("a", "b", "c"):
        searcher.suggest(trial_id)
    # a reports epoch 1 and continues, then completes at 3 (3 epochs); b is stopped at epoch 1.
    searcher.on_trial_result("a", {"epoch": 1, "val_acc": 0.5, "params": 10})
    assert not searcher.budget_spent()
    searcher.on_trial_complete("b", {"epoch": 1, "epochs": 3, "status": "running", "val_acc": 0.2, "params": 10})
    assert not searcher.budget_spent()  # 1 + 1
    searcher.on_trial_complete("a", {"epoch": 3, "epochs": 3, "status": "completed", "val_acc": 0.6, "params": 10})
    assert searcher.budget_spent()  # 3 + 1 = 4
    assert searcher.suggest("d") == "FINISHED"
