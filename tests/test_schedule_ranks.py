"""The arithmetic of bench/schedule_ranks.py on hand-worked curves (no Ray, no training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import schedule_ranks as sr  # noqa: E402

# Six configurations, two widths, three epochs; epoch 3 is the final one.
#   config  width  epoch 1  epoch 2  final
#   0       8      0.1      0.5      0.60
#   1       8      0.2      0.4      0.70
#   2       8      0.3      0.6      0.80
#   3       16     0.4      0.9      0.65
#   4       16     0.5      0.8      0.75
#   5       16     0.6      0.7      0.85
WIDTHS = [8, 8, 8, 16, 16, 16]
CURVES = np.array([
    [0.1, 0.5, 0.60],
    [0.2, 0.4, 0.70],
    [0.3, 0.6, 0.80],
    [0.4, 0.9, 0.65],
    [0.5, 0.8, 0.75],
    [0.6, 0.7, 0.85],
])


def test_spearman_matches_the_rank_difference_formula():
    final = CURVES[:, 2]  # ranks 1 3 5 2 4 6
    # Epoch 1 ranks 1..6: d = 0 -1 -2 2 1 0, Σd² = 10, ρ = 1 − 6·10 / (6·35) = 5/7.
    assert sr.spearman(CURVES[:, 0], final) == pytest.approx(5 / 7)
    # Epoch 2 ranks 2 1 3 6 5 4: d = 1 -2 -2 4 1 -2, Σd² = 30, ρ = 1 − 180/210 = 1/7.
    assert sr.spearman(CURVES[:, 1], final) == pytest.approx(1 / 7)


def test_spearman_gives_ties_their_average_rank_and_is_undefined_for_a_constant():
    # x ranks 1.5 1.5 3 against 1 2 3: centred (-½ -½ 1)·(-1 0 1) = 1.5 over √(1.5·2) → √3/2.
    assert sr.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(sr.spearman([0.5, 0.5, 0.5], [1, 2, 3]))
    # Along the last axis: one row per bootstrap draw.
    rows = sr.spearman(np.array([[1, 2, 3], [3, 2, 1]]), np.array([[1, 2, 3], [1, 2, 3]]))
    assert rows.tolist() == pytest.approx([1.0, -1.0])


def test_within_width_rho_is_the_size_weighted_mean_of_each_widths_rho():
    groups = sr.groups_of(WIDTHS)
    final = CURVES[:, 2]
    # Epoch 1: both widths in the final order → 1.
    assert sr.within_spearman(CURVES[:, 0], final, groups) == pytest.approx(1.0)
    # Epoch 2: width 8 ranks 2 1 3 against 1 2 3 → 1 − 6·2/24 = ½; width 16 reversed → −1; mean −¼.
    assert sr.within_spearman(CURVES[:, 1], final, groups) == pytest.approx(-0.25)
    # A width tied throughout has no ρ and is left out, not counted as 0.
    tied = np.array([0.5, 0.5, 0.5, 0.1, 0.2, 0.3])
    assert sr.within_spearman(tied, final, groups) == pytest.approx(1.0)


def test_groups_leave_out_widths_too_small_to_rank():
    assert list(sr.groups_of([8, 8, 8, 16, 16])) == [8]


def test_keep_counts_follow_the_successive_halving_cut():
    final = CURVES[:, 2]
    # η = 3 over six: the 2/3 quantile sits a third of the way from the 4th to the 5th value,
    # so the cut keeps two: final top = configs 2 and 5 (0.80, 0.85).
    # Epoch 1 keeps 4 and 5: one of the two final top trials.
    assert sr.keep_counts(CURVES[:, 0], final, 3) == (1, 2, 2, 6)
    # Epoch 2 keeps 3 and 4 (0.9, 0.8): neither.
    assert sr.keep_counts(CURVES[:, 1], final, 3) == (0, 2, 2, 6)
    groups = sr.groups_of(WIDTHS)
    # Per width of three the cut keeps the best one. Epoch 1: 2 and 5, both final winners.
    assert sr.keep_counts(CURVES[:, 0], final, 3, groups) == (2, 2, 2, 6)
    # Epoch 2: 2 (width 8's winner) and 3 (width 16's worst at the end).
    assert sr.keep_counts(CURVES[:, 1], final, 3, groups) == (1, 2, 2, 6)
    # Ties at the cut are all kept, as halving keeps them.
    assert sr.top_cut(np.array([0.5, 0.5, 0.5]), 3).tolist() == [True, True, True]


def test_rank_table_reports_each_rung_with_bootstrap_intervals():
    rows = sr.rank_table(CURVES, CURVES[:, 2], WIDTHS, rungs=[1, 2], reduction_factor=3, draws=200)
    first, second = rows
    assert first["rung"] == 1 and second["rung"] == 2
    assert first["overall"] == pytest.approx(5 / 7) and second["overall"] == pytest.approx(1 / 7)
    assert first["within"] == pytest.approx(1.0) and second["within"] == pytest.approx(-0.25)
    assert first["per_width"] == pytest.approx({8: 1.0, 16: 1.0})
    assert second["per_width"] == pytest.approx({8: 0.5, 16: -1.0})
    assert (first["keep_overall"], first["kept_overall"]) == (0.5, pytest.approx(1 / 3))
    assert (first["keep_within"], second["keep_within"]) == (1.0, 0.5)
    # Within each width epoch 1 orders every configuration as the end does, so any resample
    # does too: the within-width interval is the point [1, 1].
    assert first["within_ci"] == pytest.approx((1.0, 1.0))
    low, high = first["overall_ci"]
    assert -1 <= low <= 5 / 7 <= high <= 1
