"""What a rank pattern costs once deployed: MACs and parameters (exact, from a linear model per
layer) and latency (from a per-layer table measured once).

Every cost here is that of the deployed form (:func:`deployable`), the model the ``.pt2`` and ONNX
artifacts are traced from: every low-rank Linear/Conv runs as a pair of layers, or as one dense
layer where that is no larger (``export``'s ``merge="auto"``); factorised attention, and layers
whose attributes other code reads only for metadata, stay factorised; a layer whose dense weight
other code multiplies by (:func:`read_layers`) is one dense layer at every rank. The plain
``torch.nn`` form of ``model.safetensors`` can cost more (attention dense, read layers merged).

Both MACs and parameters of a low-rank layer are linear in its rank (``r·(m+n)`` weights, each used
once per output position), and a merged layer costs the dense ``m·n``; so the cost of any rank
pattern is ``base + Σ layer_cost(rank)`` with the per-rank and dense costs read once from the
model, and the layers held dense at every rank in ``base``. The search evaluates thousands of
patterns with this model instead of exporting each one.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..export import attribute_readers, export, static_readers
from ..functional import DOWN_RANK_DIM, UP_RANK_DIM
from ..layers import LowRankConv, LowRankLayer, LowRankMultiheadAttention, low_rank_layers, outermost_factorized
from .counting import count_macs, count_params
from .passes import forward

COSTS = ("macs", "params", "latency")
KEPT_TYPES = (LowRankMultiheadAttention,)
"""Factorised modules the deployed form keeps as they are (their forward keeps their rank savings)."""


def _as_inputs(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def deployable(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """The form of ``model`` that ``torch.export`` / ONNX artifacts are made from: low-rank
    Linear/Conv as factor pairs (merged where no larger), factorised attention with its low-rank
    projections, and every layer whose attributes other code reads (T5's ``wo.weight.dtype``,
    Whisper's ``conv1.stride``, ``nn.TransformerEncoderLayer`` looking at ``linear1.weight``) kept
    factorised, so its savings stay: a factorised layer has every attribute of the dense one and
    reading its ``.weight`` for metadata computes nothing. A layer whose dense weight other code
    computes with (torchvision's Swin passes ``qkv.weight`` to a function) is merged. With
    ``example_inputs`` (a tensor or a tuple) the reads are detected during ``model(*example_inputs)``
    (see :func:`maestro_lod.export`); without them only the ``nn.TransformerEncoderLayer`` case is known.

    Factorised layers left in the form always run as their pair of thin products (never composed
    into one, see :attr:`~maestro_lod.layers.LowRankLayer.may_compose`), so a traced program does
    not depend on the batch size it was traced at and costs what :func:`structural_costs` says."""
    examples = {} if example_inputs is None else {"example_inputs": _as_inputs(example_inputs)}
    result = export(model, keep=KEPT_TYPES, keep_read=True, **examples).eval()
    for layer in result.modules():
        if isinstance(layer, LowRankLayer):
            layer.may_compose = False
    return result


def read_layers(model: nn.Module, example_inputs: Any) -> tuple[set[str], set[str]]:
    """``(dense, kept)``: the low-rank layers that :func:`deployable` holds as one dense layer at
    every rank, because code outside them multiplies by their dense weight during
    ``model(*example_inputs)`` (their own forward, and with it any saving, is bypassed), and those
    it keeps factorised wherever a pair would be exported, because code outside reads only their
    attributes' metadata. Runs the detection on a copy of ``model``."""
    reads = attribute_readers(copy.deepcopy(model), _as_inputs(example_inputs), skip=KEPT_TYPES)
    dense = {name for name, found in reads.items() if found.values}
    return dense, (set(reads) | static_readers(model)) - dense


def visited_ranks(rank: int, floor: int, step: float) -> list[int]:
    """The ranks a layer passes through from ``rank`` down to ``floor`` when each removal drops
    ``max(1, int(step · current rank))`` trailing ranks (never below ``floor``), highest first."""
    ranks = [rank]
    while ranks[-1] > floor:
        current = ranks[-1]
        ranks.append(max(floor, current - max(1, int(step * current))))
    return ranks


def layer_floor(layer: LowRankLayer, start: int) -> int:
    """The lowest rank the search takes a layer to: its ``min_rank`` (or its start rank if lower)."""
    return min(layer.min_rank, start)


def _per_rank_params(layer: LowRankLayer) -> int:
    up = [s for i, s in enumerate(layer.up.shape) if i != layer.up.dim() + UP_RANK_DIM]
    down = [s for i, s in enumerate(layer.down.shape) if i != layer.down.dim() + DOWN_RANK_DIM]
    return math.prod(up) + math.prod(down)


@dataclass
class LayerCost:
    """Cost of one low-rank layer at any rank: ``per_rank · r`` as a factor pair, ``dense`` when
    the deployed form merges it (only layers the deployed form may merge have ``merges_at``)."""

    per_rank: float
    dense: float
    merges_at: set[int] = field(default_factory=set)

    def at(self, rank: int) -> float:
        return self.dense if rank in self.merges_at else self.per_rank * rank


@dataclass
class CostModel:
    """``cost(ranks) = base + Σ layers[name].at(ranks[name])`` for one kind of cost."""

    kind: str
    base: float
    layers: dict[str, "LayerCost | _TableCost"]

    def __call__(self, ranks: dict[str, int]) -> float:
        return self.base + sum(cost.at(ranks[name]) for name, cost in self.layers.items())


def _merge_ranks(model: nn.Module, visits: dict[str, list[int]], kept: set[str] = frozenset()) -> dict[str, set[int]]:
    """For each layer the deployed form may merge, the visited ranks at which it does: the rule of
    ``export(merge="auto")``, asked of the layer itself at each rank through ``active_rank``, and a
    convolution at rank 0 (a pair cannot have zero channels) unless it is in ``kept`` (left
    factorised by :func:`deployable`, where it outputs its bias at no cost)."""
    layers = dict(low_rank_layers(model))
    mergeable = {name for name, module in outermost_factorized(model) if isinstance(module, LowRankLayer)}
    result = {}
    for name in visits:
        layer, found = layers[name], set()
        if name in mergeable:
            saved = layer.active_rank
            for rank in visits[name]:
                layer.active_rank = rank
                if layer.merge_saves_params() or rank == 0 and isinstance(layer, LowRankConv) and name not in kept:
                    found.add(rank)
            layer.active_rank = saved
        result[name] = found
    return result


@torch.no_grad()
def _positions(model: nn.Module, inputs: tuple, layers: dict[str, LowRankLayer]) -> dict[str, int]:
    """Output positions (rows of a Linear, batch × pixels of a conv) each layer computes in one
    eval-mode forward of ``model`` on ``inputs``, summed over its calls."""
    counts = dict.fromkeys(layers, 0)

    def record(name: str):
        def hook(module: LowRankLayer, _args, output: torch.Tensor) -> None:
            counts[name] += output.numel() // module.weight_shape[0]
        return hook

    _observed_forward(model, inputs, [layer.register_forward_hook(record(name)) for name, layer in layers.items()])
    return counts


def _observed_forward(model: nn.Module, inputs: tuple, handles: list) -> None:
    """One eval-mode forward of ``model`` for the hooks behind ``handles``, removed afterwards. The
    attention fast path is off meanwhile so that every factorised layer runs as a module call (the
    fused path reads their weights instead); the training flag and the fast-path switch are restored."""
    was_training, fast_path = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fast_path)


def structural_costs(model: nn.Module, example_inputs: Any, visits: dict[str, list[int]],
                     readers: tuple[set[str], set[str]] = (frozenset(), frozenset())) -> dict[str, CostModel]:
    """MAC and parameter cost models of ``model`` (factorised, at its current ranks) for the
    ranks in ``visits`` (every layer's visited ranks, its current rank first). A layer computing
    ``P`` output positions per sample costs ``P·r·(m+n)`` MACs as a pair and ``P·m·n`` merged (per
    group); the base is what the deployed model (:func:`deployable`, reads detected on
    ``example_inputs``) costs beyond its low-rank layers, including the layers dense at every rank
    (``readers``: :func:`read_layers` of the model)."""
    dense, kept = readers
    layers = {name: layer for name, layer in low_rank_layers(model) if name not in dense}
    inputs = _as_inputs(example_inputs)
    deployed = deployable(model, inputs)
    merges = _merge_ranks(model, {name: ranks for name, ranks in visits.items() if name in layers}, kept)
    positions = _positions(model, inputs, layers)
    macs, params = {}, {}
    for name, layer in layers.items():
        dense_params, per_rank_params = math.prod(layer.weight_shape), _per_rank_params(layer)
        macs[name] = LayerCost(positions[name] * per_rank_params, positions[name] * dense_params, merges[name])
        params[name] = LayerCost(per_rank_params, dense_params, merges[name])
    start = {name: layer.rank for name, layer in layers.items()}
    models = {}
    for kind, table, total in (("macs", macs, count_macs(deployed, inputs)), ("params", params, count_params(deployed))):
        partial = CostModel(kind, 0.0, table)
        models[kind] = CostModel(kind, total - partial(start), table)
    return models


def _median_time(run: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@dataclass
class LatencyTable:
    """Measured latency (seconds per batch of ``batch_size``) of each low-rank layer's deployed
    form at each rank the search can visit, plus the rest of the model (``base``) and the dense model.

    Noise handling: every entry is the median of ``repeats`` timed calls after ``warmup`` untimed
    ones, on the thread count recorded in ``threads``; then each layer's row is made
    non-increasing as the rank falls (an entry is the minimum over it and every higher visited rank),
    since removing ranks never adds work and a larger figure at a lower rank can only be noise.
    Latency estimates of the front are therefore smoother than single measurements, and the latency
    measured on an exported model is reported next to the estimate.
    """

    batch_size: int
    repeats: int
    warmup: int
    threads: int
    base: float
    dense: float
    layers: dict[str, dict[int, float]]

    def cost_model(self) -> CostModel:
        table = {name: _TableCost(row) for name, row in self.layers.items()}
        return CostModel("latency", self.base, table)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "repeats": self.repeats, "warmup": self.warmup, "threads": self.threads,
                "base": self.base, "dense": self.dense,
                "layers": {name: {str(rank): t for rank, t in row.items()} for name, row in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        layers = {name: {int(rank): float(t) for rank, t in row.items()} for name, row in data["layers"].items()}
        return cls(int(data["batch_size"]), int(data["repeats"]), int(data["warmup"]), int(data["threads"]),
                   float(data["base"]), float(data["dense"]), layers)


@dataclass
class _TableCost:
    """One layer's latency row as a :class:`CostModel` entry (defined only at visited ranks)."""

    row: dict[int, float]

    def at(self, rank: int) -> float:
        return self.row[rank]


def repeat_batch(example: Any, batch_size: int) -> Any:
    """``example`` (one or more samples) repeated along the batch dimension to ``batch_size``."""
    if isinstance(example, (tuple, list)):
        return tuple(repeat_batch(x, batch_size) for x in example)
    reps = -(-batch_size // example.shape[0])
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]


@torch.no_grad()
def time_model(model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward of ``model`` on ``inputs`` (training mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return _median_time(lambda: forward(model, inputs), repeats, warmup)
    finally:
        model.train(was_training)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, visits: dict[str, list[int]], batch_size: int = 32,
                    repeats: int = 20, warmup: int = 3) -> LatencyTable:
    """Time each low-rank layer's deployed form at each rank in ``visits`` on the input it sees in
    ``model`` (captured by one forward at ``batch_size``), the whole deployed model at its current
    ranks, and the dense model; see :class:`LatencyTable` for the noise handling. The layers the
    deployed form holds dense at every rank (:func:`read_layers`) have no row: their time is
    part of ``base``."""
    for what, value in (("batch_size", batch_size), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what}={value!r} must be a positive int")
    inputs = repeat_batch(example_inputs, batch_size)
    dense_layers, kept = read_layers(model, example_inputs)
    layers = {name: layer for name, layer in low_rank_layers(model) if name not in dense_layers}
    visits = {name: ranks for name, ranks in visits.items() if name in layers}
    captured: dict[str, torch.Tensor] = {}
    _observed_forward(model, inputs, [
        layer.register_forward_pre_hook(lambda _m, args, name=name: captured.setdefault(name, args[0]))
        for name, layer in layers.items()])
    merges = _merge_ranks(model, visits, kept)
    table: dict[str, dict[int, float]] = {}
    for name, ranks in visits.items():
        layer, row = layers[name], {}
        for rank in ranks:
            piece = copy.deepcopy(layer)
            piece.active_rank = rank
            module = piece.to_standard(merge=rank in merges[name]).eval()
            row[rank] = _median_time(lambda: module(captured[name]), repeats, warmup)
        floor = math.inf
        for rank in sorted(row, reverse=True):
            floor = min(floor, row[rank])
            row[rank] = floor
        table[name] = row
    start = {name: ranks[0] for name, ranks in visits.items()}
    whole = time_model(deployable(model, example_inputs), inputs, repeats, warmup)
    dense = time_model(export(model, merge="always"), inputs, repeats, warmup)
    base = max(0.0, whole - sum(table[name][start[name]] for name in table))
    return LatencyTable(batch_size, repeats, warmup, torch.get_num_threads(), base, dense, table)


def check_cost(cost: str) -> str:
    """``cost`` if it is one of :data:`COSTS`, else a ConfigError listing them."""
    if cost not in COSTS:
        raise ConfigError(f"cost={cost!r} is not one of {', '.join(COSTS)}")
    return cost
