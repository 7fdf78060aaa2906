"""Problems with a known answer: a linear map with prescribed singular values on data uniform in
the unit ball, and a linear autoencoder on centred data with a prescribed covariance spectrum.

Both are "learn ``y = A x`` with a rank-limited ``W``". With ``E[x xᵀ] = S Sᵀ`` the population
loss is ``E‖(A − W) x‖² = ‖(A − W) S‖²_F``, so the best rank-b ``W`` comes from the SVD of
``M = A S = P Σ Qᵀ`` (Eckart–Young): ``W*_b S = P_b Σ_b Q_bᵀ`` with error ``√(Σ_{k>b} σ_k²)``.
A learned ``W_b = U_b V_bᵀ`` is therefore compared through ``W_b S``: its column space (that of
``U_b``) against ``P[:, :b]`` and its row space (that of ``Sᵀ V_b``) against ``Q[:, :b]``. Where
the data have (almost) no variance, ``V`` is not determined by the loss; measuring the row space
after ``S`` weighs every input direction by how much the data use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checks import check_positive_int
from ..errors import ConfigError


def geometric_spectrum(count: int, ratio: float) -> torch.Tensor:
    """``1, ratio, ratio², …`` (``count`` values, float64): distinct values, every one a spectral gap."""
    check_positive_int("count", count)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r} must be in (0, 1) for strictly decreasing values")
    return ratio ** torch.arange(count, dtype=torch.float64)


def flat_tail_spectrum(count: int, head: int, ratio: float, tail: float) -> torch.Tensor:
    """``head`` geometric values ``1, ratio, …`` followed by ``count − head`` equal values ``tail``.

    Only the leading ``head`` ranks are separated by gaps; inside the flat tail the best rank-b
    subspace is not unique, so only the error (not the subspace) is determined there.
    """
    check_positive_int("head", head)
    if head >= count:
        raise ConfigError(f"head={head} must be smaller than count={count} to leave a flat tail")
    values = geometric_spectrum(head, ratio)
    if not 0.0 < tail < float(values[-1]):
        raise ConfigError(f"tail={tail!r} must be in (0, {float(values[-1]):.4g}) to keep a gap after the head")
    return torch.cat([values, torch.full((count - head,), float(tail), dtype=torch.float64)])


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``dim × dim`` orthogonal matrix (float64): QR of a Gaussian with sign fix."""
    check_positive_int("dim", dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def sample_unit_ball(batch: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` points uniform in the unit ball of R^dim (float32); ``E[x xᵀ] = I / (dim + 2)``."""
    direction = torch.randn(batch, dim, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = torch.rand(batch, 1, generator=generator) ** (1.0 / dim)
    return direction * radius


@dataclass(frozen=True)
class LinearProblem:
    """Learn ``y = target · x`` where ``E[x xᵀ] = input_root · input_rootᵀ``.

    ``sample_inputs(batch, generator)`` draws fresh float32 inputs (one row per sample). The
    reference SVD of ``M = target · input_root`` is computed once: ``left`` (P), ``values``
    (σ, decreasing) and ``right`` (Q).
    """

    name: str
    target: torch.Tensor
    input_root: torch.Tensor
    sample_inputs: Callable[[int, torch.Generator], torch.Tensor]
    left: torch.Tensor = field(init=False, repr=False)
    values: torch.Tensor = field(init=False, repr=False)
    right: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        target = self.target.to(torch.float64)
        root = self.input_root.to(torch.float64)
        if target.dim() != 2 or root.shape != (target.shape[1], target.shape[1]):
            raise ConfigError(f"target {tuple(target.shape)} and input_root {tuple(root.shape)} do not form "
                             "an m×n map with an n×n input root")
        p, s, qh = torch.linalg.svd(target @ root, full_matrices=False)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "input_root", root)
        object.__setattr__(self, "left", p)
        object.__setattr__(self, "values", s)
        object.__setattr__(self, "right", qh.T)

    @property
    def in_features(self) -> int:
        return self.target.shape[1]

    @property
    def out_features(self) -> int:
        return self.target.shape[0]

    def risk(self, weight: torch.Tensor) -> torch.Tensor:
        """Population error ``√E‖(target − weight) x‖² = ‖(target − weight) S‖_F`` (float64)."""
        return ((self.target - weight.to(torch.float64)) @ self.input_root).norm()

    def optimal_risk(self, rank: int) -> torch.Tensor:
        """Eckart–Young: the smallest ``risk`` of any map of rank ≤ ``rank``."""
        return self.values[rank:].square().sum().sqrt()


def linear_map_problem(name: str, singular_values: torch.Tensor, generator: torch.Generator) -> LinearProblem:
    """``A = P diag(singular_values) Qᵀ`` with random orthogonal P, Q; x uniform in the unit ball."""
    dim = singular_values.numel()
    left, right = random_orthogonal(dim, generator), random_orthogonal(dim, generator)
    target = (left * singular_values.to(torch.float64)) @ right.T
    root = torch.eye(dim, dtype=torch.float64) / (dim + 2) ** 0.5
    return LinearProblem(name, target, root, lambda batch, gen: sample_unit_ball(batch, dim, gen))


def autoencoder_problem(name: str, stds: torch.Tensor, generator: torch.Generator) -> LinearProblem:
    """Reconstruct ``x`` (target ``I``) from centred Gaussian data with covariance ``P diag(stds²) Pᵀ``.

    The principal components are the columns of P in order of ``stds``; ``M = S`` here, so the
    reference ``left`` and ``right`` are both the principal components and σ_k = stds[k].
    """
    dim = stds.numel()
    components = random_orthogonal(dim, generator)
    root = (components * stds.to(torch.float64)) @ components.T
    root32 = root.to(torch.float32)
    return LinearProblem(name, torch.eye(dim, dtype=torch.float64), root,
                         lambda batch, gen: torch.randn(batch, dim, generator=gen) @ root32)
