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

from .checks import check_seed
from .errors import ConfigError, ConfigTypeError
from .layers import LowRankLayer, low_rank_layers
from .registry import Registry


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigTypeError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    return torch.Generator().manual_seed(check_seed(seed))


SAMPLERS = Registry("rank sampler")
"""Rank samplers by name (the values of ``MaestroConfig.sampler``); register a :class:`RankSampler`
subclass with ``@SAMPLERS.register("name")``."""


class RankSampler:
    """Base class: ``draw(layers)`` returns ``{name: rank}`` for a list of ``(name, layer)``."""

    def __init__(self, seed: int | torch.Generator | None = None):
        self.generator = _generator(seed)

    def _uniform_int(self, high: int) -> int:
        """An integer uniform in ``0 … high-1``."""
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def _uniform_ints(self, highs: list[int]) -> list[int]:
        """One integer uniform in ``0 … high-1`` for each of ``highs``, from one tensor draw
        (``floor(u · high)`` for ``u`` uniform in [0, 1) in float64: uniform to within 2⁻⁵³)."""
        u = torch.rand(len(highs), generator=self.generator, dtype=torch.float64)
        return (u * torch.tensor(highs, dtype=torch.float64)).floor().long().tolist()

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        raise NotImplementedError


@SAMPLERS.register("single")
class SingleLayerSampler(RankSampler):
    """The paper's default: one pair (layer i, rank b), 1 ≤ b ≤ r_i, uniform over all such pairs;
    that layer runs at rank b, every other layer at full rank."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        ranks = [layer.rank for _, layer in layers]
        total = sum(ranks)
        if total == 0:
            return {}
        pick = self._uniform_int(total)
        for (name, _), rank in zip(layers, ranks):
            if pick < rank:
                return {name: pick + 1}
            pick -= rank
        raise AssertionError("unreachable: pick exceeded the total rank")


@SAMPLERS.register("independent")
class IndependentSampler(RankSampler):
    """Every layer draws its own rank uniformly from 1 … r_i."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        return self._draw_each([(name, layer.rank) for name, layer in layers if layer.rank > 0])

    def _draw_each(self, live: list[tuple[str, int]]) -> dict[str, int]:
        """A rank uniform in 1 … r for each ``(name, r)`` of ``live``, from one tensor draw."""
        picks = self._uniform_ints([rank for _, rank in live]) if live else []
        return {name: pick + 1 for (name, _), pick in zip(live, picks)}


@SAMPLERS.register("suffix")
class SuffixSampler(IndependentSampler):
    """A first layer drawn uniformly, then it and every later layer draw their own rank uniformly
    from 1 … r_i; the layers before it keep full rank. "Later" is the order the model lists its
    layers in, for most models that of the forward pass. Sub-models are truncated in several layers
    at once, as ``independent``'s are, while the sampled pass can reuse the full pass's outputs of
    the untouched leading layers (``reuse_prefix``) instead of recomputing the whole model."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        live = [(name, layer.rank) for name, layer in layers if layer.rank > 0]
        return self._draw_each(live[self._uniform_int(len(live)):] if live else [])


@SAMPLERS.register("budget")
class BudgetSampler(RankSampler):
    """A size drawn first, then ranks near it: a fraction ``f`` uniform in (0, 1], and every layer
    keeps about ``f`` of its ranks, ``ceil(f · e^(σ·z) · r_i)`` clipped to 1 … r_i with ``z``
    standard normal per layer (``σ`` = :attr:`SPREAD`). Since a factor pair's cost is linear in its
    rank, the sub-model costs about ``f`` of the model, so every size from the deepest cut to the
    whole model is trained equally often, each with unequal allocations around it; the
    ``independent`` sampler's sub-models, the mean of one uniform draw per layer, mostly cost
    about half the model."""

    SPREAD = 0.5
    """The standard deviation of a layer's log-fraction around the drawn size."""

    def draw(self, layers: list[tuple[str, LowRankLayer]]) -> dict[str, int]:
        live = [(name, layer.rank) for name, layer in layers if layer.rank > 0]
        if not live:
            return {}
        size = 1.0 - float(torch.rand((), generator=self.generator, dtype=torch.float64))  # uniform in (0, 1]
        spread = torch.randn(len(live), generator=self.generator, dtype=torch.float64).mul_(self.SPREAD).exp_()
        fractions = (spread * size).clamp_(max=1.0).tolist()
        return {name: max(1, math.ceil(fraction * rank - 1e-9)) for (name, rank), fraction in zip(live, fractions)}


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
def sampled_ranks(model: nn.Module, sampler: RankSampler,
                  layers: list[tuple[str, LowRankLayer]] | None = None) -> Iterator[dict[str, int]]:
    """Apply one draw of ``sampler`` to ``model`` for the scope of the ``with`` block.

    Run both forward and backward inside the block. Layers the draw does not name keep their
    active rank (full rank unless an enclosing block set one). On exit, also when the block raises,
    every layer gets back the active rank it had before, so blocks nest. Yields the draw.

    ``layers``: ``model``'s ``(name, layer)`` pairs as :func:`~maestro_lod.low_rank_layers` lists
    them, for a caller that holds them already (a training step does, every step): the walk over
    all of the model's modules is then skipped.
    """
    if not isinstance(sampler, RankSampler):
        raise ConfigTypeError(f"sampler must be a RankSampler, got {type(sampler).__name__}")
    layers = list(low_rank_layers(model)) if layers is None else layers
    if not layers:
        raise ConfigError("sampled_ranks: the model has no low-rank layers; call factorize() first")
    previous = [layer.active_rank for _, layer in layers]
    draw = sampler.draw(layers)
    by_name = dict(layers)
    try:
        for name, rank in draw.items():
            by_name[name].active_rank = rank
        yield draw
    finally:
        for (_, layer), rank in zip(layers, previous):
            if layer.active_rank != rank:  # only layers changed in the block are set (a module attribute write is slow)
                layer.active_rank = rank if rank is None or rank <= layer.rank else None

def build_sampler(name: str, generator: torch.Generator | None = None, **options) -> RankSampler:
    """The sampler registered as ``name``, drawing from ``generator``; of ``options`` (e.g.
    ``fraction``) it receives those its constructor accepts."""
    cls = SAMPLERS.lookup(name)
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted}, seed=generator)
