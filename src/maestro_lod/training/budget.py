"""Training to a size: steer the group-lasso weight so that the exported model reaches a cost target.

``TrainConfig.target = "params=0.3"`` (or ``"macs=0.3"``) asks for an exported model with 30 % of
the dense model's parameters (MACs per sample). :class:`BudgetController` replaces the hand-tuned
``lambda_gl``: after every shrinking epoch it measures the exported cost of the model (from the
rank pattern, with the deploy cost formulas of :mod:`maestro_lod.engine.costs`) and compares it
with a planned trajectory that falls geometrically from the cost at factorisation to the target by
``target_by`` of the factorised epochs::

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

Once the cost is at or below the target the controller holds: shrinking stops and λ drops to
:data:`HOLD_LAMBDA` for the remaining epochs, so that the penalty which made the model small no
longer pulls its weights away from the task and accuracy recovers at the reached size. Where a
step to the target has to be cut short (a shrink that would overshoot it, or a gap left after the
last epoch's steps), the ranks come from the deploy package's greedy search
(:func:`maestro_lod.deploy.greedy_front` on a fixed calibration sample of the training data): of
the patterns it visits from the current ranks, the first within the target. ``gap_closed`` in the
last record says how much of the cost that final cut removed.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..engine.costs import layer_floor, structural_costs
from ..engine.counting import count_macs, count_params
from ..engine.search import calibration_batches, greedy_front
from ..errors import ConfigError
from ..export import export
from ..inject import factorize
from ..layers import low_rank_layers

if TYPE_CHECKING:
    from .loop import Trainer

TARGET_COSTS = ("params", "macs")
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


def parse_target(value: Any) -> tuple[str, float] | None:
    """``"params=0.3"`` → ``("params", 0.3)``; None stays None; anything else is a one-line ConfigError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"target={value!r} must be a string COST=FRACTION such as 'macs=0.3' "
                          f"(COST: {', '.join(TARGET_COSTS)})")
    key, sep, number = value.partition("=")
    key = key.strip()
    if not sep or key not in TARGET_COSTS:
        raise ConfigError(f"target={value!r}: unknown cost {key!r}; use {' or '.join(f'{k}=FRACTION' for k in TARGET_COSTS)}")
    try:
        fraction = float(number)
    except ValueError:
        raise ConfigError(f"target={value!r}: {number.strip()!r} is not a number") from None
    if not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ConfigError(f"target={value!r}: the fraction must be in (0, 1] (of the dense model's {key})")
    return key, fraction


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


def greedy_cut(trainer: "Trainer", kind: str, target: float) -> dict[str, int]:
    """Ranks at or below the current ones whose relative exported ``kind`` cost is ≤ ``target``:
    the greedy search of :mod:`maestro_lod.engine.search` from the current ranks, on
    :data:`CUT_CALIBRATION` training samples drawn with the run's seed (the global random state is
    left as it was), taking the first pattern on its path that is within the
    target (each of its rounds removes the slice of least calibration loss per unit of cost; the
    cheapest pattern if none is within the target)."""

    device = next(trainer.model.parameters()).device
    sample = calibration_batches(trainer.train_data, CUT_CALIBRATION, seed=trainer.config.seed)
    batches = [(tuple(x.to(device) for x in inputs) if isinstance(inputs, (tuple, list)) else inputs.to(device),
                targets.to(device)) for inputs, targets in sample]
    front = greedy_front(trainer.model, batches, cost=kind, step=CUT_STEP, kind=trainer.kind)
    dense = trainer.dense_params if kind == "params" else trainer.dense_macs
    feasible = [p for p in front.points if getattr(p, kind) <= target * dense * (1 + 1e-9)]
    point = min(feasible, key=lambda p: p.index) if feasible else front.points[-1]
    return dict(point.ranks)


def reachable_minimum(trainer: "Trainer", kind: str) -> float:
    """The smallest relative exported cost the run's model can reach: every factorised layer at its
    minimum rank, the layers that are not factorised as they are."""
    model = trainer.model
    work = copy.deepcopy(model) if trainer.factorized else factorize(copy.deepcopy(model),
                                                                     trainer.config.factorize_config())
    with torch.no_grad():
        for _, layer in low_rank_layers(work):
            layer.truncate_(min(layer.min_rank, layer.rank))
    dense = trainer.dense_params if kind == "params" else trainer.dense_macs
    return exported_cost(work, kind, dense, trainer.example_inputs)


class BudgetController:
    """The λ controller of a targeted run (see the module docstring). ``history`` holds one entry
    per epoch it saw; :meth:`state_dict` is all of its state (JSON values)."""

    def __init__(self, kind: str, target: float, lam: float, factorised_epochs: int, target_by: float = 0.6,
                 gain: float = GAIN, step_limit: float = STEP_LIMIT, hold: float = HOLD_LAMBDA):
        self.kind, self.target, self.lam = kind, float(target), float(lam)
        self.factorised_epochs, self.target_by = int(factorised_epochs), float(target_by)
        self.gain, self.step_limit, self.hold = float(gain), float(step_limit), float(hold)
        self.start: float | None = None
        self.met = False
        self.history: list[dict[str, Any]] = []

    @property
    def target_epoch(self) -> int:
        """The factorised epoch by which the plan reaches the target."""
        return max(1, math.ceil(self.target_by * self.factorised_epochs))

    def planned(self, epoch: int) -> float:
        """Planned cost after factorised epoch ``epoch`` (needs :attr:`start`)."""
        if self.start is None:
            raise ConfigError("the controller has no start cost yet")
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
