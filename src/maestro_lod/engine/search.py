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

Faster fronts. Each exhaustive round scores one removal per layer on the whole calibration set,
so its cost grows with layers × rounds × calibration size. ``search="lazy"`` keeps every layer's
last score and re-scores only the most promising candidates (exact where a removal's score does
not fall as other layers are cut, the usual case); ``targets`` end a search as soon as every
requested budget is met; ``search="allocate"`` (:func:`allocated_front`) replaces the search by
a knapsack over each layer's error at every rank (:mod:`~maestro_lod.engine.allocate`), with a
few calibration passes in all and every point's loss measured.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import Dataset, default_collate

from ..checks import check_positive_int
from ..data import IGNORE_INDEX
from ..errors import ConfigError, ConfigTypeError
from ..export import export
from ..layers import LowRankLayer, low_rank_layers, rank_pattern
from .counting import count_macs, count_params
from ..shrinking import truncate_
from .batchnorm import BATCHNORM_TYPES, batchnorm_layers, recalibrate_batchnorm
from .evaluation import evaluate_batches
from .reuse import PrefixReuse
from .passes import forward
from .allocate import WEIGHTINGS, knapsack, layer_moments, spectrum_errors, truncation_errors
from .costs import CostModel, LatencyTable, check_cost, deployable, layer_floor, measure_latency, read_layers, structural_costs, visited_ranks
from .front import Front, FrontPoint
from .targets import check_target

CALIBRATION_SIZE = 2048
"""Samples drawn from the training data to rank candidate removals (as in the MAESTRO paper)."""
CALIBRATION_BATCH = 128
"""Calibration samples per forward pass. Small enough that a batch's activations stay in memory the
allocator reuses: with passes of 2,048 samples, a ``compress`` of the character LM spent 3 min 47 s
of its 8 min 01 s in the kernel (``time``), mapping fresh pages for each pass's activations."""

SCORING_POSITIONS = 32768
"""Target positions (a label per image, a token per window position) on which the greedy search
ranks its candidates by default: the leading calibration batches that hold at least this many. A
classifier's default 2,048 samples are all used; a language model's 2,048 windows of 64 tokens
(131,072 positions) are scored on their first 512 windows. On the character LM that gave the same
front as scoring on all of them at every budget from 0.15 to 1.0× the parameters, in a sixth of the
time; 16,384 positions were faster again but chose other points, up to 3.9 % higher perplexity
(``benchmarks/front_speed.py``). The whole calibration set still recomputes BatchNorm
statistics."""

Batch = tuple[Any, Any]
Progress = Callable[[int, int], None]
Loss = Callable[[Any, Any], torch.Tensor]
"""``loss(output, targets)``: a model's mean loss on one batch, from its output (any form: logits,
a tuple, a Hugging Face ``ModelOutput``) and the batch's second element, as a scalar tensor."""


def calibration_batches(dataset: Dataset, size: int = CALIBRATION_SIZE, batch_size: int = CALIBRATION_BATCH,
                        seed: int = 0, device: torch.device | None = None) -> list[Batch]:
    """``size`` samples of ``dataset`` (all of it if smaller) drawn with ``seed``, collated once
    into batches (on ``device`` when given): a fixed set, so every candidate is scored on the same
    data. Augmentations the dataset applies draw from a generator seeded with ``seed`` too; the
    global random state is left as it was."""
    for what, value in (("calibration size", size), ("batch_size", batch_size)):
        check_positive_int(what, value)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        batches = [default_collate([dataset[i] for i in order[start:start + batch_size]])
                   for start in range(0, len(order), batch_size)]
    if device is None:
        return batches
    move = lambda x: tuple(v.to(device) for v in x) if isinstance(x, (tuple, list)) else x.to(device)  # noqa: E731
    return [(move(inputs), move(targets)) for inputs, targets in batches]


