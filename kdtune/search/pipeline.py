"""The search: a spec in, a results folder out.

Order of work: validate the spec and everything it points at (no Ray yet,
:mod:`kdtune.search.plan`) → load the data → prepare the teacher(s) once
(cached) → start or join Ray (:mod:`kdtune.search.cluster`) → run the
Optuna-driven trials under the spec's early-stopping rule → run the
no-distillation baselines → write the tables. Everything lands in the study
folder (its layout: :mod:`kdtune.study`).
"""

from __future__ import annotations

import dataclasses
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from kdtune import __version__
from kdtune.core.data import DatasetSplits
from kdtune.core.plugins import plugin_runtime_env
from kdtune.core.teacher import prepare_teachers
from kdtune.errors import ConfigError, KdtuneError
from kdtune.pareto import pareto_front
from kdtune.search.callbacks import progress_callback, recording_callback
from kdtune.search.cluster import ray_session
from kdtune.search.early_stopping import build_rule
from kdtune.search.plan import (
    Budget,
    Placement,
    base_config,
    check_views_fit,
    node_object_stores,
    baseline_configs,
    check_inputs,
    check_study,
    create_study,
    family_warnings,
    max_epochs,
    parse_budget,
    plan_placement,
    preflight,
    resumed_num_samples,
)
from kdtune.spec import (
    VALIDATE_RUNGS,
    Choice,
    SearchSpec,
    load_spec,
    parse_spec,
    spec_plugins,
    spec_teacher_targets,
    teacher_configs,
)
from kdtune.study import (
    EXPERIMENT_FOLDERS,
    FAULTS_DIR,
    FINISHED,
    JOURNAL_FILE,
    META_FILE,
    PHASES,
    TEACHER_DIR,
    check_not_locked,
    experiment_path,
    load_records,
    recorded_ids,
    records_dir,
    study_lock,
    update_meta,
)
from kdtune.search.experiment import study_tables
from kdtune.trial_names import trial_dirname, trial_name

Log = Callable[[str], None]


@dataclass
class SearchResult:
    """What :func:`search` returns: the study folder and its tables."""

    study_dir: Path
    trials: pd.DataFrame
    history: pd.DataFrame
    teachers: list[dict[str, Any]]
    interrupted: bool = False
    resume_command: str = ""

    def pareto_front(self, size: str = "params", score: str = "val_acc") -> pd.DataFrame:
        """The validation Pareto front of student size against accuracy."""
        return pareto_front(self.trials, size=size, score=score)

def _searcher(spec: SearchSpec, study_dir: Path, study: str, budget: Budget | None = None):
    from kdtune.core.distill import OBJECTIVE_MODES
    from kdtune.core.objectives import SIZE_HYPERPARAMETER, owner_of
    from kdtune.search.sampler import (
        ConditionalSpace,
        KdOptunaSearch,
        build_sampler,
        first_trials,
        journal_storage,
        to_optuna_distribution,
    )

    objectives = list(spec.sampler.objectives)
    multi = len(objectives) > 1
    distributions = {name: to_optuna_distribution(value) for name, value in spec.space.searched().items()}
    if not distributions:
        raise KdtuneError("space: nothing to search (every hyperparameter is fixed); make at least one a distribution")
    owners = {name: owner_of(name) for name in distributions}
    # A method's own hyperparameters are drawn only when the method is: define-by-run.
    conditional = any(owner is not None for owner in owners.values())
    space = (ConditionalSpace(distributions, owners, fixed_selector=spec.space.soft_loss if
                              "soft_loss" not in distributions else None) if conditional else distributions)
    sizes = list(spec.space.width.choice) if isinstance(spec.space.width, Choice) else None
    return KdOptunaSearch(
        space=space,
        metric=objectives if multi else objectives[0],
        mode=[OBJECTIVE_MODES[o] for o in objectives] if multi else OBJECTIVE_MODES[objectives[0]],
        sampler=build_sampler(spec.sampler, spec.seed, multi, conditional, sizes),
        study_name=study,
        storage=journal_storage(study_dir / JOURNAL_FILE),
        first=first_trials(space, SIZE_HYPERPARAMETER, sizes, spec.sampler.first_trials),
        num_samples=spec.num_samples,
        records=records_dir(study_dir, "search"),
        budget=budget,
    )


