"""Distillation losses as pure functions of tensors.

kdtune's one loss convention (α is the weight of the *hard-label* term)::

    loss = α·CE(student, labels) + (1 − α)·soft + β·feature

    soft = T²·KL(softmax(teacher/T) ‖ softmax(student/T))    (soft_loss="kl", batchmean)
    soft = mean_n Σ_c (ẑ_s − ẑ_t)² / (2C)                     (soft_loss="logit_mse")

An image whose label the student may not read (an unlabelled image of a transfer set,
``data.unlabelled``) has the label :data:`UNLABELLED` (−1): its cross-entropy is 0, the batch
mean still divides by the whole batch B (the loss is Σ over the batch's labelled images of
α·CE + Σ over all of its images of (1 − α)·soft, over B), and a method that splits on the
target class (DKD) takes the teacher's top class instead (:func:`fill_unlabelled`).

The T² factor is always applied to the KL term, α = 0 included, so that the soft
gradient keeps the same scale whatever T is (Hinton et al. 2015, §2). ``logit_mse``
matches zero-meaned logits ẑ; it is the large-T limit of T²·KL (Hinton §2.1) and
so does not depend on T. Several teachers are combined by averaging their soft
targets in probability space at temperature T.

Other tools differ: torchdistill drops T² at α = 0, RepDistiller/mdistiller weight
the soft term by its own α, TextBrewer applies no T². Translate with care.

Fused form (what the training loop uses on cached teacher logits). With
``s`` a sample's logits, ``p`` its soft targets and ``KL(p‖q) = Σ p (log p − log q)``,
the KL loss of a batch of B samples is::

    Σ_n −(α/B)·log_softmax(s_n)[y_n] − ((1 − α)·T²/B)·Σ_c p_nc (log_softmax(s_n / T)_c − log p_nc)

For a fixed T and B the weights (:func:`kd_loss_weights`) and ``log p``
(:func:`kd_log_targets`) depend only on the sample, so they are computed once per
run and indexed per batch. The weights are exactly the float32 gradient of the
loss with respect to the two log-softmaxes that autograd computes through
:func:`distillation_loss`, so :func:`fused_kd_loss_and_grad` gives the loss (up to
rounding) and the logits' gradient (bit for bit) in one log-softmax, one
log-softmax backward and one dot product, with no autograd graph: training takes
the same steps as with :func:`distillation_loss`, for a fraction of the per-step cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.core.objectives import LOSSES, Hyperparameter, check_values, loss_weights, register_objective
from kdtune.errors import ConfigError


#: The label of an image whose label the student may not read (see the module docstring).
UNLABELLED = -1


def fill_unlabelled(labels: Tensor, teacher_logits: Tensor) -> Tensor:
    """``labels`` with each :data:`UNLABELLED` entry replaced by the teacher's top class: the
    argmax of ``teacher_logits`` ``(N, C)`` (of their sum over teachers for ``(K, N, C)``).
    The target class of a method that splits on it (DKD) for an image without a label."""
    top = (teacher_logits.sum(dim=0) if teacher_logits.dim() == 3 else teacher_logits).argmax(dim=-1)
    return torch.where(labels >= 0, labels, top.to(labels.device))


def hard_label_onehot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``onehot(labels)`` ``(N, C)``, a row of zeros for an :data:`UNLABELLED` image (no cross-entropy)."""
    labels = labels.long()
    onehot = F.one_hot(labels.clamp(min=0), num_classes).to(dtype)
    return onehot * (labels >= 0).unsqueeze(-1).to(dtype)


def _check_hyperparameters(temperature: float, alpha: float, beta: float = 0.0) -> None:
    check_values(temperature=temperature, alpha=alpha, beta=beta)


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Soft targets ``softmax(teacher_logits / T)`` over the last dimension.

    ``teacher_logits`` is ``(N, C)`` for one teacher or ``(K, N, C)`` for K teachers,
    whose probabilities are averaged (probability space, same T) into ``(N, C)``.
    """
    _check_hyperparameters(temperature, 0.0)
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    if probs.dim() == 3:
        probs = probs.mean(dim=0)
    return probs


def kl_soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` with batchmean reduction."""
    targets = soft_targets(teacher_logits, temperature)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, targets, reduction="batchmean") * temperature**2


