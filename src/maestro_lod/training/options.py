"""The options of one training method, each method's in its own validated dataclass.

A method declares its options class (``TrainingMethod.config_class``); :class:`~.train_config.TrainConfig`
holds an instance of it as ``method_options`` next to the options every run has. Each class checks
its fields once, in ``__post_init__``, with the helpers below (which :mod:`.train_config` uses for
the general options too), so a value is refused by name wherever the options come from: a
``TrainConfig``, a TOML file, the command line or an integration's keyword arguments.
:class:`MaestroConfig` is here; the baselines' classes live next to the baselines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..checks import dataclass_from_dict
from ..engine.targets import parse_target
from ..errors import ConfigError, ConfigTypeError
from ..sampling import SAMPLERS

INT_LIMIT = 2**31 - 1
"""Largest accepted count (epochs, batch sizes, steps, batches): far beyond any real run, and small
enough for every library these counts reach (floats, C ints)."""
FLOAT_LIMIT = 1e6
"""Largest accepted rate or weight (lr, weight_decay, gamma, grad_clip, lambda_gl, eps_ps): far beyond
any useful value, and small enough that products of two stay finite in float32, where tensors hold them."""
EPOCH_LIMIT = 1_000_000
REUSE_MODES = ("auto", "on", "off")
GROUP_WEIGHTS = ("uniform", "macs", "params")
"""How the group lasso weighs each layer's groups: alike (the paper), or by what one rank costs."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def check_int(name: str, value: Any, low: int, high: int = INT_LIMIT) -> None:
    if not is_int(value) or not low <= value <= high:
        shown = value if not is_int(value) or abs(value) < 10**30 else f"an int of {len(str(value))} digits"
        raise ConfigError(f"{name}={shown!r} must be an int >= {low} and <= {high}")


def check_number(name: str, value: Any, low: float, *, strict: bool = False, high: float = FLOAT_LIMIT) -> None:
    """A finite number from ``low`` (excluded when ``strict``) to ``high``; the message gives a
    bounded range as an interval, e.g. ``sample_fraction=1.5 must be a number in (0, 1]``."""
    if is_int(value) and abs(value) > 10**30:
        value = float("inf")  # shown as inf rather than hundreds of digits
    if not is_number(value) or value < low or (strict and value == low) or value > high:
        if high == FLOAT_LIMIT:
            raise ConfigError(f"{name}={value!r} must be a number {'>' if strict else '>='} {low} and <= {high:g}")
        raise ConfigError(f"{name}={value!r} must be a number in {'(' if strict else '['}{low:g}, {high:g}]")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name}={value!r} must be true or false")


@dataclass
class MethodConfig:
    """The options of a training method; this base has none (the options of ``dense``).

    Subclasses add dataclass fields and check them in ``__post_init__``. ``exclusive`` names the
    fields that only make sense for the subclass's own methods, with the reason: given to
    another method (in the flat layout of a config file, see ``TrainConfig.from_dict``) they are
    refused instead of ignored, since the run would not do what they ask.
    """

    exclusive: ClassVar[dict[str, str]] = {}

    @classmethod
    def keys(cls) -> set[str]:
        """The option names."""
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build from a dict, refusing keys that are not options of this class by name."""
        return dataclass_from_dict(cls, data, f"{cls.__name__} option")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every option."""
        return asdict(self)


