"""Typed records of a run: what one step, one epoch and the whole run measured.

The loop, the progress display, the plots, the run directory and the command line all read these,
so their fields are the contract between them. Epoch records and the summary are also read-only
mappings over exactly the keys written to ``metrics.jsonl`` and ``summary.json`` (``record["val_loss"]``
works as well as ``record.val_loss``), and ``from_dict`` reads those files back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch


class StepStats(NamedTuple):
    """The numbers one optimisation step reports (sums over its batch: ``correct`` of ``count``
    positions; the losses are the batch means)."""

    loss: float
    loss_full: float
    loss_sampled: float
    correct: float
    count: float
    penalty: float

    @classmethod
    def from_tensor(cls, numbers: torch.Tensor, penalty: torch.Tensor) -> "StepStats":
        """From a step's ``(loss, loss_full, loss_sampled, correct, count)`` tensor and the penalty
        value, with a single device synchronisation."""
        return cls(*torch.cat([numbers, penalty.reshape(1).to(numbers)]).tolist())

    @property
    def objective(self) -> float:
        """The minimised objective: the step's losses plus the penalty."""
        return self.loss + self.penalty


class EpochTotals:
    """Running sums of the :class:`StepStats` of one epoch."""

    def __init__(self) -> None:
        self.steps = 0
        self.sums = StepStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.sums = StepStats(*(a + b for a, b in zip(self.sums, stats)))

    @property
    def accuracy(self) -> float:
        """Accuracy of the full model over the positions seen so far."""
        return self.sums.correct / max(self.sums.count, 1)

    def means(self) -> dict[str, float]:
        """The epoch's mean losses and accuracy, under their record names."""
        steps, sums = max(self.steps, 1), self.sums
        return {"train_loss": sums.objective / steps, "train_loss_full": sums.loss_full / steps,
                "train_loss_sampled": sums.loss_sampled / steps, "train_penalty": sums.penalty / steps,
                "train_accuracy": self.accuracy}


class _RecordMapping(Mapping):
    """Read-only mapping view of a dataclass record over its :meth:`to_dict` keys."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _with_extra(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from a record dict: its fields, everything else as ``extra``."""
    known = {f.name for f in fields(cls)} - {"extra"}
    values = {key: value for key, value in data.items() if key in known}
    return {**values, "extra": {key: value for key, value in data.items() if key not in known}}


@dataclass(eq=False)
class EpochRecord(_RecordMapping):
    """One line of ``metrics.jsonl``: an epoch after its steps, shrinking, recalibration and
    evaluation. ``val_perplexity`` is set for language tasks only; ``extra`` holds what a training
    method adds (written after the standard keys)."""

    epoch: int
    phase: str
    train_loss: float
    train_loss_full: float
    train_loss_sampled: float
    train_penalty: float
    train_accuracy: float
    lr: float
    val_loss: float
    val_accuracy: float
    ranks: dict[str, int]
    total_rank: int
    params: int
    macs: int
    train_time: float
    epoch_time: float
    val_perplexity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this epoch, keys in the order of ``metrics.jsonl``."""
        data = {"epoch": self.epoch, "phase": self.phase, "train_loss": self.train_loss,
                "train_loss_full": self.train_loss_full, "train_loss_sampled": self.train_loss_sampled,
                "train_penalty": self.train_penalty, "train_accuracy": self.train_accuracy, "lr": self.lr,
                "val_loss": self.val_loss, "val_accuracy": self.val_accuracy}
        if self.val_perplexity is not None:
            data["val_perplexity"] = self.val_perplexity
        data.update({"ranks": dict(self.ranks), "total_rank": self.total_rank, "params": self.params,
                     "macs": self.macs, "train_time": self.train_time, "epoch_time": self.epoch_time})
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpochRecord":
        """Read a record back from its JSON object (a checkpoint's history or ``metrics.jsonl``)."""
        return cls(**_with_extra(cls, data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_dict() == dict(other)


@dataclass(eq=False)
class RunSummary(_RecordMapping):
    """``summary.json``: the run in numbers (final metrics, ranks before → after, cost of the
    trained and of the exported model against the dense one, time). ``extra`` holds what a
    training method or the caller adds."""

    model: str
    data: str
    method: str
    kind: str
    epochs: int
    device: str
    final_accuracy: float
    final_loss: float
    initial_ranks: dict[str, int]
    final_ranks: dict[str, int]
    params: int
    dense_params: int
    macs: int
    dense_macs: int
    exported_params: int
    exported_macs: int
    train_time: float
    final_perplexity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_total_rank(self) -> int:
        return sum(self.initial_ranks.values())

    @property
    def final_total_rank(self) -> int:
        return sum(self.final_ranks.values())

    @property
    def params_ratio(self) -> float:
        return self.params / self.dense_params

    @property
    def macs_ratio(self) -> float:
        return self.macs / max(self.dense_macs, 1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``summary.json``, keys in their documented order."""
        data = {"model": self.model, "data": self.data, "method": self.method, "kind": self.kind,
                "epochs": self.epochs, "device": self.device, "final_accuracy": self.final_accuracy,
                "final_loss": self.final_loss}
        if self.final_perplexity is not None:
            data["final_perplexity"] = self.final_perplexity
        data.update({"initial_ranks": dict(self.initial_ranks), "final_ranks": dict(self.final_ranks),
                     "initial_total_rank": self.initial_total_rank, "final_total_rank": self.final_total_rank,
                     "params": self.params, "dense_params": self.dense_params, "params_ratio": self.params_ratio,
                     "macs": self.macs, "dense_macs": self.dense_macs, "macs_ratio": self.macs_ratio,
                     "exported_params": self.exported_params, "exported_macs": self.exported_macs,
                     "train_time": self.train_time})
        data.update(self.extra)
        return data
