"""The private Ray, Optuna and torch internals kdtune relies on are still there and
behave: each wrapper fails loudly when a release changes them (fast checks)."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from kdtune.core import losses
from kdtune.search import private_apis
from kdtune.search.sampler import KdOptunaSearch


def _searcher() -> KdOptunaSearch:
    space = {"temperature": optuna.distributions.FloatDistribution(1.0, 10.0, log=True)}
    return KdOptunaSearch(space=space, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0))


def test_optuna_search_internals_are_reachable():
    searcher = _searcher()
    assert isinstance(private_apis.optuna_study(searcher), optuna.Study)
    assert private_apis.optuna_trials(searcher) == {}
    assert private_apis.told_trials(searcher) == set()
    config = searcher.suggest("t1")
    assert 1.0 <= config["temperature"] <= 10.0
    assert private_apis.optuna_trials(searcher)["t1"].user_attrs["ray_trial_id"] == "t1"


def test_a_missing_internal_fails_loudly_with_the_versions():
    class Bare:
        pass

    with pytest.raises(private_apis.PrivateApiChanged, match=r"_ot_trials.*ray \d"):
        private_apis.optuna_trials(Bare())


def test_fail_lost_trial_marks_fail_with_the_attribute():
    study = optuna.create_study()
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    private_apis.fail_lost_trial(study, frozen, "lost_on_restart")
    after = study.get_trials(deepcopy=False)[trial.number]
    assert after.state == optuna.trial.TrialState.FAIL
    assert after.user_attrs == {"lost_on_restart": True}


def test_ray_auth_mode_can_be_reloaded():
    private_apis.reload_ray_auth_mode()  # raises PrivateApiChanged when Ray drops it


def _reference_grad(student: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """d/ds of Σ ⟨w_k, log_softmax(s / τ_k)⟩ with τ = (1, T), by autograd (the definition)."""
    s = student.clone().requires_grad_(True)
    log_probs = torch.log_softmax(torch.stack((s, s / temperature), dim=1), dim=-1)
    (log_probs * weights).sum().backward()
    return s.grad


@pytest.mark.parametrize("backward", ["private", "formula"])
def test_fused_kd_gradient_with_and_without_the_private_kernel(monkeypatch, backward: str):
    """The fused KD path takes torch's private log-softmax backward when it works and the
    formula otherwise; both give autograd's gradient (the private one bit for bit)."""
    if backward == "formula":
        monkeypatch.setattr(losses, "log_softmax_backward", losses._autograd_log_softmax_backward)
    else:
        assert losses._private_kernel_works(), "torch's private kernel changed: the fused path is on its fallback"
        monkeypatch.setattr(losses, "log_softmax_backward", losses._private_log_softmax_backward)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 10, generator=generator)
    teacher = torch.randn(16, 10, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    temperature, alpha = 3.0, 0.3
    probs = losses.soft_targets(teacher, temperature)
    weights = losses.kd_loss_weights(probs, labels, temperature, alpha, 16)
    loss, grad = losses.fused_kd_loss_and_grad(student, weights, losses.kd_log_targets(probs), temperature)
    expected = _reference_grad(student, weights, temperature)
    if backward == "private":
        assert torch.equal(grad, expected)
    else:
        assert torch.allclose(grad, expected, atol=1e-7, rtol=1e-5)
    reference = losses.distillation_loss(student, teacher, labels, temperature, alpha)
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)


def test_a_broken_private_kernel_is_detected(monkeypatch):
    def changed_signature(grad_output, output, dim, dtype, extra):  # a future torch's shape
        raise AssertionError("never called with the old arguments")

    monkeypatch.setattr(torch, "_log_softmax_backward_data", changed_signature, raising=False)
    assert not losses._private_kernel_works()
    monkeypatch.delattr(torch, "_log_softmax_backward_data")
    assert not losses._private_kernel_works()
