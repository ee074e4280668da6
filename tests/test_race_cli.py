"""``kdtune best-t RESULTS --race`` for real on digits: a tiny race, killed mid-way
and resumed, matches the uninterrupted race with the same seeds; bad input is one
clear error."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import TINY_SPEC, assert_one_clean_error, write_spec
from kdtune.cli import main
from kdtune.study import RACE_CONTENDERS_TABLE, RACE_TABLE, load_records
from kdtune.tables import read_csv_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RACE_ARGS = ["--race", "--widths", "8", "--max-seeds", "3", "--grid", "3"]


@pytest.fixture(scope="module")
def raced_study(ray_session, tmp_path_factory):
    """A tiny finished study (one width), raced once without interruption."""
    root = tmp_path_factory.mktemp("race")
    spec = {**TINY_SPEC, "study": "racing", "num_samples": 3, "baselines": False,
            "space": {**TINY_SPEC["space"], "width": 8}, "early_stopping": {"rule": "none"}}
    outcome = CliRunner().invoke(main, ["search", str(write_spec(root, spec)), "--results", str(root / "results")])
    assert outcome.exit_code == 0, outcome.output
    study = root / "results" / "racing"
    pristine = root / "pristine"
    shutil.copytree(study, pristine)
    raced = CliRunner().invoke(main, ["best-t", str(study), *RACE_ARGS])
    assert raced.exit_code == 0, raced.output
    return study, pristine, raced.output


def test_a_race_writes_its_verdict_tables_and_plot(raced_study):
    study, _, output = raced_study
    best = read_csv_table(study / RACE_TABLE)
    contenders = pd.read_csv(study / RACE_CONTENDERS_TABLE)
    assert list(best["width"]) == [8.0] and best["verdict"].str.len().gt(20).all()
    # Three temperatures over [1, 10] (log-spaced, T = 1 included) and the baseline.
    assert len(contenders) == 4 and contenders["baseline"].sum() == 1
    assert contenders.loc[~contenders["baseline"], "contender"].astype(float).min() == 1.0
    assert (study / "race" / "best_t.png").is_file()
    assert "race cost:" in output and "width 8:" in output
    # Every run of the race has its record, one per contender and round.
    runs = Counter((r["config"]["race"]["contender"], r["config"]["race"]["round"])
                   for r in load_records(study, "race").values())
    assert set(runs.values()) == {1} and len(runs) == int(best["runs"].iloc[0])


def test_evaluate_race_retrains_each_sizes_winner_with_fresh_seeds_on_the_test_split(raced_study, tmp_path):
    study, _, _ = raced_study
    copy = tmp_path / "evaluated"
    shutil.copytree(study, copy)
    outcome = CliRunner().invoke(main, ["evaluate", str(copy), "--race", "--seeds", "2"])
    assert outcome.exit_code == 0, outcome.output
    best = read_csv_table(copy / RACE_TABLE)
    final = read_csv_table(copy / "race" / "final.csv")
    runs = read_csv_table(copy / "race" / "final_runs.csv")
    assert not (copy / "final.csv").exists()  # the front's evaluation is another file
    assert list(final["width"]) == [8.0] and final["param"].iloc[0] == "temperature"
    winner = best["recommended"].iloc[0]
    assert final["recommended"].iloc[0] == winner and final["trial_id"].iloc[0] == best["best_trial"].iloc[0]
    distilled = runs[runs["role"] == "distilled"]
    if winner.startswith("no distillation"):
        assert final["alpha"].iloc[0] == 1.0 and final["kd_gain_mean"].iloc[0] == 0.0
    else:
        assert final["temperature"].iloc[0] == pytest.approx(float(winner))
        assert final["kd_gain_mean"].iloc[0] == pytest.approx(
            final["test_acc_mean"].iloc[0] - final["baseline_test_acc_mean"].iloc[0])
    # Fresh seeds: neither the search's nor the race's own.
    used = {r["config"]["seed"] for phase in ("search", "race") for r in load_records(copy, phase).values()}
    assert len(set(distilled["seed"])) == 2 and not set(distilled["seed"]) & used
    assert distilled["test_acc"].between(0, 1).all()


def test_a_race_can_score_on_the_training_images_no_student_saw(raced_study, tmp_path):
    _, pristine, _ = raced_study
    copy = tmp_path / "pool"
    shutil.copytree(pristine, copy)
    outcome = CliRunner().invoke(main, ["best-t", str(copy), "--race", "--widths", "8", "--max-seeds", "3",
                                        "--grid", "2", "--score-pool"])
    assert outcome.exit_code == 0, outcome.output
    best = read_csv_table(copy / RACE_TABLE)
    contenders = pd.read_csv(copy / RACE_CONTENDERS_TABLE)
    records = list(load_records(copy, "race").values())
    # digits: 1,077 training images, 150 of them the students' subset; 360 validation images.
    scored_on = "the 360 validation images and the 927 training images no student saw"
    assert best["scored_on"].tolist() == [scored_on] and scored_on in best["verdict"].iloc[0]
    assert records and all(r["config"]["score_pool"] for r in records)
    # Each contender's mean is the mean of its runs' pooled accuracy, not of their validation accuracy.
    for contender, group in contenders.groupby("contender"):
        finals = [r["results"][-1] for r in records if str(r["config"]["race"]["contender"]) == str(contender)]
        assert all(f["pool_n"] == 927 for f in finals)
        pooled = sum(f["val_pool_acc"] for f in finals) / len(finals)
        assert group["mean"].iloc[0] == pytest.approx(pooled)
    assert_one_clean_error(CliRunner().invoke(main, ["best-t", str(copy), "--score-pool"]), "goes with --race")
    # Resuming it without the flag would mix two scores: refused.
    assert_one_clean_error(CliRunner().invoke(main, ["best-t", str(copy), "--race", "--widths", "8", "--resume"]),
                           "--score-pool", "resume it the same way")


def test_evaluate_race_without_a_race_is_one_clear_error(raced_study, tmp_path):
    _, pristine, _ = raced_study
    copy = tmp_path / "unraced"
    shutil.copytree(pristine, copy)
    assert_one_clean_error(CliRunner().invoke(main, ["evaluate", str(copy), "--race"]), "no race to evaluate")


def test_a_killed_race_resumes_without_rerunning_and_matches_the_uninterrupted_one(raced_study, tmp_path):
    study, pristine, _ = raced_study
    copy = tmp_path / "racing"
    shutil.copytree(pristine, copy)
    records = copy / "records" / "race"
    proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli", "best-t", str(copy), *RACE_ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(records.glob("*.json"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.name for p in records.glob("*.json")}
    assert 0 < len(before), "the race should have recorded some runs before the kill"
    resumed = CliRunner().invoke(main, ["best-t", str(copy), *RACE_ARGS, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    runs = Counter((r["config"]["race"]["contender"], r["config"]["race"]["round"])
                   for r in load_records(copy, "race").values())
    assert set(runs.values()) == {1}, "a run was repeated"
    expected = pd.read_csv(study / RACE_CONTENDERS_TABLE)
    got = pd.read_csv(copy / RACE_CONTENDERS_TABLE)
    pd.testing.assert_frame_equal(got, expected)


@pytest.mark.parametrize("args, needles", [
    (["--param", "tempreature"], ["tempreature", "temperature"]),
    (["--param", "lr"], ["--param lr", "did not search"]),
    (["--widths", "1000"], ["--widths", "1000", "8"]),
])
def test_bad_race_input_is_one_clear_error(raced_study, args, needles):
    study, _, _ = raced_study
    assert_one_clean_error(CliRunner().invoke(main, ["best-t", str(study), "--race", *args]), *needles)


def test_a_race_needs_a_completed_trial(tmp_path):
    study = tmp_path / "unfinished"
    study.mkdir()
    (study / "study.json").write_text('{"study": "unfinished", "state": "interrupted"}')
    write_spec(study, TINY_SPEC)
    records = study / "records" / "search"
    records.mkdir(parents=True)
    (records / "t1.json").write_text('{"trial_id": "t1", "phase": "search", "ray_status": "TERMINATED", '
                                     '"config": {"width": 8, "epochs": 4}, "results": [{"epoch": 1, "val_acc": 0.5, '
                                     '"status": "running"}], "error": null}')
    assert_one_clean_error(CliRunner().invoke(main, ["best-t", str(study), "--race"]), "no search trial has completed")
