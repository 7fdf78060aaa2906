"""Training to a size: steer the group-lasso weight so that the exported model reaches a cost target.

``MaestroConfig(target="params=0.3")`` (or ``"macs=0.3"``) asks for an exported model with 30 % of
the dense model's parameters (MACs per sample). MAESTRO's group-lasso weight comes from a λ
scheduler composed into the method (as a sparsity scheduler is attached to a sparsifier): it
runs the end of every factorised epoch (shrinking) and says the λ of the next one.
:class:`ConstantLambda` keeps the configured ``lambda_gl`` and shrinks every ``shrink_every``
epochs. :class:`TargetLambda` replaces the hand-tuned ``lambda_gl``: after every shrinking epoch it
measures the exported cost of the model (from the rank pattern, with the deploy cost formulas of
:mod:`maestro_lod.engine.costs`) and compares it with a planned trajectory that falls
geometrically from the cost at factorisation to the target by ``target_by`` of the factorised
epochs::

    planned(j) = start · (target / start) ** min(1, j / J)     J = max(1, ceil(target_by · F))

(F factorised epochs, j the factorised epoch just finished). The weight then moves multiplicatively,

    λ ← λ · clip(exp(GAIN · (cost − planned) / planned), 1, STEP_LIMIT)

so a model larger than planned is pushed harder, and λ is never lowered before the target is met.
Shrinking answers λ with a lag of several epochs (the group lasso first has to pull a rank's norm
below ``eps_ps``), so nothing shrinks early on, λ climbs, and the model then drops far below the
plan. Easing λ there (the earlier rule, clipped at λ / STEP_LIMIT) drove it to 1e-5–1e-6 for ten
epochs, the model stalled above the target until the plan caught up, and the target was met only
in the last epochs; holding it lets the model reach the target a few epochs after it starts to
shrink and leaves the rest of the run to recover at the reached size: on LeNet-5 equal within the
seeds' spread at 0.5×, 0.2 and 0.8 points more accurate at 0.3× and 0.15× (docs/RESULTS.md,
"Asking for a size").

Once the cost is at or below the target the scheduler holds: shrinking stops and λ drops to
:data:`HOLD_LAMBDA` for the remaining epochs, so that the penalty which made the model small no
longer pulls its weights away from the task and accuracy recovers at the reached size. Where a
step to the target has to be cut short (a shrink that would overshoot it, or a gap left after the
last epoch's steps), the ranks come from the deploy package's greedy search
(:func:`maestro_lod.deploy.greedy_front` on a fixed calibration sample of the training data): of
the patterns it visits from the current ranks, the first within the target. ``gap_closed`` in the
last record says how much of the cost that final cut removed. The integrations, whose batches the
search cannot score, cut by importance instead (:func:`importance_cut`).
"""


from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import FactorizeConfig
from ..engine.costs import layer_floor, structural_costs
from ..engine.counting import count_macs, count_params
from ..engine.search import calibration_batches, greedy_front
from ..engine.targets import Target, dense_cost, parse_target
from ..errors import ConfigError
from ..export import export
from ..inject import factorize
from ..layers import low_rank_layers
from ..shrinking import shrink_, truncate_
from .options import MaestroConfig
from .protocols import SizedRun, TrainerView

GAIN = 3.0
"""How strongly λ reacts to the relative distance from the planned cost."""
STEP_LIMIT = 4.0
"""λ rises by at most this factor per epoch."""
HOLD_LAMBDA = 0.0
"""λ once the target is met. With shrinking stopped the penalty can no longer change the size; it
only pulls the kept ranks toward zero. Holding the starting weight 1e-3 instead of 0 made no
measurable difference on LeNet-5 / mnist5k (final accuracy held at 1e-3 / at 0: 96.1 % / 96.1 %
at params=0.5, 95.8 % / 95.6 % at params=0.3, one seed; docs/RESULTS.md, "Asking for a size"),
so 0: the shipped model is trained on the task alone for the remaining epochs."""
CUT_STEP = 0.1
"""Share of a layer's rank the greedy search removes per try when cutting to the target: fine
enough that the cut lands within about 1 % of the dense cost of LeNet-5's target (a step of 0.25
removes up to 10 of fc1's ranks, 0.12 of the dense model's parameters, at once)."""
CUT_CALIBRATION = 512
"""Training samples the cut scores removals on. The search walks every layer down to its minimum
rank, so its cost grows with this: on LeNet-5 at ranks 6/16/34/28/10 it took 22 s with 512
samples and 91 s with the deploy default of 2,048 (one loaded CPU thread; benchmarks/cut_time.py),
against 5–10 s per training epoch; a cut of a few percent of the cost does not need the finer ranking."""