def validation_batches(dataset: Dataset, batch_size: int = CALIBRATION_BATCH) -> list[Batch]:
    """Every sample of ``dataset`` once (in an order drawn with seed 0), collated once into batches
    of at most ``batch_size`` samples (and no more than :data:`CALIBRATION_BATCH`, for the same
    speed), to evaluate every point of a front on the same data."""
    return calibration_batches(dataset, len(dataset), min(batch_size, CALIBRATION_BATCH), seed=0)


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
                      reuse: PrefixReuse | None, loss: Loss | None = None) -> tuple[list[float], float | None]:
    """Calibration loss of the model with each ``(layer, current rank, candidate rank)`` applied
    alone, and that of the model at its current ranks where it came for free (else None). With
    ``reuse``, each batch runs once at the current ranks while the outputs of its modules are
    recorded (that pass gives the current loss), and each candidate recomputes only from its layer
    onward (the modules before it see the same inputs and weights)."""
    totals = [torch.zeros((), dtype=torch.float64) for _ in candidates]
    at_current = torch.zeros((), dtype=torch.float64)
    count = 0
    for inputs, targets in batches:
        if reuse is not None:
            with reuse.recording():
                at_current += _batch_loss(forward(model, inputs), inputs, targets, loss)[0]
        for i, (layer, rank, new) in enumerate(candidates):
            layer.active_rank = new
            try:
                if reuse is None:
                    logits = forward(model, inputs)
                else:
                    with reuse.replaying({layer}, keep=True):
                        logits = forward(model, inputs)
            finally:
                layer.active_rank = rank
            batch_total, batch_count = _batch_loss(logits, inputs, targets, loss)
            totals[i] += batch_total
        count += batch_count
        if reuse is not None:
            reuse.clear()
    if reuse is not None:
        reuse.close()
    return [float(total) / count for total in totals], float(at_current) / count if reuse is not None else None


def _check_batches(batches: object, what: str) -> list[Batch]:
    if isinstance(batches, Dataset) or not isinstance(batches, Sequence) or not batches:
        raise ConfigTypeError(f"{what} must be a non-empty list of (inputs, targets) batches "
                              f"(see calibration_batches)")
    return list(batches)


def _positions(batch: Batch, loss: Loss | None) -> int:
    """Target positions a batch's loss averages over: its targets other than ``IGNORE_INDEX``
    (one per image, one per token), or its samples with a custom ``loss``."""
    inputs, targets = batch
    if loss is None and isinstance(targets, torch.Tensor):
        return int((targets != IGNORE_INDEX).sum())
    return batch_size(inputs)


def scoring_batches(batches: list[Batch], positions: int | None, loss: Loss | None = None) -> list[Batch]:
    """The leading ``batches`` that together hold at least ``positions`` target positions (all of
    them with ``positions=None`` or when they hold fewer)."""
    if positions is None:
        return batches
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ConfigError(f"scoring_positions={positions!r} must be a positive int or None")
    total = 0
    for index, batch in enumerate(batches, start=1):
        total += _positions(batch, loss)
        if total >= positions:
            return batches[:index]
    return batches


