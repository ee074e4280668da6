"""The logit-level distillation objectives on cached teacher logits, in fused form.

One training step on a batch of B samples with student logits ``s`` and labels ``y``
minimises::

    ce_weight · CE(s, y) + weight · M(u, teacher, T),    u = standardize_logits(s) if standardize else s

where M is one of the methods of :mod:`kdtune.losses`, applied to ``u`` and to the
teacher's logits (standardized too when ``standardize`` is set, as
logit-standardization-KD does for both):

- ``kd`` (:class:`CachedKD`): ``T²·KL(softmax(t/T) ‖ softmax(u/T))``, batchmean (:func:`~kdtune.losses.kl_soft_loss`);
- ``dkd`` (:class:`CachedDKD`): ``α·T²·TCKD + β·T²·NCKD`` (:func:`~kdtune.losses.dkd_loss`);
- ``dist`` (:class:`CachedDIST`): ``T²·(β·inter + γ·intra)`` (:func:`~kdtune.losses.dist_loss`).

The cross-entropy is always on the raw logits ``s``. ``weight`` is given per step, so that
the training loop can multiply the method's weight by a schedule (DKD's warm-up
``min(epoch / warmup, 1)``).

What depends only on the sample, its label and T (the teacher's soft targets, DKD's
target / non-target split of them, DIST's centred teacher rows) is computed once into a
table with one row per training sample, and a step indexes its batch's rows. The loss
and its gradient with respect to ``s`` are then computed in closed form, without an
autograd graph: backpropagate with ``s.backward(grad)``. They equal the reference
functions' (autograd through :mod:`kdtune.losses`) up to float rounding, which
``tests/test_logit_methods.py`` checks in float64 and with ``torch.autograd.gradcheck``.

Temperature: tables are keyed by T, and the ``keep`` most recently used are kept. A
schedule that changes T once an epoch builds one table per epoch (one softmax over
the training set); a T seen recently reuses its table; a T evicted is rebuilt.
Logit noise: pass the batch's noisy teacher logits as ``teacher_logits`` and its rows
are computed for that step instead of being looked up.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses import (
    DIST_EPS,
    STANDARDIZE_EPS,
    _check_hyperparameters,
    _check_nonnegative,
    _compute_dtype,
    standardize_logits,
    target_split,
    teacher_log_probs,
)

#: Smallest norm or standard deviation divided by in a gradient; where the true value is 0 the
#: vector it scales is 0 too, so this only turns 0/0 into 0 (autograd would give NaN there).
_TINY = 1e-30


def standardize_backward(grad_u: Tensor, u: Tensor, std: Tensor) -> Tensor:
    """Gradient with respect to ``s`` of a loss whose gradient with respect to
    ``u = standardize_logits(s)`` is ``grad_u``, given ``u`` and the ``(B, 1)`` unbiased std of ``s``.

    With ``d = s − mean(s)`` and σ the unbiased std over C classes, ``u = d / (σ + ε)`` and
    ``∂L/∂s = (g − mean(g)) / (σ + ε) − u·⟨g, u⟩ / ((C − 1)·σ)``.
    """
    classes = u.shape[-1]
    centred = grad_u - grad_u.mean(dim=-1, keepdim=True)
    along_u = (grad_u * u).sum(dim=-1, keepdim=True) / ((classes - 1) * std.clamp_min(_TINY))
    return centred.div_(std + STANDARDIZE_EPS).sub_(u * along_u)


class CachedLogitObjective:
    """One run's ``ce_weight·CE + weight·M`` on cached teacher logits (see the module docstring).

    ``teacher_logits`` is ``(N, C)``, or ``(K, N, C)`` for K teachers whose probabilities
    are averaged at temperature T (as :func:`~kdtune.losses.soft_targets` does);
    ``labels`` ``(N,)``: row i belongs to training sample i. They stay on the CPU; the
    tables are built there and moved to ``device``. A subclass gives the teacher's rows
    (:meth:`_teacher_rows`) and the method's loss and gradient on a batch (:meth:`_method`).
    """

    name: ClassVar[str] = ""

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, ce_weight: float = 1.0,
                 standardize: bool = False, device: torch.device | str = "cpu", keep: int = 2) -> None:
        if teacher_logits.dim() not in (2, 3):
            raise ConfigError("teacher_logits", f"must be (N, C) or (K, N, C), got shape {tuple(teacher_logits.shape)}")
        if teacher_logits.shape[-2] != labels.shape[0]:
            raise ConfigError("teacher_logits", f"{teacher_logits.shape[-2]} rows for {labels.shape[0]} labels")
        _check_nonnegative(ce_weight=ce_weight)
        if keep < 1:
            raise ConfigError("keep", f"must be >= 1, got {keep}")
        self.ce_weight, self.standardize, self.keep = float(ce_weight), bool(standardize), int(keep)
        self.dtype = _compute_dtype(teacher_logits)
        self.num_classes = int(teacher_logits.shape[-1])
        self.device = torch.device(device)
        with torch.no_grad():
            logits = teacher_logits.to(self.dtype)
            # Standardization does not depend on T: done once per run, before any table.
            self.teacher = standardize_logits(logits) if self.standardize else logits
        self.labels = labels.long()
        self.labels_on_device = self.labels.to(self.device)
        self.tables: OrderedDict[float, Tensor] = OrderedDict()  # T → (N, C + width) rows, most recent last

    # ------------------------------------------------------------ teacher side

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        """The table rows of these (already standardized, if asked) teacher logits and labels:
        ``[onehot(labels) | method's rows]``."""
        log_p = teacher_log_probs(teacher_logits, temperature).to(self.dtype)
        onehot = F.one_hot(labels, self.num_classes).to(log_p.dtype)
        return torch.cat((onehot, self._teacher_rows(log_p, onehot)), dim=1)

    def table(self, temperature: float) -> Tensor:
        """The whole training split's rows at ``temperature``, on the device (built on first use)."""
        _check_hyperparameters(temperature, 0.0)
        key = float(temperature)
        table = self.tables.get(key)
        if table is None:
            with torch.no_grad():
                table = self.rows(self.teacher, self.labels, key).to(self.device)
            self.tables[key] = table
            while len(self.tables) > self.keep:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        return table

    # ------------------------------------------------------------ a step

    def loss_and_grad(self, student_logits: Tensor, idx: Tensor, temperature: float, weight: float = 1.0,
                      teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The batch's objective (a scalar, no autograd graph) and its gradient with respect to ``student_logits``.

        ``idx`` are the batch's training-split indices on the device. ``weight`` multiplies
        the method's term (not the CE). ``teacher_logits`` (``(B, C)`` or ``(K, B, C)``,
        on the device, e.g. with logit noise added) replace the cached teacher for this step.
        """
        if teacher_logits is None:
            rows = self.table(temperature).index_select(0, idx)
        else:
            with torch.no_grad():
                logits = teacher_logits.to(self.dtype)
                rows = self.rows(standardize_logits(logits) if self.standardize else logits,
                                 self.labels_on_device.index_select(0, idx), float(temperature))
        classes, ce = self.num_classes, self.ce_weight
        with torch.no_grad():
            s = student_logits.detach().to(self.dtype)
            batch = s.shape[0]
            onehot, teacher = rows[:, :classes], rows[:, classes:]
            log_ce = None
            if self.standardize:
                std, mean = torch.std_mean(s, dim=-1, keepdim=True)
                u = (s - mean).div_(std + STANDARDIZE_EPS)
                log_q = torch.log_softmax(u / temperature, dim=-1)
                if ce:
                    log_ce = torch.log_softmax(s, dim=-1)
            elif ce:  # one log-softmax kernel for both, as the fused KD loss does
                log_ce, log_q = torch.log_softmax(torch.stack((s, s / temperature), dim=1), dim=-1).unbind(1)
            else:
                log_q = torch.log_softmax(s / temperature, dim=-1)
            loss, grad = self._method(log_q, teacher, float(temperature), batch)
            # grad is ∂M/∂z with z = u / T: ∂(weight·M)/∂u = weight·grad / T.
            loss, grad = loss * weight, grad.mul_(weight / temperature)
            if self.standardize:
                grad = standardize_backward(grad, u, std)
            if log_ce is not None:
                loss = loss - (ce / batch) * torch.dot(onehot.reshape(-1), log_ce.reshape(-1))
                grad.add_(log_ce.exp().sub_(onehot), alpha=ce / batch)
        return loss, grad.to(student_logits.dtype)

    # ------------------------------------------------------------ per method

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> Tensor:
        """The method's per-sample table columns from the teacher's log-probabilities at T."""
        raise NotImplementedError

    def _method(self, log_q: Tensor, teacher: Tensor, temperature: float, batch: int) -> tuple[Tensor, Tensor]:
        """The method's loss M on the batch and ``∂M/∂z`` ``(B, C)`` (a new tensor), with
        ``log_q = log_softmax(z)``, ``z = u / T``, and ``teacher`` the batch's method columns."""
        raise NotImplementedError


class CachedKD(CachedLogitObjective):
    """``ce_weight·CE(s) + weight·T²·KL(p ‖ softmax(u/T))`` (batchmean), p the teacher's soft targets.

    With ``ce_weight = α`` and ``weight = 1 − α`` (and no standardization) this is
    :func:`~kdtune.losses.distillation_loss`; the logit-standardization recipe is
    ``ce_weight = 0.1``, ``weight = 9``, ``standardize = True``, T = 2. Table columns:
    ``[p | log p]``. ``∂M/∂z = T²/B·(q − p)``.
    """

    name = "kd"

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> Tensor:
        return torch.cat((log_p.exp(), log_p), dim=1)

    def _method(self, log_q: Tensor, teacher: Tensor, temperature: float, batch: int) -> tuple[Tensor, Tensor]:
        classes = log_q.shape[-1]
        p, log_p = teacher[:, :classes], teacher[:, classes:]
        scale = temperature**2 / batch
        # Σ p·(log p − log q): p = 0 where it underflowed, with a finite log p, so such terms are 0.
        loss = scale * torch.dot(p.reshape(-1), (log_p - log_q).reshape(-1))
        return loss, log_q.exp().sub_(p).mul_(scale)


class CachedDKD(CachedLogitObjective):
    """``ce_weight·CE(s) + weight·(α·T²·TCKD + β·T²·NCKD)`` (:func:`~kdtune.losses.dkd_loss` on u).

    Per sample, with the teacher's target probability p_y, its non-target distribution p̂
    (0 at the target) and ``log_rest = log(1 − q_y) = logsumexp_{c≠y} log q_c``::

        α·TCKD + β·NCKD = K − ⟨A, log q⟩ + c·log_rest,    ∂/∂z = α·q − A + c·q̂

    where ``A = α·p_y·onehot + β·p̂``, ``c = β − α·(1 − p_y)`` and
    ``K = α·Σ b log b + β·Σ p̂ log p̂`` (b = (p_y, 1 − p_y)) depend only on the teacher and
    the label: the table columns are ``[A | mask | c | K]``, ``mask`` being −inf at the
    target and 0 elsewhere. q̂ is the student's non-target distribution. The mdistiller
    recipe is ``ce_weight = 1``, α = 1, β = 8, T = 4, ``weight = min(epoch / 20, 1)``.
    """

    name = "dkd"

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, alpha: float = 1.0, beta: float = 8.0,
                 **kwargs) -> None:
        _check_nonnegative(dkd_alpha=alpha, dkd_beta=beta)
        self.alpha, self.beta = float(alpha), float(beta)
        super().__init__(teacher_logits, labels, **kwargs)

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> Tensor:
        alpha, beta = self.alpha, self.beta
        target = onehot.bool()
        log_p_y, log_p_rest = target_split(log_p, target)
        p_y, p_rest = log_p_y.exp(), log_p_rest.exp()
        log_p_hat = log_p - log_p_rest.unsqueeze(1)  # finite: the target's entry is masked below
        p_hat = log_p_hat.exp().masked_fill_(target, 0.0)
        a = onehot * (alpha * p_y).unsqueeze(1) + beta * p_hat
        mask = torch.zeros_like(log_p).masked_fill_(target, float("-inf"))
        c = beta - alpha * p_rest
        k = alpha * (p_y * log_p_y + p_rest * log_p_rest) + beta * (p_hat * log_p_hat).sum(dim=1)
        return torch.cat((a, mask, c.unsqueeze(1), k.unsqueeze(1)), dim=1)

    def _method(self, log_q: Tensor, teacher: Tensor, temperature: float, batch: int) -> tuple[Tensor, Tensor]:
        classes = log_q.shape[-1]
        a, mask = teacher[:, :classes], teacher[:, classes:2 * classes]
        c, k = teacher[:, 2 * classes], teacher[:, 2 * classes + 1]
        scale = temperature**2 / batch
        masked = log_q + mask
        log_rest = torch.logsumexp(masked, dim=1)  # log(1 − q_y) without summing probabilities
        loss = scale * (k.sum() - torch.dot(a.reshape(-1), log_q.reshape(-1)) + torch.dot(c, log_rest))
        q_hat = masked.sub_(log_rest.unsqueeze(1)).exp_()
        grad = log_q.exp().mul_(self.alpha).sub_(a).add_(q_hat.mul_(c.unsqueeze(1)))
        return loss, grad.mul_(scale)