def exported_cost(model: nn.Module, kind: str, dense: float, example_inputs: Any) -> float:
    """Cost of ``export(model)`` (``params`` or ``macs`` per sample) relative to ``dense``."""
    deployed = export(model)
    value = count_params(deployed) if kind == "params" else count_macs(deployed, example_inputs)
    return value / dense


def pattern_cost(model: nn.Module, kind: str, dense: float, example_inputs: Any):
    """A function ``ranks → relative exported cost`` for rank patterns at or below the current ranks
    of ``model`` (the deploy package's linear cost model, merges included)."""
    layers = dict(low_rank_layers(model))
    visits = {name: list(range(layer.rank, layer_floor(layer, layer.rank) - 1, -1)) for name, layer in layers.items()}
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    costs = structural_costs(model, inputs, visits)[kind]
    return lambda ranks: costs(ranks) / dense


Cut = Callable[[str, float], dict[str, int]]
"""``cut(kind, target)`` → ranks at or below the current ones whose relative exported ``kind`` cost is
within ``target`` (the cheapest reachable pattern when none is)."""


def greedy_cut(trainer: TrainerView, kind: str, target: float) -> dict[str, int]:
    """Ranks at or below the current ones whose relative exported ``kind`` cost is ≤ ``target``:
    the greedy search of :mod:`maestro_lod.engine.search` from the current ranks, on
    :data:`CUT_CALIBRATION` training samples drawn with the run's seed (the global random state is
    left as it was), taking the first pattern on its path that is within the
    target (each of its rounds removes the slice of least calibration loss per unit of cost; the
    cheapest pattern if none is within the target)."""

    batches = calibration_batches(trainer.train_data, CUT_CALIBRATION, seed=trainer.config.seed,
                                  device=next(trainer.model.parameters()).device)
    front = greedy_front(trainer.model, batches, cost=kind, step=CUT_STEP, kind=trainer.kind)
    dense = dense_cost(trainer, kind)
    feasible = [p for p in front.points if getattr(p, kind) <= target * dense * (1 + 1e-9)]
    point = min(feasible, key=lambda p: p.index) if feasible else front.points[-1]
    return dict(point.ranks)


@torch.no_grad()
def importance_cut(run: SizedRun, kind: str, target: float) -> dict[str, int]:
    """Ranks at or below the current ones whose relative exported ``kind`` cost is ≤ ``target``,
    found without data: one rank at a time, the last kept rank of least importance (the norm the
    group lasso orders, :meth:`~maestro_lod.layers.LowRankLayer.importance`) is removed, never below
    a layer's minimum rank. For training loops whose batches the greedy search cannot score."""
    cost = pattern_cost(run.model, kind, dense_cost(run, kind), run.example_inputs)
    layers = dict(low_rank_layers(run.model))
    ranks = {name: layer.rank for name, layer in layers.items()}
    floors = {name: layer_floor(layer, layer.rank) for name, layer in layers.items()}
    importance = {name: layer.importance().detach().cpu() for name, layer in layers.items()}
    while cost(ranks) > target * (1 + 1e-9):
        candidates = [(float(importance[name][ranks[name] - 1]), name) for name in ranks if ranks[name] > floors[name]]
        if not candidates:
            break
        ranks[min(candidates)[1]] -= 1
    return ranks


def reachable_minimum(run: SizedRun, kind: str, factorize_config: FactorizeConfig | None = None) -> float:
    """The smallest relative exported cost ``run``'s model can reach: every factorised layer at its
    minimum rank, the layers that are not factorised as they are (a model that has no low-rank
    layers yet counts as factorised with ``factorize_config``)."""
    model = copy.deepcopy(run.model)
    if not any(True for _ in low_rank_layers(model)):
        model = factorize(model, factorize_config)
    with torch.no_grad():
        for _, layer in low_rank_layers(model):
            layer.truncate_(min(layer.min_rank, layer.rank))
    return exported_cost(model, kind, dense_cost(run, kind), run.example_inputs)


