"""Find the layers of any model that can be factorised, plan it, and swap in low-rank layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import FactorizeConfig, name_matches, pattern_matches
from .errors import ConfigError, ConfigTypeError
from .functional import truncated_rank
from .layers import LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention
from .layers.attention import PROJECTIONS, attention_projection_weights
from .tables import format_table


@dataclass(frozen=True)
class Component:
    """One weight matrix of a layer: ``groups`` blocks of ``out_features × in_features``."""

    suffix: str
    out_features: int
    in_features: int
    groups: int = 1

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)


@dataclass(frozen=True)
class LayerHandler:
    """How one kind of dense layer is described and replaced (an entry of the layer registry)."""

    label: str
    matches: Callable[[nn.Module], bool]
    components: Callable[[nn.Module], list[Component]]
    build: Callable[[nn.Module, dict[str, int], str, int, torch.Generator | None], nn.Module]
    skip_reason: Callable[[nn.Module], str | None] = lambda module: None


def _conv_components(conv: nn.Module) -> list[Component]:
    groups = conv.groups
    return [Component("", conv.out_channels // groups, conv.weight[0].numel(), groups)]


def _conv_skip_reason(conv: nn.Module) -> str | None:
    if _conv_components(conv)[0].max_rank == 1:
        return f"grouped convolution with rank 1 per group (groups={conv.groups}, e.g. depthwise): nothing to factorise"
    return None


def _build_attention(mha: nn.MultiheadAttention, ranks: dict[str, int], init: str, min_rank: int,
                     generator: torch.Generator | None) -> nn.Module:
    weights = attention_projection_weights(mha)
    projections = {
        name: LowRankLinear.from_weight(weights[name], mha.out_proj.bias if name == "out_proj" else None,
                                        ranks[name], init, min_rank, generator)
        for name in PROJECTIONS
    }
    return LowRankMultiheadAttention(mha, projections)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face transformers' ``Conv1D`` (GPT-2): a linear layer storing its weight as in × out."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and tuple(module.weight.shape) == (module.nx, module.nf))


LAYER_REGISTRY: list[LayerHandler] = [
    LayerHandler(
        "nn.Linear",
        lambda m: isinstance(m, nn.Linear),
        lambda m: [Component("", m.out_features, m.in_features)],
        lambda m, r, init, k, g: LowRankLinear.from_dense(m, r[""], init, k, g),
    ),
    LayerHandler(
        "nn.Conv1d/Conv2d/Conv3d",
        lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        _conv_components,
        lambda m, r, init, k, g: LowRankConv.from_dense(m, r[""], init, k, g),
        _conv_skip_reason,
    ),
    LayerHandler(
        "nn.MultiheadAttention",
        lambda m: isinstance(m, nn.MultiheadAttention) and not isinstance(m, LowRankMultiheadAttention),
        lambda m: [Component("q_proj", m.embed_dim, m.embed_dim), Component("k_proj", m.embed_dim, m.kdim),
                   Component("v_proj", m.embed_dim, m.vdim), Component("out_proj", m.embed_dim, m.embed_dim)],
        _build_attention,
    ),
    LayerHandler(
        "transformers Conv1D",
        _is_hf_conv1d,
        lambda m: [Component("", m.nf, m.nx)],
        lambda m, r, init, k, g: LowRankLinear.from_weight(m.weight.t(), m.bias, r[""], init, k, g),
    ),
]


def register_layer(handler: LayerHandler) -> None:
    """Teach :func:`factorize` a new layer type; later registrations take precedence."""
    if not isinstance(handler, LayerHandler):
        raise ConfigTypeError(f"register_layer expects a LayerHandler, got {type(handler).__name__}")
    LAYER_REGISTRY.insert(0, handler)


def _handler_for(module: nn.Module) -> LayerHandler | None:
    return next((h for h in LAYER_REGISTRY if h.matches(module)), None)


@dataclass
class PlanEntry:
    """One weight matrix considered by :func:`plan`: where it is, its shape, and the decision."""

    name: str
    layer_type: str
    out_features: int
    in_features: int
    groups: int
    max_rank: int
    rank: int | None
    skipped: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def dense_params(self) -> int:
        return self.groups * self.out_features * self.in_features

    @property
    def factorized_params(self) -> int | None:
        if self.rank is None:
            return None
        return self.groups * self.rank * (self.out_features + self.in_features)


class Plan(list):
    """The list of :class:`PlanEntry` that :func:`plan` returns; ``str()`` renders a table."""

    @property
    def factorized(self) -> list[PlanEntry]:
        return [e for e in self if e.skipped is None]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self if e.skipped is not None]

    def __str__(self) -> str:
        rows = [("module", "type", "shape", "rank", "dense params", "factorised params", "note")]
        for e in self:
            shape = f"{e.out_features}x{e.in_features}" + (f" x{e.groups} groups" if e.groups > 1 else "")
            rank = "-" if e.rank is None else f"{e.rank}/{e.max_rank}"
            fact = "-" if e.factorized_params is None else f"{e.factorized_params:,}"
            note = e.skipped or ("shared with " + ", ".join(e.aliases) if e.aliases else "")
            rows.append((e.name or "<root>", e.layer_type, shape, rank, f"{e.dense_params:,}", fact, note))
        return format_table(rows)


@dataclass
class _Decision:
    module: nn.Module
    handler: LayerHandler
    paths: list[str]
    ranks: dict[str, int]


def _start_rank(names: list[str], component: Component, config: FactorizeConfig) -> int:
    for key, value in config.rank_pattern.items():
        if any(pattern_matches(n, key) for n in names):
            if isinstance(value, int):
                if value > component.max_rank:
                    raise ConfigError(f"rank_pattern[{key!r}]={value} exceeds the full rank {component.max_rank} "
                                     f"of {names[0]!r}")
                return value
            return truncated_rank(value, component.max_rank)
    if config.rank is None:
        return component.max_rank
    if isinstance(config.rank, int):
        return min(config.rank, component.max_rank)
    return truncated_rank(config.rank, component.max_rank)


def _analyse(model: nn.Module, config: FactorizeConfig) -> tuple[Plan, list[_Decision]]:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, FactorizeConfig):
        raise ConfigTypeError(f"config must be a FactorizeConfig, got {type(config).__name__}")
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
        modules[id(module)] = module

    owned: list[str] = []  # modules whose sub-modules are handled as part of them
    entries, decisions, unsupported = Plan(), [], []
    explicit = config.target_modules is not None
    for key, module in modules.items():
        names = paths[key]
        if any(n.startswith(p + ".") or p == "" and n for p in owned for n in names):
            continue
        handler = _handler_for(module)
        targeted = not explicit or any(name_matches(n, config.target_modules) for n in names)
        if isinstance(module, (LowRankLayer, LowRankMultiheadAttention)):
            owned.extend(names)
            continue
        if handler is None:
            has_weights = any(True for _ in module.parameters(recurse=False))
            if explicit and targeted and has_weights and not list(module.children()):
                unsupported.append(f"{names[0]!r} ({type(module).__name__})")
            continue
        owned.extend(names)
        components = handler.components(module)
        reason = None
        if not targeted:
            reason = "not in target_modules"
        elif any(name_matches(n, config.exclude_modules) for n in names):
            reason = "in exclude_modules"
        else:
            reason = handler.skip_reason(module)
        ranks = {}
        for comp in components:
            comp_names = [f"{n}.{comp.suffix}" if comp.suffix else n for n in names]
            rank = None if reason else _start_rank(comp_names + (names if comp.suffix else []), comp, config)
            ranks[comp.suffix] = rank
            entries.append(PlanEntry(comp_names[0], handler.label + (f".{comp.suffix}" if comp.suffix else ""),
                                     comp.out_features, comp.in_features, comp.groups, comp.max_rank, rank, reason,
                                     tuple(comp_names[1:])))
        if reason is None:
            decisions.append(_Decision(module, handler, names, ranks))
    if unsupported:
        supported = ", ".join(h.label for h in LAYER_REGISTRY)
        raise ConfigError(f"targeted module(s) {', '.join(unsupported)} cannot be factorised; supported: {supported}")
    return entries, decisions


def plan(model: nn.Module, config: FactorizeConfig | None = None) -> Plan:
    """Dry run of :func:`factorize`: every candidate weight, its shape, start rank, dense vs
    factorised parameter count, and why each skipped candidate is skipped. Changes nothing."""
    entries, _ = _analyse(model, config or FactorizeConfig())
    return entries


def factorize(model: nn.Module, config: FactorizeConfig | None = None) -> nn.Module:
    """Replace the targeted layers of ``model`` by low-rank ordered layers, in place.

    Every alias of a shared module is replaced by the same low-rank layer. All replacements are
    built before any is swapped in, so on error the model is left unchanged. Returns ``model``
    (or the replacement, when ``model`` itself is a single supported layer).
    """
    config = config or FactorizeConfig()
    entries, decisions = _analyse(model, config)
    if not decisions:
        target = config.target_modules
        detail = "no supported layer found" if target is None else f"target_modules={target!r} matched no supported layer"
        skipped = "; ".join(f"{e.name}: {e.skipped}" for e in entries.skipped)
        raise ConfigError(f"nothing to factorise: {detail}" + (f" (skipped: {skipped})" if skipped else ""))
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    replacements = [(d, d.handler.build(d.module, d.ranks, config.init, config.min_rank, generator))
                    for d in decisions]
    for decision, new in replacements:
        new.train(decision.module.training)
        for path in decision.paths:
            if path == "":
                return new
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model


def low_rank_layers(model: nn.Module) -> Iterator[tuple[str, LowRankLayer]]:
    """Yield ``(name, layer)`` for every low-rank layer of ``model`` (shared layers once)."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLayer):
            yield name, module


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Current physical rank of every low-rank layer, by name."""
    return {name: layer.rank for name, layer in low_rank_layers(model)}
