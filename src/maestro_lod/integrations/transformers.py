"""MAESTRO in Hugging Face's ``transformers.Trainer`` (extra ``hf``).

:class:`MaestroTrainer` takes every ``Trainer`` argument plus the MAESTRO settings. Per step it
runs the full model on the labels and one sampled sub-model distilled from it (soft targets,
positions labelled -100 ignored; causal language models' labels shifted here, the way the models
shift them internally); the group lasso's closed-form gradient is added once per optimiser step,
after gradient accumulation and after mixed-precision unscaling (a step pre-hook on the optimiser
Trainer builds). Ranks shrink on schedule with that optimiser's state sliced in place (the LR
scheduler is untouched). With a size ``target`` the group-lasso weight is steered at every shrink
as in ``maestro-lod train --target`` (:mod:`maestro_lod.training.budget`; the shrinks of the run
play the part of its epochs, and a gap left after the last one is cut by importance). What
``save_model`` writes reloads with :func:`load_factorized`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

try:
    import transformers
    from transformers import PreTrainedModel, Trainer, TrainerCallback
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("maestro_lod.integrations.transformers needs the hf extra: "
                      "pip install 'maestro-lod[hf]'") from error

from ..config import FactorizeConfig
from ..engine.batchnorm import batchnorm_layers, running_statistics_kept
from ..engine.counting import count_macs, count_params
from ..engine.passes import hard_loss, soft_loss
from ..errors import CheckpointError, ConfigError, ConfigTypeError
from ..export import export
from ..layers import low_rank_layers, rank_pattern
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, sampled_ranks
from ..training.budget import LambdaScheduler, importance_cut, lambda_scheduler, reachable_minimum
from ..training.options import MaestroConfig, check_int, check_number
from ..training.steps import first_examples
from . import (LoopRun, ensure_factorized, factorized_targets, generator_state, maestro_config, make_sampler,
               resize_to, restore_generator_state, sampler_name, underlying_optimizer)

MAESTRO_FILE = "maestro.json"
"""Written next to the weights by every save: layers, ranks and the sampler's state."""

__all__ = ["MaestroTrainer", "load_factorized", "MAESTRO_FILE"]


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits


