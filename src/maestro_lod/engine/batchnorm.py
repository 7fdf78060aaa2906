"""BatchNorm running statistics of a model whose layers change: kept out of the sampled pass,
re-estimated for the model as it is now.

MAESTRO's sampled pass runs a sub-model through the BatchNorm layers; it runs inside
:func:`running_statistics_kept`, so the running statistics average the full model's batches only,
as a dense training's do. Shrinking then changes the layers they were measured behind, and they
average over an epoch of changing weights, so before evaluation :func:`recalibrate_batchnorm`
resets them and forwards training batches at full rank with ``momentum=None`` (an exact cumulative
average over the batches), without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, run: Callable[[object], object], max_batches: int) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` from up to
    ``max_batches`` items of ``batches``; ``run(batch)`` forwards one batch. Returns the number of
    batches used (0 when the model has no BatchNorm). Training mode and momenta are restored."""
    layers = batchnorm_layers(model)
    if not layers or max_batches == 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    used = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        model.train()
        for batch in batches:
            if used == max_batches:
                break
            run(batch)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return used


@contextmanager
def running_statistics_kept(layers: list[nn.Module]) -> Iterator[None]:
    """Leave the running statistics of the BatchNorm ``layers`` as they were before the block:
    a forward pass inside it normalises with its batch's statistics as usual, but its batch does
    not enter the running averages. MAESTRO's sampled pass runs in it, so that the running
    statistics follow the full model (as a dense training's do) instead of a mix of sub-models."""
    saved = [[buffer.clone() for buffer in layer.buffers()] for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, saved):
                for buffer, value in zip(layer.buffers(), buffers):
                    buffer.copy_(value)
