"""Export a factorised model to plain ``torch.nn`` modules for deployment."""

from __future__ import annotations

import copy

from torch import nn

from .errors import ConfigError, ConfigTypeError
from .layers import Factorized, outermost_factorized
from .layers.hooks import carry_hooks

MERGE_MODES = ("auto", "always", "never")

# Parents whose forward reads these children's ``.weight`` directly (PyTorch's fused encoder fast
# path), so the exported children must stay single dense layers rather than a pair.
WEIGHT_READERS: dict[type, tuple[str, ...]] = {nn.TransformerEncoderLayer: ("linear1", "linear2")}


def _merges(module: Factorized, merge: str, weight_read: bool) -> bool:
    """Whether ``module`` is exported as one dense layer."""
    if weight_read or merge == "always":
        return True
    return merge == "auto" and module.merge_saves_params()


def export(model: nn.Module, merge: str = "auto", keep: tuple[type, ...] = ()) -> nn.Module:
    """A deep copy of ``model`` made only of standard ``torch.nn`` modules, with the same outputs.

    Each factorised module is replaced by its :meth:`~maestro_lod.layers.Factorized.to_standard`
    form at its effective rank: a low-rank layer becomes two stacked Linear/Conv layers, or one dense
    layer when ``merge="always"`` or (``"auto"``) when that has no more parameters
    (``r·(m+n) ≥ m·n`` per group). Attention modules become dense ``nn.MultiheadAttention``: PyTorch
    reads their packed projection weights directly, so they cannot hold a pair of layers; for the same
    reason the feed-forward layers of ``nn.TransformerEncoderLayer`` are exported merged, and so is a
    convolution at rank 0 (PyTorch has no zero-channel convolution). Forward and full backward hooks
    move to the exported modules. A model without factorised modules is returned as a plain copy.

    Factorised modules that are instances of a type in ``keep`` stay as they are (copied, at their
    effective rank): their own forward keeps the rank savings that the plain form would give up
    (``keep=(LowRankMultiheadAttention,)`` is the form :mod:`maestro_lod.deploy` hands to
    ``torch.export``, where no code reads the packed attention weights).
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge={merge!r} is not one of {', '.join(MERGE_MODES)}")
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    result = copy.deepcopy(model)
    weight_read = {f"{parent}.{child}" if parent else child
                   for parent, module in result.named_modules(remove_duplicate=False)
                   for kind, children in WEIGHT_READERS.items() if isinstance(module, kind) for child in children}
    replacements: dict[int, nn.Module] = {}
    for name, module in outermost_factorized(result):
        if isinstance(module, keep):
            continue
        if id(module) not in replacements:
            new = module.to_standard(_merges(module, merge, name in weight_read))
            new.train(module.training)
            carry_hooks(module, new)
            replacements[id(module)] = new
        if name == "":
            return replacements[id(module)]
        parent, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent), child, replacements[id(module)])
    return result