class _Schedule(TrainerCallback):
    """Shrinks on the trainer's schedule (after the optimiser step or at the end of an epoch)."""

    def __init__(self, trainer: "MaestroTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.plan_shrinks()

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.shrink_every
        if isinstance(every, int) and state.global_step % every == 0:
            self.trainer.shrink()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.shrink_every == "epoch":
            self.trainer.shrink()


class MaestroTrainer(Trainer):
    """``transformers.Trainer`` training with MAESTRO.

    Every ``Trainer`` argument is accepted as usual; the MAESTRO settings are keyword-only:

    * ``lambda_gl`` (1e-3), ``hierarchical`` (True): group-lasso weight and form;
    * ``eps_ps`` (1e-3): shrinking threshold on the rank importance;
    * ``shrink_every`` (``"epoch"``): ``"epoch"``, a number of optimiser steps, or None (never);
    * ``sampler`` (``"independent"``): a registered sampler name or a :class:`RankSampler`;
      ``sample_fraction`` (0.5, for ``"fixed"``), ``sampler_seed`` (the run's ``args.seed``);
    * ``sampled_batch`` (1.0): the share of each batch the sampled pass trains on (its first
      examples): 0.25 makes a step cost about 1.25 passes instead of 2; ``sampled_weight`` (1.0):
      the weight of its distillation loss;
    * ``target``, ``target_by`` (None, 0.6): a size to reach instead of a fixed λ (``"params=0.3"``,
      ``"macs=0.3"``), planned to be reached after ``target_by`` of the run's shrinks;
    * ``config``: a :class:`~maestro_lod.training.MaestroConfig` holding the options above (its
      ``shrink_every`` and ``warmup_epochs`` are the keywords' here; the others then stay at their
      defaults);
    * ``warmup_steps`` / ``warmup_epochs`` (0): plain training of the full-rank factorised
      model first (labels only: no sampled pass, group lasso or shrinking);
    * ``factorize``: a :class:`FactorizeConfig` (or its dict) applied to ``model``; None factorises
      every supported layer, or keeps a model that is already factorised as it is;
    * ``shift_labels`` (None = automatic: on for causal language models): compare logits at t
      with labels at t+1.
    """

    def __init__(self, model: nn.Module | None = None, *args, lambda_gl: float = 1e-3, hierarchical: bool = True,
                 eps_ps: float = 1e-3, shrink_every: str | int | None = "epoch", sampler: str | RankSampler = "independent",
                 sample_fraction: float = 0.5, sampled_batch: float = 1.0, sampled_weight: float = 1.0,
                 sampler_seed: int | None = None,
                 target: str | None = None, target_by: float = 0.6, config: MaestroConfig | None = None,
                 warmup_steps: int = 0, warmup_epochs: float = 0, factorize: FactorizeConfig | dict | None = None,
                 shift_labels: bool | None = None, **kwargs):
        if model is None:
            raise ConfigError("MaestroTrainer needs a model (model_init is not supported: the model is factorised once)")
        self.maestro = maestro_config(config, lambda_gl=lambda_gl, hierarchical=hierarchical, eps_ps=eps_ps,
                                      sampler=sampler_name(sampler), sample_fraction=sample_fraction,
                                      sampled_batch=sampled_batch, sampled_weight=sampled_weight, target=target,
                                      target_by=target_by)
        check_number("warmup_epochs", warmup_epochs, 0.0)
        check_int("warmup_steps", warmup_steps, 0)
        if sampler_seed is not None:
            check_int("sampler_seed", sampler_seed, 0)
        if not (shrink_every is None or shrink_every == "epoch"
                or (isinstance(shrink_every, int) and not isinstance(shrink_every, bool) and shrink_every > 0)):
            raise ConfigError(f"shrink_every={shrink_every!r} must be 'epoch', a positive number of steps or None")
        if self.maestro.target is not None and shrink_every is None:
            raise ConfigError(f"target={self.maestro.target!r} is reached by shrinking; give shrink_every")
        model = ensure_factorized(model, factorize)
        super().__init__(model, *args, **kwargs)
        self.shrink_every = shrink_every
        self.warmup_steps = warmup_steps
        self.warmup_epochs = float(warmup_epochs)
        self.sampler = make_sampler(sampler, self.maestro, self.args.seed if sampler_seed is None else sampler_seed)
        self.shift_labels = shift_labels
        self.factorize_config = factorize if isinstance(factorize, FactorizeConfig) else (
            FactorizeConfig.from_dict(factorize) if isinstance(factorize, dict) else None)
        self.penalty = GroupLassoGradient([layer for _, layer in low_rank_layers(self.model)], self.maestro.lambda_gl,
                                          self.maestro.hierarchical)
        self.batchnorms = batchnorm_layers(self.model)
        self.run = LoopRun(self.model, self.torch_optimizer, self._example_inputs)
        self.scheduler: LambdaScheduler | None = None
        """The group-lasso weight and what a shrink does, planned when training begins."""
        self._scheduler_state: dict | None = None  # a resumed run's, loaded once the scheduler exists
        self._shrunk = 0  # shrinks after the warm-up so far (a resumed run's included)
        self.dense_params = None
        self.shrinks: list[dict[str, tuple[int, int]]] = []
        self._example: dict[str, torch.Tensor] | None = None
        self._sums = torch.zeros(3)  # loss_full, loss_sampled, penalty since the last log
        self._counts = torch.zeros(3)
        self._macs: int | None = None
        self._hooked: set[int] = set()
        # compute_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.add_callback(_Schedule(self))

    # ---- schedule -------------------------------------------------------------------------------

    def in_warmup(self, step: int | None = None, epoch: float | None = None) -> bool:
        """Whether the run is (or, at ``step`` / ``epoch``, was) in its plain warm-up."""
        step = self.state.global_step if step is None else step
        epoch = (self.state.epoch or 0.0) if epoch is None else epoch
        return step < self.warmup_steps or epoch < self.warmup_epochs

    def plan_shrinks(self) -> None:
        """Build the λ scheduler once the run's length is known (at the start of training): a
        targeted run plans over the shrinks that fall after the warm-up."""
        per_epoch = self.state.max_steps / max(self.state.num_train_epochs, 1)
        if self.shrink_every == "epoch":
            ends = [(round(e * per_epoch), float(e)) for e in range(1, int(self.state.num_train_epochs) + 1)]
        elif self.shrink_every is None:
            ends = []
        else:
            ends = [(s, s / per_epoch) for s in range(self.shrink_every, self.state.max_steps + 1, self.shrink_every)]
        shrinks = sum(not self.in_warmup(step, epoch) for step, epoch in ends)
        if self.maestro.target is not None and shrinks == 0:
            raise ConfigError(f"target={self.maestro.target!r}: no shrink falls after the warm-up of this run")
        if self.maestro.target is not None and self._example is None:  # the costs need an input now
            batch = self.data_collator([self.train_dataset[0]])
            self._example = {key: value[:1].to(self.model.device) for key, value in batch.items()
                             if key != "labels" and isinstance(value, torch.Tensor)}
        state = self._scheduler_state if self.scheduler is None else self.scheduler.state_dict()
        self.scheduler = lambda_scheduler(self.maestro, shrinks, lambda kind, target: importance_cut(self.run, kind, target),
                                          lambda kind: reachable_minimum(self.run, kind), type(self.model).__name__)
        if state is not None:
            self.scheduler.load_state_dict(state)
        self.penalty.weight = self.scheduler.lam

    def _example_inputs(self) -> torch.Tensor | None:
        """The model's positional input for cost counting: the first batch's entry named by the
        model's ``main_input_name`` (``input_ids`` for text, ``pixel_values`` for vision)."""
        if self._example is None:
            return None
        return self._example.get(getattr(self.model, "main_input_name", "input_ids"))

    def torch_optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimiser Trainer created (inside accelerate's wrapper)."""
        return underlying_optimizer(self.optimizer)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        inner = self.torch_optimizer()
        if inner is not None and id(inner) not in self._hooked:
            inner.register_step_pre_hook(self._add_penalty)
            self._hooked.add(id(inner))
        return optimizer

    def _add_penalty(self, optimizer, args, kwargs) -> None:
        # Runs inside optimizer.step(): after accumulation, unscaling and clipping, once per update.
        if self.maestro.lambda_gl == 0 or not self.model.training or self.in_warmup():
            return
        self.run.weigh_group_lasso(self.penalty, self.maestro.group_weights)
        value = self.penalty.add_to_grads_()
        self._sums[2] += float(value)
        self._counts[2] += 1

    @torch.no_grad()
    def shrink(self) -> dict[str, tuple[int, int]]:
        """Shrink now (the schedule calls this), slicing the optimiser's state; logs the ranks."""
        if self.in_warmup():
            return {}
        self._shrunk += 1
        changes = self.scheduler.step(self.run, self._shrunk)
        self.penalty.weight = self.scheduler.lam
        self.shrinks.append(changes)
        self._macs = None
        # Trainer's log() clears control.should_log; at a step that is also a logging step the
        # training loss would then never be logged, so the flag is kept as it was
        should_log = self.control.should_log
        steering = {f"maestro/{name}": float(value) for name, value in self.scheduler.epoch_extra().items()}
        self.log({**steering, **self.cost_metrics()})
        self.control.should_log = should_log
        return changes

    def cost_metrics(self) -> dict[str, float]:
        """Ranks per layer and in total, parameters and (with an example batch seen) MACs per sample."""
        ranks = rank_pattern(self.model)
        metrics = {f"maestro/rank/{name}": float(rank) for name, rank in ranks.items()}
        metrics["maestro/total_rank"] = float(sum(ranks.values()))
        metrics["maestro/params"] = float(count_params(self.model))
        if self._example is not None:
            if self._macs is None:
                was_training = self.model.training
                self.model.eval()
                try:
                    self._macs = count_macs(self.model, (), kwargs=self._example)
                finally:
                    self.model.train(was_training)
            metrics["maestro/macs"] = float(self._macs)
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._counts.sum() > 0:
            means = self._sums / self._counts.clamp(min=1)
            for i, key in enumerate(("maestro/loss_full", "maestro/loss_sampled", "maestro/penalty")):
                if self._counts[i] > 0:
                    logs[key] = round(float(means[i]), 6)
            logs["maestro/total_rank"] = float(sum(rank_pattern(self.model).values()))
            self._sums.zero_()
            self._counts.zero_()
        super().log(logs, *args, **kwargs)

    # ---- the objective --------------------------------------------------------------------------

    def _shifts(self, model: nn.Module) -> bool:
        if self.shift_labels is not None:
            return self.shift_labels
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ConfigError(f"MaestroTrainer needs 'labels' in each batch; got keys {sorted(inputs)}")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self._example is None:
            self._example = {key: value[:1].detach() for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        shift = self._shifts(model)

        def objective(outputs) -> tuple[torch.Tensor, torch.Tensor]:
            logits = _logits(outputs)
            if shift:
                return logits[..., :-1, :], labels[..., 1:]
            return logits, labels

        outputs = model(**inputs)
        full, targets = objective(outputs)
        loss_full = hard_loss(full, targets)
        if not model.training or self.in_warmup():
            return (loss_full, outputs) if return_outputs else loss_full
        teacher = full
        if self.maestro.sampled_batch < 1:
            inputs, teacher, targets, _ = first_examples(inputs, full, targets, self.maestro.sampled_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        with sampled_ranks(unwrapped, self.sampler), running_statistics_kept(self.batchnorms):
            sampled, _ = objective(model(**inputs))
            loss_sampled = soft_loss(sampled, teacher, targets, masked=True)
        self._sums[:2] += torch.stack([loss_full.detach().float().cpu(), loss_sampled.detach().float().cpu()])
        self._counts[:2] += 1
        loss = loss_full + self.maestro.sampled_weight * loss_sampled
        return (loss, outputs) if return_outputs else loss

    # ---- saving and resuming --------------------------------------------------------------------

    def maestro_state(self) -> dict:
        return {
            "format": 1,
            "target_modules": factorized_targets(self.model),
            "min_rank": (self.factorize_config or FactorizeConfig()).min_rank,
            "ranks": rank_pattern(self.model),
            "max_ranks": {name: layer.max_rank for name, layer in low_rank_layers(self.model)},
            "sampler_state": generator_state(self.sampler),
            "shrunk": self._shrunk,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, MAESTRO_FILE), "w") as f:
                json.dump(self.maestro_state(), f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        state = read_maestro_state(resume_from_checkpoint)
        resize_to(self.model, state["ranks"], os.path.join(resume_from_checkpoint, MAESTRO_FILE))
        restore_generator_state(self.sampler, state.get("sampler_state"))
        self._shrunk = int(state.get("shrunk", 0))
        self._scheduler_state = state.get("scheduler")
        self.scheduler = None
        self._macs = None
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def read_maestro_state(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, MAESTRO_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{str(directory)!r} holds no {MAESTRO_FILE}: it was not saved by MaestroTrainer")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path!r}: {error}") from None
    if not isinstance(state, dict) or not isinstance(state.get("ranks"), dict) or "target_modules" not in state:
        raise CheckpointError(f"{path!r} is not a MAESTRO state file (no 'ranks' / 'target_modules')")
    return state


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory!r} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name), device="cpu"))
    return state


