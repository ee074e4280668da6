"""Final evaluation (fresh seeds, one test read) and student export, on the shared tiny study.

These tests write into the study folder (final.csv, exports/) and some remove
or alter files, so they work on private copies of the session's tiny study.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_SPEC
from kdtune.analysis import pareto_front
from kdtune.cli import main
from kdtune.errors import KdtuneError, ResultsError
from kdtune.evaluate import PROCESS_WORTHWHILE_S, baseline_of, estimated_run_seconds, final_evaluation
from kdtune.export import export_student
from kdtune.models import build_model
from kdtune.search import load_spec_data
from kdtune.spec import load_spec
from kdtune.tables import read_csv_table
from kdtune.trial_names import folder_patterns

REQUIRED_COLUMNS = [
    "trial_id", "width", "params", "bytes", "temperature", "alpha", "beta", "noise", "val_acc",
    "test_acc_mean", "test_acc_std", "baseline_test_acc_mean", "baseline_test_acc_std",
    "kd_gain_mean", "kd_gain_std", "n_seeds", "seeds", "latency_ms", "device",
]


def copy_study(source: Path, parent: Path) -> Path:
    target = parent / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@pytest.fixture(scope="module")
def study(tiny_study, tmp_path_factory) -> Path:
    """A private copy of the tiny study, shared by this module's read-mostly tests."""
    return copy_study(tiny_study[0], tmp_path_factory.mktemp("evaluate_export"))


@pytest.fixture(scope="module")
def trials(study) -> pd.DataFrame:
    return pd.read_parquet(study / "trials.parquet")


@pytest.fixture(scope="module")
def evaluated(study):
    lines: list[str] = []
    table = final_evaluation(study, seeds=2, log=lines.append, device="cpu", workers=2)
    return table, lines


@pytest.fixture(scope="module")
def digits(study):
    return load_spec_data(load_spec(study / "spec.yaml"))


def student_of(width: float) -> torch.nn.Module:
    """The tiny spec's student architecture, built here from the spec dict."""
    return build_model(TINY_SPEC["student"]["family"], (1, 8, 8), 10, width, **TINY_SPEC["student"]["options"])


def checkpoint_of(study: Path, trial_id: str) -> Path:
    found = sorted(path for pattern in folder_patterns(trial_id) for path in study.glob(f"*/{pattern}/checkpoint_*/state.pt"))
    assert found, f"no checkpoint for {trial_id}"
    return found[-1]


# --------------------------------------------------------------------------- final evaluation


def test_final_csv_has_one_row_per_front_point_with_fresh_seeds(study, trials, evaluated):
    table, lines = evaluated
    written = read_csv_table(study / "final.csv")
    assert set(REQUIRED_COLUMNS) <= set(written.columns)
    front = pareto_front(trials)
    assert sorted(written["trial_id"]) == sorted(front["trial_id"])
    assert len(written) == len(table) == len(front)
    assert (written["n_seeds"] == 2).all()
    search_seeds = {int(s) for s in trials["seed"].dropna()}
    for seeds in written["seeds"]:
        used = [int(s) for s in str(seeds).split(";")]
        assert len(set(used)) == 2 and not set(used) & search_seeds
    for column in ("test_acc_mean", "baseline_test_acc_mean"):
        assert written[column].between(0.0, 1.0).all()
    # Pairing by seed leaves the mean unchanged: mean(kd - base) = mean(kd) - mean(base).
    expected_gain = written["test_acc_mean"] - written["baseline_test_acc_mean"]
    assert written["kd_gain_mean"].to_numpy() == pytest.approx(expected_gain.to_numpy(), abs=1e-12)
    for column in ("test_acc_std", "baseline_test_acc_std", "kd_gain_std"):
        assert (written[column] >= 0).all()
    assert (written["latency_ms"] > 0).all() and (written["device"] == "cpu").all()
    by_trial = written.set_index("trial_id")
    for trial_id, point in front.set_index("trial_id").iterrows():
        assert by_trial.loc[trial_id, "val_acc"] == pytest.approx(point["val_acc"])
        assert by_trial.loc[trial_id, "params"] == point["params"]
    assert any(line.startswith("retrained 1/") for line in lines)


