"""The layer registry: the documented way to add a layer type works as written, handlers take
precedence in registration order, and every factorised module follows one protocol."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.layers import low_rank_layers

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _guide_example() -> str:
    section = GUIDE.read_text().split("## Adding a layer type", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_layer_type_example_runs_and_factorises_exactly(registry_restored, capsys):
    namespace = {}
    exec(compile(_guide_example(), str(GUIDE), "exec"), namespace)
    model, scaled = namespace["model"], namespace["ScaledLinear"]
    assert "ScaledLinear" in capsys.readouterr().out
    assert isinstance(model[0], ml.LowRankLinear) and model[0].rank == 16
    dense = nn.Sequential(scaled(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(5, 16)
    expected = dense(x)
    torch.testing.assert_close(ml.factorize(dense)(x), expected)
    with pytest.raises(ValueError, match="supported: .*ScaledLinear"):
        ml.factorize(nn.Sequential(nn.LayerNorm(4)), ml.FactorizeConfig(target_modules=["0"]))


def test_later_registrations_take_precedence_and_labels_are_unique(registry_restored):
    built = []

    def build(linear, spec):
        built.append(spec.rank)
        return ml.LowRankLinear.from_dense(linear, rank=spec.rank)

    ml.register_layer(ml.LayerHandler("my Linear", lambda m: [ml.Component("", m.out_features, m.in_features)], build,
                                      types=(nn.Linear,)))
    entries = ml.plan(nn.Sequential(nn.Linear(4, 3)))
    assert [e.layer_type for e in entries] == ["my Linear"]
    ml.factorize(nn.Sequential(nn.Linear(4, 3)), ml.FactorizeConfig(rank=2))
    assert built == [2]
    with pytest.raises(ValueError, match="'my Linear' is already registered"):
        ml.register_layer(ml.LayerHandler("my Linear", lambda m: [], build, types=(nn.Linear,)))
    with pytest.raises(TypeError, match="LayerHandler"):
        ml.register_layer(lambda m: m)
    with pytest.raises(ValueError, match="needs types or a matches predicate"):
        ml.LayerHandler("nothing", lambda m: [], build)


def test_a_builder_must_return_a_factorised_module(registry_restored):
    ml.register_layer(ml.LayerHandler("identity", lambda m: [ml.Component("", m.out_features, m.in_features)],
                                      lambda m, spec: m, types=(nn.Linear,)))
    with pytest.raises(TypeError, match="'identity' built a Linear, not a maestro_lod.layers.Factorized"):
        ml.factorize(nn.Sequential(nn.Linear(4, 3)))


def test_every_factorised_module_follows_the_protocol_that_export_uses():
    model = ml.factorize(nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 3), nn.Flatten(0, -1)))
    attention = ml.factorize(nn.MultiheadAttention(8, 2))
    for module in (model[0], model[1], attention):
        assert isinstance(module, ml.Factorized)
        standard = module.to_standard(True)
        assert not isinstance(standard, ml.Factorized)
        assert type(standard).__module__.startswith("torch.nn")
    rebuilt = ml.LowRankMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2), rank={"q_proj": 3})
    assert {name: layer.rank for name, layer in low_rank_layers(rebuilt)} == {
        "q_proj": 3, "k_proj": 8, "v_proj": 8, "out_proj": 8}
    with pytest.raises(ValueError, match="unknown attention projection"):
        ml.LowRankMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2), rank={"query": 3})


def test_layer_queries_live_with_the_layers_and_keep_their_old_import_paths():
    from maestro_lod.layers import low_rank_layers as from_inject, rank_pattern as pattern_from_inject
    from maestro_lod.layers import low_rank_layers as from_layers, rank_pattern as pattern_from_layers
    assert from_inject is from_layers is ml.low_rank_layers
    assert pattern_from_inject is pattern_from_layers is ml.rank_pattern
