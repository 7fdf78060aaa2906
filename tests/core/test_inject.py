"""factorize / plan: which layers are chosen, shared modules, and errors that leave the model unchanged."""

import copy

import pytest
import torch
from torch import nn

from maestro_lod import FactorizeConfig, LowRankConv, LowRankLinear, factorize, layer_summary, low_rank_layers, plan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.norm(x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_default_factorises_every_supported_layer_and_skips_depthwise_with_reason():
    model = factorize(Net())
    assert {name: type(layer) for name, layer in low_rank_layers(model)} == {
        "features.0": LowRankConv, "head.0": LowRankLinear, "head.2": LowRankLinear}
    entries = {e.name: e for e in plan(Net())}
    assert "depthwise" in entries["features.2"].skipped
    assert entries["head.0"].rank == 8 and entries["head.0"].dense_params == 128
    assert entries["head.0"].factorized_params == 8 * (16 + 8)


def test_targets_excludes_and_rank_rules():
    config = FactorizeConfig(target_modules=r"head\..*", exclude_modules=["2"], rank=0.5, rank_pattern={})
    model = factorize(Net(), config)
    assert {n: layer.rank for n, layer in low_rank_layers(model)} == {"head.0": 4}
    model = factorize(Net(), FactorizeConfig(rank=3, rank_pattern={r"head\.\d": 2, "features.0": 1.0}))
    assert {n: layer.rank for n, layer in low_rank_layers(model)} == {"features.0": 8, "head.0": 2, "head.2": 2}
    text = str(plan(Net(), FactorizeConfig(target_modules=["head.2"])))
    assert "head.2" in text and "not in target_modules" in text


def test_plan_changes_nothing_and_lists_shapes():
    model = Net()
    before, types = _state(model)
    entries = plan(model)
    assert [type(m) for m in model.modules()] == types
    assert [(e.name, e.out_features, e.in_features, e.groups) for e in entries] == [
        ("features.0", 8, 27, 1), ("features.2", 1, 9, 8), ("head.0", 16, 8, 1), ("head.2", 4, 16, 1)]


def test_shared_module_becomes_one_shared_low_rank_layer():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 6)
    expected = model(x)
    factorize(model)
    assert model[0] is model[2] and isinstance(model[0], LowRankLinear)
    assert len(list(low_rank_layers(model))) == 1
    torch.testing.assert_close(model(x), expected)
    assert "shared with 2" in str(plan(nn.Sequential(shared, nn.ReLU(), shared)))


def test_a_single_layer_model_returns_the_replacement():
    layer = factorize(nn.Linear(4, 3))
    assert isinstance(layer, LowRankLinear)


def test_layer_summary_table():
    text = layer_summary(factorize(Net(), FactorizeConfig(rank=2)))
    assert "head.0" in text and "2/8" in text and "total" in text


@pytest.mark.parametrize("call, error, match", [
    (lambda m: factorize("model"), TypeError, "got str"),
    (lambda m: factorize(m, {"rank": 2}), TypeError, "FactorizeConfig"),
    (lambda m: factorize(m, FactorizeConfig(target_modules=["nothere"])), ValueError, "nothere"),
    (lambda m: factorize(m, FactorizeConfig(target_modules=["norm", "head.0"])), ValueError, "'norm' \\(LayerNorm\\)"),
    (lambda m: factorize(m, FactorizeConfig(rank_pattern={"head.2": 5})), ValueError, "rank_pattern\\['head.2'\\]=5"),
    (lambda m: factorize(m, FactorizeConfig(rank=-1)), ValueError, "rank=-1"),
    (lambda m: factorize(m, FactorizeConfig(init="orthogonal")), ValueError, "'orthogonal'"),
    (lambda m: factorize(m, FactorizeConfig(target_modules=["features.2"])), ValueError, "depthwise"),
])
def test_bad_input_names_the_culprit_and_leaves_the_model_unchanged(call, error, match):
    model = Net()
    before, types = _state(model)
    with pytest.raises(error, match=match):
        call(model)
    after, types_after = _state(model)
    assert types_after == types
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_factorising_twice_only_touches_remaining_dense_layers():
    model = factorize(Net(), FactorizeConfig(target_modules=["head.0"]))
    first = model.head[0]
    factorize(model)
    assert model.head[0] is first and isinstance(model.features[0], LowRankConv)
    copy.deepcopy(model)  # factorised models stay deep-copyable


def test_keep_ends_leaves_the_first_and_the_last_factorisable_layer_dense():
    model = Net()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    factorize(model, FactorizeConfig(keep_ends=True))
    assert [name for name, _ in low_rank_layers(model)] == ["head.0"]
    assert type(model.features[0]) is nn.Conv2d and type(model.head[2]) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    entries = {e.name: e for e in plan(Net(), FactorizeConfig(keep_ends=True))}
    assert entries["features.0"].rank is None and "the first" in entries["features.0"].skipped
    assert entries["head.2"].rank is None and "the last" in entries["head.2"].skipped
    assert entries["head.0"].rank == 8 and entries["head.0"].skipped is None
    # the ends are those of the layers left after the other rules: excluding head.2 keeps head.0 dense
    with pytest.raises(ValueError, match="keep_ends: the last"):
        factorize(Net(), FactorizeConfig(keep_ends=True, exclude_modules=["head.2"]))
    with pytest.raises(ValueError, match="keep_ends: the only"):
        factorize(nn.Sequential(nn.Linear(4, 3)), FactorizeConfig(keep_ends=True))
    with pytest.raises(TypeError, match="keep_ends='yes'"):
        FactorizeConfig(keep_ends="yes")
