"""canonicalize_: the same function, with every truncation the best of its rank (weights, or outputs on data)."""

import pytest
import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.canonical import canonicalize_


def _scrambled(model: nn.Module, seed: int = 0) -> nn.Module:
    """Mix each layer's ranks by an invertible matrix: the product stays, the rank order is lost."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ml.low_rank_layers(model):
            r = layer.rank
            mix = torch.eye(r) + 0.5 * torch.randn(r, r, generator=generator)
            layer.up.copy_(layer.up @ mix)
            layer.down.copy_(torch.linalg.solve(mix, layer.down))
    return model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 5))


def _tail_error(weight: torch.Tensor, rank: int) -> torch.Tensor:
    values = torch.linalg.svdvals(weight.double())
    return values[..., rank:].square().sum().sqrt()


@torch.no_grad()
def test_canonical_order_keeps_the_function_and_makes_every_truncation_eckart_young():
    model = _scrambled(ml.factorize(_model()))
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    parameters = [p for p in model.parameters()]
    canonicalize_(model)
    assert torch.allclose(model(x), before, atol=1e-5)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    for name, layer in ml.low_rank_layers(model):
        weight = (layer.up.double() @ layer.down.double())
        for b in range(layer.rank + 1):
            truncated = layer.up[..., :b].double() @ layer.down[..., :b, :].double()
            error = (weight - truncated).square().sum().sqrt().item()
            assert error == pytest.approx(_tail_error(weight, b).item(), rel=1e-5, abs=1e-6), (name, b)


@torch.no_grad()
def test_scrambled_order_is_worse_before_canonicalisation():
    model = _scrambled(ml.factorize(_model()))
    _, layer = list(ml.low_rank_layers(model))[-2]
    weight = layer.up.double() @ layer.down.double()
    b = layer.rank // 2
    scrambled_error = (weight - layer.up[:, :b].double() @ layer.down[:b].double()).norm()
    canonicalize_(model)
    canonical_error = (weight - layer.up[:, :b].double() @ layer.down[:b].double()).norm()
    assert canonical_error < 0.9 * scrambled_error


@torch.no_grad()
def test_whitened_canonical_order_is_optimal_on_the_calibration_outputs():
    torch.manual_seed(1)
    scales = torch.logspace(-3, 1, 16)
    x = (torch.randn(512, 16) * scales) @ torch.linalg.qr(torch.randn(16, 16))[0]
    model = _scrambled(ml.factorize(nn.Sequential(nn.Linear(16, 12, bias=False))))
    layer = model[0]
    weight = layer.up.double() @ layer.down.double()
    plain = canonicalize_(_scrambled(ml.factorize(nn.Sequential(nn.Linear(16, 12, bias=False)))))
    with torch.no_grad():
        plain[0].up.copy_(layer.up), plain[0].down.copy_(layer.down)
    canonicalize_(plain)
    canonicalize_(model, calibration=[x], damping=0.0)
    optimum = torch.linalg.svdvals(weight @ torch.linalg.cholesky(x.double().T @ x.double()))
    for b in range(13):
        error, plain_error = _output_error(model, weight, x, b), _output_error(plain, weight, x, b)
        scale = 1e-6 * (weight @ x.double().T).norm().item()  # float32 factors: rounding at this size
        assert error.item() == pytest.approx(optimum[b:].square().sum().sqrt().item(), rel=1e-5, abs=scale)
        assert error <= plain_error + scale
    assert _output_error(model, weight, x, 6) < 0.5 * _output_error(plain, weight, x, 6)


def _output_error(model, weight, x, b):
    layer = model[0]
    return ((weight - layer.up[:, :b].double() @ layer.down[:b].double()) @ x.double().T).norm()


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0]


@torch.no_grad()
def test_whitened_canonical_order_of_convolutions_and_attention_keeps_the_function():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(1, 2), nn.Linear(8, 8))
    model = _scrambled(ml.factorize(model))
    x = torch.randn(5, 3, 8, 8)
    before = model(x)
    canonicalize_(model, calibration=[(x, None)])
    assert torch.allclose(model(x), before, atol=1e-5)
    attention = _scrambled(ml.factorize(SelfAttention()))
    q = torch.randn(2, 5, 8)
    before = attention(q)
    canonicalize_(attention, calibration=[q])
    assert torch.allclose(attention(q), before, atol=1e-5)


@pytest.mark.parametrize("bad, error", [("model", ml.ConfigTypeError), (-1.0, ml.ConfigError), (float("nan"), ml.ConfigError)])
def test_bad_arguments_name_the_value(bad, error):
    model = ml.factorize(_model())
    with pytest.raises(error, match="model|damping"):
        canonicalize_(bad if bad == "model" else model, damping=0.01 if bad == "model" else bad)
