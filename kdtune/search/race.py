"""The race: which temperature (or other hyperparameter) for each student size, with
as few seeded runs as the evidence needs (``kdtune best-t RESULTS --race``).

For each size on the validation front (or the sizes asked for) the race holds
every other hyperparameter at that size's best search trial and races contenders
for one hyperparameter: a grid over the spec's range of it
(:func:`kdtune.racing.contender_grid`) plus the no-distillation baseline. Rounds
train every surviving contender once more with one fresh seed shared by all
contenders of the round (common random numbers); the statistics, drops and
stopping are :class:`kdtune.racing.Race`'s.

All runs go out through Ray as ONE Tuner driven by :class:`RaceSearcher`: it hands
out the runs of the current round of every size, waits until a size's round is
complete before starting its next one, and finishes when every size's race is
done. Runs use the search's trainable, resources, failure rules and records
(``records/race/``): a killed race resumes with ``--race --resume`` by replaying
the recorded runs into the races, so no finished run is repeated, and the seeds
(``spec.seed + RACE_SEED_OFFSET + round``) make the outcome that of an
uninterrupted race.

Two hyperparameters joined by a comma (``--param soft_loss,temperature``) race their
cross product: every method at every T of the grid, each contender named
``"dkd, T=2.7"``. The summary then says, per size, whether the first (the method)
matters beyond the second (T): each method at its best T, and whether every
contender of some method was dropped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune.search import Searcher

from kdtune.core.objectives import RECIPE, baseline_values, hyperparameter, recipes
from kdtune.errors import KdtuneError
from kdtune.pareto import pareto_front
from kdtune.racing import BASELINE, DEFAULT_MAX_SEEDS, Race, contender_grid
from kdtune.spec import VALIDATE_RUNGS, Choice, IntRange, LogUniform, SearchSpec, bounds
from kdtune.study import (
    COMPLETED,
    EXPERIMENT_FOLDERS,
    RACE_CONTENDERS_TABLE,
    RACE_DIR,
    RACE_PHASE,
    RACE_TABLE,
    TRIAL_KEYS,
    load_records,
    recorded_trial_config,
    trial_config,
)
from kdtune.tables import epoch_rows, write_frame_atomic

Log = Callable[[str], None]

#: Race seeds are ``spec.seed + RACE_SEED_OFFSET + round``: never a search seed
#: (the search uses ``spec.seed``) nor an evaluation seed (``+ 1000 + i``).
RACE_SEED_OFFSET = 2000


@dataclass
class SizeRace:
    """The race of one student size: its best trial's config and its contenders."""

    size: float
    trial_id: str
    base: dict[str, Any]
    race: Race
    epochs: int
    #: round → contender → score, rounds not yet added to the race.
    partial: dict[int, dict[Any, float]] = field(default_factory=dict)
    #: contender → the hyperparameter values its runs set over ``base`` (:func:`contender_values`).
    values: dict[Any, dict[str, Any]] = field(default_factory=dict)


def race_params(param: str) -> list[str]:
    """The hyperparameters a race's ``--param`` names: one, or two joined by a comma."""
    names = [name.strip() for name in str(param).split(",")]
    if len(names) > 2 or not all(names) or len(set(names)) != len(names) or (RECIPE in names and len(names) > 1):
        raise KdtuneError(f"--param {param}: race one hyperparameter, two distinct ones joined by a comma "
                          f"(e.g. soft_loss,temperature: every method at every T), or {RECIPE}")
    return names


def contender_values(spec: SearchSpec, param: str, n: int = 8) -> dict[Any, dict[str, Any]]:
    """Each contender of a race on ``param`` and the values its runs set: a grid over the
    spec's range of ``param`` (see :func:`_grid`), ``{param: value}`` each; for two
    hyperparameters joined by a comma, their grids' cross product, named ``"dkd, T=2.7"``;
    for :data:`~kdtune.core.objectives.RECIPE`, each published recipe. The baseline last."""
    names = race_params(param)
    if names == [RECIPE]:
        found: dict[Any, dict[str, Any]] = dict(recipes())
    elif len(names) == 1:
        found = {value: {param: value} for value in _grid(spec, param, n)}
    else:
        first, second = (_grid(spec, name, n) for name in names)
        found = {f"{_named(names[0], a)}, {_named(names[1], b)}": {names[0]: a, names[1]: b}
                 for a in first for b in second}
    return {**found, BASELINE: dict(baseline_values())}


