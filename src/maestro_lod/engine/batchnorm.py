"""Re-estimate BatchNorm running statistics for the model as it is now.

Sampled passes run sub-models through the BatchNorm layers and shrinking changes the layers
before them, so after an epoch the running statistics describe none of the models actually
evaluated. Recalibration resets them and forwards training batches at full rank with
``momentum=None`` (an exact cumulative average over the batches), without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
