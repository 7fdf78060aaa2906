"""Rank allocation without search: each layer's error at every rank in closed form, and the ranks
that minimise the summed (weighted) error under a cost budget, as a multiple-choice knapsack.

Error of a layer at rank r. A factorised layer ``W = up @ down`` truncated to its leading r ranks
(what ``active_rank`` and :func:`~maestro_lod.shrinking.truncate_` do) changes its output on inputs
``X`` by ``up[:, r:] down[r:] X``. With the inputs' second moment ``C = Σ x xᵀ``, the Gram matrices
``G = upᵀ up`` and ``H = down C downᵀ`` (R × R) give the squared output error at every rank at once:
``e(r) = Σ_{i,j ≥ r} G_ij H_ij``, a reversed two-dimensional cumulative sum
(:func:`truncation_errors`). Without ``C`` (identity) it is the weight error ``‖W − W_r‖²_F``. For a
pair whose ranks are ordered like an SVD (as MAESTRO's ordered dropout and an SVD initialisation
make them), this is close to the Eckart–Young bound ``Σ_{j>r} σ_j²`` of the product's (whitened)
singular values (:func:`spectrum_errors`), which no rank-r weight beats.

Choosing ranks. Every layer offers a few ranks, each with a cost (from the deployed form's
:class:`~maestro_lod.engine.costs.CostModel`, merge point included: above it the layer costs its
dense size) and an error; the ranks minimising ``Σ_i w_i e_i(r_i)`` subject to ``Σ_i c_i(r_i) ≤ B``
form a multiple-choice knapsack.

* :func:`lagrangian_path`: for every multiplier μ each layer independently minimises
  ``w e + μ c``; sweeping μ walks each layer down the lower convex hull of its (cost, error)
  points, and merging all hull edges by slope gives every point of the lower convex front of the
  whole problem, in order of decreasing cost, in milliseconds.
* :func:`knapsack`: exact dynamic programming over a cost grid (exact when the costs are integers
  and the grid has a cell per unit, otherwise with each cost rounded up to a cell, so every answer
  stays within its budget); one table answers every budget.

The layers' errors live on different scales (a layer near the output moves the loss more per unit
of output error than one near the input); :mod:`maestro_lod.engine.search` weighs them by how much
the calibration loss actually rises for a small truncation of each layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..checks import check_positive_int
from ..errors import ConfigError
from ..layers import LowRankConv, LowRankLayer
from ..whitening import SecondMoment, _conv_patches
from .passes import forward

WEIGHTINGS = ("probe", "measured", "relative", "none")
"""How the layers' errors are put on one scale: the calibration-loss increase of one truncation per
layer over its error there (``probe``), the loss increase measured at a few ranks per layer and
interpolated in the error between them (``measured``), the error relative to the layer's whole
output energy (``relative``), or the raw squared output errors (``none``)."""
KNAPSACK_CELLS = 4096
"""Cells of the cost grid of :func:`knapsack` (the cost range above the cheapest choice)."""


def _grouped(layer: LowRankLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``up`` (g × m × R) and ``down`` (g × R × n) in float64, a group dimension added if absent."""
    up, down = layer.up.detach().to(torch.float64), layer.down.detach().to(torch.float64)
    if up.dim() == 2:
        up, down = up.unsqueeze(0), down.unsqueeze(0)
    return up, down


def _moment(moment: torch.Tensor | None, groups: int, n: int, device: torch.device) -> torch.Tensor | None:
    if moment is None:
        return None
    moment = moment.to(device=device, dtype=torch.float64)
    return moment.reshape(groups, n, n)


@torch.no_grad()
def truncation_errors(layer: LowRankLayer, moment: torch.Tensor | None = None) -> torch.Tensor:
    """``e[r]`` for ``r = 0 … layer.rank``: the squared output error of keeping the leading ``r``
    ranks, ``Σ ‖up[:, r:] down[r:] x‖²`` over the inputs whose second moment ``Σ x xᵀ`` is
    ``moment`` (``n × n``, or ``groups × n × n``; None: the weight error ``‖W − W_r‖²_F``).
    Non-increasing up to rounding, ``e[rank] = 0``; float64."""
    up, down = _grouped(layer)
    c = _moment(moment, down.shape[0], down.shape[-1], down.device)
    gram_up = up.mT @ up
    gram_down = down @ down.mT if c is None else down @ c @ down.mT
    product = (gram_up * gram_down).sum(0)
    tails = product.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()
    return torch.cat([tails, tails.new_zeros(1)]).clamp_min(0.0)


@torch.no_grad()
def spectrum_errors(layer: LowRankLayer, moment: torch.Tensor | None = None) -> torch.Tensor:
    """``e[r] = Σ_{j>r} σ_j²`` for ``r = 0 … layer.rank``, ``σ`` the singular values of the
    product ``up @ down`` (whitened by the inputs' second moment ``moment`` when given): the least
    squared output error any rank-r weight has on those inputs (Eckart–Young). Float64."""
    up, down = _grouped(layer)
    product = up @ down
    c = _moment(moment, down.shape[0], down.shape[-1], down.device)
    if c is not None:
        scale = c.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
        eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
        root = torch.linalg.cholesky_ex(c + 1e-10 * scale[:, None, None] * eye)[0]
        product = product @ root
    squares = torch.linalg.svdvals(product).square().sum(0)[:layer.rank]
    tails = squares.flip(0).cumsum(0).flip(0)
    return torch.cat([tails, tails.new_zeros(1)])


