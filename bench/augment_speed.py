"""Benchmark: what augmentation costs, and what cached teacher views save.

Three side-by-side measurements (ratios, never thresholds in tests):

1. **KD step with augmentation and cached views vs the hard-label step with the same
   augmentation**, for MLP, CNN and ResNet students on digits (crop with padding 1,
   no flip: digits are mirror-sensitive), 1 thread; target ≥ 0.9×.
2. **The augmentation pipeline vs RepDistiller's data path**: kdtune's batched crop +
   flip of normalised tensors (:func:`kdtune.core.augment.apply_views`, 1 thread)
   against torchvision's ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
   ``ToTensor``, ``Normalize`` on PIL images through a ``DataLoader`` with
   ``num_workers=2`` and batch 64 (RepDistiller's ``get_cifar100_dataloaders``), on
   the same CIFAR-shaped uint8 images; target ≥ 3× the samples/s.
3. **online vs views**: training time per epoch of a student distilled from a
   teacher about 10× its size, with the teacher run on every batch (``online``) or
   its cached views replayed (``views``), plus the one-off cost of computing K views.

Run: ``python bench/augment_speed.py [--quick]`` (writes results/bench/augment_speed.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table, median, ratio  # noqa: E402

common.make_kdtune_importable()

DIGITS_CROP = {"crop": True, "padding": None, "flip": False}
STUDENTS = (("mlp", 32, {"depth": 2}), ("cnn", 16, {}), ("resnet", 0.5, {"depth": 8}))
STEP_TARGET, PIPELINE_TARGET = 0.9, 3.0


def _train_seconds(history: list[dict[str, Any]]) -> float:
    """Wall seconds of the training loops (evaluation excluded), every epoch after the first."""
    return sum(h["epoch_time_s"] for h in history[1:])


def _teacher_10x(family: str, width: float, options: dict[str, Any], shape, classes: int) -> tuple[str, float, dict]:
    """A teacher of the student's family with about 10× its parameters (width scaled up)."""
    from kdtune.core.models import build_model, count_parameters

    target = 10 * count_parameters(build_model(family, shape, classes, width, **options))
    scale = width
    while count_parameters(build_model(family, shape, classes, scale, **options)) < target:
        scale = scale * 1.1 if family != "mlp" else scale + 8
    return family, round(scale, 2) if family != "mlp" else int(scale), options


def step_and_online(rounds: int, epochs: int, report: Report) -> None:
    """Sections 1 and 3: hard labels vs cached views vs online, per student, interleaved rounds."""
    import tempfile

    import torch

    from kdtune.core.data import load_dataset
    from kdtune.core.distill import RunConfig, run
    from kdtune.core.models import count_parameters
    from kdtune.core.teacher import TeacherConfig, online_targets, prepare_teachers, prepare_views

    torch.set_num_threads(1)
    data = load_dataset("digits")
    step_rows, online_rows = [], []
    for family, width, options in STUDENTS:
        t_family, t_width, t_options = _teacher_10x(family, width, options, data.input_shape, data.num_classes)
        teacher = TeacherConfig(family=t_family, width=t_width, model_options=dict(t_options), epochs=2,
                                augment=DIGITS_CROP, lr=1e-3)
        root = tempfile.mkdtemp(prefix="kdtune-bench-aug-")
        prepared = prepare_teachers([teacher], data, root, log=lambda m: None)
        started = time.perf_counter()
        views = prepare_views(prepared, [teacher], data, DIGITS_CROP, 4, log=lambda m: None)
        views_build_s = time.perf_counter() - started
        online = online_targets(prepared, [teacher], data)
        base = RunConfig(family=family, width=width, model_options=dict(options), epochs=epochs, batch_size=64,
                         augment=DIGITS_CROP, threads=1)
        conditions = {
            "hard": (base.replace(alpha=1.0), None),
            "views": (base.replace(alpha=0.5, teacher_targets="views"), views),
            "online": (base.replace(alpha=0.5, teacher_targets="online"), online),
        }
        times: dict[str, list[float]] = {name: [] for name in conditions}
        paired: dict[str, list[float]] = {"views": [], "online": []}
        for _ in range(rounds):
            this_round = {}
            for name, (config, targets) in conditions.items():
                this_round[name] = _train_seconds(run(config, data, targets).history)
                times[name].append(this_round[name])
            for name in paired:
                paired[name].append(ratio(this_round["hard"], this_round[name]))
        student_params = count_parameters(run(base.replace(alpha=1.0, epochs=1), data).student)
        teacher_params = prepared.info[0]["params"]
        images = len(data.train) * (epochs - 1)
        step_rows.append([f"{family} width {width}", student_params, images / median(times["hard"]),
                          images / median(times["views"]), median(paired["views"])])
        online_rows.append([f"{family} width {width}", student_params, f"{t_family} width {t_width}", teacher_params,
                            median(times["views"]) / (epochs - 1), median(times["online"]) / (epochs - 1),
                            ratio(median(times["online"]), median(times["views"])), views_build_s])
        report.target(f"KD step with augmentation + cached views ≥ {STEP_TARGET}× the hard-label step with the same "
                      f"augmentation ({family} student)", f"{median(paired['views']):.3f}×",
                      median(paired["views"]) >= STEP_TARGET)
    report.add(
        f"KD with cached views vs hard labels, same augmentation (digits, {len(data.train):,} images, crop padding 1, "
        f"batch 64, 1 thread, {rounds} interleaved rounds × {epochs} epochs, first epoch dropped)",
        "samples/s of the training loop (evaluation excluded, wall time); × hard = median over rounds of the "
        "ratio to the hard-label run of the same round.\n\n"
        + markdown_table(["student", "params", "hard samples/s", "views samples/s", "views × hard"], step_rows))
    report.add(
        "online vs views: training seconds per epoch, teacher ≈ 10× the student",
        "The views column replays 4 cached views (no teacher forward pass); online runs the teacher on every "
        "batch. The last column is the one-off cost of computing the 4 views before the search (it is paid once "
        "for all trials).\n\n"
        + markdown_table(["student", "params", "teacher", "teacher params", "views s/epoch", "online s/epoch",
                          "online ÷ views", "4 views built in (s)"], online_rows))


