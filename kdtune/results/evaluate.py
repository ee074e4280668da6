"""Final evaluation: the one place where kdtune reads the held-out test split.

A search picks configurations by validation accuracy, so the validation numbers
of its winners are optimistic (they won partly by luck of the seed). The final
protocol keeps the reported numbers honest:

1. take the validation Pareto front of the finished study
   (:func:`kdtune.analysis.pareto_front`);
2. re-train every front configuration, and the no-distillation baseline of the
   same width (alpha=1, beta=0, noise=0, every other hyperparameter the same),
   with fresh seeds that no trial of the search used, for the trial's full
   epoch budget;
3. evaluate each re-trained student once on the test split, and report the
   mean and std over seeds, plus the KD gain paired by seed (the distilled and
   the baseline student of one seed share their seed, hence their
   initialisation and batch order).

Results go to ``final.csv`` (one row per front configuration) and
``final_runs.csv`` (one row per re-training run) in the study folder.

After a race (``kdtune best-t STUDY --race``), ``race=True`` evaluates the
race's winners instead of the front: per raced size, the config the race ran
with its recommended contender, re-trained and tested in the same way, into
``race/final.csv`` and ``race/final_runs.csv``. The race chose on validation
accuracy with its own seeds; these are fresh seeds and the test split.

"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from kdtune.core.objectives import baseline_values
from kdtune.errors import ResultsError
from kdtune.study import (
    RACE_PHASE,
    RACE_TABLE,
    SPEC_FILE,
    TEACHER_DIR,
    final_files,
    load_records,
    recorded_trial_config,
    require_study,
    trial_run_config,
)
from kdtune.tables import load_tables, read_csv_table, write_frame_atomic

Log = Callable[[str], None]

#: Fresh seeds are ``spec.seed + FRESH_SEED_OFFSET + i``, skipping seeds the search used.
FRESH_SEED_OFFSET = 1000
FINAL_COLUMNS = [
    "trial_id", "width", "params", "bytes", "temperature", "alpha", "beta", "noise", "val_acc",
    "test_acc_mean", "test_acc_std", "baseline_test_acc_mean", "baseline_test_acc_std",
    "kd_gain_mean", "kd_gain_std", "n_seeds", "seeds", "latency_ms", "throughput_per_s", "device", "threads",
]
#: With the default workers, runs go to parallel processes only when a run takes at least this
#: long (:func:`estimated_run_seconds`): starting a worker (torch imports, the dataset, the
#: teacher targets) takes seconds.
PROCESS_WORTHWHILE_S = 10.0
#: The race's evaluation adds which hyperparameter was raced and the winner.
RACE_FINAL_COLUMNS = [*FINAL_COLUMNS, "param", "recommended"]
RUN_COLUMNS = ["trial_id", "role", "seed", "width", "test_acc", "val_acc", "status", "epochs", "train_time_s"]
def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` as CSV atomically (temporary file + rename)."""
    write_frame_atomic(df, path, fmt="csv")


# --------------------------------------------------------------------------- protocol pieces


def fresh_seeds(count: int, base: int, used: set[int] | frozenset[int]) -> list[int]:
    """``count`` seeds ``base + FRESH_SEED_OFFSET + i`` (i = 0, 1, ...), skipping every seed in ``used``."""
    seeds: list[int] = []
    candidate = int(base) + FRESH_SEED_OFFSET
    while len(seeds) < count:
        if candidate not in used:
            seeds.append(candidate)
        candidate += 1
    return seeds


