"""The study report (summary.md and figures) and the terminal table."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from kdtune.errors import ConfigError, ResultsError
from kdtune.report import format_terminal_table, write_report

WIDTHS = [4, 8, 16]
TEMPERATURES = [1.0, 2.0, 4.0, 8.0]
EPOCHS = 9
RUNGS = [1, 3]


def params_of(width: int) -> int:
    return 64 * width + width + 10 * width + 10  # a 64-input, 10-class MLP with one hidden layer


def accuracy(width: int, temperature: float, seed: int) -> float:
    # Wider is better, T=4 is best, and a later seed is a little better: the best
    # trial of each width is (T=4, seed 2), and those three form the front.
    return 0.80 + 0.03 * np.log2(width) - 0.01 * np.log2(temperature / 4) ** 2 + 0.001 * seed


def synthetic_study() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and history in the search's schema; width 16 has no baseline."""
    trials, history = [], []

    def add(trial_id: str, phase: str, status: str, width: int, temperature: float, alpha: float, seed: int,
            acc: float) -> None:
        epochs_run = EPOCHS if status == "completed" else RUNGS[seed % len(RUNGS)]
        trials.append({
            "study": "demo", "trial_id": trial_id, "phase": phase, "status": status,
            "temperature": temperature, "alpha": alpha, "beta": 0.0, "noise": 0.0, "width": width,
            "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "soft_loss": "kl", "epochs": EPOCHS,
            "seed": seed, "params": params_of(width), "bytes": 4 * params_of(width), "val_acc": acc,
            "best_val_acc": acc, "val_loss": 0.5, "epochs_run": epochs_run, "wall_time_s": 1.5,
            "node_id": "node-1", "error": None,
        })
        for epoch in range(1, epochs_run + 1):
            history.append({
                "study": "demo", "trial_id": trial_id, "phase": phase, "epoch": epoch,
                "val_acc": acc * (1 - np.exp(-epoch / 2)), "val_loss": 1 / epoch, "train_loss": 1 / epoch,
                "params": params_of(width), "bytes": 4 * params_of(width), "epoch_time_s": 0.1,
                "samples_per_s": 5000.0, "width": width, "temperature": temperature, "status": status,
            })

    for width in WIDTHS:
        for temperature in TEMPERATURES:
            for seed in range(3):
                add(f"w{width}-T{temperature:g}-s{seed}", "search", "completed", width, temperature, 0.3, seed,
                    accuracy(width, temperature, seed))
            # A stopped-early trial whose partial accuracy would top the front if it counted.
            add(f"w{width}-T{temperature:g}-stop", "search", "stopped_early", width, temperature, 0.3, 3, 0.99)
        if width != 16:
            for seed in range(2):
                base = 0.80 + 0.03 * np.log2(width)
                add(f"w{width}-base-s{seed}", "baseline", "completed", width, 1.0, 1.0, seed, base)
    trials_df = pd.DataFrame(trials)
    baseline = trials_df[trials_df["phase"] == "baseline"].groupby("width")["val_acc"].mean()
    trials_df["baseline_val_acc"] = trials_df["width"].map(baseline)
    trials_df["kd_gain"] = trials_df["val_acc"] - trials_df["baseline_val_acc"]
    return trials_df, pd.DataFrame(history)


def write_study_json(folder, name: str = "demo") -> None:
    meta = {"study": name, "teacher": {"params": 1_118_218, "bytes": 4_472_872, "val_acc": 0.981}, "rungs": RUNGS}
    (folder / "study.json").write_text(json.dumps(meta))


def assert_image(path) -> None:
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 400 <= height <= 2000 and 600 <= width <= 2500
    assert image[..., :3].std() > 0.02  # something was drawn, not a blank canvas


