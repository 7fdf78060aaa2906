"""The forward pass and the losses that training, evaluation and the rank search share.

Models take one tensor or a tuple of tensors (:func:`forward`); targets equal to
``IGNORE_INDEX`` (padding of the language tasks) count neither in the losses nor in the accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX


def forward(model: nn.Module, inputs: torch.Tensor | tuple) -> torch.Tensor:
    """``model(*inputs)`` for a tuple of inputs, ``model(inputs)`` otherwise (the models' contract)."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def hard_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def soft_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, masked: bool) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``softmax(teacher_logits)`` (detached): the sampled
    sub-model distils the full model. ``masked`` skips positions whose target is ``IGNORE_INDEX``:
    the mean runs over the other positions, whose per-position losses are selected by a mask
    rather than by indexing (which would copy both ``[positions, classes]`` matrices and, on a
    GPU, wait for the device to count the selected rows)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    teacher = teacher_logits.detach().reshape(-1, logits.shape[-1]).float().softmax(-1)
    if not masked:
        return F.cross_entropy(logits, teacher)
    valid = targets.reshape(-1) != IGNORE_INDEX
    per_position = F.cross_entropy(logits, teacher, reduction="none")
    return torch.where(valid, per_position, 0.0).sum() / valid.sum()


@torch.no_grad()
def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of non-ignored positions where argmax == target, number of non-ignored positions)."""
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & valid
    return correct.sum(), valid.sum()
