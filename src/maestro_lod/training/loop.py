"""The training loop as a reusable component: :class:`Trainer`, :func:`fit`, callbacks.

One epoch = the method's preparation (e.g. factorising after a dense warm-up) → optimisation steps
(the method's :class:`~.steps.Step`) → the method's end-of-epoch work (MAESTRO: progressive
shrinking; the optimiser and LR schedule carry on) → BatchNorm recalibration → evaluation at full
rank → one :class:`~.records.EpochRecord` (losses, accuracy / perplexity, per-layer ranks,
parameters, MACs, times) → callbacks. What differs between training methods lives in their
strategy objects (:mod:`.methods`); this loop is the same for all of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..data import KINDS

from ..config import FactorizeConfig
from ..errors import CheckpointError, ConfigError, ConfigTypeError, TrainingDiverged
from ..export import export
from ..inject import factorize
from ..layers import low_rank_layers, rank_pattern
from ..engine.counting import count_macs, count_params
from ..sampling import RankSampler
from ..engine.batchnorm import recalibrate_batchnorm
from .checkpoint import check_trainer_state
from .train_config import EXECUTION_KEYS, TrainConfig
from .step_macs import PassCost
from .distributed import Distributed
from ..engine.evaluation import evaluate
from .methods import METHODS, TrainingMethod
from .optim import build_optimizer, build_scheduler, continue_schedule
from .precision import Precision, build_precision
from .records import EpochRecord, EpochTotals, RunSummary, StepStats
from .rng import capture_rng, derive_seed, restore_rng, seed_everything
from .steps import Step
from ..engine.passes import forward
from ..engine.search import calibration_batches

WHITENING_SAMPLES = 512
"""Training samples that measure each layer's inputs for ``factorize.init = "whitened"``."""

SAMPLER_SEED_OFFSET = 7919
"""The sampler's generator is seeded with ``seed + SAMPLER_SEED_OFFSET`` so it draws a different
stream from the data shuffling generator (seeded with ``seed``)."""
RECALIBRATION_SEED_BASE = 1_000_003
"""BatchNorm recalibration batches of epoch e are shuffled with seed ``seed·BASE + e`` (no state to save)."""
STEP_MEANS = 3
"""A step's numbers (``loss, loss_full, loss_sampled, correct, count``) begin with this many means."""


class Callback:
    """Hooks of :meth:`Trainer.fit`; subclass and override the ones you need."""

    main_only = False
    """True for callbacks that write files or print: a distributed run calls them on rank 0 only."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first epoch of this call to ``fit`` (also when resuming)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before the steps of ``epoch`` (1-based)."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        """After each optimisation step: ``loss`` (the objective), running ``accuracy``, ``total_rank``."""

    def on_epoch_end(self, trainer: "Trainer", record: EpochRecord) -> None:
        """After shrinking, recalibration and evaluation, with the epoch's record (already in history)."""

    def on_fit_end(self, trainer: "Trainer", summary: RunSummary) -> None:
        """After the last epoch, with the run's summary."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, one record per epoch, and the summary."""

    model: nn.Module
    history: list[EpochRecord]
    summary: RunSummary


