"""factorize keeps the model the user brought: what cannot be kept exactly stays dense with a reason,
and everything that is replaced computes, trains and reports what it did before."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import maestro_lod as ml
from conftest import relative_error


def _reasons(model, config=None):
    return {e.name: e.skipped for e in ml.plan(model, config)}


# ----------------------------------------------------------------------- subclasses overriding forward
class Conv2dSame(nn.Conv2d):
    """Like timm's Conv2dSame: TensorFlow "same" padding computed from the input size in forward."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Like timm's StdConv2d: the weight is standardised per output channel in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """Like timm's ScaledStdConv2d: standardised weight times a learned gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 2.0))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, self.gain * w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class ShiftedConv(nn.Conv2d):
    """Overrides ``_conv_forward``, through which ``nn.Conv2d.forward`` computes."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, bias) + 1.0


class InitOnlyConv(nn.Conv2d):
    """A subclass that only changes the initialisation: computes exactly what nn.Conv2d does."""

    def reset_parameters(self):
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _override_model():
    return nn.Sequential(Conv2dSame(3, 8, 3, stride=2), StdConv2d(8, 8, 3, padding=1), ScaledStdConv2d(8, 8, 3, padding=1),
                         ShiftedConv(8, 8, 1), InitOnlyConv(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1),
                         nn.Flatten(), DoubledLinear(8 * 8 * 8, 10))


def test_subclasses_that_override_forward_stay_dense_with_the_reason():
    dense = _override_model().eval()
    reasons = _reasons(dense)
    assert reasons["0"] == ("overrides forward: Conv2dSame.forward computes something the factorised "
                            "nn.Conv1d/Conv2d/Conv3d would not")
    assert "StdConv2d.forward" in reasons["1"] and "ScaledStdConv2d.forward" in reasons["2"]
    assert "ShiftedConv._conv_forward" in reasons["3"] and "DoubledLinear.forward" in reasons["7"]
    assert reasons["4"] is None and reasons["5"] is None
    x = torch.randn(2, 3, 16, 16)
    model = ml.factorize(copy.deepcopy(dense)).eval()
    assert [type(m) for m in model][:6] == [Conv2dSame, StdConv2d, ScaledStdConv2d, ShiftedConv, ml.LowRankConv,
                                            ml.LowRankConv]
    assert relative_error(model(x), dense(x)) <= 1e-5


def test_a_handler_listing_a_subclass_claims_it_explicitly(registry_restored):
    def build(layer, spec):
        return ml.LowRankLinear.from_weight(2 * layer.weight, 2 * layer.bias, spec.rank)

    ml.register_layer(ml.LayerHandler("DoubledLinear", lambda m: [ml.Component("", m.out_features, m.in_features)],
                                      build, types=(DoubledLinear,)))
    dense = nn.Sequential(DoubledLinear(6, 5))
    x = torch.randn(3, 6)
    expected = dense(x)
    model = ml.factorize(dense)
    assert isinstance(model[0], ml.LowRankLinear)
    torch.testing.assert_close(model(x), expected)


# ----------------------------------------------------------------------------------- tied weights
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_keeps_its_tied_head_and_tie_weights_still_works():
    dense = _tiny_gpt2()
    assert dense.lm_head.weight is dense.transformer.wte.weight
    reasons = _reasons(dense)
    assert reasons["lm_head"] == "weight shared with transformer.wte (tied weights would be untied)"
    model = ml.factorize(copy.deepcopy(dense))
    model.tie_weights()
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, ml.LowRankLinear)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert relative_error(model(ids).logits, dense(ids).logits) <= 1e-5


def test_a_linear_sharing_its_weight_with_another_module_stays_dense():
    first, second, other = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, other)
    reasons = _reasons(model)
    assert reasons["0"].startswith("weight shared with 2") and reasons["2"].startswith("weight shared with 0")
    ml.factorize(model)
    assert model[0].weight is model[2].weight and isinstance(model[3], ml.LowRankLinear)


