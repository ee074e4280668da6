"""The Optuna side of the search: distributions, samplers, and an honest OptunaSearch.

Ray's ``OptunaSearch`` tells Optuna that a trial stopped early by the scheduler
is COMPLETE with its partial accuracy: the sampler then learns that those
configurations are bad at full budget, which they were never shown to be.
:class:`KdOptunaSearch` tells such trials PRUNED, diverged trials FAIL, and only
trials that ran their whole epoch budget COMPLETE.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdtune.core.objectives import SIZE_HYPERPARAMETER, hyperparameter_table
from kdtune.registry import Registry
from kdtune.search.callbacks import record_ended_trial
from kdtune.search.private_apis import fail_lost_trial, optuna_study, optuna_trials, told_trials
from kdtune.spec import FIRST_TRIALS, Choice, IntRange, LogUniform, SamplerSpec, Uniform
from kdtune.study import COMPLETED, STOPPED_EARLY, record_path, recorded_ids, trial_status

logger = logging.getLogger(__name__)



def to_optuna_distribution(value: Any) -> BaseDistribution:
    """The Optuna distribution for one searched spec value."""
    if isinstance(value, Uniform):
        return FloatDistribution(*map(float, value.uniform))
    if isinstance(value, LogUniform):
        return FloatDistribution(*map(float, value.loguniform), log=True)
    if isinstance(value, IntRange):
        return IntDistribution(*map(int, value.int), log=value.log)
    if isinstance(value, Choice):
        return CategoricalDistribution(list(value.choice))
    raise TypeError(f"not a distribution: {value!r}")


#: Optuna samplers by the name a spec gives (``sampler.name``):
#: (sampler settings, seed, multi-objective?, conditional space?) → sampler.
#: With a conditional space (:class:`ConditionalSpace`): TPE models the parameters of
#: each method jointly with the method (``group=True``); random sampling is unaffected;
#: NSGA-II and GP sample the parameters a trial lacks independently (Optuna falls back
#: to its independent sampler for parameters outside the trial's relative space).
SAMPLERS: Registry[Callable[[SamplerSpec, int, bool, bool], optuna.samplers.BaseSampler]] = Registry("sampler")


@SAMPLERS.register("tpe")
def _tpe(spec: SamplerSpec, seed: int, multi_objective: bool, conditional: bool) -> optuna.samplers.BaseSampler:
    # Multi-objective TPE must be multivariate to model the front; constant_liar keeps
    # parallel trials from all asking for the same point; group=True makes a method's own
    # parameters depend on the method drawn (otherwise they are sampled independently of it).
    extra = {"group": True} if conditional else {}
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials,
                                      multivariate=spec.multivariate or multi_objective or conditional,
                                      constant_liar=spec.constant_liar, **extra)


@SAMPLERS.register("random")
def _random(spec: SamplerSpec, seed: int, multi_objective: bool, conditional: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("nsga2")
def _nsga2(spec: SamplerSpec, seed: int, multi_objective: bool, conditional: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


@SAMPLERS.register("gp")
def _gp(spec: SamplerSpec, seed: int, multi_objective: bool, conditional: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.n_startup_trials)


def build_sampler(spec: SamplerSpec, seed: int, multi_objective: bool, conditional: bool = False,
                  sizes: list[Any] | None = None, size_param: str = SIZE_HYPERPARAMETER) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a spec names (see :data:`SAMPLERS`).

    In a multi-objective search over discrete student ``sizes`` (the choices of
    ``size_param``), the sampler is wrapped in :class:`BalancedSizes` unless the spec
    turns ``balance_sizes`` off: under early stopping, multi-objective TPE alone
    crowds the smallest size (see that class).
    """
    sampler = SAMPLERS.get(spec.name)(spec, seed, multi_objective, conditional)
    if spec.balance_sizes and multi_objective and sizes and len(sizes) > 1:
        return BalancedSizes(sampler, size_param, sizes)
    return sampler


