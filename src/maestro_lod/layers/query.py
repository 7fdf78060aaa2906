"""Queries over the factorised modules of a model."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..checks import check_module
from .base import Factorized, LowRankLayer


def low_rank_layers(model: nn.Module) -> Iterator[tuple[str, LowRankLayer]]:
    """``(name, layer)`` for every low-rank layer of ``model`` (shared layers once), lazily; a
    ``model`` that is not a module is refused at the call."""
    check_module(model)
    return ((name, module) for name, module in model.named_modules() if isinstance(module, LowRankLayer))


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Current physical rank of every low-rank layer, by name."""
    check_module(model)
    return {name: layer.rank for name, layer in low_rank_layers(model)}


def outermost_factorized(model: nn.Module) -> list[tuple[str, Factorized]]:
    """Every path to a factorised module that is not part of an enclosing factorised module (the
    projections of a factorised attention are part of it); a shared module appears once per path."""
    check_module(model)
    found: list[tuple[str, Factorized]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Factorized) and not any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            found.append((name, module))
    return found
