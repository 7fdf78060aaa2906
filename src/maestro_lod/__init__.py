"""maestro-lod: trainable low-rank ordered decompositions (MAESTRO, ICML 2024).

Replace the Linear / Conv / attention layers of any PyTorch model by factors ``U·Vᵀ`` whose ranks
are ordered by importance, train them with ordered dropout and a hierarchical group lasso,
shrink ranks as training goes, and export any point of the accuracy–cost curve to plain PyTorch.
"""

from .canonical import canonicalize_
from .config import FactorizeConfig
from .deploy.api import CompressedFront, compress
from .errors import CheckpointError, ConfigError, ConfigTypeError, MaestroError, TrainingDiverged
from .export import export
from .inject import (BuildSpec, Component, LayerHandler, LeftDense, Plan, PlanEntry, PlanTotals, factorize, plan,
                     register_layer)
from .layers import (ComputedWeight, Factorized, LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention,
                     low_rank_layers, rank_pattern)
from .engine.counting import count_macs, count_params, layer_summary
from .regularization import group_lasso, importances
from .sampling import (BudgetSampler, FixedFractionSampler, IndependentSampler, RankSampler, SingleLayerSampler,
                       SuffixSampler, sampled_ranks)
from .shrinking import shrink_, truncate_

__version__ = "0.1.0"

__all__ = [
    "MaestroError", "ConfigError", "ConfigTypeError", "CheckpointError", "TrainingDiverged",
    "FactorizeConfig", "factorize", "plan", "Plan", "PlanEntry", "LeftDense", "PlanTotals", "LayerHandler",
    "Component", "BuildSpec", "register_layer", "low_rank_layers", "rank_pattern", "Factorized", "ComputedWeight",
    "LowRankLayer", "LowRankLinear", "LowRankConv", "LowRankMultiheadAttention",
    "RankSampler", "SingleLayerSampler", "IndependentSampler", "SuffixSampler", "BudgetSampler", "FixedFractionSampler",
    "sampled_ranks",
    "group_lasso", "importances", "shrink_", "truncate_", "canonicalize_", "export", "count_params", "count_macs", "layer_summary",
    "compress", "CompressedFront",
]
