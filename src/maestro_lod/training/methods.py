"""Training methods as strategies that the one training loop calls at fixed points.

:class:`~maestro_lod.training.Trainer` runs every method through the same epoch::

    method.before_epoch     (e.g. factorise the model once a dense warm-up is over)
    steps                   (method.build_step gives the forward/backward of one step)
    method.after_steps      (e.g. progressive shrinking)
    BatchNorm recalibration (when method.recalibrates)
    evaluation, record, callbacks, checkpoint

so checkpoints, resumption, the run directory, progress, plots and the summary work for every method
without it knowing about them. A method is registered under a name in :data:`METHODS`; that name is
``TrainConfig.method`` and a choice of ``maestro-lod train --method``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import FactorizeConfig
from ..engine.evaluation import LANGUAGE_KINDS
from ..engine.passes import forward
from ..engine.reuse import PrefixReuse, prefix_reuse_supported, runs_deterministically
from ..errors import ConfigError
from ..layers import low_rank_layers
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, build_sampler
from . import budget
from .options import MaestroConfig, MethodConfig
from .protocols import TrainerView
from .registries import METHODS
from .step_macs import rank_cost_scales
from .steps import DenseStep, MaestroStep, Step
from .train_config import TrainConfig


class TrainingMethod:
    """Base class: plain training of the model as it is (override what a method changes).

    A method declares the class of its options (:attr:`config_class`; ``TrainConfig.method_options``
    is an instance of it) and gets its name from its registration in :data:`METHODS`. One instance
    serves one :class:`~.loop.Trainer`. Methods that keep state across epochs return it from
    :meth:`state_dict` (tensors and JSON values) so that a resumed run continues exactly.
    """

    name: ClassVar[str] = ""
    """The registered name (set by ``METHODS.register``)."""
    label: ClassVar[str] = ""
    """How reports name the method (``MAESTRO``, ``Pufferfish``, ...)."""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    """The class of the method's options."""

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse option combinations this method cannot run (a :class:`ConfigError`); its own
        options were checked by :attr:`config_class` already."""

    @classmethod
    def build_sampler(cls, options: MethodConfig, generator: torch.Generator) -> RankSampler:
        """The rank sampler of the run, drawing from ``generator``. Methods without sampled passes
        get the default one: nothing draws from it, and its generator is saved with every
        checkpoint all the same, so checkpoints of every method hold the same state."""
        return build_sampler("single", generator)

    def setup(self, trainer: TrainerView) -> None:
        """Once, when the trainer is built (model on its device, before the optimiser exists)."""

    def before_epoch(self, trainer: TrainerView, epoch: int) -> None:
        """Before the steps of ``epoch`` (1-based)."""

    def build_step(self, trainer: TrainerView) -> Step:
        """The forward/backward of one optimisation step for the model as it is now; rebuilt
        whenever the trainer's model or layers change."""
        return DenseStep(trainer.model, trainer.autocast)

    def after_steps(self, trainer: TrainerView, epoch: int) -> None:
        """After the steps of ``epoch``, before recalibration and evaluation."""

    def recalibrates(self, trainer: TrainerView) -> bool:
        """Whether BatchNorm statistics are re-estimated before evaluation (sampled sub-models or
        changed layers left them describing another model)."""
        return False

    def phase(self, trainer: TrainerView) -> str:
        """The label of the current epoch in the records."""
        return self.name

    def epoch_extra(self, trainer: TrainerView) -> dict[str, Any]:
        """Method-specific numbers of the epoch just evaluated, added to its record (JSON values)."""
        return {}

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        """Method-specific numbers of the whole run, added to its summary (JSON values)."""
        return {}

    def factorize_config(self, trainer: TrainerView) -> FactorizeConfig:
        """How the model was factorised, for rebuilding it when a checkpoint of a factorised run
        is loaded (called after :meth:`load_state_dict`): the run's ``factorize`` table by default."""
        return trainer.config.factorize_config()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


@METHODS.register("dense")
class DenseMethod(TrainingMethod):
    """The model trained as it is, on the hard labels: the reference that MAESTRO is compared with."""

    label = "dense"


