"""Factorised layers reproduce their dense counterparts and truncate like the SVD says."""

import pytest
import torch
from torch import nn

from conftest import relative_error
from maestro_lod import (FactorizeConfig, LowRankConv, LowRankLinear, count_macs, factorize, rank_pattern,
                         truncate_)
from maestro_lod.layers.base import composing_is_cheaper

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]

CONVS = {
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), (4, 6, 20)),
    "conv2d-stride2-pad-dil2": (lambda: nn.Conv2d(5, 12, 3, stride=2, padding=2, dilation=2), (3, 5, 17, 15)),
    "conv2d-grouped": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 9, 9)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(4, 7, (3, 5), padding="same", padding_mode="reflect"), (2, 4, 11, 12)),
    "conv2d-circular-nobias": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", bias=False), (2, 4, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(3, 5, 2, stride=(1, 2, 1)), (2, 3, 5, 6, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_rank_linear_reproduces_dense(dtype):
    dense = nn.Linear(37, 23).to(dtype)
    x = torch.randn(16, 37, dtype=dtype)
    layer = LowRankLinear.from_dense(dense)
    assert layer.rank == layer.max_rank == 23
    assert relative_error(layer(x), dense(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(CONVS))
def test_full_rank_conv_reproduces_dense(kind, dtype):
    build, shape = CONVS[kind]
    dense = build().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    layer = LowRankConv.from_dense(dense)
    out = layer(x)
    assert out.shape == dense(x).shape
    assert relative_error(out, dense(x)) <= TOLERANCE[dtype]


COMPOSED_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
"""Composed and pair forwards differ only in the order of the float sums: f64 agrees to 1e-12
relative, f32 to 1e-5 relative (measured on the convolutions above: below 1e-15 and 3e-7)."""


def _outputs_and_gradients(layer, x):
    """The layer's output on ``x`` and the gradients of a fixed random projection of it with
    respect to the input and every parameter."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters()}


def _composed_and_pair(layer, x):
    """Outputs and gradients of ``layer`` as its rule runs it (composed), then with the pair forced."""
    composed = _outputs_and_gradients(layer, x)
    layer.composes = lambda positions: False  # an instance attribute shadows the rule
    try:
        pair = _outputs_and_gradients(layer, x)
    finally:
        del layer.composes
    return composed, pair


def _assert_same(composed, pair, tolerance):
    (out, x_grad, grads), (out_pair, x_grad_pair, grads_pair) = composed, pair
    assert relative_error(out, out_pair) <= tolerance
    assert relative_error(x_grad, x_grad_pair) <= tolerance
    assert grads.keys() == grads_pair.keys() and grads
    for name in grads:
        assert relative_error(grads[name], grads_pair[name]) <= tolerance, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [*CONVS, "conv2d-sliced"])
def test_composed_conv_matches_the_pair_in_outputs_and_gradients(kind, dtype):
    if kind == "conv2d-sliced":  # a sampled pass: the leading 30 of 32 ranks, as views
        build, shape, active = lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 12, 12), 30
    else:
        (build, shape), active = CONVS[kind], None
    layer = LowRankConv.from_dense(build().to(dtype))
    layer.active_rank = active
    x = torch.randn(shape, dtype=dtype)
    out = layer(x)
    assert layer.composes(out.numel() // layer.out_channels)
    composed, pair = _composed_and_pair(layer, x)
    _assert_same(composed, pair, COMPOSED_TOLERANCE[dtype])
    if active is not None:  # ranks outside the view get no gradient
        assert layer.up.grad[..., active:].abs().sum() == 0 and layer.down.grad[..., active:, :].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 37), (6, 50, 37)])
def test_composed_linear_matches_the_pair_in_outputs_and_gradients(shape, dtype):
    layer = LowRankLinear.from_dense(nn.Linear(37, 23).to(dtype))
    layer.active_rank = 20
    assert layer.composes(300)
    composed, pair = _composed_and_pair(layer, torch.randn(shape, dtype=dtype))
    _assert_same(composed, pair, COMPOSED_TOLERANCE[dtype])


def test_the_forward_composes_exactly_when_that_costs_fewer_macs():
    # cnn4's last convolution at full rank over a batch of 64 7×7 maps: 3,136·128·(128+1152) MACs
    # as a pair against 128·1152·(128+3,136) composed
    assert composing_is_cheaper(3136, 128, 128, 1152)
    assert not composing_is_cheaper(3136, 32, 128, 1152)  # low rank: the pair is cheaper
    assert not composing_is_cheaper(1, 120, 120, 400)  # one position: composing costs a dense layer more
    assert not composing_is_cheaper(100, 0, 8, 8)  # rank 0 never composes
    assert not composing_is_cheaper(4, 4, 4, 4)  # a tie (128 MACs each way) keeps the pair
    layer = LowRankLinear.from_dense(nn.Linear(64, 64))
    assert not layer.composes(20) and layer.composes(2048)
    layer.active_rank = 8
    assert not layer.composes(2048)
    # the MACs counted are the path that runs: composed (64·64·64 + 2048·64·64), then the pair at rank 8
    x = torch.randn(2048, 64)
    layer.active_rank = None
    assert count_macs(layer, x) == 64 * 64 * 64 + 2048 * 64 * 64
    layer.active_rank = 8
    assert count_macs(layer, x) == 2048 * 8 * (64 + 64)


def test_factorised_layer_does_not_alias_the_dense_weights():
    dense = nn.Linear(8, 6)
    layer = LowRankLinear.from_dense(dense)
    before = layer.dense_weight().clone()
    with torch.no_grad():
        dense.weight.zero_()
        dense.bias.zero_()
    torch.testing.assert_close(layer.dense_weight(), before)
    assert layer.bias.abs().sum() > 0


@pytest.mark.parametrize("b", [1, 2, 5, 10, 19])
def test_active_rank_is_the_eckart_young_truncation(b):
    weight = torch.randn(30, 19, dtype=torch.float64)
    layer = LowRankLinear.from_weight(weight, None, rank=19)
    layer.active_rank = b
    p, s, qh = torch.linalg.svd(weight, full_matrices=False)
    best = p[:, :b] @ torch.diag(s[:b]) @ qh[:b]
    x = torch.randn(7, 19, dtype=torch.float64)
    assert relative_error(layer(x), x @ best.T) <= 1e-10
    # Eckart–Young: the Frobenius error of the truncation is the norm of the dropped singular values.
    error = (layer.dense_weight() - weight).norm()
    torch.testing.assert_close(error, s[b:].norm(), rtol=1e-10, atol=1e-12)


def test_active_rank_is_a_view_and_truncate_is_physical():
    layer = LowRankLinear.from_dense(nn.Linear(12, 9))
    up = layer.up
    layer.active_rank = 4
    assert layer.rank == 9 and layer.effective_rank == 4
    factor_up, factor_down = layer.factors()
    assert factor_up.data_ptr() == layer.up.data_ptr() and factor_up.shape == (9, 4)
    assert factor_down.shape == (4, 12)
    layer.active_rank = None
    expected = layer.up[:, :4] @ layer.down[:4]
    layer.truncate_(4)
    assert layer.up is up and layer.rank == 4 and layer.up.shape == (9, 4)
    torch.testing.assert_close(layer.dense_weight(), expected)


def test_importance_is_non_increasing_and_matches_singular_values_after_svd_init():
    weight = torch.randn(10, 8, dtype=torch.float64)
    layer = LowRankLinear.from_weight(weight, None, rank=8)
    importance = layer.importance()
    assert torch.all(importance[1:] <= importance[:-1])
    # With the balanced split √S on both sides, ‖U[:, b:]‖·‖V[:, b:]‖ = Σ_{k≥b} σ_k.
    s = torch.linalg.svdvals(weight)
    torch.testing.assert_close(importance, s.flip(0).cumsum(0).flip(0))


def test_grouped_conv_ranks_are_per_group_and_truncate_like_each_groups_svd():
    dense = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False).double()
    layer = LowRankConv.from_dense(dense, rank=2)
    assert layer.max_rank == 3 and layer.rank == 2 and layer.up.shape == (4, 3, 2) and layer.down.shape == (4, 2, 18)
    blocks = dense.weight.reshape(4, 3, 18)
    p, s, qh = torch.linalg.svd(blocks, full_matrices=False)
    best = p[..., :2] @ torch.diag_embed(s[..., :2]) @ qh[..., :2, :]
    torch.testing.assert_close(layer.up @ layer.down, best)


def test_random_init_has_requested_rank_and_dense_like_scale():
    dense = nn.Linear(256, 128)
    layer = LowRankLinear.from_dense(dense, rank=128, init="random", generator=torch.Generator().manual_seed(1))
    ratio = layer.dense_weight().detach().std() / dense.weight.detach().std()
    assert 0.8 < float(ratio) < 1.25


def test_shrunk_state_dict_loads_strictly_into_a_fresh_factorised_model():
    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    trained = factorize(build())
    truncate_(trained, {"0": 5, "3": 3})
    state = trained.state_dict()
    fresh = factorize(build())
    assert rank_pattern(fresh) == {"0": 8, "3": 10}
    fresh.load_state_dict(state, strict=True)
    assert rank_pattern(fresh) == {"0": 5, "3": 3}
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x), trained(x))


def test_to_standard_pair_and_merge_match_the_factorised_layer():
    conv = LowRankConv.from_dense(nn.Conv2d(6, 10, 3, stride=2, padding=1), rank=3)
    x = torch.randn(2, 6, 9, 9)
    pair, merged = conv.to_standard(merge=False), conv.to_standard(merge=True)
    assert isinstance(pair, nn.Sequential) and [type(m) for m in pair] == [nn.Conv2d, nn.Conv2d]
    assert isinstance(merged, nn.Conv2d)
    torch.testing.assert_close(pair(x), conv(x))
    torch.testing.assert_close(merged(x), conv(x))


def test_bad_active_rank_and_truncation_are_rejected():
    layer = LowRankLinear.from_dense(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="active_rank 5"):
        layer.active_rank = 5
    with pytest.raises(TypeError, match="2.5"):
        layer.active_rank = 2.5
    with pytest.raises(ValueError, match="rank 7"):
        layer.truncate_(7)
    assert layer.rank == 4 and layer.active_rank is None


def test_config_json_round_trip_and_validation():
    config = FactorizeConfig(target_modules=["fc", "conv"], exclude_modules="head.*", init="random", rank=0.5,
                             rank_pattern={"fc": 3}, min_rank=2, seed=7)
    assert FactorizeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        FactorizeConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="init='qr'"):
        FactorizeConfig(init="qr")
    with pytest.raises(ValueError, match="rank=0"):
        FactorizeConfig(rank=0)
    with pytest.raises(ValueError, match="1.5"):
        FactorizeConfig(rank=1.5)
    with pytest.raises(ValueError, match="regular expression"):
        FactorizeConfig(target_modules="fc[")