def test_runs_in_two_processes_give_the_numbers_of_one_process(study, evaluated, tmp_path):
    """Each run is seeded by its config: trained two at a time in spawned processes (the
    fixture) or one after another in this process, every run scores the same."""
    _, lines = evaluated
    assert any("in 2 processes" in line for line in lines)
    copy = copy_study(study, tmp_path)
    final_evaluation(copy, seeds=2, log=lambda m: None, device="cpu", workers=1)
    keys = ["trial_id", "role", "seed"]
    parallel = read_csv_table(study / "final_runs.csv").sort_values(keys).reset_index(drop=True)
    sequential = read_csv_table(copy / "final_runs.csv").sort_values(keys).reset_index(drop=True)
    assert len(parallel) == len(sequential) > 0
    pd.testing.assert_frame_equal(parallel[keys + ["test_acc", "val_acc", "epochs"]],
                                  sequential[keys + ["test_acc", "val_acc", "epochs"]])


def test_per_run_file_reproduces_the_summary(study, evaluated):
    """Means, sample stds and seed-paired gains recomputed from final_runs.csv."""
    summary = read_csv_table(study / "final.csv")
    runs = read_csv_table(study / "final_runs.csv")
    assert runs["test_acc"].between(0.0, 1.0).all()
    assert (runs["epochs"] == TINY_SPEC["space"]["epochs"]).all()
    for _, row in summary.iterrows():
        seeds = [int(s) for s in str(row["seeds"]).split(";")]
        kd = runs[(runs["trial_id"] == row["trial_id"]) & (runs["role"] == "distilled")].set_index("seed")
        base = runs[(runs["role"] == "baseline") & (runs["width"] == row["width"])].set_index("seed")
        kd_acc = [kd.loc[s, "test_acc"] for s in seeds]
        base_acc = [base.loc[s, "test_acc"] for s in seeds]
        gains = [k - b for k, b in zip(kd_acc, base_acc)]
        assert row["test_acc_mean"] == pytest.approx(sum(kd_acc) / 2, abs=1e-12)
        assert row["baseline_test_acc_mean"] == pytest.approx(sum(base_acc) / 2, abs=1e-12)
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(kd_acc), abs=1e-12)
        assert row["kd_gain_std"] == pytest.approx(statistics.stdev(gains), abs=1e-12)


def test_full_data_retrains_the_front_on_the_whole_training_split(study, evaluated, digits, tmp_path):
    """--full-data: each run is the front trial's config without its train_subset, for
    --epochs; its test accuracy is that of the same run trained here by the core."""
    from kdtune.core.distill import run
    from kdtune.study import recorded_trial_config, trial_run_config

    copy = copy_study(study, tmp_path)
    before = (copy / "final.csv").read_text()
    outcome = CliRunner().invoke(main, ["evaluate", str(copy), "--full-data", "--epochs", "2", "--seeds", "1",
                                        "--workers", "1"])
    assert outcome.exit_code == 0, outcome.output
    assert "on the whole training split" in outcome.output and "final_full.csv" in outcome.output
    assert (copy / "final.csv").read_text() == before  # the low-label evaluation is kept
    runs = read_csv_table(copy / "final_full_runs.csv")
    assert (runs["epochs"] == 2).all() and set(runs["role"]) == {"distilled", "baseline"}
    first = runs[runs["role"] == "distilled"].iloc[0]
    config = trial_run_config(recorded_trial_config(copy, first["trial_id"]))
    assert config.train_subset == TINY_SPEC["data"]["train_subset"]
    alone = config.replace(train_subset=None, epochs=2, seed=int(first["seed"]), device="cpu")
    from kdtune.core.teacher import prepare_teachers
    from kdtune.spec import spec_teacher_targets, teacher_configs

    spec = load_spec(copy / "spec.yaml")  # the targets the evaluation used
    prepared = prepare_teachers(teacher_configs(spec), digits, copy / "teacher", log=lambda m: None)
    student = run(alone, digits, spec_teacher_targets(spec, prepared, digits, lambda m: None)).student
    with torch.no_grad():
        test_acc = (student(digits.test.x).argmax(1) == digits.test.y).float().mean().item()
    assert first["test_acc"] == pytest.approx(test_acc, abs=1e-9)
    # On the subset alone, the same seed and epochs score otherwise: the whole split was used.
    subset = run(config.replace(epochs=2, seed=int(first["seed"]), device="cpu"), digits,
                 spec_teacher_targets(spec, prepared, digits, lambda m: None)).student
    with torch.no_grad():
        assert not torch.equal(subset(digits.test.x), student(digits.test.x))


