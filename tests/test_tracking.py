"""Experiment tracking from kdtune's trial records: MLflow for real (a sqlite store), read back with mlflow.search_runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import assert_one_clean_error
from kdtune.cli import main
from kdtune.errors import ConfigError, KdtuneError
from kdtune.results.tracking import check_tracker_available, default_mlflow_uri, log_study_to_mlflow

mlflow = pytest.importorskip("mlflow", reason="the test extra installs mlflow: pip install -e '.[test]'")

EPOCH_METRICS = ["val_acc", "val_loss", "train_loss", "params", "bytes", "epoch_time_s", "samples_per_s"]


def copy_study(source: Path, parent: Path) -> Path:
    return Path(shutil.copytree(source, parent / source.name, ignore=shutil.ignore_patterns(".lock", "mlflow.db")))


def runs_of(uri: str, experiment: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], max_results=10_000)
    finally:
        mlflow.set_tracking_uri(None)


def history_points(uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    client = mlflow.tracking.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


@pytest.fixture(scope="module")
def study(tiny_study, tmp_path_factory) -> Path:
    return copy_study(tiny_study[0], tmp_path_factory.mktemp("tracking"))


@pytest.fixture(scope="module")
def logged(study):
    """The study logged once to its default store."""
    return log_study_to_mlflow(study)


@pytest.mark.ray
def test_one_parent_run_and_one_nested_run_per_trial_with_every_epoch(study, logged):
    trials = pd.read_parquet(study / "trials.parquet")
    history = pd.read_parquet(study / "history.parquet")
    meta = json.loads((study / "study.json").read_text())
    assert logged.location == f"sqlite:///{study.resolve()}/mlflow.db" == default_mlflow_uri(study)
    assert (study / "mlflow.db").is_file()
    runs = runs_of(logged.location, meta["study"])

    parents = runs[runs["tags.kdtune.role"] == "study"]
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["run_id"] == logged.study_run and parent["status"] == "FINISHED"
    assert parent["metrics.teacher_val_acc"] == pytest.approx(meta["teacher"]["val_acc"])
    assert parent["metrics.teacher_params"] == meta["teacher"]["params"]
    assert parent["params.space.epochs"] == "4" and parent["params.student.family"] == "mlp"

    nested = runs[runs["tags.kdtune.role"] == "trial"]
    assert (nested["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    assert sorted(nested["tags.kdtune.trial_id"]) == sorted(trials["trial_id"])  # every trial ended: one run each
    assert sorted(logged.logged) == sorted(trials["trial_id"]) and logged.skipped == []
    by_trial = nested.set_index("tags.kdtune.trial_id")
    for row in trials.itertuples():
        run = by_trial.loc[row.trial_id]
        assert run["tags.kdtune.status"] == row.status and run["tags.kdtune.phase"] == row.phase
        assert float(run["params.width"]) == row.width and float(run["params.alpha"]) == row.alpha
        epochs = history[history["trial_id"] == row.trial_id].sort_values("epoch")
        assert len(epochs) == row.epochs_run
        for metric in EPOCH_METRICS:
            points = history_points(logged.location, run["run_id"], metric)
            # Every scored epoch, and only those (a baseline scores its validation at its end only).
            scored = epochs[epochs[metric].notna()]
            assert [step for step, _ in points] == scored["epoch"].astype(int).tolist(), (row.trial_id, metric)
            assert [value for _, value in points] == pytest.approx(scored[metric].astype(float).tolist())
            if row.phase == "search" or metric == "train_loss":
                assert len(points) == row.epochs_run
        assert run["metrics.summary.best_val_acc"] == pytest.approx(epochs["val_acc"].max())
        # MLflow's latest value of a metric is the last epoch's.
        assert run["metrics.val_acc"] == pytest.approx(row.val_acc)


@pytest.mark.ray
def test_logging_again_adds_only_trials_not_logged_yet(study, logged):
    meta = json.loads((study / "study.json").read_text())
    again = log_study_to_mlflow(study)
    assert again.logged == [] and sorted(again.skipped) == sorted(logged.logged)
    assert again.study_run == logged.study_run
    before = runs_of(logged.location, meta["study"])
    assert len(before) == 1 + len(logged.logged)


@pytest.mark.ray
def test_a_trial_ending_later_or_a_half_written_run_is_logged_once(study, tmp_path):
    """As after a resumed search: a record that appears later is logged on the next call;
    a run that an interrupted call left without its completion tag is replaced."""
    copy = copy_study(study, tmp_path)
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    record = sorted((copy / "records" / "search").glob("*.json"))[0]
    held = record.read_bytes()
    record.unlink()
    first = log_study_to_mlflow(copy, tracking_uri=uri, experiment="resumed")
    assert record.stem not in first.logged
    record.write_bytes(held)
    client = mlflow.tracking.MlflowClient(uri)
    # An interrupted call: the first trial's run created, its completion tag never set.
    complete = runs_of(uri, "resumed").set_index("tags.kdtune.trial_id").loc[first.logged[0], "run_id"]
    client.delete_run(complete)
    half = client.create_run(client.get_experiment_by_name("resumed").experiment_id, tags={
        "mlflow.parentRunId": first.study_run, "kdtune.role": "trial", "kdtune.trial_id": first.logged[0]})
    second = log_study_to_mlflow(copy, tracking_uri=uri, experiment="resumed")
    assert sorted(second.logged) == sorted([record.stem, first.logged[0]])
    assert client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    runs = runs_of(uri, "resumed")
    trial_runs = runs[runs["tags.kdtune.role"] == "trial"]
    assert trial_runs["tags.kdtune.trial_id"].is_unique and len(trial_runs) == len(first.logged) + 1
    assert not (copy / "mlflow.db").exists()  # the URI given was used, not the default


@pytest.mark.ray
def test_cli_track_logs_to_the_given_uri(study, tmp_path):
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(main, ["track", str(study), "--uri", uri])
    assert result.exit_code == 0, result.output
    assert f"mlflow ui --backend-store-uri {uri}" in result.output
    runs = runs_of(uri, json.loads((study / "study.json").read_text())["study"])
    assert (runs["tags.kdtune.role"] == "study").sum() == 1
    if importlib.util.find_spec("wandb") is None:
        outcome = CliRunner().invoke(main, ["track", str(study), "--tracker", "wandb"])
        assert_one_clean_error(outcome, "pip install 'kdtune[wandb]'")


def test_check_tracker_available():
    check_tracker_available("mlflow")  # installed by the test extra
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; allowed: mlflow, wandb"):
        check_tracker_available("neptune")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_tracker_package_is_one_clear_error():
    with pytest.raises(KdtuneError, match=r"tracking with wandb needs the optional wandb package.*kdtune\[wandb\]"):
        check_tracker_available("wandb")


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (optional extra kdtune[wandb]; the test extra brings it)")
def test_wandb_offline_logs_each_trial_once(study, tmp_path, monkeypatch):
    from kdtune.results.tracking import log_study_to_wandb

    copy = copy_study(study, tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = log_study_to_wandb(copy, mode="offline")
    trials = pd.read_parquet(copy / "trials.parquet")
    assert sorted(first.logged) == sorted(trials["trial_id"])
    assert len(list((copy / "wandb").glob("offline-run-*"))) == len(trials) + 1  # + the study run
    again = log_study_to_wandb(copy, mode="offline")
    assert again.logged == [] and sorted(again.skipped) == sorted(first.logged)


@pytest.mark.ray
def test_a_search_with_tracking_logs_the_study_when_it_ends(ray_session, tmp_path):
    """``tracking:`` in the spec: the study is in MLflow when ``kdtune search`` returns."""
    import mlflow
    from click.testing import CliRunner

    from conftest import TINY_SPEC, write_spec
    from kdtune.cli import main

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    spec = {**TINY_SPEC, "study": "tracked", "num_samples": 2, "baselines": False,
            "early_stopping": {"rule": "none"}, "tracking": {"tracker": "mlflow", "uri": uri}}
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results", str(tmp_path / "r")])
    assert outcome.exit_code == 0, outcome.output
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert len(runs) == 3  # the study's parent run and one nested run per trial


def test_an_unknown_tracker_is_refused_before_anything_starts(tmp_path):
    from click.testing import CliRunner

    from conftest import TINY_SPEC, assert_one_clean_error, write_spec
    from kdtune.cli import main

    spec = {**TINY_SPEC, "tracking": {"tracker": "neptune"}}
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results", str(tmp_path / "r")])
    assert_one_clean_error(outcome, "tracking.tracker", "neptune", "mlflow")
    assert not (tmp_path / "r").exists()
