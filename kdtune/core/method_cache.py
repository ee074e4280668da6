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

Which library computes a step: the step is a few dozen elementwise operations and
reductions on a ``(B, C)`` batch, and on the CPU each torch operation costs 1–6 µs of
dispatch whatever its size, about twice NumPy's; for a small student that is a tenth of
its whole step. So the step's arithmetic is written once, with the operations and
``axis=`` / ``keepdims=`` spellings torch and NumPy share, and runs on NumPy views of the
tensors on the CPU (``arrays="numpy"``, the default there) and on torch tensors on an
accelerator (``arrays="torch"``), where the tensors stay on the device. The tables are
built with torch either way. One difference: NumPy's path centres the student's logits
with one matrix product and exponentiates without shifting by the row maxima, which cost
four times as much there, and computes a step again with them when that overflows
(:meth:`CachedLogitObjective._centred`).

Temperature: tables are keyed by T, and the ``keep`` most recently used are kept. A
schedule that changes T once an epoch builds one table per epoch (one softmax over
the training set); a T seen recently reuses its table; a T evicted is rebuilt.
Logit noise: pass the batch's noisy teacher logits as ``teacher_logits`` and its rows
are computed for that step instead of being looked up.

Unlabelled images (a transfer set): a label :data:`~kdtune.core.losses.UNLABELLED` gives
its row a zero one-hot, so the image adds nothing to the cross-entropy, and DKD splits on
the teacher's top class (:func:`~kdtune.core.losses.fill_unlabelled`), as
:func:`~kdtune.core.losses.distillation_loss` does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, ClassVar

import numpy as np
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
    fill_unlabelled,
    hard_label_onehot,
    standardize_logits,
    target_split,
    teacher_log_probs,
)

#: Smallest norm or standard deviation divided by in a gradient; where the true value is 0 the
#: vector it scales is 0 too, so this only turns 0/0 into 0 (autograd would give NaN there).
_TINY = 1e-30
#: The libraries a step's arithmetic can run in (see the module docstring).
ARRAY_LIBRARIES = ("numpy", "torch")

#: An array of either library: a step's code only uses what both provide.
Array = Any


def _row_max(x: Array) -> Array:
    """The largest entry along the last axis, as a ``(…, 1)`` column (the one reduction whose
    spelling differs: torch's ``max(axis)`` also returns the indices)."""
    if isinstance(x, np.ndarray):
        return x.max(axis=-1, keepdims=True)
    return x.amax(dim=-1, keepdim=True)


def _row_sum(x: Array, ones: Array) -> Array:
    """Sum along the last axis, as a ``(…, 1)`` column, by a product with ``ones`` ``(C, 1)``: on the
    small arrays of a step a matrix product costs less than a reduction over a short axis."""
    if x.ndim == 2:
        return x @ ones
    return (x.reshape(-1, x.shape[-1]) @ ones).reshape(*x.shape[:-1], 1)


def _total(a: Array, b: Array) -> Array:
    """``Σ a·b`` over every entry (a scalar)."""
    if isinstance(a, np.ndarray):
        return np.vdot(a, b)  # one call, where two reshapes and a product are three
    return a.reshape(-1) @ b.reshape(-1)


