"""Distillation losses checked against formulas written out here, not against kdtune's own code.

Convention under test: ``α·CE + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·feature``
(batchmean KL, T² always applied), and ``logit_mse = mean_n Σ_c (ẑ_s − ẑ_t)²/(2C)``.
The fused form the training loop uses on cached logits (``fused_kd_loss_and_grad``) is
checked against the same formulas, and its gradient against autograd through
``distillation_loss`` bit for bit: that is what keeps training results unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import ConfigError
from kdtune.losses import (
    distillation_loss,
    feature_matching_loss,
    fused_kd_loss_and_grad,
    kd_log_targets,
    kd_loss_weights,
    kl_soft_loss,
    logit_mse_loss,
    perturb_teacher_logits,
    soft_targets,
)

N, C = 16, 10
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0]


def _logits(seed: int, n: int = N, c: int = C, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    # Written out (max-shifted exp / sum) so the expectation does not reuse F.softmax.
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _hand_soft_term(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·Σ_n Σ_c p_t (log p_t − log p_s) / N with p_s = softmax(s/T)."""
    p_s = _softmax(student / temperature)
    per_sample = (teacher_probs * (torch.log(teacher_probs) - torch.log(p_s))).sum(dim=-1)
    return temperature**2 * per_sample.sum() / student.shape[0]


# ---------------------------------------------------------------- hard-label term


def test_alpha_one_is_cross_entropy_and_needs_no_teacher() -> None:
    student, labels = _logits(0), torch.arange(N) % C
    loss = distillation_loss(student, None, labels, temperature=4.0, alpha=1.0)
    by_hand = -torch.log(_softmax(student))[torch.arange(N), labels].mean()
    assert loss.item() == pytest.approx(F.cross_entropy(student.float(), labels).item(), rel=1e-6)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_alpha_one_ignores_teacher_logits() -> None:
    student, teacher, labels = _logits(0), _logits(1), torch.arange(N) % C
    with_teacher = distillation_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    assert with_teacher.item() == pytest.approx(F.cross_entropy(student.float(), labels).item(), rel=1e-6)


# ---------------------------------------------------------------- soft term


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_term_is_zero_for_equal_logits(temperature: float) -> None:
    logits = _logits(2)
    assert kl_soft_loss(logits, logits.clone(), temperature).item() == pytest.approx(0.0, abs=1e-5)
    labels = torch.zeros(N, dtype=torch.long)
    assert distillation_loss(logits, logits.clone(), labels, temperature, alpha=0.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_term_at_alpha_zero_matches_hand_formula(temperature: float) -> None:
    student, teacher, labels = _logits(3), _logits(4), torch.arange(N) % C
    expected = _hand_soft_term(student, _softmax(teacher / temperature), temperature)
    loss = distillation_loss(student, teacher, labels, temperature, alpha=0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7])