class BalancedSizes(optuna.samplers.BaseSampler):
    """Draw the student size so that every size gets as many trials as any other;
    every other hyperparameter comes from the wrapped sampler.

    Why: a front of size against accuracy is only as good as its worst-explored
    size. Multi-objective TPE takes its "good" trials from the completed ones (trials
    stopped early are PRUNED), and an early-stopping rule that lets small students
    finish more often than wide ones (pareto_asha's rule 1) then pulls TPE's widths
    down, and more small students finish. In live searches of the digits tasks
    (bench/moasha_live.py, 10 seeds each) up to 86% (MLP) and 87% (CNN) of TPE's trials
    went to the smallest width, on all 20 seeds some width got under 10% of them, and on 15 a
    width ended with no trial run to the end; random sampling gave every width 16–30%.

    The next trial takes the size with the fewest trials so far, running ones
    included (ties: the first in ``sizes``); sizes fixed by enqueued trials count
    like any other. The counts are read from the study's storage, so a resumed
    search keeps its balance. The size is left out of the wrapped sampler's relative
    search space, so TPE models the other hyperparameters jointly over all sizes.
    A module-level class because Ray pickles the searcher, sampler included.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, param: str, sizes: list[Any]) -> None:
        self.sampler, self.param, self.sizes = sampler, param, list(sizes)

    def next_size(self, study: optuna.Study) -> Any:
        """The size with the fewest trials in ``study`` so far (the first such in ``sizes``)."""
        counts = {size: 0 for size in self.sizes}
        for trial in study.get_trials(deepcopy=False):
            size = trial.params.get(self.param)
            if size in counts:
                counts[size] += 1
        return min(self.sizes, key=lambda size: counts[size])

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, BaseDistribution]:
        space = self.sampler.infer_relative_search_space(study, trial)
        return {name: dist for name, dist in space.items() if name != self.param}

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name == self.param:
            return self.next_size(study)
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def midpoint(distribution: BaseDistribution) -> Any:
    """The middle of ``distribution``'s range: the geometric mean of a log-scaled range,
    the arithmetic mean of a linear one (on the range's step, if it has one), the first
    value of a choice. Earlier Syne Tune releases started their searchers from this configuration
    by default (``impute_points_to_evaluate``; the 0.16 installed here starts from none); a range drawn
    by a user is usually centred on what they expect to work."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    low, high = distribution.low, distribution.high
    return _on_range(distribution, math.sqrt(low * high) if distribution.log else (low + high) / 2)


def _on_range(distribution: FloatDistribution | IntDistribution, value: float) -> float | int:
    """``value`` as ``distribution`` can take it: within its range, on its step's grid if it
    has one (the nearest value, halves up), an int for an int range."""
    low, step = distribution.low, distribution.step
    value = min(max(value, low), distribution.high)
    if step is not None:
        value = min(low + math.floor((value - low) / step + 0.5) * step, distribution.high)
    return int(value) if isinstance(distribution, IntDistribution) else float(value)


def first_trials(space: dict[str, BaseDistribution] | ConditionalSpace, size_param: str,
                 size_values: list[Any] | None, how: str) -> list[dict[str, Any]]:
    """The parameters to enqueue before the sampler takes over: one trial per size in
    ``size_values`` (none without discrete sizes, unless ``how`` fixes the other
    hyperparameters: then one).

    ``random`` fixes only the size; ``midpoint`` also fixes every other searched
    hyperparameter at :func:`midpoint` of its range (in a conditional space, those of
    the method that the midpoint's selector picks). ``size_scaled`` is ``midpoint``
    for the largest size; for a smaller one, each hyperparameter that declares a
    ``size_exponent`` (the learning rate) starts at the middle times
    ``(size / largest) ** size_exponent``, within its range. Why enqueue sizes at all:
    a random start of 10 trials over 5 widths misses one width in about one search in
    ten, and TPE then never learns that width exists."""
    if how not in FIRST_TRIALS:
        raise ValueError(f"first trials {how!r}: expected one of {', '.join(FIRST_TRIALS)}")
    sizes = list(size_values or [])
    if how == "random":
        return [{size_param: size} for size in sizes]
    distributions = space.distributions if isinstance(space, ConditionalSpace) else space
    middle: dict[str, Any] = {}
    for name, distribution in distributions.items():
        if (name != size_param or not sizes) and (not isinstance(space, ConditionalSpace)
                                                  or space.applies(name, middle)):
            middle[name] = midpoint(distribution)
    if not sizes:
        return [middle]
    if how == "midpoint":
        return [{size_param: size, **middle} for size in sizes]
    exponents = {name: hp.size_exponent for name, hp in hyperparameter_table().items()
                 if hp.size_exponent and name in middle
                 and not isinstance(distributions[name], CategoricalDistribution)}
    return [{size_param: size, **middle,
             **{name: _on_range(distributions[name], middle[name] * (size / max(sizes)) ** exponent)
                for name, exponent in exponents.items()}}
            for size in sizes]


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Draw ``name`` from ``distribution`` through the trial's public API."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log,
                                   step=distribution.step)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_categorical(name, distribution.choices)


