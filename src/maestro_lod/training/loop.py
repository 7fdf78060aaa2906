"""The MAESTRO training loop as a reusable component: :class:`Trainer`, :func:`fit`, callbacks.

One epoch = optimisation steps (:mod:`.steps`) → progressive shrinking (``shrink_``, the optimiser
and LR schedule carry on) → BatchNorm recalibration → evaluation at full rank → one record of
metrics (losses, accuracy / perplexity, per-layer ranks, parameters, MACs, times) → callbacks.
``method="dense"`` runs the same loop without factorising: the reference MAESTRO is compared with.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import KINDS
from ..errors import CheckpointError, ConfigError, ConfigTypeError, TrainingDiverged
from ..export import export
from ..inject import factorize, low_rank_layers, rank_pattern
from ..metrics import count_macs, count_params
from ..sampling import FixedFractionSampler, IndependentSampler, RankSampler, SingleLayerSampler
from ..shrinking import shrink_
from .batchnorm import recalibrate_batchnorm
from .config import EXECUTION_KEYS, TrainConfig
from .evaluation import LANGUAGE_KINDS, evaluate
from .optim import build_optimizer, build_scheduler, continue_schedule
from .penalty import GroupLassoGradient
from .reuse import PrefixReuse, prefix_reuse_supported
from .rng import capture_rng, restore_rng, seed_everything
from .steps import DenseStep, MaestroStep, forward

SAMPLER_SEED_OFFSET = 7919
"""The sampler's generator is seeded with ``seed + SAMPLER_SEED_OFFSET`` so it draws a different
stream from the data shuffling generator (seeded with ``seed``)."""
RECALIBRATION_SEED_BASE = 1_000_003
"""BatchNorm recalibration batches of epoch e are shuffled with seed ``seed·BASE + e`` (no state to save)."""


class Callback:
    """Hooks of :meth:`Trainer.fit`; subclass and override the ones you need."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first epoch of this call to ``fit`` (also when resuming)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before the steps of ``epoch`` (1-based)."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        """After each optimisation step: loss parts, running accuracy, total rank."""

    def on_epoch_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After shrinking, recalibration and evaluation, with the epoch's record (already in history)."""

    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        """After the last epoch, with the run's summary."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, one record per epoch, and the summary."""

    model: nn.Module
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but PyTorch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def build_sampler(config: TrainConfig, generator: torch.Generator) -> RankSampler:
    """The rank sampler named by ``config.sampler``, drawing from ``generator``."""
    if config.sampler == "single":
        return SingleLayerSampler(generator)
    if config.sampler == "independent":
        return IndependentSampler(generator)
    return FixedFractionSampler(config.sample_fraction, generator)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(v.to(device, non_blocking=True) for v in value)
    return value.to(device, non_blocking=True)