def _short(param: str) -> str:
    """How verdicts and labels name a raced hyperparameter: the temperature as T, others by name."""
    return "T" if param == "temperature" else param


def _named(param: str, value: Any) -> str:
    """A value as a pair contender's label shows it: a method by name, a number as ``T=2.7``."""
    if isinstance(value, str):
        return value
    return f"{_short(param)}={float(value):g}"


def _grid(spec: SearchSpec, param: str, n: int) -> list[Any]:
    """The grid over the spec's range of one searched hyperparameter: log-spaced for a log-uniform
    range (with T = 1 for the temperature), linear for a uniform one, every value of a choice or
    of a short int range."""
    try:
        hyperparameter(param)
    except KdtuneError as exc:  # unknown names raise, listing the known ones and the recipes
        raise KdtuneError(f"{exc}; or {RECIPE} (each method's published recipe)") from None
    searched = spec.space.searched()
    if param not in searched:
        raise KdtuneError(f"--param {param}: the study did not search {param} (it was fixed at "
                          f"{getattr(spec.space, param)!r}); race a searched hyperparameter: "
                          f"{', '.join(searched) or 'none'}")
    value = searched[param]
    if isinstance(value, Choice):
        grid = list(value.choice)
    elif isinstance(value, IntRange) and value.int[1] - value.int[0] < n:
        grid = list(range(value.int[0], value.int[1] + 1))
    else:
        lo, hi = bounds(value)
        grid = contender_grid(float(lo), float(hi), log=isinstance(value, LogUniform) or
                              (isinstance(value, IntRange) and value.log), n=n,
                              include=(1.0,) if param == "temperature" else ())
        if isinstance(value, IntRange):
            grid = sorted({int(round(v)) for v in grid})
    return grid


def plan_races(study_dir: Path, spec: SearchSpec, trials: pd.DataFrame, param: str, widths: list[float] | None,
               max_seeds: int, alpha: float, grid: int = 8) -> list[SizeRace]:
    """One :class:`SizeRace` per size on the validation front (or per ``widths``)."""
    search = trials[(trials["phase"] == "search") & (trials["status"] == COMPLETED)]
    if search.empty:
        raise KdtuneError(f"{study_dir}: no search trial has completed; a race needs a best trial per size "
                          f"(finish the search first: kdtune search SPEC --resume)")
    if widths:
        unknown = [w for w in widths if w not in set(search["width"])]
        if unknown:
            raise KdtuneError(f"--widths: {', '.join(f'{w:g}' for w in unknown)} not among the study's completed "
                              f"sizes; allowed: {', '.join(f'{w:g}' for w in sorted(set(search['width'])))}")
        sizes = sorted(widths)
    else:
        sizes = sorted(set(pareto_front(search)["width"]))
    values = contender_values(spec, param, grid)
    names = race_params(param)
    label = " × ".join(map(_short, names))
    races = []
    for size in sizes:
        best = search[search["width"] == size].sort_values("val_acc", ascending=False).iloc[0]
        config = trial_config(recorded_trial_config(study_dir, best["trial_id"]))
        base = {k: v for k, v in config.items() if k not in TRIAL_KEYS}
        race = Race(list(values), alpha=alpha, max_seeds=max_seeds, param=label)
        races.append(SizeRace(float(size), str(best["trial_id"]), base, race, int(base["epochs"]), values=values))
    return races


def race_seed(spec: SearchSpec, round_index: int) -> int:
    """The seed every contender of round ``round_index`` (from 0) trains with."""
    return int(spec.seed) + RACE_SEED_OFFSET + round_index


