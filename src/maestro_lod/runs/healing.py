"""Healing a compressed model with a short fine-tune on the run's training data, two ways.

* **Per point** (``compress --heal N``): each exported point is fine-tuned at its fixed ranks for
  ``N`` epochs (every step at all of its ranks, on the labels, no regulariser, nothing cut): what
  SVD-LLM and ASVD do with LoRA, one healed model per budget.
* **The whole front** (``compress --heal-maestro N``): before the search, ``N`` epochs of MAESTRO
  itself on the factorised model: ordered dropout over the ranks (the independent sampler, so
  joint truncations of several layers are trained) with the sampled sub-model distilled from the
  full-rank model's outputs, no group lasso and no shrinking. One short fine-tune then heals every
  point of the front at once; the search runs on the healed model.

Both use the run's recipe (optimiser, batch size, seed) at a tenth of its learning rate, constant:
the model starts close to a trained one, and a full learning rate first undoes what it knows. Each
point healed either way records its validation accuracy (or loss) before and after, and the
seconds the healing took.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..canonical import canonicalize_
from ..data import TaskData
from ..engine.costs import deployable
from ..engine.evaluation import evaluate_batches
from ..engine.front import FrontPoint
from ..engine.search import Batch, first_sample, materialize
from ..errors import ConfigError
from ..training import TrainConfig, fit

LR_SCALE = 0.1
"""Healing's learning rate as a share of the run's."""
EPOCH_LIMIT = 1000


def check_epochs(what: str, epochs: int | None) -> None:
    """``epochs`` is None (no healing) or a positive int; else a one-line error naming it."""
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= EPOCH_LIMIT:
        raise ConfigError(f"{what}={epochs!r} must be a whole number of epochs from 1 to {EPOCH_LIMIT}")


def healing_config(config: TrainConfig, epochs: int, method: str, options: dict[str, Any]) -> TrainConfig:
    """The run's recipe for ``epochs`` of ``method`` at :data:`LR_SCALE` × its learning rate,
    constant, on the CPU, with no dense reference."""
    return TrainConfig.from_dict({**config.to_dict(), "epochs": epochs, "method": method, "method_options": options,
                                  "lr": config.lr * LR_SCALE, "schedule": "constant", "warmup_steps": 0,
                                  "reference": "none", "device": "cpu", "world_size": 1})


def _train(model: nn.Module, data: TaskData, config: TrainConfig) -> tuple[nn.Module, float]:
    """A copy of ``model`` trained with ``config``, and the seconds it took. The copy's factor
    pairs are re-factorised by plain SVD first (same function): a whitened pair carries the inverse
    of its input's scale, huge along directions the data barely spans, and SGD on it diverges
    within a few steps."""
    started = time.perf_counter()
    balanced = canonicalize_(copy.deepcopy(model))
    trained = fit(balanced, data.train, data.val, config, kind=data.kind).model.eval()
    return trained, time.perf_counter() - started


def heal_front(model: nn.Module, data: TaskData, config: TrainConfig, epochs: int) -> tuple[nn.Module, float]:
    """``epochs`` of MAESTRO on the factorised ``model`` (ordered dropout with self-distillation,
    no group lasso, no shrinking); returns the healed model and the seconds it took."""
    options = {"lambda_gl": 0.0, "eps_ps": 0.0, "sampler": "independent"}
    return _train(model, data, healing_config(config, epochs, "maestro", options))


def fine_tune(model: nn.Module, data: TaskData, config: TrainConfig, epochs: int) -> tuple[nn.Module, float]:
    """``epochs`` of plain training of ``model`` at its fixed ranks; returns it and the seconds."""
    options = {"lambda_gl": 0.0, "eps_ps": 0.0}
    return _train(model, data, healing_config(config, epochs, "maestro-full", options))


def _scores(model: nn.Module, validation: list[Batch], kind: str) -> dict[str, float]:
    deployed = deployable(model, first_sample(validation))
    metrics = evaluate_batches(deployed, validation, kind)
    return {key: metrics[key] for key in ("accuracy", "loss", "perplexity") if metrics.get(key) is not None}


@dataclass
class PointHealing:
    """Called by :func:`~maestro_lod.deploy.compress.compress_model` on each exported point:
    ``(materialised model, point) → (model to export, record for point.json)``.

    With ``epochs`` the point is fine-tuned (:func:`fine_tune`) and its validation figures before
    and after are recorded; with ``front`` (the search ran on a model healed by
    :func:`heal_front` from ``unhealed``), the record compares the unhealed model at the same ranks
    with the healed point."""

    data: TaskData
    config: TrainConfig
    validation: list[Batch]
    calibration: list[Batch]
    epochs: int | None = None
    front: dict[str, Any] | None = None
    unhealed: nn.Module | None = None

    def __call__(self, model: nn.Module, point: FrontPoint) -> tuple[nn.Module, dict[str, Any]]:
        record: dict[str, Any] = {}
        before = _scores(model, self.validation, self.data.kind)
        if self.front is not None and self.unhealed is not None:
            unhealed = materialize(self.unhealed, point, self.calibration)
            record["front"] = {**self.front, "before": _scores(unhealed, self.validation, self.data.kind),
                               "after": before}
        if self.epochs is not None:
            model, seconds = fine_tune(model, self.data, self.config, self.epochs)
            record["point"] = {"epochs": self.epochs, "seconds": round(seconds, 2), "before": before,
                               "after": _scores(model, self.validation, self.data.kind)}
        return model, record


def describe(folder: str, record: dict[str, Any]) -> list[str]:
    """One line per healing in ``record`` (a :class:`PointHealing` record) for the terminal."""
    lines = []
    for what, label in (("front", "--heal-maestro"), ("point", "--heal")):
        if what not in record:
            continue
        entry = record[what]
        metric = "perplexity" if "perplexity" in entry["after"] else "accuracy" if "accuracy" in entry["after"] else "loss"
        show: Callable[[float], str] = (lambda v: f"{100 * v:.2f}%") if metric == "accuracy" else (lambda v: f"{v:.4g}")
        lines.append(f"{folder}: {label} {entry['epochs']} epoch(s), {entry['seconds']:.1f} s: {metric} "
                     f"{show(entry['before'][metric])} -> {show(entry['after'][metric])}")
    return lines
