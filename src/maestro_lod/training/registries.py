"""The names a training config is checked against: training methods, optimisers, LR schedules.

They live here, below every module that registers into them, so that :mod:`.train_config` can
validate names without importing the methods, optimisers and the loop that use the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..registry import Registry

Method = TypeVar("Method", bound=type)


class MethodRegistry(Registry):
    """Training methods by name. Registering a class also gives it that name (``cls.name``), so a
    method's name is spelled once, in its ``register`` decorator."""

    def register(self, name: str) -> Callable[[Method], Method]:
        def decorate(cls: Method) -> Method:
            self.add(name, cls)
            cls.name = name
            return cls

        return decorate


METHODS = MethodRegistry("training method")
"""Training methods by name: subclasses of :class:`~.methods.TrainingMethod` (``METHODS.register(name)``
as a class decorator); a name is a value of ``TrainConfig.method``."""

OPTIMIZERS = Registry("optimizer")
"""Optimisers by name (the values of ``TrainConfig.optimizer``): ``factory(params, config)``."""

SCHEDULES = Registry("LR schedule")
"""LR schedules by name (the values of ``TrainConfig.schedule``): ``factory(config, total_steps,
steps_per_epoch)`` returns the multiplier of ``config.lr`` at 0-based step ``s``, before warm-up."""
