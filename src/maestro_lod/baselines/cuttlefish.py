"""Cuttlefish: train at full rank while tracking every candidate layer's stable rank; once each
layer's has settled, factorise it at the rank it settled at and continue (fresh optimiser).

Per epoch of full-rank training, for every candidate layer ``W`` (per :mod:`.layers`):

* stable rank ``sr = floor(Σσ² / σ_max²)``, scaled by ``full rank / sr at initialisation`` (so a
  layer whose initial spectrum is flat starts near its full rank);
* the scaled series is smoothed by an EMA with ``α = 2 / (stable_ema + 1)`` (window 15: α = 2/16);
* a layer is stable once the mean ``|Δ|`` of the EMA over its last ``stable_window`` epochs (11:
  10 successive differences) is at most ``stable_tolerance`` (0.1), or 2.5× / 5× that (0.25 / 0.5)
  when only two / one layers remain unstable, and not before epoch ``stable_min_epoch`` (15);
  a stable layer stays stable.

When every layer is stable, the next epoch starts by factorising each at
``min(full, ceil(sr · scale))`` (its latest stable rank, scaled). The three epoch counts apply to a
run of ``stable_reference_epochs`` epochs (300); a shorter run of E epochs uses
``max(2, round(count · E / stable_reference_epochs))`` (:func:`scaled_epochs`). A run whose layers
have not all settled by its second-to-last epoch factorises at the current estimates then, so that
at least one factorised epoch remains; records say so (``cuttlefish_forced``).
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
from .layer_choice import CUTTLEFISH_DENSE, dense_kept_config, kept_dense, weight_matrices


@dataclass
class CuttlefishConfig(MethodConfig):
    """Cuttlefish's stabilisation rule (11 epochs of history, an EMA over 15, never before epoch 15,
    mean |slope| ≤ 0.1 — 0.25 / 0.5 when two / one layers remain unstable). The three epoch counts
    are for a run of ``stable_reference_epochs`` epochs (300, as in the paper); a shorter run scales
    them by ``epochs / stable_reference_epochs``, rounded, at least 2."""

    stable_window: int = 11
    stable_ema: int = 15
    stable_min_epoch: int = 15
    stable_tolerance: float = 0.1
    stable_reference_epochs: int = 300

    def __post_init__(self) -> None:
        for name in ("stable_window", "stable_ema", "stable_reference_epochs"):
            check_int(name, getattr(self, name), 2, EPOCH_LIMIT)
        check_int("stable_min_epoch", self.stable_min_epoch, 1, EPOCH_LIMIT)
        check_number("stable_tolerance", self.stable_tolerance, 0.0, strict=True)


RELAXED = {2: 2.5, 1: 5.0}
"""Tolerance multipliers when only two / one layers remain unstable (0.25 and 0.5 for 0.1)."""


def stable_rank(matrix: torch.Tensor) -> int:
    """``floor(Σσ² / σ_max²)`` of a ``groups × m × n`` matrix (the largest over its groups), at least 1."""
    ranks = []
    for block in matrix.float():
        squares = torch.linalg.svdvals(block) ** 2
        ranks.append(int(math.floor((squares.sum() / squares[0].clamp_min(torch.finfo(squares.dtype).tiny)).item()
                                    + 1e-6)))
    return max(1, max(ranks))


def scaled_epochs(count: int, epochs: int, reference: int) -> int:
    """An epoch count of a ``reference``-epoch run, scaled to a run of ``epochs`` epochs (never up)."""
    if epochs >= reference:
        return count
    return max(2, round(count * epochs / reference))


def ema(series: list[float], alpha: float) -> list[float]:
    """Exponential moving average, starting at the first value."""
    smoothed: list[float] = []
    for value in series:
        smoothed.append(value if not smoothed else alpha * value + (1 - alpha) * smoothed[-1])
    return smoothed


def stabilised(series: list[float], epoch: int, *, window: int, ema_window: int, min_epoch: int,
               tolerance: float) -> bool:
    """Whether a scaled-stable-rank ``series`` (one value per epoch, the last at ``epoch``) has
    settled: ``epoch ≥ min_epoch``, at least ``window`` values, and the mean absolute difference of
    its EMA (``α = 2/(ema_window+1)``) over the last ``window`` values at most ``tolerance``."""
    if epoch < min_epoch or len(series) < window:
        return False
    tail = ema(series, 2 / (ema_window + 1))[-window:]
    slopes = [abs(b - a) for a, b in zip(tail[:-1], tail[1:])]
    return sum(slopes) / len(slopes) <= tolerance


@METHODS.register("cuttlefish")
class CuttlefishMethod(TrainingMethod):
    """Full-rank training until every candidate layer's scaled stable rank has settled, then
    factorisation at those ranks and plain training of the factorised model."""

    label = "Cuttlefish"
    config_class = CuttlefishConfig

    def __init__(self) -> None:
        self.initial: dict[str, int] = {}
        """Stable rank of each candidate layer at initialisation."""
        self.full: dict[str, int] = {}
        self.history: dict[str, list[int]] = {}
        """Stable rank of each candidate layer after each full-rank epoch."""
        self.stable: list[str] = []
        self.ranks: dict[str, int] | None = None
        """Ranks to factorise at, once decided."""
        self.forced = False

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if config.epochs < 2:
            raise ConfigError("cuttlefish needs epochs >= 2: at least one full-rank and one factorised epoch")

    def _candidates_config(self, trainer: TrainerView) -> FactorizeConfig:
        kept = kept_dense(trainer.config.model, trainer.model, CUTTLEFISH_DENSE)
        return dense_kept_config(trainer.config.factorize_config(), kept)

    def counts(self, config: TrainConfig) -> tuple[int, int, int]:
        """(window, EMA window, first possible epoch) for this run's length."""
        options = config.method_options
        return tuple(scaled_epochs(count, config.epochs, options.stable_reference_epochs)
                     for count in (options.stable_window, options.stable_ema, options.stable_min_epoch))

    def setup(self, trainer: TrainerView) -> None:
        if trainer.factorized:
            raise ConfigError("cuttlefish starts from a dense model; pass the model unfactorised")
        matrices = weight_matrices(trainer.model, self._candidates_config(trainer))
        self.initial = {name: stable_rank(matrix) for name, matrix in matrices.items()}
        self.full = {name: min(matrix.shape[-2:]) for name, matrix in matrices.items()}
        self.history = {name: [] for name in matrices}

    def scale(self, name: str) -> float:
        return self.full[name] / self.initial[name]

    def before_epoch(self, trainer: TrainerView, epoch: int) -> None:
        if self.ranks is not None and not trainer.factorized:
            trainer.factorize_model(self.factorize_config(trainer))

    def after_steps(self, trainer: TrainerView, epoch: int) -> None:
        if self.ranks is not None:
            return
        config = trainer.config
        window, ema_window, min_epoch = self.counts(config)
        for name, matrix in weight_matrices(trainer.model, self._candidates_config(trainer)).items():
            self.history[name].append(stable_rank(matrix))
        unstable = [name for name in self.history if name not in self.stable]
        tolerance = config.method_options.stable_tolerance * RELAXED.get(len(unstable), 1.0)
        for name in unstable:
            series = [rank * self.scale(name) for rank in self.history[name]]
            if stabilised(series, epoch, window=window, ema_window=ema_window, min_epoch=min_epoch,
                          tolerance=tolerance):
                self.stable.append(name)
        everything = len(self.stable) == len(self.history)
        if everything or epoch >= config.epochs - 1:
            self.forced = not everything
            self.ranks = {name: min(self.full[name], math.ceil(ranks[-1] * self.scale(name)))
                          for name, ranks in self.history.items()}

    def factorize_config(self, trainer: TrainerView) -> FactorizeConfig:
        base = self._candidates_config(trainer)
        return FactorizeConfig.from_dict({**base.to_dict(), "rank": None, "rank_pattern": dict(self.ranks or {})})

    def epoch_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return {"stable_layers": len(self.stable), "candidate_layers": len(self.history),
                "cuttlefish_forced": self.forced}

    def phase(self, trainer: TrainerView) -> str:
        return "cuttlefish" if trainer.factorized else "full-rank"

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "full": self.full, "history": self.history, "stable": self.stable,
                "ranks": self.ranks, "forced": self.forced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial, self.full = dict(state["initial"]), dict(state["full"])
        self.history = {name: list(ranks) for name, ranks in state["history"].items()}
        self.stable, self.ranks, self.forced = list(state["stable"]), state["ranks"], bool(state["forced"])
