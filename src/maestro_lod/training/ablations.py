"""MAESTRO's ablations and the method variants the benchmark compares, in one place.

Two ablations change what MAESTRO does and are methods of their own (``--method``):
``maestro-no-shrink`` never cuts a rank during training, ``maestro-full`` trains every rank at
every step. The others are MAESTRO with one option changed and are presets: :data:`VARIANTS`
names every variant ``maestro-lod bench`` trains, each as (registered method, options over the
task's recipe), ablations and baselines alike.
"""

from __future__ import annotations

from typing import Any

from ..layers import low_rank_layers
from .methods import MaestroMethod
from .protocols import TrainerView
from .registries import METHODS
from .steps import DenseStep, PenalisedDenseStep, Step


@METHODS.register("maestro-no-shrink")
class MaestroWithoutShrinking(MaestroMethod):
    """Ablation: MAESTRO's factorisation, sampled sub-models and group lasso, but progressive
    shrinking never cuts a rank during training (the ranks stay where they started)."""

    label = "MAESTRO, no shrinking"
    steers = False

    def after_steps(self, trainer: TrainerView, epoch: int) -> None:
        pass

    def phase(self, trainer: TrainerView) -> str:
        return self.name if trainer.factorized else "dense-warmup"


@METHODS.register("maestro-full")
class MaestroFullRanks(MaestroMethod):
    """Ablation: every step trains all ranks (no sampled sub-model): the factorised model on the
    labels plus the group lasso, with progressive shrinking as in MAESTRO."""

    label = "MAESTRO, all ranks"
    steers = False

    def build_step(self, trainer: TrainerView) -> Step:
        if not trainer.factorized:
            return DenseStep(trainer.model, trainer.autocast)
        penalty = self._group_lasso(trainer, list(low_rank_layers(trainer.model)))
        return PenalisedDenseStep(trainer.model, trainer.autocast, penalty)

    def phase(self, trainer: TrainerView) -> str:
        return self.name if trainer.factorized else "dense-warmup"


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "maestro": ("maestro", {}),
    "maestro-no-gl": ("maestro", {"lambda_gl": 0.0}),
    "maestro-no-shrink": ("maestro-no-shrink", {}),
    "maestro-no-full-pass": ("maestro", {"full_pass": False}),
    "maestro-full": ("maestro-full", {}),
    "pufferfish": ("pufferfish", {}),
    "cuttlefish": ("cuttlefish", {}),
    "svd": ("svd", {"svd_energy": 0.9, "svd_finetune_epochs": 2}),
}
"""Variant → (training method, options over the task's recipe, flat as in a config file). The
ablations: no group lasso, no progressive shrinking, no full pass, and every step at all ranks;
the baselines with the settings they are compared at (SVD: 90 % of the spectral energy, two
fine-tuning epochs)."""