class CachedDIST(CachedLogitObjective):
    """``ce_weight·CE(s) + weight·T²·(β·(1 − mean_n ρ_n) + γ·(1 − mean_c ρ_c))`` (:func:`~kdtune.losses.dist_loss` on u).

    Table columns: ``[p | p − mean(p) | ‖p − mean(p)‖]`` (teacher probabilities, centred
    over the classes, and the norm). The intra-class term centres each class over the
    batch, so its teacher side is computed per step from the batch's p. With
    ``ρ = ⟨ã, b̃⟩ / (‖ã‖‖b̃‖ + ε)`` for centred ã (student) and b̃ (teacher),
    ``∂ρ/∂a = b̃ / D − ⟨ã, b̃⟩·‖b̃‖·ã / (‖ã‖·D²)``, D the denominator; then through the softmax,
    ``∂/∂z = q ⊙ (g − ⟨g, q⟩)``. DIST's CIFAR-100 recipe: ``ce_weight = 1``, T = 4, β = γ = 1
    with ``weight = 2`` (equivalently β = γ = 2, ``weight = 1``).
    """

    name = "dist"

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
                 **kwargs) -> None:
        _check_nonnegative(dist_beta=beta, dist_gamma=gamma)
        self.beta, self.gamma = float(beta), float(gamma)
        super().__init__(teacher_logits, labels, **kwargs)

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> Tensor:
        p = log_p.exp()
        centred = p - p.mean(dim=1, keepdim=True)
        return torch.cat((p, centred, centred.norm(dim=1, keepdim=True)), dim=1)

    @staticmethod
    def _pearson_grad(a: Tensor, b: Tensor, norm_b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """ρ along ``dim`` of centred ``a`` and ``b`` (``norm_b`` = ‖b‖ along ``dim``, kept), and ∂ρ/∂a."""
        norm_a = a.norm(dim=dim, keepdim=True)
        dot = (a * b).sum(dim=dim, keepdim=True)
        denom = norm_a * norm_b + DIST_EPS
        rho = dot / denom
        grad = b / denom - a * (dot * norm_b / (norm_a.clamp_min(_TINY) * denom.square()))
        return rho, grad

    def _method(self, log_q: Tensor, teacher: Tensor, temperature: float, batch: int) -> tuple[Tensor, Tensor]:
        classes = log_q.shape[-1]
        p, b, norm_b = teacher[:, :classes], teacher[:, classes:2 * classes], teacher[:, 2 * classes:]
        q = log_q.exp()
        # Inter-class: each sample across the classes (teacher side from the table).
        rho_inter, grad_inter = self._pearson_grad(q - q.mean(dim=1, keepdim=True), b, norm_b, dim=1)
        # Intra-class: each class across the batch (teacher side from this batch's rows).
        p_centred = p - p.mean(dim=0, keepdim=True)
        rho_intra, grad_intra = self._pearson_grad(q - q.mean(dim=0, keepdim=True), p_centred,
                                                   p_centred.norm(dim=0, keepdim=True), dim=0)
        t2 = temperature**2
        loss = t2 * (self.beta * (1 - rho_inter.mean()) + self.gamma * (1 - rho_intra.mean()))
        grad_q = grad_inter.mul_(-t2 * self.beta / batch).sub_(grad_intra.mul_(t2 * self.gamma / classes))
        grad = grad_q.sub_((grad_q * q).sum(dim=1, keepdim=True)).mul_(q)
        return loss, grad


#: The cached objective of each method, by the name the LOSSES registry gives it.
CACHED_OBJECTIVES: dict[str, type[CachedLogitObjective]] = {
    cls.name: cls for cls in (CachedKD, CachedDKD, CachedDIST)
}