def _run_config(name: str, storage_path: str, spec: SearchSpec, callbacks: list):
    from ray import tune

    # A trial checkpoints once, at its end, unless checkpoint_every asks for more.
    # num_to_keep makes Ray save the whole experiment state, synchronously, each
    # time a trial has made that many checkpoints: set it only when old
    # checkpoints need deleting.
    keep = 2 if spec.checkpoint_every else None
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        callbacks=callbacks,
        verbose=0,
    )

def can_restore(experiment: str) -> bool:
    """Whether a Ray experiment folder holds a run to resume.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, which Ray writes before the
    first experiment state: a driver killed in between leaves a folder that
    ``Tuner.restore`` cannot resume (it then runs a broken, near-empty search).
    """
    from ray import tune

    if not tune.Tuner.can_restore(experiment):
        return False
    if "://" in experiment:
        return True
    return any(Path(experiment).glob("experiment_state-*.json"))

def _fit(tuner_factory: Callable[[], Any], experiment: str, restore: Callable[[], Any] | None) -> Any:

    if restore is not None and can_restore(experiment):
        tuner = restore()
    else:
        tuner = tuner_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuner.fit()

class SearchInterrupted(KdtuneError):
    """Ctrl-C before the trials started; the study folder can be resumed."""

    exit_code = 130

    def __init__(self, study_dir: Path, resume_cmd: str) -> None:
        self.study_dir, self.resume_command = study_dir, resume_cmd
        super().__init__(f"search interrupted; everything finished so far is kept in {study_dir}.\n"
                         f"resume with: {resume_cmd}")

def resume_command(spec_source: Path | None, study_dir: Path, name: str | None) -> str:
    """The command line that resumes a study (printed when a search is interrupted)."""
    spec_arg = str(spec_source) if spec_source is not None else str(study_dir / "spec.yaml")
    parts = ["kdtune", "search", spec_arg, "--resume"]
    if name or spec_source is None:
        parts += ["--name", study_dir.name]
    if study_dir.parent != Path("results").resolve():
        parts += ["--results", str(study_dir.parent)]
    return " ".join(shlex.quote(p) for p in parts)