def baseline_of(config: Any) -> Any:
    """The no-distillation twin of a :class:`~kdtune.core.distill.RunConfig`: the
    baseline values of the hyperparameter table (alpha = 1, beta = 0, noise = 0, T = 1),
    everything else (width, lr, batch size, epochs, seed...) unchanged, as the
    search's baselines."""
    return config.replace(**baseline_values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(call: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    repeats: int = 50,
    warmup: int = 5,
    throughput_batch: int = 256,
    budget_s: float = 2.0,
) -> tuple[float, float]:
    """Inference speed of ``model`` on ``device``, in float32 and eval mode.

    Returns ``(latency_ms, throughput_per_s)``: the median wall time of a batch-1
    forward pass over ``repeats`` passes after ``warmup`` passes, and images per
    second of a ``throughput_batch`` forward pass (median over as many passes as
    fit in ``budget_s``, at least one; NaN when the batch does not fit in memory).
    Inputs are random: the models' cost does not depend on pixel values.
    """
    generator = torch.Generator().manual_seed(0)
    model = model.to(device).eval()
    single = torch.randn((1, *input_shape), generator=generator).to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            model(single)
        _synchronize(device)
        latency_ms = 1000.0 * _median_seconds(lambda: model(single), repeats, device)
        try:
            batch = torch.randn((throughput_batch, *input_shape), generator=generator).to(device)
            first = _median_seconds(lambda: model(batch), 1, device)  # also the warm-up
            passes = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
            throughput = throughput_batch / _median_seconds(lambda: model(batch), passes, device)
        except torch.OutOfMemoryError:
            throughput = math.nan
    return latency_ms, throughput


def _std(values: list[float]) -> float:
    """Sample standard deviation (NaN for a single value: one seed says nothing about spread)."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def _front_or_explain(trials: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    from kdtune.results.analysis import pareto_front

    try:
        return pareto_front(trials)
    except ResultsError:
        search = trials[trials["phase"] == "search"] if "phase" in trials.columns else trials
        counts = search["status"].value_counts().to_dict() if len(search) else {}
        held = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no search trials"
        raise ResultsError(
            f"{study_dir}: no completed search trial to evaluate (the study holds {held}); final evaluation "
            f"re-trains the validation Pareto front, which needs trials that ran their full epoch budget. "
            f"Resume or extend the search first"
        ) from None


# --------------------------------------------------------------------------- the protocol


def race_winners(study_dir: Path, trials: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The race's recommended contender of every raced size: a front-like table (one
    row per size: the size's best search trial, its params and bytes, the race's best
    mean as ``val_acc``, ``param`` and ``recommended``) and the exact run config the
    race trained that contender with, by that trial id.

    Raises :class:`ResultsError` when the study has no finished race.
    """
    path = study_dir / RACE_TABLE
    if not path.exists():
        raise ResultsError(f"{study_dir}: no race to evaluate ({RACE_TABLE} is missing); race first with "
                           f"kdtune best-t {study_dir} --race")
    best = read_csv_table(path)
    records = [r for r in load_records(study_dir, RACE_PHASE).values() if (r.get("config") or {}).get("race")]
    by_id = trials.set_index("trial_id")
    rows, configs = [], {}
    for _, size in best.iterrows():
        ran = [r["config"] for r in records if float(r["config"]["race"]["size"]) == float(size["width"])
               and str(r["config"]["race"]["contender"]) == str(size["recommended"])]
        if not ran:
            raise ResultsError(f"{study_dir}: no recorded race run of width {size['width']:g} with "
                               f"{size['param']} = {size['recommended']} (records/{RACE_PHASE}/ is incomplete)")
        trial_id = str(size["best_trial"])
        configs[trial_id] = trial_run_config(ran[0])
        point = by_id.loc[trial_id]
        rows.append({"trial_id": trial_id, "width": size["width"], "params": point["params"],
                     "bytes": point["bytes"], "val_acc": size["best_mean"], "param": size["param"],
                     "recommended": size["recommended"]})
    return pd.DataFrame(rows), configs


def final_evaluation(
    study_dir: str | Path, seeds: int = 3, log: Log = print, device: str = "auto", race: bool = False,
    workers: int | None = None, full_data: bool = False, epochs: int | None = None,
) -> pd.DataFrame:
    """Re-train the validation Pareto front (or, with ``race``, the race's winners)
    and their baselines with fresh seeds; test once.

    For every configuration on the validation Pareto front of ``study_dir``
    (completed search trials only), and for the no-distillation baseline of the
    same config (alpha=1, beta=0, noise=0, same width, lr, batch size, epochs,
    data subset), trains ``seeds`` students in this process with seeds
    ``spec.seed + 1000 + i``, skipping any seed a trial of the search used, for
    the trial's full epoch budget, on ``device`` ("auto": CUDA when available).
    Each student is evaluated once on the test split. Identical baseline runs
    (front points sharing every non-KD hyperparameter) are trained once.

    Writes, each atomically, ``final.csv`` (the returned table, one row per
    front configuration, columns :data:`FINAL_COLUMNS`) and ``final_runs.csv``
    (one row per training run: trial_id, role "distilled"/"baseline", seed,
    test_acc, val_acc, status, ...; a shared baseline run is listed under the
    first front trial that needed it). ``*_std`` are sample standard deviations
    (NaN with one seed); ``kd_gain_*`` are the mean and std over seeds of the
    paired difference (distilled − baseline, same seed). ``seeds`` is a
    ";"-joined list. ``latency_ms`` is the median batch-1 forward time of the
    first seed's student on ``device`` and ``throughput_per_s`` its images per
    second at batch 256 (see :func:`measure_latency`), both in float32 with
    ``threads`` torch threads: the trials' own setting when they had one (the
    caller's thread count is restored afterwards).

    The runs are independent and seeded, so they train ``workers`` at a time in
    separate processes, with the same numbers as one after another. By default
    (``workers=None``) as many as the CPU cores hold at the trials' thread count
    (one on a GPU), and only when a run takes at least :data:`PROCESS_WORTHWHILE_S`
    (a process takes seconds to start): the median of the runs' estimates from the
    search's recorded epoch times (:func:`estimated_run_seconds`), scaled to each
    run's images and epochs. A study whose history records no epoch times has its
    first run trained here to time it instead.
    Each scores the validation split once, after its last epoch: nothing reads
    the epochs before (on Fashion-MNIST, scoring 6,000 validation images every
    epoch cost as much as training on 3,000).

    With ``race``, the configurations are the race's recommended contenders per
    size (:func:`race_winners`), and the files are ``race/final.csv`` (with the
    extra columns ``param`` and ``recommended``) and ``race/final_runs.csv``.

    With ``full_data``, for a study searched on a ``train_subset``, every run (distilled
    and baseline) trains on the whole training split instead, for ``epochs`` epochs
    when given (default: the trial's): the students a team ships once the search on a
    few thousand images has chosen their hyperparameters. The files are then
    ``final_full.csv`` and ``final_full_runs.csv`` (under ``race/`` with ``race``);
    the columns are the same, and ``val_acc`` stays the search's. A transfer set
    (``data.unlabelled``) is dropped with the subset: every image has its label then.

    Raises :class:`ResultsError` when ``study_dir`` is not a study folder or has
    no completed search trial (with ``race``: no finished race), and
    :class:`~kdtune.errors.ConfigError` for ``seeds < 1``, ``workers < 1``, ``epochs < 1``,
    ``epochs`` without ``full_data`` or an unknown device, and :class:`ResultsError` for
    ``full_data`` on a study whose students already saw the whole training split.
    """
    from kdtune.core.distill import select_device
    from kdtune.core.teacher import prepare_teachers
    from kdtune.errors import ConfigError
    from kdtune.spec import load_spec, load_spec_data, spec_teacher_targets, teacher_configs

    if int(seeds) < 1:
        raise ConfigError("seeds", f"must be >= 1 fresh seeds per configuration, got {seeds}")
    if workers is not None and int(workers) < 1:
        raise ConfigError("workers", f"must be >= 1 training processes, got {workers}")
    if epochs is not None and not full_data:
        raise ConfigError("epochs", "sets the epochs of the --full-data runs; without --full-data the front is "
                          "re-trained for the epochs it was searched with")
    if epochs is not None and int(epochs) < 1:
        raise ConfigError("epochs", f"must be >= 1, got {epochs}")
    study_dir = Path(study_dir)
    meta = require_study(study_dir)
    trials, history = load_tables(study_dir)  # both at once: the history times the runs (below)
    if race:
        front, raced = race_winners(study_dir, trials)
    else:
        front = _front_or_explain(trials, study_dir)
        raced = {trial_id: trial_run_config(recorded_trial_config(study_dir, trial_id, meta))
                 for trial_id in front["trial_id"]}
    torch_device = select_device(device)

    spec = load_spec(study_dir / SPEC_FILE)
    if full_data and spec.data.train_subset is None:
        raise ResultsError(f"--full-data: the students of study '{meta['study']}' already trained on the whole "
                           f"training split (its spec sets no data.train_subset); evaluate it without --full-data")
    used = {int(s) for s in pd.to_numeric(trials["seed"], errors="coerce").dropna()}
    if race:  # the race's own seeds are not fresh either
        used |= {int(r["config"]["seed"]) for r in load_records(study_dir, RACE_PHASE).values()
                 if (r.get("config") or {}).get("seed") is not None}
    seed_list = fresh_seeds(int(seeds), spec.seed, used)
    changes: dict[str, Any] = {"device": str(torch_device)}
    if full_data:  # every label read: no transfer set either
        changes["train_subset"] = None
        changes["unlabelled"] = None
    if epochs is not None:
        changes["epochs"] = int(epochs)
    configs = {trial_id: config.replace(**changes) for trial_id, config in raced.items()}

    data = load_spec_data(spec)
    prepared = prepare_teachers(teacher_configs(spec), data, study_dir / TEACHER_DIR,
                                with_features=spec.uses_features(), log=log)
    if meta.get("teacher_key") and prepared.key != meta["teacher_key"]:
        log(f"warning: the teacher cache key is {prepared.key} but the search used {meta['teacher_key']}: "
            f"the data or teacher changed since the search, so the re-trained students learn from other targets")

    planned = _plan_runs(configs, seed_list)
    chosen = workers is not None
    workers = min(int(workers) if chosen else default_workers(planned, torch_device), len(planned))
    # A worker process costs seconds to start (imports, data, targets): worth it only when a
    # run takes longer, which the search's epoch times tell without training anything.
    estimated = None
    if workers > 1 and not chosen:
        known = [s for s in estimated_run_seconds(history, planned, len(data.train)) if s is not None]
        estimated = statistics.median(known) if known else None
        if estimated is not None and estimated < PROCESS_WORTHWHILE_S:
            workers = 1
    timing_probe = workers > 1 and not chosen and estimated is None
    what = "race winner(s)" if race else "front configuration(s)"
    log(f"final evaluation of study '{meta['study']}': {len(front)} {what} × {len(seed_list)} "
        f"fresh seed(s) ({', '.join(map(str, seed_list))}) → {len(planned)} training runs on {torch_device}"
        + (f", on the whole training split ({len(data.train):,} images"
           + (f", {epochs} epochs each)" if epochs else ")") if full_data else "")
        + (f", {'up to ' if timing_probe else ''}{workers} at a time" if workers > 1 else ""))
    if estimated is not None:
        log(f"runs estimated at ~{_seconds_text(estimated)} s each from the search's epoch times → "
            + (f"{workers} processes" if workers > 1 else
               f"1 process (a worker process is worth starting from {PROCESS_WORTHWHILE_S:g} s a run)"))
    elif timing_probe:
        log("no epoch times recorded by the search: the first run trains here to time a run")
    # run() applies each trial's thread count (the search's placement, usually one
    # thread per trial) process-wide; give the caller its own setting back afterwards.
    caller_threads = torch.get_num_threads()
    try:
        # The targets the search used: cached logits, replayed augmented views, or the online teacher.
        targets = spec_teacher_targets(spec, prepared, data, log)
        records: dict[str, dict[str, Any]] = {}
        students: dict[str, nn.Module] = {}
        rest = planned
        if timing_probe:  # nothing to estimate from (a study of an older version): the first run tells
            _train_and_test(planned[:1], data, targets, torch_device, log, seed_list[0], records, students,
                            len(planned))
            rest = planned[1:]
            if records[_config_key(planned[0][2])]["train_time_s"] < PROCESS_WORTHWHILE_S:
                workers = 1
        if workers > 1 and rest:
            del targets  # each worker process loads its own from the caches just prepared
            _train_and_test_in_processes(rest, study_dir, data, torch_device, workers, log, seed_list[0],
                                         records, students, len(planned))
            if planned[0][2].threads:  # the latency is measured at the runs' thread count, as in one process
                torch.set_num_threads(int(planned[0][2].threads))
        else:
            _train_and_test(rest, data, targets, torch_device, log, seed_list[0], records, students, len(planned))
        table = _summarise(front, configs, seed_list, records, students, tuple(data.input_shape), torch_device, log)
    finally:
        torch.set_num_threads(caller_threads)

    runs = pd.DataFrame([records[_config_key(config)] for _, _, config in planned], columns=RUN_COLUMNS)
    final_file, runs_file = final_files(race, full_data)
    if race:
        table = table.merge(front[["trial_id", "param", "recommended"]], on="trial_id")[RACE_FINAL_COLUMNS]
    write_csv_atomic(runs, study_dir / runs_file)
    write_csv_atomic(table, study_dir / final_file)
    log(f"wrote {study_dir / final_file} and {study_dir / runs_file}")
    return table


def _seconds_text(seconds: float) -> str:
    """Seconds for a log line: two significant digits below 10 s (a tiny run's 0.031), whole seconds above."""
    return f"{seconds:.2g}" if seconds < 10 else f"{seconds:,.0f}"


def _config_key(config: Any) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _plan_runs(configs: dict[str, Any], seed_list: list[int]) -> list[tuple[str, str, Any]]:
    """``(trial_id, role, RunConfig)`` of every training run, each distinct config once.

    Front points that share every non-KD hyperparameter share their baseline
    runs (the same config and seed would train the same student twice)."""
    planned, seen = [], set()
    for trial_id, config in configs.items():
        for seed in seed_list:
            distilled = config.replace(seed=seed)
            for role, run_config in (("distilled", distilled), ("baseline", baseline_of(distilled))):
                key = _config_key(run_config)
                if key not in seen:
                    seen.add(key)
                    planned.append((trial_id, role, run_config))
    return planned


def default_workers(planned: list[tuple[str, str, Any]], device: torch.device) -> int:
    """Training processes at once: one on a GPU (the runs would share it); on the CPU as
    many as the cores hold at the runs' thread count (the search's placement), never more
    than there are runs. A loss registered in ``__main__`` (a notebook) cannot be found by
    a fresh process, so such runs stay in this one."""
    from kdtune.core.objectives import LOSSES

    if device.type != "cpu" or not planned:
        return 1
    if any(getattr(LOSSES.get(config.soft_loss).soft_term, "__module__", "") == "__main__"
           for _, _, config in planned if config.soft_loss in LOSSES):
        return 1
    from kdtune.core.distill import usable_cores

    threads = max(int(config.threads or 1) for _, _, config in planned)
    return max(1, min(len(planned), usable_cores() // threads))


def estimated_run_seconds(
    history: pd.DataFrame, planned: list[tuple[str, str, Any]], train_size: int
) -> list[float | None]:
    """Training seconds of each planned ``(trial_id, role, RunConfig)`` run, estimated from
    the epoch times the search recorded for its trial, in ``planned``'s order.

    A run is estimated at its trial's seconds per training image (the median over the
    trial's epochs in ``history`` of ``1 / samples_per_s``, i.e. ``epoch_time_s`` over the
    images of the epoch; a median, so that a slow first epoch weighs little) × the images of
    one of the run's epochs (its ``train_subset``, or ``train_size``, the whole training
    split, when it has none, as with ``full_data``) × the run's epochs. A baseline run
    takes its front trial's timing: it trains without the teacher, so the estimate errs
    long. The estimate is None where ``history`` records no speed for the trial (a study
    of an older version, a trial missing from the history).
    """
    per_image: dict[str, float] = {}
    if "samples_per_s" in history.columns:
        speeds = pd.to_numeric(history["samples_per_s"], errors="coerce")
        timed = np.isfinite(speeds) & (speeds > 0)
        per_image = (1.0 / speeds[timed]).groupby(history.loc[timed, "trial_id"].astype(str)).median().to_dict()
    estimates: list[float | None] = []
    for trial_id, _, config in planned:
        seconds = per_image.get(str(trial_id))
        images = train_size if config.train_subset is None else int(config.train_subset)
        estimates.append(None if seconds is None else seconds * images * int(config.epochs))
    return estimates


def _train_one(config: Any, role: str, data: Any, teacher: Any, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    """Train one planned run, scoring validation after its last epoch only, and test it once."""
    from kdtune.core.distill import evaluate, run

    started = time.perf_counter()
    outcome = run(config, data, teacher if role == "distilled" else None, validate_epochs=())
    train_time = time.perf_counter() - started
    # The single read of the test split for this student.
    test_acc, _ = evaluate(outcome.student, data.test, device)
    record = {
        "role": role, "seed": config.seed, "width": config.width,
        "test_acc": float(test_acc), "val_acc": float(outcome.metrics.get("val_acc", math.nan)),
        "status": str(outcome.metrics.get("status", "")), "epochs": int(outcome.metrics.get("epoch", 0)),
        "train_time_s": train_time,
    }
    return record, outcome.student


def _keep(records: dict[str, dict[str, Any]], students: dict[str, nn.Module], trial_id: str, config: Any,
          record: dict[str, Any], student: nn.Module | None, first_seed: int, total: int, log: Log) -> None:
    """Record one finished run, keep the first seed's student of each front trial (its
    latency is measured), and say so."""
    what = f"trial {trial_id}" if record["role"] == "distilled" else "baseline, alpha=1"
    if record["status"] == "diverged":
        log(f"warning: {what}, seed {config.seed} diverged during re-training; its test accuracy counts as is")
    records[_config_key(config)] = {"trial_id": trial_id, **record}
    if record["role"] == "distilled" and config.seed == first_seed and student is not None:
        students[trial_id] = student
    log(f"retrained {len(records)}/{total}: width {config.width:g}, seed {config.seed} ({what}): "
        f"test {record['test_acc']:.4f} in {record['train_time_s']:.0f} s")


def _train_and_test(
    planned: list[tuple[str, str, Any]], data: Any, teacher: Any, device: torch.device, log: Log,
    first_seed: int, records: dict[str, dict[str, Any]], students: dict[str, nn.Module], total: int,
) -> None:
    """Train every planned run in this process, one after another, and test each student once.

    Adds the run records, keyed by config, to ``records``, and the ``first_seed`` student
    of each front trial (for the latency measurement) to ``students``."""
    for trial_id, role, config in planned:
        what = f"trial {trial_id}" if role == "distilled" else "baseline, alpha=1"
        log(f"retraining: width {config.width:g}, seed {config.seed} ({what}) ...")
        record, student = _train_one(config, role, data, teacher, device)
        _keep(records, students, trial_id, config, record, student, first_seed, total, log)


#: A worker process's dataset and teacher targets, loaded once by :func:`_worker_start`.
_WORKER: dict[str, Any] = {}


def _worker_start(study_dir: str, device: str, threads: int) -> None:
    """Load the study's data and teacher targets in a worker process (from the caches the
    parent prepared: nothing is trained here). ``threads``: torch threads of this process,
    for runs whose config does not set its own (the workers share the cores)."""
    torch.set_num_threads(threads)
    from kdtune.core.teacher import prepare_teachers
    from kdtune.spec import load_spec, load_spec_data, spec_teacher_targets, teacher_configs

    folder = Path(study_dir)
    spec = load_spec(folder / SPEC_FILE)  # imports the spec's plugins in this process too
    data = load_spec_data(spec)
    prepared = prepare_teachers(teacher_configs(spec), data, folder / TEACHER_DIR,
                                with_features=spec.uses_features(), log=lambda message: None)
    _WORKER.update(data=data, targets=spec_teacher_targets(spec, prepared, data, lambda message: None),
                   device=torch.device(device))


def _worker_run(config: Any, role: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    record, student = _train_one(config, role, _WORKER["data"], _WORKER["targets"], _WORKER["device"])
    return record, {k: v.detach().cpu() for k, v in student.state_dict().items()}


def _train_and_test_in_processes(
    planned: list[tuple[str, str, Any]], study_dir: Path, data: Any, device: torch.device, workers: int, log: Log,
    first_seed: int, records: dict[str, dict[str, Any]], students: dict[str, nn.Module], total: int,
) -> None:
    """:func:`_train_and_test` with ``workers`` processes training at once (spawned: a
    forked torch runtime can deadlock). Runs are seeded by their config, so the numbers
    are those of one process; the order of completion is not."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from kdtune.core.distill import usable_cores
    from kdtune.core.models import build_model

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start,
                             initargs=(str(study_dir), str(device), max(1, usable_cores() // workers))) as pool:
        # Widest students first: the longest runs start early, and short ones fill the
        # gaps at the end instead of one long run finishing alone.
        ordered = sorted(planned, key=lambda run: -float(run[2].width) * int(run[2].epochs))
        pending = {pool.submit(_worker_run, config, role): (trial_id, role, config)
                   for trial_id, role, config in ordered}
        log(f"retraining {len(planned)} runs in {workers} processes ...")
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    trial_id, role, config = pending.pop(future)
                    record, state = future.result()
                    student = None
                    if role == "distilled" and config.seed == first_seed:
                        student = build_model(config.family, data.input_shape, data.num_classes, config.width,
                                              **config.model_options)
                        student.load_state_dict(state)
                        student.eval()
                    _keep(records, students, trial_id, config, record, student, first_seed, total, log)
        except BaseException:  # a failed run or Ctrl-C: start no other run (the runs in progress end first)
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _summarise(
    front: pd.DataFrame,
    configs: dict[str, Any],
    seed_list: list[int],
    records: dict[str, dict[str, Any]],
    students: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    device: torch.device,
    log: Log,
) -> pd.DataFrame:
    """One row per front configuration: test accuracy, baseline, paired gain, speed."""
    rows = []
    for trial_id, config in configs.items():
        point = front[front["trial_id"] == trial_id].iloc[0]
        distilled, baseline = [], []
        for seed in seed_list:
            seeded = config.replace(seed=seed)
            distilled.append(records[_config_key(seeded)]["test_acc"])
            baseline.append(records[_config_key(baseline_of(seeded))]["test_acc"])
        gains = [d - b for d, b in zip(distilled, baseline)]
        latency_ms, throughput = measure_latency(students[trial_id], input_shape, device)
        row = {
            "trial_id": trial_id, "width": point["width"], "params": point["params"], "bytes": point["bytes"],
            "temperature": config.temperature, "alpha": config.alpha, "beta": config.beta, "noise": config.noise,
            "val_acc": point["val_acc"],
            "test_acc_mean": float(np.mean(distilled)), "test_acc_std": _std(distilled),
            "baseline_test_acc_mean": float(np.mean(baseline)), "baseline_test_acc_std": _std(baseline),
            "kd_gain_mean": float(np.mean(gains)), "kd_gain_std": _std(gains),
            "n_seeds": len(seed_list), "seeds": ";".join(map(str, seed_list)),
            "latency_ms": latency_ms, "throughput_per_s": throughput, "device": str(device),
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        log(f"trial {trial_id} (width {config.width:g}): test {row['test_acc_mean']:.4f} vs baseline "
            f"{row['baseline_test_acc_mean']:.4f}, KD gain {row['kd_gain_mean']:+.4f} over {len(seed_list)} "
            f"seed(s); {latency_ms:.3f} ms per image at batch 1")
    return pd.DataFrame(rows, columns=FINAL_COLUMNS)
