"""Factorised fully connected layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import random_split, svd_split
from .base import LowRankLayer, follow_requires_grad, plain_layer


class LowRankLinear(LowRankLayer):
    """``y = up[:, :b] (down[:b] x) + bias``: two thin matrix products instead of one dense one,
    or, where that is cheaper (high rank over many rows, see :meth:`composes`), one product with
    the composed weight ``up[:, :b] @ down[:b]``.

    At rank 0 both products are empty and the layer outputs its bias (or zeros).
    """

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, max_rank: int, min_rank: int = 1):
        super().__init__(up, down, max_rank, min_rank)
        self.in_features = down.shape[-1]
        self.out_features = up.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rank: int,
        init: str = "svd",
        min_rank: int = 1,
        generator: torch.Generator | None = None,
    ) -> "LowRankLinear":
        """Factorise a dense ``weight`` (out × in); copies, never aliases, the source tensors."""
        out_features, in_features = weight.shape
        if init == "svd":
            up, down = svd_split(weight, rank)
        else:
            up, down = random_split((out_features, rank), (rank, in_features), in_features, weight.dtype, generator)
        layer = cls(up, down, None if bias is None else bias.detach().clone(), min(out_features, in_features), min_rank)
        return layer.to(weight.device)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int | None = None, init: str = "svd", min_rank: int = 1,
                   generator: torch.Generator | None = None) -> "LowRankLinear":
        """Factorise an ``nn.Linear``; ``rank=None`` keeps full rank (exact reproduction with SVD init).
        Frozen weights (``requires_grad=False``) give frozen factors; the bias keeps its own flag."""
        full = min(linear.in_features, linear.out_features)
        layer = cls.from_weight(linear.weight, linear.bias, full if rank is None else rank, init, min_rank, generator)
        return follow_requires_grad(layer, linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        if self.composes(x.numel() // max(self.in_features, 1)):
            return F.linear(x, up @ down, self.bias)
        return F.linear(F.linear(x, down), up, self.bias)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        up, down = self.factors()
        return up @ down

    def to_standard(self, merge: bool) -> nn.Module:
        """Plain ``torch.nn`` equivalent at the effective rank: one Linear, or two stacked ones
        (at rank 0 the pair has zero-width weights and outputs the bias)."""
        up, down = (t.detach().clone() for t in self.factors())
        bias = None if self.bias is None else self.bias.detach().clone()
        common = dict(device=up.device, dtype=up.dtype)
        if merge:
            dense = plain_layer(nn.Linear, self.in_features, self.out_features, bias=bias is not None, **common)
            dense.weight = nn.Parameter(up @ down)
            if bias is not None:
                dense.bias = nn.Parameter(bias)
            return dense
        first = plain_layer(nn.Linear, self.in_features, down.shape[0], bias=False, **common)
        second = plain_layer(nn.Linear, down.shape[0], self.out_features, bias=bias is not None, **common)
        first.weight = nn.Parameter(down)
        second.weight = nn.Parameter(up.contiguous())
        if bias is not None:
            second.bias = nn.Parameter(bias)
        return nn.Sequential(first, second)