def search(
    spec: SearchSpec | str | Path,
    *,
    num_samples: int | None = None,
    name: str | None = None,
    address: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    dashboard: bool = False,
    results_root: str | Path = "results",
    budget: Budget | str | None = None,
    log: Log = print,
) -> SearchResult:
    """Run (or resume) a distillation search and return its tables.

    ``spec`` is a path to a YAML spec or a validated :class:`SearchSpec`.
    ``address`` joins an existing Ray cluster ("auto", "ray://host:10001", host:port);
    ``storage`` is where Ray keeps the experiment (a path every node sees, or a
    pyarrow URI such as s3://bucket/kdtune), by default the study folder.
    Bad input raises :class:`KdtuneError` before Ray starts (a joined cluster's
    resources are checked right after joining) and before anything is written.
    Ctrl-C before the trials start raises :class:`SearchInterrupted`; during the
    trials Ray stops them, and the result has ``interrupted=True``. ``budget``
    (epochs such as ``"500"``, or a time such as ``"2h"``; see
    :func:`~kdtune.search.plan.parse_budget`) stops sampling once spent: running
    trials finish, the baselines run, and the study is complete with fewer trials.
    """
    from kdtune.search.sampler import clear_stale_journal_lock

    spec_source = None
    if not isinstance(spec, SearchSpec):
        spec_source = Path(spec)
        spec = load_spec(spec_source)
    if num_samples is not None:
        if num_samples < 1:
            raise KdtuneError(f"--num-samples: must be >= 1, got {num_samples}")
        spec = spec.model_copy(update={"num_samples": num_samples})
    study = name or spec.study
    if name is not None:
        spec = parse_spec({**spec.model_dump(mode="json"), "study": name}, "--name")
    source = str(spec_source or "spec")
    if isinstance(budget, str):
        budget = parse_budget(budget)
    preflight(spec, source)
    results_root = Path(results_root).expanduser().resolve()
    study_dir = results_root / study
    resume_cmd = resume_command(spec_source, study_dir, name)

    # Everything that can reject the input runs before anything is written, so a
    # rejected spec leaves no study folder behind.
    check_study(spec, study_dir, resume)
    if resume:
        spec = spec.model_copy(update={"num_samples": resumed_num_samples(study_dir, num_samples, spec.num_samples)})
    check_not_locked(study_dir)
    data = check_inputs(spec, source, address)
    for warning in family_warnings(spec, data):
        log(f"warning: {warning}")
    experiment_root = f"{storage.rstrip('/')}/{study}" if storage else str(study_dir)

    with ray_session(address, dashboard, log, plugin_runtime_env(spec_plugins(spec))), study_lock(study_dir):
        import ray

        try:
            placement = plan_placement(spec, ray.cluster_resources(), spec.num_samples,
                                       joined_cluster=address is not None)
        except ConfigError as exc:
            raise KdtuneError(f"{source}: {exc}") from None
        for note in placement.warnings:
            log(f"warning: {note}")
        try:
            views_line = check_views_fit(spec, data, node_object_stores(ray.nodes()))
        except ConfigError as exc:
            raise KdtuneError(f"{source}: {exc}") from None
        if views_line:
            log(views_line)
        try:
            # Again under the lock: another search may have created the study since.
            check_study(spec, study_dir, resume)
            if not resume:
                create_study(spec, spec_source, study_dir)
            if clear_stale_journal_lock(study_dir / JOURNAL_FILE):
                log("removed the Optuna journal lock left by a killed search")
            prepared = prepare_teachers(teacher_configs(spec), data, study_dir / TEACHER_DIR,
                                        with_features=spec.uses_features(), log=log)
            prepared = dataclasses.replace(prepared, targets=spec_teacher_targets(spec, prepared, data, log))
        except KeyboardInterrupt:
            if (study_dir / META_FILE).exists():
                update_meta(study_dir, {"state": "interrupted"})
            raise SearchInterrupted(study_dir, resume_cmd) from None
        if resume:
            _reconcile(spec, study_dir, study, log)
        rule = build_rule(spec.early_stopping, max_epochs(spec), study_dir)
        rungs = rule.report_epochs
        update_meta(study_dir, {
            "study": study, "kdtune_version": __version__, "state": "running",
            "teacher": prepared.info[0], "teachers": prepared.info, "teacher_key": prepared.key,
            "rungs": rungs, "num_samples": spec.num_samples, "experiment_root": experiment_root,
            "early_stopping": spec.early_stopping.rule, "objectives": list(spec.sampler.objectives),
            **({"budget": {"epochs": budget.epochs, "seconds": budget.seconds}} if budget else {}),
            "teacher_targets": spec.targets_mode(), "augment": spec.data.augmentation(),
        })
        interrupted, trials, history = _run_trials(spec, study, study_dir, experiment_root, data, prepared,
                                                   placement, rule.scheduler, rungs, resume, log, budget)
        if not interrupted:
            ray_ids = set(trials.loc[trials["phase"] == "search", "trial_id"]) if len(trials) else set()
            _reconcile(spec, study_dir, study, log, ray_ids)
        update_meta(study_dir, {"state": "interrupted" if interrupted else "complete",
                                "epochs_spent": epochs_spent(trials)})
    return SearchResult(study_dir, trials, history, prepared.info, interrupted, resume_cmd)

def _reconcile(spec: SearchSpec, study_dir: Path, study: str, log: Log,
               finished_ray_trials: set[str] | None = None) -> None:
    """Tell the journal what a killed driver left only in the records; at the end of
    the search (``finished_ray_trials`` given) also fail the trials Ray never ran."""
    from kdtune.search.sampler import reconcile_journal

    if not (study_dir / JOURNAL_FILE).exists():
        return
    try:
        told, lost = reconcile_journal(study_dir / JOURNAL_FILE, study, load_records(study_dir, "search"),
                                       list(spec.sampler.objectives), finished_ray_trials)
    except KeyError:  # no search trial was ever asked for: the journal holds no study yet
        return
    if told:
        log(f"optuna journal: {told} trial(s) that ended before the restart told from their records")
    if lost:
        log(f"optuna journal: {lost} trial(s) asked before the restart and never run marked FAIL")


def epochs_spent(trials: pd.DataFrame) -> dict[str, int]:
    """The epochs a study's trials ran, by phase: what the search cost, baselines included."""
    if not len(trials):
        return {}
    return {str(phase): int(group["epochs_run"].fillna(0).sum()) for phase, group in trials.groupby("phase")}


