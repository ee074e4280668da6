"""A study's Optuna journal opens in optuna-dashboard, as `optuna-dashboard results/<study>/optuna.journal` does.

The dashboard is driven through its public WSGI entry point (``optuna_dashboard.wsgi``,
which resolves a file path with the same storage loader as the command line) and
its JSON API, without starting a server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pandas as pd
import pytest

optuna_dashboard = pytest.importorskip(
    "optuna_dashboard", reason="the test extra installs optuna-dashboard: pip install -e '.[test]'")


def get_json(app, path: str) -> dict:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
    status: list[str] = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status and status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


@pytest.mark.ray
def test_the_study_journal_opens_in_optuna_dashboard(tiny_study, tmp_path):
    study = Path(shutil.copytree(tiny_study[0], tmp_path / "study", ignore=shutil.ignore_patterns(".lock")))
    journal = study / "optuna.journal"
    app = optuna_dashboard.wsgi(str(journal))  # a plain path, as given on the command line

    summaries = get_json(app, "/api/studies")["study_summaries"]
    meta = json.loads((study / "study.json").read_text())
    (listed,) = [s for s in summaries if s["study_name"] == meta["study"]]
    assert listed["directions"] == ["maximize", "minimize"]  # val_acc up, params down

    detail = get_json(app, f"/api/studies/{listed['study_id']}")
    search = pd.read_parquet(study / "trials.parquet").query("phase == 'search'")
    assert len(detail["trials"]) == len(search) == meta["num_samples"]
    by_id = search.set_index("trial_id")
    for trial in detail["trials"]:
        ray_id = {a["key"]: a["value"] for a in trial["user_attrs"]}["ray_trial_id"]
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        assert float(params["temperature"]) == pytest.approx(by_id.loc[ray_id, "temperature"])
        assert float(params["width"]) == by_id.loc[ray_id, "width"]
        if by_id.loc[ray_id, "status"] == "completed":
            assert trial["state"] == "Complete"
            assert trial["values"] == pytest.approx([by_id.loc[ray_id, "val_acc"], by_id.loc[ray_id, "params"]])