# ------------------------------------------------------------------- freezing, hooks, parametrizations
def test_frozen_weights_and_biases_stay_frozen():
    linear, conv, mha = nn.Linear(6, 4), nn.Conv2d(3, 4, 3), nn.MultiheadAttention(8, 2)
    linear.weight.requires_grad_(False)
    conv.requires_grad_(False)
    mha.in_proj_weight.requires_grad_(False)
    mha.out_proj.bias.requires_grad_(False)
    model = ml.factorize(nn.ModuleList([linear, conv, mha, nn.Linear(5, 5)]))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {"0.up": False, "0.down": False, "0.bias": True, "1.up": False, "1.down": False, "1.bias": False,
                     "2.in_proj_bias": True, "2.q_proj.up": False, "2.q_proj.down": False, "2.k_proj.up": False,
                     "2.k_proj.down": False, "2.v_proj.up": False, "2.v_proj.down": False, "2.out_proj.up": True,
                     "2.out_proj.down": True, "2.out_proj.bias": False, "3.up": True, "3.down": True, "3.bias": True}


def test_forward_and_full_backward_hooks_move_to_the_new_layer_with_working_handles():
    calls = []
    dense = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    handles = [
        dense[0].register_forward_pre_hook(lambda m, args: (2 * args[0],)),
        dense[0].register_forward_hook(lambda m, args, out: calls.append(("forward", type(m).__name__)) or out + 1),
        dense[2].register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", tuple(gout[0].shape)))),
        dense[2].register_full_backward_pre_hook(lambda m, gout: calls.append(("backward-pre", type(m).__name__))),
    ]
    x = torch.randn(5, 6, requires_grad=True)
    reference = copy.deepcopy(dense)
    expected = reference(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    model = ml.factorize(dense)
    calls.clear()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, expected_grad)
    assert calls == [("forward", "LowRankLinear"), ("backward-pre", "LowRankLinear"), ("backward", (5, 3))]
    for handle in handles:
        handle.remove()
    calls.clear()
    torch.testing.assert_close(model(x), model[2](model[1](model[0].up @ (model[0].down @ x.T) + model[0].bias[:, None]).T))
    assert calls == []
    exported_calls = []
    model[2].register_forward_hook(lambda m, args, out: exported_calls.append(type(m).__name__))
    ml.export(model)(x)
    assert exported_calls in (["Sequential"], ["Linear"])


def test_parametrized_and_legacy_hooked_layers_stay_dense_with_the_reason():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 6)), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy API is deprecated, and still used
        torch.nn.utils.weight_norm(model[1])
        model[2].register_backward_hook(lambda m, gin, gout: None)
    reasons = _reasons(model)
    assert reasons["0"].startswith("parametrized (weight)")
    assert reasons["1"].startswith("reparametrized by a WeightNorm hook")
    assert "register_backward_hook" in reasons["2"] and reasons["3"] is None
    x = torch.randn(3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy backward hook warns at each forward
        expected = model(x)
        ml.factorize(model)
        assert [type(m).__name__ for m in model][1:] == ["Linear", "Linear", "LowRankLinear"]
        assert torch.nn.utils.parametrize.is_parametrized(model[0])
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="nothing to factorise.*0: parametrized"):
        ml.factorize(nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 6))))


# ------------------------------------------------------------------------------ reading .weight
class T5LikeFeedForward(nn.Module):
    """T5's feed-forward block reads ``wo.weight.dtype`` on every call."""

    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(16, 32, bias=False)
        self.wo = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        h = torch.relu(self.wi(x))
        if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def test_reading_weight_metadata_costs_nothing():
    dense = T5LikeFeedForward()
    model = ml.factorize(copy.deepcopy(dense))
    x = torch.randn(4, 16)
    honest = 4 * 16 * (16 + 32) * 2  # two rank-16 factor pairs
    assert ml.count_macs(model, x) == honest
    torch.testing.assert_close(model(x), dense(x))
    weight = model.wo.weight
    assert (weight.shape, weight.dtype, weight.device, weight.requires_grad) == ((16, 32), torch.float32,
                                                                                 torch.device("cpu"), True)