class ConditionalSpace:
    """A define-by-run space: the searched hyperparameters in the table's order, where one
    declared by an objective (``dkd_beta`` by ``dkd``) is drawn only in trials whose
    ``selector`` (``soft_loss``, the method) is that objective. A module-level class, not a
    closure, because Ray pickles the searcher, and with it this space, with the experiment."""

    def __init__(self, distributions: dict[str, BaseDistribution], owners: dict[str, str | None],
                 selector: str = "soft_loss", fixed_selector: Any = None) -> None:
        self.distributions, self.owners = dict(distributions), dict(owners)
        self.selector, self.fixed_selector = selector, fixed_selector

    def applies(self, name: str, params: dict[str, Any]) -> bool:
        """Whether ``name`` is drawn in a trial whose parameters so far are ``params``."""
        owner = self.owners.get(name)
        return owner is None or params.get(self.selector, self.fixed_selector) == owner

    def __call__(self, trial: optuna.Trial) -> None:
        for name, distribution in self.distributions.items():
            if self.applies(name, trial.params):
                _suggest(trial, name, distribution)


def journal_storage(path: str | Path) -> JournalStorage:
    """Optuna storage in an append-only journal file (``optuna.load_study`` can open it live)."""
    return JournalStorage(JournalFileBackend(str(path)))


def clear_stale_journal_lock(path: str | Path) -> bool:
    """Remove the journal's write lock left behind by a killed search; True if there was one.

    Optuna's file lock is a ``<journal>.lock`` link that a SIGKILLed process never
    removes; the next writer then waits 30 s before breaking it. Only call this
    while holding the study lock (:func:`kdtune.study.study_lock`): no other
    kdtune process can then be writing to the journal.
    """
    lock = Path(f"{path}.lock")
    if lock.is_symlink() or lock.exists():
        lock.unlink(missing_ok=True)
        return True
    return False


#: How each way a trial can end is told to Optuna.
OPTUNA_STATES = {COMPLETED: TrialState.COMPLETE, STOPPED_EARLY: TrialState.PRUNED}


def trial_outcome(result: dict[str, Any] | None, error: bool) -> str:
    """How a finished Ray trial is told to Optuna: "complete", "pruned" or "fail",
    from its status as :func:`kdtune.study.trial_status` decides it (the budget is
    the ``epochs`` every result carries)."""
    if error or not result or result.get("epochs") is None:
        return "fail"
    state = OPTUNA_STATES.get(trial_status(result, result.get("epochs"), ended=True), TrialState.FAIL)
    return state.name.lower()


