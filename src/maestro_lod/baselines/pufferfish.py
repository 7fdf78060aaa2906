"""Pufferfish: train at full rank for a warm-up, factorise every candidate layer at one fixed rank
ratio (¼) by truncated SVD, and train the factorised model plainly (cross-entropy; no sampled
sub-models, no regulariser, no shrinking). The layers kept dense follow the per-model table of
:mod:`.layers`.

Options: ``rank_ratio`` (¼), ``dense_share`` (share of the epochs at full rank, ¼ by default:
``round(dense_share · epochs)`` epochs); a ``factorize.exclude_modules`` replaces the table's
dense-kept layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import FactorizeConfig
from ..errors import ConfigError
from ..training.methods import TrainingMethod
from ..training.options import MethodConfig, check_number
from ..training.protocols import TrainerView
from ..training.registries import METHODS
from ..training.train_config import TrainConfig
from .layer_choice import PUFFERFISH_DENSE, dense_kept_config, kept_dense


@dataclass
class PufferfishConfig(MethodConfig):
    """Pufferfish's options: ``rank_ratio``, the fixed rank as a fraction of each layer's full rank
    (¼ in the paper), and ``dense_share``, the share of the epochs trained at full rank before
    factorising (``round(dense_share · epochs)`` epochs; at least one factorised epoch must remain)."""

    rank_ratio: float = 0.25
    dense_share: float = 0.25

    def __post_init__(self) -> None:
        check_number("rank_ratio", self.rank_ratio, 0.0, strict=True, high=1.0)
        check_number("dense_share", self.dense_share, 0.0, high=1.0)


def warmup_epochs(config: TrainConfig) -> int:
    """Full-rank epochs before Pufferfish factorises."""
    return round(config.method_options.dense_share * config.epochs)


@METHODS.register("pufferfish")
class PufferfishMethod(TrainingMethod):
    """Full-rank warm-up, then SVD factorisation at ``rank_ratio`` and a fresh optimiser that
    continues the LR schedule; plain training of the factorised model."""

    label = "Pufferfish"
    config_class = PufferfishConfig

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if warmup_epochs(config) >= config.epochs:
            raise ConfigError(f"dense_share={config.method_options.dense_share} leaves no factorised epoch of "
                              f"epochs={config.epochs}")

    def factorize_config(self, trainer: TrainerView) -> FactorizeConfig:
        kept = kept_dense(trainer.config.model, trainer.model, PUFFERFISH_DENSE)
        return dense_kept_config(trainer.config.factorize_config(), kept, rank=trainer.config.method_options.rank_ratio)

    def setup(self, trainer: TrainerView) -> None:
        if not trainer.factorized and warmup_epochs(trainer.config) == 0:
            trainer.factorize_model(self.factorize_config(trainer))

    def before_epoch(self, trainer: TrainerView, epoch: int) -> None:
        if not trainer.factorized and epoch > warmup_epochs(trainer.config):
            trainer.factorize_model(self.factorize_config(trainer))

    def phase(self, trainer: TrainerView) -> str:
        return "pufferfish" if trainer.factorized else "dense-warmup"
