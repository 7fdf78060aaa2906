"""Post-training truncated SVD: train dense, then replace every candidate layer by its truncated
SVD (Eckart–Young: the best approximation at each rank) within a budget, and optionally fine-tune.

Budgets: ``svd_energy`` keeps per layer the fewest singular values whose squares hold that fraction
of ``Σσ²``; without it every layer keeps ``ceil(rank_ratio · full rank)``. ``svd_finetune_epochs``
of the run's epochs train the truncated model (plain cross-entropy); with 0 the truncation happens
after the last epoch's steps, before its evaluation. The ``factorize`` table chooses the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import FactorizeConfig
from ..errors import ConfigError
from ..training.methods import TrainingMethod
from ..training.options import EPOCH_LIMIT, MethodConfig, check_int, check_number
from ..training.protocols import TrainerView
from ..training.registries import METHODS
from ..training.train_config import TrainConfig
from .layer_choice import weight_matrices


@dataclass
class SvdConfig(MethodConfig):
    """The options of post-training SVD: ``svd_energy`` keeps per layer the fewest singular values
    holding this fraction of ``Σσ²`` (None: every layer at the uniform ``rank_ratio`` of its full
    rank); ``svd_finetune_epochs`` are trained after the truncation (the run's last ones; 0
    truncates after the last epoch's steps)."""

    rank_ratio: float = 0.25
    svd_energy: float | None = None
    svd_finetune_epochs: int = 0

    def __post_init__(self) -> None:
        check_number("rank_ratio", self.rank_ratio, 0.0, strict=True, high=1.0)
        if self.svd_energy is not None:
            check_number("svd_energy", self.svd_energy, 0.0, strict=True, high=1.0)
        check_int("svd_finetune_epochs", self.svd_finetune_epochs, 0, EPOCH_LIMIT)


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values of ``matrix`` (``groups × m × n``: the largest over the
    groups) whose squares hold at least ``energy`` of the total."""
    rank = 1
    for block in matrix.float():
        squares = torch.linalg.svdvals(block) ** 2
        share = squares.cumsum(0) / squares.sum().clamp_min(torch.finfo(squares.dtype).tiny)
        rank = max(rank, int((share < energy - 1e-6).sum().item()) + 1)
    return min(rank, min(matrix.shape[-2:]))


def budget_ranks(matrices: dict[str, torch.Tensor], options: SvdConfig) -> dict[str, int]:
    """The rank of every layer under the run's budget (energy threshold or uniform ratio)."""
    if options.svd_energy is not None:
        return {name: energy_rank(matrix, options.svd_energy) for name, matrix in matrices.items()}
    return {name: max(1, math.ceil(options.rank_ratio * min(matrix.shape[-2:]))) for name, matrix in matrices.items()}


@METHODS.register("svd")
class SvdMethod(TrainingMethod):
    """Dense training for ``epochs - svd_finetune_epochs`` epochs, truncated SVD to the budget,
    then the remaining epochs fine-tune the truncated model with a fresh optimiser."""

    label = "post-hoc SVD"
    config_class = SvdConfig

    def __init__(self) -> None:
        self.ranks: dict[str, int] | None = None

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        finetune = config.method_options.svd_finetune_epochs
        if finetune >= config.epochs:
            raise ConfigError(f"svd_finetune_epochs={finetune} leaves no dense epoch of "
                              f"epochs={config.epochs}")

    def factorize_config(self, trainer: TrainerView) -> FactorizeConfig:
        base = trainer.config.factorize_config()
        if self.ranks is None:
            self.ranks = budget_ranks(weight_matrices(trainer.model, base), trainer.config.method_options)
        return FactorizeConfig.from_dict({**base.to_dict(), "rank": None, "rank_pattern": dict(self.ranks)})

    def after_steps(self, trainer: TrainerView, epoch: int) -> None:
        finetune = trainer.config.method_options.svd_finetune_epochs
        if not trainer.factorized and epoch == trainer.config.epochs - finetune:
            trainer.factorize_model(self.factorize_config(trainer))

    def recalibrates(self, trainer: TrainerView) -> bool:
        return trainer.factorized

    def phase(self, trainer: TrainerView) -> str:
        return "svd-finetune" if trainer.factorized else "dense"

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = state.get("ranks")
