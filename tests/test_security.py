"""Security: what kdtune asks of Ray, who may use the cluster it starts, what it loads
and where it writes.

- The ``ray.init`` arguments kdtune builds never touch token authentication and
  start the dashboard only on request, bound to 127.0.0.1.
- A live ``kdtune search`` cluster refuses a client without its token or with a
  wrong one (the code it submits never runs) and accepts one with it; and the
  search writes only under its results folder and Ray's temp dir. Both use the
  crash-and-resume scenario of tests/test_faults.py (fixture ``chain_run``, run
  once per session), so they start no Ray of their own.
- A pickle bomb offered as a teacher checkpoint and a YAML spec with a
  ``!!python`` tag are refused, and their code does not run.
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from kdtune.cli import main
from kdtune.errors import ConfigError
from kdtune.models import build_model
from kdtune.search import ray_auth_environment, ray_init_kwargs
from kdtune.teacher import load_checkpoint
from tests.conftest import REPO
from tests.test_faults import chain_run, tiny_spec  # noqa: F401 - chain_run is a fixture shared with test_faults


# --------------------------------------------------------------------------- ray.init


def test_local_default_keeps_token_auth_and_starts_no_dashboard():
    kwargs = ray_init_kwargs(None, dashboard=False, num_cpus=4)
    assert kwargs["include_dashboard"] is False and "dashboard_host" not in kwargs
    assert kwargs["num_cpus"] == 4 and "address" not in kwargs
    # Nothing that could switch authentication off: no system config, no auth option.
    assert not [k for k in kwargs if k.startswith("_") or "auth" in k.lower()]


def test_dashboard_only_on_request_and_only_on_localhost():
    kwargs = ray_init_kwargs(None, dashboard=True)
    assert kwargs["include_dashboard"] is True and kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["num_cpus"] == (os.cpu_count() or 1)


def test_joining_a_cluster_passes_its_address_and_no_resources():
    kwargs = ray_init_kwargs("10.0.0.5:6379", dashboard=False)
    assert kwargs["address"] == "10.0.0.5:6379" and "num_cpus" not in kwargs


def test_joining_an_explicit_address_sends_the_token_when_there_is_one(tmp_path):
    with_token, without = tmp_path / "with", tmp_path / "without"
    (with_token / ".ray").mkdir(parents=True)
    (with_token / ".ray" / "auth_token").write_text("t" * 64)
    without.mkdir()
    assert ray_auth_environment("10.0.0.5:6379", {}, with_token) == {"RAY_AUTH_MODE": "token"}
    assert ray_auth_environment("10.0.0.5:6379", {"RAY_AUTH_TOKEN": "abc"}, without) == {"RAY_AUTH_MODE": "token"}
    token_file = tmp_path / "token"
    token_file.write_text("t" * 64)
    assert ray_auth_environment("h:1", {"RAY_AUTH_TOKEN_PATH": str(token_file)}, without) == {"RAY_AUTH_MODE": "token"}
    # No token to send: nothing to set (the cluster will refuse, which is right).
    assert ray_auth_environment("10.0.0.5:6379", {}, without) == {}
    # Ray itself handles a local or "auto" cluster; an explicit mode is the user's.
    assert ray_auth_environment(None, {}, with_token) == {}
    assert ray_auth_environment("auto", {}, with_token) == {}
    assert ray_auth_environment("h:1", {"RAY_AUTH_MODE": "token"}, with_token) == {}


def test_kdtune_never_sets_ray_auth_mode_to_disabled():
    assignment = re.compile(r"RAY_AUTH_MODE\W{0,6}disabled")
    offending = [(path.name, line.strip()) for path in (REPO / "kdtune").glob("*.py")
                 for line in path.read_text().splitlines() if assignment.search(line)]
    assert offending == []


# --------------------------------------------------------------------------- a live cluster


@pytest.mark.slow
def test_a_running_kdtune_cluster_refuses_clients_without_its_token(chain_run):
    """The cluster of a real ``kdtune search`` (the last run of tests/test_faults.py's
    crash-and-resume scenario, its driver paused) is probed by three clients at once."""
    probe = chain_run["probe"]
    for name in ("no_token", "wrong_token"):
        output = probe["outputs"][name]
        assert "REFUSED" in output and "RESULT" not in output, output[-2000:]
        # Refused by the cluster for the token, not for some other reason.
        assert "Authentication token is missing or incorrect" in output, output[-2000:]
        assert probe["ran"][name] is None, f"work submitted with {name} ran on the cluster"
    # The owner, joining the way `kdtune search --address` does, gets in.
    assert "RESULT planted" in probe["outputs"]["the_token"], probe["outputs"]["the_token"][-2000:]
    assert probe["ran"]["the_token"] == "code ran on the cluster"
    # No dashboard (Ray's HTTP server that accepts jobs): its process runs in minimal
    # mode, listening on no port at all.
    dashboards = [(cmd, ports) for cmd, ports in probe["listening"] if "dashboard/dashboard.py" in cmd]
    assert dashboards and all("--minimal" in cmd and not ports for cmd, ports in dashboards), dashboards
    assert not [cmd for cmd, ports in probe["listening"] if 8265 in ports]


@pytest.mark.slow
def test_a_search_writes_only_under_its_results_folder_and_rays_temp_dir(chain_run):
    """Four runs of one study (two SIGKILLed, one interrupted) with their own HOME,
    TMPDIR and working folder: list what they left outside the results folder."""
    written = chain_run["written"]
    assert written["cwd"] == ["results", "spec.yaml"]
    assert written["results"] == ["chain"]
    # TMPDIR: Ray's temp dir and Ray Tune's lock files, and the empty cache folder
    # torch.optim makes on its first step.
    torch_cache = f"torchinductor_{getpass.getuser()}"
    # Ray Tune imports its W&B and MLflow integrations to count the callbacks a Tuner gets
    # (ray.air._internal.usage.tag_callbacks), and importing wandb, where it is installed
    # (the test extra brings it), makes two empty temp folders: allowed, if empty.
    wandb_temp = {name for name in written["tmpdir"]
                  if name.startswith("tmp") and name.endswith(("wandb-artifacts", "wandb-media"))}
    assert all(not written["tmpdir"][name] for name in wandb_temp), written["tmpdir"]
    assert set(written["tmpdir"]) - wandb_temp <= {"ray", "_ray_lockfiles", torch_cache}, written["tmpdir"]
    assert not written["tmpdir"].get(torch_cache)
    # HOME: Ray's auth token (made by ray.init), and matplotlib's per-user font cache
    # (kdtune.report imports matplotlib; the CLI uses it for the front's table).
    home = set(written["home"])
    libraries = {p for p in home if p.split("/")[:2] in ([".cache", "matplotlib"], [".config", "matplotlib"])}
    assert home - libraries - {".cache", ".config"} == {".ray", ".ray/auth_token"}, sorted(home)


# --------------------------------------------------------------------------- files


class _PickleBomb:
    """Runs code when unpickled: what a malicious ``.pt`` file does to ``torch.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_pickle_bomb_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bomb = tmp_path / "teacher.pt"
    state = build_model("mlp", (1, 8, 8), 10, 64, depth=2).state_dict()
    torch.save({**state, "extra": _PickleBomb(marker)}, bomb)
    model = build_model("mlp", (1, 8, 8), 10, 64, depth=2)
    with pytest.raises(ConfigError, match="weights-only"):
        load_checkpoint(model, bomb)
    assert not marker.exists()

    spec = tiny_spec("bomb", teacher={"family": "mlp", "width": 64, "options": {"depth": 2}, "checkpoint": str(bomb)})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    for command in (["validate", str(spec_path)], ["search", str(spec_path), "--results", str(tmp_path / "results")]):
        outcome = CliRunner().invoke(main, command)
        assert outcome.exit_code == 2 and "teacher.checkpoint" in outcome.stderr and "Traceback" not in outcome.stderr
    assert not marker.exists() and not (tmp_path / "results").exists()

    # The bomb is real: an unsafe load runs it.
    torch.load(bomb, weights_only=False)
    assert marker.read_text() == "pwned"


def test_a_yaml_spec_with_python_tags_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"study: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').write('pwned')\"]\n"
    )
    for command in (["validate", str(spec_path)], ["search", str(spec_path), "--results", str(tmp_path / "results")]):
        outcome = CliRunner().invoke(main, command)
        assert outcome.exit_code == 2, outcome.output
        assert "not valid YAML" in outcome.stderr and "python/object" in outcome.stderr
    assert not marker.exists() and not (tmp_path / "results").exists()

    # The tag is real: an unsafe loader runs it.
    yaml.unsafe_load(spec_path.read_text())
    assert marker.read_text() == "pwned"
