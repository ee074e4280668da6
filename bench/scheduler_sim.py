"""Offline early-stopping simulator: replay kdtune's Ray schedulers on recorded learning curves.

Training a digits student takes a fraction of a second, so the full 27-epoch
curves of a few hundred random configurations of search_spaces/digits.yaml are
cheap to record (``--record``, without Ray). The simulator then draws searches
of 40 of them, one per width first as kdtune's searcher enqueues them, runs them
two at a time with asynchronous decisions at the rung epochs, and feeds the
results to the real scheduler objects (:class:`kdtune.scheduler.ParetoASHA`,
:class:`kdtune.scheduler.SizeAwareASHA`). It reports what the search-efficiency
benchmark measures: the hypervolume of the full-budget trials' front and the
epochs spent, as ratios to running the same 40 configurations to the end.

    python bench/scheduler_sim.py --record 240 --seeds 0,1,2,3,4   # ~5 min on 2 cores
    python bench/scheduler_sim.py --draws 600                      # compare the rules

Simplification: configurations are sampled at random (the benchmark's kdtune
method uses multi-objective TPE after its first 10 trials), and every epoch of a
trial takes about the same time (±15%, slightly longer for wider students).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import common
from search_efficiency import EPOCH_TARGET, HV_TARGET

common.make_kdtune_importable()

DEFAULT_CURVES = common.REPO / "results" / "bench" / "digits_curves.jsonl"
WORKERS = 2


def record_curves(path: Path, per_seed: int, seeds: list[int], epochs: int | None = None,
                  spec_path: Path = common.DEFAULT_SPEC, overrides: dict[str, Any] | None = None,
                  teacher_root: Path | None = None) -> None:
    """Train ``per_seed`` random configurations of the spec's space (default: digits) per seed (seed = the
    benchmark repeat's spec seed, which also picks the 150 training images) for ``epochs``
    epochs (default: the spec's budget) and append their per-epoch ``val_acc`` and
    ``val_loss`` to ``path`` (JSON lines; resumable).

    ``overrides`` are merged into the spec (e.g. ``{"student": {"lr_schedule": "cosine"}}``);
    they change no sampled configuration, since the sampler's seed and space are the same,
    so recordings that differ only in overrides hold the same configurations under the same
    seeds. The teacher is cached in ``teacher_root`` (default: ``teacher-cache`` beside ``path``)."""
    import optuna
    import torch

    from kdtune.distill import run
    from kdtune.search import base_config, load_spec_data, plan_placement
    from kdtune.searcher import to_optuna_distribution
    from kdtune.study import trial_run_config

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = {"space": {"epochs": epochs}} if epochs else {}
    spec = common.digits_spec(common.deep_merge({"baselines": False, **budget}, overrides or {}), spec_path)
    data = load_spec_data(spec)
    teacher = common.TeacherCache(teacher_root or path.parent / "teacher-cache").prepare(spec).targets
    space = {name: to_optuna_distribution(value) for name, value in spec.space.searched().items()}
    base = base_config(spec, plan_placement(spec, {"CPU": 1.0}, 1))
    done = {(r["seed"], r["index"]) for r in load_curves(path)} if path.exists() else set()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for seed in seeds:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1000 + seed))
            for index in range(per_seed):
                params = study.ask(space).params
                if (seed, index) in done:
                    continue
                # As a trial builds its run (the trial-steering keys of base_config left out).
                config = trial_run_config({**base, **params, "seed": seed, "data_seed": seed})
                history = run(config, data, teacher).history
                out.write(json.dumps({
                    "seed": seed, "index": index, **params, "params": history[-1]["params"],
                    "val_acc": [h["val_acc"] for h in history], "val_loss": [h["val_loss"] for h in history],
                }) + "\n")
                out.flush()


def load_curves(path: Path) -> list[dict[str, Any]]:
    """The recorded configurations (complete curves only)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if len(r["val_acc"]) == max(len(x["val_acc"]) for x in rows)]


def simulate(configs: list[dict[str, Any]], scheduler: Any, max_t: int, rng: Any, budget: int | None = None,
             events: list[tuple[int, float, float]] | None = None,
             completed: list[int] | None = None) -> tuple[int, list[tuple[float, float]]]:
    """Run ``configs`` in order, ``WORKERS`` at a time, reporting to ``scheduler`` at its
    milestones and at ``max_t``. Returns (epochs trained, (params, val_acc) of the trials
    that ran their full budget). With ``budget``, no trial starts once that many epochs
    are spent (running trials finish); ``events`` receives (epochs spent so far, params,
    val_acc) each time a trial completes its full budget, and ``completed`` that trial's
    index in ``configs`` (the order it started in)."""
    milestones = set(scheduler.milestones)
    queue: list[tuple[float, int, int, int]] = []
    started, counter, spent, finished = 0, 0, 0, []

    def schedule(index: int, epoch: int, now: float) -> None:
        nonlocal counter
        duration = (1.0 + 0.05 * math.log2(float(configs[index]["width"]) / 8)) * rng.uniform(0.85, 1.15)
        heapq.heappush(queue, (now + duration, counter, index, epoch))
        counter += 1

    while started < min(WORKERS, len(configs)):
        schedule(started, 1, 0.0)
        started += 1
    while queue:
        now, _, index, epoch = heapq.heappop(queue)
        config, spent = configs[index], spent + 1
        decision = "CONTINUE"
        if epoch in milestones or epoch >= max_t:
            result = {"epoch": epoch, "val_acc": config["val_acc"][epoch - 1],
                      "val_loss": config["val_loss"][epoch - 1], "params": config["params"]}
            trial = SimpleNamespace(trial_id=f"t{index}", config={"width": config["width"]})
            decision = scheduler.on_trial_result(None, trial, result)
        if epoch >= max_t:
            finished.append((float(config["params"]), config["val_acc"][-1]))
            if events is not None:
                events.append((spent, *finished[-1]))
            if completed is not None:
                completed.append(index)
        if decision == "CONTINUE" and epoch < max_t:
            schedule(index, epoch + 1, now)
        elif started < len(configs) and (budget is None or spent < budget):
            schedule(started, 1, now)
            started += 1
    return spent, finished


