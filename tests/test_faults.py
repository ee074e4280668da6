"""Searches survive faults and lose nothing: tests that inject the faults for real.

In-process searches (sharing the session's Ray): a trial that raises (retried
until it completes, or recorded as an error with its message once retries run
out), a trial whose loss becomes NaN (recorded as diverged, told to Optuna as
FAIL), the same spec run twice giving the same trials epoch by epoch, and a
corrupted teacher cache rebuilt on resume of the finished study.

Subprocess searches (each starts its own Ray, in its own process group, HOME and
TMPDIR): one study's crash-and-resume story (fixture ``chain_run``, run once per
session and shared with tests/test_security.py): SIGKILL after the teacher is
cached, SIGKILL after some trials finished, Ctrl-C, each time ``--resume``, until
it completes with every trial once and the Optuna journal agreeing with Ray; a
second search on the study while it is in use is refused. And a worker node lost
from a two-node cluster mid-search.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from kdtune.cli import main
from kdtune.records import load_records
from kdtune.searcher import journal_storage
from tests.conftest import REPO, write_spec

INJECTED = "injected fault at epoch 2: simulated CUDA out of memory"


def tiny_spec(study: str, **overrides) -> dict:
    """A digits search that takes seconds: tiny teacher, 3-epoch students."""
    spec = {
        "study": study,
        "seed": 0,
        "num_samples": 5,
        "data": {"dataset": "digits", "train_subset": 150},
        "teacher": {"family": "mlp", "width": 64, "options": {"depth": 2}, "epochs": 3, "lr": 0.003},
        "student": {"family": "mlp", "options": {"depth": 2}, "optimizer": "sgd"},
        "space": {
            "temperature": {"loguniform": [1, 10]},
            "alpha": {"uniform": [0.0, 0.5]},
            "width": {"choice": [16, 32]},
            "lr": 0.1,
            "batch_size": 16,
            "epochs": 3,
        },
        "sampler": {"name": "tpe", "n_startup_trials": 5},
        "early_stopping": {"rule": "none"},
        "resources": {"cpus": 1},
        "baselines": False,
    }
    spec.update(overrides)
    return spec


def all_journal_trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_dir.name, storage=journal_storage(study_dir / "optuna.journal"))
    return study.get_trials(deepcopy=False)


def journal_trials(study_dir: Path) -> dict[str, optuna.trial.FrozenTrial]:
    """The study's Optuna trials keyed by their Ray trial id; when a trial ran again
    after a restart (a later trial with ``rerun_of``), the latest one."""
    trials = {}
    for trial in all_journal_trials(study_dir):  # in order of number
        trials[trial.user_attrs.get("ray_trial_id", f"unlinked-{trial.number}")] = trial
    return trials


def result_lines(study_dir: Path) -> dict[str, list[dict]]:
    """Every ``result.json`` line Ray wrote for each search trial, by trial id."""
    lines = {}
    for path in sorted((study_dir / "search").glob("*/result.json")):
        # The trial id ends kdtune's folder name (w8-T4.62-a0.37-<id>).
        trial_id = path.parent.name.rsplit("-", 1)[-1]
        lines[trial_id] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def assert_journal_agrees_with_tables(study_dir: Path, trials: pd.DataFrame) -> None:
    """COMPLETE ↔ completed (same values), PRUNED ↔ stopped_early, FAIL ↔ diverged/error
    or lost in a crash, and nothing left RUNNING or WAITING."""
    journal = journal_trials(study_dir)
    search = trials[trials["phase"] == "search"].set_index("trial_id")
    expected = {"completed": TrialState.COMPLETE, "stopped_early": TrialState.PRUNED,
                "diverged": TrialState.FAIL, "error": TrialState.FAIL}
    for trial_id, row in search.iterrows():
        assert trial_id in journal, f"Ray trial {trial_id} is missing from the Optuna journal"
        assert journal[trial_id].state == expected[row["status"]], (trial_id, row["status"], journal[trial_id].state)
        if row["status"] == "completed":
            assert journal[trial_id].values == pytest.approx([row["val_acc"], row["params"]])
    extra = {k: t for k, t in journal.items() if k not in search.index}
    for key, trial in extra.items():
        # Only trials Ray lost in a driver crash may exist in the journal alone, marked FAIL.
        assert trial.state == TrialState.FAIL and trial.user_attrs.get("lost_on_restart"), (key, trial.state)
    everything = all_journal_trials(study_dir)
    superseded = {t.user_attrs["rerun_of"] for t in everything if "rerun_of" in t.user_attrs}
    latest = {t.number for t in journal.values()}
    # An earlier record of the same Ray trial must have been superseded by its rerun.
    assert {t.number for t in everything} - latest <= superseded
    assert not [t for t in everything if t.state in (TrialState.RUNNING, TrialState.WAITING)]


# --------------------------------------------------------------------------- in-process

FAULT_SPEC = tiny_spec(
    "faults",
    # With seed 6 the sampler draws lr 0.1, 0.1, 1e6, 0.1: two trials to take the
    # faults, one to diverge, one clean (the test checks this mix before relying on it).
    seed=6,
    num_samples=4,
    # Plain SGD at lr 1e6 with weight decay 1e-3 scales the weights by -1e3 every
    # step: the loss is NaN within the first epoch for any width, alpha or T.
    space={**tiny_spec("x")["space"], "lr": {"choice": [0.1, 1.0e6]}, "weight_decay": 1.0e-3},
    resources={"cpus": 1, "max_concurrent_trials": 1},
    # The draws above are TPE's when it draws the width too, and the first trials'
    # hyperparameters: with the width balanced (the default) the same seed draws
    # lr 1e6, 0.1, 1e6, 0.1; with first trials at the middle (size_scaled, the default, or
    # midpoint) each width's first trial takes the choice's first lr, 0.1.
    sampler={"name": "tpe", "n_startup_trials": 5, "balance_sizes": False, "first_trials": "random"},
    max_failures=1,
    # The first trial to reach epoch 2 raises once (one retry completes it), the
    # second raises twice (its one retry fails too: an error).
    faults={"raise_at_epoch": 2, "raise_times": [1, 2]},
)


@pytest.fixture(scope="module")
def fault_runs(request, ray_session, tmp_path_factory, cluster_run):
    """The fault spec searched twice under different names: (spec path, results root, logs).

    When the two-node cluster test is selected, its run starts first, in the
    background: it spends much of its time waiting, which these searches fill.
    """
    from kdtune.search import search

    if any(item.originalname == CLUSTER_TEST for item in request.session.items):
        cluster_run.start()
    root = tmp_path_factory.mktemp("faults")
    spec_path = write_spec(root, FAULT_SPEC)
    logs: dict[str, list[str]] = {}
    for name in ("faults", "faults_again"):
        logs[name] = []
        result = search(spec_path, name=name, results_root=root / "results", log=logs[name].append)
        assert not result.interrupted
    return spec_path, root / "results", logs


@pytest.mark.slow
def test_raising_and_diverging_trials_are_recorded_and_the_search_goes_on(fault_runs):
    _, results, _ = fault_runs
    study_dir = results / "faults"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    history = pd.read_parquet(study_dir / "history.parquet")
    assert len(trials) == FAULT_SPEC["num_samples"] and trials["trial_id"].is_unique

    # Which trials drew the faults: the slot files the trainable claimed.
    slots = {int(p.name.split("-")[1]): p.read_text() for p in (study_dir / "faults").glob("slot-*")}
    assert sorted(slots) == [0, 1], "two trials should have reached epoch 2 and raised"
    attempts = {slot: (study_dir / "faults" / f"trial-{tid}").read_text().split() for slot, tid in slots.items()}
    assert attempts == {0: ["0", "1"], 1: ["1", "2"]}
    by_id = trials.set_index("trial_id")

    retried = by_id.loc[slots[0]]
    assert retried["status"] == "completed" and retried["epochs_run"] == 3 and pd.isna(retried["error"])
    retried_history = history[history["trial_id"] == slots[0]]
    assert retried_history["epoch"].tolist() == [1, 2, 3]

    failed = by_id.loc[slots[1]]
    assert failed["status"] == "error"
    assert INJECTED in failed["error"] and failed["error"].startswith("RuntimeError")

    diverged = trials[trials["lr"] == 1.0e6]
    assert len(diverged) >= 1, "the seed should draw lr=1e6 at least once"
    assert (diverged["status"] == "diverged").all() and (diverged["epochs_run"] == 1).all()
    assert history[history["trial_id"].isin(diverged["trial_id"])]["train_loss"].isna().all()

    # The search went on around them: every other trial ran its full budget.
    others = trials[~trials["trial_id"].isin([slots[0], slots[1], *diverged["trial_id"]])]
    assert (others["status"] == "completed").all() and (others["epochs_run"] == 3).all()
    assert json.loads((study_dir / "study.json").read_text())["state"] == "complete"


@pytest.mark.slow
def test_optuna_is_told_fail_for_errors_and_divergence_and_values_for_completed(fault_runs):
    _, results, _ = fault_runs
    study_dir = results / "faults"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert set(trials["status"]) >= {"completed", "diverged", "error"}
    assert_journal_agrees_with_tables(study_dir, trials)
    journal = journal_trials(study_dir)
    for trial_id in trials.loc[trials["status"] == "diverged", "trial_id"]:
        assert journal[trial_id].state == TrialState.FAIL and journal[trial_id].params["lr"] == 1.0e6


def small_searcher(tmp_path: Path, **kwargs):
    """A two-objective KdOptunaSearch over one temperature, journal in ``tmp_path``."""
    from optuna.distributions import FloatDistribution

    from kdtune.searcher import KdOptunaSearch

    return KdOptunaSearch(space={"temperature": FloatDistribution(1.0, 10.0)}, metric=["val_acc", "params"],
                          mode=["max", "min"], sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
                          storage=journal_storage(tmp_path / "optuna.journal"), **kwargs)


def test_a_trial_run_again_after_a_restart_is_recorded_as_its_new_outcome(tmp_path):
    """A driver killed after telling Optuna a trial's outcome but before writing its
    record (kdtune/records.py) resumes with the trial still running: Ray runs it
    again, possibly to a different end. The journal, which already holds the first
    outcome and cannot change it, gets a new trial for the outcome Ray keeps."""
    def searcher():
        return small_searcher(tmp_path)

    first = searcher()
    config = first.suggest("t1")
    first.save(str(tmp_path / "searcher.pkl"))  # the last state Ray saved: t1 running
    first.on_trial_complete("t1", {"epoch": 1, "epochs": 3, "status": "running", "val_acc": 0.3, "params": 100})
    # The driver dies; --resume restores the older state and runs t1 to the end.
    second = searcher()
    second.restore(str(tmp_path / "searcher.pkl"))
    second.on_trial_complete("t1", {"epoch": 3, "epochs": 3, "status": "completed", "val_acc": 0.8, "params": 100})

    trials = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "optuna.journal")).trials
    assert [(t.state, t.values) for t in trials] == [(TrialState.PRUNED, None), (TrialState.COMPLETE, [0.8, 100.0])]
    assert trials[1].params == trials[0].params == {"temperature": config["temperature"]}
    assert trials[1].user_attrs == {"ray_trial_id": "t1", "rerun_of": 0}
    # The same outcome twice (a deterministic rerun) adds nothing.
    third = searcher()
    third.restore(str(tmp_path / "searcher.pkl"))
    third.on_trial_complete("t1", {"epoch": 1, "epochs": 3, "status": "running", "val_acc": 0.3, "params": 100})
    assert len(optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "optuna.journal")).trials) == 2


def test_a_restored_searcher_skips_recorded_trials_and_counts_those_ray_forgot(tmp_path):
    """After a SIGKILL, Ray's restored state may be behind: a trial it lists as running
    had ended (its record exists: the journal holds its outcome), and a trial it never
    heard of ran and ended after the state was saved. The first must not be told
    twice; the second still counts toward num_samples."""
    from ray.tune.search import Searcher

    from kdtune.records import records_dir, write_record

    folder = records_dir(tmp_path, "search")

    def searcher():
        return small_searcher(tmp_path, num_samples=4, records=folder)

    def end(search, trial_id: str, val_acc: float) -> None:
        result = {"epoch": 3, "epochs": 3, "status": "completed", "val_acc": val_acc, "params": 100}
        search.on_trial_complete(trial_id, result)
        write_record(folder, {"trial_id": trial_id, "ray_status": "TERMINATED", "results": [result]})

    first = searcher()
    first.suggest("t1")
    first.suggest("t2")
    first.save(str(tmp_path / "searcher.pkl"))  # the last state Ray saved: t1 and t2 running
    end(first, "t1", 0.5)
    first.suggest("t3")
    end(first, "t3", 0.7)
    # The driver dies. Ray restores the older state: t1 and t2 running, t3 unknown.
    second = searcher()
    second.restore(str(tmp_path / "searcher.pkl"))
    # t1 ends at once (kdtune.trainable skips recorded trials): Optuna is not told again.
    second.on_trial_complete("t1", {"epoch": 3, "epochs": 3, "status": "completed", "val_acc": 0.5, "params": 100})
    assert second.suggest("t4") is not None
    # t1, t2, t4 known to Ray + t3 recorded = 4 = num_samples: nothing more to suggest.
    assert second.suggest("t5") == Searcher.FINISHED
    end(second, "t2", 0.6)
    end(second, "t4", 0.8)
    trials = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "optuna.journal")).trials
    assert [(t.user_attrs["ray_trial_id"], t.state, t.values) for t in trials] == [
        ("t1", TrialState.COMPLETE, [0.5, 100.0]), ("t2", TrialState.COMPLETE, [0.6, 100.0]),
        ("t3", TrialState.COMPLETE, [0.7, 100.0]), ("t4", TrialState.COMPLETE, [0.8, 100.0])]


def test_the_record_is_written_before_optuna_is_told_and_a_kill_in_between_is_completed_from_it(tmp_path):
    """Ray tells the searcher a trial's outcome before its callbacks run. Were the
    journal written first, a driver killed before the record (and before Ray saved
    a state that knows the trial) would leave an outcome in the journal for a trial
    gone from the tables. The searcher has the record written first; a kill between
    the two leaves a RUNNING journal trial with a record, which the journal is told
    from on the next --resume."""
    from ray.tune.experiment import Trial

    from kdtune.search.callbacks import recording_callback
    from kdtune.search.sampler import reconcile_journal
    from kdtune.study import record_path, records_dir

    folder = records_dir(tmp_path, "search")
    recorder = recording_callback(tmp_path, "search")
    search = small_searcher(tmp_path, num_samples=3, records=folder)
    states_when_recorded = {}

    def journal(ray_id: str) -> optuna.trial.FrozenTrial:
        study = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "optuna.journal"))
        return next(t for t in study.trials if t.user_attrs["ray_trial_id"] == ray_id)

    def journal_state(ray_id: str) -> TrialState:
        return journal(ray_id).state

    def run(ray_id: str, result: dict, tell: bool) -> None:
        trial = Trial("distill_trainable", config=search.suggest(ray_id), trial_id=ray_id, stub=True)
        recorder.on_trial_start(0, [], trial)
        recorder.on_trial_result(0, [], trial, {**result, "config": trial.config})
        if tell:  # Ray's order: the searcher, then the callbacks
            search.on_trial_complete(ray_id, result)
            states_when_recorded[ray_id] = load_records(tmp_path, "search")[ray_id]
            recorder.on_trial_complete(0, [], trial)
        else:  # the searcher's own first step only, then the driver is killed
            from kdtune.search.callbacks import record_ended_trial
            assert record_ended_trial(folder, ray_id, error=False)

    done = {"epoch": 3, "epochs": 3, "status": "completed", "val_acc": 0.75, "params": 120}
    pruned = {"epoch": 1, "epochs": 3, "status": "running", "val_acc": 0.4, "params": 80}
    run("t1", done, tell=True)
    assert journal_state("t1") == TrialState.COMPLETE
    # The record the searcher had written before telling is the one kept, with the result once.
    assert states_when_recorded["t1"]["results"] == [done] == load_records(tmp_path, "search")["t1"]["results"]
    run("t2", pruned, tell=False)
    search.suggest("t3")  # asked, never run: Ray lost it with the driver
    assert journal_state("t2") == TrialState.RUNNING and record_path(folder, "t2").exists()

    records = load_records(tmp_path, "search")
    # On --resume, before the trials: t2 is told from its record; t3 waits (Ray may run it).
    assert reconcile_journal(tmp_path / "optuna.journal", "s", records, ["val_acc", "params"]) == (1, 0)
    assert journal_state("t2") == TrialState.PRUNED and journal_state("t3") == TrialState.RUNNING
    # At the end of the search t3 is not among Ray's trials: lost, FAIL.
    assert reconcile_journal(tmp_path / "optuna.journal", "s", records, ["val_acc", "params"], {"t1", "t2"}) == (0, 1)
    lost = journal("t3")
    assert lost.state == TrialState.FAIL and lost.user_attrs["lost_on_restart"] is True
    assert journal("t1").values == [0.75, 120.0]


def _by_trial_number(study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and history keyed by Optuna trial number (Ray trial ids are random per run)."""
    numbers = {tid: t.number for tid, t in journal_trials(study_dir).items()}
    trials = pd.read_parquet(study_dir / "trials.parquet")
    history = pd.read_parquet(study_dir / "history.parquet")
    trials["number"] = trials["trial_id"].map(numbers)
    history["number"] = history["trial_id"].map(numbers)
    trials = trials.sort_values("number").reset_index(drop=True)
    history = history.sort_values(["number", "epoch"]).reset_index(drop=True)
    return trials, history


