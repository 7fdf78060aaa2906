"""Low-rank ``nn.MultiheadAttention``: the q/k/v in-projections and the out-projection factorised.

The forward pass applies the four projections as low-rank layers (so its cost falls with the
rank) and computes scaled dot-product attention with ``nn.MultiheadAttention``'s semantics:
batch_first either way, unbatched inputs, key-padding and attention masks (boolean or additive),
``bias_k``/``bias_v``, ``add_zero_attn``, dropout, and the returned attention weights.

``in_proj_weight`` and ``out_proj.weight`` (read by ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder`` when they consider PyTorch's fused inference path) are
:class:`~maestro_lod.layers.weight.ComputedWeight` views of the factors: reading them costs nothing,
and because they are tensor subclasses PyTorch takes its ordinary path, which calls this module's
``forward``, so the factorised computation is what runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Factorized, follow_requires_grad, plain_layer
from .linear import LowRankLinear
from .weight import ComputedWeight

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def attention_projection_weights(mha: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """Dense weights of the four projections of a (dense or low-rank) attention module."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        q, k, v = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
    else:
        q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    return {"q_proj": q, "k_proj": k, "v_proj": v, "out_proj": mha.out_proj.weight}


def _projection_ranks(rank: int | dict[str, int] | None, full: dict[str, int]) -> dict[str, int]:
    """Start rank of each projection: full, one int for all (capped at each full rank), or by name."""
    if rank is None:
        return dict(full)
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - set(PROJECTIONS))
        if unknown:
            raise ConfigError(f"unknown attention projection(s) {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}")
        return {name: rank.get(name, full[name]) for name in PROJECTIONS}
    return {name: min(rank, full[name]) for name in PROJECTIONS}


class LowRankMultiheadAttention(Factorized, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose four projection matrices are :class:`LowRankLinear` layers."""

    computed_weights = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, source: nn.MultiheadAttention, projections: dict[str, LowRankLinear]):
        nn.Module.__init__(self)
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(self, attr, getattr(source, attr))
        for attr in ("in_proj_bias", "bias_k", "bias_v"):
            value = getattr(source, attr)
            self.register_parameter(attr, None if value is None else nn.Parameter(value.detach().clone()))
        self.q_proj = projections["q_proj"]
        self.k_proj = projections["k_proj"]
        self.v_proj = projections["v_proj"]
        self.out_proj = projections["out_proj"]

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, rank: int | dict[str, int] | None = None, init: str = "svd",
                   min_rank: int = 1, generator: torch.Generator | None = None) -> "LowRankMultiheadAttention":
        """Factorise the four projections of ``mha`` at ``rank`` (None: full; an int for all; or
        ``{"q_proj": …}``). Frozen weights and biases stay frozen."""
        weights = attention_projection_weights(mha)
        ranks = _projection_ranks(rank, {name: min(w.shape) for name, w in weights.items()})
        projections = {}
        for name in PROJECTIONS:
            bias = mha.out_proj.bias if name == "out_proj" else None
            layer = LowRankLinear.from_weight(weights[name], bias, ranks[name], init, min_rank, generator)
            projections[name] = follow_requires_grad(layer, weights[name], bias)
        attention = cls(mha, projections)
        for attr in ("in_proj_bias", "bias_k", "bias_v"):
            source = getattr(mha, attr)
            if source is not None:
                getattr(attention, attr).requires_grad_(source.requires_grad)
        return attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same signature and results as ``nn.MultiheadAttention.forward``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal is only a hint: pass the causal attn_mask as well, as nn.MultiheadAttention requires")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target_len, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        biases = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (_add(proj(x), bias) for proj, x, bias in
                   zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value), biases))
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, target_len, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, embed)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, embed)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
        q, k, v = (t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout:
                weights = F.dropout(weights, dropout)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target_len, embed))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @property
    def in_proj_weight(self) -> ComputedWeight | None:
        """The packed q/k/v weight (3E × E), computed from the factors only when its values are used."""
        if not self._qkv_same_embed_dim:
            return None
        projections = (self.q_proj, self.k_proj, self.v_proj)
        up = self.q_proj.up
        return ComputedWeight(lambda: torch.cat([p.dense_weight() for p in projections]),
                              (3 * self.embed_dim, self.embed_dim), up.dtype, up.device,
                              any(p.up.requires_grad or p.down.requires_grad for p in projections), f"{type(self).__name__}.in_proj_weight")

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def merge_saves_params(self) -> bool:
        """Attention is only ever exported merged (see :meth:`to_standard`)."""
        return True

    def to_standard(self, merge: bool = True) -> nn.MultiheadAttention:
        """A dense ``nn.MultiheadAttention`` with the same outputs, whatever ``merge`` says: PyTorch's
        attention reads its packed projection weights directly, so they cannot be split in two."""
        param = self.out_proj.up
        dense = plain_layer(nn.MultiheadAttention, self.embed_dim, self.num_heads, self.dropout, bias=self.in_proj_bias is not None,
                                      add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                      kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                      device=param.device, dtype=param.dtype)
        with torch.no_grad():
            weights = {name: getattr(self, name).dense_weight() for name in PROJECTIONS}
            if self._qkv_same_embed_dim:
                dense.in_proj_weight.copy_(torch.cat([weights["q_proj"], weights["k_proj"], weights["v_proj"]]))
            else:
                for name in ("q", "k", "v"):
                    getattr(dense, f"{name}_proj_weight").copy_(weights[f"{name}_proj"])
            dense.out_proj.weight.copy_(weights["out_proj"])
            for attr in ("in_proj_bias", "bias_k", "bias_v"):
                if getattr(self, attr) is not None:
                    getattr(dense, attr).copy_(getattr(self, attr))
            if self.out_proj.bias is not None:
                dense.out_proj.bias.copy_(self.out_proj.bias)
        return dense


def _add(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as 0 / −inf; a float mask is already additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
                   target_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Combine ``attn_mask`` ((L, S) or (N·H, L, S)) and ``key_padding_mask`` ((N, S)) into one
    additive mask that broadcasts against scores of shape (N, H, L, S)."""
    mask = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, target_len, mask.shape[-1])
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).reshape(batch, 1, 1, key_padding_mask.shape[-1])
        mask = padding if mask is None else mask + padding
    return mask