class CachedLogitObjective:
    """One run's ``ce_weight·CE + weight·M`` on cached teacher logits (see the module docstring).

    ``teacher_logits`` is ``(N, C)``, or ``(K, N, C)`` for K teachers whose probabilities
    are averaged at temperature T (as :func:`~kdtune.losses.soft_targets` does);
    ``labels`` ``(N,)``: row i belongs to training sample i. They stay on the CPU; the
    tables are built there and moved to ``device``. ``arrays`` is the library a step
    computes in: ``"numpy"`` (CPU only) or ``"torch"``; by default NumPy on the CPU and torch
    elsewhere. Subclasses define the table's rows (:meth:`rows`) and the step (:meth:`_step`).
    """

    name: ClassVar[str] = ""

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, ce_weight: float = 1.0,
                 standardize: bool = False, device: torch.device | str = "cpu", keep: int = 2,
                 arrays: str | None = None) -> None:
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
        self.arrays = arrays or ("numpy" if self.device.type == "cpu" else "torch")
        if self.arrays not in ARRAY_LIBRARIES:
            raise ConfigError("arrays", f"must be one of {', '.join(ARRAY_LIBRARIES)}, got {arrays!r}")
        if self.arrays == "numpy" and self.device.type != "cpu":
            raise ConfigError("arrays", f"numpy computes on the CPU; the objective's device is {self.device}")
        self.xp = np if self.arrays == "numpy" else torch
        with torch.no_grad():
            logits = teacher_logits.to(self.dtype)
            # Standardization does not depend on T: done once per run, before any table.
            self.teacher = standardize_logits(logits) if self.standardize else logits
        self.labels = labels.long()
        #: Whether some image has no label (then the CE's gradient is ``softmax·Σ onehot − onehot``).
        self.unlabelled = bool((self.labels < 0).any())
        self.labels_on_device = self.labels.to(self.device)
        # T → (table, the same as a step's array), most recently used last
        self.tables: OrderedDict[float, tuple[Tensor, Array]] = OrderedDict()
        self._constants: dict[tuple, Any] = {}  # see _constant
        self._last: tuple[float | None, Array] = (None, None)  # the most recently used T and its table
        #: Whether softmax inputs are shifted by their row maxima (always in torch; in NumPy only to
        #: compute again a step whose fast path overflowed; see :meth:`_centred`).
        self._shift_rows = self.arrays != "numpy"

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        """The table rows ``(N, …)`` of these (already standardized, if asked) teacher logits and labels."""
        raise NotImplementedError

    def _step(self, s: Array, rows: Array, temperature: float, weight: float) -> tuple[Array, Array]:
        """The batch's objective and its gradient with respect to ``s`` (``(B, C)``, in the
        compute dtype), from the batch's table ``rows``, in :attr:`xp`'s arrays."""
        raise NotImplementedError

    def loss_and_grad(self, student_logits: Tensor, idx: Tensor | np.ndarray, temperature: float, weight: float = 1.0,
                      teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The batch's objective (a scalar, no autograd graph) and its gradient with respect to ``student_logits``.

        ``idx`` are the batch's training-split indices: a tensor on the device, or a NumPy
        array (the training loop has both; on the CPU the array saves a conversion). ``weight`` multiplies
        the method's term (not the CE). ``teacher_logits`` (``(B, C)`` or ``(K, B, C)``,
        on the device, e.g. with logit noise added) replace the cached teacher for this step.
        Computed in float32 (float64 for a float64 teacher); the gradient has the logits' dtype.
        """
        temperature, weight = float(temperature), float(weight)
        # Detached: nothing below records an autograd graph (torch's arithmetic runs under no_grad too).
        s = student_logits.detach()
        s = s if s.dtype == self.dtype else s.to(self.dtype)
        idx = self._indices(idx)
        if teacher_logits is None:
            rows = self._take(self._table_array(temperature), idx)
        else:
            with torch.no_grad():
                logits = teacher_logits.detach().to(self.dtype)
                labels = self.labels_on_device[torch.as_tensor(idx)]
                rows = self._as_array(self.rows(standardize_logits(logits) if self.standardize else logits,
                                                labels, temperature))
        if self.arrays == "numpy":
            # As in torch, a NaN or inf (a diverging student) propagates without a warning: the
            # training loop reads the loss and reports the run as diverged.
            with np.errstate(all="ignore"):
                logits = s.numpy()
                loss, grad = self._step(logits, rows, temperature, weight)
                if not math.isfinite(loss):  # an overflow on the fast path, or a diverged student
                    self._shift_rows = True
                    try:
                        loss, grad = self._step(logits, rows, temperature, weight)
                    finally:
                        self._shift_rows = False
            loss, grad = torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)
        else:
            with torch.no_grad():
                loss, grad = self._step(s, rows, temperature, weight)
        return loss, grad if grad.dtype == student_logits.dtype else grad.to(student_logits.dtype)

    def table(self, temperature: float) -> Tensor:
        """The whole training split's rows at ``temperature``, on the device (built on first use)."""
        return self._cached_table(temperature)[0]

    def _table_array(self, temperature: float) -> Array:
        # The most recently used table is the last step's (most steps): no need to reorder.
        return self._last[1] if temperature == self._last[0] else self._cached_table(temperature)[1]

    def _cached_table(self, temperature: float) -> tuple[Tensor, Array]:
        key = float(temperature)
        found = self.tables.get(key)
        if found is None:
            _check_hyperparameters(temperature, 0.0)  # a T that has a table was checked when it was built
            with torch.no_grad():
                table = self.rows(self.teacher, self.labels, key).to(self.device).contiguous()
            found = self.tables[key] = (table, self._as_array(table))
            while len(self.tables) > self.keep:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        self._last = (key, found[1])
        return found

    def _as_array(self, tensor: Tensor) -> Array:
        """A step's array of ``tensor``: a zero-copy NumPy view, or the tensor itself."""
        return tensor.numpy() if self.arrays == "numpy" else tensor

    def _indices(self, idx: Tensor | np.ndarray) -> Array:
        """Batch indices, given as a tensor or a NumPy array, as the step's library holds them."""
        if self.arrays == "numpy":
            return idx if isinstance(idx, np.ndarray) else idx.numpy()
        return torch.as_tensor(idx).to(self.device)

    def _take(self, table: Array, idx: Array) -> Array:
        """The table's rows ``idx``, as a new contiguous array (NumPy's ``take`` costs a third of
        fancy indexing on a step's few rows)."""
        return table.take(idx, axis=0) if self.arrays == "numpy" else table.index_select(0, idx)

    def _constant(self, key: tuple, build: Callable[[], Tensor | tuple[Tensor, ...]]) -> Any:
        """What ``build`` makes (a tensor or a tuple of them, in the compute dtype, on the device) as
        the step's arrays, made once per ``key`` (a batch size, T, weight) rather than every step."""
        found = self._constants.get(key)
        if found is None:
            if len(self._constants) > 256:  # a schedule of many values: start over rather than grow
                self._constants.clear()
            built = build()
            found = self._constants[key] = (tuple(map(self._as_array, built)) if isinstance(built, tuple)
                                            else self._as_array(built))
        return found

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=self.dtype, device=self.device)

    def _ones(self, n: int) -> Array:
        """An ``(n, 1)`` column of ones (for :func:`_row_sum`)."""
        return self._constant(("ones", n), lambda: torch.ones(n, 1, dtype=self.dtype, device=self.device))

    def _log_softmax(self, x: Array) -> tuple[Array, Array]:
        """``(log_softmax(x), softmax(x))`` along the last axis.

        Shifted by the row maximum, except on NumPy's fast path (see :meth:`_centred`), where the
        inputs come from logits centred over the classes and are exponentiated as they are.
        """
        shifted = x - _row_max(x) if self._shift_rows else x
        exp = self.xp.exp(shifted)
        total = _row_sum(exp, self._ones(x.shape[-1]))
        return shifted - self.xp.log(total), exp / total

    def _centred(self, s: Array) -> Array:
        """The student's logits centred over the classes, on NumPy's fast path; else as they are.

        Every method's softmaxes are unchanged by adding a constant to a sample's logits (s / T and
        standardize(s) / T with it), and so are the losses and gradients. In NumPy a maximum along
        a short axis costs about four times a matrix product, so the fast path centres s once
        instead of shifting every stacked softmax input by its row maximum: a row's largest entry
        is then ≥ 0 (its total ≥ 1, nothing underflows), and an entry that overflows (one about 88
        above its row's mean, in float32) makes the loss non-finite, and :meth:`loss_and_grad`
        computes that step again with the row maxima. A step's ``s`` is centred this way unless
        :attr:`_shift_rows` is set.
        """
        return s if self._shift_rows else s @ self._centring(s.shape[-1])

    def _centring(self, classes: int) -> Array:
        """The ``(C, C)`` matrix ``I − 11ᵀ / C``: ``s @`` it centres each row of s in one product."""
        return self._constant(("centring", classes), lambda: self._centring_matrix(classes))

    def _centring_matrix(self, classes: int, scales: tuple[float, ...] | None = None) -> Tensor:
        """``I − 11ᵀ / C``, or with ``scales`` the ``(K, C, C)`` stack of it times each scale
        (``s @`` it: K centred copies of s, scaled)."""
        matrix = torch.eye(classes, dtype=self.dtype, device=self.device) - 1.0 / classes
        return matrix if scales is None else torch.stack([matrix * scale for scale in scales])

    def _student(self, s: Array, temperature: float) -> tuple[Array, tuple[Array, Array] | None]:
        """``(z, back)``: ``z = u / T`` and (standardizing) what :meth:`_to_logits` needs to take a
        gradient from z back to s.

        Standardizing, ``z = d·κ`` with ``d = s − mean(s)``, ``κ = 1 / (T·(σ + ε))`` and
        ``σ = ‖d‖ / √(C − 1)`` (torch's unbiased std), computed as such: fewer operations than
        :func:`~kdtune.losses.standardize_logits` followed by a division, the same numbers up to rounding.
        On the fast path ``s`` is already centred (:meth:`_centred`).
        """
        if not self.standardize:
            return s / temperature, None
        classes = s.shape[-1]
        ones = self._ones(classes)
        d = s @ self._centring(classes) if self._shift_rows else s
        norm = self.xp.sqrt(_row_sum(d * d, ones))
        sigma_scale = temperature / math.sqrt(classes - 1)  # T·σ = ‖d‖·sigma_scale
        kappa = 1.0 / (norm * sigma_scale + temperature * STANDARDIZE_EPS)
        return d * kappa, (kappa, sigma_scale / norm.clip(_TINY))

    def _to_logits(self, grad_z: Array, z: Array, back: tuple[Array, Array]) -> Array:
        """``∂/∂s`` from ``∂/∂z`` when standardizing (``back`` from :meth:`_student`).

        Standardizing (see :meth:`_student`): ``∂/∂s = κ·(g − mean(g)) − z·⟨g, z⟩·μ`` with
        ``μ = T / (√(C − 1)·‖d‖)``, computed without the ``mean(g)``: every method's gradient with
        respect to z sums to 0 over the classes (each loss is unchanged by adding a constant to a
        sample's z), so it would only move float rounding.
        """
        kappa, mu = back
        return grad_z * kappa - z * (_row_sum(grad_z * z, self._ones(z.shape[-1])) * mu)


