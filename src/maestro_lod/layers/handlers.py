"""The layer registry: which dense layers :func:`maestro_lod.factorize` knows, and how it builds each.

A :class:`LayerHandler` describes one kind of layer: the classes it handles, the weight matrices
(:class:`Component`) it factorises, and a builder that receives the dense module and a
:class:`BuildSpec` (start rank per component, initialisation, minimum rank, random generator,
whitening factors for ``init="whitened"``) and returns the
:class:`~maestro_lod.layers.base.Factorized` replacement. Handlers are kept in :data:`LAYER_HANDLERS`
by label; the most recently registered handler that claims a module wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ConfigTypeError
from ..functional import whitened_split
from ..registry import Registry
from .attention import PROJECTIONS, LowRankMultiheadAttention, attention_projection_weights
from .base import Factorized, follow_requires_grad
from .conv import LowRankConv
from .linear import LowRankLinear

# The methods through which the dense classes compute their output: a subclass that overrides one
# computes something else, which the factorised layer would not reproduce.
FORWARD_METHODS = ("forward", "_conv_forward")


@dataclass(frozen=True)
class Component:
    """One weight matrix of a layer: ``groups`` blocks of ``out_features × in_features``.

    ``suffix`` names it inside the layer (``""`` for a layer with one weight, ``"q_proj"`` …).
    """

    suffix: str
    out_features: int
    in_features: int
    groups: int = 1

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)


@dataclass(frozen=True)
class BuildSpec:
    """What a handler's builder needs besides the dense module."""

    ranks: dict[str, int]
    """Start rank of each component, by :attr:`Component.suffix`."""
    init: str = "svd"
    min_rank: int = 1
    generator: torch.Generator | None = None
    whitening: dict[str, torch.Tensor] | None = None
    """For ``init="whitened"``: each component's whitening factor ``L`` (``L Lᵀ`` = its inputs' damped
    second moment; ``groups × n × n`` for a grouped convolution), by suffix. Built by
    :func:`maestro_lod.whitening.whitening_factors`."""

    @property
    def rank(self) -> int:
        """The start rank of a layer with a single component."""
        return self.ranks[""]

    def whitening_factor(self, suffix: str = "") -> torch.Tensor:
        """The whitening factor of component ``suffix`` (an error names what is missing)."""
        if self.whitening is None or suffix not in self.whitening:
            what = f"component {suffix!r}" if suffix else "the layer"
            raise ConfigError(f"init='whitened' needs the input statistics of {what}: "
                              f"call factorize(model, config, calibration=batches)")
        return self.whitening[suffix]


def _no_reason(module: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class LayerHandler:
    """How one kind of dense layer is described and replaced (an entry of :data:`LAYER_HANDLERS`).

    Attributes:
        label: name shown by :func:`maestro_lod.plan` and in error messages.
        components: the weight matrices of a module, as :class:`Component`.
        build: ``build(module, spec)`` → the factorised replacement.
        types: classes handled. A subclass is handled too unless it overrides ``forward`` (or
            ``_conv_forward``): then it computes something else, and it is skipped with the reason.
            Listing the subclass itself here claims it explicitly.
        matches: optional predicate for layers recognised by duck typing rather than by class.
        skip_reason: why a handled module must stay dense (None when it can be factorised).
    """

    label: str
    components: Callable[[nn.Module], list[Component]]
    build: Callable[[nn.Module, BuildSpec], Factorized]
    types: tuple[type, ...] = ()
    matches: Callable[[nn.Module], bool] | None = None
    skip_reason: Callable[[nn.Module], str | None] = _no_reason

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"LayerHandler label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.types, tuple) or not all(isinstance(t, type) and issubclass(t, nn.Module)
                                                        for t in self.types):
            raise ConfigTypeError(f"LayerHandler types must be a tuple of nn.Module classes, got {self.types!r}")
        if not self.types and self.matches is None:
            raise ConfigError(f"LayerHandler {self.label!r} needs types or a matches predicate")

    def claims(self, module: nn.Module) -> bool:
        """Whether this handler is responsible for ``module``."""
        return isinstance(module, self.types) or self.matches is not None and self.matches(module)

    def overridden_forward(self, module: nn.Module) -> str | None:
        """``"Class.method"`` when ``module`` is a subclass of a handled class that overrides the
        method computing its output; None when the handled forward is the one that runs."""
        cls = type(module)
        if cls in self.types:
            return None
        for base in self.types:
            if isinstance(module, base):
                for method in FORWARD_METHODS:
                    if hasattr(base, method) and getattr(cls, method) is not getattr(base, method):
                        return f"{cls.__name__}.{method}"
        return None


LAYER_HANDLERS = Registry("layer handler")
"""Layer handlers by label, in registration order (later ones take precedence)."""


