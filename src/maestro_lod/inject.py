"""Find the layers of any model that can be factorised, plan it, and swap in low-rank layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .checks import check_module, non_finite, shown
from .config import FactorizeConfig, name_matches, pattern_matches
from .errors import ConfigError, ConfigTypeError
from .functional import truncated_rank
from .layers import Factorized, LowRankLayer
from .layers.handlers import (BUILT_IN_HANDLERS, LAYER_HANDLERS, BuildSpec, Component, LayerHandler, handler_for,
                              register_layer, supported_labels)
from .layers.hooks import carry_hooks, hook_refusal
from .layers.query import low_rank_layers, rank_pattern
from .tables import format_table
from .whitening import check_calibration, whitening_factors

__all__ = ["factorize", "plan", "Plan", "PlanEntry", "LeftDense", "PlanTotals", "LayerHandler", "Component",
           "BuildSpec", "LAYER_HANDLERS", "register_layer", "low_rank_layers", "rank_pattern"]


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


@dataclass(frozen=True)
class LeftDense:
    """A module with parameters of its own that no handler factorises, and why it stays as it is."""

    name: str
    layer_type: str
    params: int
    reason: str


@dataclass(frozen=True)
class PlanTotals:
    """Parameter counts of a plan: the model now, and after :func:`factorize` split into the
    factors and the parameters left dense (biases, norms, embeddings, skipped layers)."""

    dense_params: int
    factorized_params: int
    left_dense_params: int

    @property
    def params_after(self) -> int:
        return self.factorized_params + self.left_dense_params


class Plan(list):
    """The list of :class:`PlanEntry` that :func:`plan` returns; ``str()`` renders a table.

    ``left_dense`` lists the other modules with parameters (no handler, already factorised) and
    ``totals`` the parameter counts before and after.
    """

    def __init__(self, entries=(), left_dense: list[LeftDense] = (), total_params: int = 0,
                 existing_factor_params: int = 0, target_modules=None):
        super().__init__(entries)
        self.left_dense = list(left_dense)
        self.total_params = total_params
        self.existing_factor_params = existing_factor_params
        self.target_modules = target_modules

    @property
    def factorized(self) -> list[PlanEntry]:
        return [e for e in self if e.skipped is None]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self if e.skipped is not None]

    @property
    def totals(self) -> PlanTotals:
        replaced = sum(e.dense_params for e in self.factorized)
        factors = sum(e.factorized_params for e in self.factorized) + self.existing_factor_params
        return PlanTotals(self.total_params, factors, self.total_params - replaced - self.existing_factor_params)

    def __str__(self) -> str:
        rows = [("module", "type", "shape", "rank", "dense params", "factorised params", "note")]
        for e in self:
            shape = f"{e.out_features}x{e.in_features}" + (f" x{e.groups} groups" if e.groups > 1 else "")
            rank = "-" if e.rank is None else f"{e.rank}/{e.max_rank}"
            fact = "-" if e.factorized_params is None else f"{e.factorized_params:,}"
            note = e.skipped or ("shared with " + ", ".join(e.aliases) if e.aliases else "")
            rows.append((e.name or "<root>", e.layer_type, shape, rank, f"{e.dense_params:,}", fact, note))
        for d in self.left_dense:
            rows.append((d.name or "<root>", d.layer_type, "-", "-", f"{d.params:,}", "-", d.reason))
        t = self.totals
        rows.append(("total", "", "", "", f"{t.dense_params:,}", f"{t.factorized_params:,}",
                     f"{t.left_dense_params:,} left dense; {t.params_after:,} after factorize"))
        table = format_table(rows)
        return table if self.factorized else f"{table}\n{_nothing_to_factorise(self)}"


@dataclass
class _Decision:
    module: nn.Module
    handler: LayerHandler
    paths: list[str]
    ranks: dict[str, int]
    entries: list[PlanEntry]  # its weights' rows of the plan


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


def _parameter_owners(modules: dict[int, nn.Module]) -> dict[int, list[int]]:
    """For every parameter (by id), the modules (by id) that register it as their own."""
    owners: dict[int, list[int]] = {}
    for key, module in modules.items():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(key)
    return owners


def _shared_weight(module: nn.Module, owners: dict[int, list[int]], paths: dict[int, list[str]]) -> str | None:
    """``"weight shared with lm_head"`` when a parameter of ``module`` is also registered by a module
    outside it (tied weights: factorising would untie them)."""
    inside = {id(m) for m in module.modules()}
    for name, param in module.named_parameters():
        others = [key for key in owners.get(id(param), []) if key not in inside]
        if others:
            return f"{name} shared with {paths[others[0]][0] or '<root>'} (tied weights would be untied)"
    return None


def _skip_reason(module: nn.Module, names: list[str], handler: LayerHandler, components: list[Component],
                 config: FactorizeConfig, owners: dict[int, list[int]], paths: dict[int, list[str]]) -> str | None:
    """Why a module some handler claims stays dense (None: it is factorised)."""
    if config.target_modules is not None and not any(name_matches(n, config.target_modules) for n in names):
        return "not in target_modules"
    if any(name_matches(n, config.exclude_modules) for n in names):
        return "in exclude_modules"
    reason = handler.skip_reason(module)
    if reason:
        return reason
    overridden = handler.overridden_forward(module)
    if overridden:
        return f"overrides forward: {overridden} computes something the factorised {handler.label} would not"
    if all(c.max_rank <= 1 for c in components):
        return "full rank 1: its factors would be larger than the dense weight and could never shrink"
    return hook_refusal(module) or _shared_weight(module, owners, paths)


def _unmatched_patterns(config: FactorizeConfig, candidate_names: list[str]) -> list[str]:
    """Warnings for ``exclude_modules`` entries and ``rank_pattern`` keys that match no candidate layer."""
    messages = []
    excludes = config.exclude_modules
    specs = [] if excludes is None else [excludes] if isinstance(excludes, str) else [[e] for e in excludes]
    for spec in specs:
        if not any(name_matches(n, spec) for n in candidate_names):
            entry = spec if isinstance(spec, str) else spec[0]
            messages.append(f"exclude_modules entry {entry!r} matches no factorisable layer")
    for key in config.rank_pattern:
        if not any(pattern_matches(n, key) for n in candidate_names):
            messages.append(f"rank_pattern key {key!r} matches no factorisable layer")
    return messages


def _keep_ends_dense(decisions: list[_Decision]) -> None:
    """``keep_ends``: drop the first and the last decision and mark their plan entries kept dense."""
    if not decisions:
        return
    if len(decisions) == 1:
        ends = [(decisions.pop(), "the only")]
    else:
        ends = [(decisions.pop(0), "the first"), (decisions.pop(), "the last")]
    for decision, which in ends:
        for entry in decision.entries:
            entry.rank, entry.skipped = None, f"keep_ends: {which} factorisable layer stays dense"


def _analyse(model: nn.Module, config: FactorizeConfig) -> tuple[Plan, list[_Decision], list[str]]:
    """The plan, the replacements to build, and warnings about patterns that matched nothing."""
    check_module(model)
    if not isinstance(config, FactorizeConfig):
        raise ConfigTypeError(f"config={shown(config)} must be a FactorizeConfig, got {type(config).__name__}")
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    owners = _parameter_owners(modules)

    owned: list[str] = []  # modules whose sub-modules are handled as part of them
    entries, left_dense, decisions, unsupported, candidates = [], [], [], [], []
    existing_factors = 0
    explicit = config.target_modules is not None
    for key, module in modules.items():
        names = paths[key]
        if any(n.startswith(p + ".") or p == "" and n for p in owned for n in names):
            continue
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, Factorized):
            owned.extend(names)
            left_dense.append(LeftDense(names[0], type(module).__name__, sum(p.numel() for p in module.parameters()),
                                        "already factorised"))
            existing_factors += sum(layer.up.numel() + layer.down.numel()
                                    for layer in module.modules() if isinstance(layer, LowRankLayer))
            continue
        handler = handler_for(module)
        if handler is None:
            if own_params:
                left_dense.append(LeftDense(names[0], type(module).__name__, own_params,
                                            f"no handler for {type(module).__name__}"))
                if explicit and any(name_matches(n, config.target_modules) for n in names) and not list(module.children()):
                    unsupported.append(f"{names[0]!r} ({type(module).__name__})")
            continue
        owned.extend(names)
        components = handler.components(module)
        reason = _skip_reason(module, names, handler, components, config, owners, paths)
        ranks = {}
        candidates.extend(names)
        for comp in components:
            comp_names = [f"{n}.{comp.suffix}" if comp.suffix else n for n in names]
            candidates.extend(comp_names if comp.suffix else [])
            rank = None if reason else _start_rank(comp_names + (names if comp.suffix else []), comp, config)
            ranks[comp.suffix] = rank
            entries.append(PlanEntry(comp_names[0], handler.label + (f".{comp.suffix}" if comp.suffix else ""),
                                     comp.out_features, comp.in_features, comp.groups, comp.max_rank, rank, reason,
                                     tuple(comp_names[1:])))
        if reason is None:
            decisions.append(_Decision(module, handler, names, ranks, entries[-len(components):]))
    if config.keep_ends:
        _keep_ends_dense(decisions)
    if unsupported:
        raise ConfigError(f"targeted module(s) {', '.join(unsupported)} cannot be factorised; "
                          f"supported: {supported_labels()}")
    total = sum(p.numel() for p in model.parameters())
    return (Plan(entries, left_dense, total, existing_factors, config.target_modules), decisions,
            _unmatched_patterns(config, candidates))


def plan(model: nn.Module, config: FactorizeConfig | None = None) -> Plan:
    """Dry run of :func:`factorize`: every candidate weight, its shape, start rank, dense vs
    factorised parameter count, and why each skipped candidate is skipped; every other module with
    parameters and why it stays dense; totals. Changes nothing."""
    entries, _, notes = _analyse(model, FactorizeConfig() if config is None else config)
    for message in notes:
        warnings.warn(message, stacklevel=2)
    return entries


def _nothing_to_factorise(entries: Plan) -> str:
    """Why no layer would be replaced: the message of :func:`factorize`'s error and the last line of
    an empty plan's table, naming the modules found that no handler factorises."""
    already = [d for d in entries.left_dense if d.reason == "already factorised"]
    unhandled = [f"{d.name or '<root>'} ({d.layer_type})" for d in entries.left_dense
                 if d.reason.startswith("no handler")]
    if already and not entries:
        detail = f"the model is already factorised ({len(already)} factorised module(s)) and has no dense layer left"
    elif already:
        detail = f"the model is already factorised ({len(already)} factorised module(s)); no other layer qualifies"
    elif entries.target_modules is not None:
        detail = f"target_modules={entries.target_modules!r} matched no supported layer"
    elif entries:
        detail = "every supported layer is skipped"
    else:
        found = f"; the modules with parameters, {', '.join(unhandled)}, have no handler" if unhandled else ""
        detail = f"no supported layer found (supported: {supported_labels()}){found}"
    skipped = "; ".join(f"{e.name}: {e.skipped}" for e in entries.skipped)
    return f"nothing to factorise: {detail}" + (f" (skipped: {skipped})" if skipped else "")


