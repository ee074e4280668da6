"""Distillation losses as pure functions of tensors.

kdtune's one loss convention (α is the weight of the *hard-label* term)::

    loss = α·CE(student, labels) + (1 − α)·soft + β·feature

    soft = T²·KL(softmax(teacher/T) ‖ softmax(student/T))    (soft_loss="kl", batchmean)
    soft = mean_n Σ_c (ẑ_s − ẑ_t)² / (2C)                     (soft_loss="logit_mse")

The T² factor is always applied to the KL term, α = 0 included, so that the soft
gradient keeps the same scale whatever T is (Hinton et al. 2015, §2). ``logit_mse``
matches zero-meaned logits ẑ; it is the large-T limit of T²·KL (Hinton §2.1) and
so does not depend on T. Several teachers are combined by averaging their soft
targets in probability space at temperature T.

Other tools differ: torchdistill drops T² at α = 0, RepDistiller/mdistiller weight
the soft term by its own α, TextBrewer applies no T². Translate with care.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError

SoftLoss = Literal["kl", "logit_mse"]
SOFT_LOSSES: tuple[str, ...] = ("kl", "logit_mse")


def _check_hyperparameters(temperature: float, alpha: float, beta: float = 0.0) -> None:
    if not temperature > 0:
        raise ConfigError("temperature", f"must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("alpha", f"must be in [0, 1], got {alpha}")
    if not beta >= 0.0:
        raise ConfigError("beta", f"must be >= 0, got {beta}")


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


def soft_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl"
) -> Tensor:
    """The soft (teacher-matching) term selected by ``kind`` ("kl" or "logit_mse")."""
    if kind == "kl":
        return kl_soft_loss(student_logits, teacher_logits, temperature)
    if kind == "logit_mse":
        return logit_mse_loss(student_logits, teacher_logits)
    raise ConfigError("soft_loss", f"unknown soft loss {kind!r}; allowed: {', '.join(SOFT_LOSSES)}")


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
    teacher_logits: Tensor, noise_std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Teacher logits plus Gaussian noise of std ``noise_std`` (the "noisy teacher").

    ``noise_std == 0`` returns the input unchanged. Apply during training only.
    """
    if noise_std < 0:
        raise ConfigError("noise", f"must be >= 0, got {noise_std}")
    if noise_std == 0:
        return teacher_logits
    noise = torch.randn(
        teacher_logits.shape, generator=generator, dtype=teacher_logits.dtype, device="cpu"
    ).to(teacher_logits.device)
    return teacher_logits + noise_std * noise


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
) -> Tensor:
    """The full distillation loss, a scalar tensor.

    ``α·CE(student, labels) + (1 − α)·soft + β·feature_loss`` where ``soft`` is
    ``T²·KL`` (``soft_loss_kind="kl"``) or ``logit_mse``. ``teacher_logits`` may be
    ``None`` only when ``α == 1`` (plain hard-label training). ``feature_loss`` is a
    precomputed :func:`feature_matching_loss`; it is required when ``β > 0``.
    """
    _check_hyperparameters(temperature, alpha, beta)
    loss = alpha * F.cross_entropy(student_logits.float(), labels) if alpha > 0 else student_logits.new_zeros(())
    if alpha < 1:
        if teacher_logits is None:
            raise ConfigError("alpha", f"alpha={alpha} < 1 needs teacher logits")
        loss = loss + (1 - alpha) * soft_loss(student_logits, teacher_logits, temperature, soft_loss_kind)
    if beta > 0:
        if feature_loss is None:
            raise ConfigError("beta", f"beta={beta} > 0 needs a feature loss")
        loss = loss + beta * feature_loss
    return loss
