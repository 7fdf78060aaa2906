"""Hierarchical group lasso and importances against their direct formulas; finite gradients at zero."""

import pytest
import torch
from torch import nn

from maestro_lod import LowRankConv, LowRankLinear, factorize, group_lasso, importances
from maestro_lod.regularization import GroupLassoGradient


def _layer(m=4, n=5, r=3) -> LowRankLinear:
    return LowRankLinear(torch.randn(m, r, dtype=torch.float64), torch.randn(r, n, dtype=torch.float64), None, min(m, n))


def test_hierarchical_and_plain_group_lasso_match_the_formula():
    layer = _layer()
    up, down = layer.up.detach(), layer.down.detach()
    hierarchical = sum(up[:, b:].norm() + down[b:, :].norm() for b in range(3))
    plain = sum(up[:, b].norm() + down[b, :].norm() for b in range(3))
    torch.testing.assert_close(group_lasso(layer), hierarchical)
    torch.testing.assert_close(group_lasso(layer, hierarchical=False), plain)


def test_importance_matches_the_formula_for_linear_and_grouped_conv():
    layer = _layer()
    up, down = layer.up.detach(), layer.down.detach()
    expected = torch.stack([up[:, b:].norm() * down[b:, :].norm() for b in range(3)])
    torch.testing.assert_close(importances(nn.Sequential(layer))["0"], expected)
    conv = LowRankConv.from_dense(nn.Conv2d(4, 6, 3, groups=2), rank=2)
    up, down = conv.up.detach(), conv.down.detach()  # (groups, m_g, r), (groups, r, n_g)
    expected = torch.stack([up[..., b:].norm() * down[:, b:, :].norm() for b in range(2)])
    torch.testing.assert_close(conv.importance(), expected)


def test_penalty_sums_over_layers():
    model = factorize(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
    total = sum(group_lasso(layer) for layer in (model[0], model[1]))
    torch.testing.assert_close(group_lasso(model), total)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_gradients_stay_finite_with_exactly_zero_trailing_ranks(hierarchical):
    layer = _layer(6, 6, 5)
    with torch.no_grad():
        layer.up[:, 3:] = 0
        layer.down[3:] = 0
    group_lasso(layer, hierarchical).backward()
    assert torch.isfinite(layer.up.grad).all() and torch.isfinite(layer.down.grad).all()
    assert layer.up.grad[:, 3:].abs().sum() == 0  # zero is a valid subgradient of the norm there
    up = layer.up.detach()
    # Gradient of Σ_b ‖U[:, b:]‖ on a non-zero column k is U[:, k] · Σ_{b ≤ k} 1/‖U[:, b:]‖ (or 1/‖U[:, k]‖ plain).
    k = 1
    scale = (sum(1 / up[:, b:].norm() for b in range(k + 1)) if hierarchical else 1 / up[:, k].norm())
    torch.testing.assert_close(layer.up.grad[:, k], up[:, k] * scale)
    assert torch.isfinite(layer.importance()).all() and layer.importance()[3:].abs().sum() == 0


def test_group_lasso_needs_low_rank_layers():
    with pytest.raises(ValueError, match="no low-rank layers"):
        group_lasso(nn.Linear(3, 3))


def _tail_gradient(factor: torch.Tensor, rank_dim: int, hierarchical: bool) -> torch.Tensor:
    """∂/∂factor of Σ_b ‖factor[rank b:]‖ (plain: Σ_b ‖factor[rank b]‖), rank slice by rank slice."""
    slices = factor.movedim(rank_dim, 0)
    grad = torch.zeros_like(slices)
    for j in range(slices.shape[0]):
        if hierarchical:
            scale = sum(1 / slices[b:].norm() for b in range(j + 1))
        else:
            scale = 1 / slices[j].norm()
        grad[j] = slices[j] * scale
    return grad.movedim(0, rank_dim)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_the_trainers_group_lasso_gradient_matches_the_formula_for_every_factor_layout(hierarchical):
    torch.manual_seed(3)
    model = factorize(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 8, 3), nn.Flatten(),
                                    nn.Linear(8, 7), nn.Linear(7, 5)).double())
    layers = list(model[i] for i in (0, 1, 3, 4))
    layers[3].truncate_(0)  # a rank-0 layer contributes nothing and gets no gradient
    existing = torch.randn_like(layers[1].up)
    layers[1].up.grad = existing.clone()  # gradients already there are added to
    value = GroupLassoGradient(layers, 0.01, hierarchical).add_to_grads_()
    assert value.item() == pytest.approx(0.01 * group_lasso(nn.Sequential(*layers[:3]), hierarchical).item(), rel=1e-12)
    for layer in layers[:3]:
        for factor, rank_dim in ((layer.up, -1), (layer.down, -2)):
            expected = 0.01 * _tail_gradient(factor.detach(), rank_dim, hierarchical)
            if factor is layers[1].up:
                expected = expected + existing
            torch.testing.assert_close(factor.grad, expected, rtol=1e-12, atol=1e-15)
    assert layers[3].up.grad is None and layers[3].down.grad is None


def test_layer_scales_weigh_each_layers_value_and_gradient():
    torch.manual_seed(4)
    layers = [_layer(4, 5, 3), _layer(6, 3, 2)]
    plain = [GroupLassoGradient([layer], 0.01).add_to_grads_().item() for layer in layers]
    plain_grads = [(layer.up.grad.clone(), layer.down.grad.clone()) for layer in layers]
    for layer in layers:
        layer.up.grad = layer.down.grad = None
    value = GroupLassoGradient(layers, 0.01, layer_scales=[2.0, 0.5]).add_to_grads_()
    assert value.item() == pytest.approx(2.0 * plain[0] + 0.5 * plain[1], rel=1e-12)
    for layer, scale, (up, down) in zip(layers, (2.0, 0.5), plain_grads):
        torch.testing.assert_close(layer.up.grad, scale * up, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.down.grad, scale * down, rtol=1e-12, atol=0)


def test_layers_weighed_after_building_give_what_weighing_at_construction_gives():
    torch.manual_seed(4)
    layers = [_layer(4, 5, 3), _layer(6, 3, 2)]
    penalty = GroupLassoGradient(layers, 0.01)
    penalty.weigh_layers([2.0, 0.5])
    weighed_at_construction = GroupLassoGradient(layers, 0.01, layer_scales=[2.0, 0.5]).add_to_grads_().item()
    assert penalty.add_to_grads_().item() == weighed_at_construction
    with pytest.raises(ValueError, match="3 numbers for 2 layers"):
        penalty.weigh_layers([1.0, 1.0, 1.0])
