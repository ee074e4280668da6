"""Do rung ranks predict final ranks under a learning-rate schedule? (issue 15)

kdtune's schedules run over a trial's *full* budget (kdtune.core.schedules), so a
trial stopped at a rung was on the same schedule as one run to the end, and the
rungs come early: with the CIFAR protocol's drops at 150/180/210 of 240 epochs
every rung (10, 30, 90) is before the first drop. Early stopping then ranks
trials at the base learning rate and keeps those ranks as if they were the
final ones. This benchmark measures how far that holds on recorded curves.

It records the full learning curves of one fixed set of configurations sampled
from the default space (search_spaces/digits.yaml; the same configurations,
seeds and 150 training images for every schedule, through
:func:`scheduler_sim.record_curves`) under three schedules:

* ``constant`` (the default spec's);
* ``cosine`` without warm-up, down to 0 at the end of the budget;
* ``multistep`` ×0.1 at 0.625, 0.75 and 0.875 of the budget (the CIFAR protocol's
  150/180/210 of 240; at 81 epochs after epochs 50, 60 and 70).

For each schedule and each rung of the default rule (grace·η^k below the
budget: 1, 3, 9, 27 of 81) it reports the Spearman rank correlation between
the score at the rung and the validation accuracy at the last epoch (the score
is the validation accuracy, which size_aware_asha and asha rank by, or the
validation loss, which pareto_asha, the default, ranks by), over all configurations
and within each width (kdtune's rules rank a trial against trials of its own
size), with percentile-bootstrap CIs over configurations; and the share of the
final top third that a top-1/η cut at the rung keeps (the cut successive halving
makes: scores at or above the 1 − 1/η quantile, as
:func:`kdtune.search.rules.halving_cutoff`).

    python bench/schedule_ranks.py --record 30    # record the missing curves (one core), then analyse
    python bench/schedule_ranks.py                # analyse the committed curves (bench/data/), no training

The curves are cached as JSON lines in bench/data/schedule_curves_<schedule>.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import common
import numpy as np
from scipy.stats import rankdata

common.make_kdtune_importable()

CURVES_DIR = common.REPO / "bench" / "data"
#: The schedules compared, as a spec's ``student.lr_schedule``. Multistep's milestones are
#: fractions of the budget, so the drops sit where the CIFAR protocol puts them at any budget.
SCHEDULES: dict[str, Any] = {
    "constant": "constant",
    "cosine": {"kind": "cosine", "warmup": 0, "min_factor": 0.0},
    "multistep": {"kind": "multistep", "milestones": [0.625, 0.75, 0.875], "gamma": 0.1},
}
SEED = 0  # the recording's spec seed: picks the configurations' sampler seed and the 150 images
MIN_GROUP = 3  # a width with fewer configurations has no usable rank correlation


# --------------------------------------------------------------------------- statistics (pure)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of ``x`` and ``y`` along the last axis (ties take their average rank;
    NaN where either side is constant), vectorised so a bootstrap is one call."""
    rx = rankdata(np.asarray(x, dtype=float), axis=-1)
    ry = rankdata(np.asarray(y, dtype=float), axis=-1)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=-1) / denominator, np.nan)


def groups_of(widths: Sequence[Any]) -> dict[Any, np.ndarray]:
    """Indices of the configurations of each width with at least :data:`MIN_GROUP` of them."""
    widths = np.asarray(widths)
    found = {w: np.flatnonzero(widths == w) for w in sorted(set(widths.tolist()))}
    return {w: idx for w, idx in found.items() if len(idx) >= MIN_GROUP}


def within_spearman(rung: np.ndarray, final: np.ndarray, groups: dict[Any, np.ndarray]) -> np.ndarray:
    """The mean of the per-width ρ weighted by each width's number of configurations
    (widths whose ρ is undefined, a tie throughout, are left out). ``rung`` and ``final``
    may carry leading bootstrap axes; ``groups`` index their last axis."""
    total = np.zeros(np.shape(rung)[:-1])
    weight = np.zeros_like(total)
    for idx in groups.values():
        rho = spearman(rung[..., idx], final[..., idx])
        defined = ~np.isnan(rho)
        total += np.where(defined, rho, 0.0) * len(idx)
        weight += defined * len(idx)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.maximum(weight, 1), np.nan)


