"""Readable trial names and folder names (kdtune.trial_names), on plain objects shaped like Ray's Trial."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kdtune.trial_names import MAX_DIRNAME, folder_patterns, trial_dirname, trial_name

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def trial(trial_id: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config)


def test_search_trial_shows_width_temperature_alpha_then_id():
    t = trial("4f102fef", width=8, temperature=4.6213, alpha=0.37241, beta=0.0, noise=0.0, lr=0.01, phase="search")
    assert trial_name(t) == "w8-T4.62-a0.372-4f102fef"
    assert trial_dirname(t) == "w8-T4.62-a0.372-4f102fef"


def test_non_zero_beta_and_noise_are_shown_and_numpy_values_read_as_numbers():
    t = trial("a1_00003", width=np.float64(0.5), temperature=np.float32(12.0), alpha=0.0, beta=0.25, noise=0.1)
    assert trial_dirname(t) == "w0.5-T12-a0-b0.25-n0.1-a1_00003"


def test_baseline_trial_names_its_width_from_overrides():
    t = trial("e8111_00001", phase="baseline", width=None, temperature=None,
              overrides={"width": 32, "alpha": 1.0, "beta": 0.0, "noise": 0.0, "temperature": 1.0, "epochs": 4})
    assert trial_name(t) == "baseline-w32-e8111_00001"
    assert trial_dirname(t) == "baseline-w32-e8111_00001"


def test_missing_values_are_left_out_and_an_empty_config_gives_the_id():
    assert trial_dirname(trial("abc", width=16, temperature="not-a-number")) == "w16-abc"
    assert trial_dirname(SimpleNamespace(trial_id="abc", config=None)) == "abc"


def test_dirname_is_filesystem_safe_short_and_keeps_the_whole_id():
    long_id = "x" * 40
    t = trial("id/with:odd chars", width=1e-7, temperature=123456789.0, alpha=1 / 3)
    name = trial_dirname(t)
    assert SAFE.match(name) and name.endswith("-id_with_odd_chars")
    huge = trial(long_id, width=8, temperature=4.0, alpha=0.5, beta=0.5, noise=0.5, phase="search")
    assert len(trial_dirname(huge)) <= MAX_DIRNAME and trial_dirname(huge).endswith(long_id)
    assert len(trial_dirname(trial("y" * 200))) == 200  # the id itself is never cut


def test_names_of_distinct_trials_differ_even_with_equal_configs():
    config = {"width": 8, "temperature": 2.0, "alpha": 0.5}
    names = {trial_dirname(trial(f"abcd_{i:05d}", **config)) for i in range(50)}
    assert len(names) == 50


def test_folder_patterns_match_both_naming_styles_and_only_that_trial(tmp_path: Path):
    folders = [
        "distill_trainable_4f102fef_4_alpha=0.1917,amp=False,batch_size=32_2026-11-30_10-00-43",
        "distill_trainable_4f102fe_5_alpha=0.2_2026-11-30_10-00-43",
        "w8-T4.62-a0.372-c8eee350",
        "w8-T4.62-a0.372-c8eee3501",
        "baseline-w8-e8111_00000",
        "baseline-w8-e8111_000001",
    ]
    for name in folders:
        (tmp_path / name).mkdir()

    def found(trial_id: str) -> set[str]:
        return {p.name for pattern in folder_patterns(trial_id) for p in tmp_path.glob(pattern)}

    assert found("4f102fef") == {folders[0]}
    assert found("c8eee350") == {folders[2]}
    assert found("e8111_00000") == {folders[4]}
    assert found("[a-z]*") == set()  # glob characters in an id are taken literally
