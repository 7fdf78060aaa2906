"""Pure tensor maths behind low-rank ordered decompositions.

Conventions used throughout the package: a weight ``W`` (m outputs, n inputs) is stored as two
factors ``up`` (m × r) and ``down`` (r × n) with ``W = up @ down``. In the paper's notation
``U = up`` and ``V = downᵀ``. Grouped convolutions carry a leading group dimension
(``up``: g × m_g × r, ``down``: g × r × n_g). The rank is always the last dimension of ``up`` and
the second-to-last of ``down``, so "the leading b ranks" is ``up[..., :b]`` and
``down[..., :b, :]``.
"""

from __future__ import annotations

import math

import torch

UP_RANK_DIM = -1
DOWN_RANK_DIM = -2


def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``weight`` (…, m, n) into ``up`` (…, m, rank) and ``down`` (…, rank, n).

    With ``W = P S Qᵀ`` the factors are ``P √S`` and ``√S Qᵀ`` truncated to ``rank``, so the
    leading b ranks form the best rank-b approximation (Eckart–Young) and the two factors carry
    equal norms. The decomposition runs in float64 and is cast back to ``weight.dtype``.
    """
    p, s, qh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[..., :rank].sqrt()
    up = p[..., :, :rank] * root.unsqueeze(-2)
    down = root.unsqueeze(-1) * qh[..., :rank, :]
    return up.to(weight.dtype).contiguous(), down.to(weight.dtype).contiguous()


def random_split(
    shape_up: tuple[int, ...],
    shape_down: tuple[int, ...],
    fan_in: int,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose product has the variance of PyTorch's default dense init (1/(3·fan_in))."""
    rank = shape_up[-1]
    std = (1.0 / (3.0 * fan_in * max(rank, 1))) ** 0.25
    up = torch.randn(shape_up, generator=generator, dtype=torch.float32) * std
    down = torch.randn(shape_down, generator=generator, dtype=torch.float32) * std
    return up.to(dtype), down.to(dtype)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient is 0 (a valid subgradient of the norm) where ``x`` is exactly 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def rank_sq_norms(factor: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Squared Frobenius norm of every rank slice of ``factor`` (a vector of length r)."""
    dims = [d for d in range(factor.dim()) if d != rank_dim % factor.dim()]
    return factor.square().sum(dim=dims)


def tail_sq_norms(factor: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``t[b] = ‖factor[ranks b:]‖²_F`` for b = 0 … r−1 (a reversed cumulative sum)."""
    return rank_sq_norms(factor, rank_dim).flip(0).cumsum(0).flip(0)


def tail_norms(factor: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``t[b] = ‖factor[ranks b:]‖_F``, with finite gradients where a tail is exactly zero."""
    return safe_sqrt(tail_sq_norms(factor, rank_dim))


def rank_importance(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Importance of rank b: ``‖U[:, b:]‖_F · ‖V[:, b:]‖_F`` (non-increasing in b)."""
    return tail_norms(up, UP_RANK_DIM) * tail_norms(down, DOWN_RANK_DIM)


def truncated_rank(fraction: float, max_rank: int) -> int:
    """``ceil(fraction · max_rank)``, at least 1: the rank a float fraction stands for."""
    return max(1, min(max_rank, math.ceil(fraction * max_rank - 1e-9)))