def top_cut(scores: np.ndarray, reduction_factor: float) -> np.ndarray:
    """Which scores a successive-halving cut keeps: those at or above the 1 − 1/η quantile
    (linear interpolation, kdtune.search.rules.halving_cutoff's), ties at the cut kept."""
    scores = np.asarray(scores, dtype=float)
    return scores >= np.quantile(scores, 1 - 1 / reduction_factor)


def keep_counts(rung: np.ndarray, final: np.ndarray, reduction_factor: float,
                groups: dict[Any, np.ndarray] | None = None) -> tuple[int, int, int, int]:
    """(final top trials kept by the cut at the rung, final top trials, trials the cut keeps,
    trials) for one cut over all configurations, or (``groups``) one cut per width, summed."""
    groups = groups if groups is not None else {None: np.arange(len(final))}
    counts = np.zeros(4, dtype=int)
    for idx in groups.values():
        keep, best = top_cut(rung[idx], reduction_factor), top_cut(final[idx], reduction_factor)
        counts += [(keep & best).sum(), best.sum(), keep.sum(), len(idx)]
    kept_top, top, kept, total = (int(c) for c in counts)
    return kept_top, top, kept, total


def bootstrap_ci(statistic: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (undefined replicates left out)."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(statistic, [tail, 100 - tail])
    return float(low), float(high)


def resample(groups: dict[Any, np.ndarray], n: int, draws: int, rng: np.random.Generator,
             stratified: bool) -> np.ndarray:
    """``draws`` bootstrap index sets over ``n`` configurations, each of size ``n``; with
    ``stratified``, resampled within each group (so every width keeps its count)."""
    if not stratified:
        return rng.integers(0, n, size=(draws, n))
    parts = [idx[rng.integers(0, len(idx), size=(draws, len(idx)))] for idx in groups.values()]
    return np.concatenate(parts, axis=1)


def rank_table(scores: np.ndarray, final: np.ndarray, widths: Sequence[Any], rungs: Sequence[int],
               reduction_factor: float, draws: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per rung: ρ(score at the rung, final accuracy) overall and within width with
    bootstrap CIs, and the keep shares of a top-1/η cut on the score. ``scores`` is
    (configurations, epochs), higher is better (−val_loss for a loss); ``final`` the
    configurations' accuracy at the end."""
    scores, final = np.asarray(scores, dtype=float), np.asarray(final, dtype=float)
    groups = groups_of(widths)
    rng = np.random.default_rng(seed)
    overall_idx = resample(groups, len(final), draws, rng, stratified=False)
    # Stratified indices are laid out width by width: regroup the columns to match.
    offsets = np.cumsum([0, *(len(idx) for idx in groups.values())])
    within_idx = resample(groups, len(final), draws, rng, stratified=True)
    within_groups = {w: np.arange(offsets[i], offsets[i + 1]) for i, w in enumerate(groups)}
    rows = []
    for rung in rungs:
        at = scores[:, rung - 1]
        kept_top, top, kept, total = keep_counts(at, final, reduction_factor)
        w_kept_top, w_top, w_kept, w_total = keep_counts(at, final, reduction_factor, groups)
        rows.append({
            "rung": rung,
            "overall": float(spearman(at, final)),
            "overall_ci": bootstrap_ci(spearman(at[overall_idx], final[overall_idx])),
            "within": float(within_spearman(at, final, groups)),
            "within_ci": bootstrap_ci(within_spearman(at[within_idx], final[within_idx], within_groups)),
            "per_width": {w: float(spearman(at[idx], final[idx])) for w, idx in groups.items()},
            "keep_overall": kept_top / top, "kept_overall": kept / total,
            "keep_within": w_kept_top / w_top, "kept_within": w_kept / w_total,
        })
    return rows


# --------------------------------------------------------------------------- curves


def curves_path(schedule: str, folder: Path = CURVES_DIR) -> Path:
    """Where the curves recorded under ``schedule`` are cached."""
    return folder / f"schedule_curves_{schedule}.jsonl"


def record(configs: int, epochs: int | None, folder: Path, teacher_root: Path) -> None:
    """Record the missing curves of every schedule (one thread, resumable)."""
    from scheduler_sim import record_curves

    for name, schedule in SCHEDULES.items():
        started = time.perf_counter()
        record_curves(curves_path(name, folder), configs, [SEED], epochs,
                      overrides={"student": {"lr_schedule": schedule}}, teacher_root=teacher_root)
        print(f"{name}: recorded in {time.perf_counter() - started:.0f} s", flush=True)


def load_aligned(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each schedule's complete curves, in the same configuration order for all of them
    (only configurations recorded under every schedule; checked to be the same ones)."""
    from scheduler_sim import load_curves

    by_schedule = {name: {(r["seed"], r["index"]): r for r in load_curves(curves_path(name, folder))}
                   for name in SCHEDULES}
    keys = sorted(set.intersection(*(set(rows) for rows in by_schedule.values())))
    searched = ("width", "temperature", "alpha", "noise", "lr")
    for key in keys:
        drawn = {tuple(rows[key][p] for p in searched) for rows in by_schedule.values()}
        if len(drawn) != 1:
            raise ValueError(f"configuration {key} differs between schedules: {drawn}")
    return {name: [rows[key] for key in keys] for name, rows in by_schedule.items()}


# --------------------------------------------------------------------------- report


def run(folder: Path = CURVES_DIR, draws: int = 2000) -> common.Report:
    """Analyse the cached curves and build the report."""
    from kdtune.core.schedules import Schedule, parse_schedule
    from kdtune.search.rules import rung_milestones

    spec = common.digits_spec({"baselines": False})
    rule = spec.early_stopping
    aligned = load_aligned(folder)
    first = next(iter(aligned.values()))
    budget = len(first[0]["val_acc"])
    rungs = rung_milestones(rule.grace_period, budget, rule.reduction_factor)
    widths = [r["width"] for r in first]
    report = common.Report("schedule_ranks", "Rung ranks against final ranks under learning-rate schedules (issue 15)")
    # Reference epochs: the last before multistep's first drop (where the three schedules'
    # rankings could still agree) and the one before the end (how noisy the final score is).
    steps = Schedule(1.0, budget, parse_schedule(SCHEDULES["multistep"]))
    before_drop = next(e for e in range(1, budget + 1) if steps.value(e) < 1) - 1
    headline, detail, settled, finals = [], [], [], {}
    for name, rows in aligned.items():
        finals[name] = np.array([r["val_acc"][-1] for r in rows])
        lr = Schedule(1.0, budget, parse_schedule(SCHEDULES[name]))
        accuracy = np.array([r["val_acc"] for r in rows])
        for row in rank_table(accuracy, finals[name], widths, [before_drop, budget - 1], rule.reduction_factor, draws):
            settled.append([name, row["rung"], lr.value(row["rung"]),
                            f"{row['overall']:.2f} [{row['overall_ci'][0]:.2f}, {row['overall_ci'][1]:.2f}]",
                            f"{row['within']:.2f} [{row['within_ci'][0]:.2f}, {row['within_ci'][1]:.2f}]"])
        # The rung score each rule ranks by: pareto_asha (the default) the validation loss,
        # size_aware_asha and asha the accuracy; the final rank is always the accuracy's.
        for score, key, sign in (("val_acc", "val_acc", 1.0), ("−val_loss", "val_loss", -1.0)):
            scores = sign * np.array([r[key] for r in rows])
            for row in rank_table(scores, finals[name], widths, rungs, rule.reduction_factor, draws):
                headline.append([name, score, row["rung"], lr.value(row["rung"]),
                                 f"{row['overall']:.2f} [{row['overall_ci'][0]:.2f}, {row['overall_ci'][1]:.2f}]",
                                 f"{row['within']:.2f} [{row['within_ci'][0]:.2f}, {row['within_ci'][1]:.2f}]",
                                 f"{row['keep_overall']:.2f} ({row['kept_overall']:.2f})",
                                 f"{row['keep_within']:.2f} ({row['kept_within']:.2f})"])
                detail.append([name, score, row["rung"], *(row["per_width"][w] for w in sorted(row["per_width"]))])
    groups = groups_of(widths)
    counts = ", ".join(f"{w}: {len(idx)}" for w, idx in groups.items())
    report.add(f"Spearman ρ(score at the rung, val_acc at epoch {budget}) and what a top-1/{rule.reduction_factor:g} "
               f"cut keeps, {len(widths)} configurations",
               "score = what the trials are ranked by at the rung: val_acc (size_aware_asha, asha) or the "
               "validation loss (pareto_asha, the default), against the final accuracy in both cases. "
               "lr ÷ base = the schedule's learning rate at the rung over its base. ρ within width = the mean of "
               "the per-width ρ weighted by configurations per width. [95% percentile bootstrap CI over "
               f"configurations, {draws} draws; within width resampled width by width.] keep = share of the final "
               f"top 1/{rule.reduction_factor:g} (at or above the 1 − 1/η quantile of the last epoch's accuracy) that the "
               "same cut on the score at the rung keeps, with the share of all trials that cut keeps in brackets (a random cut's "
               "expected keep share; above 1/η where scores tie at the cut). Within width = one cut per width, "
               "as kdtune's rules rank.\n\n"
               + common.markdown_table(["schedule", "score", "rung", "lr ÷ base", "ρ overall", "ρ within width",
                                        "keep overall (kept)", "keep within width (kept)"], headline))
    report.add(f"ρ within each width (configurations per width: {counts})",
               common.markdown_table(["schedule", "score", "rung", *(f"width {w}" for w in groups)], detail))
    report.add(f"How settled the final ranking is: ρ(val_acc at epoch {before_drop} (the last before multistep's "
               f"first drop) and at epoch {budget - 1}, val_acc at epoch {budget})",
               "Epoch 50 against the end: how much the drops reorder (under multistep the curves are the constant "
               "schedule's until then, bit for bit). Epoch 80 against the end: the one-epoch noise of the final "
               "score, which no earlier score can predict.\n\n"
               + common.markdown_table(["schedule", "epoch", "lr ÷ base", "ρ overall", "ρ within width"], settled))
    summary = [[name, float(np.mean(v)), float(np.median(v)), float(np.max(v)),
                *(float(spearman(v, finals[other])) for other in SCHEDULES)] for name, v in finals.items()]
    report.add(f"Final validation accuracy (epoch {budget}) per schedule, and how the schedules rank the same "
               "configurations (ρ of final accuracies)",
               common.markdown_table(["schedule", "mean", "median", "best", *(f"ρ with {o}" for o in SCHEDULES)],
                                     summary))
    report.notes.append(f"Curves: {', '.join(common.shown(curves_path(n, folder)) for n in SCHEDULES)} "
                        f"(recording seed {SEED}: configurations drawn by scheduler_sim.record_curves' random sampler "
                        f"from {common.shown(common.DEFAULT_SPEC)}, {budget} epochs, optimizer "
                        f"{spec.student.optimizer}, the same configurations, seeds and 150 training images under "
                        "every schedule).")
    report.notes.append(f"Rungs: the default rule's (grace {rule.grace_period}, η {rule.reduction_factor:g}, budget "
                        f"{budget}): {', '.join(map(str, rungs))}. Multistep's learning rate drops from epochs "
                        + ", ".join(str(int(m * budget) + 1) for m in SCHEDULES["multistep"]["milestones"])
                        + ", so every rung is before the first drop.")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=int, default=0, metavar="N",
                        help="record the missing curves of N configurations per schedule first (one thread)")
    parser.add_argument("--epochs", type=int, default=None, help="with --record: the budget (default: the spec's, 81)")
    parser.add_argument("--curves-dir", type=Path, default=CURVES_DIR)
    parser.add_argument("--teacher-cache", type=Path, default=common.RESULTS_DIR / "teacher-cache")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    args = parser.parse_args(argv)
    if args.record:
        record(args.record, args.epochs, args.curves_dir, args.teacher_cache)
    common.report_standalone("bench/schedule_ranks.py", lambda: run(args.curves_dir, args.draws), argv)


if __name__ == "__main__":
    main()
