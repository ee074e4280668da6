"""BalancedSizes: every student size gets as many trials as any other, in a
multi-objective search, while the wrapped sampler draws everything else."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest

from kdtune.search.sampler import BalancedSizes, build_sampler, journal_storage
from kdtune.spec import SamplerSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

WIDTHS = [8, 16, 32, 64, 128]


def front_task(trial: optuna.Trial) -> tuple[float, float]:
    """A size-against-accuracy task where the smallest width holds most of the front's
    hypervolume: accuracy rises with log width, peaks at temperature 4."""
    width = trial.suggest_categorical("width", WIDTHS)
    temperature = trial.suggest_float("temperature", 1.0, 20.0, log=True)
    accuracy = 0.6 + 0.07 * math.log2(width / 8) - 0.05 * abs(math.log(temperature / 4.0))
    return accuracy, float(width * 100)


def search(sampler: optuna.samplers.BaseSampler, n: int, storage=None, name: str = "s") -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler, storage=storage,
                                study_name=name, load_if_exists=True)
    study.optimize(front_task, n_trials=n)
    return study


def tpe(seed: int = 0) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True)


def test_every_width_gets_as_many_trials_as_any_other():
    study = search(BalancedSizes(tpe(), "width", WIDTHS), 52)
    counts = Counter(t.params["width"] for t in study.trials)
    # 52 trials over 5 widths: the least-tried width goes next, the first in order on ties.
    assert counts == {8: 11, 16: 11, 32: 10, 64: 10, 128: 10}
    assert [t.params["width"] for t in study.trials[:7]] == [8, 16, 32, 64, 128, 8, 16]


def widths_after_a_rule_that_favours_small_students(sampler: optuna.samplers.BaseSampler) -> Counter:
    """Widths of trials 25-99 of a search where, as pareto_asha's rule 1 tends to on
    digits, the smallest students run to the end and wider ones are stopped early
    (PRUNED), after one enqueued trial per width that all complete."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    space = {"width": optuna.distributions.CategoricalDistribution(WIDTHS),
             "temperature": optuna.distributions.FloatDistribution(1.0, 20.0, log=True)}
    for width in WIDTHS:
        study.enqueue_trial({"width": width})
    for number in range(100):
        trial = study.ask(space)
        if number < len(WIDTHS) or trial.params["width"] == WIDTHS[0]:
            study.tell(trial, [0.6 + 0.07 * math.log2(trial.params["width"] / 8), trial.params["width"] * 100.0])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return Counter(t.params["width"] for t in study.trials[25:])


def test_tpe_alone_follows_the_rule_onto_the_smallest_width_and_the_wrapper_does_not():
    # Why the wrapper exists: TPE's "good" trials are the completed ones, so a rule that
    # lets small students finish pulls TPE's widths down (live, up to 86-87% of trials went to
    # the smallest width). Fair share here: 75 trials / 5 widths = 15.
    alone = widths_after_a_rule_that_favours_small_students(tpe())
    assert alone[WIDTHS[0]] >= 1.5 * 15
    balanced = widths_after_a_rule_that_favours_small_students(BalancedSizes(tpe(), "width", WIDTHS))
    assert balanced == {width: 15 for width in WIDTHS}


def test_the_other_hyperparameters_still_come_from_the_wrapped_sampler():
    # After its 5 random trials TPE models the temperature: the draws gather around the
    # peak (T = 4) instead of spreading log-uniformly over [1, 20].
    study = search(BalancedSizes(tpe(), "width", WIDTHS), 60)
    later = [t.params["temperature"] for t in study.trials[20:]]
    near_peak = sum(2.0 <= t <= 8.0 for t in later) / len(later)
    uniform_share = (math.log(8.0) - math.log(2.0)) / (math.log(20.0) - math.log(1.0))  # 0.46
    assert near_peak > uniform_share + 0.2


def test_running_trials_count_so_parallel_asks_get_different_widths():
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=BalancedSizes(optuna.samplers.RandomSampler(seed=0), "width", WIDTHS))
    asked = [study.ask({"width": optuna.distributions.CategoricalDistribution(WIDTHS)}) for _ in range(5)]
    assert sorted(t.params["width"] for t in asked) == WIDTHS


def test_a_resumed_search_keeps_the_balance_from_its_storage(tmp_path):
    storage = journal_storage(tmp_path / "journal.log")
    search(BalancedSizes(tpe(0), "width", WIDTHS), 7, storage)  # 8, 16, 32, 64, 128, 8, 16
    study = search(BalancedSizes(tpe(1), "width", WIDTHS), 3, storage)  # a new process, a new sampler
    assert [t.params["width"] for t in study.trials[7:]] == [32, 64, 128]


def test_enqueued_widths_count_like_any_other():
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=BalancedSizes(optuna.samplers.RandomSampler(seed=0), "width", WIDTHS))
    study.enqueue_trial({"width": 8})
    study.enqueue_trial({"width": 8})
    study.optimize(front_task, n_trials=5)
    assert Counter(t.params["width"] for t in study.trials) == {8: 2, 16: 1, 32: 1, 64: 1}


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "gp"])
def test_build_sampler_wraps_only_a_multi_objective_search_over_discrete_widths(name):
    spec = SamplerSpec(name=name)
    assert isinstance(build_sampler(spec, 0, True, sizes=WIDTHS), BalancedSizes)
    assert not isinstance(build_sampler(spec, 0, False, sizes=WIDTHS), BalancedSizes)  # accuracy alone
    assert not isinstance(build_sampler(spec, 0, True, sizes=None), BalancedSizes)  # width not searched
    assert not isinstance(build_sampler(spec, 0, True, sizes=[8]), BalancedSizes)
    assert not isinstance(build_sampler(SamplerSpec(name=name, balance_sizes=False), 0, True, sizes=WIDTHS),
                          BalancedSizes)
