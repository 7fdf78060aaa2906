"""Which layers to factorise and how: a validated, JSON-serialisable configuration."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .checks import check_seed, dataclass_from_dict, shown
from .errors import ConfigError, ConfigTypeError

INITS = ("svd", "random", "whitened")
DEFAULT_DAMPING = 1e-2


def _check_modules(value: Any, what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{what}={value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ConfigError(f"{what} is an empty list; use None to mean every supported layer")
        return list(value)
    raise ConfigTypeError(f"{what} must be None, a regex string or a list of module names, got {value!r}")


def check_rank(value: Any, what: str) -> None:
    """A rank is a positive int or a fraction in (0, 1] of the layer's full rank."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{what} must be an int or a float fraction, got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"{what}={value} must be a positive int")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ConfigError(f"{what}={value} must be a fraction in (0, 1]")


@dataclass
class FactorizeConfig:
    """How :func:`maestro_lod.factorize` picks and initialises layers.

    Attributes:
        target_modules: None for every supported layer; a string is a regex matched against the
            *whole* module name (``re.fullmatch``); a list's entries each match a name exactly or
            as a suffix after a dot (``"fc"`` matches ``"head.fc"``). So ``"0"`` selects only the
            top-level module ``0``, while ``["0"]`` also selects ``features.0`` and ``head.0``.
            A target that matches no supported layer is an error.
        exclude_modules: same forms; matching modules stay dense. An exclusion that matches no
            factorisable layer is warned about (it is probably misspelt).
        keep_ends: keep dense the first and the last layer that would otherwise be factorised (in
            the model's module order: usually the stem and the classifier), as Pufferfish and
            Cuttlefish do. Their factor pairs save little (a stem has few input channels, a
            classifier few outputs); in MAESTRO training, sampling their ranks trains sub-models
            that a greedy front seldom uses (it cuts them among the last) while it disturbs the
            full model; and a dense stem lets the sampled pass replay the full pass's first block.
            Where the first layer holds much of the cost (LeNet-5's first convolution: 31 % of the
            MACs), keeping it dense takes the deep cuts away.
        init: ``"svd"`` (exact at full rank, Eckart–Young at every truncation), ``"random"``, or
            ``"whitened"``: SVD weighted by the layer's inputs on calibration data, exact at full
            rank and with the smallest output error on that data at every truncation. It needs
            ``factorize(model, config, calibration=batches)`` (see
            :func:`maestro_lod.whitening.input_second_moments` for the batch forms).
        rank: start rank of every layer: None for full rank ``min(m, n)``; an int (capped at each
            layer's full rank); or a float fraction of the full rank (rounded up).
        rank_pattern: ``{name pattern: rank}`` overrides, matched like ``target_modules`` list
            entries or as a regex; an int above the matched layer's full rank is an error, a key
            matching no factorisable layer is warned about.
        min_rank: progressive shrinking never takes a layer below this rank (0 allowed: a layer
            at rank 0 outputs its bias). A layer whose full rank is smaller never shrinks;
            :func:`maestro_lod.factorize` warns when that holds for every layer it factorises.
        seed: seed of the random initialisation (``init="random"``): None or an int in
            0 … 2⁶⁴ − 1 (the range a ``torch.Generator`` takes).
        damping: ``init="whitened"`` adds ``damping · mean(diag C) · I`` to each layer's input
            second moment ``C`` before whitening (a finite float ≥ 0, relative to the mean input
            energy): it keeps the factorisation defined when the inputs span a subspace, and
            larger values move it towards plain SVD.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    keep_ends: bool = False
    init: str = "svd"
    rank: int | float | None = None
    rank_pattern: dict[str, int | float] = field(default_factory=dict)
    min_rank: int = 1
    seed: int | None = None
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        self.target_modules = _check_modules(self.target_modules, "target_modules")
        self.exclude_modules = _check_modules(self.exclude_modules, "exclude_modules")
        if not isinstance(self.keep_ends, bool):
            raise ConfigTypeError(f"keep_ends={shown(self.keep_ends)} must be true or false, "
                                  f"got {type(self.keep_ends).__name__}")
        if not isinstance(self.init, str):
            raise ConfigTypeError(f"init={shown(self.init)} must be one of {', '.join(INITS)}, got {type(self.init).__name__}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not one of {', '.join(INITS)}")
        if self.rank is not None:
            check_rank(self.rank, "rank")
        if not isinstance(self.rank_pattern, dict):
            raise ConfigTypeError(f"rank_pattern must be a dict of pattern -> rank, got {self.rank_pattern!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str):
                raise ConfigTypeError(f"rank_pattern key {shown(key)} must be a module name or regex string, "
                                      f"got {type(key).__name__}")
            _check_modules(key, "rank_pattern key")
            check_rank(value, f"rank_pattern[{key!r}]")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int):
            raise ConfigTypeError(f"min_rank={shown(self.min_rank)} must be a non-negative int, "
                                  f"got {type(self.min_rank).__name__}")
        if self.min_rank < 0:
            raise ConfigError(f"min_rank={self.min_rank!r} must be a non-negative int")
        check_seed(self.seed)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
            raise ConfigTypeError(f"damping must be a float, got {self.damping!r}")
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ConfigError(f"damping={self.damping!r} must be a finite float >= 0")
        self.damping = float(self.damping)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(to_dict())`` gives an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FactorizeConfig":
        """Build from a dict, refusing unknown keys by name."""
        return dataclass_from_dict(cls, data, "FactorizeConfig key")


def name_matches(name: str, spec: str | list[str] | None) -> bool:
    """Whether a module name matches a target/exclude spec (see :class:`FactorizeConfig`)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_matches(name: str, key: str) -> bool:
    """A ``rank_pattern`` key matches a name exactly, as a dotted suffix, or as a full regex."""
    return name == key or name.endswith("." + key) or re.fullmatch(key, name) is not None
