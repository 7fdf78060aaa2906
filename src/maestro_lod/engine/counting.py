"""Cost of a model: parameters, multiply–accumulates, and a per-layer summary table."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..checks import check_module, shown
from ..errors import ConfigTypeError
from ..layers import low_rank_layers
from ..tables import format_table


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once)."""
    check_module(model)
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: torch.Tensor | tuple = (), kwargs: dict | None = None) -> int:
    """Multiply–accumulates of one forward pass ``model(*example_inputs, **kwargs)``.

    ``example_inputs`` is a tensor or a tuple of tensors; ``kwargs`` holds keyword inputs (e.g.
    ``{"input_ids": ids, "attention_mask": mask}`` for a Hugging Face model; any values). Counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) in eval mode without
    gradients, so BatchNorm statistics and dropout are untouched; the training mode is restored.
    PyTorch's fused transformer inference path is switched off while counting: it would multiply
    factorised attention back into dense weights and hide the model's own computation. Reading a
    factorised layer's ``.weight`` for its dtype or shape costs nothing; reading its values costs
    the product of the factors, which is counted.
    """
    check_module(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    wrong = [x for x in inputs if not isinstance(x, torch.Tensor)]
    if wrong:
        raise ConfigTypeError(f"example_inputs must be a tensor or a tuple of tensors, got "
                              f"{shown(example_inputs if len(inputs) == 1 else wrong[0])} ({type(wrong[0]).__name__})")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise ConfigTypeError(f"kwargs must be a dict of keyword inputs, got {shown(kwargs)} ({type(kwargs).__name__})")
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigTypeError(f"kwargs key {shown(key)} must be a string (a keyword of the model's forward)")
    was_training, fast_path = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() // 2


def layer_summary(model: nn.Module) -> str:
    """Table of every low-rank layer: shape, rank / max rank, factorised vs dense parameters."""
    check_module(model)
    rows = [("layer", "shape", "rank", "params", "dense params", "ratio")]
    total, dense_total = 0, 0
    for name, layer in low_rank_layers(model):
        m, n, groups = layer.dense_shape()
        params = layer.up.numel() + layer.down.numel()
        dense = m * n // groups
        total, dense_total = total + params, dense_total + dense
        rows.append((name, f"{m}x{n // groups}" + (f"/g{groups}" if groups > 1 else ""), f"{layer.rank}/{layer.max_rank}",
                     f"{params:,}", f"{dense:,}", f"{params / dense:.2f}"))
    rows.append(("total", "", "", f"{total:,}", f"{dense_total:,}", f"{total / max(dense_total, 1):.2f}"))
    return format_table(rows)
