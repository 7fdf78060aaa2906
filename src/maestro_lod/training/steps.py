"""One optimisation step's forward and backward passes: the MAESTRO objective, or plain dense training.

A step computes the losses and runs ``backward``; the trainer owns zeroing, gradient unscaling
(mixed precision), clipping and the optimiser update, and asks the step for its regulariser's
gradient (:meth:`Step.add_penalty_gradients_`) once the gradients are unscaled. Each step returns
its numbers as one tensor (``loss, loss_full, loss_sampled, correct, count``) so the trainer
synchronises once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..engine.batchnorm import batchnorm_layers, running_statistics_kept
from ..engine.passes import count_correct, forward, hard_loss, soft_loss
from ..engine.reuse import PrefixReuse
from ..layers import LowRankLayer
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, sampled_ranks

Backward = Callable[[torch.Tensor], None]
Autocast = Callable[[], AbstractContextManager]


def _numbers(loss, loss_full, loss_sampled, correct, count) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=correct.device).detach()
                        for v in (loss, loss_full, loss_sampled, correct, count)])


class Step:
    """What the trainer calls once per optimisation step: ``step(inputs, targets, backward)``
    runs the forward passes and ``backward(loss)`` and returns the step's numbers.

    After each call, :attr:`passes` lists the forward passes it ran (each with a backward), as the
    ranks it lowered: ``{}`` for the model at its current ranks, ``{name: rank}`` for a sampled
    sub-model. The trainer counts training MACs from it.
    """

    passes: list[dict[str, int]] = [{}]
    shares: list[float] = [1.0]
    """For each of :attr:`passes`, the share of the batch's examples it ran on."""

    def __call__(self, inputs, targets: torch.Tensor, backward: Backward) -> torch.Tensor:
        raise NotImplementedError

    def add_penalty_gradients_(self) -> torch.Tensor:
        """Add the regulariser's gradient to ``.grad`` (after unscaling); returns its value."""
        return torch.zeros(())

    def close(self) -> None:
        """Release what the step holds on the model (recorded activations)."""


class DenseStep(Step):
    """Plain training: cross-entropy on the hard labels."""

    def __init__(self, model: nn.Module, autocast: Autocast):
        self.model = model
        self.autocast = autocast

    def __call__(self, inputs, targets: torch.Tensor, backward: Backward) -> torch.Tensor:
        with self.autocast():
            logits = forward(self.model, inputs)
            loss = hard_loss(logits, targets)
        backward(loss)
        return _numbers(loss, loss, 0.0, *count_correct(logits, targets))


class PenalisedDenseStep(DenseStep):
    """Plain training of the model at its current ranks plus a regulariser's gradient (``penalty``,
    the group lasso, or None)."""

    def __init__(self, model: nn.Module, autocast: Autocast, penalty: GroupLassoGradient | None):
        super().__init__(model, autocast)
        self.penalty = penalty

    def add_penalty_gradients_(self) -> torch.Tensor:
        return torch.zeros(()) if self.penalty is None else self.penalty.add_to_grads_()


def first_examples(inputs, outputs: torch.Tensor, targets: torch.Tensor, share: float):
    """The first ``ceil(share · batch)`` examples of a batch: of ``inputs`` (a tensor, or each tensor
    of a tuple or dict whose first dimension is the batch), of the model's ``outputs`` and of
    ``targets``, and the share of the batch they are. Refuses outputs whose first dimension is not
    the batch's."""
    batch = targets.shape[0]
    if outputs.shape[0] != batch:
        raise ValueError(f"sampled_batch={share!r} needs the model's outputs to have the batch first: outputs of "
                         f"shape {tuple(outputs.shape)} for targets of shape {tuple(targets.shape)}")
    count = math.ceil(share * batch)

    def first(value):
        return value[:count] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch else value

    if isinstance(inputs, dict):
        kept = {key: first(value) for key, value in inputs.items()}
    elif isinstance(inputs, (tuple, list)):
        kept = tuple(first(value) for value in inputs)
    else:
        kept = first(inputs)
    return kept, outputs[:count], targets[:count], count / batch


