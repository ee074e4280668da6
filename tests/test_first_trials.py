"""The first trial of each width: left to the sampler, at the middle of every range, or there
with the learning rate scaled by width (``sampler.first_trials``,
:func:`kdtune.search.sampler.first_trials`)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from kdtune.search.sampler import (
    ConditionalSpace,
    KdOptunaSearch,
    first_trials,
    midpoint,
)
from kdtune.spec import SamplerSpec

SPACE = {
    "temperature": FloatDistribution(1.0, 16.0, log=True),
    "alpha": FloatDistribution(0.0, 0.5),
    "width": CategoricalDistribution([8, 16, 32]),
    "lr": FloatDistribution(0.001, 0.1, log=True),
}


@pytest.mark.parametrize("distribution, expected", [
    (FloatDistribution(1.0, 16.0, log=True), 4.0),          # sqrt(1 * 16)
    (FloatDistribution(0.0, 0.5), 0.25),
    (FloatDistribution(0.0, 0.9, step=0.3), 0.6),           # grid 0, 0.3, 0.6, 0.9: 0.45 -> 0.6
    (IntDistribution(16, 256, log=True), 64),               # sqrt(16 * 256)
    (IntDistribution(1, 10), 6),                            # 5.5, halves up
    (IntDistribution(2, 32, log=True), 8),                  # sqrt(64)
    (CategoricalDistribution(["kd", "dkd", "dist"]), "kd"),
])
def test_midpoint_of_each_kind_of_range(distribution, expected):
    assert midpoint(distribution) == pytest.approx(expected)


def test_random_first_trials_fix_only_the_width():
    assert first_trials(SPACE, "width", [8, 16, 32], "random") == [{"width": 8}, {"width": 16}, {"width": 32}]
    assert first_trials(SPACE, "width", None, "random") == []


def test_midpoint_first_trials_fix_everything_else_at_the_middle():
    trials = first_trials(SPACE, "width", [8, 32], "midpoint")
    assert [t["width"] for t in trials] == [8, 32]
    for trial in trials:
        assert trial["temperature"] == pytest.approx(4.0)
        assert trial["alpha"] == pytest.approx(0.25)
        assert trial["lr"] == pytest.approx(math.sqrt(0.001 * 0.1))
    # No discrete widths: one trial, the width at its middle like the rest.
    single = first_trials({**SPACE, "width": IntDistribution(4, 64, log=True)}, "width", None, "midpoint")
    assert single == [pytest.approx({"temperature": 4.0, "alpha": 0.25, "width": 16, "lr": 0.01})]


def test_size_scaled_first_trials_raise_the_lr_of_narrower_students():
    # lr declares size_exponent -0.2: width w starts at the middle 0.01 times (w / 32) ** -0.2.
    trials = first_trials(SPACE, "width", [8, 16, 32], "size_scaled")
    assert [t["lr"] for t in trials] == pytest.approx([0.01 * 4 ** 0.2, 0.01 * 2 ** 0.2, 0.01])
    assert 0.0131 < trials[0]["lr"] < 0.0132  # 4 ** 0.2 = 1.3195
    for trial in trials:  # everything else stays at the middle
        assert trial["temperature"] == pytest.approx(4.0) and trial["alpha"] == pytest.approx(0.25)
    # Within the range: a 100,000-fold narrower student stops at the top of [0.001, 0.02].
    narrow = {**SPACE, "lr": FloatDistribution(0.001, 0.02, log=True)}
    smallest = first_trials(narrow, "width", [1, 100_000], "size_scaled")[0]
    assert smallest["lr"] == 0.02  # not sqrt(0.001 * 0.02) * 100_000 ** 0.2 = 0.0447
    # A fixed lr is not searched, so not scaled; without discrete widths, one midpoint trial.
    fixed = {name: d for name, d in SPACE.items() if name != "lr"}
    assert all("lr" not in t for t in first_trials(fixed, "width", [8, 32], "size_scaled"))
    assert first_trials(SPACE | {"width": IntDistribution(4, 64, log=True)}, "width", None, "size_scaled") == \
        first_trials(SPACE | {"width": IntDistribution(4, 64, log=True)}, "width", None, "midpoint")


def test_midpoint_in_a_conditional_space_takes_only_the_chosen_methods_parameters():
    distributions = {"soft_loss": CategoricalDistribution(["dkd", "kd"]), "temperature": SPACE["temperature"],
                     "dkd_beta": FloatDistribution(1.0, 9.0), "dist_gamma": FloatDistribution(0.5, 2.0)}
    space = ConditionalSpace(distributions, {"dkd_beta": "dkd", "dist_gamma": "dist"})
    assert first_trials(space, "width", [8], "midpoint") == [
        {"width": 8, "soft_loss": "dkd", "temperature": pytest.approx(4.0), "dkd_beta": 5.0}]


def test_the_searcher_asks_for_the_first_trials_before_sampling():
    first = first_trials(SPACE, "width", [8, 16, 32], "midpoint")
    searcher = KdOptunaSearch(space=SPACE, metric=["val_acc", "params"], mode=["max", "min"],
                              sampler=optuna.samplers.RandomSampler(seed=0), first=first)
    asked = [searcher.suggest(f"t{i}") for i in range(5)]
    assert [a["width"] for a in asked[:3]] == [8, 16, 32]
    assert all(a["temperature"] == pytest.approx(4.0) and a["alpha"] == pytest.approx(0.25) for a in asked[:3])
    assert all(a["temperature"] != pytest.approx(4.0) for a in asked[3:])  # then the sampler draws


def test_the_spec_names_the_allowed_values():
    assert SamplerSpec().first_trials == "size_scaled"
    with pytest.raises(ValueError, match="'random', 'midpoint' or 'size_scaled'"):
        SamplerSpec(first_trials="middle")


def test_a_resumed_study_gets_no_first_trials_again(tmp_path):
    from kdtune.search.sampler import journal_storage

    first = first_trials(SPACE, "width", [8, 16, 32], "midpoint")

    def searcher():
        return KdOptunaSearch(space=SPACE, metric=["val_acc", "params"], mode=["max", "min"],
                              sampler=optuna.samplers.RandomSampler(seed=1), first=first,
                              study_name="s", storage=journal_storage(tmp_path / "journal.log"))

    before = searcher()
    assert [before.suggest(f"t{i}")["width"] for i in range(2)] == [8, 16]
    after = searcher()  # the same study, reopened: its one waiting first trial (width 32) comes next
    assert after.suggest("t2")["width"] == 32
    study = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "journal.log"))
    assert sum(t.params.get("alpha") == pytest.approx(0.25) for t in study.trials) == 3  # not enqueued twice
    assert after.suggest("t3")["temperature"] != pytest.approx(4.0)
