"""The named demonstrations: the problems with their default spectra, and one run of LoD next to
the contrast (the same layer, initialisation and data, trained without ordered dropout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .measures import RankRow, gap_ranks, ordering_violations, rank_rows
from .problems import LinearProblem, autoencoder_problem, flat_tail_spectrum, geometric_spectrum, linear_map_problem
from .training import TrainSettings, train_layer

DIM = 32
SVD_KINDS = ("geometric", "flat")
SVD_SETTINGS = TrainSettings(rank=8, steps=2500)
# The autoencoder's encoder learns a direction at a speed proportional to the data's variance
# along it, and the variances fall as 0.75^(2k): it needs more steps than the map on the ball.
PCA_SETTINGS = TrainSettings(rank=8, steps=4000)


def svd_problem(kind: str = "geometric", seed: int = 0, dim: int = DIM) -> LinearProblem:
    """A ``dim × dim`` map with singular values ``0.75^k`` ("geometric": a gap at every rank) or
    five geometric values ``0.7^k`` followed by a flat tail at 0.12 ("flat": gaps at b ≤ 5 only)."""
    if kind == "geometric":
        values = geometric_spectrum(dim, 0.75)
    elif kind == "flat":
        values = flat_tail_spectrum(dim, head=5, ratio=0.7, tail=0.12)
    else:
        raise ConfigError(f"unknown svd problem kind {kind!r}; expected one of {', '.join(SVD_KINDS)}")
    return linear_map_problem(f"svd-{kind}", values, torch.Generator().manual_seed(seed))


def pca_problem(seed: int = 0, dim: int = DIM) -> LinearProblem:
    """A linear autoencoder on centred Gaussian data whose principal standard deviations are ``0.75^k``."""
    return autoencoder_problem("pca", geometric_spectrum(dim, 0.75), torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class ExperimentResult:
    """Per-rank measurements of the LoD-trained layer and of the contrast."""

    problem: LinearProblem
    settings: TrainSettings
    lod: list[RankRow]
    contrast: list[RankRow]

    @property
    def gap_ranks(self) -> list[int]:
        """The truncations whose optimum is unique, hence the ones the theory pins down."""
        return gap_ranks(self.problem.values, self.settings.rank)

    def violations(self, rows: list[RankRow]) -> list[int]:
        """Ranks b where the learned importances break the order of the singular values."""
        return ordering_violations(rows, self.problem.values)


def run_experiment(problem: LinearProblem, settings: TrainSettings) -> ExperimentResult:
    """Train with ordered dropout and without it, from the same seed, and measure both."""
    lod = rank_rows(train_layer(problem, settings, ordered=True), problem)
    contrast = rank_rows(train_layer(problem, settings, ordered=False), problem)
    return ExperimentResult(problem, settings, lod, contrast)
