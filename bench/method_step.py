"""Benchmark: what a step of each logit-level distillation method costs over hard-label training.

Student training throughput (samples per CPU-second of the training thread, evaluation
excluded) on digits' training split, 1 thread, batch 32, for the students of
``distill_step.py`` (two-layer MLPs of width 32 and 128, a 3-conv CNN of width 16), with
each method's loss computed on cached teacher logits:

- hard labels (CE with autograd: what ``kdtune.distill.run`` does at alpha = 1);
- kd: today's fused KD (``kdtune.distill._CachedKD``, alpha 0.5, T 4), and the same
  objective through ``kdtune.core.method_cache.CachedKD`` (CE 0.5 + 0.5·T²·KL);
- kd + standardize (``CachedKD``: CE 0.1 + 9·T²·KL of standardized logits, T 2);
- dkd (``CachedDKD``: CE 1 + warm-up·(1·TCKD + 8·NCKD)·T², T 4), also with a
  temperature that changes every epoch (a new table per epoch);
- dist (``CachedDIST``: CE 1 + 2·T²·(inter + intra), T 4);
- dist and kd + standardize with the step's arithmetic in torch (``arrays="torch"``, the
  code path of a GPU) instead of NumPy, the CPU's default (what NumPy saves);
- the same dkd, dist and kd + standardize objectives with autograd through the reference
  functions of ``kdtune.losses`` (what the fused forms save).

The step loop is ``kdtune.distill.run``'s (index the batch, forward, loss and gradient,
backward from the logits, optimizer step), written out here because ``run`` does not
dispatch on the method yet. Conditions are interleaved round by round; every figure is
a median over rounds, and "× hard" the median of the per-round ratios to the hard-label
run of the same round. The teacher is an untrained MLP (throughput does not depend on
its weights).

Run: ``python bench/run_all.py --only method_step`` (or ``python bench/method_step.py [--quick]``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table, median, ratio  # noqa: E402

TARGET = 0.9
#: (family, width, options): as in distill_step.py.
STUDENTS = (("mlp", 32, {"depth": 2}), ("mlp", 128, {"depth": 2}), ("cnn", 16, {}))
BATCH = 32

HARD = "hard labels (CE, autograd)"
KD_RUN = "kd, fused as run() does today (_CachedKD, alpha 0.5, T 4)"
KD = "kd, CachedKD (CE 0.5 + 0.5·KD, T 4)"
KD_STD = "kd + standardize, CachedKD (CE 0.1 + 9·KD, T 2)"
DKD = "dkd, CachedDKD (CE 1 + warm-up·(TCKD + 8·NCKD), T 4)"
DKD_SCHEDULE = "dkd, CachedDKD, T changing every epoch (4 → 2)"
DIST = "dist, CachedDIST (CE 1 + 2·(inter + intra), T 4)"
KD_STD_TORCH = "kd + standardize, CachedKD, arithmetic in torch"
DIST_TORCH = "dist, CachedDIST, arithmetic in torch"
KD_STD_REF = "kd + standardize, autograd through kl_soft_loss"
DKD_REF = "dkd, autograd through dkd_loss"
DIST_REF = "dist, autograd through dist_loss"
#: The conditions that must keep up with hard labels, and the methods they stand for.
TARGETS = {KD_STD: "kd + standardize", DKD: "dkd", DIST: "dist", KD: "kd (CachedKD)"}

#: step(logits, labels, idx, batch_idx, epoch) → (loss, grad or None for autograd); the batch's
#: indices as run() has them: a tensor (idx) and the NumPy array it was made from (batch_idx)
Step = Callable[[Any, Any, Any, Any, int], tuple[Any, Any]]


def _steps(teacher_logits, labels) -> dict[str, Step]:
    """Every condition's loss computation, built once per student (the per-run caches included)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from kdtune.distill import RunConfig, TeacherTargets, _CachedKD
    from kdtune.losses import distillation_loss, dist_loss, dkd_loss, kl_soft_loss, standardize_logits
    from kdtune.core.method_cache import CachedDIST, CachedDKD, CachedKD

    cpu = torch.device("cpu")
    array = teacher_logits.numpy()
    array.setflags(write=False)  # as it arrives from Ray's object store
    run_kd = _CachedKD(TeacherTargets(logits=array), labels, RunConfig(temperature=4.0, alpha=0.5), cpu)
    kd = CachedKD(teacher_logits, labels, ce_weight=0.5)
    kd_std = CachedKD(teacher_logits, labels, ce_weight=0.1, standardize=True)
    dkd = CachedDKD(teacher_logits, labels, alpha=1.0, beta=8.0, ce_weight=1.0)
    dkd_schedule = CachedDKD(teacher_logits, labels, alpha=1.0, beta=8.0, ce_weight=1.0)
    dist = CachedDIST(teacher_logits, labels, beta=1.0, gamma=1.0, ce_weight=1.0)
    kd_std_torch = CachedKD(teacher_logits, labels, ce_weight=0.1, standardize=True, arrays="torch")
    dist_torch = CachedDIST(teacher_logits, labels, beta=1.0, gamma=1.0, ce_weight=1.0, arrays="torch")
    generator = torch.Generator().manual_seed(0)
    teacher_std = standardize_logits(teacher_logits)

    def warmup(epoch: int) -> float:
        return min(epoch / 20, 1.0)

    def hard(logits, y, idx, batch_idx, epoch):  # what run() computes at alpha = 1
        return distillation_loss(logits, None, y, 4.0, 1.0, unlabelled=False), None

    def kd_run(logits, y, idx, batch_idx, epoch):
        return run_kd.loss_and_grad(logits, batch_idx, idx, generator)

    def kd_std_ref(logits, y, idx, batch_idx, epoch):
        soft = kl_soft_loss(standardize_logits(logits), teacher_std.index_select(0, idx), 2.0)
        return 0.1 * F.cross_entropy(logits.float(), y) + 9.0 * soft, None

    def dkd_ref(logits, y, idx, batch_idx, epoch):
        term = dkd_loss(logits, teacher_logits.index_select(0, idx), y, 4.0, 1.0, 8.0)
        return F.cross_entropy(logits.float(), y) + warmup(epoch) * term, None

    def dist_ref(logits, y, idx, batch_idx, epoch):
        term = dist_loss(logits, teacher_logits.index_select(0, idx), 4.0, 1.0, 1.0)
        return F.cross_entropy(logits.float(), y) + 2.0 * term, None

    temperatures = np.linspace(4.0, 2.0, 8)
    return {
        HARD: hard,
        KD_RUN: kd_run,
        KD: lambda logits, y, idx, batch_idx, epoch: kd.loss_and_grad(logits, batch_idx, 4.0, 0.5),
        KD_STD: lambda logits, y, idx, batch_idx, epoch: kd_std.loss_and_grad(logits, batch_idx, 2.0, 9.0),
        DKD: lambda logits, y, idx, batch_idx, epoch: dkd.loss_and_grad(logits, batch_idx, 4.0, warmup(epoch)),
        DKD_SCHEDULE: lambda logits, y, idx, batch_idx, epoch: dkd_schedule.loss_and_grad(
            logits, batch_idx, float(temperatures[epoch % len(temperatures)]), warmup(epoch)),
        DIST: lambda logits, y, idx, batch_idx, epoch: dist.loss_and_grad(logits, batch_idx, 4.0, 2.0),
        KD_STD_TORCH: lambda logits, y, idx, batch_idx, epoch: kd_std_torch.loss_and_grad(logits, idx, 2.0, 9.0),
        DIST_TORCH: lambda logits, y, idx, batch_idx, epoch: dist_torch.loss_and_grad(logits, idx, 4.0, 2.0),
        KD_STD_REF: kd_std_ref,
        DKD_REF: dkd_ref,
        DIST_REF: dist_ref,
    }


