"""Factorised replacements for dense layers, the handlers that build them, and queries over them."""

from .attention import LowRankMultiheadAttention
from .base import Factorized, LowRankLayer
from .conv import LowRankConv
from .linear import LowRankLinear
from .query import low_rank_layers, outermost_factorized, rank_pattern
from .weight import ComputedWeight

__all__ = ["Factorized", "LowRankLayer", "LowRankLinear", "LowRankConv", "LowRankMultiheadAttention", "ComputedWeight",
           "low_rank_layers", "rank_pattern", "outermost_factorized"]