def test_weight_values_are_the_product_with_gradients_to_the_factors():
    layer = ml.factorize(nn.Linear(6, 4))
    layer.active_rank = 2
    x = torch.randn(3, 6)
    out = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert layer.up.grad[:, :2].abs().sum() > 0 and layer.up.grad[:, 2:].abs().sum() == 0
    torch.testing.assert_close(layer.weight.data, layer.up[:, :2].detach() @ layer.down[:2].detach())
    assert "tensor(" in repr(layer.weight)


@pytest.mark.parametrize("write", [
    lambda layer: nn.init.zeros_(layer.weight),
    lambda layer: layer.weight.data.fill_(0),
    lambda layer: layer.weight.detach().mul_(2),
    lambda layer: setattr(layer, "weight", nn.Parameter(torch.zeros(4, 6))),
    lambda layer: setattr(layer, "weight", torch.zeros(4, 6)),
    lambda layer: layer.weight.requires_grad_(False),
    lambda layer: layer.weight.__setitem__(0, 1.0),
    lambda layer: torch.add(torch.zeros(4, 6), 1, out=layer.weight),
    lambda layer: setattr(layer.weight, "data", torch.zeros(4, 6)),
], ids=["init.zeros_", "data.fill_", "detach.mul_", "assign-parameter", "assign-tensor", "requires_grad_",
        "setitem", "out=", "set-data"])
def test_writes_to_the_computed_weight_raise(write):
    layer = ml.factorize(nn.Linear(6, 4))
    before = layer.dense_weight().detach().clone()
    with pytest.raises(ml.ConfigError, match="computed from the factors"):
        write(layer)
    torch.testing.assert_close(layer.dense_weight(), before)


def test_attention_packed_weight_is_computed_too_and_encoders_pay_nothing_for_reading_it():
    mha = ml.factorize(nn.MultiheadAttention(8, 2))
    with pytest.raises(ml.ConfigError, match="in_proj_weight"):
        mha.in_proj_weight = nn.Parameter(torch.zeros(24, 8))
    with pytest.raises(ml.ConfigError, match="computed from the factors"):
        mha.in_proj_weight.data.zero_()
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
    encoder = ml.factorize(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(2, 5, 16)
    expected = ml.count_macs(encoder, x)  # fused path off: the model's own computation
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(x)  # fused path on: PyTorch reads every packed weight to decide on it
    assert counter.get_total_flops() // 2 == expected


# -------------------------------------------------------------------------------- optimiser state
def _trained(optimizer_cls, **options):
    torch.manual_seed(0)
    model = ml.factorize(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)))
    optimizer = optimizer_cls(model.parameters(), **options)
    x, y = torch.randn(32, 10), torch.randn(32, 6)

    def step():
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    return model, optimizer, step


