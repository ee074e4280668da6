"""End-to-end search through the CLI, and the decisions made before trials start."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from kdtune.cli import main
from kdtune.errors import ConfigError
from kdtune.records import load_records
from kdtune.study import trial_folder
from kdtune.search import plan_placement
from kdtune.spec import parse_spec
from kdtune.searcher import journal_storage
from tests.conftest import TINY_SPEC, assert_one_clean_error, write_spec


@pytest.mark.slow
def test_the_default_rule_stops_only_at_rungs_and_keeps_the_best_small_student(ray_session, tmp_path):
    # No early_stopping in the spec: a search over two widths gets pareto_asha (η=3).
    from kdtune.search import search

    spec = {key: value for key, value in TINY_SPEC.items() if key != "early_stopping"}
    spec = {**spec, "study": "default_rule", "num_samples": 8, "baselines": False,
            "space": {**TINY_SPEC["space"], "epochs": 8}}
    result = search(write_spec(tmp_path, spec), results_root=tmp_path / "results", log=lambda m: None)
    meta = json.loads((result.study_dir / "study.json").read_text())
    assert (meta["early_stopping"], meta["rungs"]) == ("pareto_asha", [1, 3])

    search_trials = result.trials[result.trials["phase"] == "search"].set_index("trial_id")
    assert len(search_trials) == 8
    assert set(search_trials["status"]) <= {"completed", "stopped_early"}
    assert (search_trials.loc[search_trials["status"] == "completed", "epochs_run"] == 8).all()
    # Decisions are taken only at the rungs.
    stopped = search_trials.loc[search_trials["status"] == "stopped_early", "epochs_run"]
    assert len(stopped) > 0 and set(stopped) <= {1, 3}
    # The smallest student with the lowest validation loss at rung 1 meets no smaller or
    # equal student that did better there, whatever the order trials arrived in; and with
    # every accuracy below 0.96, a perfect student of the smallest size would add more
    # than 1 - 0.96 = 4% to the front's hypervolume: it goes on.
    history = result.history[result.history["phase"] == "search"]
    assert history["val_acc"].max() < 0.96
    at_rung_1 = history[(history["epoch"] == 1) & (history["width"] == 8)]
    best_small = at_rung_1.loc[at_rung_1["val_loss"].idxmin(), "trial_id"]
    assert search_trials.loc[best_small, "epochs_run"] > 1
    assert set(load_records(result.study_dir, "search")) == set(search_trials.index)


@pytest.mark.slow
def test_cli_search_on_digits_writes_a_complete_study(ray_session, tmp_path):
    spec = {**TINY_SPEC, "study": "e2e", "num_samples": 8,
            "space": {**TINY_SPEC["space"], "width": {"choice": [4, 16, 64]}},
            "early_stopping": {"rule": "size_aware_asha", "grace_period": 1, "reduction_factor": 3}}
    spec_path = write_spec(tmp_path, spec)
    results = tmp_path / "results"
    outcome = CliRunner().invoke(main, ["search", str(spec_path), "--results", str(results)])
    assert outcome.exit_code == 0, outcome.output
    assert "validation Pareto front" in outcome.output

    study = results / "e2e"
    for name in ("spec.yaml", "study.json", "optuna.journal", "trials.parquet", "history.parquet"):
        assert (study / name).is_file(), name
    assert any((study / "search").glob("experiment_state-*.json"))
    assert any((study / "teacher").glob("*/logits.npy"))
    meta = json.loads((study / "study.json").read_text())
    assert meta["state"] == "complete" and meta["teacher"]["params"] > 0

    trials = pd.read_parquet(study / "trials.parquet")
    search = trials[trials["phase"] == "search"]
    assert len(search) == 8 and search["trial_id"].is_unique
    assert set(search["status"]) <= {"completed", "stopped_early"}
    # Size-aware stopping keeps at least one student of every width to the end.
    assert set(search.loc[search["status"] == "completed", "width"]) == {4, 16, 64}
    baselines = trials[trials["phase"] == "baseline"]
    assert sorted(baselines["width"]) == [4, 16, 64]
    assert (baselines["alpha"] == 1.0).all() and (baselines["status"] == "completed").all()
    completed = search[search["status"] == "completed"]
    gains = completed["val_acc"] - completed["width"].map(baselines.set_index("width")["val_acc"])
    assert completed["kd_gain"].to_numpy() == pytest.approx(gains.to_numpy())

    history = pd.read_parquet(study / "history.parquet")
    epochs_per_trial = history[history["phase"] == "search"].groupby("trial_id")["epoch"].agg(list)
    for trial_id, epochs in epochs_per_trial.items():
        expected_run = int(search.set_index("trial_id").loc[trial_id, "epochs_run"])
        assert epochs == list(range(1, expected_run + 1))

    # Optuna saw early-stopped trials as PRUNED, full-budget ones as COMPLETE.
    loaded = optuna.load_study(study_name="e2e", storage=journal_storage(study / "optuna.journal"))
    states = {t.user_attrs["ray_trial_id"]: t.state for t in loaded.trials}
    for row in search.itertuples():
        expected = optuna.trial.TrialState.COMPLETE if row.status == "completed" else optuna.trial.TrialState.PRUNED
        assert states[row.trial_id] == expected, row.trial_id
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        row = search.set_index("trial_id").loc[t.user_attrs["ray_trial_id"]]
        assert t.values == pytest.approx([row["val_acc"], row["params"]])

    # Trials reported to Ray only at the rungs and their last epoch: Ray's result
    # log has those epochs, the history every epoch (checked above).
    assert meta["rungs"] == [1, 3]
    for row in search.itertuples():
        logged = [json.loads(line)["epoch"] for line in trial_folder(study, row.trial_id).joinpath(
            "result.json").read_text().splitlines()]
        assert logged == [e for e in meta["rungs"] if e < row.epochs_run] + [row.epochs_run], (row.trial_id, logged)
    # Every trial, search and baseline, has its record: config, every report, status.
    for phase, rows in (("search", search), ("baseline", baselines)):
        records = load_records(study, phase)
        assert set(records) == set(rows["trial_id"])
        for row in rows.itertuples():
            record = records[row.trial_id]
            assert record["ray_status"] == "TERMINATED" and record["error"] is None
            assert record["results"][-1]["epoch"] == row.epochs_run
            assert record["results"][-1]["val_acc"] == pytest.approx(row.val_acc)

    # Ray restores a search with its original number of trials: asking for another
    # number on resume is refused before anything starts, naming the stored one.
    again = CliRunner().invoke(main, ["search", str(spec_path), "--results", str(results), "--resume",
                                      "--num-samples", "20"])
    assert_one_clean_error(again, "--num-samples 20", "started with 8 trials")


def _spec(**resources):
    return parse_spec({"resources": resources})


def test_placement_fills_the_cpus_and_sets_concurrency():
    placement = plan_placement(_spec(cpus=1), {"CPU": 8.0}, num_samples=40)
    assert placement.max_concurrent == 8 and placement.device == "cpu" and placement.threads == 1
    assert plan_placement(_spec(cpus=2), {"CPU": 8.0}, num_samples=3).max_concurrent == 3


def test_fractional_gpus_bound_concurrency_and_select_cuda():
    placement = plan_placement(_spec(cpus=2, gpus=0.5), {"CPU": 16.0, "GPU": 2.0}, num_samples=40)
    assert placement.resources == {"cpu": 2, "gpu": 0.5}
    assert placement.device == "cuda" and placement.max_concurrent == 4


def test_gpus_on_a_cpu_only_cluster_fall_back_with_a_warning():
    placement = plan_placement(_spec(cpus=1, gpus=1), {"CPU": 2.0}, num_samples=5)
    assert placement.resources["gpu"] == 0 and placement.device == "cpu"
    assert any("no GPU" in note for note in placement.warnings)


def test_more_gpus_per_trial_than_the_cluster_has_is_an_error():
    with pytest.raises(ConfigError, match="resources.gpus"):
        plan_placement(_spec(gpus=4), {"CPU": 16.0, "GPU": 2.0}, num_samples=5)


def test_explicit_max_concurrent_trials_wins():
    assert plan_placement(_spec(cpus=1, max_concurrent_trials=1), {"CPU": 8.0}, 10).max_concurrent == 1


def test_gpus_missing_on_a_joined_cluster_is_an_error_not_a_cpu_fallback():
    with pytest.raises(ConfigError, match="no GPU registered"):
        plan_placement(_spec(cpus=1, gpus=1), {"CPU": 64.0}, num_samples=5, joined_cluster=True)


@pytest.mark.slow
def test_validating_at_rungs_only_makes_the_same_decisions_and_scores(ray_session, tmp_path):
    # Two searches that differ only in early_stopping.validate_at, one trial at a time
    # with a seeded random sampler: the same trials, stopped at the same rungs, with
    # the same final scores; the rungs search leaves the epochs nobody reads unscored.
    from kdtune.search import search

    base = {**TINY_SPEC, "num_samples": 4, "sampler": {"name": "random"},
            "resources": {"cpus": 1, "max_concurrent_trials": 1},
            "space": {**TINY_SPEC["space"], "epochs": 6}}
    studies = {}
    for mode in ("every_epoch", "rungs"):
        spec = {**base, "study": f"validate_{mode}",
                "early_stopping": {**TINY_SPEC["early_stopping"], "validate_at": mode}}
        studies[mode] = search(write_spec(tmp_path, spec, f"{mode}.yaml"), results_root=tmp_path / "results",
                               log=lambda m: None)
    rungs = json.loads((studies["rungs"].study_dir / "study.json").read_text())["rungs"]
    assert rungs == [1, 2, 4]  # grace 1, η = 2, 6 epochs

    def outcomes(result):
        trials = result.trials.sort_values(["phase", "width", "temperature"], na_position="first")
        return trials[["phase", "width", "temperature", "status", "epochs_run", "val_acc"]].reset_index(drop=True)

    pd.testing.assert_frame_equal(outcomes(studies["every_epoch"]), outcomes(studies["rungs"]))
    history = studies["rungs"].history
    last = history.groupby("trial_id")["epoch"].transform("max")
    search_rows = history["phase"] == "search"
    scored = history["val_acc"].notna()
    # Search trials: scored at the rungs and at their last epoch, at no other epoch.
    expected = (history["epoch"].isin(rungs) | (history["epoch"] == last))
    assert (scored[search_rows] == expected[search_rows]).all()
    assert (~scored[search_rows]).any()  # epochs 3 and 5 of the trials that ran on
    # Baselines and race runs are read at their end only, in either mode.
    for result in studies.values():
        rows = result.history[result.history["phase"] == "baseline"]
        rows_last = rows.groupby("trial_id")["epoch"].transform("max")
        assert len(rows) and (rows["val_acc"].notna() == (rows["epoch"] == rows_last)).all()
    # The training itself is the same: the per-epoch training losses agree.
    every = studies["every_epoch"].history
    key = ["phase", "width", "temperature", "epoch"]
    merged = every[key + ["train_loss"]].merge(history[key + ["train_loss"]], on=key, suffixes=("_every", "_rungs"))
    assert len(merged) == len(history)
    assert (merged["train_loss_every"] == merged["train_loss_rungs"]).all()


def test_a_trial_validating_at_rungs_scores_its_rungs_and_checkpoint_epochs():
    from kdtune.search.trainable import validated_epochs

    assert validated_epochs({"report_epochs": [1, 3]}, 0, 13) is None  # every epoch, the default
    epochs = validated_epochs({"validate_at": "rungs", "report_epochs": [1, 3, 9]}, checkpoint_every=4, epochs=13)
    # The run itself always scores the last epoch; these are the others.
    assert sorted(epochs) == [1, 3, 4, 8, 9, 12]
    assert validated_epochs({"validate_at": "rungs"}, 0, 5) == frozenset()
