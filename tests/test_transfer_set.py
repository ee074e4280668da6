"""A transfer set (``data.unlabelled``): training images a distilled student learns from
through the teacher alone, their labels never read (Hinton et al. 2015, §2).

The loss on a batch with unlabelled images is checked against the formula written out
here; the training loop against the same loop written out with the reference loss and
autograd; and the point of it on digits: with 50 labelled images, a student that also
sees the teacher's soft targets on the other training images beats one that does not.
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from kdtune.core.data import student_images, subset_indices, unlabelled_indices
from kdtune.core.losses import UNLABELLED, distillation_loss, dkd_loss, fused_kd_loss_and_grad, kd_log_targets, \
    kd_loss_weights, soft_targets
from kdtune.core.method_cache import CACHED_OBJECTIVES
from kdtune.distill import RunConfig, run
from kdtune.errors import ConfigError
from kdtune.models import build_model
from kdtune.tables import read_csv_table
from kdtune.teacher import TeacherConfig, prepare_teachers

TEACHER = TeacherConfig(family="mlp", width=512, model_options={"depth": 2}, epochs=20, lr=1e-3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("teacher_cache")
    return prepare_teachers([TEACHER], digits, cache, log=lambda message: None)


# ---------------------------------------------------------------- which images


def test_unlabelled_images_are_a_seeded_sample_outside_the_labelled_subset(digits) -> None:
    n, labels = len(digits.train), digits.train.y
    labelled, unlabelled = student_images(n, 100, 300, 7, labels=labels)
    # The labelled subset is the one a run without a transfer set sees.
    assert np.array_equal(labelled, subset_indices(n, 100, 7, labels=labels).numpy())
    assert len(unlabelled) == 300 and len(set(unlabelled.tolist())) == 300
    assert not set(unlabelled.tolist()) & set(labelled.tolist())
    assert np.all(np.diff(unlabelled) > 0)
    again = unlabelled_indices(n, labelled, 300, 7)
    assert np.array_equal(again, unlabelled)
    assert not np.array_equal(unlabelled_indices(n, labelled, 300, 8), unlabelled)
    everything = unlabelled_indices(n, labelled, "all", 7)
    assert sorted(everything.tolist() + labelled.tolist()) == list(range(n))
    assert len(unlabelled_indices(n, labelled, None, 7)) == 0


@pytest.mark.parametrize("size", [0, -3, True, 2.5, "some"])
def test_a_bad_transfer_set_size_names_what_is_allowed(digits, size) -> None:
    labelled = subset_indices(len(digits.train), 100, 0, labels=digits.train.y).numpy()
    with pytest.raises(ConfigError, match=r"unlabelled.*integer from 1 to \d+.*'all'"):
        unlabelled_indices(len(digits.train), labelled, size, 0)


def test_more_unlabelled_images_than_are_left_is_refused(digits) -> None:
    n = len(digits.train)
    labelled = subset_indices(n, 100, 0, labels=digits.train.y).numpy()
    with pytest.raises(ConfigError, match=f"from 1 to {n - 100} "):
        unlabelled_indices(n, labelled, n - 99, 0)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"unlabelled": 100}, "needs train_subset"),
    ({"unlabelled": 0, "train_subset": 50}, "integer >= 1, 'all' or null"),
    ({"unlabelled": "most", "train_subset": 50}, "integer >= 1, 'all' or null"),
])
def test_run_config_refuses_a_transfer_set_it_cannot_use(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**overrides).validate()


# ---------------------------------------------------------------- the loss


def _kl_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    p = torch.softmax(teacher / temperature, dim=1)
    return (p * (p.log() - torch.log_softmax(student / temperature, dim=1))).sum(dim=1)


def test_an_unlabelled_image_adds_only_the_teacher_term() -> None:
    # loss = (α·Σ_{labelled} CE_n + (1 − α)·T²·Σ_{all} KL_n) / B: written out per sample.
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, UNLABELLED, 0, UNLABELLED, UNLABELLED, 4])
    temperature, alpha = 3.0, 0.4
    ce = -torch.log_softmax(student, dim=1)[torch.arange(6), labels.clamp(min=0)]
    labelled = labels >= 0
    expected = (alpha * ce[labelled].sum() + (1 - alpha) * temperature**2 * _kl_per_sample(student, teacher, temperature).sum()) / 6
    # (the cross-entropy is computed in float32, as in training)
    assert distillation_loss(student, teacher, labels, temperature, alpha).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dkd_splits_an_unlabelled_image_on_the_teachers_top_class() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, UNLABELLED, 3, UNLABELLED, 0])
    filled = labels.clone()
    for n in (1, 3):  # the teacher's top class, by hand
        filled[n] = int(np.argmax(teacher[n].numpy()))
    params = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 0, "ce_weight": 1.0, "kd_weight": 1.0}
    got = distillation_loss(student, teacher, labels, 4.0, 0.0, soft_loss_kind="dkd", params=params)
    ce = -torch.log_softmax(student, dim=1)[torch.tensor([0, 2, 4]), labels[[0, 2, 4]]].sum() / 5
    assert got.item() == pytest.approx((ce + dkd_loss(student, teacher, filled, 4.0, 1.0, 8.0)).item(), rel=1e-6)


def _reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, method: str,
               ce_weight: float, temperature: float) -> tuple[float, torch.Tensor]:
    params = {"ce_weight": ce_weight, "kd_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 0,
              "dist_beta": 1.0, "dist_gamma": 2.0}
    s = student.clone().requires_grad_(True)
    loss = distillation_loss(s, teacher, labels, temperature, 0.0, soft_loss_kind="kl" if method == "kd" else method,
                             params=params)
    loss.backward()
    return loss.item(), s.grad


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_fused_methods_agree_with_the_reference_on_unlabelled_images(method: str, arrays: str) -> None:
    g = torch.Generator().manual_seed(2)
    n, classes = 12, 6
    teacher = torch.randn(n, classes, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[[1, 4, 5, 9]] = UNLABELLED
    arguments = {"dkd": {"alpha": 1.0, "beta": 8.0}, "dist": {"beta": 1.0, "gamma": 2.0}}.get(method, {})
    cached = CACHED_OBJECTIVES[method](teacher, labels, ce_weight=0.7, arrays=arrays, **arguments)
    idx = torch.tensor([0, 1, 3, 4, 5, 9, 11])
    student = torch.randn(len(idx), classes, generator=g, dtype=torch.float64)
    loss, grad = cached.loss_and_grad(student, idx, 2.5)
    ref_loss, ref_grad = _reference(student, teacher[idx], labels[idx], method, 0.7, 2.5)
    # The reference computes its cross-entropy in float32, as in training; the rest in float64.
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_fused_kd_weights_give_an_unlabelled_image_no_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, UNLABELLED, 2, 3, UNLABELLED, 1, 4, UNLABELLED])
    weights = kd_loss_weights(soft_targets(teacher, 2.0), labels, 2.0, 0.3, 8)
    student = torch.randn(8, 5, generator=g)
    loss, grad = fused_kd_loss_and_grad(student, weights, kd_log_targets(soft_targets(teacher, 2.0)), 2.0)
    s = student.clone().requires_grad_(True)
    reference = distillation_loss(s, teacher, labels, 2.0, 0.3)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(weights[[1, 4, 7], 0], torch.zeros(3, 5))


# ---------------------------------------------------------------- the training loop


def _reference_training(config: RunConfig, data, teacher_logits: np.ndarray) -> torch.nn.Module:
    """The transfer-set loop as documented, written out with the reference loss and autograd:
    an epoch is as many images as the labelled subset, drawn from the labelled and unlabelled
    images together; an unlabelled image's label is UNLABELLED."""
    torch.manual_seed(config.seed)
    student = build_model(config.family, data.input_shape, data.num_classes, config.width, **config.model_options)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    labelled = subset_indices(len(data.train), config.train_subset, config.data_seed, labels=data.train.y).numpy()
    rest = np.setdiff1d(np.arange(len(data.train)), labelled)
    unlabelled = np.sort(rest[np.random.default_rng(config.data_seed + 1).choice(len(rest), config.unlabelled,
                                                                                  replace=False)])
    both = np.sort(np.concatenate((labelled, unlabelled)))
    labels = data.train.y.clone()
    labels[torch.from_numpy(unlabelled)] = UNLABELLED
    shuffle = torch.Generator().manual_seed(config.seed)
    logits = torch.from_numpy(teacher_logits)
    for _ in range(config.epochs):
        student.train()
        order = both[torch.randperm(len(both), generator=shuffle).numpy()[:len(labelled)]]
        for start in range(0, len(order), config.batch_size):
            batch = torch.from_numpy(order[start : start + config.batch_size])
            loss = distillation_loss(student(data.train.x[batch]), logits[batch], labels[batch],
                                     config.temperature, config.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return student


def test_a_run_with_a_transfer_set_takes_the_documented_steps(digits, teacher) -> None:
    config = RunConfig(width=16, lr=1e-2, batch_size=32, epochs=3, seed=3, train_subset=150, unlabelled=400,
                       temperature=3.0, alpha=0.3)
    reference = _reference_training(config, digits, teacher.targets.logits)
    result = run(config, digits, teacher.targets)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(result.student.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # As many images an epoch as the labelled subset: the same steps as without the transfer set.
    for row in result.history:
        assert round(row["samples_per_s"] * row["epoch_time_s"]) == 150


def test_a_hard_label_run_ignores_the_transfer_set(digits) -> None:
    config = RunConfig(width=16, alpha=1.0, lr=1e-2, batch_size=32, epochs=2, seed=0, train_subset=150)
    plain = run(config, digits)
    with_set = run(config.replace(unlabelled="all"), digits)
    for name, tensor in plain.student.state_dict().items():
        assert torch.equal(with_set.student.state_dict()[name], tensor), name


def test_score_pool_leaves_out_the_unlabelled_images_too(digits, teacher) -> None:
    config = RunConfig(width=16, alpha=0.5, lr=1e-2, batch_size=32, epochs=1, seed=0, train_subset=150,
                       unlabelled=500, score_pool=True)
    assert run(config, digits, teacher.targets).metrics["pool_n"] == len(digits.train) - 650
    # A hard-label run (a race's baseline) trains without those images but scores on the same
    # pool, so that every contender of a --score-pool race is scored on the same images.
    assert run(config.replace(alpha=1.0), digits).metrics["pool_n"] == len(digits.train) - 650


def test_a_transfer_set_lifts_a_student_with_few_labels(digits, teacher) -> None:
    # 50 labelled images and 200 epochs of them (400 steps): the teacher's soft targets on the
    # other ~1,000 training images carry what 50 labels cannot. Measured (4 seeds): KD without
    # the transfer set 0.890 (hard labels alone 0.697), with it 0.944, ahead on every seed; the
    # margin below is set well under that gap. (With 40 epochs of 150 images both score 0.91:
    # a student limited by its steps rather than its images gains nothing from more images.)
    def accuracy(unlabelled, seed: int) -> float:
        config = RunConfig(family="mlp", width=16, model_options={"depth": 2}, temperature=4.0, alpha=0.1,
                           lr=1e-2, batch_size=32, epochs=200, seed=seed, train_subset=50, unlabelled=unlabelled)
        return run(config, digits, teacher.targets).metrics["val_acc"]

    seeds = range(4)
    without = [accuracy(None, seed) for seed in seeds]
    with_set = [accuracy("all", seed) for seed in seeds]
    assert statistics.mean(with_set) > statistics.mean(without) + 0.03, (without, with_set)
    assert all(w > o for w, o in zip(with_set, without)), (without, with_set)


# ---------------------------------------------------------------- through the CLI


@pytest.mark.ray
def test_a_search_with_a_transfer_set_end_to_end(ray_session, tmp_path) -> None:
    from click.testing import CliRunner

    from conftest import TINY_SPEC, write_spec
    from kdtune.cli import main
    from kdtune.study import load_records

    spec = {**TINY_SPEC, "study": "transfer", "num_samples": 2, "early_stopping": {"rule": "none"},
            "data": {"dataset": "digits", "train_subset": 150, "unlabelled": 400},
            "space": {**TINY_SPEC["space"], "width": 8, "epochs": 2}}
    results = tmp_path / "r"
    outcome = CliRunner().invoke(main, ["search", str(write_spec(tmp_path, spec)), "--results", str(results)])
    assert outcome.exit_code == 0, outcome.output
    study = results / "transfer"
    searched = load_records(study, "search").values()
    assert searched and all(r["config"]["unlabelled"] == 400 for r in searched)
    # Every distilled epoch is as many images as the labelled subset; the baseline (hard labels) ignores the set.
    history = pd.read_parquet(study / "history.parquet")
    seen = (history["samples_per_s"] * history["epoch_time_s"]).round()
    assert (seen == 150).all(), seen.tolist()
    # --full-data reads every label: the transfer set goes with the subset.
    full = CliRunner().invoke(main, ["evaluate", str(study), "--full-data", "--epochs", "1", "--seeds", "1",
                                     "--workers", "1"])
    assert full.exit_code == 0, full.output
    runs = read_csv_table(study / "final_full_runs.csv")
    assert len(runs) >= 2 and (runs["status"] == "completed").all()