def test_adafactor_trains_through_a_shrink_with_its_factored_state_sliced():
    model, optimizer, step = _trained(torch.optim.Adafactor, lr=1e-2)
    with torch.no_grad():
        model[0].up[:, 5:] *= 1e-6
    assert ml.shrink_(model, 1e-4, optimizer)["0"] == (8, 5)
    for _ in range(4):
        step()
    for param in (model[0].up, model[0].down, model[2].up, model[2].down):
        state = optimizer.state[param]
        assert state["row_var"].shape == (*param.shape[:-1], 1)
        assert state["col_var"].shape == (1, param.shape[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shrinking_without_the_optimiser_is_reported_at_its_next_step():
    model, optimizer, step = _trained(torch.optim.Adam, lr=1e-2)
    ml.truncate_(model, {"0": 3})
    with pytest.raises(ml.ConfigError, match="'exp_avg' has shape \\(8, 8\\) but its factor was shrunk to \\(8, 3\\): "
                                             "pass the optimizer to shrink_/truncate_"):
        step()


def test_optimisers_whose_state_cannot_be_sliced_are_refused_before_anything_changes():
    class Preconditioned(torch.optim.SGD):
        """Keeps an r × r statistic per factor, which has no rank slice."""

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["gram"] = torch.eye(2)
            return super().step(closure)

    model, optimizer, step = _trained(Preconditioned, lr=1e-2)
    with pytest.raises(ml.ConfigError, match="Preconditioned keeps state 'gram' of shape \\(2, 2\\) for a factor of "
                                             "'0' shaped \\(8, 8\\)"):
        ml.truncate_(model, {"0": 6}, optimizer)
    assert ml.rank_pattern(model) == {"0": 8, "2": 6}


# ------------------------------------------------------------------------------------------- plan
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8)
        self.up = nn.ConvTranspose1d(8, 8, 2)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.score = nn.Linear(64, 1)


def test_plan_lists_every_module_with_parameters_and_totals():
    model = Mixed()
    entries = ml.plan(model)
    assert {(d.name, d.reason) for d in entries.left_dense} == {
        ("embed", "no handler for Embedding"), ("lstm", "no handler for LSTM"),
        ("up", "no handler for ConvTranspose1d"), ("norm", "no handler for LayerNorm")}
    assert entries.skipped[0].name == "score" and entries.skipped[0].skipped.startswith("full rank 1")
    text = str(entries)
    assert "no handler for LSTM" in text and text.splitlines()[-1].startswith("total")
    totals = entries.totals
    assert totals.dense_params == ml.count_params(model)
    factorised = ml.factorize(copy.deepcopy(model))
    assert totals.params_after == ml.count_params(factorised)
    assert totals.factorized_params == sum(layer.up.numel() + layer.down.numel()
                                           for _, layer in ml.low_rank_layers(factorised))
    assert list(dict(ml.low_rank_layers(factorised))) == ["head"]


def test_a_regex_target_matches_whole_names_and_a_list_entry_matches_suffixes():
    def build():
        return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))

    assert list(ml.rank_pattern(ml.factorize(build(), ml.FactorizeConfig(target_modules="0")))) == ["0"]
    assert list(ml.rank_pattern(ml.factorize(build(), ml.FactorizeConfig(target_modules=["0"])))) == ["0", "1.0"]
    assert list(ml.rank_pattern(ml.factorize(build(), ml.FactorizeConfig(target_modules=r"1\..*")))) == ["1.0", "1.1"]


def test_exclusions_and_rank_patterns_that_match_nothing_are_warned_about():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="exclude_modules entry 'fc' matches no factorisable layer"):
        ml.plan(model, ml.FactorizeConfig(exclude_modules=["fc", "0"]))
    with pytest.warns(UserWarning, match="rank_pattern key 'layer1' matches no factorisable layer"):
        ml.factorize(copy.deepcopy(model), ml.FactorizeConfig(rank_pattern={"layer1": 2, "1": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.plan(model, ml.FactorizeConfig(exclude_modules=r"\d", rank_pattern={"0": 2}))


def test_factorising_a_factorised_model_says_so():
    model = ml.factorize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
    with pytest.raises(ml.ConfigError, match="already factorised \\(2 factorised module\\(s\\)\\) and has no dense"):
        ml.factorize(model)
    assert [d.reason for d in ml.plan(model).left_dense] == ["already factorised"] * 2


# -------------------------------------------------------------------------------------------- cost
def test_count_macs_takes_keyword_inputs():
    dense = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    macs = ml.count_macs(dense, kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False})
    assert macs == ml.count_macs(dense, (ids,)) > 0
    model = ml.factorize(copy.deepcopy(dense), ml.FactorizeConfig(rank=4))
    assert ml.count_macs(model, kwargs={"input_ids": ids, "attention_mask": mask}) < macs
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        ml.count_macs(dense, kwargs=[ids])


# ------------------------------------------------------------------------------- library behaviour
def test_a_model_without_low_rank_layers_is_a_mistake_for_shrinking_and_sampling():
    dense = nn.Sequential(nn.Linear(4, 4))
    for call in (lambda: ml.shrink_(dense, 0.1), lambda: ml.truncate_(dense, {}), lambda: ml.group_lasso(dense)):
        with pytest.raises(ml.ConfigError, match="no low-rank layers; call factorize\\(\\) first"):
            call()
    with pytest.raises(ml.ConfigError, match="sampled_ranks: the model has no low-rank layers"):
        with ml.sampled_ranks(dense, ml.SingleLayerSampler(0)):
            pass
    copied = ml.export(dense)
    assert copied is not dense and torch.equal(copied[0].weight, dense[0].weight)


def test_full_rank_one_layers_are_not_factorised():
    model = ml.factorize(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1)))
    assert list(ml.rank_pattern(model)) == ["0"] and type(model[2]) is nn.Linear
    with pytest.raises(ml.ConfigError, match="full rank 1"):
        ml.factorize(nn.Linear(64, 1))


