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


def whitened_split(weight: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``weight`` (…, m, n) into ``up`` (…, m, rank) and ``down`` (…, rank, n), best on the data.

    ``factor`` (…, n, n) is a square root ``L`` of the inputs' second moment, ``C = Σ x xᵀ = L Lᵀ``
    (see :func:`whitening_factor`). Since ``‖(W − W_r) X‖_F = ‖(W − W_r) L‖_F``, the truncation of
    ``W L = P S Qᵀ`` is the rank-r weight with the smallest output error on those inputs. The
    factors are ``up = P √S`` and ``down = √S Qᵀ L⁻¹`` truncated to ``rank``: at full rank
    ``up @ down = W L L⁻¹ = W``, and the leading b ranks leave the output error
    ``√(Σ_{j>b} s_j²)``. With ``L = I`` this is :func:`svd_split`.

    A lower-triangular ``factor`` (a Cholesky factor) is inverted by substitution, any other by an
    LU solve. The decomposition runs in float64 and is cast back to ``weight.dtype``.
    """
    w = weight.detach().to(torch.float64)
    root_c = factor.detach().to(device=w.device, dtype=torch.float64)
    p, s, qh = torch.linalg.svd(w @ root_c, full_matrices=False)
    root = s[..., :rank].sqrt()
    up = p[..., :, :rank] * root.unsqueeze(-2)
    scaled = root.unsqueeze(-1) * qh[..., :rank, :]
    if torch.equal(root_c, root_c.tril()):
        down = torch.linalg.solve_triangular(root_c, scaled, upper=False, left=False)
    else:
        down = torch.linalg.solve(root_c, scaled, left=False)
    return up.to(weight.dtype).contiguous(), down.to(weight.dtype).contiguous()


WHITENING_RETRIES = 4
"""Times :func:`whitening_factor` multiplies the damping by 10 before it falls back to eigenvalues."""
MIN_RETRY_DAMPING = 1e-10
"""Smallest relative damping a retry uses (a retry from ``damping=0`` starts here)."""


def whitening_factor(second_moment: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """A float64 square root ``L`` (…, n, n) of ``C + δ·mean(diag C)·I`` for ``second_moment`` C (…, n, n).

    The damping ``δ`` (relative to the mean input energy, so it does not depend on the data's
    scale) keeps ``L`` invertible when the inputs span only a subspace, and keeps directions the
    data barely visits from steering the factorisation. ``L`` is the Cholesky factor; when that
    fails (a singular or numerically indefinite C) the damping is multiplied by 10 up to
    :data:`WHITENING_RETRIES` times, and then ``L = E √Λ`` from the eigendecomposition with the
    eigenvalues clamped to a small positive floor. A matrix with no energy (all inputs zero) gets
    ``L = I``: every factorisation has zero output error there, and plain SVD is kept. Leading
    dimensions (one matrix per convolution group) are factorised independently.
    """
    c = second_moment.detach().to(torch.float64)
    if c.dim() > 2:
        return torch.stack([whitening_factor(block, damping) for block in c.reshape(-1, *c.shape[-2:])]
                           ).reshape(c.shape)
    if not torch.isfinite(c).all():
        raise ValueError("the second moment has NaN or infinite entries")
    c = (c + c.T) / 2
    eye = torch.eye(c.shape[-1], dtype=torch.float64, device=c.device)
    scale = float(c.diagonal().mean())
    if not scale > 0.0:
        return eye
    delta = float(damping)
    for _ in range(WHITENING_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(c + delta * scale * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor
        delta = max(delta * 10.0, MIN_RETRY_DAMPING)
    values, vectors = torch.linalg.eigh(c)
    floor = max(delta * scale, float(values.max()) * 1e-12)
    return vectors * values.clamp_min(floor).sqrt()


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
