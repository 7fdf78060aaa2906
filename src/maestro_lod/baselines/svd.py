"""Post-training truncated SVD: train dense, then replace every candidate layer by its truncated
SVD (Eckart–Young: the best approximation at each rank) within a budget, and optionally fine-tune.

Budgets: ``svd_energy`` keeps per layer the fewest singular values whose squares hold that fraction
of ``Σσ²``; without it every layer keeps ``ceil(rank_ratio · full rank)``. ``svd_finetune_epochs``
of the run's epochs train the truncated model (plain cross-entropy); with 0 the truncation happens
after the last epoch's steps, before its evaluation. The ``factorize`` table chooses the layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..config import FactorizeConfig
from ..errors import ConfigError
from ..training.methods import METHODS, TrainingMethod
from .layer_choice import weight_matrices

if TYPE_CHECKING:
    from ..training.train_config import TrainConfig
    from ..training.loop import Trainer


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values of ``matrix`` (``groups × m × n``: the largest over the
    groups) whose squares hold at least ``energy`` of the total."""
    rank = 1
    for block in matrix.float():
        squares = torch.linalg.svdvals(block) ** 2
        share = squares.cumsum(0) / squares.sum().clamp_min(torch.finfo(squares.dtype).tiny)
        rank = max(rank, int((share < energy - 1e-6).sum().item()) + 1)
    return min(rank, min(matrix.shape[-2:]))


def budget_ranks(matrices: dict[str, torch.Tensor], config: "TrainConfig") -> dict[str, int]:
    """The rank of every layer under the run's budget (energy threshold or uniform ratio)."""
    if config.svd_energy is not None:
        return {name: energy_rank(matrix, config.svd_energy) for name, matrix in matrices.items()}
    return {name: max(1, math.ceil(config.rank_ratio * min(matrix.shape[-2:]))) for name, matrix in matrices.items()}


@METHODS.register("svd")
class SvdMethod(TrainingMethod):
    """Dense training for ``epochs - svd_finetune_epochs`` epochs, truncated SVD to the budget,
    then the remaining epochs fine-tune the truncated model with a fresh optimiser."""

    name = "svd"
    label = "post-hoc SVD"

    def __init__(self) -> None:
        self.ranks: dict[str, int] | None = None

    @classmethod
    def check_config(cls, config: "TrainConfig") -> None:
        if config.svd_finetune_epochs >= config.epochs:
            raise ConfigError(f"svd_finetune_epochs={config.svd_finetune_epochs} leaves no dense epoch of "
                              f"epochs={config.epochs}")

    def factorize_config(self, trainer: "Trainer") -> FactorizeConfig:
        base = trainer.config.factorize_config()
        if self.ranks is None:
            self.ranks = budget_ranks(weight_matrices(trainer.model, base), trainer.config)
        return FactorizeConfig.from_dict({**base.to_dict(), "rank": None, "rank_pattern": dict(self.ranks)})

    def after_steps(self, trainer: "Trainer", epoch: int) -> None:
        if not trainer.factorized and epoch == trainer.config.epochs - trainer.config.svd_finetune_epochs:
            trainer.factorize_model(self.factorize_config(trainer))

    def recalibrates(self, trainer: "Trainer") -> bool:
        return trainer.factorized

    def phase(self, trainer: "Trainer") -> str:
        return "svd-finetune" if trainer.factorized else "dense"

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = state.get("ranks")