@dataclass
class TrainerState:
    """How far a run has come: epochs done, their records, and the ranks it was factorised at."""

    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    initial_ranks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": [record.to_dict() for record in self.history],
                "initial_ranks": dict(self.initial_ranks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerState":
        return cls(int(data["epoch"]), [EpochRecord.from_dict(r) for r in data["history"]],
                   dict(data["initial_ranks"]))


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but PyTorch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


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

    ``model`` is a dense model (factorised here when the method asks, e.g. after MAESTRO's
    ``warmup_epochs`` dense epochs) or one already factorised with
    :func:`maestro_lod.factorize`. Datasets yield ``(inputs, targets)`` as described in
    :mod:`maestro_lod.data`; ``kind`` selects the metrics (perplexity for ``language-model`` /
    ``seq2seq``). ``sampler`` replaces the sampler the method's options name with your own
    :class:`~maestro_lod.RankSampler` (its generator is checkpointed). Construction seeds every
    global generator with ``config.seed``; :meth:`state_dict` / :meth:`load_state_dict` capture
    everything needed to continue a run bit for bit.

    ``distributed``: the processes of the run (:mod:`.distributed`); by default the group
    ``torchrun`` describes (joined here, a :class:`~.distributed.DataParallel`), else the single
    process. ``config.batch_size`` is each process's share of a global batch of
    ``batch_size × world_size``. :attr:`precision` (:mod:`.precision`): float16 autocast with a
    gradient scaler for ``config.amp``, float32 otherwise. The loop calls both the same way
    whatever they are.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
                 kind: str = "classification", callbacks: Sequence[Callback] = (), sampler: RankSampler | None = None,
                 distributed: Distributed | None = None):
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ConfigTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if sampler is not None and not isinstance(sampler, RankSampler):
            raise ConfigTypeError(f"sampler must be a RankSampler, got {type(sampler).__name__}")
        if len(train_data) == 0 or len(val_data) == 0:
            raise ConfigError(f"empty dataset: {len(train_data)} training and {len(val_data)} validation items")
        self.config, self.kind = config, kind
        self.device = resolve_device(config.device)
        self.distributed = distributed or Distributed.from_env(self.device.type)
        self.callbacks = [c for c in callbacks if self.distributed.is_main or not getattr(c, "main_only", False)]
        self.device = self.distributed.process_device(self.device)
        self.precision: Precision = build_precision(config.amp, self.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        if sampler is None:
            generator = torch.Generator().manual_seed(derive_seed(config.seed, 1, SAMPLER_SEED_OFFSET))
            sampler = METHODS.lookup(config.method).build_sampler(config.method_options, generator)
        self.sampler = sampler
        self.train_data = train_data
        self.train_loader = self.distributed.train_loader(train_data, config.batch_size, self.data_generator,
                                                          num_workers=config.num_workers,
                                                          pin_memory=self.device.type == "cuda")
        self.val_loader = DataLoader(self.distributed.eval_shard(val_data), batch_size=config.eval_batch_size,
                                     shuffle=False, num_workers=config.num_workers)
        self.model = model.to(self.device)
        self.example_inputs = _to_device(_add_batch_dim(val_data[0][0]), self.device)
        self.state = TrainerState()
        if self.factorized:
            self.state.initial_ranks = rank_pattern(self.model)
        dense = export(self.model, merge="always") if self.factorized else self.model
        self.dense_params = count_params(dense)
        self.dense_macs = count_macs(dense, self.example_inputs)
        self.optimizer: torch.optim.Optimizer | None = None  # built once the method has shaped the model
        self._step: Step | None = None
        self.method: TrainingMethod = METHODS.lookup(config.method)()
        self.method.setup(self)
        self.distributed.broadcast_module(self.model)  # every process starts from rank 0's weights
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(self.train_loader))

    # ------------------------------------------------------------------------- state of the run
    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.state.epoch

    @property
    def history(self) -> list[EpochRecord]:
        """One record per completed epoch."""
        return self.state.history

    @property
    def initial_ranks(self) -> dict[str, int]:
        """Ranks of the low-rank layers when the model was factorised (empty while dense)."""
        return self.state.initial_ranks

    @property
    def factorized(self) -> bool:
        """Whether the model has low-rank layers."""
        return any(True for _ in low_rank_layers(self.model))

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler of :attr:`precision` (``None`` without one). Setting a scaler wraps
        the current precision's forward passes in a :class:`~.precision.ScaledPrecision`
        (:meth:`~.precision.Precision.with_scaler`)."""
        return self.precision.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        self.precision = self.precision.with_scaler(scaler)

    # ------------------------------------------------------------- services the methods use
    def autocast(self) -> contextlib.AbstractContextManager:
        """The scope of forward passes: :attr:`precision`'s (a no-op in float32)."""
        return self.precision.autocast()

    def _whitening_batches(self) -> list:
        """The training samples on which ``init="whitened"`` measures each layer's inputs:
        :data:`WHITENING_SAMPLES` drawn with the run's seed (the global random state is left as it
        was, so every process draws the same ones), on the model's device."""
        return calibration_batches(self.train_data, WHITENING_SAMPLES, WHITENING_SAMPLES, seed=self.config.seed,
                                   device=next(self.model.parameters()).device)

    def factorize_model(self, config: FactorizeConfig | None = None) -> None:
        """Replace the model by its factorised form (``config``: the run's ``factorize`` table by
        default). Once training has begun, a fresh optimiser takes over and continues the LR schedule."""
        self._close_step()
        config = config or self.config.factorize_config()
        calibration = self._whitening_batches() if config.init == "whitened" else None
        self.model = factorize(self.model, config, calibration=calibration)
        self.distributed.broadcast_module(self.model)
        self.state.initial_ranks = rank_pattern(self.model)
        if self.optimizer is not None:
            schedule = self.scheduler.state_dict()
            self.optimizer = build_optimizer(self.model, self.config)
            self.scheduler = build_scheduler(self.optimizer, self.config, len(self.train_loader))
            continue_schedule(self.scheduler, schedule)

    def probe_inputs(self) -> Any:
        """The first training batch, collated without shuffling or drawing any random number (for
        checks that must not change the run's numbers)."""
        count = min(self.config.batch_size, len(self.train_data))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # augmentations draw from the global generators
            inputs, _ = default_collate([self.train_data[i] for i in range(count)])
        return _to_device(inputs, self.device)

    def close(self) -> None:
        """Release what the current step holds on the model. :meth:`fit` does this when it returns;
        call it after driving :meth:`train_epoch` yourself."""
        self._close_step()

    def _close_step(self) -> None:
        if self._step is not None:
            self._step.close()
        self._step = None

    # --------------------------------------------------------------------------------- training
    def _train_steps(self, epoch: int, cost: PassCost) -> tuple[dict[str, float], int]:
        """One pass over the training data; returns the epoch's mean loss parts and accuracy, and
        its training MACs (see :mod:`.cost`)."""
        self.model.train()
        totals = EpochTotals()
        train_macs = 0
        total_rank = sum(layer.rank for _, layer in low_rank_layers(self.model))  # ranks change only when shrinking
        for index, (inputs, targets) in enumerate(self.train_loader, start=1):
            inputs, targets = _to_device(inputs, self.device), targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            numbers = self._step(inputs, targets, self.precision.backward)
            # the gradients of the global batch, still scaled; then true gradients for the penalty and clipping
            numbers = self.distributed.reduce_step(self.model.parameters(), numbers, self.train_loader, index - 1,
                                                   STEP_MEANS)
            self.precision.unscale_(self.optimizer)
            stats = StepStats.from_tensor(numbers, self._step.add_penalty_gradients_())
            if not math.isfinite(stats.objective):
                raise TrainingDiverged(epoch, index, stats.objective)
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.precision.step(self.optimizer)
            self.scheduler.step()
            totals.add(stats)
            items = self.distributed.global_items(self.train_loader, index - 1, len(targets))
            train_macs += cost.step_macs(self._step.passes, items, self._step.shares)
            if self.callbacks:
                metrics = {"loss": stats.objective, "accuracy": totals.accuracy, "total_rank": total_rank}
                for callback in self.callbacks:
                    callback.on_step_end(self, index, metrics)
        return totals.means(), train_macs

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.distributed.reduce_sum(tensor, self.device)

    def _run_batch(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        with self.autocast():
            return forward(self.model, _to_device(inputs, self.device)), targets.to(self.device)

    def _recalibration_batches(self, epoch: int) -> Iterable:
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, RECALIBRATION_SEED_BASE, epoch))
        return DataLoader(self.train_data, batch_size=self.config.batch_size, shuffle=True, generator=generator,
                          num_workers=self.config.num_workers)

    def train_epoch(self) -> EpochRecord:
        """Train one epoch, let the method finish it (shrinking), recalibrate, evaluate; returns
        (and appends) its record."""
        epoch = self.epoch + 1
        started = time.perf_counter()
        self.method.before_epoch(self, epoch)
        if self._step is None:
            self._step = self.method.build_step(self)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        phase = self.method.phase(self)
        train, train_macs = self._train_steps(epoch, PassCost.measure(self.model, self.example_inputs))
        lr = self.optimizer.param_groups[0]["lr"]
        train_time = time.perf_counter() - started
        self.distributed.broadcast_buffers(self.model)  # BatchNorm statistics of rank 0's shares
        self.method.after_steps(self, epoch)
        self.distributed.after_shrink(self.model, epoch)
        if self.method.recalibrates(self):
            recalibrate_batchnorm(self.model, self._recalibration_batches(epoch), self._run_batch,
                                  self.config.bn_recal_batches)
        val = evaluate(self.model, self.val_loader, self._run_batch, self.kind, self._reduce)
        for key in ("loss", "perplexity"):  # a non-finite metric cannot be recorded (strict JSON) or trusted
            if key in val and not math.isfinite(val[key]):
                raise TrainingDiverged(epoch, None, val[key], what=f"validation {key}")
        ranks = rank_pattern(self.model)
        record = EpochRecord(epoch=epoch, phase=phase, **train, lr=lr, val_loss=val["loss"],
                             val_accuracy=val["accuracy"], val_perplexity=val.get("perplexity"), ranks=ranks,
                             total_rank=sum(ranks.values()), params=count_params(self.model), macs=self._macs(),
                             train_time=train_time, epoch_time=time.perf_counter() - started,
                             extra={"train_macs": train_macs, **self.method.epoch_extra(self)})
        self.state.history.append(record)
        self.state.epoch = epoch
        return record

    def _macs(self) -> int:
        if not self.factorized and self.history:
            return self.history[-1].macs  # a dense model's cost does not change
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
    def summary(self) -> RunSummary:
        """The run in numbers: final metrics, ranks before → after, cost against the dense model, time."""
        if not self.history:
            raise ConfigError("no epoch has been trained yet")
        last = self.history[-1]
        deployed = export(self.model) if self.initial_ranks else self.model
        return RunSummary(
            model=self.config.model, data=self.config.data, method=self.config.method, kind=self.kind,
            epochs=self.epoch, device=self.device.type, final_accuracy=last.val_accuracy, final_loss=last.val_loss,
            final_perplexity=last.val_perplexity, initial_ranks=dict(self.initial_ranks), final_ranks=dict(last.ranks),
            params=last.params, dense_params=self.dense_params, macs=last.macs, dense_macs=self.dense_macs,
            # what a user ships: export merges a factor pair back where it is no cheaper than the
            # dense weight (the convolutions of LeNet-5 at full rank, for instance)
            exported_params=count_params(deployed), exported_macs=count_macs(deployed, self.example_inputs),
            train_time=sum(r.epoch_time for r in self.history),
            extra={"train_macs": sum(r.extra.get("train_macs", 0) for r in self.history),
                   "world_size": self.distributed.world_size,
                   # seconds this process spent in collectives since it started (0 for one process)
                   "communication_time": self.distributed.comm_time, **self.method.summary_extra(self)})

    # ------------------------------------------------------------------------------ checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "sampler": self.sampler.generator}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights (with their ranks), optimiser,
        schedule, scaler, every RNG, the method's own state, history. Tensors and JSON values only
        (see :mod:`.checkpoint`)."""
        optimizer = self.optimizer.state_dict()
        return {
            "config": self.config.to_dict(), "kind": self.kind, "factorized": self.factorized,
            "rank_pattern": rank_pattern(self.model), **self.state.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": {"state": {str(k): v for k, v in optimizer["state"].items()},
                          "param_groups": optimizer["param_groups"]},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.state_dict(),
            "rng": capture_rng(self._generators()), "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from :meth:`state_dict` output: factorise if the saved model was, load the
        (shrunk) weights, rebuild the optimiser on the same Parameters and load its state, restore
        the schedule, scaler, RNGs, the method's state and history. A state written by another
        recipe, or one that does not fit this run (``source`` names it in the message), raises a
        :class:`~maestro_lod.CheckpointError` before anything changes."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{source} does not fit this run: it holds no trainer state with a config")
        try:  # read as a config: one written by an older version also holds other methods' options
            saved = TrainConfig.from_dict(state["config"]).to_dict()
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{source} does not fit this run: its config is not valid ({error})") from None
        current = self.config.to_dict()
        changed = sorted(k for k in state["config"] if k not in EXECUTION_KEYS and current.get(k) != saved.get(k))
        if changed:
            raise CheckpointError(f"{source} was written with a different config (differs in: {', '.join(changed)})")
        self._close_step()
        self.method.load_state_dict(state.get("method", {}))
        if state.get("factorized") is True and not self.factorized:  # the checkpoint's factors replace these
            shapes_only = FactorizeConfig.from_dict({**self.method.factorize_config(self).to_dict(), "init": "svd"})
            self.model = factorize(self.model, shapes_only)
        check_trainer_state(state, self.model, self.config.epochs, where=source)
        self.model.load_state_dict(state["model"])
        self.optimizer = build_optimizer(self.model, self.config)
        self.optimizer.load_state_dict({"state": {int(k): v for k, v in state["optimizer"]["state"].items()},
                                        "param_groups": state["optimizer"]["param_groups"]})
        self.scheduler = build_scheduler(self.optimizer, self.config, len(self.train_loader))
        continue_schedule(self.scheduler, state["scheduler"])
        self.precision.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self._generators())
        self.state = TrainerState.from_dict(state)


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        kind: str = "classification", callbacks: Sequence[Callback] = (), sampler: RankSampler | None = None) -> FitResult:
    """Train ``model`` with the method of ``config`` (MAESTRO by default); see :class:`Trainer`."""
    return Trainer(model, train_data, val_data, config, kind=kind, callbacks=callbacks, sampler=sampler).fit()
