"""A study written before the layered redesign still resumes and still reports.

``tests/fixtures/legacy_study`` was written by kdtune at commit 5a61ec3 with
``tests/fixtures/make_legacy_study.py``: a tiny digits search interrupted with
Ctrl-C after two trials had ended. Its Ray experiment pickles the searcher
(``kdtune.searcher.KdOptunaSearch``), the rule (``kdtune.scheduler.ParetoASHA``)
and callbacks that call ``kdtune.records`` and ``kdtune.tables`` helpers, all by
their old module paths. Ray's pickles also hold the study's absolute path, so the
fixture is resumed where it was written, ``/tmp/kdtune-legacy-fixture``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REPO
from kdtune.cli import main

FIXTURE = REPO / "tests" / "fixtures" / "legacy_study"
WRITTEN_AT = Path("/tmp/kdtune-legacy-fixture")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def resumed(ray_session):
    shutil.rmtree(WRITTEN_AT, ignore_errors=True)
    shutil.copytree(FIXTURE, WRITTEN_AT)
    study_dir = WRITTEN_AT / "results" / "legacy"
    before = {p.name: p.read_bytes() for p in (study_dir / "records" / "search").glob("*.json")}
    outcome = CliRunner().invoke(main, ["search", str(study_dir / "spec.yaml"), "--resume", "--name", "legacy",
                                        "--results", str(WRITTEN_AT / "results")])
    yield study_dir, before, outcome
    shutil.rmtree(WRITTEN_AT, ignore_errors=True)


def test_the_fixture_was_interrupted_by_the_old_code():
    meta = json.loads((FIXTURE / "results" / "legacy" / "study.json").read_text())
    assert meta["state"] == "interrupted" and meta["num_samples"] == 6
    assert (FIXTURE / "results" / "legacy" / "search" / "tuner.pkl").is_file()
    assert b"kdtune.searcher" in (FIXTURE / "results" / "legacy" / "search" / "tuner.pkl").read_bytes()


def test_an_old_study_resumes_to_the_end_without_rerunning_finished_trials(resumed):
    study_dir, before, outcome = resumed
    assert outcome.exit_code == 0, outcome.output
    assert json.loads((study_dir / "study.json").read_text())["state"] == "complete"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    search = trials[trials["phase"] == "search"]
    assert len(search) == 6 and search["status"].isin(["completed", "stopped_early"]).all()
    # The trials that had ended before the interruption kept their records, byte for byte.
    after = {p.name: p.read_bytes() for p in (study_dir / "records" / "search").glob("*.json")}
    assert {name: after[name] for name in before} == before
    assert len(after) == 6
    assert (trials["phase"] == "baseline").sum() == 2


def test_results_commands_work_on_the_resumed_old_study(resumed):
    study_dir, _, outcome = resumed
    assert outcome.exit_code == 0, outcome.output
    runner = CliRunner()
    for args in (["report", str(study_dir)], ["best-t", str(study_dir)],
                 ["evaluate", str(study_dir), "--seeds", "1"],
                 ["export", str(study_dir), "--pareto-index", "0"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    assert (study_dir / "summary.md").is_file() and (study_dir / "final.csv").is_file()
    assert any((study_dir / "exports").iterdir())
