"""Progressive shrinking: physically drop unimportant ranks and keep the optimiser training.

Every state tensor an optimiser keeps for a factor is sliced along the factor's rank dimension:
full-shape state (momentum, ``exp_avg``, ``exp_avg_sq``, …) and factored state with the rank
dimension (Adafactor's column/row second moments); state reduced over the rank dimension (size 1
there) is kept as it is. An optimiser whose state for a factor has any other shape is refused
before anything changes. A factor shrunk without its optimiser is remembered, so the optimiser's
next ``step`` fails with a message saying to pass it, instead of a shape error deep inside.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .checks import check_module, non_finite, shown
from .errors import ConfigError, ConfigTypeError
from .functional import DOWN_RANK_DIM, UP_RANK_DIM
from .layers import LowRankLayer, low_rank_layers

_RESIZED = WeakIdKeyDictionary()
"""Factors resized so far (Parameter → its rank dimension), checked before an optimiser's next step."""
_STEP_CHECK: list = []  # the handle of the global optimiser pre-step hook, once registered
_RESIZES = [0]  # how many resizes have happened (a counter other state is compared with)
_CHECKED = WeakIdKeyDictionary()
"""Optimiser → the resize count its state was last checked at: a step re-checks only after a resize."""


def _factors(layer: LowRankLayer) -> tuple[tuple[nn.Parameter, int], ...]:
    return (layer.up, UP_RANK_DIM), (layer.down, DOWN_RANK_DIM)


def _state_action(value: object, param: torch.Tensor, dim: int) -> str:
    """How one optimiser state entry follows a rank change of ``param``: ``"slice"`` along ``dim``,
    ``"keep"`` (not a tensor, a scalar, or reduced over the rank dimension), or ``"refuse"``."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return "keep"
    if value.dim() != param.dim():
        return "refuse"
    d = dim % param.dim()
    if any(v not in (p, 1) for i, (v, p) in enumerate(zip(value.shape, param.shape)) if i != d):
        return "refuse"
    if value.shape == param.shape or value.shape[d] == param.shape[d] != 1:
        return "slice"
    return "keep" if value.shape[d] == 1 else "refuse"


def _check_sliceable(optimizer: torch.optim.Optimizer, layers: list[tuple[str, LowRankLayer]]) -> None:
    """Refuse, naming it, an optimiser whose state for some factor cannot follow a rank change."""
    for name, layer in layers:
        for param, dim in _factors(layer):
            for key, value in optimizer.state.get(param, {}).items():
                if _state_action(value, param, dim) == "refuse":
                    raise ConfigError(f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for "
                                      f"a factor of {name!r} shaped {tuple(param.shape)}; it cannot be sliced to a "
                                      f"smaller rank (use an optimiser with per-element or factored state)")


def _slice_optimizer_state(optimizer: torch.optim.Optimizer, layer: LowRankLayer, rank: int) -> None:
    """Slice every optimiser state tensor of the factors that has a rank dimension."""
    for param, dim in _factors(layer):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if _state_action(value, param, dim) == "slice":
                state[key] = value.narrow(dim, 0, rank).clone(memory_format=torch.contiguous_format)


def _stale_state(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Optimiser pre-step hook: fail clearly if a resized factor still has state of its old rank.
    Runs through the state once after each resize; every other step costs one lookup."""
    if _CHECKED.get(optimizer) == _RESIZES[0]:
        return
    for param, dim in list(_RESIZED.items()):
        d = dim % param.dim()
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape[d] not in (param.shape[d], 1):
                raise ConfigError(
                    f"{type(optimizer).__name__} state {key!r} has shape {tuple(value.shape)} but its factor was "
                    f"shrunk to {tuple(param.shape)}: pass the optimizer to shrink_/truncate_ so its state is sliced")
    _CHECKED[optimizer] = _RESIZES[0]


def _remember_resized(layer: LowRankLayer) -> None:
    if not _STEP_CHECK:
        _STEP_CHECK.append(register_optimizer_step_pre_hook(_stale_state))
    for param, dim in _factors(layer):
        _RESIZED[param] = dim
    _RESIZES[0] += 1


