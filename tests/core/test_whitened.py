"""init="whitened": exact at full rank, the smallest output error on the calibration data at every
rank (equal to the closed-form optimum from the SVD of W·L), robust to singular statistics, and
calibration errors that leave the model and its hooks as they were."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maestro_lod import ConfigError, ConfigTypeError, FactorizeConfig, LowRankLinear, factorize
from maestro_lod.functional import whitened_split, whitening_factor
from maestro_lod.whitening import input_second_moments


def _whitened(model, batches, **config):
    return factorize(model, FactorizeConfig(init="whitened", **config), calibration=batches)


def _anisotropic(rows, features, generator, low=-3.0, high=1.0):
    """Inputs whose feature scales span 10**low … 10**high (random rotation, so not axis-aligned)."""
    scales = torch.logspace(low, high, features, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64, generator=generator))[0]
    return torch.randn(rows, features, dtype=torch.float64, generator=generator) * scales @ rotation


def _optimum(weight, rows):
    """√(Σ_{j>r} σ_j²) for r = 0 … min(m, n), σ the singular values of W·L with L Lᵀ = rowsᵀ rows."""
    sigma = torch.linalg.svdvals(weight @ torch.linalg.cholesky(rows.T @ rows))
    tails = sigma.square().flip(0).cumsum(0).flip(0)
    return torch.cat([tails, tails.new_zeros(1)]).sqrt()


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------ exact at full rank
@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(12, 7), (5, 3, 12)),
    (nn.Conv2d(3, 8, 3, padding=1), (4, 3, 9, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect"), (3, 4, 11, 11)),
    (nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"), (3, 4, 10)),
    (nn.Conv3d(2, 5, 2), (3, 2, 4, 4, 4)),
])
def test_full_rank_reproduces_the_dense_outputs(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        got = _whitened(model, [x[:2], x[2:]])(x)
    assert isinstance(model[0], LowRankLinear) == isinstance(layer, nn.Linear)
    assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------ optimal on the data
def test_linear_truncation_reaches_the_output_error_optimum_and_beats_plain_svd():
    g = torch.Generator().manual_seed(0)
    x = _anisotropic(512, 16, g)
    dense = nn.Linear(16, 12).double()
    weight = dense.weight.detach().clone()
    whitened = _whitened(nn.Sequential(copy.deepcopy(dense)), [(x[:256], None), (x[256:], None)], damping=0.0)[0]
    plain = factorize(nn.Sequential(copy.deepcopy(dense)))[0]
    optimum = _optimum(weight, x)
    strictly_better = 0
    for rank in range(13):
        whitened.active_rank = plain.active_rank = rank
        with torch.no_grad():
            error = float(torch.linalg.norm((whitened.dense_weight() - weight) @ x.T))
            plain_error = float(torch.linalg.norm((plain.dense_weight() - weight) @ x.T))
        assert error == pytest.approx(float(optimum[rank]), rel=1e-6, abs=1e-9), rank
        assert error <= plain_error * (1 + 1e-9), rank
        strictly_better += bool(error < 0.5 * plain_error)
    assert strictly_better >= 6  # the inputs are anisotropic enough for whitening to matter


def _conv_rows(conv, x):
    """Patches of ``x`` as ``conv`` sees them, from ``F.unfold`` (2-d) or a 1-row 2-d view (1-d)."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0,) * len(padding)
    if x.dim() == 3:
        cols = F.unfold(x.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                        padding=(0, padding[0]), stride=(1, conv.stride[0]))
    else:
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (6, 4, 9, 9)),
    (nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=1, padding_mode="reflect"), (6, 4, 9, 9)),
    (nn.Conv1d(5, 7, 3, stride=2, padding=1, padding_mode="circular"), (8, 5, 16)),
])
def test_conv_truncation_reaches_the_optimum_on_unfolded_patches(conv, shape):
    g = torch.Generator().manual_seed(1)
    conv = conv.double()
    channels = shape[1]
    scales = torch.logspace(-3, 1, channels, dtype=torch.float64).reshape(1, channels, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, dtype=torch.float64, generator=g) * scales
    low = _whitened(nn.Sequential(copy.deepcopy(conv)), [x[:3], x[3:]], damping=0.0)[0]
    plain = factorize(nn.Sequential(copy.deepcopy(conv)))[0]
    groups, out_g = conv.groups, conv.out_channels // conv.groups
    rows = _conv_rows(conv, x).reshape(-1, groups, channels // groups * math.prod(conv.kernel_size))
    weight = conv.weight.detach().reshape(groups, out_g, -1)
    optimum = [_optimum(weight[i], rows[:, i]) for i in range(groups)]
    with torch.no_grad():
        dense_out = conv(x)
        for rank in range(1, low.max_rank):
            low.active_rank = plain.active_rank = rank
            error = float(torch.linalg.norm(low(x) - dense_out))
            best = math.sqrt(sum(float(o[rank]) ** 2 for o in optimum))
            assert error == pytest.approx(best, rel=1e-6), rank
            assert error <= torch.linalg.norm(plain(x) - dense_out) * (1 + 1e-9), rank


def test_conv3d_and_conv1d_statistics_are_the_patch_second_moments():
    g = torch.Generator().manual_seed(2)
    conv3, conv1 = nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), nn.Conv1d(3, 4, 3, dilation=2)
    x3, x1 = torch.randn(2, 2, 4, 5, 3, generator=g), torch.randn(2, 3, 9, generator=g)
    model = nn.ModuleDict({"a": conv3, "b": conv1})
    model.forward = lambda a, b: (conv3(a), conv1(b))
    moments = input_second_moments(model, {"a": conv3, "b": conv1}, [((x3, x1),)])
    rows3 = x3.unfold(2, 2, 1).unfold(3, 2, 2).unfold(4, 2, 1).permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, 16)
    rows1 = x1.unfold(2, 5, 1)[..., ::2].permute(0, 2, 1, 3).reshape(-1, 9)
    for key, rows in (("a", rows3), ("b", rows1)):
        expected = rows.double().T @ rows.double()
        assert torch.allclose(moments[key][""].matrix[0], expected, atol=1e-10)
        assert moments[key][""].rows == rows.shape[0]


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5)

    def forward(self, q, k, v):
        return self.mha(q, k, v, need_weights=False)[0]


