"""Which layers the baselines keep dense, per registry model.

Pufferfish and Cuttlefish leave the layers where a low-rank factorisation saves little or costs
much accuracy at full rank: the first layers (few channels, large activations) and the classifier.
Both papers fix these per architecture; this table gives their choice for the architectures they
report and the analogous choice for the other registry models:

=============  =========================================================  ==========================
model          Pufferfish keeps dense                                     Cuttlefish keeps dense
=============  =========================================================  ==========================
resnet18       stem conv, every conv of ``layer1``, the 1×1 shortcut       stem conv, ``layer1``,
               convs, the classifier ``fc`` (paper)                        ``fc`` (paper: stem and
                                                                           layer1; the 10-way
                                                                           classifier is no cheaper
                                                                           factorised)
vgg19          the first 9 convs and the last classifier layer; the two    the first 4 convs (paper)
               512-wide hidden FCs are factorised (at ¼: rank 128) (paper)  and the last classifier
transformer    every projection of the first encoder and the first         the same
               decoder layer, the output ``generator`` (paper)
char-lm        the first block (attention and feed-forward), the ``head``  the same
lenet5         ``conv1`` (the stem: 6 channels) and ``fc3`` (classifier)   the same
mlp            the classifier (the last Linear); the input layer holds     the same
               most parameters, so unlike a conv stem it is factorised
cnn4           the first conv (the stem) and the classifier               the same
=============  =========================================================  ==========================

Any other model keeps its first and its last factorisable layer dense (stem and classifier).
Names are the modules' paths; an attention module is kept dense as a whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import FactorizeConfig
from ..inject import plan
from ..layers.attention import PROJECTIONS, attention_projection_weights


def factorisable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules :func:`maestro_lod.factorize` would replace, in model order (an attention
    module once, under its own path)."""
    modules = dict(model.named_modules())
    names: list[str] = []
    for entry in plan(model, FactorizeConfig()):
        if entry.skipped is not None:
            continue
        name = entry.name
        suffix = entry.layer_type.rsplit(".", 1)[-1]
        if suffix in PROJECTIONS and name.endswith("." + suffix):
            name = name[: -len(suffix) - 1]
        if name not in names:
            names.append(name)
    return [(name, modules[name]) for name in names]


def _convs(names: list[str], model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in names if isinstance(modules[n], nn.Conv2d)]


def _ends(names: list[str], model: nn.Module) -> list[str]:
    return [names[0], names[-1]] if len(names) > 1 else list(names)


def _resnet_pufferfish(names: list[str], model: nn.Module) -> list[str]:
    return [n for n in names if n.startswith(("stem.", "layer1.")) or ".shortcut." in n or n == "fc"]


def _resnet_cuttlefish(names: list[str], model: nn.Module) -> list[str]:
    return [n for n in names if n.startswith(("stem.", "layer1.")) or n == "fc"]


def _vgg(convs: int) -> Callable[[list[str], nn.Module], list[str]]:
    def keep(names: list[str], model: nn.Module) -> list[str]:
        return _convs(names, model)[:convs] + [names[-1]]
    return keep


def _first_layers(prefixes: tuple[str, ...], last: str) -> Callable[[list[str], nn.Module], list[str]]:
    def keep(names: list[str], model: nn.Module) -> list[str]:
        return [n for n in names if n.startswith(prefixes) or n == last]
    return keep


_TRANSFORMER = _first_layers(("transformer.encoder.layers.0.", "transformer.decoder.layers.0."), "generator")
_CHAR_LM = _first_layers(("blocks.layers.0.",), "head")

PUFFERFISH_DENSE: dict[str, Callable[[list[str], nn.Module], list[str]]] = {
    "resnet18": _resnet_pufferfish, "vgg19": _vgg(9), "transformer": _TRANSFORMER, "char-lm": _CHAR_LM,
    "lenet5": _ends, "mlp": lambda names, model: names[-1:], "cnn4": _ends,
}
"""Model name → the rule choosing the layers Pufferfish keeps dense (see the module table)."""

CUTTLEFISH_DENSE: dict[str, Callable[[list[str], nn.Module], list[str]]] = {
    **PUFFERFISH_DENSE, "resnet18": _resnet_cuttlefish, "vgg19": _vgg(4),
}
"""Model name → the rule choosing the layers Cuttlefish keeps dense (see the module table)."""


def kept_dense(model_name: str, model: nn.Module, table: dict[str, Callable]) -> list[str]:
    """Paths of the modules of ``model`` that stay dense under ``table`` (by registry model name;
    other models keep their first and last factorisable layer)."""
    names = [name for name, _ in factorisable_modules(model)]
    return table.get(model_name, _ends)(names, model)


def weight_matrices(model: nn.Module, config: FactorizeConfig) -> dict[str, torch.Tensor]:
    """The dense weight of every layer ``factorize(model, config)`` would factorise, by the name a
    ``rank_pattern`` key gives it, as ``groups × out × in`` matrices (a convolution's kernel
    flattened into its inputs; each attention projection on its own). Detached."""
    modules = dict(model.named_modules())
    matrices: dict[str, torch.Tensor] = {}
    for entry in plan(model, config):
        if entry.skipped is not None:
            continue
        shape = (entry.groups, entry.out_features, entry.in_features)
        module = modules.get(entry.name)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            matrices[entry.name] = module.weight.detach().reshape(shape)
            continue
        parent, _, suffix = entry.name.rpartition(".")
        if isinstance(modules.get(parent), nn.MultiheadAttention) and suffix in PROJECTIONS:
            matrices[entry.name] = attention_projection_weights(modules[parent])[suffix].detach().reshape(shape)
    return matrices


def dense_kept_config(base: FactorizeConfig, kept: list[str], **changes) -> FactorizeConfig:
    """``base`` with ``kept`` as its exclusions (unless ``base`` names its own) and ``changes``."""
    exclude = base.exclude_modules if base.exclude_modules is not None else (kept or None)
    return FactorizeConfig.from_dict({**base.to_dict(), "exclude_modules": exclude, **changes})