def outcome_state(result: dict[str, Any] | None, error: bool,
                  metrics: list[str]) -> tuple[TrialState, list[float] | None]:
    """The Optuna state and objective values (``metrics`` of the last ``result``) of a
    finished Ray trial; a completed trial without finite values is FAIL."""
    outcome = trial_outcome(result, error)
    if outcome == "pruned":
        return TrialState.PRUNED, None
    if outcome == "complete":
        values = [result.get(m) for m in metrics]  # type: ignore[union-attr]
        if all(v is not None and math.isfinite(float(v)) for v in values):
            return TrialState.COMPLETE, [float(v) for v in values]
    return TrialState.FAIL, None


class KdOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports early-stopped trials as PRUNED and diverged ones as FAIL.

    It also records the Ray trial id on every Optuna trial (user attribute
    ``ray_trial_id``) so the journal can be reconciled with Ray's tables.
    """

    #: Class-level defaults, so that searchers pickled by older versions still load.
    _budget: Any = None
    _epochs_spent: dict[str, int] | None = None
    _started: float | None = None

    def __init__(self, *args: Any, first: list[dict[str, Any]] | None = None, num_samples: int | None = None,
                 records: str | Path | None = None, budget: Any = None, **kwargs: Any) -> None:
        """Arguments as :class:`OptunaSearch`, plus the trials to try first.

        ``first`` (the parameters of each, from :func:`first_trials`) are enqueued as
        the first trials of a new study; a resumed study has trials and gets none.
        ``num_samples`` and ``records`` (the folder of the search's trial records,
        see :mod:`kdtune.records`) let a restored searcher count the trials that
        ended after Ray's last saved state, so the search still ends at
        ``num_samples`` trials. ``budget`` (a :class:`kdtune.search.plan.Budget`)
        stops sampling once the search trials have run that many epochs, or this
        run that many seconds; trials already running finish.
        """
        super().__init__(*args, **kwargs)
        self._budget = budget
        self._epochs_spent = {}
        self._num_samples = num_samples
        self._records = str(records) if records is not None else None
        self._forgotten: set[str] = set()
        study = optuna_study(self)
        if first and study is not None and not study.trials:
            for params in first:
                study.enqueue_trial(params, skip_if_exists=True)

    def restore(self, checkpoint_path: str) -> None:
        """Restore Ray's saved state, then count the recorded trials it does not know:
        they ended after that state was saved, and they count toward ``num_samples``."""
        super().restore(checkpoint_path)
        self._started = None  # a wall-clock budget counts this run's time
        if self._records is not None:
            self._forgotten = recorded_ids(self._records) - set(optuna_trials(self))

    def budget_spent(self) -> bool:
        """Whether the search's compute budget is used up (never, without one)."""
        if self._budget is None:
            return False
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        return self._budget.spent(sum((self._epochs_spent or {}).values()), elapsed)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        self._count_epochs(trial_id, result)

    def _count_epochs(self, trial_id: str, result: dict | None) -> None:
        """Count the epochs ``result`` says the trial has run toward the budget."""
        if self._budget is not None and result is not None and result.get("epoch") is not None:
            spent = self._epochs_spent if self._epochs_spent is not None else {}
            spent[trial_id] = max(spent.get(trial_id, 0), int(result["epoch"]))
            self._epochs_spent = spent

    def suggest(self, trial_id: str) -> dict | None:
        if self._started is None:
            self._started = time.monotonic()
        if self.budget_spent():
            return Searcher.FINISHED
        if (self._forgotten and self._num_samples is not None
                and len(optuna_trials(self)) + len(self._forgotten) >= self._num_samples):
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        ot_trial = optuna_trials(self).get(trial_id)
        if ot_trial is not None and "ray_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Ray does not pass the result a scheduler stops a trial on to on_trial_result
        # (only to on_trial_complete): without this, the epochs of every trial stopped
        # early went uncounted, and a budget with early stopping was overspent.
        self._count_epochs(trial_id, result)
        if trial_id in told_trials(self) or trial_id not in optuna_trials(self):
            return
        if self._records is not None:
            if record_path(self._records, trial_id).exists():
                # A trial that had ended before a restart: the journal holds its
                # outcome (told then, or from its record by reconcile_journal).
                told_trials(self).add(trial_id)
                return
            # The record first, then the journal (see record_ended_trial).
            record_ended_trial(self._records, trial_id, error)
        ot_trial = optuna_trials(self)[trial_id]
        state, values = self._outcome(result, error)
        try:
            optuna_study(self).tell(ot_trial, values if values is None or len(values) > 1 else values[0], state=state)
        except ValueError:
            # The journal already holds an outcome for this trial: it finished just
            # before a driver crash, after Ray's last saved experiment state, and Ray
            # ran it again after --resume.
            self._record_rerun(ot_trial.number, trial_id, state, values)
        except Exception as exc:  # noqa: BLE001 - a failed tell must not end the search
            logger.warning("could not tell Optuna the outcome of trial %s: %s", trial_id, exc)
        told_trials(self).add(trial_id)

    def _outcome(self, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None]:
        return outcome_state(result, error, self.metric if isinstance(self.metric, list) else [self.metric])

    def _record_rerun(self, number: int, trial_id: str, state: TrialState, values: list[float] | None) -> None:
        """Keep the journal agreeing with Ray when a trial ran again after a restart.

        Trials with a record are never run again (see :mod:`kdtune.records`); this is
        for a driver killed between telling Optuna and writing the record. A
        finished Optuna trial cannot change, so when the second run ended
        differently (say PRUNED before the crash, COMPLETE after it) a new trial with the same parameters
        records the outcome Ray keeps, with user attributes ``ray_trial_id`` and
        ``rerun_of`` (the number of the trial it supersedes).
        """
        earlier = next(t for t in optuna_study(self).get_trials(deepcopy=False) if t.number == number)
        same_values = (values is None) == (earlier.values is None) and (
            values is None or all(math.isclose(a, b) for a, b in zip(values, earlier.values)))
        if earlier.state == state and same_values:
            return
        optuna_study(self).add_trial(optuna.trial.create_trial(
            params=earlier.params, distributions=earlier.distributions, state=state, values=values,
            user_attrs={**earlier.user_attrs, "ray_trial_id": trial_id, "rerun_of": number},
        ))
        logger.info("trial %s ran again after a restart: recorded its new outcome (%s) as a new Optuna trial",
                    trial_id, state.name)