def test_mixed_loss_weights_hard_and_soft_terms(alpha: float) -> None:
    temperature = 3.0
    student, teacher, labels = _logits(5), _logits(6), (torch.arange(N) * 3) % C
    hard = -torch.log(_softmax(student))[torch.arange(N), labels].mean()
    soft = _hand_soft_term(student, _softmax(teacher / temperature), temperature)
    loss = distillation_loss(student, teacher, labels, temperature, alpha)
    assert loss.item() == pytest.approx((alpha * hard + (1 - alpha) * soft).item(), rel=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_soft_gradient_is_probability_difference_times_t_over_n(temperature: float) -> None:
    student = _logits(7).float().requires_grad_(True)
    teacher = _logits(8).float()
    loss = distillation_loss(student, teacher, torch.zeros(N, dtype=torch.long), temperature, alpha=0.0)
    (grad,) = torch.autograd.grad(loss, student)
    expected = (_softmax(student.detach() / temperature) - _softmax(teacher / temperature)) * temperature / N
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- logit_mse


def _zero_meaned(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=-1, keepdim=True)


def test_logit_mse_matches_written_formula() -> None:
    student, teacher = _logits(9), _logits(10)
    diff = _zero_meaned(student) - _zero_meaned(teacher)
    expected = (diff**2).sum(dim=-1).mean() / (2 * C)
    assert logit_mse_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    labels = torch.zeros(N, dtype=torch.long)
    via_loss = distillation_loss(student, teacher, labels, 7.0, alpha=0.0, soft_loss_kind="logit_mse")
    assert via_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_t_squared_kl_approaches_logit_mse_at_large_temperature() -> None:
    # Hinton et al. (2015) §2.1: for T ≫ |logits| and zero-meaned logits, T²·KL → Σ(z_s − z_t)²/(2C).
    student = _zero_meaned(_logits(11, scale=2.0))
    teacher = _zero_meaned(_logits(12, scale=2.0))
    target = logit_mse_loss(student, teacher).item()
    errors = []
    for temperature in (50.0, 100.0, 200.0):
        # float64 so that the tiny KL at T=200 is not lost to rounding.
        p_t = _softmax(teacher / temperature)
        t2_kl = _hand_soft_term(student, p_t, temperature).item()
        # kdtune computes in float32, which costs a few 1e-4 of relative precision here.
        assert kl_soft_loss(student, teacher, temperature).item() == pytest.approx(t2_kl, rel=2e-3)
        errors.append(abs(t2_kl - target) / target)
    # The gap is O(1/T): about halved each time T doubles.
    assert errors[0] < 0.01
    assert errors[1] < 0.6 * errors[0]
    assert errors[2] < 0.6 * errors[1]
    assert errors[2] < 0.003


def test_logit_mse_is_invariant_to_constant_shifts() -> None:
    student, teacher = _logits(13), _logits(14)
    base = logit_mse_loss(student, teacher).item()
    shift = torch.linspace(-50, 50, N, dtype=torch.float64).unsqueeze(1)  # a different constant per row
    assert logit_mse_loss(student + shift, teacher).item() == pytest.approx(base, rel=1e-5)
    assert logit_mse_loss(student, teacher - 7.5).item() == pytest.approx(base, rel=1e-5)
    # KL over softmax is shift-invariant too; a scale change is not (sanity check of the test).
    assert logit_mse_loss(2 * student, teacher).item() != pytest.approx(base, rel=1e-3)


# ---------------------------------------------------------------- noisy teacher


def test_zero_noise_leaves_teacher_logits_identical() -> None:
    teacher = _logits(15).float()
    out = perturb_teacher_logits(teacher, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, teacher)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_noise_has_requested_std_and_zero_mean(sigma: float) -> None:
    teacher = torch.randn(400, 50, generator=torch.Generator().manual_seed(1))
    out = perturb_teacher_logits(teacher, sigma, torch.Generator().manual_seed(2))
    delta = out - teacher
    assert not torch.equal(out, teacher)
    # 20,000 draws: the std estimate is within ~1% of σ, the mean within ~σ/140.
    assert delta.std().item() == pytest.approx(sigma, rel=0.03)
    assert abs(delta.mean().item()) < 0.03 * sigma


def test_seeded_noise_is_reproducible_and_seed_dependent() -> None:
    teacher = _logits(16).float()
    first = perturb_teacher_logits(teacher, 0.3, torch.Generator().manual_seed(42))
    again = perturb_teacher_logits(teacher, 0.3, torch.Generator().manual_seed(42))
    other = perturb_teacher_logits(teacher, 0.3, torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_noise_drawn_into_a_buffer_is_the_same_noise() -> None:
    teacher = _logits(17).float()
    fresh = perturb_teacher_logits(teacher, 0.4, torch.Generator().manual_seed(9))
    buffer = torch.full_like(teacher, 123.0)
    reused = perturb_teacher_logits(teacher, 0.4, torch.Generator().manual_seed(9), out=buffer)
    expected = teacher + 0.4 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(fresh, expected)
    assert torch.equal(reused, expected)
    assert reused.data_ptr() == buffer.data_ptr()  # drawn in place, no new tensor
    assert torch.equal(teacher, _logits(17).float())  # the teacher's logits are left alone


def test_negative_noise_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        perturb_teacher_logits(_logits(0), -0.1)
    assert info.value.field == "noise"


# ---------------------------------------------------------------- several teachers


def test_single_stacked_teacher_equals_single_teacher() -> None:
    student, teacher, labels = _logits(17), _logits(18), torch.arange(N) % C
    for kind in ("kl", "logit_mse"):
        single = distillation_loss(student, teacher, labels, 3.0, 0.2, soft_loss_kind=kind)
        stacked = distillation_loss(student, teacher.unsqueeze(0), labels, 3.0, 0.2, soft_loss_kind=kind)
        assert stacked.item() == pytest.approx(single.item(), rel=1e-6)


def test_two_teachers_average_probabilities_not_logits() -> None:
    temperature = 2.0
    student, t1, t2 = _logits(19), _logits(20), _logits(21)
    averaged_probs = (_softmax(t1 / temperature) + _softmax(t2 / temperature)) / 2
    softmax_of_mean = _softmax((t1 + t2) / 2 / temperature)
    # The two candidate definitions really differ on these logits, so the test can tell them apart.
    assert (averaged_probs - softmax_of_mean).abs().max().item() > 0.05

    stacked = torch.stack([t1, t2])
    torch.testing.assert_close(soft_targets(stacked, temperature).double(), averaged_probs, rtol=1e-5, atol=1e-6)
    expected = _hand_soft_term(student, averaged_probs, temperature)
    assert kl_soft_loss(student, stacked, temperature).item() == pytest.approx(expected.item(), rel=1e-4)
    wrong = _hand_soft_term(student, softmax_of_mean, temperature)
    assert kl_soft_loss(student, stacked, temperature).item() != pytest.approx(wrong.item(), rel=1e-3)


def test_two_teachers_logit_mse_matches_mean_logits() -> None:
    student, t1, t2 = _logits(22), _logits(23), _logits(24)
    diff = _zero_meaned(student) - _zero_meaned((t1 + t2) / 2)
    expected = (diff**2).sum(dim=-1).mean() / (2 * C)
    assert logit_mse_loss(student, torch.stack([t1, t2])).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- feature term


def test_feature_loss_is_mse_for_vectors() -> None:
    g = torch.Generator().manual_seed(25)
    student, teacher = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    expected = ((student - teacher) ** 2).sum() / student.numel()
    assert feature_matching_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_larger_student_map_is_average_pooled_to_teacher_size() -> None:
    g = torch.Generator().manual_seed(26)
    student, teacher = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    pooled = student.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 blocks, by hand
    expected = ((pooled - teacher) ** 2).mean()
    assert feature_matching_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_beta_adds_weighted_feature_loss() -> None:
    student, teacher, labels = _logits(27), _logits(28), torch.arange(N) % C
    without = distillation_loss(student, teacher, labels, 4.0, 0.5)
    feature = torch.tensor(0.8, dtype=torch.float64)
    with_feature = distillation_loss(student, teacher, labels, 4.0, 0.5, beta=0.25, feature_loss=feature)
    assert with_feature.item() == pytest.approx(without.item() + 0.25 * 0.8, rel=1e-6)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -1.0, "feature_loss": torch.tensor(1.0)}, "beta"),
        ({"soft_loss_kind": "cosine"}, "soft_loss"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    args = {"temperature": 4.0, "alpha": 0.5} | kwargs
    temperature, alpha = args.pop("temperature"), args.pop("alpha")
    with pytest.raises(ConfigError) as info:
        distillation_loss(_logits(0), _logits(1), torch.zeros(N, dtype=torch.long), temperature, alpha, **args)
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_teacher_or_feature_loss_is_a_config_error() -> None:
    labels = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ConfigError) as info:
        distillation_loss(_logits(0), None, labels, 4.0, 0.5)
    assert info.value.field == "alpha"
    with pytest.raises(ConfigError) as info:
        distillation_loss(_logits(0), _logits(1), labels, 4.0, 0.5, beta=0.5)
    assert info.value.field == "beta"


