"""Ordered dropout: samplers draw sub-models as specified, and the scope applies exactly one draw."""

import pytest
import torch
from torch import nn

from maestro_lod import (BudgetSampler, FixedFractionSampler, IndependentSampler, SingleLayerSampler, SuffixSampler,
                         factorize, low_rank_layers, sampled_ranks, truncate_)


def _model() -> nn.Module:
    return factorize(nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))


def _manual_forward(model: nn.Module, x: torch.Tensor, ranks: dict[str, int]) -> torch.Tensor:
    """The sub-model's output computed from the factors directly, without active_rank."""
    for name, layer in model.named_children():
        if hasattr(layer, "up"):
            b = ranks.get(name, layer.rank)
            x = x @ (layer.up[:, :b] @ layer.down[:b]).T + layer.bias
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("sampler", [SingleLayerSampler(0), IndependentSampler(0), SuffixSampler(0), BudgetSampler(0),
                                     FixedFractionSampler(0.5)])
def test_outputs_follow_the_draw_inside_the_scope_and_the_full_model_after(sampler):
    model = _model()
    x = torch.randn(8, 6)
    full = model(x)
    for _ in range(10):
        with sampled_ranks(model, sampler) as draw:
            out = model(x)
            torch.testing.assert_close(out, _manual_forward(model, x, draw))
    torch.testing.assert_close(model(x), full)
    assert all(layer.active_rank is None for _, layer in low_rank_layers(model))


def test_draw_stays_fixed_through_backward():
    model = _model()
    x = torch.randn(8, 6)
    with sampled_ranks(model, FixedFractionSampler(0.4)) as draw:
        model(x).square().sum().backward()
    assert draw == {"0": 2, "2": 2, "4": 1}  # ceil(0.4 · r) for ranks 3, 3, 2
    for name, layer in low_rank_layers(model):
        b = draw[name]
        assert layer.up.grad[:, b:].abs().sum() == 0 and layer.down.grad[b:].abs().sum() == 0
        assert layer.up.grad[:, :b].abs().sum() > 0


def test_full_rank_is_restored_after_an_exception():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with sampled_ranks(model, FixedFractionSampler(0.1)):
            assert {layer.active_rank for _, layer in low_rank_layers(model)} == {1}
            raise RuntimeError("boom")
    assert all(layer.active_rank is None for _, layer in low_rank_layers(model))


@pytest.mark.parametrize("cls", [SingleLayerSampler, IndependentSampler, SuffixSampler, BudgetSampler])
def test_same_seed_same_draws_and_generator_seeds_work(cls):
    layers = list(low_rank_layers(_model()))
    assert cls(seed=123).draw(layers) == cls(seed=123).draw(layers)
    a, b = cls(seed=torch.Generator().manual_seed(5)), cls(seed=torch.Generator().manual_seed(5))
    assert [a.draw(layers) for _ in range(50)] == [b.draw(layers) for _ in range(50)]
    c = cls(seed=6)
    assert [a.draw(layers) for _ in range(50)] != [c.draw(layers) for _ in range(50)]


def test_single_layer_sampler_is_uniform_over_layer_rank_pairs():
    layers = list(low_rank_layers(_model()))  # ranks 3, 3, 2 → 8 (layer, rank) pairs
    sampler = SingleLayerSampler(seed=2024)
    counts: dict[tuple[str, int], int] = {}
    draws = 4000
    for _ in range(draws):
        draw = sampler.draw(layers)
        assert len(draw) == 1
        counts.update({k: counts.get(k, 0) + 1 for k in draw.items()})
    pairs = [(name, b) for name, layer in layers for b in range(1, layer.rank + 1)]
    assert sorted(counts) == sorted(pairs)
    expected = draws / len(pairs)
    chi_square = sum((counts[p] - expected) ** 2 / expected for p in pairs)
    assert chi_square < 24.32  # 99.9% quantile of χ² with 7 degrees of freedom


def test_samplers_read_the_current_ranks_after_shrinking():
    model = _model()
    truncate_(model, {"0": 1, "2": 2})
    layers = list(low_rank_layers(model))
    for sampler in (SingleLayerSampler(1), IndependentSampler(1), SuffixSampler(1), BudgetSampler(1)):
        for _ in range(200):
            for name, rank in sampler.draw(layers).items():
                assert 1 <= rank <= dict(layers)[name].rank
    assert FixedFractionSampler(0.5).draw(layers) == {"0": 1, "2": 1, "4": 1}


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="fraction=0"):
        FixedFractionSampler(0)
    with pytest.raises(TypeError, match="'seven'"):
        SingleLayerSampler(seed="seven")
    with pytest.raises(TypeError, match="RankSampler"):
        with sampled_ranks(_model(), "single"):
            pass


