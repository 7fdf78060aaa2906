"""Progressive shrinking: physically drop unimportant ranks and keep the optimiser training."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError
from .functional import DOWN_RANK_DIM, UP_RANK_DIM
from .inject import low_rank_layers
from .layers import LowRankLayer


def _slice_optimizer_state(optimizer: torch.optim.Optimizer, layer: LowRankLayer, rank: int) -> None:
    """Slice every optimiser state tensor shaped like a factor (momentum, exp_avg, exp_avg_sq, …)."""
    for param, dim in ((layer.up, UP_RANK_DIM), (layer.down, DOWN_RANK_DIM)):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state[key] = value.narrow(dim, 0, rank).clone(memory_format=torch.contiguous_format)


def _resize_layer(layer: LowRankLayer, rank: int, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None:
        _slice_optimizer_state(optimizer, layer, rank)
    layer.truncate_(rank)


def shrink_(model: nn.Module, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
    """Drop, in every low-rank layer, the ranks from the first one whose importance ≤ ``threshold``.

    Physical and in place: the factors keep their Parameter identity and ``optimizer``'s state is
    sliced to match, so the same optimiser (and LR scheduler) carry on. A layer never goes below
    its ``min_rank``. Returns ``{name: (rank before, rank after)}`` for every low-rank layer.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"threshold={threshold!r} must be a finite number ≥ 0")
    changes = {}
    for name, layer in low_rank_layers(model):
        before = layer.rank
        small = torch.nonzero(layer.importance() <= threshold)
        first = int(small[0]) if len(small) else before
        after = max(first, min(layer.min_rank, before))
        if after < before:
            _resize_layer(layer, after, optimizer)
        changes[name] = (before, after)
    return changes


def truncate_(model: nn.Module, ranks: dict[str, int], optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
    """Set explicit physical ranks ``{layer name: rank}`` (each ≤ the layer's current rank).

    All names and values are checked before anything changes. Returns ``{name: (before, after)}``.
    """
    if not isinstance(ranks, dict):
        raise ConfigTypeError(f"ranks must be a dict of layer name -> rank, got {type(ranks).__name__}")
    layers = dict(low_rank_layers(model))
    for name, rank in ranks.items():
        if name not in layers:
            raise ConfigError(f"no low-rank layer named {name!r}")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigTypeError(f"rank for {name!r} must be an int, got {rank!r}")
        if not 0 <= rank <= layers[name].rank:
            raise ConfigError(f"rank {rank} for {name!r} is outside 0..{layers[name].rank} (its current rank)")
    changes = {}
    for name, rank in ranks.items():
        changes[name] = (layers[name].rank, rank)
        _resize_layer(layers[name], rank, optimizer)
    return changes
