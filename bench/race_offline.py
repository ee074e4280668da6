"""Offline evidence for the temperature race (issue 16): record once, replay many times.

``--record`` trains, on the default digits task (search_spaces/digits.yaml: MLP
teacher 2×1024, MLP students of depth 2, 150 labelled training images, 81
epochs), every contender of the race (8 temperatures including T = 1, plus the
no-distillation baseline α = 1) with the same fresh seeds, for each student
width, holding the other hyperparameters at α 0.2, noise 0, lr 0.01, batch 32,
Adam. Runs are plain in-process :func:`kdtune.distill.run` calls (no Ray), one
thread. Each row of the CSV is one (width, contender, seed) run with its
validation accuracy, its accuracy on the training-pool images the student never
saw, and its test accuracy. The file is appended to and resumable.

The replay then races the recorded matrix with :class:`kdtune.racing.Race` over
many random seed orders (each replay draws ``max_seeds`` of the recorded seeds in
a random order) and compares it with brute force, which uses every recorded seed
of every contender:

* false eliminations: the race dropped brute force's best contender (the
  guarantee of the race's statistics), and, stricter, the race dropped any
  contender that brute force cannot tell from its best;
* the race's winner lies inside brute force's set of contenders not
  distinguishable from the best (paired t-tests on all seeds, Holm-adjusted);
* runs and epochs, as a share of brute force's.

    nice python bench/race_offline.py --record            # ~15 min on a loaded 2-core machine
    python bench/race_offline.py --replays 2000           # seconds

A second task, ``--task digits_cnn`` (search_spaces/digits_cnn.yaml: CNN teacher,
CNN students of widths 4/8/16 = 1,030/3,778/14,458 parameters, 150 labelled
images, 27 epochs), holds each width at its best trial of a real search of that
spec (the trials the live race of the README held: α, noise and lr differ per
width), and records into its own matrix:

    nice python bench/race_offline.py --task digits_cnn --record --widths 4,8   # one process per core
    nice python bench/race_offline.py --task digits_cnn --record --widths 16
    python bench/race_offline.py --task digits_cnn
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.make_kdtune_importable()


@dataclass(frozen=True)
class Task:
    """One recorded task: its spec, the widths raced, and per width the hyperparameters held
    fixed while temperature is raced."""

    name: str
    spec: Path
    held: dict[int, dict[str, float]]
    describe: str

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.held)

    @property
    def recorded(self) -> Path:
        """Where ``--record`` writes (results/, not committed)."""
        return common.RESULTS_DIR / f"race_matrix_{self.name}.csv"

    @property
    def committed(self) -> Path:
        return common.REPO / "bench" / "data" / f"race_matrix_{self.name}.csv"


#: The digits brief of issue 16: the same held settings at every width.
_DIGITS_HELD = {"alpha": 0.2, "noise": 0.0, "lr": 0.01, "batch_size": 32}
TASKS = {
    "digits": Task("digits", common.DEFAULT_SPEC, {w: _DIGITS_HELD for w in (8, 16, 32, 64, 128)},
                   "at α = 0.2, lr = 0.01, noise 0, batch 32"),
    # Each width's best trial of `kdtune search search_spaces/digits_cnn.yaml` (seed 0, 48
    # trials; trials 53ea38ce, 6909dd7d, 92307fcb), rounded: what the live race held.
    "digits_cnn": Task("digits_cnn", common.REPO / "search_spaces" / "digits_cnn.yaml", {
        4: {"alpha": 0.43, "noise": 0.14, "lr": 0.027, "batch_size": 32},
        8: {"alpha": 0.2, "noise": 0.16, "lr": 0.022, "batch_size": 32},
        16: {"alpha": 0.19, "noise": 0.4, "lr": 0.01, "batch_size": 32},
    }, "at each width's best search trial (α, noise, lr as recorded)"),
}
SEEDS = 20
#: Fresh seeds, as ``kdtune evaluate`` draws them: never a search's seeds.
SEED_BASE = 1000
#: How a race can end (kdtune.racing.Race.outcome), as replay table columns.
OUTCOMES = ("one left", "equivalence", "futility", "max seeds")
COLUMNS = ["width", "contender", "temperature", "alpha", "seed", "val_acc", "pool_acc", "test_acc",
           "epochs", "train_time_s"]


def record(task: Task, path: Path, widths: tuple[int, ...], seeds: int, epochs: int | None) -> None:
    """Train every (width, contender, seed) run of ``task`` not yet in ``path`` and append it."""
    import torch

    from kdtune.distill import evaluate, run
    from kdtune.study import trial_run_config
    from kdtune.data import TensorSplit, subset_indices
    from kdtune.racing import BASELINE, contender_grid
    from kdtune.search import base_config, load_spec_data, plan_placement, teacher_configs
    from kdtune.spec import bounds
    from kdtune.teacher import prepare_teachers

    torch.set_num_threads(1)
    unknown = sorted(set(widths) - set(task.widths))
    if unknown:
        raise SystemExit(f"--widths {unknown} not recorded for task {task.name}: its widths are {list(task.widths)}")
    spec = common.digits_spec({"baselines": False}, path=task.spec)
    data = load_spec_data(spec)
    teacher = prepare_teachers(teacher_configs(spec), data, path.parent / f"teacher-cache-{task.name}",
                               log=print).targets
    base = base_config(spec, plan_placement(spec, {"CPU": 1.0}, 1))
    budget = int(epochs or spec.space.epochs)
    lo, hi = bounds(spec.space.temperature)
    temperatures = contender_grid(lo, hi, log=True)
    contenders: list[tuple[str, float, float]] = [(f"T={t:g}", t, float("nan")) for t in temperatures]
    contenders.append((BASELINE, float("nan"), 1.0))  # alpha of the T contenders: per width, below
    # Training-pool images outside the labelled subset: a second, larger validation set.
    seen = subset_indices(len(data.train), spec.data.train_subset, spec.seed, labels=data.train.y)
    unseen = torch.ones(len(data.train), dtype=torch.bool)
    unseen[seen] = False
    pool = TensorSplit(data.train.x[unseen], data.train.y[unseen])

    done: set[tuple[int, str, int]] = set()
    if path.exists():
        with path.open() as handle:
            done = {(int(r["width"]), r["contender"], int(r["seed"])) for r in csv.DictReader(handle)}
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    total = len(widths) * len(contenders) * seeds
    started = time.perf_counter()
    count = 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for seed in range(SEED_BASE, SEED_BASE + seeds):  # seed-major: a stopped recording is still a square matrix
            for width in widths:
                for label, temperature, alpha in contenders:
                    if (width, label, seed) in done:
                        continue
                    held = task.held[width]
                    alpha = 1.0 if label == BASELINE else held["alpha"]
                    config = trial_run_config({
                        **base, **held, "width": width, "alpha": alpha, "epochs": budget, "seed": seed,
                        "temperature": temperature if alpha < 1 else 1.0, "threads": 1,
                    })
                    t0 = time.perf_counter()
                    result = run(config, data, teacher if alpha < 1 else None)
                    device = torch.device("cpu")
                    writer.writerow({
                        "width": width, "contender": label, "temperature": temperature, "alpha": alpha,
                        "seed": seed, "val_acc": result.metrics["val_acc"],
                        "pool_acc": evaluate(result.student, pool, device)[0],
                        "test_acc": evaluate(result.student, data.test, device)[0],
                        "epochs": len(result.history), "train_time_s": round(time.perf_counter() - t0, 3),
                    })
                    handle.flush()
                    count += 1
                    elapsed = time.perf_counter() - started
                    print(f"{len(done) + count}/{total} width {width} {label} seed {seed}: "
                          f"val {result.metrics['val_acc']:.4f} ({elapsed / count:.2f} s/run, load {os.getloadavg()[0]:.2f})",
                          flush=True)



# --------------------------------------------------------------------------- replay


def load_matrix(task: Task, path: Path | None = None):
    """The recorded runs as a DataFrame (``path``, else the fresh recording, else the committed copy)."""
    import pandas as pd

    for candidate in ([path] if path else [task.recorded, task.committed]):
        if candidate is not None and candidate.is_file():
            return pd.read_csv(candidate), candidate
    raise SystemExit(f"no recorded matrix at {task.recorded} or {task.committed}: run with --record first")


def contender_order(frame) -> list[Any]:
    """Temperatures ascending, then the baseline (the race's contender labels)."""
    from kdtune.racing import BASELINE

    temps = sorted(float(t) for t in frame.loc[frame["contender"] != BASELINE, "temperature"].unique())
    return [*temps, BASELINE] if (frame["contender"] == BASELINE).any() else temps


def score_matrix(frame, width: int, score: str):
    """(contenders, seeds, matrix contenders × seeds) of one width, seeds complete for every contender."""
    import numpy as np

    from kdtune.racing import BASELINE

    rows = frame[frame["width"] == width]
    contenders = contender_order(rows)
    key = rows["contender"].where(rows["contender"] == BASELINE, rows["temperature"].astype(float))
    table = rows.assign(key=key).pivot_table(index="key", columns="seed", values=score, aggfunc="first")
    table = table.dropna(axis=1)  # seeds missing a contender are left out
    return contenders, [int(s) for s in table.columns], np.array([table.loc[c].to_numpy(float) for c in contenders])


def brute_force(matrix, alpha: float = 0.05) -> tuple[int, set[int]]:
    """Brute force on every recorded seed: the best contender (highest mean) and the set of
    contenders not distinguishable from it (two-sided paired t-tests against the best,
    Holm-adjusted over the other contenders at ``alpha``; the best included)."""
    import numpy as np
    from scipy import stats

    means = matrix.mean(axis=1)
    best = int(np.argmax(means))
    others = [i for i in range(len(matrix)) if i != best]
    pvalues = []
    for i in others:
        d = matrix[best] - matrix[i]
        pvalues.append(1.0 if np.all(d == 0) else float(stats.ttest_1samp(d, 0.0).pvalue))
    order = np.argsort(pvalues)
    kept = {best}
    for rank, index in enumerate(order):  # Holm step-down: stop at the first non-rejection
        if pvalues[index] > alpha / (len(others) - rank):
            kept.update(others[j] for j in order[rank:])
            break
    return best, kept


def replay_races(matrix, contenders, replays: int, max_seeds: int, reference: tuple[int, set[int]],
                 **race_options) -> dict[str, Any]:
    """Race the recorded ``matrix`` over ``replays`` random seed orders and compare each race with
    brute force's ``reference`` = (best contender, contenders indistinguishable from it)."""
    import numpy as np

    from kdtune.racing import Race, replay

    best, kept = reference
    k, seeds = matrix.shape
    outcome = {"drop_best": 0, "drop_kept": 0, "winner_in_set": 0, "runs": [], "rounds": [],
               "how": {"one left": 0, "equivalence": 0, "futility": 0, "max seeds": 0}, "example": None}
    for r in range(replays):
        order = np.random.default_rng(r).permutation(seeds)[:max_seeds]
        race = replay(Race(contenders, max_seeds=max_seeds, **race_options),
                      ({c: matrix[i, s] for i, c in enumerate(contenders)} for s in order))
        dropped = {contenders.index(c) for c in race.dropped}
        winner = contenders.index(race.best())
        outcome["drop_best"] += best in dropped
        outcome["drop_kept"] += bool(dropped & kept)
        outcome["winner_in_set"] += winner in kept
        outcome["runs"].append(race.runs)
        outcome["rounds"].append(race.rounds)
        outcome["how"][race.outcome()] += 1
        if r == 0:
            outcome["example"] = race
    outcome["brute_runs"] = k * seeds
    return outcome


def run(quick: bool = False, matrix_path: Path | None = None, replays: int | None = None,
        max_seeds: int = 10, tasks: tuple[str, ...] | None = None) -> common.Report:
    """Replay the race on each task's recorded matrix and report it against brute force
    (run_all's entry point: every task whose matrix is recorded or committed)."""
    replays = replays or (300 if quick else 2000)
    names = tasks or tuple(n for n, t in TASKS.items() if t.recorded.is_file() or t.committed.is_file())
    report = common.Report("race_offline", "Temperature race: offline replay on recorded runs (issue 16), "
                           + " and ".join(names), quick=quick)
    for name in names:
        _replay_task(report, TASKS[name], matrix_path if len(names) == 1 else None, replays, max_seeds)
    return report


def _replay_task(report: common.Report, task: Task, matrix_path: Path | None, replays: int, max_seeds: int) -> None:
    """One task's sections and targets of the report."""
    import numpy as np

    from kdtune.racing import BASELINE, Race

    frame, source = load_matrix(task, matrix_path)
    widths = sorted(int(w) for w in frame["width"].unique())
    epochs = int(frame["epochs"].max())
    nominal = 0.05
    headline_rows, variant_rows, brute_rows = [], [], []
    for width in widths:
        contenders, seeds, matrix = score_matrix(frame, width, "val_acc")
        label = lambda c: "no KD" if c == BASELINE else f"T={c:g}"  # noqa: E731
        best, kept = brute_force(matrix)
        means = matrix.mean(axis=1)
        sd = matrix.std(axis=1, ddof=1)
        brute_rows.append([width, len(seeds), *[f"{100 * m:.1f}{'*' if i in kept else ''}" for i, m in enumerate(means)],
                           f"{100 * float(np.sqrt(np.mean(sd ** 2))):.1f}"])
        for variance in ("pooled", "paired"):
            for score in ("val_acc", "pool_acc"):
                if score not in frame.columns:
                    continue
                _, _, scores = score_matrix(frame, width, score)
                # Each variant is judged against brute force on the same score.
                out = replay_races(scores, contenders, replays, max_seeds, brute_force(scores), variance=variance)
                row = [
                    width, variance, score,
                    out["drop_best"] / replays, out["drop_kept"] / replays, out["winner_in_set"] / replays,
                    float(np.mean(out["runs"])) / out["brute_runs"],
                    float(np.mean(out["runs"])), float(np.mean(out["rounds"])),
                    *(out["how"][how] / replays for how in OUTCOMES),
                ]
                (headline_rows if (variance, score) == ("pooled", "val_acc") else variant_rows).append(row)
                if (variance, score) == ("pooled", "val_acc"):
                    example: Race = out["example"]
                    report.add(f"{task.name}, width {width}: an example race (first replay)",
                               f"Verdict: {example.verdict(task.describe)}\n\n"
                               + _race_table(example, label))
                    report.target(f"{task.name} width {width}: the race's winner is inside brute force's set of temperatures "
                                  f"indistinguishable from the best in ≥ 95% of replays",
                                  f"{100 * row[5]:.1f}%", row[5] >= 0.95)
                    report.target(f"{task.name} width {width}: false-elimination rate (brute force's best dropped) ≤ {nominal}",
                                  f"{row[3]:.3f} (any of its indistinguishable set dropped: {row[4]:.3f})",
                                  row[3] <= nominal)
                    report.target(f"{task.name} width {width}: cost ≤ 1/3 of brute force's runs/epochs",
                                  f"{row[6]:.3f} ({row[7]:.1f} of {out['brute_runs']} runs, "
                                  f"{row[7] * epochs:,.0f} of {out['brute_runs'] * epochs:,} epochs)", row[6] <= 1 / 3)
    labels = [("no KD" if c == BASELINE else f"T={c:g}") for c in contender_order(frame)]
    report.add(f"{task.name}: brute force, mean validation accuracy (%) over every recorded seed",
               "`*` = not distinguishable from the best (two-sided paired t-tests against the best, Holm, α 0.05); "
               "seed sd = the pooled standard deviation of one run across seeds.\n\n"
               + common.markdown_table(["width", "seeds", *labels, "seed sd"], brute_rows))
    headers = ["width", "variance", "score", "drop best", "drop any of set", "winner in set", "cost share",
               "runs", "rounds", *OUTCOMES]
    report.add(f"{task.name}: race replays, {replays} random seed orders, max {max_seeds} seeds, α {nominal}",
               "drop best = replays that dropped brute force's best; drop any of set = dropped any contender "
               "brute force cannot tell from its best; winner in set = the race's best survivor is in that set; "
               "cost share = the race's runs (= epochs ÷ " f"{epochs}) over brute force's ({len(labels)} contenders × "
               "all seeds).\n\n" + common.markdown_table(headers, headline_rows))
    report.add(f"{task.name}: variants, per-pair variance (no sphericity assumption) and scoring on unseen training-pool images",
               "`pool_acc` scores each run on the training-pool images outside the 150 labelled ones (927 images, "
               "against 360 validation images); it is judged against brute force on the same images.\n\n"
               + common.markdown_table(headers, variant_rows))
    report.notes.append(f"Matrix: {common.shown(source)} ({len(frame)} runs, widths "
                        f"{', '.join(map(str, widths))}, {epochs} epochs each).")


def _race_table(race, label) -> str:
    import pandas as pd

    table = race.table()
    rows = [[label(r.contender), f"{100 * r.mean:.1f}", f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]",
             int(r.n_seeds), "-" if pd.isna(r.dropped_round) else int(r.dropped_round), r.status,
             "-" if r.baseline else f"{100 * r.kd_gain:+.1f} [{100 * r.kd_gain_low:+.1f}, {100 * r.kd_gain_high:+.1f}]"]
            for r in table.itertuples()]
    return common.markdown_table(["contender", "mean %", "95% CI", "seeds", "dropped after round", "status",
                                  "kd_gain (points, 95% CI)"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="record or replay this task only (default: record digits; replay every recorded task)")
    parser.add_argument("--record", action="store_true", help="train the missing runs of the matrix first")
    parser.add_argument("--widths", default=None, help="widths to record (default: the task's)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--epochs", type=int, default=None, help="default: the spec's budget")
    parser.add_argument("--matrix", type=Path, default=None,
                        help="recorded CSV (default results/bench/race_matrix_<task>.csv, else the committed copy)")
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--max-seeds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.record:
        task = TASKS[args.task or "digits"]
        widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else task.widths
        record(task, args.matrix or task.recorded, widths, args.seeds, args.epochs)
    tasks = (args.task,) if args.task else None
    common.report_standalone("bench/race_offline.py",
                             lambda: run(matrix_path=args.matrix, replays=args.replays, max_seeds=args.max_seeds,
                                         tasks=tasks), argv)


if __name__ == "__main__":
    main()
