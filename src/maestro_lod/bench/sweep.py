"""Sensitivity sweeps: the ``--sweep KEY=V1,V2,...`` grammar, the grid's points, and which part of
a point applies to which method."""

from __future__ import annotations

import itertools
import math

from ..errors import ConfigError, UsageError
from ..engine.targets import parse_target
from ..training.methods import METHODS, MaestroMethod
from .suites import VARIANTS

SWEEP_KEYS: dict[str, tuple[type, str]] = {
    "lambda_gl": (float, "maestro"),
    "eps_ps": (float, "maestro"),
    "target": (str, "maestro"),
    "epochs": (int, "every"),
}
"""Options ``--sweep`` can vary → (value type, which cells it varies in: MAESTRO cells only, or every cell)."""
SWEEP_METHODS = ("dense", "maestro")
"""The methods of a sweep without ``--methods``: the dense reference once, MAESTRO at every point."""


def split_names(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_sweep(items: list[str]) -> dict[str, list[float | int | str]]:
    """``["lambda_gl=1e-3,1e-2", "eps_ps=1e-4"]`` → ``{"lambda_gl": [0.001, 0.01], "eps_ps": [0.0001]}``
    (keys in the order given); ``"target=macs=0.5,macs=0.3"`` → ``{"target": ["macs=0.5", "macs=0.3"]}``.
    An unknown or repeated key, a value that is not a number of the key's type or not a size target,
    a negative λ or ε, a repeated value or epochs < 1 is a one-line :class:`UsageError`."""
    grid: dict[str, list[float | int | str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise UsageError(f"--sweep {item!r}: unknown key {key!r}; give KEY=V1,V2,... with KEY one of "
                             f"{', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise UsageError(f"--sweep {item!r}: {key} is swept twice; list all its values in one --sweep")
        kind = SWEEP_KEYS[key][0]
        values = []
        for part in split_names(text):
            value = _target_value(item, part) if kind is str else _number_value(item, key, kind, part)
            if value in values:
                raise UsageError(f"--sweep {item!r}: {key}={part} is listed twice")
            values.append(value)
        if not values:
            raise UsageError(f"--sweep {item!r}: no values; give {key}=V1,V2,...")
        grid[key] = values
    return grid


def _number_value(item: str, key: str, kind: type, part: str) -> float | int:
    """One swept number: an int of at least 1 (epochs) or a finite float of at least 0 (λ, ε)."""
    try:
        value = kind(part)
    except ValueError:
        raise UsageError(f"--sweep {item!r}: {part!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise UsageError(f"--sweep {item!r}: {part!r} is not a finite number")
    if value < (1 if kind is int else 0):
        raise UsageError(f"--sweep {item!r}: {key}={part} must be {'at least 1' if kind is int else '>= 0'}")
    return value


def _target_value(item: str, part: str) -> str:
    """One swept size target in its canonical spelling (``"macs=0.50"`` → ``"macs=0.5"``)."""
    try:
        cost, fraction = parse_target(part)
    except ConfigError as error:
        raise UsageError(f"--sweep {item!r}: {error}") from None
    return f"{cost}={fraction:g}"


def axis_value(value: float | int | str) -> float:
    """A swept value as a number on a plot's axis (a size target by its fraction)."""
    return parse_target(value)[1] if isinstance(value, str) else float(value)


def grid_points(grid: dict[str, list[float | int]]) -> list[dict[str, float | int]]:
    """Every combination of the swept values (the first key varying slowest); ``[{}]`` without a sweep."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def applicable(point: dict[str, float | int], method: str) -> dict[str, float | int]:
    """The part of a grid point that changes ``method``'s cells: the ``every`` keys always, the
    MAESTRO keys only for a MAESTRO training method whose variant does not fix them."""
    name, overrides = VARIANTS[method]
    maestro = issubclass(METHODS[name], MaestroMethod)
    return {key: value for key, value in point.items()
            if SWEEP_KEYS[key][1] == "every" or (maestro and key not in overrides)}


def point_label(point: dict[str, float | int | str]) -> str:
    """``{"lambda_gl": 0.001, "eps_ps": 0.0001}`` → ``"lambda_gl=0.001,eps_ps=0.0001"`` (a directory name)."""
    return ",".join(f"{key}={value if isinstance(value, str) else repr(value)}" for key, value in point.items())
