"""Group-lasso penalties and per-rank importances over a whole model."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .functional import group_lasso_penalty
from .inject import low_rank_layers


def group_lasso(model: nn.Module, hierarchical: bool = True) -> torch.Tensor:
    """Sum of the (hierarchical) group-lasso penalty of every low-rank layer of ``model``.

    Hierarchical: ``Σ_layers Σ_b ‖U[:, b:]‖_F + ‖V[:, b:]‖_F``; plain: one group per rank.
    Gradients stay finite when trailing ranks are exactly zero.
    """
    terms = [group_lasso_penalty(layer.up, layer.down, hierarchical) for _, layer in low_rank_layers(model)]
    if not terms:
        raise ConfigError("group_lasso: the model has no low-rank layers; call factorize() first")
    return torch.stack(terms).sum()


def importances(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-rank importance ``‖U[:, b:]‖_F · ‖V[:, b:]‖_F`` of every low-rank layer, by name."""
    return {name: layer.importance() for name, layer in low_rank_layers(model)}
