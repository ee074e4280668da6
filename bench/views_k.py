"""Does K matter? Cached teacher views (K ∈ {1, 4, 16}) against the online teacher.

On real Fashion-MNIST (a 10k-image training subset, about 20 epochs, a ResNet-20
teacher and a ResNet-8 student, standard augmentation: crop with padding 3 + flip),
every condition is run with the same seeds; the result is the validation accuracy
of ``views: K`` paired by seed with ``online``. A K is adequate when the 90%
confidence interval (Student t) of its paired difference from online lies within
±0.5 points; the smallest adequate K should be the default of ``teacher_targets.k``.

    python bench/views_k.py            # the full run (see the estimate --quick prints)
    python bench/views_k.py --quick    # a smoke pass: 1,000 images, 2 epochs, 2 seeds, K ∈ {1, 4}

The Fashion-MNIST ``.gz`` files (Debian's dataset-fashion-mnist, by default in
/usr/share/datasets/fashion-mnist) are unpacked into a temporary folder in the
layout kdtune's loader reads (``FashionMNIST/raw/``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table  # noqa: E402

common.make_kdtune_importable()

FULL = {"subset": 10_000, "val": 12_000, "epochs": 20, "seeds": 5, "ks": (1, 4, 16), "teacher_epochs": 20}
QUICK = {"subset": 1_000, "val": 1_000, "epochs": 2, "seeds": 2, "ks": (1, 4), "teacher_epochs": 2}
ADEQUATE_POINTS = 0.5


def unpacked_fashion_mnist(source: Path, folder: Path) -> Path:
    """``folder`` holding ``FashionMNIST/raw/`` with the unpacked IDX files of ``source``'s ``.gz`` files."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*-ubyte.gz")):
        with gzip.open(path, "rb") as packed, open(raw / path.name[:-3], "wb") as plain:
            shutil.copyfileobj(packed, plain)
    return folder


def subset_splits(data, train_size: int, val_size: int, seed: int = 0):
    """The dataset with a stratified ``train_size`` training subset and the first ``val_size``
    validation images (teacher, views and students all use this training subset)."""
    from kdtune.core.data import DatasetSplits, TensorSplit, subset_indices

    index = subset_indices(len(data.train), train_size, seed, labels=data.train.y)
    train = TensorSplit(data.train.x[index].contiguous(), data.train.y[index].contiguous())
    val = TensorSplit(data.val.x[:val_size].contiguous(), data.val.y[:val_size].contiguous())
    return DatasetSplits(data.name, train, val, data.test, data.num_classes, data.input_shape,
                         f"{data.fingerprint}|train{train_size}|val{val_size}|seed{seed}")