@torch.no_grad()
def layer_moments(model: nn.Module, layers: Mapping[str, LowRankLayer], batches: Iterable) -> dict[str, torch.Tensor | None]:
    """``Σ x xᵀ`` (float64, ``n × n`` or ``groups × n × n``) at the input of every factorised
    layer's weight, over one eval-mode pass of ``model`` on ``batches`` (``(inputs, targets)``);
    None for a layer the pass never called (its errors fall back to the weight error)."""
    moments = {}
    handles = []
    for name, layer in layers.items():
        groups = layer.up.shape[0] if layer.up.dim() == 3 else 1
        moment = moments[name] = SecondMoment(name, layer.down.shape[-1], groups)
        if isinstance(layer, LowRankConv):
            def hook(module, args, moment=moment):
                moment.add(_conv_patches(module, args[0]))
        else:
            def hook(module, args, moment=moment):
                moment.add(args[0].reshape(-1, args[0].shape[-1]))
        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for inputs, _ in batches:
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: None if moment.rows == 0 else moment.matrix for name, moment in moments.items()}


def _check_options(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ConfigError("every layer needs as many costs as errors, and at least one choice")


def _hull(costs: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the lower-left convex hull of one layer's ``(cost, error)`` points, from its
    least-error choice (the cheapest of those) to its cheapest choice (the least error of those)."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errors[i]))
    hull: list[int] = []
    for i in order:
        if hull and costs[i] == costs[hull[-1]]:
            continue  # same cost, no less error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a → i: not a vertex
            if (errors[b] - errors[a]) * (costs[i] - costs[a]) >= (errors[i] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    # keep the part where error falls as cost rises (beyond the least-error point cost buys nothing)
    best = min(range(len(hull)), key=lambda k: (errors[hull[k]], costs[hull[k]]))
    return hull[:best + 1][::-1]


def lagrangian_path(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]]) -> list[list[int]]:
    """Every vertex of the lower convex front of ``min Σ_i errors[i][k_i]`` against ``Σ_i costs[i][k_i]``:
    a list of choices (one option index per layer), from the least-error one to the cheapest.
    Each is the minimiser of ``Σ_i errors[i][k_i] + μ costs[i][k_i]`` for a range of multipliers μ
    (an optimal allocation for its own total cost); consecutive choices differ in one layer."""
    _check_options(costs, errors)
    hulls = [_hull(c, e) for c, e in zip(costs, errors)]
    edges = []
    for layer, (hull, c, e) in enumerate(zip(hulls, costs, errors)):
        for position in range(1, len(hull)):
            a, b = hull[position - 1], hull[position]
            edges.append(((e[b] - e[a]) / (c[a] - c[b]), layer, position))
    edges.sort()
    choice = [hull[0] for hull in hulls]
    path = [list(choice)]
    for _, layer, position in edges:
        choice[layer] = hulls[layer][position]
        path.append(list(choice))
    return path


def knapsack(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budgets: Sequence[float],
             cells: int = KNAPSACK_CELLS) -> list[list[int] | None]:
    """For each budget, the choice (one option index per layer) of least ``Σ errors`` whose
    ``Σ costs`` is within it (None where even the cheapest choice exceeds it), by dynamic
    programming over a grid of ``cells`` cost cells above the cheapest choice. Exact when the
    costs are integers and their range fits the grid (one cell per unit); otherwise each cost is
    rounded up to a cell, so answers never exceed their budget but may miss a better one that
    the rounding pushes over."""
    _check_options(costs, errors)
    check_positive_int("cells", cells)
    floors = [min(c) for c in costs]
    minimum = sum(floors)
    top = max(budgets, default=minimum) - minimum
    extra = [[x - f for x in c] for c, f in zip(costs, floors)]
    span = min(top, sum(max(x) for x in extra))
    integral = all(float(x).is_integer() for c in costs for x in c)
    unit = 1.0 if integral and span <= cells else max(span / cells, 1e-300)
    size = max(0, math.floor(span / unit + 1e-9)) + 1
    best = torch.zeros(size, dtype=torch.float64)
    picks = []
    for c, e in zip(extra, errors):
        steps = torch.tensor([math.ceil(x / unit - 1e-9) for x in c], dtype=torch.long)
        values = torch.tensor(e, dtype=torch.float64)
        table = torch.full((len(c), size), math.inf, dtype=torch.float64)
        for k, (shift, value) in enumerate(zip(steps.tolist(), values.tolist())):
            if shift < size:
                table[k, shift:] = best[:size - shift] + value
        best, pick = table.min(0)
        picks.append(pick)
    answers: list[list[int] | None] = []
    for budget in budgets:
        room = budget - minimum
        if room < -1e-9 * max(1.0, abs(minimum)):
            answers.append(None)
            continue
        cell = min(size - 1, max(0, math.floor(room / unit + 1e-9)))
        if not math.isfinite(float(best[cell])):
            answers.append(None)
            continue
        choice = []
        for c, pick in zip(reversed(extra), reversed(picks)):
            k = int(pick[cell])
            choice.append(k)
            cell -= math.ceil(c[k] / unit - 1e-9)
        answers.append(choice[::-1])
    return answers