def evaluate(make_scheduler: Callable[[int], Any], curves: list[dict[str, Any]], draws: int = 600,
             samples: int = 40) -> dict[str, float]:
    """Median (and spread) of the HV ratio and epoch share over ``draws`` simulated searches."""
    import numpy as np

    from kdtune.analysis import front_hypervolume

    max_t = len(curves[0]["val_acc"])
    reference = 2.0 * max(float(c["params"]) for c in curves)
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for row in curves:
        by_seed.setdefault(row["seed"], []).append(row)
    seeds = sorted(by_seed)
    hv_ratios, shares = [], []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        pool = by_seed[seeds[draw % len(seeds)]]
        chosen = [pool[i] for i in rng.choice(len(pool), samples, replace=False)]
        widths = sorted({c["width"] for c in chosen})
        first = [next(c for c in chosen if c["width"] == w) for w in widths]  # one per width, as enqueued
        order = first + [c for c in chosen if all(c is not f for f in first)]
        full = front_hypervolume([(float(c["params"]), c["val_acc"][-1]) for c in chosen], reference)
        spent, finished = simulate(order, make_scheduler(max_t), max_t, rng)
        hv_ratios.append(front_hypervolume(finished, reference) / full if finished else 0.0)
        shares.append(spent / (samples * max_t))
    hv, ep = np.array(hv_ratios), np.array(shares)
    return {"hv": float(np.median(hv)), "hv_p10": float(np.quantile(hv, 0.1)), "epochs": float(np.median(ep)),
            "epochs_p90": float(np.quantile(ep, 0.9)),
            "both": float(np.mean((hv >= HV_TARGET) & (ep <= EPOCH_TARGET)))}


def candidates() -> dict[str, Callable[[int], Any]]:
    """The rules compared (name → factory taking max_t)."""
    from kdtune.scheduler import ParetoASHA, SizeAwareASHA

    rules: dict[str, Callable[[int], Any]] = {
        "size_aware_asha η=3, val_acc": lambda t: SizeAwareASHA(max_t=t, reduction_factor=3),
        "size_aware_asha η=3, val_loss": lambda t: SizeAwareASHA(metric="val_loss", mode="min", max_t=t,
                                                                  reduction_factor=3),
    }
    grid = [(eta, metric, mode, eps) for eta in (3, 2) for metric, mode in (("val_acc", "max"), ("val_loss", "min"))
            for eps in (0.0, 0.04)]
    grid += [(2, "val_loss", "min", 0.02), (2, "val_loss", "min", 0.06), (1.5, "val_loss", "min", 0.04)]
    for eta, metric, mode, eps in grid:
        rules[f"pareto_asha η={eta}, {metric}, ε={eps}"] = (
            lambda t, eta=eta, metric=metric, mode=mode, eps=eps:
            ParetoASHA(metric=metric, mode=mode, max_t=t, reduction_factor=eta, hv_epsilon=eps))
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=DEFAULT_CURVES)
    parser.add_argument("--record", type=int, default=0, help="record this many configurations per seed first")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=None, help="with --record: the budget (default: the spec's)")
    parser.add_argument("--spec", type=Path, default=common.DEFAULT_SPEC, help="with --record: the spec whose space is sampled")
    parser.add_argument("--draws", type=int, default=600)
    parser.add_argument("--only", default="", help="substring of the rule names to run")
    args = parser.parse_args()
    if args.record:
        record_curves(args.curves, args.record, [int(s) for s in args.seeds.split(",")], args.epochs, args.spec)
    curves = load_curves(args.curves)
    print(f"{len(curves)} recorded configurations, {args.draws} simulated searches of 40\n")
    print("| rule | HV ratio (median) | HV p10 | epoch share (median) | epochs p90 | P(both targets) |")
    print("|---|---|---|---|---|---|")
    for name, make in candidates().items():
        if args.only and args.only not in name:
            continue
        r = evaluate(make, curves, args.draws)
        print(f"| {name} | {r['hv']:.3f} | {r['hv_p10']:.3f} | {r['epochs']:.3f} | {r['epochs_p90']:.3f} | "
              f"{r['both']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
