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
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.make_kdtune_importable()

RECORDED = common.RESULTS_DIR / "race_matrix_digits.csv"
COMMITTED = common.REPO / "bench" / "data" / "race_matrix_digits.csv"
#: The hyperparameters held fixed while temperature is raced (the brief of issue 16).
HELD = {"alpha": 0.2, "noise": 0.0, "lr": 0.01, "batch_size": 32}
WIDTHS = (8, 64)
SEEDS = 20
#: Fresh seeds, as ``kdtune evaluate`` draws them: never a search's seeds.
SEED_BASE = 1000
#: How a race can end (kdtune.racing.Race.outcome), as replay table columns.
OUTCOMES = ("one left", "equivalence", "futility", "max seeds")
COLUMNS = ["width", "contender", "temperature", "alpha", "seed", "val_acc", "pool_acc", "test_acc",
           "epochs", "train_time_s"]


def record(path: Path, widths: tuple[int, ...], seeds: int, epochs: int | None) -> None:
    """Train every (width, contender, seed) run not yet in ``path`` and append it."""
    import torch

    from kdtune.distill import RunConfig, evaluate, run
    from kdtune.data import TensorSplit, subset_indices
    from kdtune.racing import BASELINE, contender_grid
    from kdtune.search import base_config, load_spec_data, plan_placement, teacher_configs
    from kdtune.spec import bounds
    from kdtune.teacher import prepare_teachers

    torch.set_num_threads(1)
    spec = common.digits_spec({"baselines": False})
    data = load_spec_data(spec)
    teacher = prepare_teachers(teacher_configs(spec), data, path.parent / "teacher-cache", log=print).targets
    base = base_config(spec, plan_placement(spec, {"CPU": 1.0}, 1))
    budget = int(epochs or spec.space.epochs)
    lo, hi = bounds(spec.space.temperature)
    temperatures = contender_grid(lo, hi, log=True)
    contenders: list[tuple[str, float, float]] = [(f"T={t:g}", t, HELD["alpha"]) for t in temperatures]
    contenders.append((BASELINE, float("nan"), 1.0))
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
                    config = RunConfig.from_dict({
                        **base, **HELD, "width": width, "alpha": alpha, "epochs": budget, "seed": seed,
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


def load_matrix(path: Path | None = None):
    """The recorded runs as a DataFrame (``path``, else the fresh recording, else the committed copy)."""
    import pandas as pd

    for candidate in ([path] if path else [RECORDED, COMMITTED]):
        if candidate is not None and candidate.is_file():
            return pd.read_csv(candidate), candidate
    raise SystemExit(f"no recorded matrix at {RECORDED} or {COMMITTED}: run with --record first")


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
        max_seeds: int = 10) -> common.Report:
    """Replay the race on the recorded matrix and report it against brute force (run_all's entry point)."""
    import numpy as np

    from kdtune.racing import BASELINE, Race

    frame, source = load_matrix(matrix_path)
    replays = replays or (300 if quick else 2000)
    report = common.Report("race_offline", "Temperature race: offline replay on recorded digits runs (issue 16)",
                           quick=quick)
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
                    report.add(f"Width {width}: an example race (first replay)",
                               f"Verdict: {example.verdict('at α = 0.2, lr = 0.01, noise 0, batch 32')}\n\n"
                               + _race_table(example, label))
                    report.target(f"width {width}: the race's winner is inside brute force's set of temperatures "
                                  f"indistinguishable from the best in ≥ 95% of replays",
                                  f"{100 * row[5]:.1f}%", row[5] >= 0.95)
                    report.target(f"width {width}: false-elimination rate (brute force's best dropped) ≤ {nominal}",
                                  f"{row[3]:.3f} (any of its indistinguishable set dropped: {row[4]:.3f})",
                                  row[3] <= nominal)
                    report.target(f"width {width}: cost ≤ 1/3 of brute force's runs/epochs",
                                  f"{row[6]:.3f} ({row[7]:.1f} of {out['brute_runs']} runs, "
                                  f"{row[7] * epochs:,.0f} of {out['brute_runs'] * epochs:,} epochs)", row[6] <= 1 / 3)
    labels = [("no KD" if c == BASELINE else f"T={c:g}") for c in contender_order(frame)]
    report.add("Brute force: mean validation accuracy (%) over every recorded seed",
               "`*` = not distinguishable from the best (two-sided paired t-tests against the best, Holm, α 0.05); "
               "seed sd = the pooled standard deviation of one run across seeds.\n\n"
               + common.markdown_table(["width", "seeds", *labels, "seed sd"], brute_rows))
    headers = ["width", "variance", "score", "drop best", "drop any of set", "winner in set", "cost share",
               "runs", "rounds", *OUTCOMES]
    report.add(f"Race replays: {replays} random seed orders, max {max_seeds} seeds, α {nominal}",
               "drop best = replays that dropped brute force's best; drop any of set = dropped any contender "
               "brute force cannot tell from its best; winner in set = the race's best survivor is in that set; "
               "cost share = the race's runs (= epochs ÷ " f"{epochs}) over brute force's ({len(labels)} contenders × "
               "all seeds).\n\n" + common.markdown_table(headers, headline_rows))
    report.add("Variants: per-pair variance (no sphericity assumption) and scoring on unseen training-pool images",
               "`pool_acc` scores each run on the training-pool images outside the 150 labelled ones (927 images, "
               "against 360 validation images); it is judged against brute force on the same images.\n\n"
               + common.markdown_table(headers, variant_rows))
    report.notes.append(f"Matrix: {common.shown(source)} ({len(frame)} runs, widths "
                        f"{', '.join(map(str, widths))}, {epochs} epochs each).")
    return report


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
    parser.add_argument("--record", action="store_true", help="train the missing runs of the matrix first")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--epochs", type=int, default=None, help="default: the spec's budget (81)")
    parser.add_argument("--matrix", type=Path, default=None,
                        help=f"recorded CSV (default {RECORDED.relative_to(common.REPO)}, else the committed copy)")
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--max-seeds", type=int, default=10)
    args = parser.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    if args.record:
        record(args.matrix or RECORDED, widths, args.seeds, args.epochs)
    common.report_standalone("bench/race_offline.py",
                             lambda: run(matrix_path=args.matrix, replays=args.replays, max_seeds=args.max_seeds), argv)


if __name__ == "__main__":
    main()
