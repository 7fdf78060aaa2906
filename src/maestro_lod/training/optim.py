"""Optimiser and learning-rate schedule of a run, built from its :class:`TrainConfig`.

The schedule is a ``LambdaLR`` stepped once per optimisation step, so every schedule (including the
Transformer's Noam warm-up) shares one code path and its state is two plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .registries import OPTIMIZERS, SCHEDULES
from .train_config import TrainConfig


@OPTIMIZERS.register("sgd")
def _sgd(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` over ``model.parameters()`` in module order.

    The order matters: a resumed run rebuilds the optimiser on a freshly built model and loads the
    saved state by parameter position.
    """
    return OPTIMIZERS.lookup(config.optimizer)(list(model.parameters()), config)


@SCHEDULES.register("constant")
def _constant(config: TrainConfig, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    return lambda step: 1.0


@SCHEDULES.register("multistep")
def _multistep(config: TrainConfig, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """×``gamma`` at each milestone, a fraction of the run's optimisation steps (``0.9``: the last
    10 % of the steps, also in a run of one epoch; a milestone at a whole epoch falls on its first step)."""
    milestones = [int(m * total) for m in config.milestones]
    return lambda step: config.gamma ** sum(step >= m for m in milestones)


@SCHEDULES.register("cosine")
def _cosine(config: TrainConfig, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Cosine annealing to 0 over the steps after the warm-up."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@SCHEDULES.register("noam")
def _noam(config: TrainConfig, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The Transformer schedule ``min(s/w, sqrt(w/s))``: it is its own warm-up (peak at step w)."""
    warmup = config.warmup_steps
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of ``config.lr`` at optimisation step ``s`` (0-based): the schedule, times a
    linear warm-up over ``warmup_steps`` (except for ``noam``, which has its own)."""
    schedule = SCHEDULES.lookup(config.schedule)(config, config.epochs * steps_per_epoch, steps_per_epoch)
    warmup = 0 if config.schedule == "noam" else config.warmup_steps
    if not warmup:
        return schedule
    return lambda step: min(1.0, (step + 1) / warmup) * schedule(step)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` implementing ``config.schedule``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Load a scheduler's saved position and apply its current rates to the (new) optimiser."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
