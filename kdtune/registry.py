"""Name → factory registries, so that a spec can name a model, dataset or loss.

Adding a new student family, dataset, distillation loss or early-stopping rule
is one decorated function::

    @MODELS.register("my_net")
    def my_net(input_shape, num_classes, width, **options): ...
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from kdtune.errors import ConfigError

F = TypeVar("F", bound=Callable)


def definition_origin(obj: Any) -> tuple[str, str] | None:
    """Where ``obj`` was defined: ``(module, qualname)``, or None when that does not
    name one definition (a lambda, a function defined inside another function).

    A module executed again (``importlib.reload``, a plugin imported again by a
    reused Ray actor or a resumed search, a loss shipped by value) makes new
    objects of the same definitions: they have the same origin.
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return module, qualname


class Registry(Generic[F]):
    """A named collection of factories of one kind ("model", "dataset", ...)."""

    def __init__(self, kind: str, origin: Callable[[F], tuple[str, str] | None] = definition_origin) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}
        # What identifies an entry's definition (see definition_origin); LOSSES looks
        # at the objective's soft term.
        self._origin = origin

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``.

        A name that is taken is an error, unless ``fn`` is the same object or the
        same definition executed again (:meth:`is_reregistration`): then the new
        object replaces the old one, keeping its place in the registration order.
        """

        def decorator(fn: F) -> F:
            if name in self._entries and not self.is_reregistration(name, fn):
                where = self._origin(self._entries[name])
                by = f" by {where[0]}.{where[1]}" if where else ""
                raise ValueError(f"{self.kind} {name!r} is already registered{by}; choose another name")
            self._entries[name] = fn
            return fn

        return decorator

    def is_reregistration(self, name: str, fn: F) -> bool:
        """Whether registering ``fn`` as ``name`` registers what is already there
        again: the same object, or an object of the same definition (module and
        qualified name), as when a module is imported again."""
        if name not in self._entries:
            return False
        current = self._entries[name]
        if current is fn:
            return True
        origin = self._origin(fn)
        return origin is not None and origin == self._origin(current)

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