class RaceSearcher(Searcher):
    """Ray searcher handing out the runs of each size's current round; see the module docstring."""

    def __init__(self, races: list[SizeRace], seed: int, score_pool: bool = False) -> None:
        super().__init__(metric="val_acc", mode="max")
        # What each contender's runs set is the size's own (SizeRace.values).
        self.races, self.seed = races, int(seed)
        #: Score on the validation images and the training images no student saw (train_subset).
        self.score_pool = bool(score_pool)
        self.pending: dict[str, tuple[int, Any, int]] = {}

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a race's state is rebuilt from its records (:meth:`replay`)."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: see :meth:`save`."""

    def run_config(self, index: int, contender: Any, round_index: int) -> dict[str, Any]:
        """The trial config of one run: the size's best config, the contender, the round's seed."""
        entry = self.races[index]
        # A recipe sets the method, T, the weights and the method's own values at once; a pair, both.
        values = entry.values[contender]
        return {**entry.base, **values, "seed": self.seed + RACE_SEED_OFFSET + round_index,
                **({"score_pool": True} if self.score_pool else {}), "phase": RACE_PHASE, "report_epochs": [],
                "validate_at": VALIDATE_RUNGS,  # a run is scored at its end only
                "race": {"size": entry.size, "contender": contender, "round": round_index}}

    def suggest(self, trial_id: str) -> dict | None:
        waiting = False
        for index, entry in enumerate(self.races):
            if entry.race.done:
                continue
            round_index = entry.race.rounds
            scored = entry.partial.get(round_index, {})
            busy = {c for i, c, r in self.pending.values() if i == index and r == round_index}
            for contender in entry.race.survivors():
                if contender not in scored and contender not in busy:
                    self.pending[trial_id] = (index, contender, round_index)
                    return self.run_config(index, contender, round_index)
            waiting = True
        return None if waiting else Searcher.FINISHED

    def record(self, index: int, contender: Any, round_index: int, score: float) -> None:
        """A finished run's score; completes the size's round when it was the last one."""
        entry = self.races[index]
        if round_index != entry.race.rounds:
            return  # a run of a round already added (a replayed record)
        scores = entry.partial.setdefault(round_index, {})
        scores[contender] = score
        if all(c in scores for c in entry.race.survivors()):
            entry.race.add_round({c: scores[c] for c in entry.race.survivors()},
                                 seed=self.seed + RACE_SEED_OFFSET + round_index)
            del entry.partial[round_index]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.pending:
            return
        index, contender, round_index = self.pending.pop(trial_id)
        self.record(index, contender, round_index, run_score(result, error, self.score_pool))

    def replay(self, records: Mapping[str, Mapping[str, Any]]) -> int:
        """Feed the recorded runs of an interrupted race, round by round; the number replayed."""
        runs = []
        for record in records.values():
            race = (record.get("config") or {}).get("race")
            rows = epoch_rows(list(record.get("results") or []))
            if not race:
                continue
            index = next((i for i, e in enumerate(self.races) if e.size == float(race["size"])), None)
            if index is not None:
                last = rows[-1] if rows else None
                runs.append((int(race["round"]), index, race["contender"],
                             run_score(last, record.get("ray_status") == "ERROR", self.score_pool)))
        for round_index, index, contender, score in sorted(runs, key=lambda r: (r[0], r[1])):
            self.record(index, contender, round_index, score)
        return len(runs)


def run_score(result: Mapping[str, Any] | None, error: bool, score_pool: bool = False) -> float:
    """The score of one run: its final validation accuracy (with ``score_pool``: its accuracy
    on the validation images and the unseen training-pool images together, ``val_pool_acc``);
    a run that diverged or failed after its retries scores 0 (it is genuinely no good at
    that setting)."""
    if error or not result or result.get("status") == "diverged":
        return 0.0
    value = result.get("val_pool_acc" if score_pool else "val_acc")
    return float(value) if value is not None and math.isfinite(float(value)) else 0.0