def first_sample(batches: Sequence[Batch]) -> Any:
    """The first sample of the first batch's inputs, batch dimension kept (a tensor or a tuple)."""
    inputs = batches[0][0]
    return tuple(x[:1] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[:1]


SEARCHES = ("exhaustive", "lazy", "allocate")
"""How :func:`greedy_front` finds its points: every candidate scored every round, candidates
re-scored lazily, or ranks allocated from each layer's truncation error (no search)."""
LAZY_TOP = 3
"""Candidates a lazy round re-scores at least (besides the layer just cut)."""
LAZY_REFRESH = 8
"""A lazy search re-scores every candidate once in this many rounds."""
LAZY_SHARE = 0.02
"""A lazy round keeps several removals (in different layers, best scores first) while together
they save at most this share of the current cost, and at most a quarter of the cost still to go
to the hardest target: far from the target a round cuts several layers at once, near it one. The
rounds then grow with the cost to remove, not with layers × rank (the character LM to half the
dense parameters: 51 rounds against 99; a 12-block GPT-2-style model: 45 against 236). 0 keeps
one removal per round. At 4 % the character LM's front lost 9.7 % of perplexity at 0.2× the
parameters; at 2 % it is the exhaustive search's (``benchmarks/front_speed.py``)."""
ALLOCATION_POINTS = 24
"""Points an allocated front has besides the trained one (and the targets), evenly spread in cost."""


@dataclass
class SearchStatus:
    """What a search has done so far, for a progress display.

    ``rounds`` is an estimate while the search runs (the rounds left to the hardest target, or to
    the end of the front); ``cost`` is the current point's cost as a fraction of the dense model's
    (in the search's cost), ``loss`` its calibration loss; ``remaining`` the estimated seconds left
    (None before the first round); ``scored`` the candidates evaluated so far.
    """

    round: int
    rounds: int
    cost: float
    loss: float
    elapsed: float
    remaining: float | None
    scored: int


def _takes_status(progress: Callable[..., None]) -> bool:
    """Whether ``progress`` accepts a third positional argument (the :class:`SearchStatus`)."""
    try:
        inspect.signature(progress).bind(0, 0, None)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class _Setup:
    """The working copy of a model and everything the searches read from it once."""

    work: nn.Module
    layers: dict[str, LowRankLayer]
    start: dict[str, int]
    example: Any
    visits: dict[str, list[int]]
    costs: dict[str, CostModel]
    latency: LatencyTable | None
    dense: dict[str, float]
    has_batchnorm: bool

    def fraction(self, kind: str, ranks: dict[str, int]) -> float:
        return self.costs[kind](ranks) / self.dense[kind]

    def cheapest(self, kind: str) -> float:
        """The least cost fraction any allowed ranks reach (the cost is a sum over the layers)."""
        model = self.costs[kind]
        least = model.base + sum(min(cost.at(r) for r in self.visits[name]) for name, cost in model.layers.items())
        return least / self.dense[kind]

    def point(self, index: int, ranks: dict[str, int], loss: float) -> FrontPoint:
        return FrontPoint(index, dict(ranks), round(self.costs["macs"](ranks)), round(self.costs["params"](ranks)), loss,
                          None if self.latency is None else self.costs["latency"](ranks))


def _prepare(model: nn.Module, batches: list[Batch], cost: str, step: float, latency: LatencyTable | None,
             latency_batch_size: int, every_rank: bool = False) -> _Setup:
    """The working copy of ``model``, the ranks each layer can take (every visited rank of
    ``step``, or with ``every_rank`` each rank down to the floor, restricted to a latency table's
    ranks), the cost models, and the dense model's costs. Runs the model on one sample only."""
    work = copy.deepcopy(model).eval()
    layers = dict(low_rank_layers(work))
    if not layers:
        raise ConfigError("greedy_front: the model has no low-rank layers; factorize and train it first")
    for layer in layers.values():
        layer.active_rank = None
    current = rank_pattern(work)
    example = first_sample(batches)
    readers = read_layers(work, example)
    dense_layers = readers[0]  # multiplied by from outside: dense in every artifact, never cut
    visits = {}
    for name in layers:
        floor = layer_floor(layers[name], current[name])
        if name in dense_layers:
            visits[name] = [current[name]]
        elif every_rank:
            allowed = None if latency is None or name not in latency.layers else set(latency.layers[name])
            visits[name] = [r for r in range(current[name], floor - 1, -1)
                            if allowed is None or r in allowed or r == current[name]]
        else:
            visits[name] = visited_ranks(current[name], floor, step)
    costs = structural_costs(work, example, visits, readers)
    if latency is None and cost == "latency":
        latency = measure_latency(work, example, visits, latency_batch_size)
    if latency is not None:
        missing = sorted(name for name in layers if name not in dense_layers and (
            name not in latency.layers or not set(visits[name]) <= set(latency.layers[name])))
        if missing:
            raise ConfigError(f"the latency table lacks ranks the search visits for {', '.join(missing)}")
        costs["latency"] = latency.cost_model()
    deployed_dense = export(work, merge="always")
    dense = {"macs": float(count_macs(deployed_dense, example)), "params": float(count_params(deployed_dense))}
    if latency is not None:
        dense["latency"] = float(latency.dense)
    return _Setup(work, layers, current, example, visits, costs, latency, dense, bool(batchnorm_layers(work)))


def _check_targets(targets: Mapping[str, float] | None, setup: _Setup) -> dict[str, float]:
    """The budget targets (kind → fraction of the dense cost) the search stops at, each checked
    against the cheapest ranks it can reach (every layer at its floor); ``max_drop`` is accepted
    but cannot stop a search (it is answered on the evaluated front)."""
    if targets is None:
        return {}
    if not isinstance(targets, Mapping):
        raise ConfigTypeError(f"targets must be a mapping such as {{'params': 0.5}}, got {type(targets).__name__}")
    budgets = {}
    for key, value in targets.items():
        value = check_target(key, value).value
        if key == "max_drop":
            continue
        if key not in setup.costs:
            raise ConfigError(f"target {key}={value:g} needs a latency table (pass latency=...)")
        reachable = setup.cheapest(key)
        if value < reachable - 1e-12:
            raise ConfigError(f"target {key}={value:g} is unreachable: with every layer at its minimum rank the "
                              f"model's {key} are {reachable:.4g} of the dense model's")
        budgets[key] = value
    return budgets


def _kept(candidates: list[tuple[str, int, float]], keys: Mapping[str, tuple], allowance: float) -> list[str]:
    """The removals one round keeps: the best-ranked candidate by ``keys`` (lower is better), then
    the next ones that save cost while the savings together stay within ``allowance``."""
    ranked = sorted((c for c in candidates if c[0] in keys), key=lambda c: keys[c[0]])
    kept, saved = [ranked[0][0]], ranked[0][2]
    for name, _, saving in ranked[1:]:
        if saving <= 0 or saved + saving > allowance:
            break
        kept.append(name)
        saved += saving
    return kept


def _met(budgets: dict[str, float], setup: _Setup, ranks: dict[str, int]) -> set[str]:
    return {key for key, value in budgets.items() if setup.fraction(key, ranks) <= value + 1e-12}



def _finite(loss: float) -> float:
    """``loss`` if it is finite, else a one-line error: the model's outputs are not."""
    if not math.isfinite(loss):
        raise ConfigError(f"the calibration loss of the model is {loss}: its outputs on the calibration batches "
                          f"are not finite (NaN or infinite inputs, weights or activations)")
    return loss


def greedy_front(model: nn.Module, calibration: Sequence[Batch], cost: str = "macs", step: float = 0.25, *,
                 latency: LatencyTable | None = None, latency_batch_size: int = 32, kind: str = "classification",
                 progress: Callable[..., None] | None = None, search: str = "exhaustive",
                 targets: Mapping[str, float] | None = None, top: int = LAZY_TOP, refresh: int = LAZY_REFRESH,
                 share: float = LAZY_SHARE, weighting: str = "measured", points: int = ALLOCATION_POINTS,
                 loss: Loss | None = None, scoring_positions: int | None = SCORING_POSITIONS) -> Front:
    """The accuracy–cost front of ``model`` (factorised and trained; left unchanged) in one greedy pass.

    Args:
        calibration: fixed batches to score candidates on (:func:`calibration_batches`).
        cost: what a removal saves: ``"macs"``, ``"params"`` or ``"latency"`` (of the deployed form).
        step: fraction of a layer's current rank removed per try (at least one rank).
        latency: a measured :class:`LatencyTable` for these ranks; measured here (batch
            ``latency_batch_size``) when ``cost="latency"`` and none is given. With a table every
            point also gets a latency estimate.
        kind: the task kind (``"classification"``, ``"language-model"``, ``"seq2seq"``), recorded.
        progress: called as ``progress(round, rounds)`` after every round, or as
            ``progress(round, rounds, status)`` with a :class:`SearchStatus` when it takes three
            arguments; ``rounds`` is an estimate that can change between calls.
        search: ``"exhaustive"`` scores a removal in every layer each round; ``"lazy"`` keeps each
            layer's last score and re-scores only the ``top`` most promising candidates (and the
            layers just cut), more while a stale score still ranks among the removals the round
            keeps, and all of them every ``refresh`` rounds; a lazy round keeps the best-scored
            removals of several layers while together they save at most ``share`` of the current
            cost and a quarter of the cost left to the hardest target (at least one removal; 0:
            one per round, as the exhaustive search); ``"allocate"`` chooses ranks without a search
            (:func:`allocated_front`, with its ``weighting`` and ``points``; ``step`` there sets
            only the probe of ``weighting="probe"``).
        targets: budgets such as ``{"params": 0.5}`` (fractions of the dense model's cost): the
            search stops once every one is met, and a target below what the smallest ranks cost
            raises a ConfigError before any calibration pass. ``max_drop`` is accepted and stops nothing.
        loss: ``loss(output, targets)`` scoring each batch instead of the cross-entropy of the
            logits (:data:`Loss`; for models whose output is not logits over the targets).
        scoring_positions: the greedy searches score candidates, and record each point's
            calibration loss, on the leading calibration batches holding at least this many target
            positions (:func:`scoring_batches`; None: on all of them). BatchNorm statistics are
            always recomputed on the whole set.
    """
    check_cost(cost)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ConfigError(f"step={step!r} must be a fraction in (0, 1]")
    if search not in SEARCHES:
        raise ConfigError(f"search={search!r} is not one of {', '.join(SEARCHES)}")
    for what, value in (("top", top), ("refresh", refresh)):
        check_positive_int(what, value)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ConfigError(f"share={share!r} must be a fraction in [0, 1)")
    batches = _check_batches(calibration, "calibration")
    if search == "allocate":
        return allocated_front(model, batches, cost, latency=latency, latency_batch_size=latency_batch_size,
                               kind=kind, progress=progress, targets=targets, weighting=weighting, points=points,
                               step=step, loss=loss)
    scoring = scoring_batches(batches, scoring_positions, loss)
    setup = _prepare(model, batches, cost, step, latency, latency_batch_size)
    budgets = _check_targets(targets, setup)
    work, layers, visits, objective = setup.work, setup.layers, setup.visits, setup.costs[cost]
    current = dict(setup.start)
    goals = budgets or ({cost: setup.cheapest(cost)} if search == "lazy" and share else {})  # what the rounds approach
    report = _Reporter(progress, setup, goals, cost, sum(len(ranks) - 1 for ranks in visits.values()))

    loss_fn = loss
    found: list[FrontPoint] = []
    reuse = PrefixReuse(work) if _deterministic(work, scoring[0][0]) else None

    def record(value: float) -> float:
        """The current ranks become the next point, with calibration loss ``value``."""
        found.append(setup.point(len(found), current, _finite(value)))
        if len(found) > 1:
            report(len(found) - 1, current, value)
        return value

    # the current point's loss; None while it waits for the next round's recorded pass to measure it
    loss: float | None = None if reuse is not None else record(calibration_loss(work, scoring, loss_fn))
    stale: dict[str, tuple] = {}  # lazy: each layer's last score (ranking key) for its current candidate
    round_index = 0
    met = _met(budgets, setup, current)
    goal = budgets[cost] * setup.dense[cost] if cost in budgets else setup.cheapest(cost) * setup.dense[cost]
    while any(current[name] != ranks[-1] for name, ranks in visits.items()) and not (budgets and met == set(budgets)):
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
        order = {name: i for i, (name, _, _) in enumerate(candidates)}

        def key(name: str, saved: float, increase: float) -> tuple:
            return (0, increase / saved, order[name]) if saved > 0 else (1, increase, order[name])

        measured: dict[str, float] = {}

        def score(chosen: list[tuple[str, int, float]]) -> set[str]:
            """Score ``chosen`` (their keys into ``stale``); the names scored."""
            nonlocal loss
            losses, at_current = _candidate_losses(work, scoring, [(layers[n], current[n], r) for n, r, _ in chosen],
                                                   reuse, loss_fn)
            if loss is None:
                loss = record(at_current)
            report.scored += len(chosen)
            for (name, _, saved), candidate_loss in zip(chosen, losses):
                measured[name] = candidate_loss
                stale[name] = key(name, saved, candidate_loss - loss)
            return {name for name, _, _ in chosen}

        full = search == "exhaustive" or (round_index - 1) % refresh == 0 or candidates[0][2] <= 0
        allowance = 0.0 if search == "exhaustive" else min(share * current_cost, (current_cost - goal) / 4)
        waiting = [] if full else sorted((c for c in candidates if c[0] in stale), key=lambda c: stale[c[0]])
        chosen = candidates if full else [c for c in candidates if c[0] not in stale] + waiting[:top]
        fresh: set[str] = set()
        while chosen:  # score, then re-score the stale scores the round would keep until it keeps fresh ones only
            fresh |= score(chosen)
            kept = _kept(candidates, stale, allowance)
            chosen = [c for c in candidates if c[0] in kept and c[0] not in fresh]
        ranks = {name: rank for name, rank, _ in candidates}
        for name in kept:
            current[name] = ranks[name]
            layers[name].active_rank = current[name]
            stale.pop(name, None)  # its next candidate is another slice
        if setup.has_batchnorm:
            recalibrate(work, batches)
        if len(kept) == 1 and not setup.has_batchnorm:
            loss = record(measured[kept[0]])
        else:  # measured by the next round's recorded pass, or now when there is none
            loss = None if reuse is not None else record(calibration_loss(work, scoring, loss_fn))
        met |= _met(budgets, setup, current)
    if loss is None:
        loss = record(calibration_loss(work, scoring, loss_fn))
    report.finish(round_index, current, loss)
    return Front(cost, float(step), sum(batch_size(inputs) for inputs, _ in batches), round(setup.dense["macs"]),
                 round(setup.dense["params"]), found, {name: layer.max_rank for name, layer in layers.items()},
                 setup.latency, kind, {} if search == "exhaustive" else {"search": search})


class _Reporter:
    """Calls ``progress`` after every round with the rounds done and an estimate of the total (to
    the hardest target, from the cost saved per round so far, or to the end of the front)."""

    def __init__(self, progress: Callable[..., None] | None, setup: _Setup, budgets: dict[str, float], cost: str,
                 rounds: int):
        self.progress, self.setup, self.budgets, self.cost, self.rounds = progress, setup, budgets, cost, rounds
        self.with_status = progress is not None and _takes_status(progress)
        self.started = time.perf_counter()
        self.scored = 0
        self.start = {key: setup.costs[key](setup.start) for key in budgets}

    def total(self, done: int, ranks: dict[str, int]) -> int:
        if not self.budgets:
            return self.rounds
        needed = 0
        for key, value in self.budgets.items():
            now, target = self.setup.costs[key](ranks), value * self.setup.dense[key]
            saved = self.start[key] - now
            if now > target + 1e-12:
                needed = max(needed, math.ceil(done * (now - target) / saved) if done and saved > 0 else self.rounds)
        return max(done, min(self.rounds, done + needed))

    def __call__(self, done: int, ranks: dict[str, int], loss: float, total: int | None = None) -> None:
        if self.progress is None:
            return
        total = self.total(done, ranks) if total is None else total
        if not self.with_status:
            self.progress(done, total)
            return
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / done * (total - done) if done else None
        self.progress(done, total, SearchStatus(done, total, self.setup.fraction(self.cost, ranks), loss, elapsed,
                                                remaining, self.scored))

    def finish(self, done: int, ranks: dict[str, int], loss: float) -> None:
        self(done, ranks, loss, done)


def _probe_rank(setup: _Setup, name: str, step: float) -> int:
    """The rank a layer is probed at: one greedy slice (``step``) below its start, at an allowed rank."""
    start, floor = setup.start[name], setup.visits[name][-1]
    wanted = max(floor, start - max(1, int(step * start)))
    return max(r for r in setup.visits[name] if r <= wanted)


def _probe_ranks(setup: _Setup, name: str) -> list[int]:
    """The ranks a layer's loss curve is measured at: halving from its start down to its floor."""
    start, floor = setup.start[name], setup.visits[name][-1]
    wanted = visited_ranks(start, floor, 0.5)[1:]
    return sorted({max(r for r in setup.visits[name] if r <= w) for w in wanted}, reverse=True)


def _interpolation(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """Piecewise-linear, non-decreasing ``f`` through ``points`` (x, y) sorted by x (a running
    maximum of y), constant beyond the last point."""
    xs, ys, top = [], [], -math.inf
    for x, y in points:
        top = max(top, y)
        if xs and x <= xs[-1]:
            ys[-1] = top
            continue
        xs.append(x)
        ys.append(top)

    def f(x: float) -> float:
        if x <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return ys[-1]

    return f


def allocated_front(model: nn.Module, calibration: Sequence[Batch], cost: str = "macs", *,
                    latency: LatencyTable | None = None, latency_batch_size: int = 32, kind: str = "classification",
                    progress: Callable[..., None] | None = None, targets: Mapping[str, float] | None = None,
                    weighting: str = "measured", points: int = ALLOCATION_POINTS, budgets: Sequence[float] = (),
                    errors: str = "truncation", whiten: bool = True, step: float = 0.25,
                    loss: Loss | None = None) -> Front:
    """The accuracy–cost front of ``model`` from rank allocation instead of a search
    (:mod:`~maestro_lod.engine.allocate`): each layer's squared output error at every rank from its
    factors (``errors="truncation"``: of its own leading ranks; ``"spectrum"``: the singular values
    of its product), on the calibration inputs' second moments (``whiten``) or on the weights,
    weighted by ``weighting`` (``"probe"``: the calibration-loss increase of truncating that layer
    alone by one ``step`` slice, per unit of its error there; ``"measured"``: the loss increase of
    truncating that layer alone measured at ranks halving down to its floor, interpolated in the
    error between them, as each layer's own curve; ``"relative"``; ``"none"``); then, for
    each budget, the ranks of least summed weighted error within it (exact dynamic programming over
    a cost grid, :func:`~maestro_lod.engine.allocate.knapsack`), every rank down to each layer's
    floor allowed (only the latency table's ranks for latency).

    The budgets are the ``targets`` (fractions of the dense model's cost, each in its own kind;
    unreachable ones refused before any calibration pass) or, without targets, ``points`` fractions
    evenly spread between the trained model's cost and the cheapest reachable one, plus the
    fractions in ``budgets`` (of ``cost``) that are reachable. Every point's
    calibration loss is measured on the model at its ranks (BatchNorm statistics recomputed), so
    the front is as honest as a searched one; point 0 is the trained model. Passes over the
    calibration set: one for the trained loss, one for the second moments, one for the probes
    (with prefix reuse, like one greedy round), and one per point.
    """
    check_cost(cost)
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if errors not in ("truncation", "spectrum"):
        raise ConfigError(f"errors={errors!r} is not one of truncation, spectrum")
    check_positive_int("points", points)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ConfigError(f"step={step!r} must be a fraction in (0, 1]")
    batches = _check_batches(calibration, "calibration")
    setup = _prepare(model, batches, cost, step, latency, latency_batch_size, every_rank=True)
    goals = _check_targets(targets, setup)
    work, layers = setup.work, setup.layers
    cut = [name for name in layers if len(setup.visits[name]) > 1]
    if goals:
        asked = list(goals.items())
    else:
        high, low = setup.fraction(cost, setup.start), setup.cheapest(cost)
        asked = [(cost, low + (high - low) * k / points) for k in range(points)]
        asked += [(cost, float(b)) for b in budgets if low - 1e-12 <= b < high]
    report = _Reporter(progress, setup, {}, cost, 3 + len(asked))
    loss_fn = loss
    loss = _finite(calibration_loss(work, batches, loss_fn))
    report(1, setup.start, loss)
    moments = layer_moments(work, {name: layers[name] for name in cut}, batches) if whiten else {}
    report(2, setup.start, loss)
    measure = truncation_errors if errors == "truncation" else spectrum_errors
    full = {name: measure(layers[name], moments.get(name)) for name in cut}
    reuse = PrefixReuse(work) if weighting in ("probe", "measured") and _deterministic(work, batches[0][0]) else None
    curves: dict[str, Callable[[float], float]] = {}
    if weighting == "probe":
        probes = {name: _probe_rank(setup, name, step) for name in cut}
        losses, _ = _candidate_losses(work, batches, [(layers[n], setup.start[n], probes[n]) for n in cut], reuse,
                                      loss_fn)
        report.scored += len(cut)
        rises = {name: candidate - loss for name, candidate in zip(cut, losses)}
        positive = sorted(v for v in rises.values() if v > 0)
        least = 1e-2 * positive[len(positive) // 2] if positive else 1e-12
        weights = {name: max(rises[name], least) / max(float(full[name][probes[name]]), 1e-300) for name in cut}
    elif weighting == "measured":
        probes = {name: _probe_ranks(setup, name) for name in cut}
        tries = [(n, r) for n in cut for r in probes[n]]
        losses, _ = _candidate_losses(work, batches, [(layers[n], setup.start[n], r) for n, r in tries], reuse,
                                      loss_fn)
        report.scored += len(tries)
        for name in cut:
            measured = sorted((float(full[name][r]), candidate - loss) for (n, r), candidate in zip(tries, losses)
                              if n == name)
            curves[name] = _interpolation([(0.0, 0.0)] + measured)
        weights = dict.fromkeys(cut, 1.0)
    elif weighting == "relative":
        weights = {name: 1.0 / max(float(full[name][0]), 1e-300) for name in cut}
    else:
        weights = dict.fromkeys(cut, 1.0)
    if reuse is not None:
        reuse.close()
    report(3, setup.start, loss)
    error_table = [[curves[n](float(full[n][r])) if n in curves else weights[n] * float(full[n][r])
                    for r in setup.visits[n]] for n in cut]
    chosen: list[dict[str, int]] = []
    for key, value in asked:
        table = [[setup.costs[key].layers[n].at(r) for r in setup.visits[n]] for n in cut]
        fixed = setup.costs[key](setup.start) - sum(row[0] for row in table)
        budget = value * setup.dense[key] - fixed
        choice = knapsack(table, error_table, [budget * (1 - 1e-12)])[0]
        if choice is None:  # rounding of a target met only at the floor
            choice = [min(range(len(row)), key=row.__getitem__) for row in table]
        chosen.append({**setup.start, **{n: setup.visits[n][k] for n, k in zip(cut, choice)}})
    if goals and len(chosen) > 1:  # several targets: one point meeting them all
        chosen.append({n: min(pattern[n] for pattern in chosen) for n in setup.start})
    unique = []
    for pattern in sorted(chosen, key=lambda p: -setup.costs[cost](p)):
        if pattern not in unique and pattern != setup.start:
            unique.append(pattern)
    front_points = [setup.point(0, setup.start, loss)]
    for index, pattern in enumerate(unique, start=1):
        for name, layer in layers.items():
            layer.active_rank = pattern[name]
        if setup.has_batchnorm:
            recalibrate(work, batches)
        front_points.append(setup.point(index, pattern, calibration_loss(work, batches, loss_fn)))
        report(3 + index, pattern, front_points[-1].calibration_loss, 3 + len(unique))
    report.finish(3 + len(unique), unique[-1] if unique else setup.start, front_points[-1].calibration_loss)
    metadata = {"search": "allocate", "weighting": weighting, "errors": errors, "whiten": whiten,
                "weights": {name: weights[name] for name in cut}}
    return Front(cost, float(step), sum(batch_size(inputs) for inputs, _ in batches), round(setup.dense["macs"]),
                 round(setup.dense["params"]), front_points, {name: layer.max_rank for name, layer in layers.items()},
                 setup.latency, kind, metadata)


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


def evaluate_front(front: Front, model: nn.Module, val_batches: Sequence[Batch], calibration: Sequence[Batch] | None = None,
                   progress: Progress | None = None, loss: Loss | None = None) -> Front:
    """Fill every point's validation ``accuracy`` / ``val_loss`` (and ``perplexity`` for language
    tasks) by evaluating the deployed form of :func:`materialize` at that point on ``val_batches``:
    the same model the artifacts are made from, so an exported point reproduces its figure. With
    ``loss`` (see :func:`greedy_front`), ``val_loss`` is its mean and there is no accuracy."""
    val = _check_batches(val_batches, "val_batches")
    example = first_sample(val)
    for done, point in enumerate(front.points, start=1):
        deployed = deployable(materialize(model, point, calibration), example)
        if loss is not None:
            point.val_loss = calibration_loss(deployed, val, loss)
            if progress is not None:
                progress(done, len(front.points))
            continue
        metrics = evaluate_batches(deployed, val, front.kind)
        point.accuracy, point.val_loss, point.perplexity = metrics["accuracy"], metrics["loss"], metrics.get("perplexity")
        if progress is not None:
            progress(done, len(front.points))
    return front
