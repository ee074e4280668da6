"""Learning-rate schedules: values at known epochs, their use in a run, and resumption."""

from __future__ import annotations

import copy
import math

import pytest

from kdtune.core.distill import RunConfig, run
from kdtune.core.schedules import Schedule, parse_schedule
from kdtune.errors import ConfigError

PROTOCOL = {"kind": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}


def test_constant_schedule_keeps_the_base_value():
    assert parse_schedule("constant") is None
    assert Schedule(0.05, 240, None).values() == [0.05] * 240


@pytest.mark.parametrize("milestones", [[150, 180, 210], [0.625, 0.75, 0.875]])
def test_multistep_drops_after_each_milestone_like_repdistiller(milestones):
    schedule = Schedule(0.05, 240, parse_schedule({**PROTOCOL, "milestones": milestones}))
    # RepDistiller: steps = sum(epoch > milestones); epoch 150 still runs at the base rate.
    expected = {1: 0.05, 150: 0.05, 151: 0.005, 180: 0.005, 181: 0.0005, 210: 0.0005, 211: 0.00005, 240: 0.00005}
    for epoch, lr in expected.items():
        assert schedule.value(epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_warms_up_linearly_then_follows_a_half_cosine_to_the_floor():
    schedule = Schedule(0.1, 100, parse_schedule({"kind": "cosine", "warmup": 5, "min_factor": 0.01}))
    assert [schedule.value(e) for e in range(1, 6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert schedule.value(6) == pytest.approx(0.1)  # the cosine starts at the base
    floor = 0.001
    for epoch in (30, 55, 100):
        progress = (epoch - 6) / 95
        assert schedule.value(epoch) == pytest.approx(floor + (0.1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    # A fractional warm-up is a share of the budget: 0.05 of 100 epochs is 5.
    fractional = Schedule(0.1, 100, parse_schedule({"kind": "cosine", "warmup": 0.05, "min_factor": 0.01}))
    assert fractional.values() == pytest.approx(schedule.values())


def test_a_schedule_is_over_the_full_budget_not_the_epochs_run():
    # A trial stopped at epoch 30 of a 240-epoch budget was at the protocol's base rate.
    schedule = Schedule(0.05, 240, parse_schedule(PROTOCOL))
    assert schedule.values()[:30] == [0.05] * 30


@pytest.mark.parametrize("raw, field", [
    ("step", "lr_schedule.kind"),
    ({"kind": "multistep", "milestones": [180, 150]}, "lr_schedule.milestones"),
    ({"kind": "multistep", "milestones": [150], "gamma": 2.0}, "lr_schedule.gamma"),
    ({"kind": "cosine", "warmup": -1}, "lr_schedule.warmup"),
    ({"kind": "cosine", "milestones": [3]}, "lr_schedule.milestones"),
    (5, "lr_schedule"),
])
def test_bad_schedules_name_the_key_and_what_is_allowed(raw, field):
    with pytest.raises(ConfigError) as raised:
        parse_schedule(raw)
    assert raised.value.field == field


def test_a_run_trains_at_the_scheduled_rate_and_a_resumed_run_continues_on_it(digits, one_torch_thread):
    schedule = {"kind": "multistep", "milestones": [1, 2], "gamma": 0.5}
    config = RunConfig(family="mlp", width=16, epochs=3, lr=0.02, alpha=1.0, optimizer="sgd", lr_schedule=schedule,
                       train_subset=200)
    states = {}
    whole = run(config, digits, on_checkpoint=lambda e, s: states.__setitem__(e, copy.deepcopy(s)), checkpoint_every=1)
    assert [h["lr"] for h in whole.history] == pytest.approx([0.02, 0.01, 0.005])
    constant = run(config.replace(lr_schedule=None), digits)
    assert [h["lr"] for h in constant.history] == [0.02] * 3
    assert whole.history[-1]["train_loss"] != constant.history[-1]["train_loss"]

    resumed = run(config, digits, resume_state=states[1])
    assert [h["lr"] for h in resumed.history] == pytest.approx([0.02, 0.01, 0.005])
    for a, b in zip(whole.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]
