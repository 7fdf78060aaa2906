"""Training cost in multiply–accumulates, counted from the ranks each step actually ran.

Convention: one training pass over one example costs 3× its forward MACs (forward 1×, backward
≈ 2×: the gradients with respect to the inputs and to the weights each cost about one forward).
A step's passes are reported by the step (:attr:`~.steps.Step.passes`): MAESTRO runs the full model
and a sampled sub-model (on all of the batch, or on the share of it that ``sampled_batch`` asks
for, :attr:`~.steps.Step.shares`), dense training one pass. A sampled pass is counted as a whole
forward at the drawn ranks, also when prefix reuse skips the layers before the first sampled one
(the count is then an upper bound). Optimiser updates, the group-lasso gradient, BatchNorm recalibration and
evaluation are not counted.

The forward MACs of a sub-model follow from the model's at its current ranks: a factorised layer
of shape ``m × n`` (per the flattened convolution kernel ``n = C_in·k…``) applied at ``P`` output
positions costs ``P·r·(m + n)`` MACs at rank ``r``, linear in the rank, so lowering layer ``l`` from
rank ``R_l`` to ``r_l`` saves ``P_l·(m_l + n_l)·(R_l − r_l)``. That is the factor pair's cost, the
paper's accounting, also where the layer's forward runs the equal and cheaper composed product
instead (:meth:`~maestro_lod.layers.LowRankLayer.composes`): the count describes the method, not
the kernels chosen. :class:`PassCost` measures the whole model once (``count_macs`` with every
layer running its pair: :attr:`~maestro_lod.layers.LowRankLayer.may_compose` is off meanwhile) and
each factorised layer's ``P_l·(m_l + n_l)`` once (one forward with hooks), whenever the ranks may
have changed (once per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import low_rank_layers
from ..engine.counting import count_macs
from ..engine.passes import forward

BACKWARD_FACTOR = 2
"""Backward MACs as a multiple of the forward's."""


@dataclass(frozen=True)
class PassCost:
    """Per-example forward MACs of a model at its current ranks, and what each rank of each
    factorised layer adds to them."""

    forward_macs: int
    per_rank: dict[str, int]
    ranks: dict[str, int]

    @classmethod
    def measure(cls, model: nn.Module, example_inputs) -> "PassCost":
        """Measure ``model`` on one example (a batch of one)."""
        layers = dict(low_rank_layers(model))
        positions: dict[str, int] = {}
        handles = []
        for name, layer in layers.items():
            def record(module, args, output, name=name):
                positions[name] = output.numel() // module.dense_shape()[0]
            handles.append(layer.register_forward_hook(record))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                forward(model, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        per_rank = {}
        for name, layer in layers.items():
            m, n, _ = layer.dense_shape()
            per_rank[name] = positions.get(name, 0) * (m + n)
        allowed = {name: layer.may_compose for name, layer in layers.items()}
        for layer in layers.values():  # count the pairs, the paper's accounting
            layer.may_compose = False
        try:
            forward_macs = count_macs(model, example_inputs)
        finally:
            for name, layer in layers.items():
                layer.may_compose = allowed[name]
        return cls(forward_macs, per_rank, {name: layer.rank for name, layer in layers.items()})

    def forward_of(self, lowered: dict[str, int]) -> int:
        """Per-example forward MACs with the layers in ``lowered`` at the given ranks."""
        saved = sum(self.per_rank[name] * (self.ranks[name] - rank) for name, rank in lowered.items())
        return self.forward_macs - saved

    def step_macs(self, passes: list[dict[str, int]], examples: int, shares: list[float] | None = None) -> int:
        """Training MACs of one step that ran ``passes`` (see :attr:`~.steps.Step.passes`) on
        ``examples`` examples, each pass on its share of them (``shares``; all of them when None)."""
        shares = [1.0] * len(passes) if shares is None else shares
        return round((1 + BACKWARD_FACTOR) * examples
                     * sum(share * self.forward_of(lowered) for lowered, share in zip(passes, shares, strict=True)))


def rank_cost_scales(model: nn.Module, example_inputs, names: list[str], weighting: str) -> list[float] | None:
    """Per layer of ``names`` (in order), what one of its ranks costs divided by the mean over
    them: by ``macs`` (the factor pair's MACs per example, ``P·(m + n)``) or ``params``
    (``m + n``); None for ``uniform``. The weights of a cost-aware group lasso."""
    if weighting == "uniform":
        return None
    layers = dict(low_rank_layers(model))
    if weighting == "macs":
        per_rank = PassCost.measure(model, example_inputs).per_rank
        costs = [float(per_rank[name]) for name in names]
    else:
        costs = [float(sum(layers[name].dense_shape()[:2])) for name in names]
    mean = sum(costs) / len(costs) if costs else 0.0
    return [cost / mean if mean > 0 else 1.0 for cost in costs]
