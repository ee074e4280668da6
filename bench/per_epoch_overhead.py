"""Per-epoch time of a kdtune network trained by kdtune.distill.run vs a plain PyTorch loop.

The same ResNet-8 student (the ``resnet`` family, depth 8) on the same
Fashion-MNIST-shaped tensors (1x28x28, 10 classes, random pixels and labels:
time does not depend on what is learnt), hard labels, Adam, batch 128, one
torch thread (what a 1-CPU trial gets). The plain loop is what a user would
write: shuffle, index the batch, forward, cross-entropy, backward, step, then
score the (small) validation split, as kdtune does after every epoch.

Per epoch = CPU time of this thread between two epoch ends (``time.thread_time``;
with one torch thread the work runs here, and other processes on a shared
machine do not inflate it), wall time alongside. Runs are interleaved round by
round, the first epoch of every run (warm-up) is dropped, medians over the rest.

    PYTHONPATH=. python bench/per_epoch_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table, median, ratio  # noqa: E402

TARGET = 1.10  # kdtune's per-epoch time within 10% of the plain loop's
SHAPE = (1, 28, 28)
CLASSES = 10
#: (family, width, options) of the students measured: 19k and 75k parameters.
STUDENTS = (("resnet", 0.5, {"depth": 8}), ("resnet", 1.0, {"depth": 8}))


def _data(n_train: int, n_val: int) -> Any:
    import torch

    from kdtune.data import TensorSplit, make_splits

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, *SHAPE, generator=generator),
                           torch.randint(0, CLASSES, (n,), generator=generator))

    return make_splits("synthetic_fashion", split(n_train), split(n_val), split(n_val), num_classes=CLASSES,
                       seed=0, val_fraction=0.2, test_fraction=0.2, image_size=None)


def _kdtune_epochs(family: str, width: float, options: dict, data: Any, epochs: int, batch: int) -> list[tuple[float, float]]:
    from kdtune.distill import RunConfig, run

    marks = [(time.thread_time(), time.perf_counter())]
    config = RunConfig(family=family, width=width, model_options=options, alpha=1.0, lr=1e-3, optimizer="adam",
                       batch_size=batch, epochs=epochs, seed=0, device="cpu")
    run(config, data, None, lambda epoch, metrics: marks.append((time.thread_time(), time.perf_counter())))
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def _plain_epochs(family: str, width: float, options: dict, data: Any, epochs: int, batch: int) -> list[tuple[float, float]]:
    import torch
    import torch.nn.functional as F

    from kdtune.models import build_model

    torch.manual_seed(0)
    model = build_model(family, data.input_shape, data.num_classes, width, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train.x, data.train.y
    marks = [(time.thread_time(), time.perf_counter())]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
        marks.append((time.thread_time(), time.perf_counter()))
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def run(quick: bool = False) -> Report:
    """Run the per-epoch overhead benchmark and return its report."""
    import torch

    from kdtune.models import build_model, count_parameters

    report = Report("per_epoch_overhead", "Per-epoch time: kdtune.distill.run vs a plain PyTorch loop", quick=quick)
    rounds, epochs, n_train, batch = (3, 3, 1024, 128) if quick else (5, 3, 4096, 128)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    data = _data(n_train, 256)
    try:
        rows, worst = [], 0.0
        for family, width, options in STUDENTS:
            params = count_parameters(build_model(family, SHAPE, CLASSES, width, **options))
            cpu: dict[str, list[float]] = {"kdtune": [], "plain": []}
            wall: dict[str, list[float]] = {"kdtune": [], "plain": []}
            paired = []
            for _ in range(rounds):
                per_round = {}
                for name, fn in (("kdtune", _kdtune_epochs), ("plain", _plain_epochs)):
                    times = fn(family, width, options, data, epochs, batch)[1:]  # drop the warm-up epoch
                    cpu[name] += [t[0] for t in times]
                    wall[name] += [t[1] for t in times]
                    per_round[name] = median(t[0] for t in times)
                paired.append(ratio(per_round["kdtune"], per_round["plain"]))
            r = median(paired)
            worst = max(worst, r)
            rows.append([f"{family} {options} width {width}", params, median(cpu["kdtune"]), median(cpu["plain"]), r,
                         min(paired), max(paired), median(wall["kdtune"]), median(wall["plain"])])
        report.add(
            f"{n_train:,} training images 1x28x28, batch {batch}, Adam, 1 thread, {rounds} interleaved rounds × "
            f"{epochs} epochs (first epoch of each run dropped)",
            markdown_table(["student", "params", "kdtune CPU s/epoch", "plain CPU s/epoch", "ratio (median of rounds)",
                            "min", "max", "kdtune wall s/epoch", "plain wall s/epoch"], rows),
        )
        report.target(f"kdtune's per-epoch CPU time ≤ {TARGET:.2f}× a plain PyTorch loop's (worst student)",
                      f"{worst:.3f}×", worst <= TARGET)
        report.notes.append("CPU time of the training thread (torch uses 1 thread), so other load on a shared "
                            "machine does not enter; wall time is given for reference.")
    finally:
        torch.set_num_threads(saved)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    common.make_kdtune_importable()
    before = common.load_average()
    started = time.perf_counter()
    report = run(quick=args.quick)
    report.wall_s = time.perf_counter() - started
    report.load_before, report.load_after = before, common.load_average()
    command = "python bench/per_epoch_overhead.py" + (" --quick" if args.quick else "")
    path = report.write(command, common.RESULTS_DIR)
    print(report.to_markdown(command))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