def test_nested_sampling_scopes_restore_the_enclosing_draw():
    model = ml.factorize(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)))
    layers = dict(ml.low_rank_layers(model))
    with ml.sampled_ranks(model, ml.FixedFractionSampler(0.5)) as outer:
        assert outer == {"0": 3, "2": 3, "4": 2}
        with ml.sampled_ranks(model, ml.SingleLayerSampler(3)) as inner:
            (name, rank), = inner.items()
            assert layers[name].active_rank == rank
        assert {n: layer.active_rank for n, layer in layers.items()} == outer
    assert all(layer.active_rank is None for layer in layers.values())


# ------------------------------------------------------------------------------------------ rank 0
RANK_ZERO = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "conv2d-stride-pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 8)),
    "conv2d-dilated-circular": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="circular"), (2, 3, 7, 7)),
    "conv1d-same-reflect": (lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"), (2, 3, 11)),
    "conv3d-valid-nobias": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=False), (2, 2, 5, 6, 4)),
    "conv2d-unbatched": (lambda: nn.Conv2d(3, 4, 3, stride=2), (3, 9, 9)),
}


@pytest.mark.parametrize("kind", list(RANK_ZERO))
def test_rank_zero_outputs_the_bias_and_exports_to_the_same(kind):
    build, shape = RANK_ZERO[kind]
    dense = build()
    x = torch.randn(shape)
    layer = ml.factorize(copy.deepcopy(dense), ml.FactorizeConfig(min_rank=0))
    layer.truncate_(0)
    with torch.no_grad():
        dense.weight.zero_()
    out = layer(x)
    assert out.shape == dense(x).shape
    torch.testing.assert_close(out, dense(x))
    for merge in ("never", "always", "auto"):
        exported = ml.export(layer, merge=merge)
        assert type(exported).__module__.startswith("torch.nn")
        torch.testing.assert_close(exported(x), out)
    if layer.bias is not None:
        out.sum().backward()
        assert layer.bias.grad.abs().sum() > 0


def test_rank_zero_attention_projections_and_shrinking_to_zero():
    mha = ml.factorize(nn.MultiheadAttention(8, 2, batch_first=True), ml.FactorizeConfig(min_rank=0))
    x = torch.randn(2, 5, 8)
    ml.truncate_(mha, {"q_proj": 0, "v_proj": 0})
    out, _ = mha(x, x, x)
    exported = ml.export(mha)
    torch.testing.assert_close(exported(x, x, x)[0], out)
    bias = mha.in_proj_bias.chunk(3)[2]
    torch.testing.assert_close(out, mha.out_proj(bias.expand(2, 5, 8)))  # values are the v bias everywhere
    with torch.no_grad():
        mha.k_proj.up.zero_()
    assert ml.shrink_(mha, 0.0)["k_proj"] == (8, 0)
