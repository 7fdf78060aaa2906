"""The trainer as the objects it drives see it.

Training methods (:mod:`.methods`, the baselines) and λ schedulers (:mod:`.budget`) are called by
:class:`~.loop.Trainer` with the trainer itself; they depend on these interfaces rather than on the
loop, which depends on them. The integrations hand a scheduler their own object with the
attributes of :class:`SizedRun`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import FactorizeConfig
from ..sampling import RankSampler
from .train_config import TrainConfig


class SizedRun(Protocol):
    """What a λ scheduler reads and changes at the end of an epoch: the model (whose ranks it may
    cut), the optimiser whose state follows a cut (None: no state to slice), an example input for
    counting MACs, and the dense model's costs that size fractions refer to."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    example_inputs: Any
    dense_params: int
    dense_macs: int


class TrainerView(SizedRun, Protocol):
    """What a training method uses of the :class:`~.loop.Trainer` that runs it."""

    config: TrainConfig
    kind: str
    sampler: RankSampler
    train_data: Dataset

    @property
    def factorized(self) -> bool: ...

    def factorize_model(self, config: FactorizeConfig | None = None) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def probe_inputs(self) -> Any: ...
