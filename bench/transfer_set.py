"""A transfer set on the real task: does `data.unlabelled` help the Fashion-MNIST students?

    python bench/transfer_set.py [--study results/real_task/fashion_mnist] [--widths 0.25,1] [--seeds 2]
        [--temperature T] [--alpha A] [--epochs N] [--lr LR] [--variants "hard labels,KD + transfer set"]
        [--seed-base B]

For each width of a finished real-task study's test front (``bench/real_task.py``), the
front's configuration is retrained three ways with the same seeds: hard labels alone
(the baseline), KD as searched (``train_subset`` labelled images), and KD with every
other training image as a transfer set (``unlabelled: all``: the teacher's soft targets
only, at the same steps). Validation accuracy after the last epoch, mean ± sd over
seeds, and each variant's paired gain over the one before it (KD over hard labels, the
transfer set over KD). ``--temperature``, ``--alpha``, ``--epochs`` and
``--lr`` replace the front's values in every run (T and α in the distilled
ones), to compare other settings on the same configurations; ``--variants`` trains only
some of the three, and ``--seed-base`` moves the seeds. The teacher and its cached views
are the study's (nothing is retrained but the students). Not part of ``make bench``:
about 2 minutes a seed at width 0.25 and 5 at width 1 on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table  # noqa: E402

DEFAULT_STUDY = common.REPO / "results" / "real_task" / "fashion_mnist"
SEED_BASE = 3000  # fresh to the search (spec.seed), the races (+2000) and the evaluation (+1000)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


VARIANTS = ("hard labels", "KD", "KD + transfer set")


def build(study: Path, widths: list[float], seeds: int, overrides: dict[str, float] | None = None,
          variants: Sequence[str] = VARIANTS, seed_base: int = SEED_BASE) -> Report:
    common.make_kdtune_importable()
    import torch

    from kdtune.core.distill import run
    from kdtune.core.objectives import baseline_values
    from kdtune.core.teacher import prepare_teachers
    from kdtune.spec import load_spec, load_spec_data, spec_teacher_targets, teacher_configs
    from kdtune.study import SPEC_FILE, TEACHER_DIR, recorded_trial_config, trial_run_config
    from kdtune.tables import read_csv_table

    torch.set_num_threads(1)
    if not (study / "final.csv").exists():
        raise SystemExit(f"{study}: no final.csv; run python bench/real_task.py first (or pass --study)")
    spec = load_spec(study / SPEC_FILE)
    data = load_spec_data(spec)
    prepared = prepare_teachers(teacher_configs(spec), data, study / TEACHER_DIR, log=lambda m: None)
    targets = spec_teacher_targets(spec, prepared, data, log=lambda m: None)
    front = read_csv_table(study / "final.csv")
    report = Report("transfer_set", "A transfer set on the real task: KD with and without unlabelled images")
    rows, notes = [], []
    names = [name for name in VARIANTS if name in variants]  # the runs to train, in VARIANTS' order
    for width in widths:
        match = front[front["width"] == width]
        if match.empty:
            raise SystemExit(f"--widths: {width:g} is not on {study}/final.csv's front "
                             f"({', '.join(f'{w:g}' for w in front['width'])})")
        config = trial_run_config(recorded_trial_config(study, str(match["trial_id"].iloc[0])))
        config = config.replace(**(overrides or {}))
        scores: dict[str, list[float]] = {name: [] for name in names}
        for i in range(seeds):
            seed = int(spec.seed) + seed_base + i
            runs = {"hard labels": (config.replace(seed=seed, unlabelled=None, **baseline_values()), None),
                    "KD": (config.replace(seed=seed, unlabelled=None), targets),
                    "KD + transfer set": (config.replace(seed=seed, unlabelled="all"), targets)}
            for name in scores:
                variant, teacher = runs[name]
                scores[name].append(float(run(variant, data, teacher, validate_epochs=()).metrics["val_acc"]))
                print(f"width {width:g} seed {seed} {name}: {scores[name][-1]:.4f}", flush=True)
        # Paired gains, each variant over the one before it that ran (KD over hard labels, transfer set over KD).
        gains = [_mean_sd([a - b for a, b in zip(scores[later], scores[earlier])])
                 for earlier, later in zip(names, names[1:])]
        rows.append([f"{width:g}", f"{int(match['params'].iloc[0]):,}",
                     f"T {config.temperature:.3g}, α {config.alpha:.3g}, lr {config.lr:.3g}",
                     *(_mean_sd(v) for v in scores.values()), *gains])
    labelled = int(spec.data.train_subset)
    report.add(f"Validation accuracy after {config.epochs} epochs, {seeds} seed(s) from {seed_base + int(spec.seed)}",
               markdown_table(["width", "params", "config", *names,
                               *(f"{later} − {earlier} (paired)" for earlier, later in zip(names, names[1:]))], rows))
    notes.append(f"study {common.shown(study)}; {labelled:,} labelled images; the transfer set is the other "
                 f"{len(data.train) - labelled:,} training images; every run takes the same steps "
                 f"(an epoch is {labelled:,} images)")
    report.notes.extend(notes)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--widths", default="0.25,1")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--temperature", type=float, help="T of the distilled runs (default: the front's)")
    parser.add_argument("--alpha", type=float, help="α of the distilled runs (default: the front's)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the front's)")
    parser.add_argument("--lr", type=float, help="learning rate of every run (default: the front's)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"which runs to train, comma-separated (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--seed-base", type=int, default=SEED_BASE,
                        help=f"the first seed is the spec's seed plus this (default {SEED_BASE})")
    args = parser.parse_args(argv)
    widths = [float(w) for w in args.widths.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    overrides = {name: value for name, value in
                 (("temperature", args.temperature), ("alpha", args.alpha), ("epochs", args.epochs), ("lr", args.lr))
                 if value is not None}
    common.report_standalone("bench/transfer_set.py",
                             lambda: build(args.study.resolve(), widths, args.seeds, overrides, variants,
                                           args.seed_base), argv)


if __name__ == "__main__":
    main()
