"""Factorised convolution (1-d, 2-d, 3-d, grouped): a k×k conv C_in → b, then a 1×1 conv b → C_out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import random_split, svd_split
from .base import LowRankLayer, follow_requires_grad, plain_layer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LowRankConv(LowRankLayer):
    """Convolution with weight ``up @ down`` per group.

    ``down`` (g × r × C_in/g·k…) is the spatial convolution into r channels per group; it keeps
    the source layer's stride, padding (including "same"), dilation and padding_mode. ``up``
    (g × C_out/g × r) is a 1×1 convolution back to C_out channels and carries the bias. For an
    ungrouped convolution the group dimension is dropped (``up``: C_out × r, ``down``: r × n).

    Where it is cheaper (high rank over many output positions, see :meth:`composes`) the forward
    runs one convolution with the composed weight ``up @ down`` instead of the pair. At rank 0
    there is no convolution to run: the layer outputs its bias (or zeros) over the output size the
    dense convolution would have.
    """

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, source: nn.Module,
                 max_rank: int, min_rank: int = 1):
        super().__init__(up, down, max_rank, min_rank)
        self.spatial_dims = len(source.kernel_size)
        self.in_channels = source.in_channels
        self.out_channels = source.out_channels
        self.kernel_size = tuple(source.kernel_size)
        self.stride = tuple(source.stride)
        self.padding = source.padding if isinstance(source.padding, str) else tuple(source.padding)
        self.dilation = tuple(source.dilation)
        self.groups = source.groups
        self.padding_mode = source.padding_mode
        self._reversed_padding_repeated_twice = list(source._reversed_padding_repeated_twice)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: int | None = None, init: str = "svd", min_rank: int = 1,
                   generator: torch.Generator | None = None) -> "LowRankConv":
        """Factorise an ``nn.Conv1d/2d/3d``, per group when grouped; copies the source tensors.
        Frozen weights (``requires_grad=False``) give frozen factors; the bias keeps its own flag."""
        groups = conv.groups
        out_per_group = conv.out_channels // groups
        in_per_group = conv.weight[0].numel()
        full = min(out_per_group, in_per_group)
        rank = full if rank is None else rank
        matrix = conv.weight.reshape(groups, out_per_group, in_per_group)
        if groups == 1:
            matrix = matrix[0]
        if init == "svd":
            up, down = svd_split(matrix, rank)
        else:
            lead = (groups,) if groups > 1 else ()
            up, down = random_split(lead + (out_per_group, rank), lead + (rank, in_per_group), in_per_group,
                                    conv.weight.dtype, generator)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layer = cls(up, down, bias, conv, full, min_rank).to(conv.weight.device)
        return follow_requires_grad(layer, conv.weight, conv.bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _spatial_weight(self, down: torch.Tensor) -> torch.Tensor:
        """``down`` as the weight of the first convolution (g·b × C_in/g × k…)."""
        return down.reshape(-1, self.in_channels // self.groups, *self.kernel_size)

    def _pointwise_weight(self, up: torch.Tensor) -> torch.Tensor:
        """``up`` as the weight of the 1×1 convolution (C_out × b × 1…)."""
        return up.reshape(self.out_channels, up.shape[-1], *([1] * self.spatial_dims))

    def _output_size(self, x: torch.Tensor) -> list[int]:
        """Spatial size of the dense convolution's output for input ``x``."""
        sizes = list(x.shape[-self.spatial_dims:])
        padding = self.padding
        if self.padding_mode != "zeros":  # padded explicitly first, then convolved without padding
            pads = self._reversed_padding_repeated_twice
            sizes = [size + pads[2 * (self.spatial_dims - 1 - i)] + pads[2 * (self.spatial_dims - 1 - i) + 1]
                     for i, size in enumerate(sizes)]
            padding = (0,) * self.spatial_dims
        elif padding == "same":
            return sizes
        elif padding == "valid":
            padding = (0,) * self.spatial_dims
        return [(size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip(sizes, padding, self.dilation, self.kernel_size, self.stride)]

    def _bias_only(self, x: torch.Tensor) -> torch.Tensor:
        """The output at rank 0: the bias (or zeros) broadcast over batch and output positions."""
        batch = x.shape[:1] if x.dim() == self.spatial_dims + 2 else ()
        shape = (*batch, self.out_channels, *self._output_size(x))
        if self.bias is None:
            return x.new_zeros(shape)
        return self.bias.reshape(self.out_channels, *([1] * self.spatial_dims)).expand(shape).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        if up.shape[-1] == 0:
            return self._bias_only(x)
        conv = _CONV_FN[self.spatial_dims]
        batch = x.shape[0] if x.dim() == self.spatial_dims + 2 else 1
        composes = self.composes(batch * math.prod(self._output_size(x)))
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if composes:
            weight = (up @ down).reshape(self.weight_shape)
            return conv(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        hidden = conv(x, self._spatial_weight(down), None, self.stride, padding, self.dilation, self.groups)
        return conv(hidden, self._pointwise_weight(up), self.bias, 1, 0, 1, self.groups)

    def dense_weight(self) -> torch.Tensor:
        up, down = self.factors()
        return (up @ down).reshape(self.weight_shape)

    def to_standard(self, merge: bool) -> nn.Module:
        """Plain ``torch.nn`` equivalent at the effective rank: one conv, or a k×k conv then a 1×1 conv.
        At rank 0 it is always the single conv (with a zero weight): PyTorch has no zero-channel conv."""
        up, down = (t.detach().clone() for t in self.factors())
        conv_cls = _CONV_CLS[self.spatial_dims]
        common = dict(device=up.device, dtype=up.dtype)
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        if merge or up.shape[-1] == 0:
            dense = plain_layer(conv_cls, self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups, bias is not None, self.padding_mode, **common)
            dense.weight = nn.Parameter(self.dense_weight().detach().clone())
            dense.bias = bias
            return dense
        width = self.groups * up.shape[-1]
        first = plain_layer(conv_cls, self.in_channels, width, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.groups, False, self.padding_mode, **common)
        second = plain_layer(conv_cls, width, self.out_channels, 1, 1, 0, 1, self.groups, bias is not None, **common)
        first.weight = nn.Parameter(self._spatial_weight(down).contiguous())
        second.weight = nn.Parameter(self._pointwise_weight(up).contiguous())
        second.bias = bias
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, " + super().extra_repr())