class _PILImages:
    """CIFAR-style dataset of uint8 HWC images returned as PIL images, as torchvision's CIFAR10 does."""

    def __init__(self, images, labels, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def pipeline(images_count: int, rounds: int, report: Report) -> None:
    """Section 2: kdtune's batched augmentation vs RepDistiller's PIL DataLoader."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from kdtune.core.augment import apply_views, draw_view_params

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (images_count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, images_count)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller's CIFAR-100 statistics
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = DataLoader(_PILImages(images, labels, transform), batch_size=64, shuffle=True, num_workers=2)
    x = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255) - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    x = x.contiguous()
    y = torch.from_numpy(labels)
    augment = {"crop": True, "padding": 4, "flip": True}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread against the DataLoader's two worker processes: conservative

    def ours(epoch: int) -> None:
        params = draw_view_params(augment, images_count, 32, seed=0, index=epoch)
        order = torch.randperm(images_count)
        for start in range(0, images_count, 64):
            index = order[start:start + 64]
            apply_views(x.index_select(0, index), params.index_select(0, index), 4)
            y.index_select(0, index)

    def theirs(epoch: int) -> None:
        for _batch in loader:
            pass

    rows, paired = [], []
    timings: dict[str, list[float]] = {"kdtune batched (1 thread)": [], "torchvision PIL, DataLoader num_workers=2": []}
    for epoch in range(rounds):
        this = {}
        for name, fn in (("kdtune batched (1 thread)", ours), ("torchvision PIL, DataLoader num_workers=2", theirs)):
            started = time.perf_counter()
            fn(epoch)
            this[name] = images_count / (time.perf_counter() - started)
            timings[name].append(this[name])
        paired.append(ratio(this["kdtune batched (1 thread)"], this["torchvision PIL, DataLoader num_workers=2"]))
    torch.set_num_threads(previous)
    for name, values in timings.items():
        rows.append([name, median(values), min(values), max(values)])
    report.add(
        f"Augmentation pipeline: {images_count:,} CIFAR-shaped images per epoch, batch 64, {rounds} interleaved epochs "
        "(the DataLoader's worker start-up included, as in a training epoch)",
        markdown_table(["pipeline", "samples/s (median)", "min", "max"], rows)
        + f"\n\nkdtune ÷ torchvision, median of per-epoch ratios: {median(paired):.1f}×")
    report.target(f"batched augmentation ≥ {PIPELINE_TARGET}× RepDistiller's PIL data path (samples/s)",
                  f"{median(paired):.1f}×", median(paired) >= PIPELINE_TARGET)


def run(quick: bool = False) -> Report:
    """Run the three measurements and return the report."""
    report = Report("augment_speed", "Augmentation: cached views vs hard labels vs online; batched vs PIL", quick=quick)
    pipeline(5_000 if quick else 20_000, 3 if quick else 5, report)
    step_and_online(2 if quick else 5, 3 if quick else 4, report)
    report.notes.append("Wall times on a shared machine: the ratios of conditions measured side by side, round by "
                        "round, are the result; the load average is above.")
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    before = common.load_average()
    t0 = time.perf_counter()
    result = run(quick=args.quick)
    result.wall_s, result.load_before, result.load_after = time.perf_counter() - t0, before, common.load_average()
    path = result.write("python bench/augment_speed.py" + (" --quick" if args.quick else ""))
    print(result.to_markdown())
    print(f"written to {path}")
