"""Name → factory registries, so that a spec can name a model, dataset or loss.

Adding a new student family, dataset, distillation loss or early-stopping rule
is one decorated function::

    @MODELS.register("my_net")
    def my_net(input_shape, num_classes, width, **options): ...
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from kdtune.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named collection of factories of one kind ("model", "dataset", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; duplicate names are a bug."""

        def decorator(fn: F) -> F:
            if name in self._entries and self._entries[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The factory called ``name``; a :class:`ConfigError` listing the allowed names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                self.kind, f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test or a plugin being reloaded); unknown names are ignored."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def registration_order(self) -> list[str]:
        """Registered names in the order they were registered."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