def load_factorized(model: type | nn.Module, path: str | os.PathLike, **config_kwargs) -> nn.Module:
    """Load what ``MaestroTrainer.save_model`` (or a Trainer checkpoint) wrote to ``path``.

    ``model`` is the model class (``GPT2LMHeadModel``, an ``AutoModelFor…`` class; built from the
    ``config.json`` in ``path``, with ``config_kwargs`` overriding its fields) or a freshly built,
    not yet factorised model of the same architecture. The same layers are factorised and loaded
    at the saved (shrunk) ranks; the model is returned in eval mode.
    """
    path = os.fspath(path)
    state = read_maestro_state(path)
    if isinstance(model, type):
        if hasattr(model, "from_config") and not issubclass(model, PreTrainedModel):  # AutoModelFor… classes
            config = transformers.AutoConfig.from_pretrained(path, **config_kwargs)
            model = model.from_config(config)
        elif issubclass(model, PreTrainedModel):
            model = model(model.config_class.from_pretrained(path, **config_kwargs))
        else:
            raise ConfigTypeError(f"model must be a transformers model class or a model, got {model.__name__}")
    elif not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a transformers model class or a model, got {type(model).__name__}")
    ensure_factorized(model, FactorizeConfig(target_modules=state["target_modules"], init="random", seed=0,
                                             min_rank=int(state.get("min_rank", 1))))
    resize_to(model, state["ranks"], os.path.join(path, MAESTRO_FILE))
    weights = _read_weights(path)
    result = model.load_state_dict(weights, strict=False)
    missing = sorted(set(result.missing_keys) - _tied_names(model))
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path!r} does not match {type(model).__name__}: missing {missing}, "
                              f"unexpected {sorted(result.unexpected_keys)}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def export_for_from_pretrained(model: nn.Module, **kwargs) -> nn.Module:
    """``ml.export(model, merge="always")``: every factorised layer becomes one dense ``nn.Linear``
    at its trained rank, so ``save_pretrained`` writes the architecture's own keys and plain
    ``AutoModel….from_pretrained`` loads it (architectures built from ``nn.Linear``; GPT-2's
    ``Conv1D`` stores its weight transposed, so GPT-2 needs :func:`load_factorized` instead)."""
    return export(model, merge="always", **kwargs)

