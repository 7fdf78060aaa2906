"""MAESTRO in Lightning (extra ``lightning``): :class:`MaestroCallback` and :func:`maestro_loss`.

The callback factorises the LightningModule in ``setup`` (before ``configure_optimizers``), adds
the group lasso's gradient in ``on_before_optimizer_step`` (once per optimiser step: after
gradient accumulation and mixed-precision unscaling), shrinks at the end of every
``shrink_every``-th training epoch with every optimiser's state sliced in place, recalibrates
BatchNorm statistics before validation and logs ranks, parameters and MACs. Checkpoints carry the
ranks in the factors' shapes (resized before loading; a checkpoint of a module factorised in other
layers is refused naming them) and the sampler's state.

In ``training_step``, replace ``loss = loss_fn(self(x), y)`` by
``loss = maestro_loss(self, x, y, loss_fn)``.
"""

from __future__ import annotations

import math
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
from ..errors import CheckpointError, ConfigError
from ..layers import low_rank_layers, rank_pattern
from ..engine.counting import count_macs, count_params
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, sampled_ranks
from ..shrinking import shrink_
from ..engine.batchnorm import recalibrate_batchnorm
from ..engine.passes import forward, soft_loss
from . import (ensure_factorized, fit_state_dict_ranks, generator_state, make_sampler, restore_generator_state,
               underlying_optimizer)

__all__ = ["MaestroCallback", "maestro_loss"]


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class MaestroCallback(pl.Callback):
    """Train the LightningModule with MAESTRO.

    Args:
        lambda_gl, hierarchical: group-lasso weight (1e-3) and form (hierarchical).
        eps_ps: shrinking threshold on the rank importance (1e-3).
        shrink_every: shrink after every this many training epochs (1; 0 = never).
        sampler: a registered sampler name (``"single"``) or a :class:`RankSampler`;
            ``sample_fraction`` for ``"fixed"``; ``seed`` seeds a named sampler.
        warmup_epochs: epochs of plain training of the full-rank factorised model first.
        factorize: a :class:`FactorizeConfig` (or dict) for the module; None = every supported
            layer (a module that is already factorised is kept as it is).
        bn_recal_batches: training batches that recalibrate BatchNorm before validation (20; 0 = off).
        inputs: picks the model input out of a training batch (default: ``batch[0]``), for
            BatchNorm recalibration and MAC counting.
    """

    def __init__(self, lambda_gl: float = 1e-3, eps_ps: float = 1e-3, *, hierarchical: bool = True,
                 shrink_every: int = 1, sampler: str | RankSampler = "single", sample_fraction: float = 0.5,
                 seed: int = 0, warmup_epochs: int = 0, factorize: FactorizeConfig | dict | None = None,
                 bn_recal_batches: int = 20, inputs: Callable[[Any], Any] = _first):
        for name, value in (("lambda_gl", lambda_gl), ("eps_ps", eps_ps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a finite number ≥ 0")
        for name, value in (("shrink_every", shrink_every), ("warmup_epochs", warmup_epochs),
                            ("bn_recal_batches", bn_recal_batches), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an int ≥ 0")
        if (isinstance(sample_fraction, bool) or not isinstance(sample_fraction, (int, float))
                or not 0 < sample_fraction <= 1):
            raise ConfigError(f"sample_fraction={sample_fraction!r} must be a number in (0, 1]")
        self.lambda_gl = float(lambda_gl)
        self.eps_ps = float(eps_ps)
        self.hierarchical = bool(hierarchical)
        self.shrink_every = shrink_every
        self.sampler = make_sampler(sampler, seed, sample_fraction)
        self.warmup_epochs = warmup_epochs
        self.factorize = factorize
        self.bn_recal_batches = bn_recal_batches
        self.inputs = inputs
        self.penalty: GroupLassoGradient | None = None
        self.shrinks: list[dict[str, tuple[int, int]]] = []
        self._example: Any = None
        self._hook = None

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(True for _ in low_rank_layers(pl_module)):
            ensure_factorized(pl_module, self.factorize)
        self.penalty = GroupLassoGradient([layer for _, layer in low_rank_layers(pl_module)], self.lambda_gl,
                                          self.hierarchical)
        if self._hook is None:
            def resize_before_load(module, state_dict, prefix, *args):
                check_same_factorisation(module, state_dict, prefix)
                fit_state_dict_ranks(module, state_dict, prefix, "checkpoint")
            self._hook = pl_module.register_load_state_dict_pre_hook(resize_before_load)

    def in_warmup(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.warmup_epochs

    # ---- training -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._example is None:
            example = self.inputs(batch)
            self._example = example[:1] if isinstance(example, torch.Tensor) else example

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.penalty is None or self.lambda_gl == 0 or self.in_warmup(trainer):
            return
        value = self.penalty.add_to_grads_()
        pl_module.log("maestro/penalty", float(value), on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.shrink_every and not self.in_warmup(trainer) and (epoch - self.warmup_epochs) % self.shrink_every == 0:
            optimizers = [underlying_optimizer(opt) for opt in trainer.optimizers]
            if len(optimizers) > 1:
                raise ConfigError(f"MaestroCallback shrinks with one optimiser; the module has {len(optimizers)}")
            self.shrinks.append(shrink_(pl_module, self.eps_ps, optimizers[0] if optimizers else None))
        for name, value in self.cost_metrics(pl_module).items():
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
        return {"sampler_state": generator_state(self.sampler), "shrinks": len(self.shrinks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_generator_state(self.sampler, state_dict.get("sampler_state"))

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
    """The MAESTRO objective for one training batch: ``loss_fn(full(x), y)`` plus the cross-entropy
    of one sampled sub-model against ``softmax(full(x))`` (positions whose target is -100 are left
    out). ``inputs`` go to the module as ``module(inputs)`` (``module(*inputs)`` for a tuple).
    During warm-up epochs it is ``loss_fn(full(x), y)`` alone. Logs both parts."""
    callback = _callback(module)
    full = forward(module, inputs)
    loss_full = loss_fn(full, targets)
    if not module.training or callback.in_warmup(module.trainer):
        return loss_full
    with sampled_ranks(module, callback.sampler):
        sampled = forward(module, inputs)
    masked = not torch.is_floating_point(targets)
    loss_sampled = soft_loss(sampled, full, targets, masked)
    module.log("maestro/loss_full", loss_full.detach(), on_step=False, on_epoch=True)
    module.log("maestro/loss_sampled", loss_sampled.detach(), on_step=False, on_epoch=True)
    return loss_full + loss_sampled
