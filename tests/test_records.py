"""Sparse reporting, per-epoch history from sparse reports, and trial records."""

from __future__ import annotations

import json
import math

import numpy as np

from kdtune.records import json_safe, load_records, records_dir, write_record
from kdtune.tables import epoch_rows
from kdtune.trainable import SparseReporter


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def metrics(epoch: int, status: str = "running") -> dict:
    return {"epoch": epoch, "val_acc": epoch / 100, "status": status}


def test_only_rung_checkpoint_and_last_epochs_are_sent_and_the_rest_ride_along():
    clock = FakeClock()
    reporter = SparseReporter([1, 3, 9], interval_s=10.0, clock=clock)
    sent = {}
    for epoch in range(1, 13):
        status = "completed" if epoch == 12 else "running"
        clock.now += 0.5  # 6 s in all: the interval never elapses
        result = reporter.on_epoch(epoch, metrics(epoch, status), has_checkpoint=epoch == 6)
        if result is not None:
            sent[epoch] = [row["epoch"] for row in json.loads(result["unreported_epochs"])]
    # Rungs 1, 3, 9; the checkpoint at 6; the last epoch 12.
    assert sent == {1: [], 3: [2], 6: [4, 5], 9: [7, 8], 12: [10, 11]}


def test_a_long_quiet_stretch_is_reported_after_the_interval():
    clock = FakeClock()
    reporter = SparseReporter([], interval_s=10.0, clock=clock)
    sent = []
    for epoch in range(1, 8):
        clock.now += 4.0
        if reporter.on_epoch(epoch, metrics(epoch), has_checkpoint=False) is not None:
            sent.append(epoch)
    # 4 s per epoch: 12 s after the start at epoch 3, then 12 s later at epoch 6.
    assert sent == [3, 6]


def test_a_diverged_epoch_is_sent_at_once():
    reporter = SparseReporter([9], interval_s=1e9, clock=FakeClock())
    assert reporter.on_epoch(1, metrics(1), False) is None
    result = reporter.on_epoch(2, metrics(2, "diverged"), False)
    assert result is not None and result["status"] == "diverged"
    assert [r["epoch"] for r in json.loads(result["unreported_epochs"])] == [1]


def report(epoch: int, held: list[int], node: str = "n1", acc_offset: float = 0.0) -> dict:
    return {"epoch": epoch, "val_acc": epoch + acc_offset, "node_id": node, "seed": 7,
            "unreported_epochs": json.dumps([{"epoch": e, "val_acc": e + acc_offset} for e in held])}


def test_history_rows_unpack_the_held_epochs_with_the_reports_node_and_seed():
    rows = epoch_rows([report(1, []), report(3, [2]), report(5, [4])])
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["val_acc"] for r in rows] == [1, 2, 3, 4, 5]
    assert {r["node_id"] for r in rows} == {"n1"} and {r["seed"] for r in rows} == {7}


def test_a_run_restarted_from_scratch_replaces_every_row_from_its_first_epoch():
    first_run = [report(1, []), report(3, [2]), report(5, [4])]
    # Restarted from scratch on another node, stopped at epoch 3: epochs 4 and 5 of
    # the first run must not survive in the history.
    second_run = [report(1, [], node="n2", acc_offset=0.5), report(3, [2], node="n2", acc_offset=0.5)]
    rows = epoch_rows(first_run + second_run)
    assert [(r["epoch"], r["val_acc"], r["node_id"]) for r in rows] == [
        (1, 1.5, "n2"), (2, 2.5, "n2"), (3, 3.5, "n2")]


def test_a_run_resumed_from_a_checkpoint_keeps_the_epochs_before_it():
    before = [report(1, []), report(3, [2]), report(5, [4])]
    after_resume = [report(6, [], node="n2"), report(8, [7], node="n2")]
    rows = epoch_rows(before + after_resume)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["node_id"] for r in rows] == ["n1"] * 5 + ["n2"] * 3


def test_reports_without_held_epochs_are_read_as_they_are():
    # Results written before sparse reporting, or read back from Ray's CSV (NaN cells).
    rows = epoch_rows([{"epoch": 1.0, "val_acc": 0.5}, {"epoch": float("nan")}, {"epoch": 2, "val_acc": 0.6,
                                                                                   "unreported_epochs": float("nan")}])
    assert [(int(r["epoch"]), r["val_acc"]) for r in rows] == [(1, 0.5), (2, 0.6)]


def test_records_are_json_with_nan_as_null_and_objects_dropped(tmp_path):
    folder = records_dir(tmp_path, "search")
    path = write_record(folder, {
        "trial_id": "abc", "phase": "search", "ray_status": "TERMINATED",
        "config": {"lr": np.float32(0.5), "model_options": {"depth": 2}, "fn": object()},
        "results": [{"epoch": 1, "val_loss": float("nan"), "val_acc": np.float64(0.25)}],
        "error": None,
    })
    assert path == tmp_path / "records" / "search" / "abc.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["config"] == {"lr": 0.5, "model_options": {"depth": 2}}
    assert on_disk["results"] == [{"epoch": 1, "val_loss": None, "val_acc": 0.25}]
    # No temporary files are left beside it.
    assert [p.name for p in folder.iterdir()] == ["abc.json"]


def test_load_records_skips_foreign_and_partial_files(tmp_path):
    folder = records_dir(tmp_path, "search")
    write_record(folder, {"trial_id": "t1", "results": []})
    (folder / "t2.json").write_text('{"trial_id": "t2", "resu')
    (folder / "notes.json").write_text('["not a record"]')
    assert list(load_records(tmp_path, "search")) == ["t1"]
    assert load_records(tmp_path, "baseline") == {}


def test_json_safe_turns_infinities_into_null():
    assert json_safe({"a": [1.0, math.inf, -math.inf], "b": (2, "x")}) == {"a": [1.0, None, None], "b": [2, "x"]}
