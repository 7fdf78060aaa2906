"""A name → factory table: the mechanism behind the dataset and model registries."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import ConfigError

Factory = TypeVar("Factory", bound=Callable)


class Registry(dict):
    """Factories by name, added with a decorator; unknown names fail with the list of known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator adding a factory under ``name`` (a name can be registered only once)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(factory: Factory) -> Factory:
            if name in self:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self)

    def lookup(self, name: str) -> Callable:
        """The factory registered as ``name``, or a ValueError listing the available names."""
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self[name]