def _context(mha, q, k, v):
    """The heads' concatenated output of ``mha`` (the input of its out_proj), computed by hand."""
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    heads, dim = mha.num_heads, mha.head_dim
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim).transpose(1, 2)  # noqa: E731
    qh = split(q @ mha.q_proj_weight.T + bq)
    kh, vh = split(k @ mha.k_proj_weight.T + bk), split(v @ mha.v_proj_weight.T + bv)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dim), dim=-1)
    return (attn @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def test_attention_projections_are_whitened_with_their_own_inputs():
    g = torch.Generator().manual_seed(3)
    model = _Attention().double().eval()
    q, k, v = (_anisotropic(4 * 10, n, g).reshape(4, 10, n) for n in (8, 6, 5))
    dense = copy.deepcopy(model.mha)
    with torch.no_grad():
        expected = model(q, k, v)
        context = _context(dense, q, k, v).reshape(-1, 8)
    low = _whitened(model, [((q, k, v), None)], damping=0.0).mha
    with torch.no_grad():
        assert torch.allclose(model(q, k, v), expected, atol=1e-10)
        inputs = {"q_proj": (dense.q_proj_weight, q), "k_proj": (dense.k_proj_weight, k),
                  "v_proj": (dense.v_proj_weight, v), "out_proj": (dense.out_proj.weight, context)}
        for name, (weight, x) in inputs.items():
            rows = x.reshape(-1, x.shape[-1])
            proj = getattr(low, name)
            proj.active_rank = 3
            error = float(torch.linalg.norm((proj.dense_weight() - weight) @ rows.T))
            assert error == pytest.approx(float(_optimum(weight.detach(), rows)[3]), rel=1e-6), name


class Conv1D(nn.Module):
    """The layout of Hugging Face's GPT-2 ``Conv1D``: ``x @ weight + bias`` with weight in × out."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_gpt2_conv1d_is_whitened_like_a_linear():
    g = torch.Generator().manual_seed(4)
    x = _anisotropic(200, 10, g)
    model = nn.Sequential(Conv1D(6, 10).double())
    weight = model[0].weight.detach().T.clone()
    with torch.no_grad():
        expected = model(x)
        low = _whitened(model, [x], damping=0.0)[0]
        assert torch.allclose(low(x), expected, atol=1e-10)
        low.active_rank = 2
        assert float(torch.linalg.norm(low(x) - expected)) == pytest.approx(float(_optimum(weight, x)[2]), rel=1e-6)


# ------------------------------------------------------------------------------ singular statistics
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_inputs_on_a_subspace_give_finite_factors_exact_on_that_data(damping):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    x[:, 5:] = 0  # half the features never carry anything: the second moment is singular
    model = nn.Sequential(nn.Linear(10, 8))
    expected = model(x).detach()
    low = _whitened(model, [x], damping=damping)[0]
    assert torch.isfinite(low.up).all() and torch.isfinite(low.down).all()
    assert torch.allclose(low(x), expected, atol=1e-5)


def test_whitening_factor_survives_an_indefinite_matrix_and_zero_energy():
    c = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))  # Cholesky fails at every retry
    factor = whitening_factor(c, damping=0.0)
    assert torch.isfinite(factor).all()
    weight = torch.randn(4, 3, dtype=torch.float64)
    up, down = whitened_split(weight, factor, 3)
    assert torch.allclose(up @ down, weight, atol=1e-10)
    assert torch.equal(whitening_factor(torch.zeros(3, 3), 0.5), torch.eye(3, dtype=torch.float64))


def test_a_layer_the_calibration_never_reaches_keeps_plain_svd_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    reference = factorize(copy.deepcopy(model)).unused
    with pytest.warns(UserWarning, match="unused: no input during calibration"):
        _whitened(model, [torch.randn(8, 4)])
    assert torch.allclose(model.unused.up, reference.up) and torch.allclose(model.unused.down, reference.down)


# ------------------------------------------------------------------------------ configuration and errors
@pytest.mark.parametrize("damping, error", [(-1.0, ConfigError), (float("nan"), ConfigError),
                                            (float("inf"), ConfigError), ("0.1", ConfigTypeError),
                                            (True, ConfigTypeError)])
def test_damping_is_validated(damping, error):
    with pytest.raises(error, match="damping"):
        FactorizeConfig(init="whitened", damping=damping)
    assert FactorizeConfig.from_dict(FactorizeConfig(init="whitened", damping=0).to_dict()).damping == 0.0


def _net():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_whitened_without_calibration_and_calibration_without_whitened_are_refused():
    with pytest.raises(ConfigError, match="needs calibration"):
        factorize(_net(), FactorizeConfig(init="whitened"))
    with pytest.raises(ConfigError, match="only used by init='whitened'"):
        factorize(_net(), FactorizeConfig(), calibration=[torch.randn(2, 6)])
    with pytest.raises(ConfigTypeError, match="iterable of batches"):
        factorize(_net(), FactorizeConfig(init="whitened"), calibration=torch.randn(4, 6))


@pytest.mark.parametrize("batches, error, match", [
    ([], ValueError, "calibration is empty"),
    ([torch.randn(4, 7)], ValueError, "input of 0 has 7 features"),
    ([torch.ones(4, 6, dtype=torch.long)], RuntimeError, "dtype"),  # the model's own error
    ([torch.randn(4, 6), torch.full((4, 6), float("nan"))], ValueError, r"input of 0 has NaN"),
    ((b for b in [torch.randn(2, 6), torch.tensor([[float("inf")] * 6])]), ValueError, "NaN or infinite"),
])
def test_calibration_errors_leave_model_modes_and_hooks_as_they_were(batches, error, match):
    model = _net().train()
    model[2].eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        _whitened(model, batches)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _no_hooks(model)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.backends.mha.get_fastpath_enabled()


def test_success_restores_modes_and_keeps_user_hooks_only():
    model = _net().train()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _whitened(model, [(torch.randn(4, 6), torch.zeros(4))])
    assert model.training and len(seen) == 1  # the calibration pass ran once through the user's hook
    assert len(model[0]._forward_hooks) == 1 and not model[0]._forward_pre_hooks and _no_hooks(model[2])


class _Scaled(nn.Module):
    """A layer only a custom handler knows: ``x @ weight.T`` scaled by 2."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return 2 * x @ self.weight.T


def test_a_custom_handler_gets_plain_svd_with_a_warning():
    from maestro_lod import BuildSpec, Component, LayerHandler, register_layer

    seen = []

    def build(module, spec: BuildSpec):
        seen.append(spec.init)
        return LowRankLinear.from_weight(2 * module.weight, None, spec.rank, init=spec.init)

    register_layer(LayerHandler("test_whitened._Scaled", lambda m: [Component("", 3, 5)], build, types=(_Scaled,)))
    model = nn.Sequential(_Scaled(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="has no whitened init; initialised by plain SVD"):
        _whitened(model, [torch.randn(4, 5)])
    assert seen == ["svd"] and isinstance(model[1], LowRankLinear)