def _train(family: str, width: int, options: dict[str, Any], data, step: Step, epochs: int) -> list[float]:
    """Samples per CPU-second of every epoch after the first, training a fresh student with ``step``."""
    import torch

    from kdtune.models import build_model

    torch.manual_seed(0)
    student = build_model(family, data.input_shape, data.num_classes, width, **options)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    x, y = data.train.x, data.train.y
    shuffle = torch.Generator().manual_seed(0)
    throughput = []
    for epoch in range(1, epochs + 1):
        started = time.thread_time()
        order = torch.randperm(len(y), generator=shuffle).numpy()  # as run() shuffles
        for start in range(0, len(order), BATCH):
            batch_idx = order[start : start + BATCH]
            idx = torch.from_numpy(batch_idx)
            logits = student(x[idx])
            loss, grad = step(logits, y[idx], idx, batch_idx, epoch)
            loss.item()  # run() reads every step's loss
            optimizer.zero_grad(set_to_none=True)
            if grad is None:
                loss.backward()
            else:
                logits.backward(grad)
            optimizer.step()
        if epoch > 1:  # the first epoch includes one-off allocations and the first table
            throughput.append(len(order) / (time.thread_time() - started))
    return throughput


def _microbenchmark(teacher_logits, labels, rounds: int, steps: int = 2000) -> list[list[Any]]:
    """CPU µs per call of each loss alone (forward + gradient + backward to a leaf) on 32 × 10 logits."""
    import torch

    steps_by_name = _steps(teacher_logits, labels)
    student = torch.randn(BATCH, teacher_logits.shape[1], requires_grad=True)
    idx = torch.arange(BATCH)
    batch_idx = idx.numpy()
    y = labels[idx]
    results: dict[str, list[float]] = {name: [] for name in steps_by_name if name != DKD_SCHEDULE}
    for _ in range(rounds):
        for name in results:
            step = steps_by_name[name]
            started = time.thread_time()
            for _ in range(steps):
                loss, grad = step(student, y, idx, batch_idx, 30)
                if grad is None:
                    loss.backward()
                else:
                    student.backward(grad)
            results[name].append(1e6 * (time.thread_time() - started) / steps)
    return [[name, median(values), min(values), max(values)] for name, values in results.items()]