def _run_trials(spec: SearchSpec, study: str, study_dir: Path, experiment_root: str, data: DatasetSplits,
                prepared: Any, placement: Placement, scheduler: Any, rungs: list[int], resume: bool,
                log: Log, budget: Budget | None = None) -> tuple[bool, pd.DataFrame, pd.DataFrame]:
    """Run (or resume) the search trials, then the baselines, writing the tables after
    each; returns (stopped before the end, trials, history)."""
    from ray import tune

    from kdtune.search.trainable import DataArrays, distill_trainable, user_objectives

    search_path = experiment_path(experiment_root, "search")
    baseline_path = experiment_path(experiment_root, "baseline")
    config = {**base_config(spec, placement), "report_epochs": list(rungs)}
    if spec.faults is not None and spec.faults.raise_at_epoch:
        config["fault"] = {**spec.faults.model_dump(), "dir": str(study_dir / FAULTS_DIR)}
    # Trials that ended before a restart end at once: their records hold their outcome.
    replays = frozenset()
    if resume:
        replays = frozenset().union(*(recorded_ids(records_dir(study_dir, phase)) for phase in PHASES))
    plugins = tuple(spec_plugins(spec))
    trainable = tune.with_resources(
        tune.with_parameters(distill_trainable, data=DataArrays.from_splits(data), teacher=prepared.targets,
                             replays=replays, objectives=user_objectives(skip={p.module for p in plugins}),
                             plugins=plugins),
        placement.resources,
    )
    log(f"study '{study}': {spec.num_samples} trials, up to {placement.max_concurrent} at a time, "
        f"{spec.early_stopping.rule} early stopping, results in {study_dir}")

    def new_search_tuner():
        return tune.Tuner(
            trainable,
            param_space=config,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec, study_dir, study, budget),
                scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=placement.max_concurrent,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=_run_config(EXPERIMENT_FOLDERS["search"], experiment_root, spec, [
                recording_callback(study_dir, "search"), progress_callback(spec.num_samples, log)]),
        )

    def restore_search_tuner():
        log(f"resuming the search from {search_path}")
        # The rule rebuilds its rungs from the study's records on its first use.
        return tune.Tuner.restore(search_path, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)

    started = time.monotonic()
    _fit(new_search_tuner, search_path, restore_search_tuner if resume else None)
    trials, history = study_tables(study_dir, study, experiment_root, PHASES)
    search_trials = trials[trials["phase"] == "search"] if len(trials) else trials
    finished = search_trials[search_trials["status"].isin(FINISHED)] if len(search_trials) else search_trials
    all_ended = len(finished) == len(search_trials)
    spent = budget is not None and all_ended and budget.spent(
        epochs_spent(search_trials).get("search", 0), time.monotonic() - started)
    if spent:
        log(f"budget of {budget.describe()} spent: {len(finished)} of {spec.num_samples} trials ran")
    elif len(finished) < spec.num_samples:
        return True, trials, history
    overrides = baseline_configs(spec, search_trials) if spec.baselines else []
    if not overrides:
        return False, trials, history
    log(f"baselines: {len(overrides)} no-distillation runs (alpha=1) of widths "
        + ", ".join(f"{o['width']:g}" for o in overrides))
    # A baseline is read at its end only (its final accuracy is the one kd_gain compares with).
    baseline_space = {**config, "phase": "baseline", "report_epochs": [], "validate_at": VALIDATE_RUNGS,
                      "overrides": tune.grid_search(overrides)}
    baseline_space.pop("fault", None)

    def new_baseline_tuner():
        return tune.Tuner(
            trainable, param_space=baseline_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=placement.max_concurrent, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
            run_config=_run_config(EXPERIMENT_FOLDERS["baseline"], experiment_root, spec, [
                recording_callback(study_dir, "baseline"), progress_callback(len(overrides), log)]),
        )

    def restore_baseline_tuner():
        return tune.Tuner.restore(baseline_path, trainable, resume_unfinished=True, resume_errored=False)

    _fit(new_baseline_tuner, baseline_path, restore_baseline_tuner)
    # The search's rows are already built: read only the baselines' experiment.
    search_history = history[history["phase"] == "search"] if len(history) else history
    trials, history = study_tables(study_dir, study, experiment_root, ("baseline",),
                                   known=(search_trials, search_history))
    baselines = trials[(trials["phase"] == "baseline") & trials["status"].isin(FINISHED)]
    return len(baselines) < len(overrides), trials, history