class LambdaScheduler:
    """The group-lasso weight of a MAESTRO run and the end-of-epoch work that sets it.

    :attr:`lam` is the weight of the coming epoch's steps; :meth:`step` runs after the steps of
    every factorised epoch (shrinking, for a targeted run also cuts and measurements) and sets the
    next one. :meth:`state_dict` is all of a scheduler's state (JSON values), saved with every
    checkpoint."""

    lam: float

    def step(self, run: SizedRun, epoch: int) -> dict[str, tuple[int, int]]:
        """End factorised epoch ``epoch`` (1-based) of ``run``; returns the rank changes made
        (``{layer: (before, after)}``, as :func:`~maestro_lod.shrink_` does)."""
        raise NotImplementedError

    def epoch_extra(self) -> dict[str, Any]:
        """Numbers of the epoch just stepped, for its record (JSON values)."""
        return {}

    def summary_extra(self, run: SizedRun) -> dict[str, Any]:
        """Numbers of the whole run, for its summary (JSON values)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


class ConstantLambda(LambdaScheduler):
    """A fixed weight: progressive shrinking at ``eps_ps`` every ``shrink_every`` factorised epochs."""

    def __init__(self, lam: float, eps_ps: float, shrink_every: int = 1):
        self.lam, self.eps_ps, self.shrink_every = float(lam), float(eps_ps), int(shrink_every)

    def step(self, run: SizedRun, epoch: int) -> dict[str, tuple[int, int]]:
        if epoch % self.shrink_every != 0:
            return {}
        return shrink_(run.model, self.eps_ps, run.optimizer)


class TargetLambda(LambdaScheduler):
    """The λ of a targeted run (see the module docstring): ``lam`` is the starting weight, moved by
    :meth:`update` after every factorised epoch; :meth:`step` shrinks at ``eps_ps`` every
    ``shrink_every`` epochs but never past the target, and closes a gap left after the last of the
    ``factorised_epochs`` with ``cut`` (:data:`Cut`). ``history`` holds one entry per epoch it saw.
    ``label`` is the target as it was asked for, for the summary."""

    def __init__(self, kind: str, target: float, lam: float, factorised_epochs: int, target_by: float = 0.6,
                 gain: float = GAIN, step_limit: float = STEP_LIMIT, hold: float = HOLD_LAMBDA, *,
                 eps_ps: float = 1e-3, shrink_every: int = 1, cut: Cut | None = None, label: str | None = None):
        self.kind, self.target, self.lam = kind, float(target), float(lam)
        self.factorised_epochs, self.target_by = int(factorised_epochs), float(target_by)
        self.gain, self.step_limit, self.hold = float(gain), float(step_limit), float(hold)
        self.eps_ps, self.shrink_every, self.cut = float(eps_ps), int(shrink_every), cut
        self.label = label if label is not None else f"{kind}={target:g}"
        self.start: float | None = None
        self.met = False
        self.history: list[dict[str, Any]] = []
        self.numbers: dict[str, Any] = {}
        """The numbers of the epoch last stepped (empty before the first)."""

    @property
    def target_epoch(self) -> int:
        """The factorised epoch by which the plan reaches the target."""
        return max(1, math.ceil(self.target_by * self.factorised_epochs))

    def planned(self, epoch: int) -> float:
        """Planned cost after factorised epoch ``epoch`` (needs :attr:`start`)."""
        if self.start is None:
            raise ConfigError("the scheduler has no start cost yet")
        share = min(1.0, epoch / self.target_epoch)
        return self.start * (self.target / self.start) ** share

    def update(self, epoch: int, cost: float) -> float:
        """Record the cost after factorised epoch ``epoch`` and return the λ for the next epoch
        (:attr:`hold` from the epoch the target is first met on)."""
        if self.start is None:
            self.start = float(cost)
        planned = self.planned(epoch)
        used = self.lam
        if not self.met and cost <= self.target * (1 + 1e-9):
            self.met = True
            self.lam = self.hold
        if not self.met:
            factor = math.exp(self.gain * (cost - planned) / planned)
            self.lam = used * min(self.step_limit, max(1.0, factor))
        self.history.append({"epoch": int(epoch), "cost": float(cost), "planned": float(planned),
                             "lambda_gl": used, "next_lambda_gl": self.lam, "met": self.met})
        return self.lam

    def step(self, run: SizedRun, epoch: int) -> dict[str, tuple[int, int]]:
        """Shrink (never past the target, not at all once it is met), close what remains of the gap
        after the last epoch's steps, measure, and move λ (down to :attr:`hold` once the target is
        met)."""
        dense = dense_cost(run, self.kind)
        measure = lambda: exported_cost(run.model, self.kind, dense, run.example_inputs)  # noqa: E731
        if self.start is None:
            self.start = measure()  # the cost at factorisation: where the planned trajectory begins
        changes: dict[str, tuple[int, int]] = {}
        closed = 0.0
        if not self.met:
            if epoch % self.shrink_every == 0:
                ranks = shrink_proposal(run.model, self.eps_ps)
                cost = pattern_cost(run.model, self.kind, dense, run.example_inputs)
                if cost(ranks) < self.target:  # the shrink would overshoot: cut only to the target
                    ranks = self.cut(self.kind, self.target)
                changes.update(truncate_(run.model, ranks, run.optimizer))
            before = measure() if epoch == self.factorised_epochs else 0.0
            if before > self.target * (1 + 1e-9):  # the last epoch left a gap
                for name, (rank, after) in truncate_(run.model, self.cut(self.kind, self.target), run.optimizer).items():
                    changes[name] = (changes.get(name, (rank, after))[0], after)
                closed = before - measure()
        achieved = measure()
        planned = self.planned(epoch)
        used = self.lam
        self.update(epoch, achieved)
        self.numbers = {"lambda_gl": used, "exported_cost": achieved, "planned_cost": planned,
                        "target_met": self.met, "gap_closed": closed}
        return changes

    def epoch_extra(self) -> dict[str, Any]:
        return {"lambda_gl": self.lam, "target_cost": self.target, **self.numbers}

    def summary_extra(self, run: SizedRun) -> dict[str, Any]:
        achieved = exported_cost(run.model, self.kind, dense_cost(run, self.kind), run.example_inputs)
        return {"target": self.label, "target_cost": self.target, "achieved_cost": achieved,
                "final_lambda_gl": self.lam}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "start": self.start, "met": self.met, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lam"])
        self.start = None if state["start"] is None else float(state["start"])
        self.met = bool(state["met"])
        self.history = [dict(h) for h in state["history"]]


def shrink_proposal(model: nn.Module, threshold: float) -> dict[str, int]:
    """The ranks :func:`maestro_lod.shrink_` with ``threshold`` would leave (nothing is changed)."""
    ranks = {}
    for name, layer in low_rank_layers(model):
        small = torch.nonzero(layer.importance() <= threshold)
        first = int(small[0]) if len(small) else layer.rank
        ranks[name] = max(first, min(layer.min_rank, layer.rank))
    return ranks


def run_lambda(options: MaestroConfig, factorised_epochs: int) -> float:
    """The group-lasso weight of a run of ``factorised_epochs``: ``lambda_gl``, scaled by
    ``lambda_epochs / factorised_epochs`` when ``lambda_epochs`` says which run length it was
    chosen for."""
    if options.lambda_epochs is None or factorised_epochs < 1:
        return options.lambda_gl
    return options.lambda_gl * options.lambda_epochs / factorised_epochs


def lambda_scheduler(options: MaestroConfig, factorised_epochs: int, cut: Cut, floor: Callable[[str], float],
                     what: str) -> LambdaScheduler:
    """The scheduler ``options`` ask for: :class:`ConstantLambda` at :func:`run_lambda`, or with a
    ``target`` a :class:`TargetLambda` starting there, planned over ``factorised_epochs`` and
    cutting with ``cut``. A target below ``floor(kind)`` (the cost with every layer at its minimum
    rank, :func:`reachable_minimum`) is refused, naming ``what`` cannot reach it."""
    target: Target | None = parse_target(options.target)
    if target is None:
        return ConstantLambda(run_lambda(options, factorised_epochs), options.eps_ps, options.shrink_every)
    minimum = floor(target.kind)
    if target.value < minimum * (1 - 1e-9):
        raise ConfigError(f"target={options.target!r} is below what {what} can reach: every layer at its minimum "
                          f"rank exports at {target.kind}={minimum:.4g} of the dense model")
    return TargetLambda(target.kind, target.value, options.lambda_gl, factorised_epochs, options.target_by,
                        eps_ps=options.eps_ps, shrink_every=options.shrink_every, cut=cut, label=options.target)
