"""Validation metrics of a model at its current (full) rank."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import ConfigError
from .passes import forward

LANGUAGE_KINDS = ("language-model", "seq2seq")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, run: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
             kind: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean token/sample cross-entropy and accuracy over ``batches`` in eval mode (training mode
    restored); perplexity ``exp(loss)`` too for language-model and seq2seq tasks.

    ``run(batch)`` returns ``(logits, targets)``. Positions with target ``IGNORE_INDEX`` count in
    neither the loss nor the accuracy. ``reduce`` (distributed runs, each process evaluating its
    shard) sums the tensor ``(loss sum, correct, count)`` over the processes.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = count = 0
    try:
        for batch in batches:
            logits, targets = run(batch)
            flat_logits = logits.reshape(-1, logits.shape[-1]).float()
            flat_targets = targets.reshape(-1)
            total_loss += F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX,
                                          reduction="sum").double().cpu()
            valid = flat_targets != IGNORE_INDEX
            correct += int(((flat_logits.argmax(-1) == flat_targets) & valid).sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    if reduce is not None:
        sums = reduce(torch.tensor([float(total_loss), correct, count], dtype=torch.float64))
        total_loss, correct, count = sums[0], int(sums[1]), int(sums[2])
    if count == 0:
        raise ConfigError("evaluation data has no target positions (empty dataset or all targets ignored)")
    loss = float(total_loss) / count
    metrics = {"loss": loss, "accuracy": correct / count}
    if kind in LANGUAGE_KINDS:
        metrics["perplexity"] = math.exp(loss) if loss < 700 else math.inf  # exp overflows beyond ~709
    return metrics


def evaluate_batches(model: nn.Module, batches: Iterable, kind: str) -> dict[str, float]:
    """:func:`evaluate` on ``(inputs, targets)`` batches held in memory: the model runs on each
    batch's inputs (a tensor or a tuple of them), its output scored against the batch's targets."""
    return evaluate(model, batches, lambda batch: (forward(model, batch[0]), batch[1]), kind)
