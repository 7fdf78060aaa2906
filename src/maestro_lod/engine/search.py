"""Greedy search for the accuracy–cost front of one trained model, and the models at its points.

Starting from the trained (shrunk) ranks, each round tries, for every factorised layer, removing
a slice of its trailing ranks (``max(1, int(step · current rank))``, never below the layer's
``min_rank``; where that saves nothing, because the deployed form keeps the layer merged, the
slice extends to the first visited rank that does save), estimates the loss on a fixed calibration set, and keeps the removal with the
smallest loss increase per unit of cost saved (a removal that saves nothing ranks after every one
that does, and is only scored when no removal saves anything). Rounds continue until every layer is at its floor; each round's result is one point,
so one pass gives the whole front. A layer the deployed form holds as one dense layer at every
rank, because other code multiplies by its dense weight (:func:`~.costs.read_layers`), would lose
accuracy and save nothing: it stays at its trained rank. Candidates are evaluated through ``active_rank`` views of a
single working copy of the model: no weights are copied per candidate, and each calibration batch
runs once per round at the current ranks while the modules before each candidate layer replay
their recorded outputs (:class:`~maestro_lod.engine.reuse.PrefixReuse`; only for models whose
eval-mode forward is deterministic).

BatchNorm: running statistics describe the model they were collected on. For a model with
BatchNorm, after each kept removal the statistics are recomputed on the calibration set (one
extra forward pass over it per round, plus one to measure the point's loss), so every point's loss
is that of the model with its own statistics; candidates within a round share the statistics of
the round's starting point. :func:`materialize` recomputes them the same way for any point other
than the trained one, so an exported model and its recorded accuracy agree.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import Dataset, default_collate

from ..data import IGNORE_INDEX
from ..errors import ConfigError, ConfigTypeError
from ..export import export
from ..layers import low_rank_layers, rank_pattern
from .counting import count_macs, count_params
from ..shrinking import truncate_
from .batchnorm import BATCHNORM_TYPES, batchnorm_layers, recalibrate_batchnorm
from .evaluation import evaluate
from .reuse import PrefixReuse
from .passes import forward
from .costs import LatencyTable, check_cost, deployable, layer_floor, measure_latency, read_layers, structural_costs, visited_ranks
from .front import Front, FrontPoint

CALIBRATION_SIZE = 2048
"""Samples drawn from the training data to rank candidate removals (as in the MAESTRO paper)."""
CALIBRATION_BATCH = 2048
"""Calibration samples per forward pass (one pass over the default set: the fewest passes per candidate)."""

Batch = tuple[Any, Any]
Progress = Callable[[int, int], None]
Loss = Callable[[Any, Any], torch.Tensor]
"""``loss(output, targets)``: a model's mean loss on one batch, from its output (any form: logits,
a tuple, a Hugging Face ``ModelOutput``) and the batch's second element, as a scalar tensor."""


def calibration_batches(dataset: Dataset, size: int = CALIBRATION_SIZE, batch_size: int = CALIBRATION_BATCH,
                        seed: int = 0) -> list[Batch]:
    """``size`` samples of ``dataset`` (all of it if smaller) drawn with ``seed``, collated once
    into batches: a fixed set, so every candidate is scored on the same data. Augmentations the
    dataset applies draw from a generator seeded with ``seed`` too."""
    for what, value in (("calibration size", size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what}={value!r} must be a positive int")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return [default_collate([dataset[i] for i in order[start:start + batch_size]])
                for start in range(0, len(order), batch_size)]


def batch_size(inputs: Any) -> int:
    """Samples in a batch of model inputs (a tensor, or a tuple of them: the first one's length)."""
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return len(first) if isinstance(first, torch.Tensor) and first.dim() else 1


