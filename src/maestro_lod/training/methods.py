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

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..layers import low_rank_layers
from ..registry import Registry
from ..regularization import GroupLassoGradient
from ..shrinking import shrink_, truncate_
from . import budget
from ..engine.evaluation import LANGUAGE_KINDS
from ..engine.reuse import PrefixReuse, prefix_reuse_supported, runs_deterministically
from .steps import DenseStep, MaestroStep, PenalisedDenseStep, Step
from ..engine.passes import forward

if TYPE_CHECKING:
    from ..config import FactorizeConfig
    from .train_config import TrainConfig
    from .loop import Trainer


class TrainingMethod:
    """Base class: plain training of the model as it is (override what a method changes).

    One instance serves one :class:`Trainer`. Methods that keep state across epochs return it from
    :meth:`state_dict` (tensors and JSON values) so that a resumed run continues exactly.
    """

    name = ""
    label = ""
    """How reports name the method (``MAESTRO``, ``Pufferfish``, ...)."""

    @classmethod
    def check_config(cls, config: "TrainConfig") -> None:
        """Refuse option combinations this method cannot run (a :class:`ConfigError`)."""

    def setup(self, trainer: "Trainer") -> None:
        """Once, when the trainer is built (model on its device, before the optimiser exists)."""

    def before_epoch(self, trainer: "Trainer", epoch: int) -> None:
        """Before the steps of ``epoch`` (1-based)."""

    def build_step(self, trainer: "Trainer") -> Step:
        """The forward/backward of one optimisation step for the model as it is now; rebuilt
        whenever the trainer's model or layers change."""
        return DenseStep(trainer.model, trainer.autocast)

    def after_steps(self, trainer: "Trainer", epoch: int) -> None:
        """After the steps of ``epoch``, before recalibration and evaluation."""

    def recalibrates(self, trainer: "Trainer") -> bool:
        """Whether BatchNorm statistics are re-estimated before evaluation (sampled sub-models or
        changed layers left them describing another model)."""
        return False

    def phase(self, trainer: "Trainer") -> str:
        """The label of the current epoch in the records."""
        return self.name

    def epoch_extra(self, trainer: "Trainer") -> dict[str, Any]:
        """Method-specific numbers of the epoch just evaluated, added to its record (JSON values)."""
        return {}

    def summary_extra(self, trainer: "Trainer") -> dict[str, Any]:
        """Method-specific numbers of the whole run, added to its summary (JSON values)."""
        return {}

    def factorize_config(self, trainer: "Trainer") -> "FactorizeConfig":
        """How the model was factorised, for rebuilding it when a checkpoint of a factorised run
        is loaded (called after :meth:`load_state_dict`): the run's ``factorize`` table by default."""
        return trainer.config.factorize_config()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


METHODS = Registry("training method")
"""Training methods by name: classes of :class:`TrainingMethod` (``METHODS.register(name)`` as a decorator)."""


@METHODS.register("dense")
class DenseMethod(TrainingMethod):
    """The model trained as it is, on the hard labels: the reference that MAESTRO is compared with."""

    name = "dense"
    label = "dense"


