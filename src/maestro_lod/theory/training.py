"""Train one factorised ``LowRankLinear`` on a :class:`LinearProblem` from random initialisation,
with ordered dropout over the rank (LoD) or, as the contrast, always at full rank.

Every step draws a fresh batch, so the gradient is an unbiased estimate of the population loss
(a fixed sample would shift the optimum to the sample covariance's). With ordered dropout the
rank ``b`` is drawn uniformly from ``1 … r`` per step, so the expected loss is
``(1/r) Σ_b ‖(A − U_b V_bᵀ) S‖²``. Adam with a cosine-decayed learning rate converges fast on the
leading ranks; the decay removes the noise of the rank and data draws at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..checks import check_positive_int
from ..errors import ConfigError, ConfigTypeError
from ..functional import random_split
from ..layers import LowRankLinear
from ..sampling import IndependentSampler, sampled_ranks
from .problems import LinearProblem


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one run; the defaults converge within a few seconds on CPU for n = 32, r = 8."""

    rank: int = 8
    steps: int = 2500
    lr: float = 0.03
    batch: int = 1024
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "steps", "batch"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigTypeError(f"seed must be an int, got {self.seed!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be positive")


def random_layer(problem: LinearProblem, rank: int, generator: torch.Generator) -> LowRankLinear:
    """A bias-free ``LowRankLinear`` of the given rank with random factors (no SVD: nothing to copy)."""
    max_rank = min(problem.in_features, problem.out_features)
    if rank > max_rank:
        raise ConfigError(f"rank={rank} exceeds min(in, out) = {max_rank} of problem {problem.name!r}")
    up, down = random_split((problem.out_features, rank), (rank, problem.in_features), problem.in_features,
                            torch.float32, generator)
    return LowRankLinear(up, down, None, max_rank)


def train_layer(problem: LinearProblem, settings: TrainSettings, ordered: bool) -> LowRankLinear:
    """Fit ``problem`` with a rank-``settings.rank`` layer; ``ordered`` switches ordered dropout on.

    Seeded: the same settings give the same layer. Runs with and without ordered dropout start
    from the same initial factors and see the same data.
    """
    with _one_thread():
        return _train(problem, settings, ordered)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread, restoring the caller's setting: the matrices are so small that
    more threads only add synchronisation, and on a busy machine they slow the loop several-fold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(problem: LinearProblem, settings: TrainSettings, ordered: bool) -> LowRankLinear:
    generator = torch.Generator().manual_seed(settings.seed)
    layer = random_layer(problem, settings.rank, generator)
    sampler = IndependentSampler(settings.seed + 1)
    target = problem.target.to(torch.float32)
    optimizer = torch.optim.Adam(layer.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    for _ in range(settings.steps):
        inputs = problem.sample_inputs(settings.batch, generator)
        outputs = inputs @ target.T
        optimizer.zero_grad(set_to_none=True)
        if ordered:
            with sampled_ranks(layer, sampler):
                _squared_error(layer, inputs, outputs).backward()
        else:
            _squared_error(layer, inputs, outputs).backward()
        optimizer.step()
        schedule.step()
    return layer


def _squared_error(layer: LowRankLinear, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``‖layer(x) − y‖²``: an unbiased estimate of the squared risk."""
    return (layer(inputs) - outputs).square().sum(dim=1).mean()