def _load_digits():
    from kdtune.data import load_dataset

    spec = common.digits_spec()
    return load_dataset(spec.data.dataset, None, seed=spec.data.split_seed, val_fraction=spec.data.val_fraction,
                        test_fraction=spec.data.test_fraction)


def run(quick: bool = False) -> Report:
    """Run the method-step benchmark and return its report."""
    import torch

    from kdtune.distill import predict_logits
    from kdtune.models import build_model, count_parameters

    report = Report("method_step", "Logit-level methods on cached teacher logits: step cost against hard labels",
                    quick=quick)
    rounds, epochs = (3, 3) if quick else (7, 4)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = _load_digits()
    torch.manual_seed(0)
    teacher = build_model("mlp", data.input_shape, data.num_classes, 1024, depth=2).eval()
    teacher_logits = predict_logits(teacher, data.train.x, torch.device("cpu"))
    labels = data.train.y
    for family, width, options in STUDENTS:
        started = time.perf_counter()
        params = count_parameters(build_model(family, data.input_shape, data.num_classes, width, **options))
        steps = _steps(teacher_logits, labels)
        for step in steps.values():  # warm-up: the first call of every code path
            _train(family, width, options, data, step, 2)
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        paired: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            this_round = {name: median(_train(family, width, options, data, step, epochs)) for name, step in steps.items()}
            for name, value in this_round.items():
                cpu[name].append(value)
                paired[name].append(ratio(value, this_round[HARD]))
        elapsed = time.perf_counter() - started
        rows = [[name, median(cpu[name]), min(cpu[name]), max(cpu[name]), median(paired[name]),
                 min(paired[name]), max(paired[name]), 1e6 / median(cpu[name])] for name in steps]
        report.add(
            f"Student {family} width {width} ({params:,} params): batch {BATCH}, {len(labels):,} training images, "
            f"1 thread, {rounds} interleaved rounds × {epochs} epochs ({elapsed:.0f} s)",
            "samples per CPU-second of the training thread (training only, every epoch after the first); "
            "× hard = median (min, max) over rounds of the ratio to the hard-label run of the same round.\n\n"
            + markdown_table(["condition", "samples/CPU-s (median)", "min", "max", "× hard (median)", "min ×",
                              "max ×", "CPU µs per sample"], rows))
        for name, method in TARGETS.items():
            r = median(paired[name])
            report.target(f"{method} on cached logits ≥ {TARGET}× hard-label throughput ({family} width {width}, "
                          f"{params:,} params)", f"{r:.3f}× (rounds: {', '.join(f'{x:.2f}' for x in paired[name])})",
                          r >= TARGET)
    report.add(f"Loss alone per step (batch {BATCH}, {data.num_classes} classes, 1 thread)",
               markdown_table(["loss (forward + gradient + backward to a leaf)", "CPU µs per step (median)", "min",
                               "max"], _microbenchmark(teacher_logits, labels, rounds)))
    torch.set_num_threads(saved_threads)
    report.notes.append(
        "The fused forms (kdtune.core.method_cache) index a per-run table (one row per training sample, keyed by T) of "
        "what depends only on the teacher, the label and T, and compute the loss and its gradient at the logits "
        "without an autograd graph. kd and dkd are one stacked log-softmax and its backward kernel, as today's fused "
        "KD: CE on s, KL(p ‖ q) on s/T and, for dkd, KL(p̂ ‖ q̂) on s/T with the target masked, weighted by "
        "α and c = β − α(1 − p_y) (α·TCKD + β·NCKD = α·KL + c·NCKD per sample). Standardization adds the z-score "
        "and its backward (about ten small operations); DIST needs the inter- and intra-class Pearson "
        "correlations and their gradients (about forty). At batch 32 × 10 classes every operation costs "
        "microseconds of dispatch whatever its size: 1–6 µs in torch, about half that in NumPy, so on the CPU "
        "the step's arithmetic runs in NumPy on views of the tensors (the 'arithmetic in torch' rows are the "
        "same code on tensors, the path of a GPU). Inside a training step every call costs two to three times "
        "what it costs in the loop of the 'loss alone' table (caches the student's forward and backward have "
        "evicted), so the tiny MLP students, whose whole step is about 500 µs, see those operations; the CNN "
        "does not. The 'T changing every epoch' row builds a new table each epoch.")
    return report


if __name__ == "__main__":
    common.make_kdtune_importable()
    quick = "--quick" in sys.argv[1:]
    load_before = common.load_average()
    t0 = time.perf_counter()
    result = run(quick=quick)
    result.wall_s = time.perf_counter() - t0
    result.load_before, result.load_after = load_before, common.load_average()
    command = "python bench/method_step.py" + (" --quick" if quick else "")
    print(result.to_markdown(command))
    print(f"-> {result.write(command)}")
