"""DKD, DIST and logit standardization checked against the papers' equations written out here,
and their fused forms on cached teacher logits (kdtune.core.method_cache) against autograd.

- DKD (Zhao et al. 2022): b = (p_y, 1 − p_y), p̂_c = p_c / (1 − p_y) for c ≠ y;
  TCKD = KL(b_t ‖ b_s), NCKD = KL(p̂_t ‖ p̂_s); per sample KL(p_t ‖ p_s) = TCKD + (1 − p_y)·NCKD.
- DIST (Huang et al. 2022): T²·(β·(1 − mean_n ρ(rows)) + γ·(1 − mean_c ρ(columns))) on softmax(·/T),
  ρ = Pearson (scipy.stats.pearsonr here).
- Logit standardization (Sun et al. 2024): (z − mean) / (unbiased std + 1e-7) per sample.
"""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from kdtune.errors import ConfigError
from kdtune.losses import dist_loss, dkd_loss, dkd_terms, standardize_logits
from kdtune.core.method_cache import CACHED_OBJECTIVES, CachedDIST, CachedDKD, CachedKD

N, C = 12, 7
TEMPERATURES = [1.0, 2.0, 4.0, 8.0]


def _logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    shape = shape or (N, C)
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(seed: int, n: int = N, c: int = C) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p / q) over the last dimension, 0·log 0 = 0."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p)).sum(dim=-1)


