"""The numeric precision of the training loop: how forward passes run, how the loss is
backpropagated and how the optimiser steps.

:class:`~maestro_lod.training.Trainer` calls the same five hooks in every step, whatever the
precision::

    with precision.autocast():          # forward passes (every pass of a MAESTRO step, evaluation)
        loss = ...
    precision.backward(loss)
    # ... gradients averaged over the processes (still scaled)
    precision.unscale_(optimizer)       # true gradients from here on
    # ... group-lasso gradient added, non-finite check, clipping
    precision.step(optimizer)

- :class:`Precision`: float32, plain PyTorch: ``loss.backward()`` and ``optimizer.step()``, no
  autocast, nothing to unscale, no state.
- :class:`AutocastPrecision`: forward passes under :func:`torch.autocast` (``bfloat16`` by default:
  its exponent range is float32's, so the gradients need no scaling); backward and step as float32.
- :class:`ScaledPrecision`: a :class:`torch.amp.GradScaler` around another precision's forward
  passes (float16 autocast with :func:`float16_mixed`, what ``amp = true`` runs): the loss is
  scaled before the backward, the gradients are unscaled in :meth:`~Precision.unscale_` (so the
  group-lasso gradient, the non-finite check and clipping see true gradients) and the scaler
  skips the update of a step with non-finite gradients and adapts its scale. Its
  :meth:`~Precision.state_dict` is the scaler's, stored under a checkpoint's ``"scaler"`` key
  (``None`` for the precisions without a scaler).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import ConfigError


class Precision:
    """Float32: every hook is what plain PyTorch does without mixed precision. The base of the
    other precisions, which override the hooks they change."""

    scaler: torch.amp.GradScaler | None = None
    """The gradient scaler (``None`` without one)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The scope of forward passes."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``."""
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the gradients of ``optimizer``'s parameters into true gradients, in place."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the parameters from their (unscaled) gradients."""
        optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint stores to continue exactly (``None``: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state_dict` output (a state of another precision is ignored)."""

    def with_scaler(self, scaler: torch.amp.GradScaler | None) -> "Precision":
        """This precision's forward passes with loss scaling by ``scaler`` (without, for ``None``)."""
        return self if scaler is None else ScaledPrecision(scaler, self)


class AutocastPrecision(Precision):
    """Forward passes under ``torch.autocast(device_type, dtype)``; backward, step and state as float32."""

    def __init__(self, device_type: str, dtype: torch.dtype = torch.bfloat16):
        self.device_type, self.dtype = device_type, dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)


class ScaledPrecision(Precision):
    """Loss scaling with ``scaler`` (a :class:`torch.amp.GradScaler`) around the forward passes of
    ``inner`` (float32 by default; float16 autocast in :func:`float16_mixed`)."""

    def __init__(self, scaler: torch.amp.GradScaler, inner: Precision | None = None):
        self.scaler = scaler
        self.inner = inner or Precision()

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.inner.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)  # skipped when a gradient is not finite
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:  # a checkpoint of a run without a scaler leaves this one as built
            self.scaler.load_state_dict(state)

    def with_scaler(self, scaler: torch.amp.GradScaler | None) -> Precision:
        return self.inner.with_scaler(scaler)


def float16_mixed(device_type: str = "cuda", scaler: torch.amp.GradScaler | None = None) -> ScaledPrecision:
    """Float16 autocast with a gradient scaler (``torch.amp.GradScaler(device_type)`` unless given)."""
    return ScaledPrecision(scaler or torch.amp.GradScaler(device_type), AutocastPrecision(device_type, torch.float16))


def build_precision(amp: bool, device: torch.device) -> Precision:
    """The precision of a run: :func:`float16_mixed` on CUDA for ``amp``, float32 otherwise
    (``amp`` on another device is a :class:`~maestro_lod.ConfigError`)."""
    if not amp:
        return Precision()
    if device.type != "cuda":
        raise ConfigError(f"amp=true needs a CUDA device, but the run uses {device.type}")
    return float16_mixed("cuda")