def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Squared distance between zero-meaned logits, ``mean_n Σ_c (ẑ_s − ẑ_t)² / (2C)``.

    Several teachers (``(K, N, C)``) are matched through their mean logits.
    """
    teacher = teacher_logits.float()
    if teacher.dim() == 3:
        teacher = teacher.mean(dim=0)
    student = student_logits.float()
    diff = (student - student.mean(dim=-1, keepdim=True)) - (teacher - teacher.mean(dim=-1, keepdim=True))
    return diff.pow(2).sum(dim=-1).mean() / (2 * student.shape[-1])


def _kl_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                  params: Mapping[str, Any]) -> Tensor:
    return kl_soft_loss(student_logits, teacher_logits, params["temperature"])


# Vanilla KD under both names: "kl" (kdtune's first name for it) and "kd" (the field's).
register_objective("kl", description="T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batchmean (vanilla KD)",
                   fused=True, cached="kd")(_kl_objective)
#: Published recipes are logit-only: no feature term, no logit noise.
_LOGITS_ONLY = {"beta": 0.0, "noise": 0.0}

register_objective("kd", description="vanilla KD, the same objective as kl", fused=True, cached="kd", recipes={
    # mdistiller's KD config (CE 0.1, KD 0.9, T 4), the RepDistiller setting of the CIFAR-100 tables.
    "kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False, **_LOGITS_ONLY},
    # logit-standardization-KD's KD + ls: base T 2, KD weight 9, CE weight 0.1.
    "kd+standardize": {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "standardize": True,
                       **_LOGITS_ONLY},
})(_kl_objective)


@register_objective("logit_mse", description="squared distance of zero-meaned logits (the large-T limit of T²·KL)")
def _logit_mse_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                         params: Mapping[str, Any]) -> Tensor:
    return logit_mse_loss(student_logits, teacher_logits)


def soft_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl",
    params: Mapping[str, Any] | None = None, labels: Tensor | None = None,
) -> Tensor:
    """The soft (teacher-matching) term of the objective ``kind`` registered in
    :data:`~kdtune.core.objectives.LOSSES` ("kl"/"kd", "logit_mse", "dkd", "dist", or a
    plugin's); ``params`` holds the objective's own hyperparameters, ``labels`` the
    batch's labels (DKD splits on the target class)."""
    try:
        objective = LOSSES.get(kind)
    except ConfigError as exc:
        raise ConfigError("soft_loss", str(exc).split(": ", 1)[-1]) from None
    return objective.soft_term(student_logits, teacher_logits, labels,
                               {**(params or {}), "temperature": temperature})


def feature_matching_loss(adapted_student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """MSE between student features (already passed through their adapter) and the teacher's.

    Feature maps of different spatial size are matched by average-pooling the
    student's map to the teacher's height and width.
    """
    student = adapted_student_features.float()
    teacher = teacher_features.float()
    if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    return F.mse_loss(student, teacher)


def perturb_teacher_logits(
    teacher_logits: Tensor,
    noise_std: float,
    generator: torch.Generator | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Teacher logits plus Gaussian noise of std ``noise_std`` (the "noisy teacher").

    ``noise_std == 0`` returns the input unchanged. Apply during training only. The
    noise is drawn on the CPU (so a seed gives the same noise on every device); ``out``,
    a contiguous CPU tensor of the logits' shape and dtype, receives the draw instead of
    a new allocation; on the CPU the result is then ``out`` itself, valid until its next use.
    """
    if noise_std < 0:
        raise ConfigError("noise", f"must be >= 0, got {noise_std}")
    if noise_std == 0:
        return teacher_logits
    if out is None:
        noise = torch.randn(teacher_logits.shape, generator=generator, dtype=teacher_logits.dtype, device="cpu")
    else:
        noise = torch.randn(teacher_logits.shape, generator=generator, out=out)
    noise.mul_(noise_std)
    # σ·ε + t is t + σ·ε bit for bit (IEEE addition commutes): the same numbers as ever.
    return noise.to(teacher_logits.device).add_(teacher_logits)


#: Floor of the log soft targets in the fused loss: where p = 0 its weight is 0 too,
#: and a finite floor keeps 0·(log q − log p) at 0 (the reference's xlogy(0, 0) = 0).
LOG_TARGET_FLOOR = -1e4


def kd_loss_scales(temperature: float, alpha: float, batch_size: int) -> tuple[Tensor, Tensor]:
    """The float32 scalars autograd gives ``∂/∂log_softmax(s)`` and ``∂/∂log_softmax(s/T)``
    in :func:`distillation_loss` on a batch of ``batch_size`` B: α/B (α·CE, mean) and
    (1 − α)·T²/B (T²·KL, batchmean), rounded op by op in autograd's order."""
    one = torch.ones((), dtype=torch.float32)
    return one * alpha / batch_size, one * (1 - alpha) * temperature**2 / batch_size


def kd_loss_weights(
    soft_targets_: Tensor, labels: Tensor, temperature: float, alpha: float, batch_size: int
) -> Tensor:
    """Per-sample weights ``(N, 2, C)`` of :func:`fused_kd_loss_and_grad` for batches of ``batch_size`` B.

    Row 0 is ``−(α/B)·onehot(labels)`` (0 for an :data:`UNLABELLED` image), the weight of ``log_softmax(s)``; row 1 is
    ``−((1 − α)·T²/B)·p_t``, that of ``log_softmax(s/T)``, with ``p_t`` the ``(N, C)``
    :func:`soft_targets` at the same ``temperature``. They are the gradient of the
    loss with respect to those log-probabilities, rounded exactly as autograd rounds
    them in :func:`distillation_loss`, so that the student's gradient is bit for bit
    the same.
    """
    _check_hyperparameters(temperature, alpha)
    hard, soft = kd_loss_scales(temperature, alpha, batch_size)
    targets = soft_targets_.float()
    onehot = hard_label_onehot(labels, targets.shape[-1], targets.dtype)
    return torch.stack((onehot * -hard, targets * -soft), dim=1)


def kd_log_targets(soft_targets_: Tensor) -> Tensor:
    """``log p_t`` ``(N, C)``, the companion of :func:`kd_loss_weights`, floored at
    :data:`LOG_TARGET_FLOOR` where ``p_t = 0``."""
    return soft_targets_.float().log().clamp_(min=LOG_TARGET_FLOOR)


def _autograd_log_softmax_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    """The gradient at the input of a last-dimension log-softmax whose output was ``output``:
    ``g − softmax·Σg``, the formula of PyTorch's own kernel."""
    return grad_output - output.exp() * grad_output.sum(dim=-1, keepdim=True)


def _private_log_softmax_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    return torch._log_softmax_backward_data(grad_output, output, -1, output.dtype)


def _private_kernel_works() -> bool:
    """Whether torch's private log-softmax backward exists with the signature used here and
    agrees with the formula: the kernel is what makes the fused gradient bit-for-bit
    autograd's, but it is private and may change or vanish in another torch release."""
    try:
        output = torch.log_softmax(torch.tensor([[0.5, -1.0, 2.0]]), dim=-1)
        grad = torch.tensor([[0.1, -0.2, 0.3]])
        return bool(torch.allclose(_private_log_softmax_backward(grad, output),
                                   _autograd_log_softmax_backward(grad, output), atol=1e-6))
    except (AttributeError, TypeError, RuntimeError):
        return False


#: The log-softmax backward the fused loss uses: torch's own kernel when it is there
#: and behaves (the same rounding as autograd), else the formula (equal up to rounding).
log_softmax_backward = _private_log_softmax_backward if _private_kernel_works() else _autograd_log_softmax_backward


def fused_kd_loss_and_grad(
    student_logits: Tensor, weights: Tensor, log_targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``α·CE + (1 − α)·T²·KL`` (batchmean) of one batch and its gradient with respect to
    ``student_logits``, computed without autograd: backpropagate with
    ``student_logits.backward(grad)``.

    ``weights`` ``(B, 2, C)`` and ``log_targets`` ``(B, C)`` are the batch's rows of
    :func:`kd_loss_weights` (built for this batch size B) and :func:`kd_log_targets`.
    The loss is ``Σ_n Σ_k ⟨w_nk, log_softmax(s_n / τ_k) − log_targets_nk⟩`` with
    ``τ = (1, T)`` and no log targets for k = 0: :func:`distillation_loss` with
    ``soft_loss_kind="kl"`` and ``β = 0``, equal up to float rounding. The gradient is
    bit for bit the one autograd computes through :func:`distillation_loss`: the
    weights are ``∂loss/∂log-probabilities``, and they go back through the same
    log-softmax backward kernel, the division by T and the sum of the two terms.
    """
    with torch.no_grad():
        student = student_logits.float()
        log_probs = torch.log_softmax(torch.stack((student, student / temperature), dim=1), dim=-1)
        hard, soft = log_softmax_backward(weights, log_probs).unbind(1)
        grad = hard + soft / temperature
        log_probs.select(1, 1).sub_(log_targets)
        loss = torch.dot(log_probs.view(-1), weights.reshape(-1))
    return loss, grad.to(student_logits.dtype)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    temperature: float,
    alpha: float,
    *,
    soft_loss_kind: str = "kl",
    beta: float = 0.0,
    feature_loss: Tensor | None = None,
    params: Mapping[str, Any] | None = None,
    unlabelled: bool | None = None,
) -> Tensor:
    """The full distillation loss, a scalar tensor.

    ``α·CE(student, labels) + (1 − α)·soft + β·feature_loss`` where ``soft`` is
    ``T²·KL`` (``soft_loss_kind="kl"``), ``logit_mse`` or another registered objective,
    whose own hyperparameters are in ``params``. When ``params`` sets ``ce_weight``
    and/or ``kd_weight`` they replace α and 1 − α (see
    :func:`~kdtune.core.objectives.loss_weights`); ``standardize`` z-scores the student's
    and teacher's logits before the objective (never before the cross-entropy). ``teacher_logits`` may be
    ``None`` only when ``α == 1`` (plain hard-label training). ``feature_loss`` is a
    precomputed :func:`feature_matching_loss`; it is required when ``β > 0``.
    A label :data:`UNLABELLED` marks an image without one: no cross-entropy (the mean still
    over the whole batch), and the teacher's top class as DKD's target (:func:`fill_unlabelled`).
    ``unlabelled`` says whether any label may be :data:`UNLABELLED`; None looks (a few µs a
    step, which the training loop saves by saying so: a run without a transfer set has none).
    """
    _check_hyperparameters(temperature, alpha, beta)
    settings = dict(params or {})
    ce_weight, kd_weight = loss_weights({**settings, "alpha": alpha})
    if unlabelled is None:
        unlabelled = bool((labels < 0).any())
    if ce_weight == 0:
        loss = student_logits.new_zeros(())
    elif unlabelled:  # Σ over the labelled images, over the whole batch
        loss = ce_weight * F.cross_entropy(student_logits.float(), labels, ignore_index=UNLABELLED,
                                           reduction="sum") / labels.shape[0]
    else:
        loss = ce_weight * F.cross_entropy(student_logits.float(), labels)
    if kd_weight > 0:
        if teacher_logits is None:
            raise ConfigError("alpha", f"alpha={alpha} (objective weight {kd_weight:g}) needs teacher logits")
        student, teacher = student_logits, teacher_logits
        if settings.get("standardize"):
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        targets = fill_unlabelled(labels, teacher) if unlabelled else labels
        loss = loss + kd_weight * soft_loss(student, teacher, temperature, soft_loss_kind, settings, targets)
    if beta > 0:
        if feature_loss is None:
            raise ConfigError("beta", f"beta={beta} > 0 needs a feature loss")
        loss = loss + beta * feature_loss
    return loss


# ---------------------------------------------------------------- logit-level methods (issue 18)
#
# Reference implementations with autograd. The training loop's fast path on cached
# teacher logits is kdtune.core.method_cache, checked against these functions.

#: Logit standardization's guard, added to the standard deviation (logit-standardization-KD's ``1e-7``).
STANDARDIZE_EPS = 1e-7
#: DIST's guard, added to the product of the two norms of its Pearson correlation (DIST_KD's ``eps=1e-8``).
DIST_EPS = 1e-8


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for float32 and narrower inputs (bfloat16, float16), float64 for float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ConfigError(name, f"must be >= 0, got {value}")


def standardize_logits(logits: Tensor) -> Tensor:
    """Per-sample z-score of the logits over the last (class) dimension:
    ``(z − mean(z)) / (std(z) + 1e-7)``, with torch's unbiased (C − 1) standard deviation.

    This is the "logit standardization" of Sun et al., *Logit Standardization in
    Knowledge Distillation* (CVPR 2024), exactly as their code (``normalize`` in
    sunshangquan/logit-standardization-KD) computes it; the paper's "base temperature"
    is the T applied after it. Works on ``(N, C)`` and ``(K, N, C)`` alike (each row on
    its own) and keeps the input's dtype.
    """
    std, mean = torch.std_mean(logits, dim=-1, keepdim=True)
    return (logits - mean) / (std + STANDARDIZE_EPS)


def teacher_log_probs(teacher_logits: Tensor, temperature: float) -> Tensor:
    """``log softmax(teacher_logits / T)`` ``(N, C)``, computed in log space.

    Several teachers (``(K, N, C)``) are combined as :func:`soft_targets` combines them,
    by averaging their probabilities, here as ``logsumexp_k log p_k − log K`` so that
    nothing underflows to ``log 0``. float32 (float64 for float64 input).
    """
    _check_hyperparameters(temperature, 0.0)
    logits = teacher_logits.to(_compute_dtype(teacher_logits))
    log_p = F.log_softmax(logits / temperature, dim=-1)
    if log_p.dim() == 3:
        log_p = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return log_p


def target_split(log_probs: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p_y, log(1 − p_y))`` per sample from log-probabilities ``(N, C)`` and a
    boolean ``(N, C)`` mask of each sample's target class.

    ``log(1 − p_y)`` is the log-sum-exp of the non-target log-probabilities, not the log
    of their summed probabilities: the latter is ``log 0 = −inf`` once the non-target
    mass underflows (soon in bfloat16 or float16, at a logit gap of about 100·T in float32),
    the former stays finite.
    """
    log_target = log_probs.masked_fill(~target_mask, 0.0).sum(dim=-1)
    log_rest = torch.logsumexp(log_probs.masked_fill(target_mask, float("-inf")), dim=-1)
    return log_target, log_rest


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """DKD's two per-sample KL terms at temperature T, ``(TCKD, NCKD)``, each ``(N,)``, without T².

    With ``p = softmax(teacher / T)``, ``q = softmax(student / T)`` and y the label:

    - TCKD = KL(b_p ‖ b_q), b_p = (p_y, 1 − p_y): the binary target / non-target split;
    - NCKD = KL(p̂ ‖ q̂), p̂_c = p_c / (1 − p_y) for c ≠ y: the distribution among the non-target classes;

    so that KL(p ‖ q) = TCKD + (1 − p_y)·NCKD per sample (Zhao et al., *Decoupled Knowledge
    Distillation*, CVPR 2022, §3.1). Computed in log space (:func:`target_split`); terms
    whose teacher probability underflows to 0 contribute 0, as ``F.kl_div`` counts them.
    Several teachers (``(K, N, C)``): p is their mean probability (:func:`teacher_log_probs`).
    """
    _check_hyperparameters(temperature, 0.0)
    log_q = F.log_softmax(student_logits.to(_compute_dtype(student_logits)) / temperature, dim=-1)
    log_p = teacher_log_probs(teacher_logits, temperature).to(log_q.dtype)
    target = F.one_hot(labels.long(), log_q.shape[-1]).bool()
    log_q_y, log_q_rest = target_split(log_q, target)
    log_p_y, log_p_rest = target_split(log_p, target)
    tckd = (log_p_y.exp() * (log_p_y - log_q_y)) + (log_p_rest.exp() * (log_p_rest - log_q_rest))
    log_p_hat = log_p - log_p_rest.unsqueeze(-1)  # finite everywhere; its target entry is unused
    p_hat = log_p_hat.exp().masked_fill(target, 0.0)
    nckd = (p_hat * (log_p_hat - (log_q - log_q_rest.unsqueeze(-1)))).sum(dim=-1)
    return tckd, nckd


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float, beta: float
) -> Tensor:
    """Decoupled KD's distillation term, ``α·T²·mean_n TCKD_n + β·T²·mean_n NCKD_n``.

    ``alpha`` multiplies the target-class term TCKD, ``beta`` the non-target term NCKD
    (:func:`dkd_terms`); both are batch means scaled by T². This is what mdistiller's
    ``dkd_loss`` returns: no cross-entropy, no warm-up (mdistiller multiplies this term by
    ``min(epoch / warmup, 1)`` and adds ``CE_WEIGHT·CE``; its CIFAR-100 defaults are
    CE 1, α 1, β 8, T 4, warm-up 20 epochs). Unlike mdistiller, the binary probabilities
    come from log-sum-exp (:func:`target_split`), not the log of summed probabilities,
    and the target class is masked exactly rather than by subtracting 1000 from its logit.
    Computed in float32 (float64 for float64 input); ``(K, N, C)`` teachers are averaged
    in probability space.
    """
    _check_nonnegative(dkd_alpha=alpha, dkd_beta=beta)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return temperature**2 * (alpha * tckd.mean() + beta * nckd.mean())


def pearson_rows(a: Tensor, b: Tensor, eps: float = DIST_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (last dimension),
    as DIST computes it: the cosine of the centred rows with ``eps`` added to the product
    of their norms."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float, gamma: float
) -> Tensor:
    """DIST, ``T²·(β·(1 − mean_n ρ(y_s[n,:], y_t[n,:])) + γ·(1 − mean_c ρ(y_s[:,c], y_t[:,c])))``.

    ``y = softmax(logits / T)`` and ρ is the Pearson correlation (:func:`pearson_rows`).
    ``beta`` weights the *inter-class* relation (each sample's correlation across the
    classes), ``gamma`` the *intra-class* relation (each class's correlation across the
    samples of the batch), following Huang et al., *Knowledge Distillation from A Stronger
    Teacher* (NeurIPS 2022, §4: L = β·τ²·L_inter + γ·τ²·L_intra) and their code (``DIST`` in
    hunto/image_classification_sota ``lib/models/losses/dist_kd.py``, which DIST_KD links:
    defaults β = γ = 1; CIFAR-100 ``configs/strategies/distill/dist_cifar.yaml``: τ = 4,
    ``kd_loss_weight`` 2, CE weight 1). The intra term depends on the batch, so this is
    a loss of the whole batch, not a mean of per-sample losses. Several teachers
    (``(K, N, C)``): y_t is their mean probability. float32 (float64 for float64 input).
    """
    _check_hyperparameters(temperature, 0.0)
    _check_nonnegative(dist_beta=beta, dist_gamma=gamma)
    y_s = F.softmax(student_logits.to(_compute_dtype(student_logits)) / temperature, dim=-1)
    y_t = teacher_log_probs(teacher_logits, temperature).to(y_s.dtype).exp()
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# ---------------------------------------------------------------- the methods as registered objectives


def _warmup(params: Mapping[str, Any], key: str) -> float:
    """A linear warm-up factor ``min(epoch / warmup, 1)`` (epochs from 1; no warm-up when 0), as mdistiller's DKD."""
    warmup, epoch = int(params.get(key) or 0), params.get("epoch")
    return min(float(epoch) / warmup, 1.0) if warmup > 0 and epoch is not None else 1.0


@register_objective(
    "dkd",
    hyperparameters=(
        Hyperparameter("dkd_alpha", "float", 1.0, minimum=0.0, description="DKD's weight of TCKD"),
        Hyperparameter("dkd_beta", "float", 8.0, minimum=0.0, description="DKD's weight of NCKD"),
        Hyperparameter("dkd_warmup", "int", 0, minimum=0,
                       description="epochs over which DKD's term ramps up linearly (0: none)"),
    ),
    description="decoupled KD: dkd_alpha·T²·TCKD + dkd_beta·T²·NCKD (Zhao et al. 2022)",
    cached="dkd", cached_args={"alpha": "dkd_alpha", "beta": "dkd_beta"}, warmup="dkd_warmup",
    # mdistiller's DKD config for CIFAR-100: CE 1, α 1, β 8, T 4, 20 warm-up epochs (of its 240).
    recipes={"dkd": {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0,
                     "dkd_warmup": 20, "standardize": False, **_LOGITS_ONLY}},
)
def _dkd_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                   params: Mapping[str, Any]) -> Tensor:
    return _warmup(params, "dkd_warmup") * dkd_loss(student_logits, teacher_logits, labels, params["temperature"],
                                                    params["dkd_alpha"], params["dkd_beta"])


@register_objective(
    "dist",
    hyperparameters=(
        Hyperparameter("dist_beta", "float", 1.0, minimum=0.0, description="DIST's inter-class weight"),
        Hyperparameter("dist_gamma", "float", 1.0, minimum=0.0, description="DIST's intra-class weight"),
    ),
    description="DIST: T²·(dist_beta·inter-class + dist_gamma·intra-class Pearson distance) (Huang et al. 2022)",
    cached="dist", cached_args={"beta": "dist_beta", "gamma": "dist_gamma"},
    # DIST_KD's CIFAR-100 setting: CE 1, T 4, β = γ = 1 with the DIST term weighted 2.
    recipes={"dist": {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 2.0, "dist_beta": 1.0, "dist_gamma": 1.0,
                      "standardize": False, **_LOGITS_ONLY}},
)
def _dist_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                    params: Mapping[str, Any]) -> Tensor:
    return dist_loss(student_logits, teacher_logits, params["temperature"], params["dist_beta"], params["dist_gamma"])