def test_run_estimate_is_the_recorded_seconds_per_image_times_images_times_epochs(study, trials, digits):
    """Written out from the study's history: a front trial's median over its epochs of
    epoch_time_s / the images of a search epoch (its train_subset), × the run's images × epochs."""
    from kdtune.study import recorded_trial_config, trial_run_config

    history = pd.read_parquet(study / "history.parquet")
    trial_id = pareto_front(trials)["trial_id"].iloc[0]
    subset, epochs = TINY_SPEC["data"]["train_subset"], TINY_SPEC["space"]["epochs"]
    recorded = history[history["trial_id"] == trial_id]
    assert len(recorded) == epochs
    per_image = statistics.median(t / subset for t in recorded["epoch_time_s"])
    config = trial_run_config(recorded_trial_config(study, trial_id))
    planned = [(trial_id, "distilled", config), (trial_id, "baseline", baseline_of(config)),
               (trial_id, "distilled", config.replace(train_subset=None, epochs=2)),  # --full-data --epochs 2
               ("not-a-trial", "distilled", config)]
    estimates = estimated_run_seconds(history, planned, len(digits.train))
    assert estimates[0] == pytest.approx(per_image * subset * epochs, rel=1e-9)
    assert estimates[1] == estimates[0]  # a baseline takes its trial's timing
    assert estimates[2] == pytest.approx(per_image * len(digits.train) * 2, rel=1e-9)
    assert estimates[2] / estimates[0] == pytest.approx(len(digits.train) / subset * 2 / epochs, rel=1e-9)
    assert estimates[3] is None
    # A study of an older version recorded no speeds: nothing to estimate from.
    assert estimated_run_seconds(history.drop(columns=["samples_per_s"]), planned[:1], len(digits.train)) == [None]


def two_cores(monkeypatch) -> None:
    """Two CPU cores for the default workers, whatever this machine has (the tiny runs use one thread each)."""
    import kdtune.core.distill

    monkeypatch.setattr(kdtune.core.distill, "usable_cores", lambda: 2)


def test_short_runs_by_the_recorded_epoch_times_train_in_one_process_without_a_timing_run(
        study, trials, monkeypatch, tmp_path):
    """The tiny runs take a fraction of a second by the search's epoch times: one process,
    decided and said before any run trains (no run is trained alone to time it)."""
    two_cores(monkeypatch)
    copy = copy_study(study, tmp_path)
    lines: list[str] = []
    final_evaluation(copy, seeds=1, log=lines.append, device="cpu")
    history = pd.read_parquet(copy / "history.parquet")
    subset, epochs = TINY_SPEC["data"]["train_subset"], TINY_SPEC["space"]["epochs"]
    per_image = [statistics.median(t / subset for t in history[history["trial_id"] == trial_id]["epoch_time_s"])
                 for trial_id in pareto_front(trials)["trial_id"]]
    by_trial = [seconds * subset * epochs for seconds in per_image]
    said = [line for line in lines if line.startswith("runs estimated at ~")]
    assert len(said) == 1 and said[0].endswith("→ 1 process (a worker process is worth starting from 10 s a run)")
    logged = float(said[0].removeprefix("runs estimated at ~").split(" s ")[0])
    # The median over the runs lies among the front trials' estimates (logged to two digits).
    assert min(by_trial) * 0.94 <= logged <= max(by_trial) * 1.06 and logged < PROCESS_WORTHWHILE_S
    assert lines.index(said[0]) < min(i for i, line in enumerate(lines) if line.startswith("retraining"))
    assert not any("time a run" in line or "processes" in line for line in lines)


def test_long_runs_by_the_recorded_epoch_times_all_train_in_processes(study, monkeypatch, tmp_path):
    """A history that says 30 images a second: 150 images × 4 epochs take 20 s a run, so
    every run, the first included, goes to the worker processes."""
    two_cores(monkeypatch)
    copy = copy_study(study, tmp_path)
    history = pd.read_parquet(copy / "history.parquet")
    subset = TINY_SPEC["data"]["train_subset"]
    history["samples_per_s"], history["epoch_time_s"] = 30.0, subset / 30.0
    history.to_parquet(copy / "history.parquet", index=False)
    lines: list[str] = []
    final_evaluation(copy, seeds=1, log=lines.append, device="cpu")
    runs = read_csv_table(copy / "final_runs.csv")
    assert "runs estimated at ~20 s each from the search's epoch times → 2 processes" in lines
    assert f"retraining {len(runs)} runs in 2 processes ..." in lines
    assert not any(line.startswith("retraining:") for line in lines)  # nothing trained in this process


