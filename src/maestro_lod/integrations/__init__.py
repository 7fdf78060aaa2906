"""MAESTRO inside other training loops.

* :mod:`maestro_lod.integrations.transformers`: ``MaestroTrainer``, a Hugging Face
  ``transformers.Trainer`` (extra ``hf``), and ``load_factorized`` for what it saves.
* :mod:`maestro_lod.integrations.lightning`: ``MaestroCallback`` and ``maestro_loss`` for
  Lightning (extra ``lightning``).

Both take MAESTRO's options as a :class:`~maestro_lod.training.MaestroConfig` (or the same
keywords) and set the group-lasso weight with the λ schedulers of :mod:`maestro_lod.training.budget`
(a size ``target`` included). They share the pieces below, which need neither library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..config import FactorizeConfig
from ..engine.counting import count_macs, count_params
from ..errors import CheckpointError, ConfigError, ConfigTypeError
from ..export import export
from ..functional import DOWN_RANK_DIM
from ..inject import factorize
from ..layers import LowRankLayer, low_rank_layers
from ..regularization import GroupLassoGradient
from ..sampling import RankSampler, build_sampler
from ..training.options import MaestroConfig
from ..training.step_macs import rank_cost_scales


def maestro_config(config: MaestroConfig | None, **options: Any) -> MaestroConfig:
    """The MAESTRO options of an integration: ``config`` when given (then every keyword in
    ``options`` must be left at its default), else a :class:`MaestroConfig` of the keywords,
    which checks them."""
    if config is None:
        return MaestroConfig(**options)
    if not isinstance(config, MaestroConfig):
        raise ConfigTypeError(f"config must be a MaestroConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in fields(MaestroConfig)}
    given = sorted(name for name, value in options.items() if value != defaults[name])
    if given:
        raise ConfigError(f"give MAESTRO's options either as config=MaestroConfig(...) or as keywords, not both "
                          f"({', '.join(given)} given as keywords)")
    if not config.full_pass:
        raise ConfigError("full_pass=False is not offered here: the integrations' loss always has the full "
                          "pass's term (the sampled pass alone is maestro-lod train's --no-full-pass)")
    if config.reuse_prefix == "on":
        raise ConfigError("reuse_prefix='on' is not offered here: the integrations' sampled pass runs the whole "
                          "model; use 'auto' or 'off'")
    return config


class LoopRun:
    """A training loop outside :class:`~maestro_lod.training.Trainer` as a λ scheduler sees it
    (:class:`~maestro_lod.training.protocols.SizedRun`): the model, its optimiser and an example
    input, read when the scheduler asks (a loop builds its optimiser and sees its first batch
    after the scheduler exists), and the dense model's costs, counted once on first use from the
    model with every factor pair merged back (the same at any rank)."""

    def __init__(self, model: nn.Module, optimizer: Callable[[], torch.optim.Optimizer | None],
                 example_inputs: Callable[[], Any]):
        self.model = model
        self._optimizer, self._example_inputs = optimizer, example_inputs

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer()

    @property
    def example_inputs(self) -> Any:
        example = self._example_inputs()
        if example is None:
            raise ConfigError("the model's MACs need an example input: no training batch seen yet, or none of its "
                              "entries is the model's input")
        return example

    def weigh_group_lasso(self, penalty: GroupLassoGradient, weighting: str) -> None:
        """Weigh ``penalty``'s layers by what one of their ranks costs (``group_weights``: ``macs`` or
        ``params``), as :class:`~maestro_lod.training.Trainer` does. The integrations call it before
        every group-lasso step; it acts once, at the first, when a batch has given the example input
        that MACs are counted on (a rank's cost does not change with the rank). ``uniform``, or a
        penalty already weighed: nothing."""
        if weighting == "uniform" or penalty.scales is not None:
            return
        example = self.example_inputs if weighting == "macs" else None
        names = [name for name, _ in low_rank_layers(self.model)]
        penalty.weigh_layers(rank_cost_scales(self.model, example, names, weighting))

    @cached_property
    def _dense(self) -> nn.Module:
        return export(self.model, merge="always")

    @cached_property
    def dense_params(self) -> int:
        return count_params(self._dense)

    @cached_property
    def dense_macs(self) -> int:
        return count_macs(self._dense, self.example_inputs)


def sampler_name(sampler: str | RankSampler) -> str:
    """The name :class:`MaestroConfig` checks for ``sampler``: a name as given, the default name for
    a sampler object, which is used as it is."""
    if isinstance(sampler, RankSampler):
        return MaestroConfig.sampler
    if not isinstance(sampler, str):
        raise ConfigTypeError(f"sampler must be a sampler name or a RankSampler, got {type(sampler).__name__}")
    return sampler


def make_sampler(sampler: str | RankSampler, config: MaestroConfig, seed: int) -> RankSampler:
    """A sampler object as given, or the sampler ``config`` names (its ``sampler`` and
    ``sample_fraction``: the keywords' or a ``config=`` object's) seeded with ``seed``."""
    if isinstance(sampler, RankSampler):
        return sampler
    return build_sampler(config.sampler, torch.Generator().manual_seed(int(seed)), fraction=config.sample_fraction)


def factorized_targets(model: nn.Module) -> str:
    """A ``target_modules`` regex matching exactly the low-rank layers ``model`` has now."""
    return "|".join(re.escape(name) for name, _ in low_rank_layers(model))


def ensure_factorized(model: nn.Module, config: FactorizeConfig | dict | None) -> nn.Module:
    """``model`` factorised with ``config`` (a :class:`FactorizeConfig`, its dict form or None for
    the defaults), or ``model`` itself when it already has low-rank layers and no config is given.
    A model with nothing to factorise raises :class:`ConfigError` naming what was tried."""
    if isinstance(config, dict):
        config = FactorizeConfig.from_dict(config)
    if config is not None and not isinstance(config, FactorizeConfig):
        raise ConfigTypeError(f"factorize must be a FactorizeConfig, a dict or None, got {type(config).__name__}")
    if any(True for _ in low_rank_layers(model)):
        if config is not None:
            raise ConfigError(f"{type(model).__name__} is already factorised; pass factorize=None to train it as it is")
        return model
    try:
        return factorize(model, config)
    except ConfigError as error:
        raise ConfigError(f"cannot train {type(model).__name__} with MAESTRO: {error}") from None


def generator_state(sampler: RankSampler) -> list[int] | None:
    """The sampler's random state as a JSON-friendly list (None for samplers without a generator)."""
    generator = getattr(sampler, "generator", None)
    return None if generator is None else generator.get_state().tolist()


def restore_generator_state(sampler: RankSampler, state: list[int] | None) -> None:
    if state is not None and getattr(sampler, "generator", None) is not None:
        sampler.generator.set_state(torch.tensor(state, dtype=torch.uint8))


def resize_to(model: nn.Module, ranks: dict[str, int], source: str) -> None:
    """Give every low-rank layer of ``model`` the physical rank ``ranks`` names (zero-padding or
    truncating), after checking that the pattern fits: the same layers, each rank ≤ its max rank.
    ``source`` names where the pattern comes from, for the error."""
    if not isinstance(ranks, dict):
        raise CheckpointError(f"{source}: the rank pattern must be a mapping of layer name -> rank, got {ranks!r}")
    layers: dict[str, LowRankLayer] = dict(low_rank_layers(model))
    unknown = sorted(set(ranks) - set(layers))
    missing = sorted(set(layers) - set(ranks))
    if unknown or missing:
        parts = ([f"layers {unknown} the model does not have"] if unknown else []) + \
                ([f"no rank for layers {missing}"] if missing else [])
        raise CheckpointError(f"{source}: the rank pattern does not fit this model: {'; '.join(parts)}")
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= layers[name].max_rank:
            raise CheckpointError(f"{source}: rank {rank!r} for layer {name!r} does not fit its max rank "
                                  f"{layers[name].max_rank}")
    for name, rank in ranks.items():
        if layers[name].rank != rank:
            layers[name]._resize_(rank)


def underlying_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The torch optimiser inside wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), which hold it as ``.optimizer``."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 8:
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def fit_state_dict_ranks(model: nn.Module, state_dict: dict, prefix: str, source: str) -> None:
    """Resize ``model``'s low-rank layers to the ranks of the factors in ``state_dict`` (keys under
    ``prefix``) before it loads, with an error naming the layer and rank that cannot fit."""
    ranks = {}
    for name, layer in low_rank_layers(model):
        down = state_dict.get(f"{prefix}{name}.down" if name else f"{prefix}down")
        if isinstance(down, torch.Tensor) and down.dim() == layer.down.dim():
            ranks[name] = int(down.shape[DOWN_RANK_DIM])
    if not ranks:
        return
    current = rank_pattern_of(model)
    resize_to(model, {**current, **ranks}, source)


def rank_pattern_of(model: nn.Module) -> dict[str, int]:
    return {name: layer.rank for name, layer in low_rank_layers(model)}