def register_layer(handler: LayerHandler) -> LayerHandler:
    """Teach :func:`maestro_lod.factorize` a new layer type; later registrations take precedence.
    Returns the handler; a label can be registered once."""
    if not isinstance(handler, LayerHandler):
        raise ConfigTypeError(f"register_layer expects a LayerHandler, got {type(handler).__name__}")
    return LAYER_HANDLERS.register(handler.label)(handler)


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The most recently registered handler that claims ``module``, if any."""
    return next((h for h in reversed(LAYER_HANDLERS.values()) if h.claims(module)), None)


def supported_labels() -> str:
    """The labels of every registered handler, for error messages."""
    return ", ".join(LAYER_HANDLERS)


# ------------------------------------------------------------------------------ built-in handlers
def _linear_components(linear: nn.Linear) -> list[Component]:
    return [Component("", linear.out_features, linear.in_features)]


def _whitened_linear(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, factor: torch.Tensor,
                     min_rank: int) -> LowRankLinear:
    """A :class:`LowRankLinear` of ``weight`` (out × in) with whitened factors (copies the bias)."""
    up, down = whitened_split(weight, factor, rank)
    layer = LowRankLinear(up, down, None if bias is None else bias.detach().clone(), min(weight.shape), min_rank)
    return follow_requires_grad(layer.to(weight.device), weight, bias)


def _build_linear(linear: nn.Linear, spec: BuildSpec) -> LowRankLinear:
    if spec.init == "whitened":
        return _whitened_linear(linear.weight, linear.bias, spec.rank, spec.whitening_factor(), spec.min_rank)
    return LowRankLinear.from_dense(linear, rank=spec.rank, init=spec.init, min_rank=spec.min_rank,
                                    generator=spec.generator)


def _conv_components(conv: nn.Module) -> list[Component]:
    groups = conv.groups
    return [Component("", conv.out_channels // groups, conv.weight[0].numel(), groups)]


def _conv_skip_reason(conv: nn.Module) -> str | None:
    if _conv_components(conv)[0].max_rank == 1:
        return f"grouped convolution with rank 1 per group (groups={conv.groups}, e.g. depthwise): nothing to factorise"
    return None


def _build_conv(conv: nn.Module, spec: BuildSpec) -> LowRankConv:
    if spec.init == "whitened":
        groups = conv.groups
        out_per_group, in_per_group = conv.out_channels // groups, conv.weight[0].numel()
        matrix = conv.weight.reshape(groups, out_per_group, in_per_group)
        up, down = whitened_split(matrix[0] if groups == 1 else matrix, spec.whitening_factor(), spec.rank)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layer = LowRankConv(up, down, bias, conv, min(out_per_group, in_per_group), spec.min_rank)
        return follow_requires_grad(layer.to(conv.weight.device), conv.weight, conv.bias)
    return LowRankConv.from_dense(conv, rank=spec.rank, init=spec.init, min_rank=spec.min_rank,
                                  generator=spec.generator)


def _attention_components(mha: nn.MultiheadAttention) -> list[Component]:
    e = mha.embed_dim
    return [Component("q_proj", e, e), Component("k_proj", e, mha.kdim), Component("v_proj", e, mha.vdim),
            Component("out_proj", e, e)]


def _build_attention(mha: nn.MultiheadAttention, spec: BuildSpec) -> LowRankMultiheadAttention:
    if spec.init == "whitened":
        weights = attention_projection_weights(mha)
        projections = {name: _whitened_linear(weights[name], mha.out_proj.bias if name == "out_proj" else None,
                                              spec.ranks[name], spec.whitening_factor(name), spec.min_rank)
                       for name in PROJECTIONS}
        attention = LowRankMultiheadAttention(mha, projections)
        for attr in ("in_proj_bias", "bias_k", "bias_v"):
            if getattr(mha, attr) is not None:
                getattr(attention, attr).requires_grad_(getattr(mha, attr).requires_grad)
        return attention
    return LowRankMultiheadAttention.from_dense(mha, rank=spec.ranks, init=spec.init, min_rank=spec.min_rank,
                                                generator=spec.generator)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face transformers' ``Conv1D`` (GPT-2): a linear layer storing its weight as in × out."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and tuple(module.weight.shape) == (module.nx, module.nf))


def _hf_conv1d_components(conv1d: nn.Module) -> list[Component]:
    return [Component("", conv1d.nf, conv1d.nx)]


def _build_hf_conv1d(conv1d: nn.Module, spec: BuildSpec) -> LowRankLinear:
    if spec.init == "whitened":
        return _whitened_linear(conv1d.weight.t(), conv1d.bias, spec.rank, spec.whitening_factor(), spec.min_rank)
    layer = LowRankLinear.from_weight(conv1d.weight.t(), conv1d.bias, spec.rank, init=spec.init,
                                      min_rank=spec.min_rank, generator=spec.generator)
    return follow_requires_grad(layer, conv1d.weight, conv1d.bias)


BUILT_IN_HANDLERS = (
    LayerHandler("nn.Linear", _linear_components, _build_linear, types=(nn.Linear,)),
    LayerHandler("nn.Conv1d/Conv2d/Conv3d", _conv_components, _build_conv, types=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
                 skip_reason=_conv_skip_reason),
    LayerHandler("nn.MultiheadAttention", _attention_components, _build_attention, types=(nn.MultiheadAttention,)),
    LayerHandler("transformers Conv1D", _hf_conv1d_components, _build_hf_conv1d, matches=_is_hf_conv1d),
)
for handler in BUILT_IN_HANDLERS:
    register_layer(handler)
del handler