def reconcile_journal(storage_path: str | Path, study_name: str, records: dict[str, dict[str, Any]],
                      metrics: list[str], finished_ray_trials: set[str] | None = None) -> tuple[int, int]:
    """Bring journal trials left RUNNING by a killed driver up to date.

    A trial with a record (``records``, by Ray trial id) ended: the searcher writes
    the record before it tells Optuna, so a driver killed in between leaves the
    outcome only in the record. It is told now, from the record's last result,
    with ``metrics`` as the objective values. When ``finished_ray_trials`` is given
    (at the end of a search), the other RUNNING trials whose Ray trial is not
    among them were asked before a driver crash and never run: they become FAIL
    with the user attribute ``lost_on_restart``, to be told apart from real
    failures. Returns (told from records, marked lost).
    """
    storage = journal_storage(storage_path)
    study = optuna.load_study(study_name=study_name, storage=storage)
    told = lost = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        ray_id = trial.user_attrs.get("ray_trial_id")
        record = records.get(ray_id) if ray_id else None
        if record is not None and trial.state == TrialState.RUNNING:
            results = record.get("results") or []
            state, values = outcome_state(results[-1] if results else None, record.get("ray_status") == "ERROR",
                                          metrics)
            study.tell(trial.number, values, state=state)
            told += 1
        elif finished_ray_trials is not None and ray_id not in finished_ray_trials:
            fail_lost_trial(study, trial, "lost_on_restart")
            lost += 1
    return told, lost
