"""Canonical rank order of trained factor pairs, for the rank search after training.

Training orders each layer's ranks by importance only approximately: the group lasso and the
sampled sub-models push importance into the leading ranks, but the trailing rank of ``up @ down``
need not be its least important direction. The rank search removes trailing ranks, so it pays for
every direction out of place. Re-factorising each layer's product ``W = up @ down`` at its current
rank changes nothing the model computes (the product is the same, up to float rounding) and puts
the ranks in the best order for truncation:

* by SVD (``calibration=None``): every leading-b truncation is the best rank-b approximation of
  the layer's weight (Eckart–Young);
* by whitened SVD (with calibration batches): every leading-b truncation has the smallest error
  of the layer's *outputs* on those inputs (see :mod:`maestro_lod.whitening`).

Meant for a trained model before the search or an export: the optimiser's state describes the old
factors, so training should not continue with it.
"""

from __future__ import annotations

from collections.abc import Iterable

import math

import torch
from torch import nn

from .config import DEFAULT_DAMPING
from .errors import ConfigError, ConfigTypeError
from .functional import svd_split, whitened_split
from .layers import low_rank_layers
from .whitening import check_calibration, whitening_factors


@torch.no_grad()
def canonicalize_(model: nn.Module, calibration: Iterable | None = None, damping: float = DEFAULT_DAMPING) -> nn.Module:
    """Re-factorise every low-rank layer of ``model`` in place at its current rank, by SVD of
    ``up @ down`` or, given ``calibration`` batches (the forms :func:`maestro_lod.factorize`
    accepts), by whitened SVD on the inputs each layer sees. Returns ``model``.

    The factors keep their shapes and Parameter identity; each layer's function is unchanged. A
    layer the calibration pass does not reach is re-factorised by plain SVD, with a warning."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ConfigError(f"damping={damping!r} must be a finite float >= 0")
    layers = dict(low_rank_layers(model))
    factors: dict[str, dict[str, torch.Tensor] | None] = {}
    if calibration is not None:
        check_calibration(calibration)
        factors = whitening_factors(model, layers, calibration, damping)
    for name, layer in layers.items():
        if layer.rank == 0:
            continue
        weight = layer.up.to(torch.float64) @ layer.down.to(torch.float64)
        whitening = (factors.get(name) or {}).get("")
        if whitening is None:
            up, down = svd_split(weight, layer.rank)
        else:
            up, down = whitened_split(weight, whitening.to(weight.device), layer.rank)
        layer.up.copy_(up.to(layer.up.dtype))
        layer.down.copy_(down.to(layer.down.dtype))
    return model
