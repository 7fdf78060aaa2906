"""A name → entry table: the one extension mechanism of the package.

Datasets, models, layer handlers, training methods, rank samplers, optimisers, LR schedules and
presets are each a :class:`Registry`; configurations validate names against them and the command
line builds its choices from them, so a registration is all it takes to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import ConfigError

Factory = TypeVar("Factory", bound=Callable)


class Registry(dict):
    """Entries by name, added with a decorator or :meth:`add`; unknown names fail with the list of known ones."""

    def __init__(self, kind: str, entries: dict[str, object] | None = None):
        super().__init__()
        self.kind = kind
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator adding a factory (or class) under ``name`` (a name can be registered only once)."""

        def decorate(factory: Factory) -> Factory:
            self.add(name, factory)
            return factory

        return decorate

    def add(self, name: str, entry: object) -> None:
        """Add ``entry`` (a factory, a class or a table) under ``name`` (a name can be added only once)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self[name] = entry

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self)

    def lookup(self, name: str) -> Callable:
        """The factory registered as ``name``, or a ValueError listing the available names."""
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self[name]