@METHODS.register("maestro")
class MaestroMethod(TrainingMethod):
    """MAESTRO: factorise (after ``warmup_epochs`` dense epochs), then every step trains the full model
    on the labels and one sampled sub-model distilled from it, the group lasso orders the ranks,
    and at the end of every factorised epoch the λ scheduler (:mod:`.budget`) shrinks: every
    ``shrink_every`` epochs the ranks whose tail importance fell to ``eps_ps`` are dropped, and with
    a ``target`` the weight is steered so the exported model reaches it."""

    label = "MAESTRO"
    config_class = MaestroConfig
    steers: ClassVar[bool] = True
    """Whether the method runs its scheduler after every factorised epoch, so a ``target`` can be
    reached (the ablation that never shrinks does not)."""

    scheduler: budget.LambdaScheduler
    """The group-lasso weight and the end-of-epoch shrinking (set up with the trainer)."""

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        options = config.method_options
        if options.warmup_epochs >= config.epochs:
            raise ConfigError(f"warmup_epochs={options.warmup_epochs} leaves no factorised epoch of "
                              f"epochs={config.epochs}")
        if options.target is not None and not cls.steers:
            raise ConfigError(f"target={options.target!r} {MaestroConfig.exclusive['target']}, not {config.method!r}")

    @classmethod
    def build_sampler(cls, options: MaestroConfig, generator: torch.Generator) -> RankSampler:
        return build_sampler(options.sampler, generator, fraction=options.sample_fraction)

    def setup(self, trainer: TrainerView) -> None:
        config = trainer.config
        options: MaestroConfig = config.method_options
        self.scheduler = budget.lambda_scheduler(
            options, config.epochs - options.warmup_epochs, lambda kind, target: budget.greedy_cut(trainer, kind, target),
            lambda kind: budget.reachable_minimum(trainer, kind, config.factorize_config()), config.model)
        self._penalty: GroupLassoGradient | None = None
        if not trainer.factorized and options.warmup_epochs == 0:
            trainer.factorize_model()

    def before_epoch(self, trainer: TrainerView, epoch: int) -> None:
        if not trainer.factorized and epoch > trainer.config.method_options.warmup_epochs:
            trainer.factorize_model()

    def build_step(self, trainer: TrainerView) -> Step:
        if not trainer.factorized:
            return DenseStep(trainer.model, trainer.autocast)
        options = trainer.config.method_options
        layers = list(low_rank_layers(trainer.model))
        return MaestroStep(trainer.model, layers, trainer.sampler, trainer.autocast, full_pass=options.full_pass,
                           masked=trainer.kind in LANGUAGE_KINDS, reuse=self._prefix_reuse(trainer),
                           penalty=self._group_lasso(trainer, layers), sampled_batch=options.sampled_batch,
                           sampled_weight=options.sampled_weight)

    def _group_lasso(self, trainer: TrainerView, layers: list) -> GroupLassoGradient | None:
        """The step's group-lasso gradient over ``layers`` at the scheduler's weight (None for
        ``lambda_gl`` = 0), kept so that the scheduler can change its weight in place."""
        options = trainer.config.method_options
        self._penalty = None
        if options.lambda_gl > 0:
            self._penalty = GroupLassoGradient([layer for _, layer in layers], self.scheduler.lam, options.hierarchical,
                                               rank_cost_scales(trainer.model, trainer.example_inputs,
                                                                [name for name, _ in layers], options.group_weights))
        return self._penalty

    def _prefix_reuse(self, trainer: TrainerView) -> PrefixReuse | None:
        """Reuse the full pass's prefix only where it is exact: asked for (``on``), or (``auto``)
        the modules allow it and the model gives identical outputs twice on a training batch; never
        when the sampled pass sees only part of the batch."""
        options, model = trainer.config.method_options, trainer.model
        if not options.full_pass or options.reuse_prefix == "off" or options.sampled_batch < 1:
            return None
        if options.reuse_prefix == "auto":
            if prefix_reuse_supported(model) is not None:
                return None
            inputs = trainer.probe_inputs()
            with trainer.autocast():
                if not runs_deterministically(model, lambda: forward(model, inputs)):
                    return None
        return PrefixReuse(model)

    def after_steps(self, trainer: TrainerView, epoch: int) -> None:
        if not trainer.factorized:
            return  # a dense warm-up epoch
        self.scheduler.step(trainer, epoch - trainer.config.method_options.warmup_epochs)
        if self._penalty is not None:
            self._penalty.weight = self.scheduler.lam  # the optimiser is untouched

    def epoch_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return self.scheduler.epoch_extra()

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return self.scheduler.summary_extra(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state.get("controller", {}))

    def recalibrates(self, trainer: TrainerView) -> bool:
        return trainer.factorized

    def phase(self, trainer: TrainerView) -> str:
        return "maestro" if trainer.factorized else "dense-warmup"