@dataclass
class MaestroConfig(MethodConfig):
    """The options of MAESTRO (``maestro`` and its ablations ``maestro-no-shrink``, ``maestro-full``).

    Attributes:
        sampler, sample_fraction: rank sampler of the sampled pass (``independent``, the default:
            every layer draws a rank, so sub-models truncated in several layers at once are
            trained; ``single``: one (layer, rank) pair per step, the paper's sampler; ``suffix``:
            every layer from a randomly drawn one on draws a rank, the earlier ones stay whole, so
            the sampled pass reuses their outputs from the full pass; ``fixed``: every layer at
            ``ceil(sample_fraction · rank)``).
        sampled_batch: the share of each batch the sampled pass trains on (its first
            ``ceil(sampled_batch · batch)`` examples; 1, the default: all of them). The sampled
            pass costs about this share of a full one, so 0.25 makes a step cost about 1.25 full
            passes instead of 2; its gradient is an unbiased estimate from fewer examples. Needs
            outputs whose first dimension is the batch, and no prefix reuse (the full pass's
            recorded outputs are the whole batch's).
        sampled_weight: the weight ``w`` of the sampled pass's distillation loss,
            ``loss = CE(full, y) + w · CE(sampled, softmax(full))`` (1, the paper's). Below 1 the
            full model's own labels weigh more against pulling it towards its sub-models.
        full_pass: False = only the sampled pass, on hard labels (``--no-full-pass``).
        reuse_prefix: let the sampled pass reuse the full pass's outputs of the layers before the
            first layer whose rank was sampled (identical computation). ``auto`` turns it on when
            the model has no dropout, which would make the two passes differ.
        lambda_gl, hierarchical: weight of the group lasso, hierarchical (nested tails) or plain.
        group_weights: ``uniform`` (the paper): every layer's groups weigh alike; ``macs`` or
            ``params``: each layer's groups weigh what one of its ranks costs (its factor pair's
            MACs per example, or parameters, per rank), divided by the mean over the layers, so
            that the penalty shrinks what is expensive (by MACs: the convolutions).
        lambda_epochs: the run length (factorised epochs) ``lambda_gl`` was chosen for; a run of
            another length uses ``lambda_gl × lambda_epochs / its factorised epochs``, so that the
            penalty pushes as hard over the whole run and a shorter run still shrinks (a 10-epoch
            LeNet-5 run at the 30-epoch λ barely cut a rank). None: ``lambda_gl`` as given.
        eps_ps, shrink_every: progressive-shrinking threshold and period in epochs.
        warmup_epochs: dense (unfactorised) epochs before factorising.
        target, target_by: ask for a size instead of a λ: ``"params=0.3"`` / ``"macs=0.3"`` is the
            exported model's cost as a fraction of the dense model's; ``lambda_gl`` is then only
            the starting weight, steered each epoch so the cost follows a plan that reaches the
            target after ``target_by`` of the factorised epochs (see :mod:`.budget`).
    """

    exclusive: ClassVar[dict[str, str]] = {"target": "steers MAESTRO's group lasso; it needs method='maestro'"}

    sampler: str = "independent"
    sample_fraction: float = 0.5
    sampled_batch: float = 1.0
    sampled_weight: float = 1.0
    full_pass: bool = True
    reuse_prefix: str = "auto"
    lambda_gl: float = 1e-3
    lambda_epochs: int | None = None
    group_weights: str = "uniform"
    hierarchical: bool = True
    eps_ps: float = 1e-3
    shrink_every: int = 1
    warmup_epochs: int = 0
    target: str | None = None
    target_by: float = 0.6

    def __post_init__(self) -> None:
        check_bool("full_pass", self.full_pass)
        check_bool("hierarchical", self.hierarchical)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_number("sample_fraction", self.sample_fraction, 0.0, strict=True, high=1.0)
        check_number("sampled_batch", self.sampled_batch, 0.0, strict=True, high=1.0)
        check_number("sampled_weight", self.sampled_weight, 0.0, strict=True)
        check_choice("reuse_prefix", self.reuse_prefix, REUSE_MODES)
        if self.sampled_batch < 1 and not self.full_pass:
            raise ConfigError(f"sampled_batch={self.sampled_batch!r} needs the full pass: without it the sampled "
                              f"pass is the only one and trains on the whole batch")
        if self.sampled_weight != 1 and not self.full_pass:
            raise ConfigError(f"sampled_weight={self.sampled_weight!r} weighs the sampled pass against the full "
                              f"pass; without the full pass there is nothing to weigh it against")
        if self.sampled_batch < 1 and self.reuse_prefix == "on":
            raise ConfigError(f"sampled_batch={self.sampled_batch!r} cannot reuse the full pass's prefix (its "
                              f"recorded outputs are the whole batch's); use reuse_prefix='auto' or 'off'")
        check_number("lambda_gl", self.lambda_gl, 0.0)
        if self.lambda_epochs is not None:
            check_int("lambda_epochs", self.lambda_epochs, 1)
        check_choice("group_weights", self.group_weights, GROUP_WEIGHTS)
        check_number("eps_ps", self.eps_ps, 0.0)
        check_int("shrink_every", self.shrink_every, 1)
        check_int("warmup_epochs", self.warmup_epochs, 0)
        parse_target(self.target)
        check_number("target_by", self.target_by, 0.0, strict=True, high=1.0)
        if self.target is not None and self.lambda_gl == 0:
            raise ConfigError(f"target={self.target!r} steers the group-lasso weight, which starts at lambda_gl; "
                              f"give lambda_gl > 0")
