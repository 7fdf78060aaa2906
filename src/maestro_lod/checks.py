"""Argument checks shared by the model builders, the theory demos and the configs."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from .errors import ConfigError, ConfigTypeError

Config = TypeVar("Config")


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (bools refused), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int")
    return value


def dataclass_from_dict(cls: type[Config], data: Any, what: str) -> Config:
    """``cls(**data)`` for a dataclass, refusing a non-dict and unknown keys by name (``what`` names
    a key in the message, e.g. "training option")."""
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)