def _whitening(model: nn.Module, decisions: list[_Decision], config: FactorizeConfig,
               calibration) -> dict[int, dict[str, torch.Tensor] | None]:
    """The whitening factors of every module to replace (by ``id``), from one calibration pass.
    Modules of handlers other than the built-in ones (whose builders know no whitening) and modules
    the calibration never reached get None: they are initialised by plain SVD, with a warning."""
    whitened = {}
    for decision in decisions:
        if any(decision.handler is h for h in BUILT_IN_HANDLERS):
            whitened[decision.paths[0]] = decision
        else:
            warnings.warn(f"{decision.paths[0] or '<root>'}: layer handler {decision.handler.label!r} has no "
                          f"whitened init; initialised by plain SVD", stacklevel=3)
    factors = whitening_factors(model, {name: d.module for name, d in whitened.items()}, calibration, config.damping)
    return {id(d.module): factors[name] for name, d in whitened.items()}


def _build(decision: _Decision, config: FactorizeConfig, generator: torch.Generator | None,
           whitening: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The replacement of one module, checked to follow the :class:`~maestro_lod.layers.Factorized` protocol.
    With ``init="whitened"`` and no ``whitening`` factors the module is initialised by plain SVD."""
    init = "svd" if config.init == "whitened" and whitening is None else config.init
    spec = BuildSpec(decision.ranks, init, config.min_rank, generator, whitening)
    new = decision.handler.build(decision.module, spec)
    if not isinstance(new, Factorized):
        raise ConfigTypeError(f"layer handler {decision.handler.label!r} built a {type(new).__name__}, "
                              f"not a maestro_lod.layers.Factorized module")
    new.train(decision.module.training)
    carry_hooks(decision.module, new)
    return new


def _check_finite(decisions: list[_Decision]) -> None:
    """Refuse, naming the layer and the parameter, a layer to replace whose weights hold NaN or inf
    (SVD cannot factorise them, and the copy would carry them into the factors)."""
    for decision in decisions:
        for name, param in decision.module.named_parameters():
            bad = non_finite(param)
            if bad:
                where = decision.paths[0] or "<root>"
                raise ConfigError(f"layer {where!r} has {bad} values in {name!r}; factorize needs finite weights "
                                  f"(was the model loaded or trained correctly?)")


def _check_min_rank(entries: Plan, config: FactorizeConfig) -> None:
    """Warn when ``min_rank`` exceeds the full rank of every layer to factorise: no layer would ever shrink."""
    largest = max((e.max_rank for e in entries.factorized), default=0)
    if entries.factorized and config.min_rank > largest:
        warnings.warn(f"min_rank={config.min_rank} exceeds the full rank of every factorised layer (at most "
                      f"{largest}): shrinking will never reduce a rank", stacklevel=3)


def factorize(model: nn.Module, config: FactorizeConfig | None = None, *, calibration=None) -> nn.Module:
    """Replace the targeted layers of ``model`` by low-rank ordered layers, in place.

    ``calibration`` (only with ``init="whitened"``, which requires it) is an iterable of model
    input batches: a tensor, an ``(inputs, targets)`` tuple as a DataLoader yields (targets are
    ignored; a tuple of inputs is unpacked), or a dict of keyword inputs; see
    :func:`maestro_lod.whitening.input_second_moments`. The model runs once over it in eval mode
    to collect each layer's input second moment, and each layer is factorised to minimise its
    output error on those inputs. Layers of a custom handler, or that the calibration never
    reaches, are initialised by plain SVD with a warning. Passing ``calibration`` with another
    init is an error rather than data silently left unused.

    A layer to replace whose weights hold NaN or inf is refused by name; a ``min_rank`` above the
    full rank of every layer to replace is warned about (no layer could ever shrink).

    Every alias of a shared module is replaced by the same low-rank layer. All replacements are
    built before any is swapped in, so on error the model is left unchanged. Returns ``model``
    (or the replacement, when ``model`` itself is a single supported layer).

    The model stays what it was; whatever cannot be kept exactly stays dense, with the reason in
    :func:`plan`:

    * full rank with SVD init computes what the dense layer did; ``requires_grad=False`` weights
      give frozen factors, and a frozen bias stays frozen;
    * forward pre-hooks, forward hooks and full backward (pre-)hooks move to the new layer (their
      handles keep working): it has the same inputs and outputs;
    * layers with a parametrization (``torch.nn.utils.parametrize``, e.g. ``weight_norm``), legacy
      weight_norm/spectral_norm or ``register_backward_hook`` hooks, state-dict hooks, or hooks on
      their sub-modules are skipped;
    * subclasses that override ``forward`` (e.g. a "same"-padding or weight-standardising conv)
      are skipped unless a handler lists their class;
    * layers with a parameter shared with another module (tied embeddings) are skipped, so ties
      such as ``tie_weights()`` keep working;
    * layers whose full rank is 1 are skipped (their factors would be larger than the weight).

    A factorised layer's ``.weight`` reads like the dense weight (metadata for free, values
    computed from the factors) and refuses writes.
    """
    check_module(model)
    config = FactorizeConfig() if config is None else config
    if not isinstance(config, FactorizeConfig):
        raise ConfigTypeError(f"config={shown(config)} must be a FactorizeConfig, got {type(config).__name__}")
    if config.init == "whitened":
        if calibration is None:
            raise ConfigError("init='whitened' needs calibration data: factorize(model, config, calibration=batches)")
        check_calibration(calibration)
    elif calibration is not None:
        raise ConfigError(f"calibration is only used by init='whitened' (this config has init={config.init!r})")
    entries, decisions, notes = _analyse(model, config)
    for message in notes:
        warnings.warn(message, stacklevel=2)
    if not decisions:
        raise ConfigError(_nothing_to_factorise(entries))
    _check_finite(decisions)
    _check_min_rank(entries, config)
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    whitening = _whitening(model, decisions, config, calibration) if config.init == "whitened" else {}
    replacements = [(d, _build(d, config, generator, whitening.get(id(d.module)))) for d in decisions]
    for decision, new in replacements:
        for path in decision.paths:
            if path == "":
                return new
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model

