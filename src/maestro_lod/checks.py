"""Argument checks shared by the library's entry points, the model builders, the theory demos and
the configs. Each raises a :class:`~maestro_lod.errors.ConfigError` (a ``ValueError``) or a
:class:`~maestro_lod.errors.ConfigTypeError` (also a ``TypeError``) whose one-line message names
the argument and the value it got."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError

Config = TypeVar("Config")

SEED_RANGE = (0, 2**64 - 1)
"""Seeds a ``torch.Generator`` takes without remapping: 0 … 2⁶⁴ − 1."""


def _brief(value: Any) -> str:
    """``repr(value)``, with a module as ``Name(...)`` and a tensor as its shape and dtype."""
    if isinstance(value, nn.Module):
        return f"{type(value).__name__}(...)"
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (nn.Module, torch.Tensor)) for v in value):
        inner = ", ".join(_brief(v) for v in value[:3]) + (", …" if len(value) > 3 else "")
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line cut to ``limit`` characters (a module as ``Name(...)``, a tensor
    as its shape and dtype), for a one-line message."""
    text = " ".join(_brief(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (bools refused), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int")
    return value


def check_module(value: Any, name: str = "model") -> nn.Module:
    """``value`` if it is a ``torch.nn.Module`` instance, else a ConfigTypeError naming it (a module
    class passed where an instance is expected is told apart)."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        raise ConfigTypeError(f"{name}={value.__name__} is a module class, not a module: pass an instance, "
                              f"e.g. {value.__name__}(...)")
    raise ConfigTypeError(f"{name}={shown(value)} must be a torch.nn.Module, got {type(value).__name__}")


def check_seed(value: Any, name: str = "seed", optional: bool = True) -> int | None:
    """``value`` if it is an int a ``torch.Generator`` takes (0 … 2⁶⁴ − 1; None when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int or None" if optional else "an int"
        raise ConfigTypeError(f"{name}={shown(value)} must be {allowed}, got {type(value).__name__}")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..2**64-1")
    return value


def non_finite(tensor: torch.Tensor) -> str | None:
    """``"NaN"``, ``"inf"`` or None: what non-finite values a tensor holds (a tensor without values,
    on the meta device, holds none)."""
    if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return None
    with torch.no_grad():
        if bool(torch.isfinite(tensor).all()):
            return None
        return "NaN" if bool(torch.isnan(tensor).any()) else "inf"


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