def _dkd_by_hand(student: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Per-sample (TCKD, NCKD, KD, p_y) from the paper's definitions, with summed probabilities (float64)."""
    p_s, p_t = _softmax(student / temperature), teacher_probs
    rows = torch.arange(len(labels))
    target = torch.zeros_like(p_s, dtype=torch.bool)
    target[rows, labels] = True
    b_s = torch.stack((p_s[rows, labels], p_s.masked_fill(target, 0).sum(-1)), dim=-1)
    b_t = torch.stack((p_t[rows, labels], p_t.masked_fill(target, 0).sum(-1)), dim=-1)
    hat_s = p_s.masked_fill(target, 0) / b_s[:, 1:]
    hat_t = p_t.masked_fill(target, 0) / b_t[:, 1:]
    return _kl(b_t, b_s), _kl(hat_t, hat_s), _kl(p_t, p_s), b_t[:, 0]


# ---------------------------------------------------------------- logit standardization


def test_standardized_logits_have_zero_mean_and_unit_unbiased_std_per_sample() -> None:
    logits = _logits(0, scale=5.0) + 40.0
    z = standardize_logits(logits).numpy()
    raw = logits.numpy()
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1, ddof=1), 1.0, rtol=1e-6)  # 1e-7 is added to the std
    expected = (raw - raw.mean(axis=1, keepdims=True)) / (raw.std(axis=1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(z, expected, rtol=1e-12)


def test_standardization_is_per_sample_for_several_teachers_and_keeps_the_dtype() -> None:
    stacked = _logits(1, 3, N, C).float()
    z = standardize_logits(stacked)
    assert z.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(z[k], standardize_logits(stacked[k]))
    # Invariant to a per-sample shift and positive scale of the logits.
    shifted = stacked[0] * 3.0 + torch.arange(N, dtype=torch.float32).unsqueeze(1)
    torch.testing.assert_close(standardize_logits(shifted), z[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- DKD


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_terms_follow_the_paper_and_decompose_kd_per_sample(temperature: float) -> None:
    student, teacher, labels = _logits(2), _logits(3), _labels(4)
    tckd, nckd = dkd_terms(student, teacher, labels, temperature)
    hand_tckd, hand_nckd, kd, p_y = _dkd_by_hand(student, _softmax(teacher / temperature), labels, temperature)
    torch.testing.assert_close(tckd, hand_tckd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(nckd, hand_nckd, rtol=1e-9, atol=1e-12)
    # The decomposition holds sample by sample ...
    torch.testing.assert_close(tckd + (1 - p_y) * nckd, kd, rtol=1e-9, atol=1e-12)
    # ... and not for batch means (the weight 1 − p_y differs from sample to sample).
    assert abs((tckd.mean() + (1 - p_y).mean() * nckd.mean() - kd.mean()).item()) > 1e-4


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 8.0), (0.0, 1.0), (2.0, 0.0), (0.5, 6.0)])
def test_dkd_loss_is_alpha_tckd_plus_beta_nckd_times_t_squared(alpha: float, beta: float) -> None:
    temperature = 4.0
    student, teacher, labels = _logits(5), _logits(6), _labels(7)
    hand_tckd, hand_nckd, _, _ = _dkd_by_hand(student, _softmax(teacher / temperature), labels, temperature)
    expected = temperature**2 * (alpha * hand_tckd.mean() + beta * hand_nckd.mean())
    loss = dkd_loss(student, teacher, labels, temperature, alpha, beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # float32 input is computed in float32
    assert dkd_loss(student.float(), teacher.float(), labels, temperature, alpha, beta).item() == pytest.approx(
        expected.item(), rel=1e-4)


def test_dkd_with_several_teachers_decomposes_their_mean_probabilities() -> None:
    temperature = 2.0
    student, teachers, labels = _logits(8), _logits(9, 3, N, C), _labels(10)
    mean_probs = _softmax(teachers / temperature).mean(dim=0)
    hand_tckd, hand_nckd, _, _ = _dkd_by_hand(student, mean_probs, labels, temperature)
    tckd, nckd = dkd_terms(student, teachers, labels, temperature)
    torch.testing.assert_close(tckd, hand_tckd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(nckd, hand_nckd, rtol=1e-9, atol=1e-12)


def _confident_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bfloat16 logits (exactly representable) whose non-target probabilities at T = 4 are about
    e^-100 ≈ 4e-44 for the student (below bfloat16's smallest subnormal, 9e-41) and e^-5 for the teacher."""
    student = torch.zeros(4, C)
    student[:, 0] = 400.0
    teacher = torch.zeros(4, C)
    teacher[:, 0] = 20.0
    teacher[:, 1] = torch.tensor([0.0, 2.0, 4.0, 8.0])
    return student.bfloat16(), teacher.bfloat16(), torch.zeros(4, dtype=torch.long)


def test_dkd_in_bfloat16_stays_finite_where_the_log_of_summed_probabilities_underflows() -> None:
    student, teacher, labels = _confident_case()
    temperature, alpha, beta = 4.0, 1.0, 8.0
    # The naive form (mdistiller's): softmax, sum the non-target probabilities, take the log.
    p_s = F.softmax(student / temperature, dim=1)
    naive_rest = p_s[:, 1:].sum(dim=1)
    assert (naive_rest == 0).all() and torch.isinf(torch.log(naive_rest)).all()
    # In float64 the same numbers are representable: the expectation.
    hand_tckd, hand_nckd, _, _ = _dkd_by_hand(student.double(), _softmax(teacher.double() / temperature), labels,
                                               temperature)
    expected = temperature**2 * (alpha * hand_tckd.mean() + beta * hand_nckd.mean())
    loss = dkd_loss(student, teacher, labels, temperature, alpha, beta)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # The fused form too, with a finite gradient.
    cache = CachedDKD(teacher.float(), labels, alpha=alpha, beta=beta, ce_weight=1.0)
    fused, grad = cache.loss_and_grad(student, torch.arange(4), temperature)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    ce = F.cross_entropy(student.double(), labels)
    assert fused.item() == pytest.approx((ce + expected).item(), rel=1e-4)


# ---------------------------------------------------------------- DIST


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_dist_matches_scipy_pearson_per_sample_and_per_class(temperature: float, beta: float, gamma: float) -> None:
    student, teacher = _logits(11), _logits(12)
    y_s = _softmax(student / temperature).numpy()
    y_t = _softmax(teacher / temperature).numpy()
    inter = np.mean([pearsonr(y_s[n], y_t[n])[0] for n in range(N)])
    intra = np.mean([pearsonr(y_s[:, c], y_t[:, c])[0] for c in range(C)])
    expected = temperature**2 * (beta * (1 - inter) + gamma * (1 - intra))
    # DIST adds 1e-8 to the product of the norms: a relative change of about 1e-7 here.
    assert dist_loss(student, teacher, temperature, beta, gamma).item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dist_is_zero_for_identical_logits(temperature: float) -> None:
    logits = _logits(13)
    # Zero but for DIST's 1e-8 guard: ρ = ‖a‖² / (‖a‖² + 1e-8) for a centred row a of y = softmax(logits / T).
    y = _softmax(logits / temperature)
    rows = ((y - y.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)
    columns = ((y - y.mean(dim=0, keepdim=True)) ** 2).sum(dim=0)
    guard = temperature**2 * ((1e-8 / (rows + 1e-8)).mean() + (1e-8 / (columns + 1e-8)).mean())
    loss = dist_loss(logits, logits.clone(), temperature, 1.0, 1.0)
    assert loss.item() == pytest.approx(guard.item(), rel=1e-6) and loss.item() < 1e-3
    # and positive otherwise
    assert dist_loss(logits, _logits(14), temperature, 1.0, 1.0).item() > 0.01


def test_dist_with_two_copies_of_one_teacher_is_that_teacher() -> None:
    # Several teachers' probabilities are averaged: two copies of one teacher are that teacher.
    student, teacher = _logits(15), _logits(16)
    single = dist_loss(student, teacher, 4.0, 1.0, 1.0)
    doubled = dist_loss(student, torch.stack((teacher, teacher)), 4.0, 1.0, 1.0)
    assert doubled.item() == pytest.approx(single.item(), rel=1e-12)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(("call", "field"), [
    (lambda s, t, y: dkd_loss(s, t, y, 4.0, -1.0, 8.0), "dkd_alpha"),
    (lambda s, t, y: dkd_loss(s, t, y, 4.0, 1.0, -8.0), "dkd_beta"),
    (lambda s, t, y: dkd_loss(s, t, y, 0.0, 1.0, 8.0), "temperature"),
    (lambda s, t, y: dist_loss(s, t, 4.0, -1.0, 1.0), "dist_beta"),
    (lambda s, t, y: dist_loss(s, t, 4.0, 1.0, -1.0), "dist_gamma"),
    (lambda s, t, y: CachedDKD(t, y, alpha=-1.0), "dkd_alpha"),
    (lambda s, t, y: CachedDIST(t, y, gamma=-1.0), "dist_gamma"),
    (lambda s, t, y: CachedKD(t, y, ce_weight=-0.1), "ce_weight"),
    (lambda s, t, y: CachedKD(t[0], y), "teacher_logits"),
    (lambda s, t, y: CachedKD(t[:-1], y), "teacher_logits"),
    (lambda s, t, y: CachedKD(t, y).loss_and_grad(s, torch.arange(N), 0.0), "temperature"),
])
def test_bad_values_raise_config_error_naming_the_field(call, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        call(_logits(17), _logits(18), _labels(19))
    assert info.value.field == field


# ---------------------------------------------------------------- the fused forms on cached logits


def _kd_by_hand(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    p_t = _softmax(teacher / temperature)
    return temperature**2 * _kl(p_t, _softmax(student / temperature)).mean()


#: method → (cached class, its hyperparameters, the reference term M(u, t, y, T) with autograd)
METHODS = {
    "kd": (CachedKD, {}, _kd_by_hand),
    "dkd": (CachedDKD, {"alpha": 1.5, "beta": 6.0}, lambda u, t, y, T: dkd_loss(u, t, y, T, 1.5, 6.0)),
    "dist": (CachedDIST, {"beta": 2.0, "gamma": 0.5}, lambda u, t, y, T: dist_loss(u, t, T, 2.0, 0.5)),
}


def _reference(method: str, student, teacher, labels, temperature, ce_weight, weight, standardize):
    _, _, term = METHODS[method]
    u = standardize_logits(student) if standardize else student
    t = standardize_logits(teacher) if standardize else teacher
    return ce_weight * F.cross_entropy(student, labels) + weight * term(u, t, labels, temperature)


def _cache(method: str, teacher, labels, **kwargs):
    cls, hyper, _ = METHODS[method]
    return cls(teacher, labels, **hyper, **kwargs)


def test_every_method_has_a_cached_objective() -> None:
    assert set(CACHED_OBJECTIVES) == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("ce_weight", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_fused_loss_and_gradient_match_autograd_through_the_reference(method: str, standardize: bool,
                                                                      ce_weight: float, arrays: str) -> None:
    # "torch" is the code path of a GPU (the same arithmetic on tensors), checked here on the CPU.
    temperature, weight, total = 3.0, 0.7, 40
    teacher, labels = _logits(20, total, C), _labels(21, total)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(22))[:N]
    student = _logits(23).requires_grad_(True)
    cache = _cache(method, teacher, labels, ce_weight=ce_weight, standardize=standardize, arrays=arrays)
    loss, grad = cache.loss_and_grad(student, idx, temperature, weight)
    assert not loss.requires_grad
    expected = _reference(method, student, teacher[idx], labels[idx], temperature, ce_weight, weight, standardize)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


class _Fused(torch.autograd.Function):
    """The fused loss as an autograd function whose backward is the hand-written gradient."""

    @staticmethod
    def forward(ctx, student, cache, idx, temperature, weight):
        loss, grad = cache.loss_and_grad(student, idx, temperature, weight)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return upstream * grad, None, None, None, None


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_hand_written_gradient_passes_gradcheck(method: str, standardize: bool, arrays: str) -> None:
    teacher, labels = _logits(24, 9, 5, scale=2.0), _labels(25, 9, 5)
    cache = _cache(method, teacher, labels, ce_weight=0.3, standardize=standardize, arrays=arrays)
    idx = torch.tensor([4, 0, 7, 2, 8, 3])
    student = _logits(26, 6, 5, scale=2.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: _Fused.apply(s, cache, idx, 2.0, 1.3), (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", list(METHODS))
def test_several_cached_teachers_match_the_reference(method: str) -> None:
    total = 30
    teachers, labels = _logits(27, 3, total, C), _labels(28, total)
    idx = torch.arange(5, 5 + N)
    student = _logits(29).requires_grad_(True)
    cache = _cache(method, teachers, labels, ce_weight=0.5)
    loss, grad = cache.loss_and_grad(student, idx, 2.0, 1.0)
    if method == "kd":  # KD's reference with several teachers: their averaged soft targets
        p = _softmax(teachers[:, idx] / 2.0).mean(dim=0)
        expected = 0.5 * F.cross_entropy(student, labels[idx]) + 4.0 * _kl(p, _softmax(student / 2.0)).mean()
    else:
        expected = _reference(method, student, teachers[:, idx], labels[idx], 2.0, 0.5, 1.0, False)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


def _cached_case(seed: int, start: int = 0, total: int = 30):
    """Teacher logits and labels of ``total`` training samples, a batch of N of them from ``start``, and student logits."""
    return _logits(seed, total, C), _labels(seed + 1, total), torch.arange(start, start + N), _logits(seed + 2)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_temperature_schedule_uses_the_table_of_the_current_temperature(method: str) -> None:
    teacher, labels, idx, student = _cached_case(30)
    cache = _cache(method, teacher, labels, ce_weight=0.2, keep=2)
    schedule = [4.0, 3.0, 2.0, 3.0, 4.0, 1.0]  # revisits a kept T, an evicted T, then a new one
    for temperature in schedule:
        loss, grad = cache.loss_and_grad(student, idx, temperature)
        fresh = _cache(method, teacher, labels, ce_weight=0.2)
        fresh_loss, fresh_grad = fresh.loss_and_grad(student, idx, temperature)
        expected = _reference(method, student.clone().requires_grad_(True), teacher[idx], labels[idx], temperature,
                              0.2, 1.0, False)
        assert loss.item() == fresh_loss.item() == pytest.approx(expected.item(), rel=1e-10)
        torch.testing.assert_close(grad, fresh_grad, rtol=0, atol=0)
        assert len(cache.tables) <= 2 and next(reversed(cache.tables)) == temperature
    assert list(cache.tables) == [4.0, 1.0]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_per_step_teacher_logits_replace_the_cache(method: str, standardize: bool, arrays: str) -> None:
    # What the loop passes with logit noise: the batch's noisy teacher logits.
    teacher, labels, idx, student = _cached_case(33, start=3)
    noisy = teacher[idx] + 0.5 * _logits(36)
    cache = _cache(method, teacher, labels, ce_weight=0.4, standardize=standardize, arrays=arrays)
    loss, grad = cache.loss_and_grad(student, idx, 2.0, 0.9, teacher_logits=noisy)
    expected = _reference(method, student.clone().requires_grad_(True), noisy, labels[idx], 2.0, 0.4, 0.9, standardize)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    replaced = teacher.clone()
    replaced[idx] = noisy
    _, rebuilt_grad = _cache(method, replaced, labels, ce_weight=0.4, standardize=standardize).loss_and_grad(
        student, idx, 2.0, 0.9)
    torch.testing.assert_close(grad, rebuilt_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_float32_fused_step_is_close_to_float64(method: str, arrays: str) -> None:
    teacher, labels, idx, student = _cached_case(37)
    exact, exact_grad = _cache(method, teacher, labels, ce_weight=1.0).loss_and_grad(student, idx, 4.0)
    cache32 = _cache(method, teacher.float(), labels, ce_weight=1.0, arrays=arrays)
    loss, grad = cache32.loss_and_grad(student.float(), idx, 4.0)
    assert cache32.table(4.0).dtype == torch.float32 and grad.dtype == torch.float32
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("standardize", [False, True])
def test_float32_logits_beyond_the_range_of_exp_give_the_float64_answer(method: str, standardize: bool) -> None:
    # NumPy's fast path exponentiates centred logits without a row maximum: a row 200 above its
    # mean overflows float32's exp (above about 88) there, and the step is computed again with the
    # row maxima. Without that the loss and gradient would be NaN.
    teacher, labels, idx, student = _cached_case(38)
    student[0, 1] = 200.0
    student[3] = torch.linspace(-150.0, 150.0, C)
    exact, exact_grad = _cache(method, teacher, labels, ce_weight=0.5, standardize=standardize).loss_and_grad(
        student, idx, 1.0, 0.8)
    cache32 = _cache(method, teacher.float(), labels, ce_weight=0.5, standardize=standardize, arrays="numpy")
    loss, grad = cache32.loss_and_grad(student.float(), idx, 1.0, 0.8)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(exact.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-6)
    again, _ = cache32.loss_and_grad(_cached_case(38)[3].float(), idx, 1.0, 0.8)  # the fast path again
    assert math.isfinite(again.item())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_indices_as_a_numpy_array_select_the_same_rows_as_a_tensor(method: str, arrays: str) -> None:
    # The training loop hands NumPy's step the batch's index array as it is.
    teacher, labels = _logits(44, 40, C), _labels(45, 40)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(46))[:N]
    student, noisy = _logits(47), _logits(48)
    cache = _cache(method, teacher, labels, ce_weight=0.3, arrays=arrays)
    for teacher_logits in (None, noisy):
        by_tensor = cache.loss_and_grad(student, idx, 2.0, 0.6, teacher_logits=teacher_logits)
        by_array = cache.loss_and_grad(student, idx.numpy(), 2.0, 0.6, teacher_logits=teacher_logits)
        assert by_array[0].item() == by_tensor[0].item()
        assert torch.equal(by_array[1], by_tensor[1])
    # and the rows are the batch's: the same as a table holding only the batch's samples
    alone = _cache(method, teacher[idx], labels[idx], ce_weight=0.3, arrays=arrays)
    expected = alone.loss_and_grad(student, torch.arange(N), 2.0, 0.6)
    torch.testing.assert_close(cache.loss_and_grad(student, idx.numpy(), 2.0, 0.6)[1], expected[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 0.0), (0.0, 3.0), (1.0, 8.0)])
def test_cached_dkd_matches_dkd_loss_whatever_the_sign_of_its_non_target_weight(alpha: float, beta: float) -> None:
    # The fused form weights NCKD by c = β − α(1 − p_y), negative when β < α(1 − p_y).
    teacher, labels, idx, student = _cached_case(40)
    student.requires_grad_(True)
    loss, grad = CachedDKD(teacher, labels, alpha=alpha, beta=beta, ce_weight=0.0).loss_and_grad(student, idx, 3.0)
    expected = dkd_loss(student, teacher[idx], labels[idx], 3.0, alpha, beta)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


def test_the_step_computes_in_numpy_on_the_cpu_and_refuses_numpy_elsewhere() -> None:
    teacher, labels, idx, student = _cached_case(43)
    cache = CachedDIST(teacher, labels)
    assert cache.arrays == "numpy"
    _, grad = cache.loss_and_grad(student.float(), idx, 2.0)  # float32 logits, float64 teacher: float32 back
    assert grad.dtype == torch.float32
    with pytest.raises(ConfigError) as info:
        CachedKD(teacher, labels, device="cuda", arrays="numpy")  # refused before anything moves to the device
    assert info.value.field == "arrays" and "cuda" in str(info.value)
    with pytest.raises(ConfigError) as info:
        CachedKD(teacher, labels, arrays="jax")
    assert info.value.field == "arrays" and "numpy, torch" in str(info.value)


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_dist_with_fewer_samples_than_classes_matches_the_reference(arrays: str) -> None:
    # The fused DIST stacks the samples' rows and the classes' columns in one array as wide as the
    # larger of B and C: here the classes'.
    teacher, labels = _logits(44, 30, C), _labels(45, 30)
    idx, student = torch.tensor([3, 17, 9, 25]), _logits(46, 4, C).requires_grad_(True)
    cache = _cache("dist", teacher, labels, ce_weight=0.3, arrays=arrays)
    for _ in range(2):  # the second step reuses the first one's buffers
        loss, grad = cache.loss_and_grad(student, idx, 2.0, 1.1)
    expected = _reference("dist", student, teacher[idx], labels[idx], 2.0, 0.3, 1.1, False)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_diverged_student_gives_a_nan_loss_without_warnings(method: str) -> None:
    # What the training loop needs to report a diverged run: a non-finite loss, and no
    # floating-point warnings from the NumPy arithmetic on the way (torch gives none).
    import warnings

    teacher, labels, idx, student = _cached_case(47)
    student = student.float()
    student[0, 0] = float("inf")  # then inf − inf: NaN
    cache = _cache(method, teacher.float(), labels, ce_weight=0.5, standardize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = cache.loss_and_grad(student, idx, 2.0)
    assert cache.arrays == "numpy" and not math.isfinite(loss.item()) and not torch.isfinite(grad).all()
