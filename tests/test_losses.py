"""Distillation losses checked against formulas written out here, not against kdtune's own code.

Convention under test: ``α·CE + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·feature``
(batchmean KL, T² always applied), and ``logit_mse = mean_n Σ_c (ẑ_s − ẑ_t)²/(2C)``.
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