def _batch_loss(output: Any, inputs: Any, targets: Any, loss: Loss | None) -> tuple[torch.Tensor, int]:
    """(summed loss in float64, positions it sums over) of one batch: cross-entropy of the logits
    per target position (``IGNORE_INDEX`` skipped), or ``loss(output, targets)`` (a mean) weighted
    by the batch's samples."""
    if loss is None:
        return _loss_sum(output, targets), int((targets != IGNORE_INDEX).sum())
    value = loss(output, targets)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigTypeError(f"loss(output, batch) must return a scalar tensor, got "
                              f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' of shape ' + str(tuple(value.shape))}")
    count = batch_size(inputs)
    return value.detach().reshape(()).double().cpu() * count, count


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[Batch], loss: Loss | None = None) -> float:
    """Mean cross-entropy per target position (``IGNORE_INDEX`` skipped) in eval mode, in float64;
    with ``loss``, the mean of ``loss(output, targets)`` over the batches, weighted by their samples."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for inputs, targets in batches:
            batch_total, batch_count = _batch_loss(forward(model, inputs), inputs, targets, loss)
            total += batch_total
            count += batch_count
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("the calibration set has no target positions")
    return float(total) / count


def recalibrate(model: nn.Module, batches: Sequence[Batch]) -> int:
    """Recompute BatchNorm running statistics of ``model`` over all of ``batches``, with every
    other module in eval mode (dropout off: the statistics of the network as deployed). Returns
    the number of batches used (0 without BatchNorm)."""
    def run(batch: Batch) -> None:
        for module in model.modules():
            if not isinstance(module, BATCHNORM_TYPES):
                module.training = False
        forward(model, batch[0])

    return recalibrate_batchnorm(model, batches, run, len(batches))


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum").double()


@torch.no_grad()
def _deterministic(model: nn.Module, inputs: Any) -> bool:
    """Whether two eval-mode forwards of ``model`` on ``inputs`` agree bit for bit (the condition
    for scoring candidates from a recorded prefix)."""
    first, second = tree_leaves(forward(model, inputs)), tree_leaves(forward(model, inputs))
    return len(first) == len(second) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(first, second))


@torch.no_grad()
def _candidate_losses(model: nn.Module, batches: list[Batch], candidates: list[tuple[nn.Module, int, int]],
                      reuse: PrefixReuse | None, loss: Loss | None = None) -> list[float]:
    """Calibration loss of the model with each ``(layer, current rank, candidate rank)`` applied
    alone. With ``reuse``, each batch runs once at the current ranks while the outputs of its
    modules are recorded, and each candidate recomputes only from its layer onward (the modules
    before it see the same inputs and weights)."""
    totals = [torch.zeros((), dtype=torch.float64) for _ in candidates]
    count = 0
    for inputs, targets in batches:
        if reuse is not None:
            with reuse.recording():
                forward(model, inputs)
            recorded = reuse._calls
        for i, (layer, rank, new) in enumerate(candidates):
            layer.active_rank = new
            try:
                if reuse is None:
                    logits = forward(model, inputs)
                else:
                    reuse._calls = list(recorded)
                    with reuse.replaying({layer}):
                        logits = forward(model, inputs)
            finally:
                layer.active_rank = rank
            batch_total, batch_count = _batch_loss(logits, inputs, targets, loss)
            totals[i] += batch_total
        count += batch_count
    if reuse is not None:
        reuse.close()
    return [float(total) / count for total in totals]


def _check_batches(batches: object, what: str) -> list[Batch]:
    if isinstance(batches, Dataset) or not isinstance(batches, Sequence) or not batches:
        raise ConfigTypeError(f"{what} must be a non-empty list of (inputs, targets) batches "
                              f"(see calibration_batches)")
    return list(batches)


def _first_sample(batches: list[Batch]) -> Any:
    inputs = batches[0][0]
    return tuple(x[:1] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[:1]


def greedy_front(model: nn.Module, calibration: Sequence[Batch], cost: str = "macs", step: float = 0.25, *,
                 latency: LatencyTable | None = None, latency_batch_size: int = 32, kind: str = "classification",
                 progress: Progress | None = None, loss: Loss | None = None) -> Front:
    """The accuracy–cost front of ``model`` (factorised and trained; left unchanged) in one greedy pass.

    Args:
        calibration: fixed batches to score candidates on (:func:`calibration_batches`).
        cost: what a removal saves: ``"macs"``, ``"params"`` or ``"latency"`` (of the deployed form).
        step: fraction of a layer's current rank removed per try (at least one rank).
        latency: a measured :class:`LatencyTable` for these ranks; measured here (batch
            ``latency_batch_size``) when ``cost="latency"`` and none is given. With a table every
            point also gets a latency estimate.
        kind: the task kind (``"classification"``, ``"language-model"``, ``"seq2seq"``), recorded.
        progress: called as ``progress(round, rounds)`` after every round.
        loss: ``loss(output, targets)`` scoring each batch instead of the cross-entropy of the
            logits (:data:`Loss`; for models whose output is not logits over the targets).
    """
    check_cost(cost)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ConfigError(f"step={step!r} must be a fraction in (0, 1]")
    batches = _check_batches(calibration, "calibration")
    work = copy.deepcopy(model).eval()
    layers = dict(low_rank_layers(work))
    if not layers:
        raise ConfigError("greedy_front: the model has no low-rank layers; factorize and train it first")
    for layer in layers.values():
        layer.active_rank = None
    current = rank_pattern(work)
    example = _first_sample(batches)
    readers = read_layers(work, example)
    dense_layers = readers[0]  # multiplied by from outside: dense in every artifact, never cut
    visits = {name: [current[name]] if name in dense_layers else
              visited_ranks(current[name], layer_floor(layers[name], current[name]), step) for name in layers}
    costs = structural_costs(work, example, visits, readers)
    if latency is None and cost == "latency":
        latency = measure_latency(work, example, visits, latency_batch_size)
    if latency is not None:
        missing = sorted(name for name in layers if name not in dense_layers and (
            name not in latency.layers or not set(visits[name]) <= set(latency.layers[name])))
        if missing:
            raise ConfigError(f"the latency table lacks ranks the search visits for {', '.join(missing)}")
        costs["latency"] = latency.cost_model()
    objective = costs[cost]
    has_batchnorm = bool(batchnorm_layers(work))
    dense = export(work, merge="always")

    def point(index: int, loss: float) -> FrontPoint:
        return FrontPoint(index, dict(current), round(costs["macs"](current)), round(costs["params"](current)), loss,
                          None if latency is None else costs["latency"](current))

    loss_fn = loss
    loss = calibration_loss(work, batches, loss_fn)
    if not math.isfinite(loss):
        raise ConfigError(f"the calibration loss of the model is {loss}: its outputs on the calibration batches "
                          f"are not finite (NaN or infinite inputs, weights or activations)")
    points = [point(0, loss)]
    reuse = PrefixReuse(work) if _deterministic(work, batches[0][0]) else None
    rounds = sum(len(ranks) - 1 for ranks in visits.values())  # at most: extended slices skip ranks
    round_index = 0
    while any(current[name] != ranks[-1] for name, ranks in visits.items()):
        round_index += 1
        current_cost = objective(current)
        candidates = []
        for name in layers:
            lower = visits[name][visits[name].index(current[name]) + 1:]
            savings = [(rank, current_cost - objective({**current, name: rank})) for rank in lower]
            cheaper = [(rank, saved) for rank, saved in savings if saved > 0]
            if savings:
                candidates.append((name, *(cheaper or savings)[0]))
        if any(saved > 0 for _, _, saved in candidates):  # a removal saving nothing cannot win: skip scoring it
            candidates = [c for c in candidates if c[2] > 0]
        losses = _candidate_losses(work, batches, [(layers[n], current[n], r) for n, r, _ in candidates], reuse,
                                   loss_fn)
        best = None
        for order, ((name, new, saved), candidate_loss) in enumerate(zip(candidates, losses)):
            increase = candidate_loss - loss
            key = (0, increase / saved, order) if saved > 0 else (1, increase, order)
            if best is None or key < best[0]:
                best = (key, name, new, candidate_loss)
        _, name, new, loss = best
        current[name] = new
        layers[name].active_rank = new
        if has_batchnorm:
            recalibrate(work, batches)
            loss = calibration_loss(work, batches, loss_fn)
        points.append(point(round_index, loss))
        if progress is not None:
            progress(round_index, rounds)
    if progress is not None:
        progress(rounds, rounds)
    return Front(cost, float(step), sum(batch_size(inputs) for inputs, _ in batches), count_macs(dense, example),
                 count_params(dense), points, {name: layer.max_rank for name, layer in layers.items()}, latency, kind)


def materialize(model: nn.Module, point: FrontPoint | dict[str, int], calibration: Sequence[Batch] | None = None) -> nn.Module:
    """A copy of ``model`` physically truncated to ``point``'s ranks, in eval mode, ready for
    :func:`maestro_lod.export` or :func:`~maestro_lod.deploy.write_artifacts`.

    For a model with BatchNorm whose ranks differ from ``model``'s, the copy's running statistics
    are recomputed over ``calibration`` (required then), as the search did for that point; the
    trained point keeps the trained statistics.
    """
    ranks = dict(point.ranks if isinstance(point, FrontPoint) else point)
    result = copy.deepcopy(model)
    for _, layer in low_rank_layers(result):
        layer.active_rank = None
    changed = ranks != {name: rank for name, rank in rank_pattern(result).items() if name in ranks}
    truncate_(result, ranks)
    if changed and batchnorm_layers(result):
        if calibration is None:
            raise ConfigError("this model has BatchNorm: pass the calibration batches to recompute its statistics")
        recalibrate(result, _check_batches(calibration, "calibration"))
    return result.eval()


def _run(model: nn.Module) -> Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]:
    return lambda batch: (forward(model, batch[0]), batch[1])


def evaluate_front(front: Front, model: nn.Module, val_batches: Sequence[Batch], calibration: Sequence[Batch] | None = None,
                   progress: Progress | None = None, loss: Loss | None = None) -> Front:
    """Fill every point's validation ``accuracy`` / ``val_loss`` (and ``perplexity`` for language
    tasks) by evaluating the deployed form of :func:`materialize` at that point on ``val_batches``:
    the same model the artifacts are made from, so an exported point reproduces its figure. With
    ``loss`` (see :func:`greedy_front`), ``val_loss`` is its mean and there is no accuracy."""
    val = _check_batches(val_batches, "val_batches")
    example = _first_sample(val)
    for done, point in enumerate(front.points, start=1):
        deployed = deployable(materialize(model, point, calibration), example)
        if loss is not None:
            point.val_loss = calibration_loss(deployed, val, loss)
            if progress is not None:
                progress(done, len(front.points))
            continue
        metrics = evaluate(deployed, val, _run(deployed), front.kind)
        point.accuracy, point.val_loss, point.perplexity = metrics["accuracy"], metrics["loss"], metrics.get("perplexity")
        if progress is not None:
            progress(done, len(front.points))
    return front
