"""Export a factorised model to plain ``torch.nn`` modules for deployment."""

from __future__ import annotations

import copy

from torch import nn

from .errors import ConfigError, ConfigTypeError
from .layers import LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention

MERGE_MODES = ("auto", "always", "never")

# Parents whose forward reads these children's ``.weight`` directly (PyTorch's fused encoder fast
# path), so the exported children must stay single dense layers rather than a pair.
WEIGHT_READERS: dict[type, tuple[str, ...]] = {nn.TransformerEncoderLayer: ("linear1", "linear2")}


def _should_merge(layer: LowRankLayer, merge: str) -> bool:
    if merge != "auto":
        return merge == "always"
    m, n, groups = layer.dense_shape()
    rank = layer.effective_rank
    return rank * (m + n) >= m * n // groups


def export(model: nn.Module, merge: str = "auto") -> nn.Module:
    """A deep copy of ``model`` made only of standard ``torch.nn`` modules, with the same outputs.

    Each low-rank layer at its effective rank becomes two stacked Linear/Conv layers, or one dense
    layer when ``merge="always"`` or (``"auto"``) when that has no more parameters
    (``r·(m+n) ≥ m·n`` per group). Attention modules become dense ``nn.MultiheadAttention``: PyTorch
    reads their packed projection weights directly, so they cannot hold a pair of layers; for the same
    reason the feed-forward layers of ``nn.TransformerEncoderLayer`` are exported merged.
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge={merge!r} is not one of {', '.join(MERGE_MODES)}")
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    result = copy.deepcopy(model)
    replacements: dict[int, nn.Module] = {}
    weight_read = {f"{parent}.{child}" if parent else child
                   for parent, module in result.named_modules(remove_duplicate=False)
                   for kind, children in WEIGHT_READERS.items() if isinstance(module, kind) for child in children}
    targets = [(name, module) for name, module in result.named_modules(remove_duplicate=False)
               if isinstance(module, (LowRankLinear, LowRankConv, LowRankMultiheadAttention))]
    for name, module in targets:
        if any(name.startswith(other + ".") for other, m in targets if isinstance(m, LowRankMultiheadAttention)):
            continue  # projections of an attention module are exported with it
        if id(module) not in replacements:
            if isinstance(module, LowRankMultiheadAttention):
                new = module.to_standard()
            else:
                new = module.to_standard(name in weight_read or _should_merge(module, merge))
            new.train(module.training)
            replacements[id(module)] = new
        if name == "":
            return replacements[id(module)]
        parent, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent), child, replacements[id(module)])
    return result
