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
from kdtune.core.losses import (
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


class CachedLogitObjective:
    """One run's ``ce_weight·CE + weight·M`` on cached teacher logits (see the module docstring).

    ``teacher_logits`` is ``(N, C)``, or ``(K, N, C)`` for K teachers whose probabilities
    are averaged at temperature T (as :func:`~kdtune.losses.soft_targets` does);
    ``labels`` ``(N,)``: row i belongs to training sample i. They stay on the CPU; the
    tables are built there and moved to ``device``. Subclasses define the table's rows
    (:meth:`rows`) and the step (:meth:`loss_and_grad`).
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
        self.tables: OrderedDict[float, Tensor] = OrderedDict()  # T → table, most recently used last
        self._constants: dict[tuple, tuple[Tensor, ...]] = {}  # per (batch size, T, weight): small step constants

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        """The table rows ``(N, R, C)`` of these (already standardized, if asked) teacher logits and labels."""
        raise NotImplementedError

    def loss_and_grad(self, student_logits: Tensor, idx: Tensor, temperature: float, weight: float = 1.0,
                      teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The batch's objective (a scalar, no autograd graph) and its gradient with respect to ``student_logits``.

        ``idx`` are the batch's training-split indices on the device. ``weight`` multiplies
        the method's term (not the CE). ``teacher_logits`` (``(B, C)`` or ``(K, B, C)``,
        on the device, e.g. with logit noise added) replace the cached teacher for this step.
        Computed in float32 (float64 for a float64 teacher); the gradient has the logits' dtype.
        """
        raise NotImplementedError

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

    def _inputs(self, student_logits: Tensor, idx: Tensor, temperature: float,
                teacher_logits: Tensor | None) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """A step's batch rows of the table (or of ``teacher_logits``) and :meth:`_student`'s ``(s, z, back)``;
        call under ``torch.no_grad()``."""
        if teacher_logits is None:
            rows = self.table(temperature).index_select(0, idx)
        else:
            logits = teacher_logits.to(self.dtype)
            rows = self.rows(standardize_logits(logits) if self.standardize else logits,
                             self.labels_on_device.index_select(0, idx), float(temperature))
        return (rows, *self._student(student_logits, temperature))

    def _student(self, student_logits: Tensor, temperature: float
                 ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """``(s, z, back)``: the logits in the compute dtype, ``z = u / T``, and (standardizing)
        what :meth:`_to_logits` needs to take a gradient from z back to s.

        Standardizing, ``z = d·κ`` with ``d = s − mean(s)``, ``κ = 1 / (T·(σ + ε))`` and
        ``σ = ‖d‖ / √(C − 1)`` (torch's unbiased std), computed as such: fewer operations than
        :func:`~kdtune.losses.standardize_logits` followed by a division, the same numbers up to rounding.
        """
        # Called under no_grad: no detach needed; no conversion when the dtype already matches.
        s = student_logits if student_logits.dtype == self.dtype else student_logits.to(self.dtype)
        if not self.standardize:
            return s, s / temperature, None
        classes = s.shape[-1]
        d = torch.sub(s, s.sum(dim=-1, keepdim=True), alpha=1.0 / classes)
        norm = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        eps, sigma_scale = self._constant(("standardize", float(temperature)), lambda: tuple(
            torch.tensor(x, dtype=self.dtype, device=self.device)
            for x in (temperature * STANDARDIZE_EPS, temperature / (classes - 1) ** 0.5)))
        kappa = torch.addcmul(eps, norm, sigma_scale).reciprocal_()
        return s, d * kappa, (d, norm, kappa)

    def _to_logits(self, grad_z: Tensor, temperature: float, back: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``∂/∂s`` from ``∂/∂z`` when standardizing (``back`` from :meth:`_student`), in place where it can.

        Standardizing (see :meth:`_student`): ``∂/∂s = κ·(g − mean(g)) − d·⟨g, d⟩·κ²·T / (√(C − 1)·‖d‖)``,
        computed without the ``mean(g)``: every method's gradient with respect to z sums to 0 over
        the classes (each loss is unchanged by adding a constant to a sample's z), so it would
        only move float rounding.
        """
        d, norm, kappa = back
        scale = temperature / (d.shape[-1] - 1) ** 0.5
        along_d = torch.linalg.vecdot(grad_z, d).unsqueeze(-1).mul_(kappa).mul_(kappa).div_(
            norm.clamp_min(_TINY).mul_(1.0 / scale))
        return grad_z.mul_(kappa).sub_(d * along_d)

    def _constant(self, key: tuple, build) -> tuple[Tensor, ...]:
        # Tensors of a few python numbers, made once per (batch size, T, weight) rather than every step.
        found = self._constants.get(key)
        if found is None:
            if len(self._constants) > 256:  # a schedule of many values: start over rather than grow
                self._constants.clear()
            found = self._constants[key] = build()
        return found


class _LinearInLogProbs(CachedLogitObjective):
    """Objectives of the form ``Σ_k ⟨W_k, log_softmax(x_k) − log t_k⟩`` over K stacked inputs.

    Row 0 is the cross-entropy (``x_0 = s``, ``W_0 = −(ce_weight / B)·onehot``, ``log t_0 = 0``);
    rows 1.. are the method's (``x_k = z + offset_k``, ``W_k = weight·T²/B·w_k``). The table
    holds, per sample, ``[w | log t | offset]`` for every row (``(N, 3, K, C)``), the unscaled
    weights ``w`` being the loss's gradient with respect to the log-probabilities. A step is then
    one stacked log-softmax, the log-softmax backward kernel applied to the weights (the gradient
    with respect to every ``x_k``), one dot product for the loss, and the sum of the rows'
    gradients (rows 1.. divided by T): the form of :func:`~kdtune.losses.fused_kd_loss_and_grad`.
    """

    #: Whether some row's inputs are offset (otherwise the offsets are all 0 and not added).
    offsets: ClassVar[bool] = True

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The method's ``(w, log t, offset)``, each ``(N, K − 1, C)``."""
        raise NotImplementedError

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        log_p = teacher_log_probs(teacher_logits, temperature).to(self.dtype)
        onehot = F.one_hot(labels, self.num_classes).to(log_p.dtype)
        weights, log_targets, offsets = self._teacher_rows(log_p, onehot)
        zeros = torch.zeros_like(onehot).unsqueeze(1)
        return torch.stack((torch.cat((-onehot.unsqueeze(1), weights), dim=1),
                            torch.cat((zeros, log_targets), dim=1), torch.cat((zeros, offsets), dim=1)), dim=1)

    def loss_and_grad(self, student_logits: Tensor, idx: Tensor, temperature: float, weight: float = 1.0,
                      teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            rows, s, z, back = self._inputs(student_logits, idx, temperature, teacher_logits)
            weights, log_targets, offsets = rows.unbind(1)
            rows_k, batch = weights.shape[1], s.shape[0]
            scale, per_input = self._constant((batch, float(temperature), float(weight)), lambda: (
                torch.tensor([self.ce_weight / batch] + [weight * temperature**2 / batch] * (rows_k - 1),
                             dtype=self.dtype, device=self.device).unsqueeze(1),
                torch.tensor([1.0] + [1.0 / temperature] * (rows_k - 1), dtype=self.dtype,
                             device=self.device).unsqueeze(1)))
            inputs = torch.stack((s,) + (z,) * (rows_k - 1), dim=1)
            log_probs = torch.log_softmax(inputs.add_(offsets) if self.offsets else inputs, dim=-1)
            weights = weights * scale  # ∂loss/∂log-probabilities
            grads = torch._log_softmax_backward_data(weights, log_probs, -1, log_probs.dtype)
            loss = torch.dot(weights.view(-1), log_probs.sub_(log_targets).view(-1))
            if back is None:
                grad = (grads * per_input).sum(dim=1)
            else:  # rows 1.. are functions of z = standardize(s) / T, row 0 of s
                method = grads[:, 1] if rows_k == 2 else grads[:, 1:].sum(dim=1)
                grad = self._to_logits(method.contiguous(), temperature, back).add_(grads[:, 0])
        return loss, grad.to(student_logits.dtype)


class CachedKD(_LinearInLogProbs):
    """``ce_weight·CE(s) + weight·T²·KL(p ‖ softmax(u/T))`` (batchmean), p the teacher's soft targets.

    With ``ce_weight = α`` and ``weight = 1 − α`` (and no standardization) this is
    :func:`~kdtune.losses.distillation_loss`; the logit-standardization recipe is
    ``ce_weight = 0.1``, ``weight = 9``, ``standardize = True``, T = 2. One method row:
    ``w = −p``, ``log t = log p``, no offset.
    """

    name = "kd"
    offsets = False

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return -log_p.exp().unsqueeze(1), log_p.unsqueeze(1), torch.zeros_like(log_p).unsqueeze(1)


class CachedDKD(_LinearInLogProbs):
    """``ce_weight·CE(s) + weight·(α·T²·TCKD + β·T²·NCKD)`` (:func:`~kdtune.losses.dkd_loss` on u).

    Per sample, by KD = TCKD + (1 − p_y)·NCKD, ``α·TCKD + β·NCKD = α·KL(p ‖ q) + c·KL(p̂ ‖ q̂)``
    with ``c = β − α·(1 − p_y)``, p̂ and q̂ the non-target distributions: two method rows,
    ``(w, log t, offset) = (−α·p, log p, 0)`` on z and ``(−c·p̂, log p̂, mask)`` on z plus a
    mask that sends the target's logit to −finfo.max / 4, so that ``log_softmax(z + mask)``
    is ``log q̂`` with the target dropped (its weight is 0), in log space throughout. The
    mdistiller recipe is ``ce_weight = 1``, α = 1, β = 8, T = 4, ``weight = min(epoch / 20, 1)``.
    """

    name = "dkd"

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, alpha: float = 1.0, beta: float = 8.0,
                 **kwargs) -> None:
        _check_nonnegative(dkd_alpha=alpha, dkd_beta=beta)
        self.alpha, self.beta = float(alpha), float(beta)
        super().__init__(teacher_logits, labels, **kwargs)

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        target = onehot.bool()
        _, log_p_rest = target_split(log_p, target)
        log_p_hat = (log_p - log_p_rest.unsqueeze(1)).masked_fill_(target, 0.0)
        c = self.beta - self.alpha * log_p_rest.exp()
        p_hat = log_p_hat.exp().masked_fill_(target, 0.0)
        mask = torch.zeros_like(log_p).masked_fill_(target, -torch.finfo(log_p.dtype).max / 4)
        return (torch.stack((-self.alpha * log_p.exp(), -c.unsqueeze(1) * p_hat), dim=1),
                torch.stack((log_p, log_p_hat), dim=1), torch.stack((torch.zeros_like(log_p), mask), dim=1))


class CachedDIST(CachedLogitObjective):
    """``ce_weight·CE(s) + weight·T²·(β·(1 − mean_n ρ_n) + γ·(1 − mean_c ρ_c))`` (:func:`~kdtune.losses.dist_loss` on u).

    Table rows ``(N, 3, C)``: the label's one-hot, the teacher's probabilities p and p centred over
    the classes (b̃). The intra-class term centres each class over the
    batch, so its teacher side is computed per step from the batch's p. With
    ``ρ = ⟨ã, b̃⟩ / D``, ``D = ‖ã‖‖b̃‖ + ε``, for centred ã (student) and b̃ (teacher),
    ``∂ρ/∂a = b̃ / D − ρ·‖b̃‖·ã / (‖ã‖·D)``; then through the softmax. The student's rows
    sum to 1, so centring them over the classes is subtracting 1/C. DIST's CIFAR-100 recipe:
    ``ce_weight = 1``, T = 4, β = γ = 1 with ``weight = 2`` (equivalently β = γ = 2, ``weight = 1``).
    """

    name = "dist"

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
                 **kwargs) -> None:
        _check_nonnegative(dist_beta=beta, dist_gamma=gamma)
        self.beta, self.gamma = float(beta), float(gamma)
        super().__init__(teacher_logits, labels, **kwargs)

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        p = teacher_log_probs(teacher_logits, temperature).to(self.dtype).exp()
        return torch.stack((F.one_hot(labels, self.num_classes).to(p.dtype), p, p - p.mean(dim=1, keepdim=True)), dim=1)

    def _buffers(self, batch: int, classes: int, temperature: float, weight: float) -> tuple[Tensor, ...]:
        """Per (batch size, T, weight): constants, and buffers whose first B entries hold the B samples'
        inter-class statistics and last C entries the C classes' intra-class ones, so that the
        arithmetic on them is done once for both terms; with their views shaped to broadcast
        over a sample's row ``(B, 1)`` or a class's column ``(1, C)``."""
        def build() -> tuple[Tensor, ...]:
            options = {"dtype": self.dtype, "device": self.device}
            # ρ's weight in the loss is T²·β / B (inter) and T²·γ / C (intra); these are divided by T
            # so that r = weight / D gives the gradient with respect to q already divided by T.
            per_rho = torch.tensor([weight * temperature * self.beta / batch] * batch
                                   + [weight * temperature * self.gamma / classes] * classes, **options)
            stats = torch.empty(5, batch + classes, **options)  # ⟨a, b⟩, ‖a‖, ‖b‖, r, coefficient of a
            rows, columns = stats[:, :batch], stats[:, batch:]
            constants = tuple(torch.tensor(x, **options) for x in (
                DIST_EPS, 1.0 / classes, weight * temperature**2 * (self.beta + self.gamma)))
            return (*constants, per_rho, *stats, *rows, *columns, rows[3].view(batch, 1), rows[4].view(batch, 1),
                    columns[3].view(1, classes), columns[4].view(1, classes))
        return self._constant((batch, float(temperature), float(weight)), build)

    def loss_and_grad(self, student_logits: Tensor, idx: Tensor, temperature: float, weight: float = 1.0,
                      teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            rows, s, z, back = self._inputs(student_logits, idx, temperature, teacher_logits)
            onehot, p, b_inter = rows.unbind(1)
            batch, classes = s.shape
            (eps, centre, full, per_rho, dot, norm_a, norm_b, r, coef, dot_n, norm_a_n, norm_b_n, _, _,
             dot_c, norm_a_c, norm_b_c, _, _, r_n, coef_n, r_c, coef_c) = self._buffers(
                batch, classes, float(temperature), float(weight))
            log_ce, log_q = torch.log_softmax(torch.stack((s, z), dim=1), dim=-1).unbind(1)
            q = log_q.exp()
            # Inter-class: each sample across the classes (teacher side from the table; a sample's
            # probabilities sum to 1, so centring them is subtracting 1/C).
            a_inter = q - centre
            torch.linalg.vecdot(a_inter, b_inter, out=dot_n)
            torch.linalg.vector_norm(a_inter, dim=1, out=norm_a_n)
            torch.linalg.vector_norm(b_inter, dim=1, out=norm_b_n)
            # Intra-class: each class across the batch (teacher side from this batch's rows).
            a_intra = torch.sub(q, q.sum(dim=0, keepdim=True), alpha=1.0 / batch)
            b_intra = torch.sub(p, p.sum(dim=0, keepdim=True), alpha=1.0 / batch)
            torch.linalg.vecdot(a_intra, b_intra, dim=0, out=dot_c)
            torch.linalg.vector_norm(a_intra, dim=0, out=norm_a_c)
            torch.linalg.vector_norm(b_intra, dim=0, out=norm_b_c)
            # Both at once: D = ‖a‖‖b‖ + ε, ρ = ⟨a, b⟩ / D, r = ρ's weight / D, and
            # ∂(weight·ρ)/∂a = r·b − (r·⟨a, b⟩·‖b‖ / (‖a‖·D))·a.
            denom = torch.addcmul(eps, norm_a, norm_b)
            torch.div(per_rho, denom, out=r)
            weighted = torch.linalg.vecdot(r, dot)  # Σ weight·ρ / T over samples and classes
            torch.mul(r, dot, out=coef).mul_(norm_b).div_(norm_a.clamp_min_(_TINY).mul_(denom))
            grad_q = a_inter.mul_(coef_n).addcmul_(b_inter, r_n, value=-1.0)
            grad_q.addcmul_(a_intra, coef_c).addcmul_(b_intra, r_c, value=-1.0)
            loss = torch.sub(full, weighted, alpha=temperature)
            grad = torch._softmax_backward_data(grad_q, q, 1, q.dtype)
            if back is not None:
                grad = self._to_logits(grad.mul_(temperature), temperature, back)
            if self.ce_weight:
                ce = self.ce_weight / batch
                loss = loss.sub_(torch.linalg.vecdot(onehot, log_ce).sum(), alpha=ce)
                grad.add_(log_ce.exp().sub_(onehot), alpha=ce)
        return loss, grad.to(student_logits.dtype)


#: The cached objective of each method, by the name the LOSSES registry gives it.
CACHED_OBJECTIVES: dict[str, type[CachedLogitObjective]] = {
    cls.name: cls for cls in (CachedKD, CachedDKD, CachedDIST)
}
