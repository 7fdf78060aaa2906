"""What the theory predicts, measured on a trained factorised layer, one row per truncation b.

* principal angles between the learned and the true leading-b subspaces of ``M = A S`` (see
  :mod:`.problems`), left (column space of ``U[:, :b]``) and right (that of ``Sᵀ V[:, :b]``);
* the error of the truncation ``U_b V_bᵀ`` against the Eckart–Young optimum for rank b;
* the learned importance of rank b, ``‖u_b v_bᵀ S‖_F``, against the reference singular value σ_b
  (for the ordered SVD it equals σ_b exactly; it does not depend on how a rank's scale is split
  between ``u_b`` and ``v_b``), and whether it is ordered wherever the σ are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..layers import LowRankLinear
from .problems import LinearProblem

GAP_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RankRow:
    """Measurements of the truncation to the leading ``rank`` ranks."""

    rank: int
    left_angle: float
    right_angle: float
    direction_angle: float
    error: float
    optimum: float
    importance: float
    singular_value: float

    @property
    def ratio(self) -> float:
        """Error over the Eckart–Young optimum (1 = optimal)."""
        if self.optimum == 0.0:
            return 1.0 if self.error == 0.0 else math.inf
        return self.error / self.optimum


def principal_angle_deg(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Largest principal angle, in degrees, between the column spaces of two n × b matrices."""
    if basis_a.shape != basis_b.shape:
        raise ConfigError(f"bases of shapes {tuple(basis_a.shape)} and {tuple(basis_b.shape)} do not match")
    qa = torch.linalg.qr(basis_a.to(torch.float64))[0]
    qb = torch.linalg.qr(basis_b.to(torch.float64))[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def rank_rows(layer: LowRankLinear, problem: LinearProblem) -> list[RankRow]:
    """One :class:`RankRow` per b = 1 … ``layer.rank``."""
    up = layer.up.detach().to(torch.float64)
    down_t = layer.down.detach().to(torch.float64).T
    weighted_down_t = problem.input_root.T @ down_t
    rows = []
    for b in range(1, layer.rank + 1):
        weight = up[:, :b] @ down_t[:, :b].T
        rank_one = torch.outer(up[:, b - 1], down_t[:, b - 1])
        rows.append(RankRow(
            rank=b,
            left_angle=principal_angle_deg(up[:, :b], problem.left[:, :b]),
            right_angle=principal_angle_deg(weighted_down_t[:, :b], problem.right[:, :b]),
            direction_angle=principal_angle_deg(up[:, b - 1:b], problem.left[:, b - 1:b]),
            error=float(problem.risk(weight)),
            optimum=float(problem.optimal_risk(b)),
            importance=float((rank_one @ problem.input_root).norm()),
            singular_value=float(problem.values[b - 1]),
        ))
    return rows


def gap_ranks(values: torch.Tensor, rank: int) -> list[int]:
    """The b in 1 … ``rank`` with a spectral gap ``σ_b > σ_{b+1}`` (σ beyond the last value is 0):
    exactly the b whose best rank-b subspace is unique."""
    padded = torch.cat([values.to(torch.float64), values.new_zeros(1, dtype=torch.float64)])
    return [b for b in range(1, rank + 1) if padded[b - 1] > padded[b] * (1 + GAP_TOLERANCE)]


def ordering_violations(rows: list[RankRow], values: torch.Tensor) -> list[int]:
    """The b (< last row) where σ_b > σ_{b+1} but the learned importance of rank b is not larger
    than that of rank b + 1."""
    gaps = set(gap_ranks(values, len(rows)))
    return [row.rank for row, after in zip(rows, rows[1:]) if row.rank in gaps and not row.importance > after.importance]


def strictly_ordered(rows: list[RankRow], values: torch.Tensor) -> bool:
    """True when the learned importances decrease strictly wherever the singular values do."""
    return not ordering_violations(rows, values)
