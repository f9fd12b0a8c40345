"""One registry pattern for every kind of plug-in: adapters, searchers, losses.

A ``Registry`` maps a name to an entry (a class, a factory or a function). Entries
register themselves where they are defined, with a decorator::

    @register_loss("mse")
    def mse(out, ref, **_): ...

and the configuration, the CLI (``choices=``) and error messages read the names back
from the registry instead of restating them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in registration order.

    Args:
        kind: what the entries are, for messages ("searcher", "loss", ...).
        error: the ``EvolQError`` subclass raised for an unknown name.
    """

    def __init__(self, kind: str, error: type[Exception] = ConfigError):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """``register(name, entry)``, or ``@register(name)`` as a decorator."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name")

        def add(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return add(entry) if entry is not None else add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextmanager
    def scoped(self):
        """Entries registered inside the ``with`` block are removed at its end (tests, examples)."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries.clear()
            self._entries.update(saved)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