class MaestroStep(Step):
    """The MAESTRO step: the full model learns from the labels and one sampled sub-model (a draw of
    ``sampler``) learns from the full model,

    ``loss = CE(full(x), y) + w · CE(sampled(x), softmax(full(x)).detach())`` (``w`` is
    ``sampled_weight``, 1 in the paper), backward inside the
    sampled-rank scope (without ``reuse``, ``backward`` is called twice: on the full loss before
    the sampled pass, then on the sampled loss). With ``sampled_batch`` below 1 the sampled pass
    runs on the batch's first ``ceil(sampled_batch · batch)`` examples only (the loader shuffles,
    so they are a random subset), distilled from the full pass's outputs for them. The sampled
    pass leaves BatchNorm running statistics as the full pass left them. ``penalty``
    (the group lasso) adds its closed-form gradient when the trainer asks. With ``full_pass=False``
    only the sampled pass runs, on the hard labels. ``reuse`` (a :class:`PrefixReuse`) skips
    recomputing the layers before the first sampled one; a draw that lowers no rank makes the
    sampled pass identical to the full pass, whose distillation gradient is exactly zero, so the
    second pass is skipped altogether.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, LowRankLayer]], sampler: RankSampler,
                 autocast: Autocast, *, full_pass: bool = True, masked: bool = False, reuse: PrefixReuse | None = None,
                 penalty: GroupLassoGradient | None = None, sampled_batch: float = 1.0, sampled_weight: float = 1.0):
        if sampled_batch < 1 and (reuse is not None or not full_pass):
            raise ValueError(f"sampled_batch={sampled_batch!r} needs the full pass and no prefix reuse")
        self.model = model
        self.penalty = penalty
        self.layers = list(layers)
        self.by_name = dict(layers)
        self.sampler = sampler
        self.autocast = autocast
        self.full_pass = full_pass
        self.masked = masked
        self.reuse = reuse
        self.sampled_batch = sampled_batch
        self.sampled_weight = sampled_weight
        self.batchnorms = batchnorm_layers(model)
        self.second_passes_skipped = 0
        """Steps whose draw lowered no rank (no second pass needed); for profiling and tests."""

    def __call__(self, inputs, targets: torch.Tensor, backward: Backward) -> torch.Tensor:
        if not self.full_pass:
            with sampled_ranks(self.model, self.sampler, self.layers) as draw:
                self.passes, self.shares = [dict(draw)], [1.0]
                with self.autocast():
                    logits = forward(self.model, inputs)
                    loss = hard_loss(logits, targets)
                backward(loss)
            return _numbers(loss, 0.0, loss, *count_correct(logits, targets))

        with self.autocast():
            if self.reuse is None:
                full = forward(self.model, inputs)
            else:
                with self.reuse.recording():
                    full = forward(self.model, inputs)
            loss_full = hard_loss(full, targets)
        if self.reuse is None:
            # The sampled pass needs only the full pass's detached outputs, so the full loss can be
            # backpropagated now: its graph is freed before the sampled pass builds its own (about
            # half the peak activation memory), and the gradients add up to those of the sum.
            backward(loss_full)
            loss_full = loss_full.detach()
        sampled_inputs, teacher, sampled_targets, share = inputs, full, targets, 1.0
        if self.sampled_batch < 1:
            sampled_inputs, teacher, sampled_targets, share = first_examples(inputs, full, targets, self.sampled_batch)
        with running_statistics_kept(self.batchnorms), sampled_ranks(self.model, self.sampler, self.layers) as draw:
            changed = {self.by_name[name] for name, rank in draw.items() if rank < self.by_name[name].rank}
            self.passes = [{}, dict(draw)] if changed or self.reuse is None else [{}]
            self.shares = [1.0, share][:len(self.passes)]
            with self.autocast():
                if self.reuse is not None and not changed:
                    self.second_passes_skipped += 1
                    self.reuse.clear()
                    loss_sampled = soft_loss(full.detach(), full, targets, self.masked)
                elif self.reuse is not None:
                    with self.reuse.replaying(changed):
                        sampled = forward(self.model, inputs)
                    loss_sampled = soft_loss(sampled, full, targets, self.masked)
                else:
                    sampled = forward(self.model, sampled_inputs)
                    loss_sampled = soft_loss(sampled, teacher, sampled_targets, self.masked)
                weighted = self.sampled_weight * loss_sampled
                loss = loss_full + weighted
            backward(loss if self.reuse is not None else weighted)
        return _numbers(loss, loss_full, loss_sampled, *count_correct(full, targets))

    def add_penalty_gradients_(self) -> torch.Tensor:
        return torch.zeros(()) if self.penalty is None else self.penalty.add_to_grads_()

    def close(self) -> None:
        if self.reuse is not None:
            self.reuse.close()