def test_without_recorded_epoch_times_the_first_run_times_a_run(study, monkeypatch, tmp_path):
    """A study of an older version (no samples_per_s in its history): the first run trains here first."""
    two_cores(monkeypatch)
    copy = copy_study(study, tmp_path)
    history = pd.read_parquet(copy / "history.parquet")
    history.drop(columns=["samples_per_s"]).to_parquet(copy / "history.parquet", index=False)
    lines: list[str] = []
    final_evaluation(copy, seeds=1, log=lines.append, device="cpu")
    said = lines.index("no epoch times recorded by the search: the first run trains here to time a run")
    assert lines[said + 1].startswith("retraining:") and lines[said + 2].startswith("retrained 1/")
    assert not any(line.startswith("runs estimated") for line in lines)


def test_full_data_needs_a_study_searched_on_a_subset_and_epochs_need_full_data(study, tmp_path):
    outcome = CliRunner().invoke(main, ["evaluate", str(study), "--epochs", "2"])
    assert outcome.exit_code == 2 and "--full-data" in outcome.output and "Traceback" not in outcome.output
    copy = copy_study(study, tmp_path)
    spec_path = copy / "spec.yaml"
    spec_path.write_text(spec_path.read_text().replace("train_subset: 150", "train_subset: null"))
    with pytest.raises(ResultsError, match="already trained on the whole training split"):
        final_evaluation(copy, seeds=1, log=lambda m: None, full_data=True)
    assert not (copy / "final_full.csv").exists()


def test_evaluate_on_a_folder_that_is_not_a_study(tmp_path):
    (tmp_path / "notes.txt").write_text("not a study")
    with pytest.raises(ResultsError, match=r"notes\.txt.*missing study\.json"):
        final_evaluation(tmp_path, seeds=1, log=lambda m: None)


def test_evaluate_a_study_without_completed_trials(study, tmp_path):
    copy = copy_study(study, tmp_path)
    (copy / "final.csv").unlink(missing_ok=True)
    table = pd.read_parquet(copy / "trials.parquet")
    table.loc[table["phase"] == "search", "status"] = "stopped_early"
    table.to_parquet(copy / "trials.parquet", index=False)
    with pytest.raises(ResultsError, match="no completed search trial.*stopped_early"):
        final_evaluation(copy, seeds=1, log=lambda m: None)
    assert not (copy / "final.csv").exists()


# --------------------------------------------------------------------------- export