def paired_interval(differences: list[float], level: float = 0.90) -> tuple[float, float, float]:
    """Mean of the paired differences and its two-sided ``level`` Student-t interval."""
    import numpy as np
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def measure(settings: dict[str, Any], root: Path, log=print, threads: int = 2, cache: Path | None = None) -> dict[str, Any]:
    """Run every (seed, condition) and return accuracies and timings."""
    import torch

    from kdtune.core.augment import resolve_augment
    from kdtune.core.data import load_dataset
    from kdtune.core.distill import RunConfig, run
    from kdtune.core.teacher import TeacherConfig, online_targets, prepare_teachers, prepare_views

    torch.set_num_threads(threads)
    data = subset_splits(load_dataset("fashion_mnist", str(root), val_fraction=0.2), settings["subset"], settings["val"])
    augment = resolve_augment("standard", "fashion_mnist")
    schedule = {"kind": "cosine", "warmup": 0, "min_factor": 0.0}
    teacher = TeacherConfig(family="resnet", width=1, model_options={"depth": 20}, epochs=settings["teacher_epochs"],
                            lr=0.05, batch_size=64, optimizer="sgd", nesterov=False, weight_decay=5e-4,
                            lr_schedule=schedule, augment=augment)
    started = time.perf_counter()
    prepared = prepare_teachers([teacher], data, cache or root / "teacher", log=log)
    teacher_s = time.perf_counter() - started
    targets: dict[str, Any] = {"online": online_targets(prepared, [teacher], data)}
    build_s = {}
    for k in settings["ks"]:
        started = time.perf_counter()
        targets[f"views K={k}"] = prepare_views(prepared, [teacher], data, augment, k, log=log)
        build_s[k] = time.perf_counter() - started
    base = RunConfig(family="resnet", width=0.5, model_options={"depth": 8}, epochs=settings["epochs"], lr=0.05,
                     batch_size=64, optimizer="sgd", nesterov=False, weight_decay=5e-4, lr_schedule=schedule,
                     augment=augment, alpha=0.1, temperature=4.0)
    accuracy: dict[str, dict[int, float]] = {name: {} for name in targets}
    epoch_s: dict[str, list[float]] = {name: [] for name in targets}
    # Every finished run is appended to runs.jsonl next to the cached teacher: a rerun with more
    # seeds trains only the runs not there yet.
    runs_file = (cache or root) / "runs.jsonl"
    from_log: dict[tuple[int, str], bool] = {}
    if runs_file.exists():
        for line in runs_file.read_text().splitlines():
            done = json.loads(line)
            if done["name"] in accuracy and done["seed"] < settings["seeds"]:
                accuracy[done["name"]][done["seed"]] = done["val_acc"]
                epoch_s[done["name"]].extend(done.get("epoch_s", []))
                from_log[(done["seed"], done["name"])] = bool(done.get("from_log"))
    for seed in range(settings["seeds"]):
        for name, target in targets.items():
            if seed in accuracy[name]:
                continue
            mode = "online" if name == "online" else "views"
            # Only the final score is read: the epochs before are not validated (12,000 images each).
            result = run(base.replace(seed=seed, teacher_targets=mode), data, target, validate_epochs=())
            accuracy[name][seed] = result.metrics["val_acc"]
            times = [h["epoch_time_s"] for h in result.history]
            epoch_s[name].extend(times)
            with runs_file.open("a") as handle:
                handle.write(json.dumps({"seed": seed, "name": name, "val_acc": accuracy[name][seed],
                                         "epoch_s": times}) + "\n")
            log(f"seed {seed} {name}: val_acc {result.metrics['val_acc']:.4f}")
    return {"accuracy": accuracy, "epoch_s": epoch_s, "teacher_s": teacher_s, "build_s": build_s, "from_log": from_log,
            "teacher_params": prepared.info[0]["params"], "teacher_val_acc": prepared.info[0]["val_acc"]}


def seeds_to_settle(mean: float, sd: float, level: float = 0.90, bound: float = ADEQUATE_POINTS) -> str:
    """Seeds at which a paired difference with this mean and sd would have its ``level``
    interval inside ±``bound`` (Student t), or "never" when the mean itself is outside."""
    import math

    from scipy import stats

    if not math.isfinite(sd) or abs(mean) >= bound:
        return "never" if math.isfinite(sd) else "-"
    for n in range(2, 1000):
        if stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= bound - abs(mean):
            return str(n)
    return "> 1000"