def test_independent_sampler_is_uniform_over_each_layers_ranks():
    model = factorize(nn.Sequential(nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)))
    truncate_(model, {"0": 4})
    layers = list(low_rank_layers(model))  # ranks 4, 3, 2
    sampler = IndependentSampler(seed=7)
    draws = [sampler.draw(layers) for _ in range(3000)]
    for name, layer in layers:
        counts = torch.bincount(torch.tensor([d[name] for d in draws]), minlength=layer.rank + 1)
        assert counts[0] == 0 and len(counts) == layer.rank + 1  # ranks 1 … r, nothing else
        expected = len(draws) / layer.rank
        chi_square = float(((counts[1:] - expected) ** 2 / expected).sum())
        assert chi_square < 16.27  # 99.9% quantile of χ² with 3 degrees of freedom (the largest here)
    # the layers draw independently: the pair (layer 0, layer 1) is uniform over its 12 values too
    pairs = torch.bincount(torch.tensor([4 * (d["2"] - 1) + d["0"] - 1 for d in draws]), minlength=12)
    expected = len(draws) / 12
    assert float(((pairs - expected) ** 2 / expected).sum()) < 31.26  # 99.9% quantile, 11 degrees of freedom


def test_suffix_sampler_draws_every_layer_from_a_uniform_first_one_on():
    model = factorize(nn.Sequential(nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)))
    truncate_(model, {"0": 4})
    layers = list(low_rank_layers(model))  # ranks 4, 3, 2
    names = [name for name, _ in layers]
    sampler = SuffixSampler(seed=7)
    draws = [sampler.draw(layers) for _ in range(3000)]
    starts = torch.zeros(3)
    for draw in draws:  # the draw names a suffix of the layers: a first one and all after it
        first = names.index(next(iter(draw)))
        assert list(draw) == names[first:]
        starts[first] += 1
    expected = len(draws) / 3
    assert float(((starts - expected) ** 2 / expected).sum()) < 13.82  # 99.9% quantile, 2 degrees of freedom
    for name, layer in layers:  # within a draw each layer's rank is uniform over 1 … r
        counts = torch.bincount(torch.tensor([d[name] for d in draws if name in d]), minlength=layer.rank + 1)
        assert counts[0] == 0 and len(counts) == layer.rank + 1
        expected = float(counts.sum()) / layer.rank
        assert float(((counts[1:] - expected) ** 2 / expected).sum()) < 16.27  # 99.9% quantile, 3 d.o.f. (the most)


def test_a_scope_given_the_layers_matches_one_that_walks_the_model_and_restores_what_the_block_changed():
    model = _model()
    layers = list(low_rank_layers(model))
    walked, given = [], []
    for out, kwargs in ((walked, {}), (given, {"layers": layers})):
        sampler = IndependentSampler(11)
        for _ in range(5):
            with sampled_ranks(model, sampler, **kwargs) as draw:
                out.append((dict(draw), {name: layer.active_rank for name, layer in layers}))
    assert walked == given and all(draw == active for draw, active in walked)
    model[2].active_rank = 2  # set outside: kept; changed inside: restored
    with sampled_ranks(model, SingleLayerSampler(0), layers):
        model[4].active_rank = 1
    assert [layer.active_rank for _, layer in layers] == [None, 2, None]


def test_budget_sampler_trains_every_size_with_ranks_near_it():
    model = factorize(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10)))
    layers = list(low_rank_layers(model))  # ranks 30, 20, 10

    def sizes(sampler):
        draws = [sampler.draw(layers) for _ in range(4000)]
        assert all(1 <= draw[name] <= layer.rank for draw in draws for name, layer in layers)
        shares = torch.tensor([[draw[name] / layer.rank for name, layer in layers] for draw in draws])
        return shares, shares.mean(1)  # the sub-model's share of the ranks, each layer alike

    shares, size = sizes(BudgetSampler(seed=7))
    deciles = torch.histc(size.clamp(max=1 - 1e-9), bins=10, min=0, max=1) / len(size)
    assert deciles.min() > 0.05  # every size, from the deepest cuts to the whole model, is trained
    spread = (shares - size[:, None]).abs().mean()
    assert 0.05 < spread < 0.2  # the layers keep unequal shares around the drawn size, not one fixed fraction
    _, independent = sizes(IndependentSampler(seed=7))  # the mean of one uniform draw per layer: about half
    assert (independent < 0.1).float().mean() < 0.01 and (independent > 0.9).float().mean() < 0.01