def beyond_clause(entry: SizeRace, names: list[str], table: pd.DataFrame | None = None) -> str:
    """For a race of two hyperparameters (``names``, e.g. the method and T): whether the first
    matters beyond the second at this size, with each first value at its best second value, e.g.
    "soft_loss matters beyond T: every contender of dkd dropped (best of each: kd 0.842 at T=2.7;
    dkd 0.811 at T=4, all dropped)". Empty before the first round. ``table`` is the race's
    :meth:`~kdtune.racing.Race.table` when the caller has it already."""
    race = entry.race
    if race.rounds == 0:
        return ""
    means = (race.table() if table is None else table).set_index("contender")["mean"]
    groups: dict[Any, list[Any]] = {}
    for contender, values in entry.values.items():
        if contender != BASELINE:
            groups.setdefault(values[names[0]], []).append(contender)
    parts, out = [], []
    for key, members in groups.items():
        best = max(members, key=lambda c: means[c])
        alive = any(c not in race.dropped for c in members)
        parts.append(f"{_named(names[0], key)} {means[best]:.3f} at {_named(names[1], entry.values[best][names[1]])}"
                     + ("" if alive else ", all dropped"))
        if not alive:
            out.append(_named(names[0], key))
    second = _short(names[1])
    if out and len(out) < len(groups):
        head = f"{names[0]} matters beyond {second}: every contender of {', '.join(out)} dropped"
    else:
        head = (f"{names[0]} not shown to matter beyond {second}: " +
                ("each keeps a contender in the race" if not out else "every contender dropped"))
    return f"{head} (best of each: {'; '.join(parts)})"