@pytest.mark.slow
def test_same_spec_and_seed_give_the_same_trials_epoch_by_epoch(fault_runs):
    _, results, _ = fault_runs
    first_trials, first_history = _by_trial_number(results / "faults")
    second_trials, second_history = _by_trial_number(results / "faults_again")
    config = ["temperature", "alpha", "width", "lr", "status", "epochs_run", "params"]
    pd.testing.assert_frame_equal(first_trials[config], second_trials[config])
    metrics = ["number", "epoch", "val_acc", "val_loss", "train_loss"]
    pd.testing.assert_frame_equal(first_history[metrics], second_history[metrics], check_exact=True)
    assert first_history["val_acc"].nunique() > 3, "the runs should have learned something to compare"


@pytest.mark.slow
def test_corrupted_teacher_cache_is_rebuilt_on_resume_and_trials_are_kept(fault_runs):
    from kdtune.search import search

    spec_path, results, _ = fault_runs
    study_dir = results / "faults"
    before = pd.read_parquet(study_dir / "trials.parquet")
    lines_before = result_lines(study_dir)
    assert set(lines_before) == set(before.loc[before["phase"] == "search", "trial_id"])
    entry = next((study_dir / "teacher").glob("*/meta.json")).parent
    logits = entry / "logits.npy"
    original = np.load(logits)
    logits.write_bytes(logits.read_bytes()[: logits.stat().st_size // 2])  # truncated, as by a full disk

    log: list[str] = []
    result = search(spec_path, name="faults", resume=True, results_root=results, log=log.append)
    assert any("corrupted" in line and "rebuilding" in line for line in log), log
    meta = json.loads((entry / "meta.json").read_text())
    assert hashlib.sha256(logits.read_bytes()).hexdigest() == meta["files"]["logits.npy"]
    np.testing.assert_array_equal(np.load(logits), original)
    # Resuming a finished study runs nothing again and keeps every trial as it was.
    after = result.trials
    pd.testing.assert_frame_equal(
        before.sort_values("trial_id").reset_index(drop=True)[["trial_id", "status", "val_acc", "epochs_run"]],
        after.sort_values("trial_id").reset_index(drop=True)[["trial_id", "status", "val_acc", "epochs_run"]],
    )
    assert result_lines(study_dir) == lines_before


# --------------------------------------------------------------------------- subprocesses


def subprocess_env(home: Path, tmpdir: str, **extra: str) -> dict[str, str]:
    """The environment of a kdtune subprocess: its own HOME and TMPDIR (so its Ray
    instance, temp files and auth token stay apart from the test session's), and
    none of the RAY_*/TUNE_* variables the session's Ray set in this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))}
    env.update(HOME=str(home), TMPDIR=tmpdir, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def short_tmpdir() -> str:
    """A fresh TMPDIR with a short path: Ray's socket paths live under it (108-byte limit)."""
    return tempfile.mkdtemp(prefix="kdt", dir="/tmp")


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Ray's GCS, raylet and workers of a killed driver)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL what is left of a search's process group and wait until it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_members(proc.pid), "processes of the killed search are still running"


class SearchProcess:
    """``kdtune search`` run as a subprocess in its own session (process group)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kdtune.cli", "search", *args], cwd=cwd, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition, what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"search exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                kill_group(self.proc)
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def done_in_this_run(self) -> int:
        counts = [int(m) for m in re.findall(r"^\[(\d+)/\d+ done", self.output(), flags=re.M)]
        return max(counts, default=0)


CHAIN_SPEC = tiny_spec(
    "chain",
    num_samples=12,
    sampler={"name": "tpe", "n_startup_trials": 4},
    early_stopping={"rule": "size_aware_asha", "grace_period": 1, "reduction_factor": 2},
    resources={"cpus": 1, "max_concurrent_trials": 1},
)

#: A client that tries to run code on a cluster: plain Ray, or the way
#: ``kdtune search --address`` joins (used by tests/test_security.py).
CLIENT_SCRIPT = textwrap.dedent('''
    import sys
    import ray

    address, marker, how = sys.argv[1], sys.argv[2], sys.argv[3]


    @ray.remote(num_cpus=0)
    def plant(path):
        open(path, "w").write("code ran on the cluster")
        return "planted"


    if how == "kdtune":
        from kdtune.errors import KdtuneError
        from kdtune.search import ray_session

        try:
            with ray_session(address, False, lambda message: None):
                print("RESULT", ray.get(plant.remote(marker), timeout=120), flush=True)
        except KdtuneError as exc:
            print("REFUSED", exc, flush=True)
    else:
        try:
            ray.init(address=address, logging_level="ERROR")
            print("RESULT", ray.get(plant.remote(marker), timeout=120), flush=True)
        except ConnectionError as exc:
            print("REFUSED", exc, flush=True)
''')


def listening_ports(pids: list[int]) -> dict[int, set[int]]:
    """The TCP ports each of ``pids`` listens on (from /proc/net/tcp*)."""
    sockets: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    sockets[target[8:-1]] = pid
        except OSError:
            continue
    ports: dict[int, set[int]] = {pid: set() for pid in pids}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:
                ports[sockets[fields[9]]].add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def probe_cluster(search: SearchProcess, home: Path, root: Path) -> dict:
    """With the search's driver stopped (its cluster stays up), try to run code on
    the cluster from three clients at once; return what each printed and what ran."""
    os.kill(search.proc.pid, signal.SIGSTOP)
    try:
        members = group_members(search.proc.pid)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    for pid in members]
        address = next(m.group(1) for c in cmdlines if (m := re.search(r"--gcs-address=(\S+)", c)))
        stranger = root / "stranger"
        stranger.mkdir()
        (root / "client.py").write_text(CLIENT_SCRIPT)
        no_retry = {"RAY_gcs_server_port_wait_time_s": "2"}  # give up after 2 s, not 20
        clients = {
            # A stranger's client: no token at all.
            "no_token": ("plain", subprocess_env(stranger, short_tmpdir(), **no_retry)),
            # Token mode on, but a guessed token.
            "wrong_token": ("plain", subprocess_env(stranger, short_tmpdir(), RAY_AUTH_MODE="token",
                                                    RAY_AUTH_TOKEN="0" * 64, **no_retry)),
            # The owner joining like `kdtune search --address`; kdtune finds ~/.ray/auth_token.
            "the_token": ("kdtune", subprocess_env(home, short_tmpdir())),
        }
        running = {
            name: subprocess.Popen([sys.executable, str(root / "client.py"), address, str(root / f"ran_{name}"), how],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, (how, env) in clients.items()
        }
        outputs = {name: proc.communicate(timeout=180)[0] for name, proc in running.items()}
        for _, env in clients.values():
            shutil.rmtree(env["TMPDIR"], ignore_errors=True)
        ports = listening_ports(members)
        return {
            "outputs": outputs,
            "ran": {name: (root / f"ran_{name}").read_text() if (root / f"ran_{name}").exists() else None
                    for name in clients},
            # What each process of the search's cluster is, and the ports it listens on.
            "listening": [(cmdline, sorted(ports[pid])) for pid, cmdline in zip(members, cmdlines)],
        }
    finally:
        os.kill(search.proc.pid, signal.SIGCONT)


def run_chain(root: Path) -> dict:
    """The crash-and-resume story of one study, run once per test session.

    1. ``kdtune search`` is SIGKILLed right after its teacher is cached; while it
       held the study, a second search on it was tried (with and without --resume).
    2. ``--resume``, SIGKILLed after 3 trials finished.
    3. ``--resume``, stopped with SIGINT (Ctrl-C) after 2 more.
    4. ``--resume`` to the end; meanwhile its cluster is probed by clients with and
       without the auth token (tests/test_security.py).
    Every run has its own session (process group), killed and waited for at the end;
    HOME, TMPDIR and the working folder are the scenario's own, so what the search
    writes can be listed afterwards.
    """
    work, home, tmpdir = root / "cwd", root / "home", short_tmpdir()
    work.mkdir()
    home.mkdir()
    write_spec(work, CHAIN_SPEC)
    env = subprocess_env(home, tmpdir, PYTHONDONTWRITEBYTECODE="1")
    study_dir = work / "results" / "chain"
    args = ["spec.yaml", "--results", "results"]
    evidence: dict = {"study_dir": study_dir, "work": work, "home": home, "tmpdir": tmpdir, "kept": {}}
    runs: list[SearchProcess] = []

    def start(name: str, extra: list[str]) -> SearchProcess:
        run = SearchProcess(args + extra, work, env, root / f"{name}.log")
        runs.append(run)
        return run

    try:
        first = start("run1", [])
        first.wait_until(lambda: any((study_dir / "teacher").glob("*/meta.json")), "the teacher cache")
        runner = CliRunner()
        spec, results = str(work / "spec.yaml"), str(work / "results")
        evidence["again"] = runner.invoke(main, ["search", spec, "--results", results])
        evidence["concurrent"] = runner.invoke(main, ["search", spec, "--results", results, "--resume"])
        evidence["holder_pid"] = first.proc.pid
        os.kill(first.proc.pid, signal.SIGKILL)
        kill_group(first.proc)

        second = start("run2", ["--resume"])
        second.wait_until(lambda: second.done_in_this_run() >= 3, "3 finished trials")
        evidence["kept"].update(load_records(study_dir, "search"))
        os.kill(second.proc.pid, signal.SIGKILL)
        kill_group(second.proc)

        third = start("run3", ["--resume"])
        third.wait_until(lambda: third.done_in_this_run() >= 2, "2 more finished trials")
        evidence["kept"].update(load_records(study_dir, "search"))
        os.kill(third.proc.pid, signal.SIGINT)
        evidence["sigint_code"] = third.proc.wait(timeout=120)
        evidence["sigint_output"] = third.output()
        evidence["state_after_sigint"] = json.loads((study_dir / "study.json").read_text())["state"]
        evidence["kept"].update(load_records(study_dir, "search"))
        evidence["left_after_sigint"] = lingering(third.proc.pid)
        kill_group(third.proc)

        last = start("run4", ["--resume"])
        last.wait_until(lambda: "resuming the search" in last.output(), "the last run's cluster")
        evidence["probe"] = probe_cluster(last, home, root)
        evidence["last_code"] = last.proc.wait(timeout=300)
        evidence["last_output"] = last.output()
        evidence["left_after_exit"] = lingering(last.proc.pid)
    finally:
        for run in runs:
            kill_group(run.proc)
    # What the four runs wrote outside their results folder, for tests/test_security.py.
    evidence["written"] = {
        "cwd": sorted(os.listdir(work)),
        "results": sorted(os.listdir(work / "results")),
        "home": sorted(str(p.relative_to(home)) for p in home.rglob("*")),
        "tmpdir": {name: sorted(os.listdir(Path(tmpdir) / name)) if name != "ray" else None
                   for name in os.listdir(tmpdir)},
    }
    shutil.rmtree(tmpdir, ignore_errors=True)
    return evidence


def lingering(pgid: int, grace: float = 10.0) -> list[int]:
    """Processes of a search that exited by itself still alive after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return group_members(pgid)


@pytest.fixture(scope="session")
def chain_run(request, tmp_path_factory) -> dict:
    """The evidence of :func:`run_chain`, computed once per session.

    tests/test_security.py imports this fixture too; pytest then holds two
    definitions (and may load this file as two modules), so the result is kept on
    the session's config object, failures included.
    """
    store = request.config.__dict__.setdefault("kdtune_chain_scenario", {})
    if not store:
        try:
            store["evidence"] = run_chain(tmp_path_factory.mktemp("chain"))
        except BaseException as exc:  # noqa: BLE001 - re-raised for every test that uses it
            store["error"] = exc
    if "error" in store:
        raise store["error"]
    return store["evidence"]


@pytest.mark.slow
def test_a_study_in_use_is_refused_with_or_without_resume(chain_run):
    again, concurrent = chain_run["again"], chain_run["concurrent"]
    assert again.exit_code == 2 and "already exists" in again.stderr and "--resume" in again.stderr, again.output
    assert concurrent.exit_code == 2, concurrent.output
    assert "in use by another kdtune search" in concurrent.stderr
    assert f"pid {chain_run['holder_pid']}" in concurrent.stderr
    assert "Traceback" not in again.output + concurrent.output


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_resume_command_and_leaves_a_resumable_study(chain_run):
    assert chain_run["sigint_code"] == 130, chain_run["sigint_output"][-3000:]
    # Run from the folder holding results/, so the default --results is left out.
    assert "resume with: kdtune search spec.yaml --resume\n" in chain_run["sigint_output"]
    assert chain_run["state_after_sigint"] == "interrupted"
    assert chain_run["last_code"] == 0, chain_run["last_output"][-3000:]
    assert "done: 12 trials" in chain_run["last_output"]


@pytest.mark.slow
def test_killed_and_interrupted_search_resumes_without_losing_or_repeating_trials(chain_run):
    study_dir, kept = chain_run["study_dir"], chain_run["kept"]
    assert chain_run["last_code"] == 0, chain_run["last_output"][-3000:]
    # A search that ends by itself (done, or after Ctrl-C) shuts its Ray down.
    assert chain_run["left_after_sigint"] == [] and chain_run["left_after_exit"] == []
    trials = pd.read_parquet(study_dir / "trials.parquet")
    search = trials[trials["phase"] == "search"]
    assert len(search) == CHAIN_SPEC["num_samples"] and search["trial_id"].is_unique
    assert set(search["status"]) <= {"completed", "stopped_early"}, search["status"].tolist()
    assert (search["status"] == "stopped_early").any(), "the scheduler should have stopped some trials"
    assert kept, "some trials should have finished before the kills"
    # Every trial that had ended before a kill kept its record unchanged, and the
    # tables hold its metrics, one row per epoch it ran.
    final_records = load_records(study_dir, "search")
    history = pd.read_parquet(study_dir / "history.parquet")
    by_id = search.set_index("trial_id")
    for trial_id, record in kept.items():
        assert final_records[trial_id] == record, trial_id
        last = record["results"][-1]
        assert by_id.loc[trial_id, "val_acc"] == last["val_acc"], trial_id
        assert by_id.loc[trial_id, "epochs_run"] == last["epoch"], trial_id
        epochs = history.loc[history["trial_id"] == trial_id, "epoch"].tolist()
        assert epochs == list(range(1, last["epoch"] + 1)), (trial_id, epochs)
    # No trial ran twice: Ray's result log of each trial reports every epoch at most
    # once, though Ray's experiment state, saved every few seconds, was behind at
    # each kill.
    logs = result_lines(study_dir)
    assert logs and set(logs) <= set(search["trial_id"])  # a trial Ray never heard of has no log here
    for trial_id, rows in logs.items():
        epochs = [r["epoch"] for r in rows]
        assert epochs == sorted(set(epochs)), (trial_id, epochs)
    assert set(final_records) == set(search["trial_id"])
    # Ray restores schedulers empty: kdtune gave the resumed scheduler the rung results so far.
    assert re.search(r"early stopping: restored \d+ rung result", chain_run["last_output"]), chain_run["last_output"][-3000:]
    assert_journal_agrees_with_tables(study_dir, trials)
    assert json.loads((study_dir / "study.json").read_text())["state"] == "complete"


CLUSTER_SCRIPT = textwrap.dedent('''
    """Two-node cluster on one machine; the worker node is removed mid-trial."""
    import glob, json, os, signal, sys, threading, time
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    results, spec_path, halfway = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1,
        # Notice a dead node within ~2 s instead of the default ~15 s.
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4},
    })
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    events = {"head": cluster.head_node.node_id, "worker": worker.node_id}

    def rows(path):
        out = []
        for line in open(path).read().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def descendants(pid):
        """Every process below ``pid`` (from /proc: a stat line's 4th field is the parent)."""
        children = {}
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                parent = int(open(stat).read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(stat.split("/")[2]))
        found, todo = [], [pid]
        while todo:
            below = children.get(todo.pop(), [])
            found += below
            todo += below
        return found

    def lose_worker_node():
        # A lost machine takes every process with it. remove_node kills the node's own
        # processes (raylet, ...) but not the raylet's worker processes, which run on
        # until they notice the raylet gone, and meanwhile report straight to the
        # driver: a ~2 s trial could finish there (seen in CI). Kill them too.
        raylet = worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        below = descendants(raylet)
        cluster.remove_node(worker, allow_graceful=False)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove_worker_mid_trial():
        # Once a trial has finished on the worker, kill the worker while its next
        # trial is between epochs. That trial must be at most halfway: the log read
        # here lags the trial, and one seen at its last epochs may finish before
        # the node is gone (then nothing is retried).
        while True:
            finished, running = [], []
            for path in glob.glob(results + "/cluster/search/*/result.json"):
                lines = rows(path)
                if lines and lines[-1].get("node_id") == worker.node_id:
                    trial_id = path.split("/")[-2].rsplit("-", 1)[-1]  # kdtune's folder name ends with the id
                    if lines[-1]["status"] != "running":
                        finished.append(trial_id)
                    elif lines[-1]["epoch"] <= halfway:
                        running.append(trial_id)
            if finished and running:
                events.update(finished_on_worker=finished, killed_mid_trial=running)
                lose_worker_node()
                return
            time.sleep(0.02)

    threading.Thread(target=remove_worker_mid_trial, daemon=True).start()
    from kdtune.search import search
    result = search(spec_path, address=cluster.address, results_root=results, log=lambda m: print(m, flush=True))
    events["interrupted"] = result.interrupted
    print("EVENTS " + json.dumps(events), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')

CLUSTER_SPEC = tiny_spec(
    "cluster",
    num_samples=6,
    data={"dataset": "digits"},  # all 1,077 training images: ~2 s trials, time to kill one mid-run
    space={**tiny_spec("x")["space"], "epochs": 8},
    max_failures=2,
    # A checkpoint every epoch makes every epoch a report (trials otherwise report
    # only at rungs and at the end), so the watcher sees which trials run where; a
    # trial cut off with its node resumes from its last checkpoint.
    checkpoint_every=1,
)


class ClusterRun:
    """The two-node cluster script, run in the background: it mostly waits (Ray
    starting, nodes registering), so it overlaps well with the in-process searches."""

    def __init__(self, root: Path) -> None:
        self.root, self.proc, self.output = root, None, None

    def start(self) -> None:
        if self.proc is not None:
            return
        home, self.tmpdir = self.root / "home", short_tmpdir()
        (home / ".ray").mkdir(parents=True)
        # The cluster runs with token authentication, with a token of its own.
        (home / ".ray" / "auth_token").write_text(os.urandom(32).hex())
        script = self.root / "cluster_run.py"
        script.write_text(CLUSTER_SCRIPT)
        spec_path = write_spec(self.root, CLUSTER_SPEC)
        self.log = self.root / "cluster.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.root / "results"), str(spec_path),
                 str(CLUSTER_SPEC["space"]["epochs"] // 2)], cwd=self.root,
                # The watcher reads trials' result logs in the study folder, which Ray
                # refreshes with its experiment state: every driver step here.
                env=subprocess_env(home, self.tmpdir, RAY_AUTH_MODE="token", TUNE_GLOBAL_CHECKPOINT_S="0"),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def result(self) -> tuple[int, str]:
        """Wait for the run: (exit status, output)."""
        self.start()
        if self.output is None:
            try:
                self.proc.wait(timeout=400)
            finally:
                self.stop()
            self.output = self.log.read_text(errors="replace")
        return self.proc.returncode, self.output

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_run(tmp_path_factory):
    run = ClusterRun(tmp_path_factory.mktemp("cluster"))
    yield run
    run.stop()


CLUSTER_TEST = "test_trials_on_a_lost_worker_node_are_retried_elsewhere_and_the_search_completes"


@pytest.mark.slow
def test_trials_on_a_lost_worker_node_are_retried_elsewhere_and_the_search_completes(cluster_run):
    code, output = cluster_run.result()
    assert code == 0, output[-4000:]
    events = json.loads(re.search(r"^EVENTS (.*)$", output, flags=re.M).group(1))
    assert "killed_mid_trial" in events, f"the worker node was never removed:\n{output[-3000:]}"
    assert events["interrupted"] is False
    results = cluster_run.root / "results"

    study_dir = results / "cluster"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert len(trials) == CLUSTER_SPEC["num_samples"] and (trials["status"] == "completed").all()
    assert (trials["epochs_run"] == 8).all()
    by_id = trials.set_index("trial_id")
    # Trials landed on both nodes: one finished on the worker before it was lost.
    assert set(trials["node_id"]) == {events["head"], events["worker"]}
    assert all(by_id.loc[t, "node_id"] == events["worker"] for t in events["finished_on_worker"])
    # The trial cut off with the node was retried on the head and completed there.
    lines = result_lines(study_dir)
    for trial_id in events["killed_mid_trial"]:
        nodes = [row["node_id"] for row in lines[trial_id]]
        assert nodes[0] == events["worker"] and nodes[-1] == events["head"], nodes
        assert by_id.loc[trial_id, "status"] == "completed"
    assert_journal_agrees_with_tables(study_dir, trials)
