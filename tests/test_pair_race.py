"""A race of two hyperparameters (``--param soft_loss,temperature``): every method at every T
of the grid, and the summary's answer to "does the method matter beyond T?" worked out on
hand-made scores."""

from __future__ import annotations

import pytest

from conftest import TINY_SPEC
from kdtune.errors import KdtuneError
from kdtune.racing import BASELINE, Race
from kdtune.search.race import SizeRace, beyond_clause, contender_values, race_params
from kdtune.spec import parse_spec

SPEC = parse_spec({**TINY_SPEC, "space": {**TINY_SPEC["space"], "method": {"choice": ["kd", "dkd", "dist"]},
                                          "temperature": {"loguniform": [1, 8]}}}, "spec.yaml")


def test_a_pair_race_crosses_every_method_with_every_temperature() -> None:
    values = contender_values(SPEC, "soft_loss,temperature", n=3)
    # T grid over [1, 8] with 3 log-spaced values, T = 1 included: 1, 2.8, 8.
    temperatures = [1.0, 2.8, 8.0]
    expected = {f"{m}, T={t:g}": {"soft_loss": m, "temperature": t} for m in ("kd", "dkd", "dist") for t in temperatures}
    assert {k: v for k, v in values.items() if k != BASELINE} == expected
    assert list(values)[-1] == BASELINE and values[BASELINE]["alpha"] == 1.0
    assert len(values) == 10


@pytest.mark.parametrize("param", ["soft_loss,temperature,alpha", "temperature,temperature", "recipe,temperature",
                                   "soft_loss,"])
def test_a_bad_pair_is_one_clear_error(param: str) -> None:
    with pytest.raises(KdtuneError, match="two distinct ones joined by a comma"):
        race_params(param)


def test_an_unsearched_member_of_a_pair_is_refused() -> None:
    with pytest.raises(KdtuneError, match="did not search lr"):
        contender_values(SPEC, "soft_loss,lr")


def _raced(scores: dict[str, list[float]]) -> SizeRace:
    values = {label: {"soft_loss": label.split(",")[0], "temperature": float(label.split("=")[1])}
              for label in scores if label != BASELINE}
    values[BASELINE] = {"alpha": 1.0}
    race = Race(list(scores), max_seeds=6, param="soft_loss × T")
    for round_index in range(len(next(iter(scores.values())))):
        if race.done:
            break
        race.add_round({c: s[round_index] for c, s in scores.items() if c in race.survivors()})
    return SizeRace(8.0, "t0", {}, race, 10, values=values)


def test_the_method_matters_beyond_t_when_all_of_one_method_is_dropped() -> None:
    # dkd 20 points below the others at both T, seed to seed within 0.5 of a point: dropped.
    noise = [0.000, 0.004, -0.003, 0.002, -0.001, 0.003]
    scores = {"kd, T=1": [0.90 + e for e in noise], "kd, T=4": [0.91 + e for e in noise[::-1]],
              "dkd, T=1": [0.70 + e for e in noise], "dkd, T=4": [0.71 + e for e in noise[::-1]],
              BASELINE: [0.905 - e for e in noise]}
    entry = _raced(scores)
    assert {"dkd, T=1", "dkd, T=4"} <= set(entry.race.dropped)
    text = beyond_clause(entry, ["soft_loss", "temperature"])
    assert text.startswith("soft_loss matters beyond T: every contender of dkd dropped")
    kd_best = sum(scores["kd, T=4"][:len(entry.race.scores["kd, T=4"])]) / len(entry.race.scores["kd, T=4"])
    assert f"kd {kd_best:.3f} at T=4" in text and "dkd 0." in text and ", all dropped" in text


def test_the_method_is_not_shown_to_matter_when_each_keeps_a_contender() -> None:
    noise = [0.000, 0.004, -0.003]
    scores = {"kd, T=1": [0.90 + e for e in noise], "dkd, T=1": [0.901 - e for e in noise],
              BASELINE: [0.899 + e for e in noise]}
    text = beyond_clause(_raced(scores), ["soft_loss", "temperature"])
    assert text.startswith("soft_loss not shown to matter beyond T: each keeps a contender in the race")
