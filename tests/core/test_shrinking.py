"""Physical shrinking keeps Parameter identity and the optimiser's state, so training carries on."""

import copy

import pytest
import torch
from torch import nn

from maestro_lod import LowRankLinear, factorize, low_rank_layers, rank_pattern, shrink_, truncate_

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov-foreach": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return factorize(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _sliced_state(optimizer, old_params, new_params, ranks):
    """The optimiser state of ``old_params`` sliced to ``ranks`` and keyed by ``new_params``."""
    state = {}
    for old, new, (dim, rank) in zip(old_params, new_params, ranks):
        state[new] = {k: (v.narrow(dim, 0, rank).clone() if v.shape == old.shape else v.clone())
                      for k, v in optimizer.state[old].items()}
    return state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_next_step_after_shrink_equals_a_model_built_at_the_smaller_rank(name):
    x, y = torch.randn(32, 10), torch.randn(32, 6)
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    for _ in range(3):
        _step(model, optimizer, x, y)
    # Make ranks 5.. of the first layer and 4.. of the second negligible, so shrink_ drops them.
    with torch.no_grad():
        model[0].up[:, 5:] *= 1e-6
        model[2].up[:, 4:] *= 1e-6
    params = list(model.parameters())
    ranks = [(-1, 5), (-2, 5), (0, 8), (-1, 4), (-2, 4), (0, 6)]  # up, down, bias of each layer
    reference = nn.Sequential(
        LowRankLinear(model[0].up[:, :5].detach().clone(), model[0].down[:5].detach().clone(), model[0].bias.detach().clone(), 8),
        nn.Tanh(),
        LowRankLinear(model[2].up[:, :4].detach().clone(), model[2].down[:4].detach().clone(), model[2].bias.detach().clone(), 6),
    )
    reference_optimizer = OPTIMIZERS[name](reference.parameters())
    reference_optimizer.state.update(_sliced_state(optimizer, params, list(reference.parameters()), ranks))

    changes = shrink_(model, threshold=1e-4, optimizer=optimizer)

    assert changes == {"0": (8, 5), "2": (6, 4)}
    assert all(a is b for a, b in zip(params, model.parameters()))  # Parameter identity kept
    assert optimizer.param_groups[0]["params"][0] is model[0].up
    for _ in range(2):
        _step(model, optimizer, x, y)
        _step(reference, reference_optimizer, x, y)
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_shrink_respects_min_rank_and_threshold_zero_keeps_nonzero_ranks():
    model = _model()
    with torch.no_grad():
        model[0].up[:, 2:] = 0
    assert shrink_(model, 0.0) == {"0": (8, 2), "2": (6, 6)}
    model = _model()
    for _, layer in low_rank_layers(model):
        layer.min_rank = 3
    with torch.no_grad():
        model[0].up[:, 1:] = 0
    assert shrink_(model, 0.0)["0"] == (8, 3)


def test_shrink_without_optimizer_and_gradients_are_sliced_too():
    model = _model()
    nn.functional.mse_loss(model(torch.randn(4, 10)), torch.randn(4, 6)).backward()
    truncate_(model, {"0": 3})
    assert model[0].up.grad.shape == model[0].up.shape == (8, 3)
    assert model[0].down.grad.shape == (3, 10)
    assert rank_pattern(model) == {"0": 3, "2": 6}


def test_bad_threshold_and_ranks_leave_the_model_unchanged():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    for bad in (-1e-3, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="threshold"):
            shrink_(model, bad)
    with pytest.raises(ValueError, match="rank 9 for '0'"):
        truncate_(model, {"2": 3, "0": 9})
    with pytest.raises(ValueError, match="'fc'"):
        truncate_(model, {"fc": 3})
    with pytest.raises(TypeError, match="2.0"):
        truncate_(model, {"0": 2.0})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