# ---------------------------------------------------------------- fused form (the training loop's)


def _fused_batch(teacher_all, labels_all, index, temperature, alpha):
    """The batch's rows of the per-run tables, built on the whole split as the training loop builds them."""
    probs = soft_targets(teacher_all, temperature)
    weights = kd_loss_weights(probs, labels_all, temperature, alpha, len(index))
    return weights[index], kd_log_targets(probs)[index]


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.7, 10.0])
def test_fused_loss_matches_hand_formula_and_distillation_loss_gradient_bit_for_bit(
    temperature: float, alpha: float, teachers: int
) -> None:
    g = torch.Generator().manual_seed(int(10 * temperature) + int(10 * alpha) + teachers)
    n_all, batch = 60, 13
    teacher_all = 3.0 * torch.randn(teachers, n_all, C, generator=g)
    if teachers == 1:
        teacher_all = teacher_all[0]
    labels_all = torch.randint(0, C, (n_all,), generator=g)
    index = torch.randperm(n_all, generator=g)[:batch]
    student = (3.0 * torch.randn(batch, C, generator=g)).requires_grad_(True)
    labels = labels_all[index]
    teacher = teacher_all.index_select(teacher_all.dim() - 2, index)

    value, grad = fused_kd_loss_and_grad(student, *_fused_batch(teacher_all, labels_all, index, temperature, alpha),
                                         temperature)

    # The loss and its gradient written out, in float64.
    s64 = student.detach().double()
    p_t = _softmax(teacher.double() / temperature)
    if teachers > 1:
        p_t = p_t.mean(dim=0)
    hard = -torch.log(_softmax(s64))[torch.arange(batch), labels].mean()
    expected = alpha * hard + (1 - alpha) * _hand_soft_term(s64, p_t, temperature)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    onehot = torch.zeros(batch, C, dtype=torch.float64)
    onehot[torch.arange(batch), labels] = 1.0
    expected_grad = (alpha * (_softmax(s64) - onehot)
                     + (1 - alpha) * temperature * (_softmax(s64 / temperature) - p_t)) / batch
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)

    # What training used before: autograd through distillation_loss. Same value up to rounding,
    # and the very same gradient, so that a run takes exactly the same steps.
    reference = distillation_loss(student, teacher, labels, temperature, alpha)
    (reference_grad,) = torch.autograd.grad(reference, student)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert torch.equal(grad, reference_grad)
    assert student.grad is None  # no autograd graph was built


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_fused_weights_are_the_scaled_labels_and_soft_targets(batch: int) -> None:
    temperature, alpha = 2.5, 0.4
    teacher, labels = _logits(30, n=40).float(), torch.arange(40) % C
    probs = soft_targets(teacher, temperature)
    weights = kd_loss_weights(probs, labels, temperature, alpha, batch)
    assert weights.shape == (40, 2, C)
    onehot = torch.zeros(40, C)
    onehot[torch.arange(40), labels] = 1.0
    torch.testing.assert_close(weights[:, 0], -alpha / batch * onehot, rtol=1e-6, atol=0)
    torch.testing.assert_close(weights[:, 1], -(1 - alpha) * temperature**2 / batch * probs, rtol=1e-6, atol=0)
    torch.testing.assert_close(kd_log_targets(probs), torch.log(probs), rtol=1e-6, atol=0)


