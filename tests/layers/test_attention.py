"""Attention modules keep working inside PyTorch's transformer layers once factorised."""

import copy

import pytest
import torch
from torch import nn

from conftest import relative_error
from maestro_lod import (FactorizeConfig, LowRankMultiheadAttention, count_macs, export, factorize, low_rank_layers,
                         truncate_)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pair(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    dense = module.to(dtype)
    return dense, factorize(copy.deepcopy(dense))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("grad_mode", ["train", "no_grad"])
def test_transformer_encoder_layer(dtype, batch_first, grad_mode):
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=batch_first)
    dense, low_rank = _pair(layer, dtype)
    assert isinstance(low_rank.self_attn, LowRankMultiheadAttention)
    x = torch.randn(3, 7, 32, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1)
    padding = torch.zeros((3, 7), dtype=torch.bool)
    padding[0, 5:] = True
    if grad_mode == "train":
        dense.train(), low_rank.train()
        out, expected = low_rank(x, src_key_padding_mask=padding), dense(x, src_key_padding_mask=padding)
        out.sum().backward()
        assert all(p.grad is not None for p in low_rank.self_attn.parameters())
    else:
        # eval + no_grad is where PyTorch's fused "fast path" reads the packed weights directly.
        dense.eval(), low_rank.eval()
        with torch.no_grad():
            out, expected = low_rank(x, src_key_padding_mask=padding), dense(x, src_key_padding_mask=padding)
    assert relative_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_transformer_with_masks(dtype):
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=40,
                           dropout=0.0, batch_first=True)
    dense, low_rank = _pair(model, dtype)
    attention = [m for m in low_rank.modules() if isinstance(m, LowRankMultiheadAttention)]
    assert len(attention) == 2 + 2 * 2  # encoder self-attention, decoder self- and cross-attention
    src, tgt = torch.randn(2, 9, 32, dtype=dtype), torch.randn(2, 6, 32, dtype=dtype)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=dtype)
    src_padding = torch.tensor([[False] * 9, [False] * 7 + [True] * 2])
    kwargs = dict(tgt_mask=causal, src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding)
    for mode in ("train", "eval"):
        dense.train(mode == "train"), low_rank.train(mode == "train")
        assert relative_error(low_rank(src, tgt, **kwargs), dense(src, tgt, **kwargs)) <= TOLERANCE[dtype]
    with torch.no_grad():
        assert relative_error(low_rank(src, tgt, **kwargs), dense(src, tgt, **kwargs)) <= TOLERANCE[dtype]


def test_decoder_layer_cross_attention_with_different_key_dims():
    mha = nn.MultiheadAttention(16, 2, kdim=10, vdim=12, batch_first=True).double()
    low_rank = factorize(copy.deepcopy(mha))
    q, k, v = torch.randn(2, 5, 16).double(), torch.randn(2, 4, 10).double(), torch.randn(2, 4, 12).double()
    out, weights = low_rank(q, k, v)
    expected, expected_weights = mha(q, k, v)
    assert relative_error(out, expected) <= 1e-10
    assert relative_error(weights, expected_weights) <= 1e-10
    ranks = {name: layer.max_rank for name, layer in low_rank_layers(low_rank)}
    assert ranks == {"q_proj": 16, "k_proj": 10, "v_proj": 12, "out_proj": 16}


def test_truncated_attention_exports_to_dense_attention_with_same_outputs():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    low_rank = factorize(layer)
    truncate_(low_rank, {"self_attn.q_proj": 5, "self_attn.v_proj": 7, "linear1": 9})
    exported = export(low_rank).eval()
    low_rank.eval()
    assert type(exported.self_attn) is nn.MultiheadAttention
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), low_rank(x), rtol=1e-5, atol=1e-5)


def test_attention_projections_can_be_targeted_by_name():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
    factorize(layer, FactorizeConfig(target_modules=["self_attn"], rank_pattern={"q_proj": 3, "k_proj": 0.5}))
    ranks = {name: layer.rank for name, layer in low_rank_layers(layer)}
    assert ranks == {"self_attn.q_proj": 3, "self_attn.k_proj": 8, "self_attn.v_proj": 16, "self_attn.out_proj": 16}
    assert type(layer.linear1) is nn.Linear


@pytest.mark.parametrize("options", [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False),
                                     dict(add_bias_kv=True, add_zero_attn=True, batch_first=True)])
def test_attention_options_masks_and_weights(options):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, **options).double()
    with torch.no_grad():
        for name in ("bias_k", "bias_v"):
            if getattr(mha, name) is not None:
                getattr(mha, name).normal_()
    low_rank = factorize(copy.deepcopy(mha))
    batch_first = options.get("batch_first", False)
    x = torch.randn(3, 5, 16, dtype=torch.float64)  # (N, L, E) or (L, N, E)
    batch = 3 if batch_first else 5
    seq = 5 if batch_first else 3
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[0, -1] = True
    per_head = torch.randn(batch * 4, seq, seq, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(seq, dtype=torch.float64)
    calls = [dict(key_padding_mask=padding), dict(attn_mask=per_head, average_attn_weights=False),
             dict(attn_mask=causal.isinf(), key_padding_mask=padding.double() * -1e4, need_weights=False),
             dict(attn_mask=causal, is_causal=True, need_weights=False)]
    if options.get("add_bias_kv") or options.get("add_zero_attn"):
        # PyTorch then replaces the given mask by SDPA's own causal mask over the extra key column,
        # a different mask from the one passed; we keep applying the mask the caller passed.
        calls.pop()
    for kwargs in calls:
        out, weights = low_rank(x, x, x, **kwargs)
        expected, expected_weights = mha(x, x, x, **kwargs)
        assert relative_error(out, expected) <= 1e-10, kwargs
        assert (weights is None) == (expected_weights is None)
        if weights is not None:
            assert relative_error(weights, expected_weights) <= 1e-10
    unbatched = x[0] if batch_first else x[:, 0]
    out, weights = low_rank(unbatched, unbatched, unbatched)
    expected, expected_weights = mha(unbatched, unbatched, unbatched)
    assert relative_error(out, expected) <= 1e-10 and relative_error(weights, expected_weights) <= 1e-10


def test_attention_cost_falls_with_the_rank():
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    x = torch.randn(2, 10, 64)
    dense_macs = count_macs(layer, x)
    low_rank = factorize(copy.deepcopy(layer), FactorizeConfig(target_modules=["self_attn"]))
    # Four projections over 20 tokens: a rank-r factor pair costs r·(64 + 64) instead of 64·64.
    assert count_macs(low_rank, x) == dense_macs + 4 * 20 * (64 * 128 - 64 * 64)
    truncate_(low_rank, {f"self_attn.{p}": 8 for p in ("q_proj", "k_proj", "v_proj", "out_proj")})
    assert count_macs(low_rank, x) == dense_macs - 4 * 20 * (64 * 64 - 8 * 128)
    with pytest.raises(RuntimeError, match="is_causal"):
        low_rank.self_attn(x, x, x, is_causal=True)