def _add_batch_dim(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(torch.as_tensor(v).unsqueeze(0) for v in value)
    return torch.as_tensor(value).unsqueeze(0)


class Trainer:
    """Trains ``model`` on ``train_data`` with the recipe in ``config``, evaluating on ``val_data``.

    ``model`` is a dense model (factorised here, after ``config.warmup_epochs`` dense epochs when
    asked) or one already factorised with :func:`maestro_lod.factorize`. Datasets yield
    ``(inputs, targets)`` as described in :mod:`maestro_lod.data`; ``kind`` selects the metrics
    (perplexity for ``language-model`` / ``seq2seq``). Construction seeds every global generator
    with ``config.seed``; :meth:`state_dict` / :meth:`load_state_dict` capture everything needed to
    continue a run bit for bit.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
                 kind: str = "classification", callbacks: Sequence[Callback] = ()):
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ConfigTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if len(train_data) == 0 or len(val_data) == 0:
            raise ConfigError(f"empty dataset: {len(train_data)} training and {len(val_data)} validation items")
        self.config, self.kind, self.callbacks = config, kind, list(callbacks)
        self.device = resolve_device(config.device)
        if config.amp and self.device.type != "cuda":
            raise ConfigError(f"amp=true needs a CUDA device, but the run uses {self.device.type}")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.sampler_generator = torch.Generator().manual_seed(config.seed + SAMPLER_SEED_OFFSET)
        self.sampler = build_sampler(config, self.sampler_generator)
        self.train_data = train_data
        self.train_loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True,
                                       generator=self.data_generator, num_workers=config.num_workers,
                                       pin_memory=self.device.type == "cuda")
        self.val_loader = DataLoader(val_data, batch_size=config.eval_batch_size, shuffle=False,
                                     num_workers=config.num_workers)
        self.model = model.to(self.device)
        self.example_inputs = _to_device(_add_batch_dim(val_data[0][0]), self.device)
        self.factorized = any(True for _ in low_rank_layers(self.model))
        dense = export(self.model, merge="always") if self.factorized else self.model
        self.dense_params = count_params(dense)
        self.dense_macs = count_macs(dense, self.example_inputs)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.initial_ranks: dict[str, int] = {}
        if self.factorized:
            self.initial_ranks = rank_pattern(self.model)
        elif config.method == "maestro" and config.warmup_epochs == 0:
            self._factorize()
        self.scaler = torch.amp.GradScaler("cuda") if config.amp else None
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(self.train_loader))
        self._step = None
        self._reuse: PrefixReuse | None = None
        self._penalty: GroupLassoGradient | None = None

    # ----------------------------------------------------------------------------------- set-up
    @property
    def maestro_active(self) -> bool:
        """Whether the current epoch trains with the MAESTRO objective (factorised, method maestro)."""
        return self.config.method == "maestro" and self.factorized

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _factorize(self) -> None:
        self.model = factorize(self.model, self.config.factorize_config())
        self.factorized = True
        self.initial_ranks = rank_pattern(self.model)

    def _factorize_after_warmup(self) -> None:
        """Factorise the warmed-up dense model; a fresh optimiser continues the LR schedule."""
        schedule = self.scheduler.state_dict()
        self._close_step()
        self._factorize()
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, len(self.train_loader))
        continue_schedule(self.scheduler, schedule)

    def _prepare_step(self) -> None:
        """(Re)build the step function and group-lasso gradient for the model as it is."""
        self._close_step()
        if not self.maestro_active:
            self._step = DenseStep(self.model, self._autocast)
            return
        layers = list(low_rank_layers(self.model))
        mode = self.config.reuse_prefix
        if self.config.full_pass and (mode == "on" or mode == "auto" and prefix_reuse_supported(self.model) is None):
            self._reuse = PrefixReuse(self.model)
        self._step = MaestroStep(self.model, layers, self.sampler, self._autocast, full_pass=self.config.full_pass,
                                 masked=self.kind in LANGUAGE_KINDS, reuse=self._reuse)
        if self.config.lambda_gl > 0:
            self._penalty = GroupLassoGradient([layer for _, layer in layers], self.config.lambda_gl,
                                               self.config.hierarchical)

    def close(self) -> None:
        """Remove the hooks the trainer placed on the model. :meth:`fit` does this when it returns;
        call it after driving :meth:`train_epoch` yourself."""
        self._close_step()

    def _close_step(self) -> None:
        if self._reuse is not None:
            self._reuse.close()
        self._step, self._reuse, self._penalty = None, None, None

    # --------------------------------------------------------------------------------- training
    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _train_steps(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss parts and accuracy."""
        self.model.train()
        sums = [0.0] * 6  # loss, loss_full, loss_sampled, correct, count, penalty
        steps = 0
        total_rank = sum(layer.rank for _, layer in low_rank_layers(self.model))  # ranks change only when shrinking
        for index, (inputs, targets) in enumerate(self.train_loader, start=1):
            inputs, targets = _to_device(inputs, self.device), targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            numbers = self._step(inputs, targets, self._backward)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            penalty = self._penalty.add_to_grads_() if self._penalty is not None else torch.zeros(())
            values = torch.cat([numbers, penalty.reshape(1).to(numbers)]).tolist()  # one device sync
            loss = values[0] + values[5]
            if not math.isfinite(loss):
                raise TrainingDiverged(epoch, index, loss)
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.scheduler.step()
            sums = [a + b for a, b in zip(sums, values)]
            steps += 1
            if self.callbacks:
                metrics = {"loss": loss, "accuracy": sums[3] / max(sums[4], 1), "total_rank": total_rank}
                for callback in self.callbacks:
                    callback.on_step_end(self, index, metrics)
        return {"train_loss": (sums[0] + sums[5]) / steps, "train_loss_full": sums[1] / steps,
                "train_loss_sampled": sums[2] / steps, "train_penalty": sums[5] / steps,
                "train_accuracy": sums[3] / max(sums[4], 1)}

    def _run_batch(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        with self._autocast():
            return forward(self.model, _to_device(inputs, self.device)), targets.to(self.device)

    def _recalibration_batches(self, epoch: int) -> Iterable:
        generator = torch.Generator().manual_seed(self.config.seed * RECALIBRATION_SEED_BASE + epoch)
        return DataLoader(self.train_data, batch_size=self.config.batch_size, shuffle=True, generator=generator,
                          num_workers=self.config.num_workers)

    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch, shrink, recalibrate, evaluate; returns (and appends) its record."""
        config, epoch = self.config, self.epoch + 1
        started = time.perf_counter()
        if config.method == "maestro" and not self.factorized and self.epoch >= config.warmup_epochs:
            self._factorize_after_warmup()
        if self._step is None:
            self._prepare_step()
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        record: dict[str, Any] = {"epoch": epoch, "phase": self._phase()}
        record.update(self._train_steps(epoch))
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        train_time = time.perf_counter() - started
        if self.maestro_active and (epoch - config.warmup_epochs) % config.shrink_every == 0:
            shrink_(self.model, config.eps_ps, self.optimizer)
        if self.maestro_active:
            recalibrate_batchnorm(self.model, self._recalibration_batches(epoch), self._run_batch,
                                  config.bn_recal_batches)
        metrics = evaluate(self.model, self.val_loader, self._run_batch, self.kind)
        record.update({f"val_{key}": value for key, value in metrics.items()})
        ranks = rank_pattern(self.model)
        record.update({"ranks": ranks, "total_rank": sum(ranks.values()), "params": count_params(self.model),
                       "macs": self._macs(), "train_time": train_time,
                       "epoch_time": time.perf_counter() - started})
        self.history.append(record)
        self.epoch = epoch
        return record

    def _phase(self) -> str:
        if self.config.method == "dense":
            return "dense"
        return "maestro" if self.factorized else "dense-warmup"

    def _macs(self) -> int:
        if not self.factorized and self.history:
            return self.history[-1]["macs"]  # a dense model's cost does not change
        return count_macs(self.model, self.example_inputs)

    def fit(self) -> FitResult:
        """Train until ``config.epochs`` (continuing from :attr:`epoch` after a restore)."""
        for callback in self.callbacks:
            callback.on_fit_start(self)
        try:
            while self.epoch < self.config.epochs:
                record = self.train_epoch()
                for callback in self.callbacks:
                    callback.on_epoch_end(self, record)
        finally:
            self.close()
        summary = self.summary()
        for callback in self.callbacks:
            callback.on_fit_end(self, summary)
        return FitResult(self.model, self.history, summary)

    # ---------------------------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        """The run in numbers: final metrics, ranks before → after, cost against the dense model, time."""
        if not self.history:
            raise ConfigError("no epoch has been trained yet")
        last = self.history[-1]
        summary = {"model": self.config.model, "data": self.config.data, "method": self.config.method,
                   "kind": self.kind, "epochs": self.epoch, "device": self.device.type,
                   "final_accuracy": last["val_accuracy"], "final_loss": last["val_loss"]}
        if "val_perplexity" in last:
            summary["final_perplexity"] = last["val_perplexity"]
        summary.update({
            "initial_ranks": self.initial_ranks, "final_ranks": last["ranks"],
            "initial_total_rank": sum(self.initial_ranks.values()), "final_total_rank": last["total_rank"],
            "params": last["params"], "dense_params": self.dense_params,
            "params_ratio": last["params"] / self.dense_params,
            "macs": last["macs"], "dense_macs": self.dense_macs, "macs_ratio": last["macs"] / max(self.dense_macs, 1),
            **self._deployed_cost(),
            "train_time": sum(r["epoch_time"] for r in self.history),
        })
        return summary

    def _deployed_cost(self) -> dict[str, int]:
        """Parameters and MACs of the model as :func:`maestro_lod.export` would deploy it: a layer
        whose factor pair is no cheaper than its dense weight is merged back (the convolutions of
        LeNet-5 at full rank, for instance), so this is what a user ships."""
        deployed = export(self.model) if self.initial_ranks else self.model
        return {"exported_params": count_params(deployed), "exported_macs": count_macs(deployed, self.example_inputs)}

    # ------------------------------------------------------------------------------ checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "sampler": self.sampler_generator}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights (with their ranks), optimiser,
        schedule, scaler, every RNG, history. Tensors and JSON values only (see :mod:`.checkpoint`)."""
        optimizer = self.optimizer.state_dict()
        return {
            "config": self.config.to_dict(), "kind": self.kind, "epoch": self.epoch, "factorized": self.factorized,
            "rank_pattern": rank_pattern(self.model), "initial_ranks": self.initial_ranks,
            "model": self.model.state_dict(),
            "optimizer": {"state": {str(k): v for k, v in optimizer["state"].items()},
                          "param_groups": optimizer["param_groups"]},
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": capture_rng(self._generators()), "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output: factorise if the saved model was, load the
        (shrunk) weights, rebuild the optimiser on the same Parameters and load its state, restore
        the schedule, scaler, RNGs and history."""
        current = self.config.to_dict()
        changed = sorted(k for k, v in state["config"].items() if k not in EXECUTION_KEYS and current.get(k) != v)
        if changed:
            raise CheckpointError(f"checkpoint was written with a different config (differs in: {', '.join(changed)})")
        self._close_step()
        if state["factorized"] and not self.factorized:
            self._factorize()
        self.model.load_state_dict(state["model"])
        self.optimizer = build_optimizer(self.model, self.config)
        self.optimizer.load_state_dict({"state": {int(k): v for k, v in state["optimizer"]["state"].items()},
                                        "param_groups": state["optimizer"]["param_groups"]})
        self.scheduler = build_scheduler(self.optimizer, self.config, len(self.train_loader))
        continue_schedule(self.scheduler, state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self._generators())
        self.initial_ranks = dict(state["initial_ranks"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        kind: str = "classification", callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``model`` with MAESTRO (or densely, ``config.method="dense"``); see :class:`Trainer`."""
    return Trainer(model, train_data, val_data, config, kind=kind, callbacks=callbacks).fit()