def _resize_layer(layer: LowRankLayer, rank: int, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None:
        _slice_optimizer_state(optimizer, layer, rank)
    layer.truncate_(rank)
    _remember_resized(layer)


def _layers(model: nn.Module, what: str) -> list[tuple[str, LowRankLayer]]:
    """The low-rank layers of ``model``; a model with none is a mistake (factorize first)."""
    check_module(model)
    layers = list(low_rank_layers(model))
    if not layers:
        raise ConfigError(f"{what}: the model has no low-rank layers; call factorize() first")
    return layers


def _check_optimizer(optimizer: object, model: nn.Module) -> None:
    """Refuse what is not an optimiser, and an optimiser that holds none of ``model``'s parameters
    (built for another model, its state could never follow this one's rank changes)."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigTypeError(f"optimizer={shown(optimizer)} must be a torch.optim.Optimizer or None, "
                              f"got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters()):
        raise ConfigError(f"optimizer {type(optimizer).__name__} (holding {len(held)} parameter(s)) holds none of "
                          f"this model's parameters; pass the optimiser built for this model")


def _check_values(layers: list[tuple[str, LowRankLayer]]) -> None:
    """Refuse factors without values (meta device) or with NaN/inf: their importances cannot rank them."""
    for name, layer in layers:
        for factor, label in ((layer.up, "up"), (layer.down, "down")):
            if factor.is_meta:
                raise ConfigError(f"shrink_: the factors of {name!r} are on the meta device and have no values to "
                                  f"rank; load real weights first (e.g. model.to_empty(device=...) then load_state_dict)")
            bad = non_finite(factor)
            if bad:
                raise ConfigError(f"shrink_: factor {name}.{label} holds {bad} values, so its ranks cannot be ordered "
                                  f"by importance (has training diverged?)")


def shrink_(model: nn.Module, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
    """Drop, in every low-rank layer, the ranks from the first one whose importance ≤ ``threshold``.

    Physical and in place: the factors keep their Parameter identity and ``optimizer``'s state is
    sliced to match, so the same optimiser (and LR scheduler) carry on; pass every optimiser that
    holds state for the model (an optimiser holding none of the model's parameters is refused, as
    are factors without values or with NaN/inf, whose ranks cannot be ordered). A layer never
    goes below its ``min_rank``. Returns
    ``{name: (rank before, rank after)}`` for every low-rank layer.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigTypeError(f"threshold={shown(threshold)} must be a finite number ≥ 0, got {type(threshold).__name__}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"threshold={threshold!r} must be a finite number ≥ 0")
    layers = _layers(model, "shrink_")
    _check_optimizer(optimizer, model)
    _check_values(layers)
    if optimizer is not None:
        _check_sliceable(optimizer, layers)
    changes = {}
    for name, layer in layers:
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
    layers = dict(_layers(model, "truncate_"))
    if not isinstance(ranks, dict):
        raise ConfigTypeError(f"ranks={shown(ranks)} must be a dict of layer name -> rank, got {type(ranks).__name__}")
    _check_optimizer(optimizer, model)
    for name, rank in ranks.items():
        if not isinstance(name, str):
            raise ConfigTypeError(f"layer name {shown(name)} in ranks must be a string, got {type(name).__name__}")
        if name not in layers:
            known = ", ".join(list(layers)[:8]) + (", …" if len(layers) > 8 else "")
            raise ConfigError(f"no low-rank layer named {name!r} (low-rank layers: {known})")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigTypeError(f"rank for {name!r} must be an int, got {rank!r}")
        if not 0 <= rank <= layers[name].rank:
            raise ConfigError(f"rank {rank} for {name!r} is outside 0..{layers[name].rank} (its current rank)")
    if optimizer is not None:
        _check_sliceable(optimizer, [(name, layers[name]) for name in ranks])
    changes = {}
    for name, rank in ranks.items():
        changes[name] = (layers[name].rank, rank)
        _resize_layer(layers[name], rank, optimizer)
    return changes