@METHODS.register("maestro")
class MaestroMethod(TrainingMethod):
    """MAESTRO: factorise (after ``warmup_epochs`` dense epochs), then every step trains the full model
    on the labels and one sampled sub-model distilled from it, the group lasso orders the ranks,
    and every ``shrink_every`` epochs the ranks whose tail importance fell to ``eps_ps`` are dropped."""

    name = "maestro"
    label = "MAESTRO"

    @classmethod
    def check_config(cls, config: "TrainConfig") -> None:
        if config.warmup_epochs >= config.epochs:
            raise ConfigError(f"warmup_epochs={config.warmup_epochs} leaves no factorised epoch of "
                              f"epochs={config.epochs}")

    controller: budget.BudgetController | None = None
    """The λ controller of a run with ``config.target`` (None otherwise); see :mod:`.budget`."""

    def setup(self, trainer: "Trainer") -> None:
        config = trainer.config
        target = budget.parse_target(config.target)
        if target is not None:
            kind, fraction = target
            floor = budget.reachable_minimum(trainer, kind)
            if fraction < floor * (1 - 1e-9):
                raise ConfigError(f"target={config.target!r} is below what {config.model} can reach: every layer "
                                  f"at its minimum rank exports at {kind}={floor:.4g} of the dense model")
            self.controller = budget.BudgetController(kind, fraction, config.lambda_gl,
                                                      config.epochs - config.warmup_epochs, config.target_by)
        self._penalty: GroupLassoGradient | None = None
        self._epoch_numbers: dict[str, Any] = {}
        if not trainer.factorized and config.warmup_epochs == 0:
            trainer.factorize_model()

    def before_epoch(self, trainer: "Trainer", epoch: int) -> None:
        if not trainer.factorized and epoch > trainer.config.warmup_epochs:
            trainer.factorize_model()

    def build_step(self, trainer: "Trainer") -> Step:
        if not trainer.factorized:
            return DenseStep(trainer.model, trainer.autocast)
        config = trainer.config
        layers = list(low_rank_layers(trainer.model))
        return MaestroStep(trainer.model, layers, trainer.sampler, trainer.autocast, full_pass=config.full_pass,
                           masked=trainer.kind in LANGUAGE_KINDS, reuse=self._prefix_reuse(trainer),
                           penalty=self._group_lasso(trainer, layers))

    def _group_lasso(self, trainer: "Trainer", layers: list) -> GroupLassoGradient | None:
        """The step's group-lasso gradient over ``layers`` (None for λ = 0), kept so that a
        targeted run's controller can change its weight in place."""
        config = trainer.config
        self._penalty = None
        if config.lambda_gl > 0:
            weight = config.lambda_gl if self.controller is None else self.controller.lam
            self._penalty = GroupLassoGradient([layer for _, layer in layers], weight, config.hierarchical)
        return self._penalty

    def _prefix_reuse(self, trainer: "Trainer") -> PrefixReuse | None:
        """Reuse the full pass's prefix only where it is exact: asked for (``on``), or (``auto``)
        the modules allow it and the model gives identical outputs twice on a training batch."""
        config, model = trainer.config, trainer.model
        if not config.full_pass or config.reuse_prefix == "off":
            return None
        if config.reuse_prefix == "auto":
            if prefix_reuse_supported(model) is not None:
                return None
            inputs = trainer.probe_inputs()
            with trainer.autocast():
                if not runs_deterministically(model, lambda: forward(model, inputs)):
                    return None
        return PrefixReuse(model)

    def after_steps(self, trainer: "Trainer", epoch: int) -> None:
        config = trainer.config
        if self.controller is not None:
            self._epoch_numbers = {}
            if trainer.factorized:
                self._steer(trainer, epoch)
            return
        if trainer.factorized and (epoch - config.warmup_epochs) % config.shrink_every == 0:
            shrink_(trainer.model, config.eps_ps, trainer.optimizer)

    def _steer(self, trainer: "Trainer", epoch: int) -> None:
        """A targeted run's end of epoch: shrink (never past the target, not at all once it is met),
        close what remains of the gap after the last epoch's steps, measure, and move λ (down to
        the controller's holding weight once the target is met)."""
        config, controller, model = trainer.config, self.controller, trainer.model
        dense = trainer.dense_params if controller.kind == "params" else trainer.dense_macs
        measure = lambda: budget.exported_cost(model, controller.kind, dense, trainer.example_inputs)  # noqa: E731
        if controller.start is None:
            controller.start = measure()  # the cost at factorisation: where the planned trajectory begins
        factorised_epoch = epoch - config.warmup_epochs
        closed = 0.0
        if not controller.met:
            if factorised_epoch % config.shrink_every == 0:
                ranks = budget.shrink_proposal(model, config.eps_ps)
                cost = budget.pattern_cost(model, controller.kind, dense, trainer.example_inputs)
                if cost(ranks) < controller.target:  # the shrink would overshoot: cut only to the target
                    ranks = budget.greedy_cut(trainer, controller.kind, controller.target)
                truncate_(model, ranks, trainer.optimizer)
            before = measure() if epoch == config.epochs else 0.0
            if before > controller.target * (1 + 1e-9):  # the last epoch left a gap
                truncate_(model, budget.greedy_cut(trainer, controller.kind, controller.target), trainer.optimizer)
                closed = before - measure()
        achieved = measure()
        planned = controller.planned(factorised_epoch)
        used = controller.lam
        if self._penalty is not None:
            self._penalty.weight = controller.update(factorised_epoch, achieved)  # the optimiser is untouched
        self._epoch_numbers = {"lambda_gl": used, "exported_cost": achieved, "planned_cost": planned,
                               "target_met": controller.met, "gap_closed": closed}

    def epoch_extra(self, trainer: "Trainer") -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {"lambda_gl": self.controller.lam, "target_cost": self.controller.target, **self._epoch_numbers}

    def summary_extra(self, trainer: "Trainer") -> dict[str, Any]:
        controller = self.controller
        if controller is None:
            return {}
        dense = trainer.dense_params if controller.kind == "params" else trainer.dense_macs
        model = trainer.model
        achieved = budget.exported_cost(model, controller.kind, dense, trainer.example_inputs)
        return {"target": trainer.config.target, "target_cost": controller.target, "achieved_cost": achieved,
                "final_lambda_gl": controller.lam}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])

    def recalibrates(self, trainer: "Trainer") -> bool:
        return trainer.factorized

    def phase(self, trainer: "Trainer") -> str:
        return "maestro" if trainer.factorized else "dense-warmup"


@METHODS.register("maestro-no-shrink")
class MaestroWithoutShrinking(MaestroMethod):
    """Ablation: MAESTRO's factorisation, sampled sub-models and group lasso, but progressive
    shrinking never cuts a rank during training (the ranks stay where they started)."""

    name = "maestro-no-shrink"
    label = "MAESTRO, no shrinking"

    def after_steps(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def phase(self, trainer: "Trainer") -> str:
        return self.name if trainer.factorized else "dense-warmup"


@METHODS.register("maestro-full")
class MaestroFullRanks(MaestroMethod):
    """Ablation: every step trains all ranks (no sampled sub-model): the factorised model on the
    labels plus the group lasso, with progressive shrinking as in MAESTRO."""

    name = "maestro-full"
    label = "MAESTRO, all ranks"

    def build_step(self, trainer: "Trainer") -> Step:
        if not trainer.factorized:
            return DenseStep(trainer.model, trainer.autocast)
        penalty = self._group_lasso(trainer, list(low_rank_layers(trainer.model)))
        return PenalisedDenseStep(trainer.model, trainer.autocast, penalty)

    def phase(self, trainer: "Trainer") -> str:
        return self.name if trainer.factorized else "dense-warmup"
