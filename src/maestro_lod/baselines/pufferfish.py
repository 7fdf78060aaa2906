"""Pufferfish: train at full rank for a warm-up, factorise every candidate layer at one fixed rank
ratio (¼) by truncated SVD, and train the factorised model plainly (cross-entropy; no sampled
sub-models, no regulariser, no shrinking). The layers kept dense follow the per-model table of
:mod:`.layers`.

Options: ``rank_ratio`` (¼), ``dense_share`` (share of the epochs at full rank, ¼ by default:
``round(dense_share · epochs)`` epochs); a ``factorize.exclude_modules`` replaces the table's
dense-kept layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import FactorizeConfig
from ..errors import ConfigError
from ..training.methods import METHODS, TrainingMethod
from .layer_choice import PUFFERFISH_DENSE, dense_kept_config, kept_dense

if TYPE_CHECKING:
    from ..training.train_config import TrainConfig
    from ..training.loop import Trainer


def warmup_epochs(config: "TrainConfig") -> int:
    """Full-rank epochs before Pufferfish factorises."""
    return round(config.dense_share * config.epochs)


@METHODS.register("pufferfish")
class PufferfishMethod(TrainingMethod):
    """Full-rank warm-up, then SVD factorisation at ``rank_ratio`` and a fresh optimiser that
    continues the LR schedule; plain training of the factorised model."""

    name = "pufferfish"
    label = "Pufferfish"

    @classmethod
    def check_config(cls, config: "TrainConfig") -> None:
        if warmup_epochs(config) >= config.epochs:
            raise ConfigError(f"dense_share={config.dense_share} leaves no factorised epoch of epochs={config.epochs}")

    def factorize_config(self, trainer: "Trainer") -> FactorizeConfig:
        kept = kept_dense(trainer.config.model, trainer.model, PUFFERFISH_DENSE)
        return dense_kept_config(trainer.config.factorize_config(), kept, rank=trainer.config.rank_ratio)

    def setup(self, trainer: "Trainer") -> None:
        if not trainer.factorized and warmup_epochs(trainer.config) == 0:
            trainer.factorize_model(self.factorize_config(trainer))

    def before_epoch(self, trainer: "Trainer", epoch: int) -> None:
        if not trainer.factorized and epoch > warmup_epochs(trainer.config):
            trainer.factorize_model(self.factorize_config(trainer))

    def phase(self, trainer: "Trainer") -> str:
        return "pufferfish" if trainer.factorized else "dense-warmup"
