"""Smoke tests of the benchmark helpers' pure functions (no Ray, no timing assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402


def test_parallel_efficiency_and_overhead_follow_their_formulas():
    # 10 trials of 1 s own time on 2 slots finishing in 6 s: 10 / (6 * 2) of the slots
    # did the trials' work, and (12 - 10) / 10 = 0.2 s per trial went elsewhere.
    assert common.parallel_efficiency(10.0, 6.0, 2) == pytest.approx(10 / 12)
    assert common.per_trial_overhead(10.0, 6.0, 2, 10) == pytest.approx(0.2)


def test_ratio_and_median_handle_empty_and_zero():
    assert common.ratio(3.0, 4.0) == 0.75
    assert math.isnan(common.ratio(1.0, 0.0))
    assert math.isnan(common.ratio(1.0, float("nan")))
    assert common.median([3, 1, 2]) == 2
    assert math.isnan(common.median([]))


def test_deep_merge_merges_nested_dicts_and_replaces_the_rest():
    base = {"space": {"width": {"choice": [8, 16]}, "epochs": 27}, "sampler": {"objectives": ["val_acc", "params"]}}
    merged = common.deep_merge(base, {"space": {"epochs": 3}, "sampler": {"objectives": ["val_acc"]}, "seed": 2})
    assert merged == {"space": {"width": {"choice": [8, 16]}, "epochs": 3}, "sampler": {"objectives": ["val_acc"]}, "seed": 2}
    assert base["space"]["epochs"] == 27  # the base is not modified


def test_markdown_table_formats_cells():
    table = common.markdown_table(["a", "b"], [[1234, 0.5], [float("nan"), "x"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1,234 | 0.500 |", "| - | x |"]


def test_report_writes_targets_with_verdicts(tmp_path):
    report = common.Report("demo", "Demo")
    report.add("Section", "body")
    report.target("x ≥ 1", "2", True)
    report.target("y ≤ 1", "3", False)
    path = report.write("python bench/run_all.py", tmp_path)
    text = path.read_text()
    assert path.name == "demo.md"
    assert "**MET**: x ≥ 1 — measured 2" in text
    assert "**NOT MET**: y ≤ 1 — measured 3" in text
    assert "cores" in text and "ray" in text


def test_digits_spec_applies_overrides_to_the_default_spec():
    spec = common.digits_spec({"baselines": False, "num_samples": 7, "early_stopping": {"rule": "none"}})
    assert spec.num_samples == 7 and spec.baselines is False
    assert spec.early_stopping.rule == "none"
    assert spec.data.dataset == "digits"  # the rest comes from search_spaces/digits.yaml
    assert spec.early_stopping.grace_period == 1  # kept from the YAML beside the override


def test_the_benchmark_compares_the_default_rule_with_the_other_front_keeping_rule():
    # The "kdtune default" row must run what a spec without early_stopping gets, and
    # the size_aware_asha row that rule with its own defaults, on the default task.
    import search_efficiency

    from kdtune.spec import EarlyStoppingSpec

    default = common.digits_spec(search_efficiency.METHODS[search_efficiency.KDTUNE]).early_stopping
    size_aware = common.digits_spec(search_efficiency.METHODS[search_efficiency.SIZE_AWARE]).early_stopping
    shipped = EarlyStoppingSpec()
    assert (default.rule, default.reduction_factor, default.hv_epsilon) == (
        shipped.rule, shipped.reduction_factor, shipped.hv_epsilon) == ("pareto_asha", 3.0, 0.0)
    assert (size_aware.rule, size_aware.reduction_factor, size_aware.size_key) == ("size_aware_asha", 3.0, "width")
    # and the rule-2 row is the default with only the hypervolume bound turned on, as it was
    rule_2 = common.digits_spec(search_efficiency.METHODS[search_efficiency.RULE_2_ON]).early_stopping
    assert rule_2.hv_epsilon == 0.04
    assert rule_2.model_copy(update={"hv_epsilon": default.hv_epsilon}) == default
    # and the former-default row differs from the default only in leaving the width to TPE
    shipped_sampler = common.digits_spec(search_efficiency.METHODS[search_efficiency.KDTUNE]).sampler
    width_by_tpe = common.digits_spec(search_efficiency.METHODS[search_efficiency.WIDTH_BY_TPE]).sampler
    assert shipped_sampler.balance_sizes and not width_by_tpe.balance_sizes
    assert width_by_tpe.model_copy(update={"balance_sizes": True}) == shipped_sampler


def test_run_all_arguments():
    args = run_all.parse_args(["--quick", "--only", "overhead", "--only", "distill_step"])
    assert args.quick and args.only == ["overhead", "distill_step"]
    with pytest.raises(SystemExit):
        run_all.parse_args(["--only", "no_such_benchmark"])


def _profile_with(events: dict[str, tuple[float, float]], started: float = 0.0):
    from profiling import DriverProfile, TrialEvents

    profile = DriverProfile()
    profile.started = started
    for trial_id, (start, end) in events.items():
        profile.trials[trial_id] = TrialEvents(start=start, complete=end)
    return profile


def test_steady_state_skips_each_slots_first_trial_and_adds_the_gap():
    import overhead

    # Two slots: a and b start at once (warm-up), c starts 0.1 s after a ends, d 0.3 s after b ends.
    profile = _profile_with({"a": (0.0, 2.0), "b": (0.0, 3.0), "c": (2.1, 3.6), "d": (3.3, 4.5)})
    own = {tid: 1.0 for tid in "abcd"}
    steady = overhead.steady_state(profile, list("abcd"), own, concurrent=2)
    assert [t["trial_id"] for t in steady["trials"]] == ["c", "d"]
    assert [round(t["gap_s"], 6) for t in steady["trials"]] == [0.1, 0.3]
    # slot = duration + gap: c 1.5 + 0.1, d 1.2 + 0.3; overhead = slot - own.
    assert steady["slot_s"] == pytest.approx([1.6, 1.5])
    assert steady["overhead_s"] == pytest.approx([0.6, 0.5])


def test_decomposition_reads_own_time_inside_the_trial_and_against_the_control():
    import overhead
    import pandas as pd

    # Same slots as above: c (1.5 s + 0.1 s gap) and d (1.2 s + 0.3 s gap) are the steady trials.
    profile = _profile_with({"a": (0.0, 2.0), "b": (0.0, 3.0), "c": (2.1, 3.6), "d": (3.3, 4.5)})
    loop = {"trials": [{"own_s": 1.0, "train_s": 0.9}] * 4}  # 0.1 s of each run is outside the training loop
    history = pd.DataFrame({"trial_id": ["a", "b", "c", "c", "d"], "epoch_time_s": [0.9, 0.9, 0.5, 0.6, 1.0]})
    out = {"trials": pd.DataFrame({"trial_id": list("abcd")}), "history": history, "profile": profile,
           "reports": 1.0, "driver_cpu_s": 0.4, "daemon_cpu_s": 0.2, "setup_s": 1.0, "teardown_s": 0.1, "period": "auto", "label": "x"}
    _, verdict = overhead.decomposition("shape", loop, out, 2, {"trial_s": 1.3})
    # In-trial own = training loop timed in the worker + 0.1 s: c 1.2 s of a 1.6 s slot, d 1.1 s of 1.5 s.
    assert verdict["in_trial_own_s"] == pytest.approx((1.2 + 1.1) / 2)
    assert verdict["overhead_in_trial_s"] == pytest.approx(0.4)
    assert verdict["efficiency_in_trial"] == pytest.approx((1.2 / 1.6 + 1.1 / 1.5) / 2)
    # Against (a)'s 1.0 s: the median slot is 1.55 s; the control's trial took 1.3 s.
    assert verdict["efficiency"] == pytest.approx(1.0 / 1.55)
    assert verdict["beyond_control_s"] == pytest.approx(1.55 - 1.3)
    assert verdict["control_s"] == pytest.approx(0.3)
    assert verdict["background_cpu_s"] == pytest.approx((0.4 + 0.2) / 4)  # driver + Ray daemons, per trial


def test_throughput_blocks_count_completions_per_minute():
    import bookkeeping

    profile = _profile_with({str(i): (0.0, float(i + 1)) for i in range(4)})  # one completion per second
    rows = bookkeeping.throughput_blocks(profile, block=2)
    assert [r[0] for r in rows] == ["1–2", "3–4"]
    assert [r[1] for r in rows] == pytest.approx([2.0, 2.0])
    assert [r[2] for r in rows] == pytest.approx([60.0, 60.0])


def test_race_replay_brute_force_set_and_replay_counts():
    """bench/race_offline.py on a hand-made matrix: contender 0 is 10 points behind, 1 and 2
    differ by noise only. Brute force keeps {1, 2}; every replay drops 0 and nothing else."""
    import numpy as np

    import race_offline

    rng = np.random.default_rng(0)
    block = rng.normal(0, 0.03, 20)
    matrix = np.array([0.80 + block + rng.normal(0, 0.01, 20) for _ in range(3)])
    matrix[1:] += 0.10
    best, kept = race_offline.brute_force(matrix)
    assert kept == {1, 2} and best in kept
    out = race_offline.replay_races(matrix, [1.0, 4.0, 8.0], 20, 10, (best, kept))
    assert out["drop_best"] == 0 and out["drop_kept"] == 0 and out["winner_in_set"] == 20
    assert out["brute_runs"] == 60 and all(runs >= 9 for runs in out["runs"])


def test_method_benchmark_times_each_fused_objective_against_the_same_objective_by_autograd():
    # The bench's "autograd through ..." rows must compute what the fused rows compute.
    import method_step
    import torch

    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(40, 10, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    steps = method_step._steps(teacher, labels)
    logits = 3 * torch.randn(8, 10, generator=generator)
    idx = torch.arange(8)
    for fused, reference in [(method_step.KD_STD, method_step.KD_STD_REF), (method_step.DKD, method_step.DKD_REF),
                             (method_step.DIST, method_step.DIST_REF)]:
        for epoch in (5, 30):  # during and after DKD's warm-up
            fused_loss, fused_grad = steps[fused](logits, labels[idx], idx, idx.numpy(), epoch)
            student = logits.clone().requires_grad_(True)
            reference_loss, _ = steps[reference](student, labels[idx], idx, idx.numpy(), epoch)
            (reference_grad,) = torch.autograd.grad(reference_loss, student)
            assert fused_loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
            torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-6)