def race_tables(races: list[SizeRace], param: str, scored_on: str = "the validation split"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(best_t: one row per size, contenders: one row per size and contender); ``scored_on``
    says which images scored the runs, in the verdicts and the ``scored_on`` column."""
    summaries, tables = [], []
    names = race_params(param)
    for entry in races:
        context = (f"at width {entry.size:g}'s other hyperparameters (its best search trial {entry.trial_id}); "
                   f"scored on {scored_on}")
        summary = entry.race.summary(context)
        runs = entry.race.runs
        table = entry.race.table()
        if len(names) == 2:
            summary["beyond"] = beyond_clause(entry, names, table)
            summary["verdict"] = f"{summary['verdict']}; {summary['beyond']}" if summary["beyond"] else summary["verdict"]
        summaries.append({"width": entry.size, "param": param, "best_trial": entry.trial_id, **summary,
                          "epochs": runs * entry.epochs, "scored_on": scored_on})
        table.insert(0, "width", entry.size)
        tables.append(table)
    contenders = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    contenders["contender"] = contenders["contender"].astype(str)
    best = pd.DataFrame(summaries)
    best["recommended"] = best["recommended"].astype(str)
    return best, contenders


def race_bound(study_dir: str | Path, param: str = "temperature", widths: list[float] | None = None,
               max_seeds: int = DEFAULT_MAX_SEEDS) -> int:
    """The most epochs a race could cost: every contender of every size for ``max_seeds`` rounds."""
    from kdtune.spec import load_spec
    from kdtune.study import SPEC_FILE
    from kdtune.tables import load_tables

    spec = load_spec(Path(study_dir) / SPEC_FILE)
    trials, _ = load_tables(study_dir)
    races = plan_races(Path(study_dir), spec, trials, param, widths, max_seeds, 0.05)
    return sum(len(e.race.contenders) * max_seeds * e.epochs for e in races)


@dataclass
class RaceResult:
    """What :func:`run_race` returns."""

    best: pd.DataFrame
    contenders: pd.DataFrame
    epochs: int
    bound_epochs: int
    interrupted: bool


def run_race(study_dir: str | Path, *, param: str = "temperature", widths: list[float] | None = None,
             max_seeds: int = DEFAULT_MAX_SEEDS, alpha: float = 0.05, resume: bool = False, grid: int = 8,
             score_pool: bool = False, log: Log = print) -> RaceResult:
    """Race ``param`` per student size of a finished study; write ``race/best_t.csv`` and
    ``race/contenders.csv``. ``score_pool`` scores every run on the validation images
    and the training images outside the spec's ``train_subset`` (and transfer set), which no
    student saw: more images, less noise per run. Bad input raises :class:`KdtuneError`
    before Ray starts."""
    from ray import tune

    from kdtune.core.data import student_images
    from kdtune.core.teacher import prepare_teachers
    from kdtune.search.callbacks import progress_callback, recording_callback
    from kdtune.search.cluster import ray_session
    from kdtune.search.plan import plan_placement
    from kdtune.search.trainable import DataArrays, distill_trainable, user_objectives
    from kdtune.spec import load_spec, load_spec_data, spec_teacher_targets, teacher_configs
    from kdtune.study import SPEC_FILE, TEACHER_DIR, check_not_locked, require_study, study_lock
    from kdtune.tables import load_tables

    study_dir = Path(study_dir).resolve()
    require_study(study_dir)
    spec = load_spec(study_dir / SPEC_FILE)
    trials, _ = load_tables(study_dir)
    races = plan_races(study_dir, spec, trials, param, widths, max_seeds, alpha, grid)
    if score_pool and spec.data.train_subset is None:
        raise KdtuneError("--score-pool: the study's students saw the whole training split (data.train_subset is "
                          "not set), so no unseen training images are left to score on; race without it")
    recorded = load_records(study_dir, RACE_PHASE)
    scored = {bool((r.get("config") or {}).get("score_pool")) for r in recorded.values()}
    if resume and scored and scored != {bool(score_pool)}:
        was = "with" if True in scored else "without"
        raise KdtuneError(f"--score-pool: the recorded race was scored {was} the unseen training images; resume it "
                          f"the same way ({'with' if was == 'with' else 'without'} --score-pool)")
    if recorded and not resume:
        raise KdtuneError(f"{study_dir}: a race was run here already ({len(recorded)} runs recorded in "
                          f"records/{RACE_PHASE}/); continue it with --race --resume, or delete that folder")
    # The searcher plays a copy: Ray may run a copy of it too, so the outcome is
    # replayed from the records into the untouched plan once the runs are done.
    searcher = RaceSearcher(copy.deepcopy(races), spec.seed, score_pool)
    replayed = searcher.replay(recorded) if resume else 0
    check_not_locked(study_dir)
    search_epochs = int(trials.loc[trials["phase"] == "search", "epochs_run"].fillna(0).sum())
    bound = sum(len(e.race.contenders) * max_seeds * e.epochs for e in races)
    log(f"race on {param} for width(s) {', '.join(f'{e.size:g}' for e in races)}: "
        f"{len(races[0].race.contenders)} contenders, up to {max_seeds} seeds; at most {bound} epochs "
        f"({bound / max(search_epochs, 1):.1f}× the search's {search_epochs})"
        + (f"; {replayed} recorded run(s) replayed" if replayed else ""))
    data = load_spec_data(spec)
    scored_on = f"the {len(data.val):,} validation images"
    if score_pool:
        seen = sum(map(len, student_images(len(data.train), spec.data.train_subset, spec.data.unlabelled,
                                           spec.seed, labels=data.train.y)))
        scored_on += f" and the {len(data.train) - seen:,} training images no student saw"
    log(f"the race scores on {scored_on}")
    with ray_session(None, False, log), study_lock(study_dir):
        import ray

        placement = plan_placement(spec, ray.cluster_resources(), 10**6)
        prepared = prepare_teachers(teacher_configs(spec), data, study_dir / TEACHER_DIR,
                                    with_features=spec.uses_features(), log=log)
        trainable = tune.with_resources(
            # The targets the search's trials learned from: cached logits, replayed views or the online teacher.
            tune.with_parameters(distill_trainable, data=DataArrays.from_splits(data),
                                 teacher=spec_teacher_targets(spec, prepared, data, log), objectives=user_objectives()),
            placement.resources)
        total = sum(len(e.race.contenders) for e in races) * max_seeds
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                        max_concurrent_trials=placement.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=EXPERIMENT_FOLDERS[RACE_PHASE] + (f"-resumed-{replayed}" if replayed else ""),
                storage_path=str(study_dir), verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=[recording_callback(study_dir, RACE_PHASE), progress_callback(total, log)]),
        )
        tuner.fit()
    final = RaceSearcher(races, spec.seed, score_pool)
    final.replay(load_records(study_dir, RACE_PHASE))
    best, contenders = race_tables(final.races, param, scored_on)
    out = study_dir / RACE_DIR
    out.mkdir(exist_ok=True)
    write_frame_atomic(best, study_dir / RACE_TABLE, fmt="csv")
    write_frame_atomic(contenders, study_dir / RACE_CONTENDERS_TABLE, fmt="csv")
    epochs = int(best["epochs"].sum()) if len(best) else 0
    interrupted = not all(e.race.done for e in final.races)
    log(f"race cost: {epochs} epochs ({epochs / max(search_epochs, 1):.1f}× the search's), "
        f"bound {bound}; tables in {study_dir / RACE_TABLE}")
    return RaceResult(best, contenders, epochs, bound, interrupted)
