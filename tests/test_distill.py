"""One distillation run (kdtune.distill.run) on scikit-learn's bundled digits, no Ray.

A single cached MLP teacher (trained once per module with prepare_teachers) serves
every test; students are small MLPs trained for a few epochs on one CPU thread.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from kdtune.data import subset_indices
from kdtune.distill import RunConfig, TeacherTargets, evaluate, run, select_device
from kdtune.errors import ConfigError
from kdtune.losses import distillation_loss
from kdtune.models import build_model, count_parameters, model_size_bytes
from kdtune.teacher import TeacherConfig, load_cached_teacher, prepare_teachers

REPORTED_KEYS = {"val_acc", "val_loss", "train_loss", "params", "bytes", "epoch_time_s", "samples_per_s", "status"}
TIMING_KEYS = {"epoch_time_s", "samples_per_s"}
TEACHER = TeacherConfig(family="mlp", width=512, model_options={"depth": 2}, epochs=20, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    """The module's teacher (logits and features), trained once into a temporary cache."""
    cache = tmp_path_factory.mktemp("teacher_cache")
    return prepare_teachers([TEACHER], digits, cache, with_features=True, log=lambda message: None)


def _without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


class _Recorder:
    """A report callback that keeps every (epoch, metrics) it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.calls.append((epoch, metrics))

    @property
    def epochs(self) -> list[int]:
        return [epoch for epoch, _ in self.calls]


# ---------------------------------------------------------------- end to end


def test_distillation_run_reports_every_epoch_and_returns_the_trained_student(digits, teacher) -> None:
    config = RunConfig(family="mlp", width=16, temperature=4.0, alpha=0.5, lr=1e-2, batch_size=64, epochs=4, seed=0)
    report = _Recorder()
    result = run(config, digits, teacher.targets, report)

    assert report.epochs == [1, 2, 3, 4]
    for epoch, metrics in report.calls:
        assert REPORTED_KEYS <= set(metrics)
        assert metrics["status"] == ("completed" if epoch == 4 else "running")
        assert math.isfinite(metrics["train_loss"]) and metrics["epoch_time_s"] > 0 and metrics["samples_per_s"] > 0
    assert result.metrics["status"] == "completed"
    assert _without_timing(result.history) == _without_timing([m for _, m in report.calls])

    # 64 inputs → 16 → 16 → 10, weights and biases, float32.
    expected_params = (64 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10)
    assert result.metrics["params"] == expected_params == count_parameters(result.student)
    assert result.metrics["bytes"] == 4 * expected_params == model_size_bytes(result.student)

    # The returned student is the one that was measured, and it learned: chance is 0.1.
    val_acc, val_loss = evaluate(result.student, digits.val, torch.device("cpu"))
    assert result.metrics["val_acc"] == pytest.approx(val_acc)
    assert result.metrics["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert val_acc > 0.8
    assert report.calls[-1][1]["train_loss"] < report.calls[0][1]["train_loss"]


def test_same_seed_gives_identical_metrics_and_other_seed_differs(digits, teacher) -> None:
    def history(seed: int) -> list[dict[str, Any]]:
        config = RunConfig(width=8, temperature=3.0, alpha=0.3, noise=0.2, lr=1e-2, batch_size=32,
                           epochs=3, seed=seed, train_subset=150)
        return _without_timing(run(config, digits, teacher.targets).history)

    first = history(0)
    assert history(0) == first
    other = history(1)
    assert [row["train_loss"] for row in other] != [row["train_loss"] for row in first]
    assert [row["val_loss"] for row in other] != [row["val_loss"] for row in first]


def test_validating_only_the_last_epoch_trains_the_same_student(digits, teacher) -> None:
    """validate_epochs=() (what kdtune evaluate asks) skips scoring the epochs before the
    last; the training is untouched: same losses, same final student, same final score."""
    config = RunConfig(width=8, temperature=3.0, alpha=0.3, noise=0.2, lr=1e-2, batch_size=32,
                       epochs=4, seed=3, train_subset=150)
    every = run(config, digits, teacher.targets)
    last = run(config, digits, teacher.targets, validate_epochs=())
    some = run(config, digits, teacher.targets, validate_epochs={2})
    assert [h["train_loss"] for h in last.history] == [h["train_loss"] for h in every.history]
    assert last.metrics["val_acc"] == every.metrics["val_acc"]
    assert last.metrics["val_loss"] == every.metrics["val_loss"]
    assert last.metrics["status"] == "completed"
    assert all(math.isnan(h["val_acc"]) and math.isnan(h["val_loss"]) for h in last.history[:-1])
    assert [math.isnan(h["val_acc"]) for h in some.history] == [True, False, True, False]
    assert some.history[1]["val_acc"] == every.history[1]["val_acc"]
    for a, b in zip(last.student.state_dict().values(), every.student.state_dict().values()):
        assert torch.equal(a, b)


def test_huge_learning_rate_diverges_when_only_the_last_epoch_is_validated(digits) -> None:
    config = RunConfig(width=16, alpha=1.0, optimizer="sgd", lr=1e6, epochs=10, train_subset=150, batch_size=32)
    result = run(config, digits, None, validate_epochs=())
    assert result.metrics["status"] == "diverged"
    assert len(result.history) < config.epochs


# ---------------------------------------------------------------- the point of it all


def test_distillation_beats_hard_labels_with_little_data(digits, teacher) -> None:
    # 150 labelled images, an 8-unit student: the teacher's soft targets carry what the labels don't.
    # Measured with this teacher (4 seeds): hard labels ≈ 0.80, KD at T=4, α=0.1 ≈ 0.85, and
    # KD ahead on every seed; the margin below is set well under that 0.05 gap.
    def accuracy(alpha: float, seed: int) -> float:
        config = RunConfig(family="mlp", width=8, model_options={"depth": 2}, temperature=4.0, alpha=alpha,
                           lr=1e-2, batch_size=32, epochs=40, seed=seed, train_subset=150)
        return run(config, digits, teacher.targets if alpha < 1 else None).metrics["val_acc"]

    seeds = range(4)
    hard = [accuracy(1.0, seed) for seed in seeds]
    distilled = [accuracy(0.1, seed) for seed in seeds]
    assert teacher.info[0]["val_acc"] > 0.95
    assert statistics.mean(distilled) > statistics.mean(hard) + 0.025, (hard, distilled)
    assert sum(d > h for d, h in zip(distilled, hard)) >= 3, (hard, distilled)


# ---------------------------------------------------------------- the fused loss changes no number


def _reference_training(config: RunConfig, data, teacher_logits: np.ndarray) -> tuple[list[float], torch.nn.Module]:
    """run()'s training loop written out with the reference loss: ``distillation_loss`` on the
    batch's teacher logits (plus fresh noise, drawn as ``perturb_teacher_logits`` draws it)
    and autograd for the gradient. Returns the per-epoch mean training losses and the student."""
    torch.manual_seed(config.seed)
    student = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    indices = subset_indices(len(data.train), config.train_subset, config.data_seed, labels=data.train.y).numpy()
    shuffle = torch.Generator().manual_seed(config.seed)
    noise = torch.Generator().manual_seed(config.seed + 1)
    logits = torch.from_numpy(teacher_logits)
    losses = []
    for _ in range(config.epochs):
        student.train()
        order = indices[torch.randperm(len(indices), generator=shuffle).numpy()]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = torch.from_numpy(order[start : start + config.batch_size])
            teacher = logits.index_select(logits.dim() - 2, batch)
            if config.noise > 0:
                teacher = teacher + config.noise * torch.randn(teacher.shape, generator=noise)
            loss = distillation_loss(student(data.train.x[batch]), teacher, data.train.y[batch],
                                     config.temperature, config.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(order))
    return losses, student


@pytest.mark.parametrize(
    ("overrides", "teachers"),
    [
        ({"temperature": 3.7, "alpha": 0.3}, 1),
        ({"temperature": 2.0, "alpha": 0.0, "noise": 0.3}, 1),
        ({"temperature": 10.0, "alpha": 0.6}, 2),
        ({"temperature": 1.5, "alpha": 0.2, "noise": 0.5}, 2),
    ],
)
def test_cached_kd_run_takes_the_same_steps_as_the_reference_loss(digits, teacher, overrides, teachers) -> None:
    # 150 images in batches of 32: four full batches and one of 22 every epoch.
    config = RunConfig(width=16, lr=1e-2, batch_size=32, epochs=3, seed=3, train_subset=150, **overrides)
    logits = teacher.targets.logits
    if teachers == 2:  # a second, weaker teacher: the same logits shrunk and jittered
        jitter = np.random.default_rng(0).standard_normal(logits.shape).astype(np.float32)
        logits = np.stack([logits, 0.5 * logits + jitter])
    losses, reference = _reference_training(config, digits, logits)
    result = run(config, digits, TeacherTargets(logits=logits))

    # Bit-for-bit the same student, hence the same validation metrics ...
    for name, tensor in reference.state_dict().items():
        assert torch.equal(result.student.state_dict()[name], tensor), name
    val_acc, val_loss = evaluate(reference, digits.val, torch.device("cpu"))
    assert result.metrics["val_acc"] == val_acc and result.metrics["val_loss"] == val_loss
    # ... and the same training loss up to float rounding of its value.
    assert [row["train_loss"] for row in result.history] == pytest.approx(losses, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- divergence


def test_huge_learning_rate_diverges_without_raising(digits) -> None:
    report = _Recorder()
    config = RunConfig(width=16, alpha=1.0, optimizer="sgd", lr=1e6, epochs=10, train_subset=150, batch_size=32)
    result = run(config, digits, None, report)
    assert result.metrics["status"] == "diverged"
    assert len(report.calls) < config.epochs  # stopped early
    assert report.calls[-1][1]["status"] == "diverged"
    assert all(m["status"] == "running" for _, m in report.calls[:-1])


def test_huge_learning_rate_diverges_with_distillation_too(digits, teacher) -> None:
    report = _Recorder()
    config = RunConfig(width=16, alpha=0.5, noise=0.1, optimizer="sgd", lr=1e6, epochs=10, train_subset=150,
                       batch_size=32)
    result = run(config, digits, teacher.targets, report)
    assert result.metrics["status"] == "diverged"
    assert len(report.calls) < config.epochs
    assert math.isnan(result.metrics["train_loss"])


def test_nan_teacher_logits_diverge_in_the_first_epoch(digits, teacher) -> None:
    nan_teacher = TeacherTargets(logits=np.full_like(teacher.targets.logits, np.nan))
    report = _Recorder()
    result = run(RunConfig(width=16, alpha=0.5, epochs=5, train_subset=150), digits, nan_teacher, report)
    assert report.epochs == [1]
    assert result.metrics["status"] == "diverged"
    assert math.isnan(result.metrics["train_loss"])


# ---------------------------------------------------------------- resume


class _Interrupted(Exception):
    pass


def test_resumed_run_matches_an_uninterrupted_one(digits, teacher, tmp_path) -> None:
    config = RunConfig(width=16, temperature=4.0, alpha=0.3, noise=0.3, lr=1e-2, batch_size=32, epochs=6,
                       seed=5, train_subset=300)
    reference = run(config, digits, teacher.targets)

    saved: list[int] = []

    def save(epoch: int, state: dict[str, Any]) -> None:
        # Saved to disk at once, as the Ray trainable does: the dict holds live tensors of the run.
        torch.save(state, tmp_path / f"state_{epoch}.pt")
        saved.append(epoch)

    def crash_at_epoch_4(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == 4:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        run(config, digits, teacher.targets, crash_at_epoch_4, on_checkpoint=save, checkpoint_every=3)
    assert saved == [3]  # a checkpoint every 3 epochs; the crash came before any at epoch 4

    state = torch.load(tmp_path / "state_3.pt", weights_only=True)
    assert state["epoch"] == 3
    report = _Recorder()
    resumed = run(config, digits, teacher.targets, report, on_checkpoint=save, resume_state=state)

    assert report.epochs == [4, 5, 6]
    assert saved == [3, 6]  # the final epoch always checkpoints
    # Mid-run checkpoints hold the optimizer (needed to resume); the final one only
    # the student (a finished run is not resumed).
    assert state["optimizer"] is not None
    final = torch.load(tmp_path / "state_6.pt", weights_only=True)
    assert final["optimizer"] is None and final["epoch"] == 6
    assert all(torch.equal(final["student"][k], v) for k, v in resumed.student.state_dict().items())
    assert _without_timing(resumed.history) == _without_timing(reference.history)
    assert {k: v for k, v in resumed.metrics.items() if k not in TIMING_KEYS} == {
        k: v for k, v in reference.metrics.items() if k not in TIMING_KEYS
    }
    for name, tensor in reference.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[name], tensor), name


# ---------------------------------------------------------------- feature distillation, online teacher


def test_feature_distillation_uses_teacher_features(digits, teacher) -> None:
    assert teacher.targets.features.shape == (len(digits.train), 512)
    common = dict(width=16, temperature=4.0, alpha=0.5, lr=1e-2, batch_size=32, epochs=10, seed=0, train_subset=300)
    with_features = run(RunConfig(beta=0.5, **common), digits, teacher.targets)
    without = run(RunConfig(beta=0.0, **common), digits, teacher.targets)
    assert with_features.metrics["status"] == "completed"
    assert math.isfinite(with_features.metrics["train_loss"])
    assert with_features.metrics["val_acc"] > 0.75  # measured ≈ 0.89, the same as without features
    # The feature term is really in the loss: it changes training.
    assert with_features.history[0]["train_loss"] != without.history[0]["train_loss"]
    # Only the student is counted: the adapter is training scaffolding.
    assert with_features.metrics["params"] == without.metrics["params"]


def test_feature_distillation_without_features_is_a_config_error(digits, teacher) -> None:
    logits_only = TeacherTargets(logits=teacher.targets.logits)
    report = _Recorder()
    with pytest.raises(ConfigError) as info:
        run(RunConfig(beta=0.5, epochs=1), digits, logits_only, report)
    assert info.value.field == "beta"
    assert report.calls == []


def test_online_teacher_gives_the_same_run_as_cached_logits(digits, teacher) -> None:
    network = load_cached_teacher(teacher.cache_dir, 0, digits, TEACHER)
    config = RunConfig(width=16, temperature=4.0, alpha=0.2, lr=1e-2, batch_size=32, epochs=2, seed=0, train_subset=300)
    cached = run(config, digits, teacher.targets)
    online = run(config, digits, TeacherTargets(online_model=network))
    # The same teacher outputs up to float rounding (batch vs whole-split matmuls).
    for a, b in zip(cached.history, online.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1 / len(digits.val) + 1e-9)


# ---------------------------------------------------------------- devices


def test_select_device() -> None:
    assert select_device("auto", cuda_available=False) == torch.device("cpu")
    assert select_device("auto", cuda_available=True) == torch.device("cuda")
    assert select_device("cpu", cuda_available=True) == torch.device("cpu")
    assert select_device("cuda", cuda_available=True) == torch.device("cuda")
    assert select_device("cuda:1", cuda_available=True) == torch.device("cuda", 1)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert select_device("cuda", cuda_available=False) == torch.device("cpu")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert select_device("cuda:0", cuda_available=False) == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_device("cpu", cuda_available=False)  # no warning when nothing falls back
    for bad in ("gpu", "tpu", "CPU", ""):
        with pytest.raises(ConfigError) as info:
            select_device(bad, cuda_available=True)
        assert info.value.field == "device"


# ---------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"noise": -1.0}, "noise"),
        ({"soft_loss": "cosine"}, "soft_loss"),
        ({"family": "transformer"}, "family"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_subset": 0}, "train_subset"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_invalid_config_is_rejected_before_training(digits, teacher, overrides: dict, field: str) -> None:
    report = _Recorder()
    checkpoints: list[int] = []
    config = RunConfig(**({"width": 8, "epochs": 2} | overrides))
    with pytest.raises(ConfigError) as info:
        run(config, digits, teacher.targets, report, on_checkpoint=lambda e, s: checkpoints.append(e))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert report.calls == [] and checkpoints == []


def test_soft_targets_without_a_teacher_is_a_config_error(digits) -> None:
    report = _Recorder()
    with pytest.raises(ConfigError) as info:
        run(RunConfig(alpha=0.5, epochs=1), digits, None, report)
    assert info.value.field == "teacher"
    assert report.calls == []


def test_error_messages_list_the_allowed_values(digits) -> None:
    with pytest.raises(ConfigError) as info:
        run(RunConfig(alpha=1.0, soft_loss="cosine", epochs=1), digits, None)
    assert "kl" in str(info.value) and "logit_mse" in str(info.value)
    with pytest.raises(ConfigError) as info:
        run(RunConfig(alpha=1.0, family="transformer", epochs=1), digits, None)
    assert "mlp" in str(info.value) and "cnn" in str(info.value)


def test_score_pool_scores_the_final_student_on_the_training_images_outside_its_subset(digits):
    config = RunConfig(width=16, alpha=1.0, lr=1e-2, batch_size=32, epochs=2, seed=0, train_subset=150,
                       score_pool=True)
    result = run(config, digits)
    # The images the student never saw: the training split minus its seeded, stratified subset.
    seen = set(subset_indices(len(digits.train), 150, 0, labels=digits.train.y).tolist())
    unseen = [i for i in range(len(digits.train)) if i not in seen]
    with torch.no_grad():
        predicted = result.student(digits.train.x[unseen]).argmax(1)
    pool_acc = (predicted == digits.train.y[unseen]).float().mean().item()
    metrics = result.metrics
    assert metrics["pool_n"] == len(digits.train) - 150 == len(unseen)
    assert metrics["pool_acc"] == pytest.approx(pool_acc)
    n_val = len(digits.val)
    assert metrics["val_pool_acc"] == pytest.approx((metrics["val_acc"] * n_val + pool_acc * len(unseen))
                                                    / (n_val + len(unseen)))
    # Only the final report carries it; without the setting nothing is scored.
    assert "pool_acc" not in result.history[0]
    assert "pool_acc" not in run(config.replace(score_pool=False), digits).metrics
