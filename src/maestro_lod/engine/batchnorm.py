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
    statistics follow the full model (as a dense training's do) instead of a mix of sub-models.

    The layers run with momentum 0, so their update ``(1 - 0)·running + 0·batch`` writes back the
    same values, and only the batch counter is put back at the end. Nothing is restored that the
    backward pass reads (BatchNorm's backward saves the running buffers and would refuse ones
    changed in place since), so the backward may run inside the block or after it, as in the
    Lightning and Hugging Face integrations, where the framework runs it after the loss returns."""
    saved = [(layer.momentum, None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone())
             for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        with torch.no_grad():
            for layer, (momentum, batches) in zip(layers, saved):
                layer.momentum = momentum
                if batches is not None:
                    layer.num_batches_tracked.copy_(batches)