class _LinearInLogProbs(CachedLogitObjective):
    """Objectives of the form ``Σ_k ⟨W_k, log_softmax(x_k) − log t_k⟩`` over K stacked inputs.

    Row 0 is the cross-entropy (``x_0 = s``, ``W_0 = −(ce_weight / B)·onehot``, ``log t_0 = 0``);
    rows 1.. are the method's (``x_k = z + offset_k``, ``W_k = weight·T²/B·w_k``). The table
    holds, per sample, ``[w | log t | offset]`` for every row (``(N, 3, K, C)``), the unscaled
    weights ``w`` being the loss's gradient with respect to the log-probabilities. A step is then
    one stacked log-softmax, its backward applied to the weights (``W − softmax·ΣW``, the
    gradient with respect to every ``x_k``), one weighted sum for the loss, and the sum of the
    rows' gradients (rows 1.. divided by T): the form of :func:`~kdtune.losses.fused_kd_loss_and_grad`.
    """

    #: Whether some row's inputs are offset (otherwise the offsets are all 0 and not added).
    offsets: ClassVar[bool] = True

    def _teacher_rows(self, log_p: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The method's ``(w, log t, offset)``, each ``(N, K − 1, C)``."""
        raise NotImplementedError

    def _scales(self, batch: int, rows_k: int, temperature: float, weight: float) -> tuple[Array, Array]:
        """The rows' loss weights (CE, then the method's) and their inputs' scales (s, then s / T), as
        ``(K, 1)`` columns."""
        return self._constant(("scales", batch, rows_k, temperature, weight), lambda: (
            self._tensor([[self.ce_weight / batch]] + [[weight * temperature**2 / batch]] * (rows_k - 1)),
            self._tensor([[1.0]] + [[1.0 / temperature]] * (rows_k - 1))))

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        log_p = teacher_log_probs(teacher_logits, temperature).to(self.dtype)
        targets = fill_unlabelled(labels, teacher_logits) if self.unlabelled else labels
        target = F.one_hot(targets, self.num_classes).to(log_p.dtype)
        weights, log_targets, offsets = self._teacher_rows(log_p, target)
        onehot = hard_label_onehot(labels, self.num_classes, log_p.dtype) if self.unlabelled else target
        zeros = torch.zeros_like(onehot).unsqueeze(1)
        return torch.stack((torch.cat((-onehot.unsqueeze(1), weights), dim=1),
                            torch.cat((zeros, log_targets), dim=1), torch.cat((zeros, offsets), dim=1)), dim=1)

    def _step(self, s: Array, rows: Array, temperature: float, weight: float) -> tuple[Array, Array]:
        xp, batch, rows_k = self.xp, s.shape[0], rows.shape[2]
        s = self._centred(s)
        weights, log_targets = rows[:, 0], rows[:, 1]
        scale, per_input = self._scales(batch, rows_k, temperature, weight)
        if self.standardize:  # rows 1.. are functions of z = standardize(s) / T, row 0 of s
            z, back = self._student(s, temperature)
            inputs = xp.concatenate((s[:, None],) + (z[:, None],) * (rows_k - 1), axis=1)
        else:  # s, then s / T in one product (z itself is not needed)
            z, back = None, None
            inputs = s[:, None] * per_input
        if self.offsets:
            inputs = inputs + rows[:, 2]
        log_probs, probs = self._log_softmax(inputs)
        weights = weights * scale  # ∂loss/∂log-probabilities
        grads = weights - probs * _row_sum(weights, self._ones(weights.shape[-1]))
        loss = _total(weights, log_probs - log_targets)
        method = grads[:, 1]  # the gradient with respect to z: the method's rows summed
        for k in range(2, rows_k):
            method = method + grads[:, k]
        if back is None:
            return loss, grads[:, 0] + method * (1.0 / temperature)
        return loss, grads[:, 0] + self._to_logits(method, z, back)


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

    Table rows ``(N, 3, C)``: the label's one-hot (zeros for an unlabelled image), the teacher's
    probabilities p and p centred over the classes (b̃). The intra-class term centres each class
    over the batch, so its teacher side is computed per step from the batch's p. With ``ρ = ⟨ã, b̃⟩ / D``, ``D = ‖ã‖‖b̃‖ + ε``, for
    centred ã (student) and b̃ (teacher), ``∂ρ/∂a = b̃ / D − ρ·‖b̃‖·ã / (‖ã‖·D)``; then through the
    softmax. The student's rows sum to 1, so centring them over the classes is subtracting 1/C.
    DIST's CIFAR-100 recipe: ``ce_weight = 1``, T = 4, β = γ = 1 with ``weight = 2``
    (equivalently β = γ = 2, ``weight = 1``).
    """

    name = "dist"

    def __init__(self, teacher_logits: Tensor, labels: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
                 **kwargs) -> None:
        _check_nonnegative(dist_beta=beta, dist_gamma=gamma)
        self.beta, self.gamma = float(beta), float(gamma)
        super().__init__(teacher_logits, labels, **kwargs)

    def rows(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        p = teacher_log_probs(teacher_logits, temperature).to(self.dtype).exp()
        centred = p - p.mean(dim=1, keepdim=True)
        return torch.stack((hard_label_onehot(labels, self.num_classes, p.dtype), p, centred), dim=1)

    def _constants_of(self, batch: int, classes: int, temperature: float, weight: float) -> tuple[Array, ...]:
        """A step's constants, looked up once per step (one lookup costs as much as a small operation):

        - ``(2, C, C)``, the centring matrix times 1 and times 1 / T (``s @`` it: the CE's s and the
          method's s / T, centred, in one product; see :meth:`_centring`);
        - ``(B + C, 1)``, ρ's weight per row of the stacked correlations: T²·β / B for the samples'
          and T²·γ / C for the classes', divided by T so that the gradient is with respect to q
          already divided by T;
        - a zeroed ``(2, B + C, max(B, C))`` buffer holding a and b (one product takes every norm
          of both), reused every step, its two halves a and b, and the views a step fills: a's and
          b's ``(B, C)`` sample rows and the ``(2, C, B)`` class rows of both (assigning to a view
          made once costs half of slicing on every step);
        - the ``(B, B)`` matrix ``I − 11ᵀ / B`` (``columnsᵀ @`` it: each column centred over the batch,
          transposed); ones ``(max(B, C), 1)`` and ``(C, 1)``.
        """
        def build() -> tuple[Tensor, ...]:
            width = max(batch, classes)
            ab = torch.zeros(2, batch + classes, width, dtype=self.dtype, device=self.device)
            return (self._centring_matrix(classes, (1.0, 1.0 / temperature)),
                    self._tensor([[weight * temperature * self.beta / batch]] * batch
                                 + [[weight * temperature * self.gamma / classes]] * classes),
                    ab, ab[0], ab[1], ab[0, :batch, :classes], ab[1, :batch, :classes], ab[:, batch:, :batch],
                    self._centring_matrix(batch),
                    torch.ones(width, 1, dtype=self.dtype, device=self.device),
                    torch.ones(classes, 1, dtype=self.dtype, device=self.device))
        return self._constant(("dist", batch, classes, temperature, weight), build)

    def _step(self, s: Array, rows: Array, temperature: float, weight: float) -> tuple[Array, Array]:
        xp, (batch, classes) = self.xp, s.shape
        (centring, rho_weights, ab, a, b, a_samples, b_samples, ab_classes, centring_b, ones,
         ones_c) = self._constants_of(batch, classes, temperature, weight)
        onehot, p = rows[:, 0], rows[:, 1]
        if self.standardize:
            s = self._centred(s)
            z, back = self._student(s, temperature)
            stacked = xp.concatenate((s, z), axis=0)
        else:  # s and s / T, both centred (whichever the path: it changes no softmax), in one product
            back, stacked = None, (s @ centring).reshape(2 * batch, classes)
            z = stacked[batch:]
        if self.ce_weight:  # one softmax for the CE on s and the method on z, stacked as (2B, C)
            log_probs, probs = self._log_softmax(stacked)
            q = probs[batch:]
        else:
            _, q = self._log_softmax(z)
        # Intra-class: each class across the batch, the student's and the teacher's columns centred
        # at once, transposed: (2, C, B), the C classes of q, then of p.
        columns = (xp.concatenate((q, p), axis=1).T @ centring_b).reshape(2, classes, batch)
        # Every correlation in one pass: the rows of a and b are the B samples across the classes
        # (inter-class; a sample's probabilities sum to 1, so centring them is subtracting 1/C), then
        # the C classes across the batch (intra-class, transposed), zero-padded to a common width:
        # zeros add nothing to a dot product or a norm. The padding is set once, with the buffers;
        # a and b share one buffer, so that one product takes every norm of both.
        a_samples[...] = q - 1.0 / classes
        b_samples[...] = rows[:, 2]
        ab_classes[...] = columns
        norms = xp.sqrt((ab * ab) @ ones)  # (2, B + C, 1): ‖a‖ and ‖b‖ of every row
        norm_a, norm_b = norms[0], norms[1]
        # ρ = ⟨a, b⟩ / D with D = ‖a‖‖b‖ + ε; r = ρ's weight / D; ∂(weight·ρ)/∂a = r·b − (r·⟨a, b⟩·‖b‖ / (‖a‖·D))·a.
        denom = norm_a * norm_b + DIST_EPS
        r = rho_weights / denom
        r_dot = r * ((a * b) @ ones)
        grad_rows = a * (r_dot * norm_b / (norm_a.clip(_TINY) * denom)) - b * r
        grad_q = grad_rows[:batch, :classes] + grad_rows[batch:, :batch].T
        loss = weight * temperature**2 * (self.beta + self.gamma) - temperature * r_dot.sum()
        grad = q * (grad_q - _row_sum(grad_q * q, ones_c))  # back through the softmax
        if back is not None:
            grad = self._to_logits(grad * temperature, z, back)
        if self.ce_weight:
            ce = self.ce_weight / batch
            loss = loss - ce * _total(onehot, log_probs[:batch])
            if self.unlabelled:  # an image without a label has a zero one-hot and no CE gradient
                grad = grad + ce * (probs[:batch] * _row_sum(onehot, ones_c) - onehot)
            else:
                grad = grad + ce * (probs[:batch] - onehot)
        return loss, grad


#: The cached objective of each method, by the name the LOSSES registry gives it.
CACHED_OBJECTIVES: dict[str, type[CachedLogitObjective]] = {
    cls.name: cls for cls in (CachedKD, CachedDKD, CachedDIST)
}
