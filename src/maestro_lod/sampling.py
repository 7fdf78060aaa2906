"""Ordered dropout over the rank: samplers that draw a sub-model, and a scope that applies a draw.

A draw maps layer names to ranks; layers not in the draw keep their active rank (normally full).
Samplers read the layers' *current* ranks at every draw, so they keep working while progressive
shrinking removes ranks. The draw is plain state on each layer (``active_rank``), so it stays fixed from the forward
pass through the backward pass of the same scope and no model code has to know about it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError
from .inject import low_rank_layers
from .layers import LowRankLayer
from .registry import Registry


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigTypeError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    return torch.Generator().manual_seed(seed)


SAMPLERS = Registry("rank sampler")
"""Rank samplers by name (the values of ``TrainConfig.sampler``); register a :class:`RankSampler`
subclass with ``@SAMPLERS.register("name")``."""


class RankSampler:
    """Base class: ``draw(layers)`` returns ``{name: rank}`` for a list of ``(name, layer)``."""

    def __init__(self, seed: int | torch.Generator | None = None):
        self.generator = _generator(seed)

    def _uniform_int(self, high: int) -> int:
        """An integer uniform in ``0 … high-1``."""
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        raise NotImplementedError


@SAMPLERS.register("single")
class SingleLayerSampler(RankSampler):
    """The paper's default: one pair (layer i, rank b), 1 ≤ b ≤ r_i, uniform over all such pairs;
    that layer runs at rank b, every other layer at full rank."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        total = sum(layer.rank for _, layer in layers)
        if total == 0:
            return {}
        pick = self._uniform_int(total)
        for name, layer in layers:
            if pick < layer.rank:
                return {name: pick + 1}
            pick -= layer.rank
        raise AssertionError("unreachable: pick exceeded the total rank")


@SAMPLERS.register("independent")
class IndependentSampler(RankSampler):
    """Every layer draws its own rank uniformly from 1 … r_i."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        return {name: self._uniform_int(layer.rank) + 1 for name, layer in layers if layer.rank > 0}


@SAMPLERS.register("fixed")
class FixedFractionSampler(RankSampler):
    """Every layer at ``ceil(fraction · r_i)`` (Pufferfish-style fixed sub-model); deterministic."""

    def __init__(self, fraction: float, seed: int | torch.Generator | None = None):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction={fraction!r} must be in (0, 1]")
        super().__init__(seed)
        self.fraction = float(fraction)

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        return {name: max(1, math.ceil(self.fraction * layer.rank - 1e-9)) for name, layer in layers if layer.rank > 0}


@contextmanager
def sampled_ranks(model: nn.Module, sampler: RankSampler) -> Iterator[dict[str, int]]:
    """Apply one draw of ``sampler`` to ``model`` for the scope of the ``with`` block.

    Run both forward and backward inside the block. Layers the draw does not name keep their
    active rank (full rank unless an enclosing block set one). On exit, also when the block raises,
    every layer gets back the active rank it had before, so blocks nest. Yields the draw.
    """
    if not isinstance(sampler, RankSampler):
        raise ConfigTypeError(f"sampler must be a RankSampler, got {type(sampler).__name__}")
    layers = list(low_rank_layers(model))
    if not layers:
        raise ConfigError("sampled_ranks: the model has no low-rank layers; call factorize() first")
    previous = [(layer, layer.active_rank) for _, layer in layers]
    draw = sampler.draw(layers)
    by_name = dict(layers)
    try:
        for name, rank in draw.items():
            by_name[name].active_rank = rank
        yield draw
    finally:
        for layer, rank in previous:
            layer.active_rank = rank if rank is None or rank <= layer.rank else None

def build_sampler(name: str, generator: torch.Generator | None = None, **options) -> RankSampler:
    """The sampler registered as ``name``, drawing from ``generator``; of ``options`` (e.g.
    ``fraction``) it receives those its constructor accepts."""
    cls = SAMPLERS.lookup(name)
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted}, seed=generator)