def test_export_state_dict_reproduces_val_acc(study, trials, digits):
    front = pareto_front(trials)
    chosen = front.iloc[-1]
    path, sidecar = export_student(study, pareto_index=len(front) - 1, fmt="state_dict")
    assert path == study / "exports" / f"{chosen['trial_id']}.pt"
    assert sidecar == study / "exports" / f"{chosen['trial_id']}.pt.json"
    model = student_of(chosen["width"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        accuracy = (model(digits.val.x).argmax(dim=1) == digits.val.y).float().mean().item()
    assert accuracy == pytest.approx(chosen["val_acc"], abs=1e-6)

    meta = json.loads(sidecar.read_text())
    study_meta = json.loads((study / "study.json").read_text())
    assert meta["trial_id"] == chosen["trial_id"] and meta["format"] == "state_dict"
    assert meta["teacher_key"] == study_meta["teacher_key"]
    assert meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert meta["val_acc_reproduced"] == pytest.approx(chosen["val_acc"], abs=1e-6)
    assert meta["config"]["width"] == chosen["width"] and meta["metrics"]["val_acc"] == chosen["val_acc"]
    assert meta["kdtune_version"]


def test_export_torchscript_matches_the_eager_student(study, trials, digits):
    chosen = pareto_front(trials).iloc[0]
    path, sidecar = export_student(study, trial_id=chosen["trial_id"], fmt="torchscript")
    assert path.name == f"{chosen['trial_id']}.ts" and sidecar.is_file()
    eager = student_of(chosen["width"])
    state = torch.load(checkpoint_of(study, chosen["trial_id"]), map_location="cpu", weights_only=True)
    eager.load_state_dict(state["student"])
    eager.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loadable
        scripted = torch.jit.load(str(path), map_location="cpu")
    batch = digits.val.x[:17]  # not the batch size the export traced with
    with torch.no_grad():
        torch.testing.assert_close(scripted(batch), eager(batch), rtol=0.0, atol=1e-6)


def test_export_of_a_stopped_early_trial_is_refused(study, trials):
    stopped = trials[trials["status"] == "stopped_early"]
    if stopped.empty:
        pytest.skip("the tiny study's scheduler stopped no trial early this time")
    with pytest.raises(ResultsError, match="stopped_early.*full epoch budget"):
        export_student(study, trial_id=stopped.iloc[0]["trial_id"])


def test_export_of_a_trial_whose_checkpoint_is_gone_is_refused(study, trials, tmp_path):
    copy = copy_study(study, tmp_path)
    baseline = trials[(trials["phase"] == "baseline") & (trials["status"] == "completed")].iloc[0]
    shutil.rmtree(checkpoint_of(copy, baseline["trial_id"]).parent)
    with pytest.raises(ResultsError, match="no checkpoint"):
        export_student(copy, trial_id=baseline["trial_id"])
    assert not (copy / "exports" / f"{baseline['trial_id']}.pt2").exists()


def test_export_that_does_not_reproduce_val_acc_writes_nothing(study, trials, tmp_path):
    copy = copy_study(study, tmp_path)
    shutil.rmtree(copy / "exports", ignore_errors=True)
    table = pd.read_parquet(copy / "trials.parquet")
    chosen = pareto_front(table).iloc[0]
    table.loc[table["trial_id"] == chosen["trial_id"], "val_acc"] += 0.01
    table.to_parquet(copy / "trials.parquet", index=False)
    with pytest.raises(ResultsError, match="recorded"):
        export_student(copy, trial_id=chosen["trial_id"])
    assert list((copy / "exports").iterdir()) == []


def test_export_unknown_trial_or_index_lists_valid_choices(study, trials):
    completed = trials.loc[trials["status"] == "completed", "trial_id"].tolist()
    with pytest.raises(ResultsError, match=f"unknown trial id 'no-such-trial'.*{completed[0]}"):
        export_student(study, trial_id="no-such-trial")
    size = len(pareto_front(trials))
    with pytest.raises(ResultsError, match=f"has {size} point"):
        export_student(study, pareto_index=size)
    result = CliRunner().invoke(main, ["export", str(study), "--trial", "no-such-trial"])
    assert result.exit_code == 2 and "unknown trial id" in result.output


@pytest.mark.skipif(all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")),
                    reason="onnx and onnxscript are installed (the test extra brings them): the ONNX export runs "
                           "for real in test_export_formats.py")
def test_onnx_without_the_package_says_how_to_install_it(study, trials):
    with pytest.raises(KdtuneError, match=r"pip install 'kdtune\[onnx\]'"):
        export_student(study, trial_id=pareto_front(trials).iloc[0]["trial_id"], fmt="onnx")


def test_study_csv_tables_keep_trial_ids_that_look_like_numbers(tmp_path):
    # Trial ids are 8 hex digits: "1234e567" reads as the float inf, "00001234" as 1234, unless kept as text.
    from kdtune.tables import write_frame_atomic

    frame = pd.DataFrame({"trial_id": ["1234e567", "00001234", "ab12cd34"], "best_trial": ["9e999999", "x", "1e5"],
                          "recommended": ["1", "dist, T=1", "no distillation (α=1)"], "width": [0.25, 0.5, 1.0]})
    write_frame_atomic(frame, tmp_path / "best_t.csv", fmt="csv")
    back = read_csv_table(tmp_path / "best_t.csv")
    assert back["trial_id"].tolist() == ["1234e567", "00001234", "ab12cd34"]
    assert back["best_trial"].tolist() == ["9e999999", "x", "1e5"]
    assert back["recommended"].tolist() == ["1", "dist, T=1", "no distillation (α=1)"]
    assert back["width"].tolist() == [0.25, 0.5, 1.0]
    # A one-size race's table: what plain read_csv makes of its trial id, and what the study reads.
    write_frame_atomic(frame.iloc[:1], tmp_path / "one.csv", fmt="csv")
    assert pd.read_csv(tmp_path / "one.csv")["trial_id"].iloc[0] == float("inf")
    assert read_csv_table(tmp_path / "one.csv")["trial_id"].iloc[0] == "1234e567"
