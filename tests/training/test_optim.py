"""Optimisers and per-step LR schedules built from a TrainConfig: the numbers they produce."""

import math

import pytest
import torch
from torch import nn

from maestro_lod.errors import ConfigError
from maestro_lod.training.optim import build_optimizer, build_scheduler, continue_schedule, lr_factor
from maestro_lod.training.train_config import TrainConfig


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _factors(config, steps_per_epoch, steps):
    factor = lr_factor(config, steps_per_epoch)
    return [factor(s) for s in steps]


def test_sgd_takes_every_option_and_the_parameters_in_module_order():
    model = _model()
    config = TrainConfig(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups  # one group: weight decay applies to every parameter alike
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.8, True, 1e-3)


def test_sgd_update_applies_lr_and_weight_decay():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    holder = nn.Module()
    holder.weight = weight
    optimizer = build_optimizer(holder, TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.5))
    weight.grad = torch.tensor([0.2, 0.4])
    optimizer.step()
    # w − lr·(g + wd·w) = [1 − 0.1·(0.2 + 0.5), −2 − 0.1·(0.4 − 1.0)]
    torch.testing.assert_close(weight.detach(), torch.tensor([0.93, -1.94]))


def test_adamw_takes_betas_and_decoupled_weight_decay():
    model = _model()
    config = TrainConfig(optimizer="adamw", lr=2e-3, betas=[0.8, 0.95], weight_decay=0.01)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.8, 0.95) and group["lr"] == 2e-3 and group["weight_decay"] == 0.01
    weight = nn.Parameter(torch.tensor([2.0]))
    holder = nn.Module()
    holder.weight = weight
    optimizer = build_optimizer(holder, config)
    weight.grad = torch.tensor([3.0])
    optimizer.step()
    # first Adam step moves by lr·sign(g) (bias-corrected m/√v = g/|g|), after decay w·(1 − lr·wd)
    assert weight.item() == pytest.approx(2.0 * (1 - 2e-3 * 0.01) - 2e-3, rel=1e-6)


def test_unknown_optimizer_or_schedule_is_refused_listing_the_choices():
    with pytest.raises(ConfigError, match="optimizer='adam' is not one of .*adamw"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="schedule='linear'"):
        TrainConfig(schedule="linear")


def test_constant_schedule():
    assert _factors(TrainConfig(schedule="constant"), 7, [0, 1, 50, 10_000]) == [1.0, 1.0, 1.0, 1.0]


def test_multistep_drops_by_gamma_at_the_milestone_fractions_of_the_steps():
    config = TrainConfig(schedule="multistep", epochs=10, milestones=[0.5, 0.75], gamma=0.1)
    # 30 steps (3 per epoch): milestones at steps int(15.0) = 15 and int(22.5) = 22
    factors = _factors(config, 3, [0, 14, 15, 21, 22, 29])
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    config = TrainConfig(schedule="multistep", epochs=3, milestones=[0.5], gamma=0.5)
    assert _factors(config, 4, [5, 6, 11]) == [1.0, 0.5, 0.5]  # 12 steps: step 6
    config = TrainConfig(schedule="multistep", epochs=1, milestones=[0.9], gamma=0.1)
    assert _factors(config, 10, [0, 8, 9]) == pytest.approx([1.0, 1.0, 0.1], rel=1e-12)  # one epoch anneals too


def test_cosine_anneals_to_zero_over_all_steps():
    config = TrainConfig(schedule="cosine", epochs=2)  # 10 steps of 5 per epoch
    for step, expected in ((0, 1.0), (5, 0.5), (10, 0.0), (12, 0.0), (2, 0.5 * (1 + math.cos(math.pi * 0.2)))):
        assert lr_factor(config, 5)(step) == pytest.approx(expected, abs=1e-12), step


def test_cosine_with_warmup_ramps_linearly_then_anneals_after_the_warmup():
    config = TrainConfig(schedule="cosine", epochs=2, warmup_steps=2)
    # total 10 steps, warm-up 2: ramp (s+1)/2, then cosine over the 8 steps after it
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 4: 0.5 * (1 + math.cos(math.pi * 2 / 8)), 10: 0.0}
    factor = lr_factor(config, 5)
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, abs=1e-12), step


def test_warmup_applies_to_constant_and_multistep_schedules():
    config = TrainConfig(schedule="constant", warmup_steps=4)
    assert _factors(config, 10, [0, 1, 2, 3, 4, 99]) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    config = TrainConfig(schedule="multistep", epochs=4, milestones=[0.25], gamma=0.1, warmup_steps=4)
    # 8 steps: milestone at step 2, inside the warm-up: both multiply
    assert _factors(config, 2, [0, 1, 2, 3, 5]) == pytest.approx([0.25, 0.5, 0.075, 0.1, 0.1], rel=1e-12)


def test_noam_is_its_own_warmup_with_its_peak_at_the_warmup_step():
    config = TrainConfig(schedule="noam", optimizer="adamw", warmup_steps=4)
    factors = _factors(config, 3, [0, 1, 3, 4, 15])
    assert factors == pytest.approx([0.25, 0.5, 1.0, math.sqrt(4 / 5), 0.5], rel=1e-12)
    assert max(_factors(config, 3, range(100))) == 1.0
    with pytest.raises(ConfigError, match="noam' needs warmup_steps > 0"):
        TrainConfig(schedule="noam")


def test_scheduler_sets_the_optimiser_lr_every_step_and_continues_from_a_saved_position():
    config = TrainConfig(schedule="cosine", epochs=2, warmup_steps=2, lr=0.2)
    model = _model()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    factor = lr_factor(config, 5)
    seen = []
    for step in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * factor(s) for s in range(6)], rel=1e-12)
    assert seen[0] == pytest.approx(0.1) and seen[1] == pytest.approx(0.2)
    saved = scheduler.state_dict()
    fresh = build_optimizer(model, config)
    resumed = build_scheduler(fresh, config, steps_per_epoch=5)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1)  # a new schedule starts at step 0
    continue_schedule(resumed, saved)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.2 * factor(6), rel=1e-12)
    fresh.step()
    resumed.step()
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.2 * factor(7), rel=1e-12)
