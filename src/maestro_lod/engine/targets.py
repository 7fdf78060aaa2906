"""Size targets, one grammar for training, ``compress`` and ``bench``: ``KEY=VALUE``.

A target names what to bound and by how much: ``params=0.3`` and ``macs=0.3`` are the exported
model's parameters or MACs per sample as a fraction of the dense model's; ``latency=0.5`` its
estimated latency, and ``max_drop=0.01`` the accuracy it may lose against the trained model. Each
context accepts its own keys (:data:`TRAINING` steers training towards a size, so only the two
costs it can measure during training; :data:`COMPRESS` selects points of a trained model's
front), and every value lies in (0, 1]. The dense cost a fraction refers to is answered in one
place, :func:`dense_cost`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import ConfigError


class Target(NamedTuple):
    """One parsed target: its key (``params``, ``macs``, ``latency``, ``max_drop``) and value."""

    kind: str
    value: float


@dataclass(frozen=True)
class TargetKeys:
    """The keys a context accepts, and what its messages call a key (``cost`` while training,
    ``target`` when compressing)."""

    keys: tuple[str, ...]
    noun: str


TRAINING = TargetKeys(("params", "macs"), "cost")
"""Targets a training run can steer towards: the exported model's parameters or MACs."""
COMPRESS = TargetKeys(("params", "macs", "latency", "max_drop"), "target")
"""Targets that pick a point of a trained model's front (``maestro-lod compress --target``)."""

_MEANING = {"params": "of the dense model's params", "macs": "of the dense model's macs",
            "latency": "of the dense model's latency", "max_drop": "accuracy lost against the trained model"}


def check_target(key: str, value: Any, allowed: TargetKeys = COMPRESS) -> Target:
    """``key`` and ``value`` as a :class:`Target`: a key ``allowed`` knows and a number in (0, 1],
    else a one-line ConfigError naming both."""
    if key not in allowed.keys:
        raise ConfigError(f"unknown {allowed.noun} {key!r}; known: {', '.join(allowed.keys)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise ConfigError(f"target {key}={value!r} must be in (0, 1] ({_MEANING[key]})")
    return Target(key, float(value))


def parse_target(text: Any, allowed: TargetKeys = TRAINING) -> Target | None:
    """``"params=0.3"`` → ``Target("params", 0.3)`` (equal to ``("params", 0.3)``); None stays None;
    anything else is a one-line ConfigError quoting ``text``."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConfigError(f"target={text!r} must be a string KEY=VALUE such as 'macs=0.3' "
                          f"(KEY: {', '.join(allowed.keys)})")
    key, sep, number = text.partition("=")
    key = key.strip()
    if not sep or key not in allowed.keys:
        raise ConfigError(f"target={text!r}: unknown {allowed.noun} {key!r}; use "
                          f"{' or '.join(f'{k}=VALUE' for k in allowed.keys)}")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"target={text!r}: {number.strip()!r} is not a number") from None
    try:
        return check_target(key, value, allowed)
    except ConfigError as error:
        raise ConfigError(f"target={text!r}: {error}") from None


DENSE_COSTS = ("params", "macs", "latency")


def dense_cost(holder: Any, kind: str) -> float:
    """The dense model's cost of ``kind`` (params, macs, latency) that ``holder`` knows: a training
    run or a front, which keep it as ``dense_params``, ``dense_macs`` and ``dense_latency``."""
    if kind not in DENSE_COSTS:
        raise ConfigError(f"unknown cost {kind!r}; known: {', '.join(DENSE_COSTS)}")
    return getattr(holder, f"dense_{kind}")
