"""Training to a size: steer the group-lasso weight so that the exported model reaches a cost target.

``TrainConfig.target = "params=0.3"`` (or ``"macs=0.3"``) asks for an exported model with 30 % of
the dense model's parameters (MACs per sample). :class:`BudgetController` replaces the hand-tuned
``lambda_gl``: after every shrinking epoch it measures the exported cost of the model (from the
rank pattern, with the deploy cost formulas of :mod:`maestro_lod.deploy.costs`) and compares it
with a planned trajectory that falls geometrically from the cost at factorisation to the target by
``target_by`` of the factorised epochs::

    planned(j) = start · (target / start) ** min(1, j / J)     J = max(1, ceil(target_by · F))

(F factorised epochs, j the factorised epoch just finished). The weight then moves multiplicatively,

    λ ← clip(λ · exp(GAIN · (cost − planned) / planned), λ / STEP_LIMIT, λ · STEP_LIMIT)

so a model larger than planned is pushed harder and one ahead of plan is eased off. Once the cost
is at or below the target the controller holds: λ stays, shrinking stops. A shrink that would
overshoot the target removes ranks in order of importance (the smallest trailing-rank norm first)
only until the target is met, and after the last epoch's steps any remaining gap is closed the same
way, so the final model meets the target (``gap_closed`` in the last record says how much was cut).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..export import export
from ..inject import factorize, low_rank_layers, rank_pattern
from ..metrics import count_macs, count_params

if TYPE_CHECKING:
    from .loop import Trainer

TARGET_COSTS = ("params", "macs")
GAIN = 3.0
"""How strongly λ reacts to the relative distance from the planned cost."""
STEP_LIMIT = 4.0
"""λ changes by at most this factor per epoch."""


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
    from ..deploy.costs import layer_floor, structural_costs  # the deploy package imports training modules

    layers = dict(low_rank_layers(model))
    visits = {name: list(range(layer.rank, layer_floor(layer, layer.rank) - 1, -1)) for name, layer in layers.items()}
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    costs = structural_costs(model, inputs, visits)[kind]
    return lambda ranks: costs(ranks) / dense


def importance_cut(model: nn.Module, cost, target: float, start: dict[str, int] | None = None) -> dict[str, int]:
    """Ranks reached from ``start`` (the current ranks) by removing trailing ranks one at a time,
    the least important first (importance of a layer's last rank alone), until ``cost(ranks) ≤ target``
    or every layer is at its floor."""
    layers = dict(low_rank_layers(model))
    ranks = dict(start or rank_pattern(model))
    tails = {name: layer.importance() for name, layer in layers.items()}
    while cost(ranks) > target:
        open_layers = [n for n, layer in layers.items() if ranks[n] > min(layer.min_rank, layer.rank)]
        if not open_layers:
            break
        name = min(open_layers, key=lambda n: (float(tails[n][ranks[n] - 1]), n))
        ranks[name] -= 1
    return ranks


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
                 gain: float = GAIN, step_limit: float = STEP_LIMIT):
        self.kind, self.target, self.lam = kind, float(target), float(lam)
        self.factorised_epochs, self.target_by = int(factorised_epochs), float(target_by)
        self.gain, self.step_limit = float(gain), float(step_limit)
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
        """Record the cost after factorised epoch ``epoch`` and return the λ for the next epoch."""
        if self.start is None:
            self.start = float(cost)
        planned = self.planned(epoch)
        used = self.lam
        if cost <= self.target * (1 + 1e-9):
            self.met = True
        if not self.met:
            factor = math.exp(self.gain * (cost - planned) / planned)
            self.lam = used * min(self.step_limit, max(1.0 / self.step_limit, factor))
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
