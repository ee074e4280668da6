"""Results commands on a real (tiny) finished search: tables, report, best-t."""

from __future__ import annotations

import shutil
import subprocess
import sys

import matplotlib.image as mpimg
from click.testing import CliRunner

from kdtune.analysis import best_temperature, load_history, load_results, untested_sizes
from kdtune.cli import main
from tests.conftest import assert_one_clean_error


def test_trials_parquet_reads_with_plain_pandas_without_kdtune(tiny_study):
    study_dir, result = tiny_study
    code = (
        "import sys, pandas as pd\n"
        f"df = pd.read_parquet({str(study_dir / 'trials.parquet')!r})\n"
        "assert 'kdtune' not in sys.modules\n"
        "print(len(df), ','.join(df.columns))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    rows, columns = out.stdout.strip().split(" ", 1)
    assert int(rows) == len(result.trials)
    assert {"trial_id", "status", "temperature", "params", "val_acc", "kd_gain"} <= set(columns.split(","))


def test_load_results_and_history_match_the_search_result(tiny_study):
    study_dir, result = tiny_study
    trials = load_results(study_dir)
    assert trials["trial_id"].tolist() == result.trials["trial_id"].tolist()
    history = load_history(study_dir)
    # One history row per epoch each trial ran.
    per_trial = history.groupby("trial_id").size()
    assert per_trial.to_dict() == trials.set_index("trial_id")["epochs_run"].to_dict()


def test_load_results_of_several_studies_keeps_a_study_column(tiny_study, tmp_path):
    study_dir, result = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    both = load_results([study_dir, copy])
    assert len(both) == 2 * len(result.trials) and "study" in both.columns


def test_report_command_writes_summary_and_images(tiny_study, tmp_path):
    study_dir, _ = tiny_study
    out = tmp_path / "report"
    outcome = CliRunner().invoke(main, ["report", str(study_dir), "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    assert "Pareto" in (out / "summary.md").read_text()
    for name in ("pareto.png", "accuracy_vs_temperature.png", "learning_curves.png"):
        image = mpimg.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.01  # not a blank canvas


def test_best_t_command_prints_a_row_per_width(tiny_study):
    study_dir, result = tiny_study
    outcome = CliRunner().invoke(main, ["best-t", str(study_dir)])
    assert outcome.exit_code == 0, outcome.output
    assert "recommended_t" in outcome.output
    completed = result.trials.query("phase == 'search' and status == 'completed'")
    table_lines = [line for line in outcome.output.splitlines() if line.strip()[:1].isdigit()]
    buckets = {line.split()[0] for line in table_lines}
    assert buckets == {f"{w:g}" for w in completed["width"].unique()}
    # Sizes whose temperatures cannot be compared are named once, with the evidence there is.
    untested = untested_sizes(best_temperature(load_results(study_dir)))
    hint = [line for line in outcome.output.splitlines() if line.startswith("too few trials")]
    assert len(hint) == (1 if untested else 0), outcome.output
    if untested:
        searched = int((result.trials["phase"] == "search").sum())
        assert hint[0].split(":")[0].endswith(", ".join(f"{w:g}" for w in untested))
        assert f"{len(completed)} of {searched} search trials ran their full budget" in hint[0]


def test_best_t_on_a_complete_study_without_full_budget_trials_says_so(tiny_study, tmp_path):
    # A finished study whose every trial stopped early: nothing to resume, nothing to rank.
    study_dir, result = tiny_study
    copy = tmp_path / "all_stopped"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("search", "baselines", "records"))
    trials = result.trials.assign(status="stopped_early")
    trials.to_parquet(copy / "trials.parquet", index=False)
    outcome = CliRunner().invoke(main, ["best-t", str(copy)])
    stderr = assert_one_clean_error(outcome, "no search trial has completed", "stopped early")
    assert "--resume" not in stderr