def test_fused_loss_with_soft_targets_that_underflow_to_zero_is_finite() -> None:
    # At T = 1 a 200-logit lead leaves every other class a probability of exactly 0 in float32;
    # KL takes 0·log 0 = 0, so the soft term is −log q_0 and the loss stays finite.
    temperature, alpha = 1.0, 0.25
    teacher_all = torch.zeros(20, C)
    teacher_all[:, 0] = 200.0
    labels_all = torch.arange(20) % C
    assert (soft_targets(teacher_all, temperature) == 0).sum() == 20 * (C - 1)
    index = torch.arange(8)
    student = _logits(31, n=8).float().requires_grad_(True)
    value, grad = fused_kd_loss_and_grad(student, *_fused_batch(teacher_all, labels_all, index, temperature, alpha),
                                         temperature)
    log_q = torch.log(_softmax(student.detach().double()))
    expected = alpha * -log_q[torch.arange(8), labels_all[:8]].mean() + (1 - alpha) * -log_q[:, 0].mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    reference = distillation_loss(student, teacher_all[index], labels_all[index], temperature, alpha)
    assert torch.equal(grad, torch.autograd.grad(reference, student)[0])


def test_fused_loss_of_nan_teacher_logits_is_nan() -> None:
    # The training loop stops a run as diverged on a non-finite loss value.
    teacher_all = torch.full((20, C), math.nan)
    index = torch.arange(8)
    value, _ = fused_kd_loss_and_grad(_logits(32, n=8).float(),
                                      *_fused_batch(teacher_all, torch.arange(20) % C, index, 4.0, 0.5), 4.0)
    assert math.isnan(value.item())
