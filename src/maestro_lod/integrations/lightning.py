"""MAESTRO in Lightning (extra ``lightning``): :class:`MaestroCallback` and :func:`maestro_loss`.

The callback factorises the LightningModule in ``setup`` (before ``configure_optimizers``), adds
the group lasso's gradient in ``on_before_optimizer_step`` (once per optimiser step: after
gradient accumulation and mixed-precision unscaling), shrinks at the end of every
``shrink_every``-th training epoch with every optimiser's state sliced in place, recalibrates
BatchNorm statistics before validation and logs ranks, parameters and MACs. Checkpoints carry the
ranks in the factors' shapes (resized before loading; a checkpoint of a module factorised in other
layers is refused naming them) and the sampler's and the λ scheduler's state. With a size
``target`` the group-lasso weight is steered each epoch as in ``maestro-lod train --target``
(:mod:`maestro_lod.training.budget`; a gap left after the last epoch is cut by importance).

In ``training_step``, replace ``loss = loss_fn(self(x), y)`` by
``loss = maestro_loss(self, x, y, loss_fn)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("maestro_lod.integrations.lightning needs the lightning extra: "
                      "pip install 'maestro-lod[lightning]'") from error

from ..config import FactorizeConfig
from ..engine.batchnorm import batchnorm_layers, recalibrate_batchnorm, running_statistics_kept
from ..engine.counting import count_macs, count_params
from ..engine.passes import forward, soft_loss
from ..errors import CheckpointError, ConfigError
from ..layers import low_rank_layers, rank_pattern
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, sampled_ranks
from ..training.budget import LambdaScheduler, importance_cut, lambda_scheduler, reachable_minimum
from ..training.options import MaestroConfig, check_int
from ..training.steps import first_examples
from . import (LoopRun, ensure_factorized, fit_state_dict_ranks, generator_state, maestro_config, make_sampler,
               restore_generator_state, sampler_name, underlying_optimizer)

__all__ = ["MaestroCallback", "maestro_loss"]


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class MaestroCallback(pl.Callback):
    """Train the LightningModule with MAESTRO.

    Args:
        lambda_gl, hierarchical: group-lasso weight (1e-3) and form (hierarchical).
        eps_ps: shrinking threshold on the rank importance (1e-3).
        shrink_every: shrink after every this many training epochs (1; 0 = never).
        sampler: a registered sampler name (``"independent"``) or a :class:`RankSampler`;
            ``sample_fraction`` for ``"fixed"``; ``seed`` seeds a named sampler.
        sampled_batch: the share of each batch the sampled pass trains on (its first examples; 1 =
            all of it): 0.25 makes a step cost about 1.25 passes instead of 2.
        sampled_weight: the weight of the sampled pass's distillation loss (1, the paper's).
        warmup_epochs: epochs of plain training of the full-rank factorised model first.
        target, target_by: a size to reach instead of a fixed λ (``"params=0.3"``, ``"macs=0.3"``:
            the exported model's cost as a fraction of the dense model's), planned to be reached
            after ``target_by`` of the epochs after the warm-up (the Trainer's ``max_epochs``).
        config: a :class:`~maestro_lod.training.MaestroConfig` holding the options above instead
            of the keywords (its ``shrink_every`` ≥ 1; the keywords then stay at their defaults).
        factorize: a :class:`FactorizeConfig` (or dict) for the module; None = every supported
            layer (a module that is already factorised is kept as it is).
        bn_recal_batches: training batches that recalibrate BatchNorm before validation (20; 0 = off).
        inputs: picks the model input out of a training batch (default: ``batch[0]``), for
            BatchNorm recalibration and MAC counting.
    """

    def __init__(self, lambda_gl: float = 1e-3, eps_ps: float = 1e-3, *, hierarchical: bool = True,
                 shrink_every: int = 1, sampler: str | RankSampler = "independent", sample_fraction: float = 0.5,
                 sampled_batch: float = 1.0, sampled_weight: float = 1.0, seed: int = 0, warmup_epochs: int = 0,
                 target: str | None = None, target_by: float = 0.6,
                 config: MaestroConfig | None = None, factorize: FactorizeConfig | dict | None = None,
                 bn_recal_batches: int = 20, inputs: Callable[[Any], Any] = _first):
        check_int("shrink_every", shrink_every, 0)
        check_int("seed", seed, 0)
        check_int("bn_recal_batches", bn_recal_batches, 0)
        self.config = maestro_config(config, lambda_gl=lambda_gl, eps_ps=eps_ps, hierarchical=hierarchical,
                                     shrink_every=max(shrink_every, 1), sampler=sampler_name(sampler),
                                     sample_fraction=sample_fraction, sampled_batch=sampled_batch,
                                     sampled_weight=sampled_weight,
                                     warmup_epochs=warmup_epochs, target=target, target_by=target_by)
        self.shrinks_at_all = shrink_every > 0 or config is not None
        if self.config.target is not None and not self.shrinks_at_all:
            raise ConfigError(f"target={self.config.target!r} is reached by shrinking; give shrink_every >= 1")
        self.sampler = make_sampler(sampler, self.config, seed)
        self.factorize = factorize
        self.bn_recal_batches = bn_recal_batches
        self.inputs = inputs
        self.penalty: GroupLassoGradient | None = None
        self.scheduler: LambdaScheduler | None = None
        """The group-lasso weight and the end-of-epoch shrinking, built at the first training batch
        (a target's reachable minimum in MACs needs an example input)."""
        self.shrinks: list[dict[str, tuple[int, int]]] = []
        self._example: Any = None
        self._hook = None
        self._run: LoopRun | None = None
        self._scheduler_state: dict[str, Any] | None = None

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(True for _ in low_rank_layers(pl_module)):
            ensure_factorized(pl_module, self.factorize)
        self.penalty = GroupLassoGradient([layer for _, layer in low_rank_layers(pl_module)], self.config.lambda_gl,
                                          self.config.hierarchical)
        self.batchnorms = batchnorm_layers(pl_module)
        self._run = LoopRun(pl_module, lambda: self._optimizer(trainer), lambda: self._example_on(pl_module))
        if self._hook is None:
            def resize_before_load(module, state_dict, prefix, *args):
                check_same_factorisation(module, state_dict, prefix)
                fit_state_dict_ranks(module, state_dict, prefix, "checkpoint")
            self._hook = pl_module.register_load_state_dict_pre_hook(resize_before_load)

    def _build_scheduler(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LambdaScheduler:
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 0
        if self.config.target is not None and epochs <= self.config.warmup_epochs:
            raise ConfigError(f"target={self.config.target!r} is planned over the epochs after the warm-up; give the "
                              f"Trainer max_epochs > warmup_epochs={self.config.warmup_epochs}")
        run = self._run
        return lambda_scheduler(self.config, epochs - self.config.warmup_epochs,
                                lambda kind, target: importance_cut(run, kind, target),
                                lambda kind: reachable_minimum(run, kind), type(pl_module).__name__)

    @staticmethod
    def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        optimizers = [underlying_optimizer(opt) for opt in trainer.optimizers]
        if len(optimizers) > 1:
            raise ConfigError(f"MaestroCallback shrinks with one optimiser; the module has {len(optimizers)}")
        return optimizers[0] if optimizers else None

    def _example_on(self, pl_module: pl.LightningModule) -> Any:
        return None if self._example is None else move_data_to_device(self._example, pl_module.device)

    def in_warmup(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.config.warmup_epochs

    # ---- training -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._example is None:
            example = self.inputs(batch)
            self._example = example[:1] if isinstance(example, torch.Tensor) else example
        if self.scheduler is None:
            self.scheduler = self._build_scheduler(trainer, pl_module)
            if self._scheduler_state is not None:
                self.scheduler.load_state_dict(self._scheduler_state)
            self.penalty.weight = self.scheduler.lam

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.penalty is None or self.config.lambda_gl == 0 or self.in_warmup(trainer):
            return
        self._run.weigh_group_lasso(self.penalty, self.config.group_weights)
        value = self.penalty.add_to_grads_()
        pl_module.log("maestro/penalty", float(value), on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.shrinks_at_all and not self.in_warmup(trainer):
            changes = self.scheduler.step(self._run, trainer.current_epoch + 1 - self.config.warmup_epochs)
            if changes:
                self.shrinks.append(changes)
            self.penalty.weight = self.scheduler.lam
        metrics = {f"maestro/{name}": float(value) for name, value in self.scheduler.epoch_extra().items()}
        for name, value in {**metrics, **self.cost_metrics(pl_module)}.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)

    @torch.no_grad()
    def cost_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        ranks = rank_pattern(pl_module)
        metrics = {f"maestro/rank/{name}": float(rank) for name, rank in ranks.items()}
        metrics["maestro/total_rank"] = float(sum(ranks.values()))
        metrics["maestro/params"] = float(count_params(pl_module))
        if self._example is not None:
            was_training = pl_module.training
            pl_module.eval()
            try:
                example = move_data_to_device(self._example, pl_module.device)
                metrics["maestro/macs"] = float(count_macs(pl_module, example))
            finally:
                pl_module.train(was_training)
        return metrics

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.bn_recal_batches == 0 or trainer.state.fn != "fit":
            return
        loader = trainer.train_dataloader
        if loader is None:
            return
        with torch.inference_mode(False):
            recalibrate_batchnorm(pl_module, loader,
                                  lambda batch: forward(pl_module, move_data_to_device(self.inputs(batch), pl_module.device)),
                                  self.bn_recal_batches)

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"sampler_state": generator_state(self.sampler), "shrinks": len(self.shrinks),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_generator_state(self.sampler, state_dict.get("sampler_state"))
        self._scheduler_state = state_dict.get("scheduler")  # loaded into the scheduler once it is built

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["maestro_ranks"] = rank_pattern(pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def check_same_factorisation(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Refuse, naming the layers, a checkpoint whose low-rank layers (the submodules with ``down``
    and ``up`` factors in ``state_dict``) are not the module's: one written by a run that factorised
    other layers. Without this, loading fails with the key lists of ``load_state_dict``."""
    ours = {name for name, _ in low_rank_layers(module)}
    theirs = set()
    for key in state_dict:
        if key.startswith(prefix) and key.endswith(".down") and f"{key[:-len('down')]}up" in state_dict:
            name = key[len(prefix):-len(".down")]
            try:
                module.get_submodule(name)
            except AttributeError:
                continue
            theirs.add(name)
    if ours != theirs:
        parts = ([f"factorised here but not in the checkpoint: {sorted(ours - theirs)}"] if ours - theirs else []) + \
                ([f"factorised in the checkpoint but not here: {sorted(theirs - ours)}"] if theirs - ours else [])
        raise CheckpointError(f"checkpoint was written by a run that factorised other layers ({'; '.join(parts)}); "
                              f"give MaestroCallback the factorize=... of that run")


def _callback(module: pl.LightningModule) -> MaestroCallback:
    trainer = module._trainer
    found = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, MaestroCallback)]
    if not found:
        raise ConfigError(f"maestro_loss: {type(module).__name__}'s Trainer has no MaestroCallback; "
                          "pass callbacks=[MaestroCallback(...)]")
    return found[0]


def maestro_loss(module: pl.LightningModule, inputs: Any, targets: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> torch.Tensor:
    """The MAESTRO objective for one training batch: ``loss_fn(full(x), y)`` plus (times the
    callback's ``sampled_weight``) the cross-entropy of one sampled sub-model against
    ``softmax(full(x))`` (positions whose target is -100 are left out; with the callback's
    ``sampled_batch`` below 1, on the batch's first examples only). The sampled pass leaves
    BatchNorm running statistics to the full pass.
    ``inputs`` go to the module as ``module(inputs)`` (``module(*inputs)`` for a tuple).
    During warm-up epochs it is ``loss_fn(full(x), y)`` alone. Logs both parts."""
    callback = _callback(module)
    full = forward(module, inputs)
    loss_full = loss_fn(full, targets)
    if not module.training or callback.in_warmup(module.trainer):
        return loss_full
    teacher = full
    if callback.config.sampled_batch < 1:
        inputs, teacher, targets, _ = first_examples(inputs, full, targets, callback.config.sampled_batch)
    with sampled_ranks(module, callback.sampler), running_statistics_kept(callback.batchnorms):
        sampled = forward(module, inputs)
    masked = not torch.is_floating_point(targets)
    loss_sampled = soft_loss(sampled, teacher, targets, masked)
    module.log("maestro/loss_full", loss_full.detach(), on_step=False, on_epoch=True)
    module.log("maestro/loss_sampled", loss_sampled.detach(), on_step=False, on_epoch=True)
    return loss_full + callback.config.sampled_weight * loss_sampled