def test_write_report_writes_summary_and_figures(tmp_path) -> None:
    write_study_json(tmp_path)
    trials, history = synthetic_study()
    files = write_report(tmp_path, trials, history)

    assert set(files) == {"summary", "pareto", "accuracy_vs_temperature", "learning_curves"}
    for name in ("pareto", "accuracy_vs_temperature", "learning_curves"):
        assert files[name] == tmp_path / f"{name}.png"
        assert_image(files[name])

    summary = files["summary"].read_text(encoding="utf-8")
    assert "`demo`" in summary
    assert "| width | params | bytes | val_acc | kd_gain | temperature | alpha |" in summary
    # The front: best trial of each width (T=4, seed 2); kd_gain = 0.002 over the baseline,
    # none for width 16 which has no baseline.
    for width, acc, gain in [(4, 0.862, "+0.0020"), (8, 0.892, "+0.0020"), (16, 0.922, "n/a")]:
        row = f"| {width} | {params_of(width):,} | {4 * params_of(width):,} | {acc:.4g} | {gain} | 4 | 0.3 |"
        assert row in summary
    assert "0.99" not in summary.split("## Best temperature")[0].split("## Pareto")[1]
    # Status counts: 36 completed + 12 stopped-early search trials, 4 baselines.
    assert "| completed | 4 | 36 | 40 |" in summary
    assert "| stopped_early | 0 | 12 | 12 |" in summary
    assert "| recommended_t |" in summary
    for name in ("pareto.png", "accuracy_vs_temperature.png", "learning_curves.png"):
        assert f"]({name})" in summary


def test_write_report_without_completed_trials_or_baselines(tmp_path) -> None:
    study_dir, out_dir = tmp_path / "study", tmp_path / "report"
    study_dir.mkdir()
    write_study_json(study_dir, name="fresh")
    trials, history = synthetic_study()
    running = trials[trials["phase"] == "search"].head(5).assign(
        status="running", baseline_val_acc=np.nan, kd_gain=np.nan
    )
    files = write_report(study_dir, running, history.iloc[0:0], out_dir=out_dir)

    assert all(path.parent == out_dir for path in files.values())
    for name in ("pareto", "accuracy_vs_temperature", "learning_curves"):
        assert_image(files[name])
    summary = files["summary"].read_text(encoding="utf-8")
    assert "No Pareto front yet" in summary
    assert "No completed search trials with a temperature yet." in summary
    assert "| running | 5 | 5 |" in summary
    assert not (study_dir / "summary.md").exists()


def test_write_report_buckets_continuous_widths_by_params(tmp_path) -> None:
    write_study_json(tmp_path)
    rng = np.random.default_rng(0)
    widths = rng.integers(4, 200, 40)  # far more than 12 distinct widths
    trials = pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(40)], "phase": "search", "status": "completed",
        "width": widths, "params": [params_of(w) for w in widths], "temperature": rng.choice([1.0, 4.0], 40),
        "alpha": 0.5, "bytes": [4 * params_of(w) for w in widths], "val_acc": 0.8 + 0.0005 * widths,
        "kd_gain": np.nan,
    })
    files = write_report(tmp_path, trials, pd.DataFrame())
    summary = files["summary"].read_text(encoding="utf-8")
    assert "2^11–2^12" in summary  # 4 < width < 200 -> 300..14,000 params
    assert_image(files["accuracy_vs_temperature"])


def test_write_report_needs_study_json(tmp_path) -> None:
    trials, history = synthetic_study()
    with pytest.raises(ResultsError, match="study.json"):
        write_report(tmp_path, trials, history)


def test_format_terminal_table() -> None:
    df = pd.DataFrame({
        "trial_id": ["a", "bb", "c"], "params": [1234567, 310, 42],
        "val_acc": [0.93125, 0.8, 0.5], "kd_gain": [0.0123, np.nan, -0.004],
    })
    text = format_terminal_table(df, ["trial_id", "params", "val_acc", "kd_gain"], max_rows=2)
    lines = text.splitlines()
    assert lines[0].split() == ["trial_id", "params", "val_acc", "kd_gain"]
    assert lines[2].split() == ["a", "1,234,567", "0.9313", "+0.0123"]
    assert lines[3].split() == ["bb", "310", "0.8", "n/a"]
    assert lines[-1] == "… 1 more rows"
    assert len(lines) == 5
    # Numbers right-aligned: the params column ends at the same place on every row.
    assert lines[2].index("1,234,567") + len("1,234,567") == lines[3].index("310") + len("310")


def test_format_terminal_table_names_unknown_columns() -> None:
    with pytest.raises(ConfigError, match="flops"):
        format_terminal_table(pd.DataFrame({"params": [1]}), ["params", "flops"])