def estimate_full_seconds(quick: dict[str, Any], measured: dict[str, Any]) -> float:
    """Seconds the full run would take on this machine, scaled from the quick pass's epochs."""
    scale = FULL["subset"] / QUICK["subset"]
    online = sum(measured["epoch_s"]["online"]) / len(measured["epoch_s"]["online"]) * scale
    views = [v for name, values in measured["epoch_s"].items() if name != "online" for v in values]
    views_epoch = sum(views) / len(views) * scale
    runs = FULL["seeds"] * FULL["epochs"] * (online + len(FULL["ks"]) * views_epoch)
    teacher = measured["teacher_s"] / QUICK["teacher_epochs"] * FULL["teacher_epochs"] * scale
    per_view = sum(measured["build_s"].values()) / sum(measured["build_s"]) * scale
    return runs + teacher + per_view * sum(FULL["ks"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke pass (minutes), with an estimate of the full run")
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the whole machine)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per condition (default: 5; 2 with --quick); "
                        "runs already in results/bench/views_k_cache/runs.jsonl are not trained again")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds:
        settings["seeds"] = args.seeds
    before, t0 = common.load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdtune-views-k-") as folder:
        root = unpacked_fashion_mnist(args.source, Path(folder))
        # The teacher and its views are cached under results/ so that a rerun skips them.
        cache = common.RESULTS_DIR / ("views_k_cache_quick" if args.quick else "views_k_cache")
        measured = measure(settings, root, threads=args.threads, cache=cache)
    report = Report("views_k", "Does K matter? Cached views vs the online teacher on Fashion-MNIST", quick=args.quick)
    accuracy = measured["accuracy"]
    seeds = sorted(accuracy["online"])
    rows, adequate = [], []
    for name in accuracy:
        if name == "online":
            continue
        diffs = [100 * (accuracy[name][s] - accuracy["online"][s]) for s in seeds]
        mean, low, high = paired_interval(diffs)
        ok = low >= -ADEQUATE_POINTS and high <= ADEQUATE_POINTS
        if ok:
            adequate.append(name)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        rows.append([name, 100 * sum(accuracy[name].values()) / len(seeds), mean, sd, low, high,
                     "yes" if low >= -ADEQUATE_POINTS else "no", "yes" if ok else "no",
                     seeds_to_settle(mean, sd)])
    rows.insert(0, ["online", 100 * sum(accuracy["online"].values()) / len(seeds), 0.0, "-", "-", "-", "-", "-", "-"])
    report.add(
        f"{settings['subset']:,} training images, {settings['val']:,} validation images, {settings['epochs']} epochs, "
        f"{len(seeds)} seeds; teacher ResNet-20 ({measured['teacher_params']:,} params, val "
        f"{measured['teacher_val_acc']:.4f}) → ResNet-8 width 0.5, T 4, alpha 0.1, SGD 0.05 cosine",
        markdown_table(["targets", "mean val acc (%)", "paired diff vs online (points)", "sd of diff", "90% CI low",
                        "90% CI high", f"not worse by > {ADEQUATE_POINTS} (CI low)",
                        f"adequate (CI within ±{ADEQUATE_POINTS})",
                        "seeds for the CI to fit ±0.5 at this mean and sd"], rows)
        + "\n\nSmallest adequate K: " + (adequate[0] if adequate else "none"))
    if any(measured["from_log"].values()):
        report.notes.append("Seeds " + ", ".join(map(str, sorted({s for (s, _n), v in measured["from_log"].items() if v})))
                            + " come from the first full run's log (4 decimals, snapped to whole validation images: "
                            "at most one image, 0.008 points, off); their epoch times were not kept.")
    per_epoch = {name: sum(v) / len(v) for name, v in measured["epoch_s"].items() if v}
    report.add("Seconds per training epoch", markdown_table(["targets", "s/epoch"], list(per_epoch.items())))
    if args.quick:
        estimate = estimate_full_seconds(settings, measured)
        report.notes.append(f"Quick pass only: the numbers above are a smoke test, not evidence about K. The full run "
                            f"({FULL['seeds']} seeds × {1 + len(FULL['ks'])} conditions × {FULL['epochs']} epochs on "
                            f"{FULL['subset']:,} images) would take about {estimate / 3600:.1f} h on this machine at "
                            f"this load (scaled from the quick pass's epoch times).")
    report.wall_s, report.load_before, report.load_after = time.perf_counter() - t0, before, common.load_average()
    path = report.write("python bench/views_k.py" + (" --quick" if args.quick else ""))
    print(report.to_markdown())
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
