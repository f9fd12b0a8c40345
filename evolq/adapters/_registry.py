"""Adapter registry: family name -> adapter, and lookup of the adapter for a model."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["Adapter", "register_adapter", "get_adapter", "adapter_for", "list_adapters"]

_ADAPTERS: dict[str, "Adapter"] = {}

GUIDE = "see docs/adapters.md to write one"


class Adapter:
    """Maps one model family to blocks. Subclasses set ``name`` and implement
    ``matches`` and ``quantize``; ``families`` is a human-readable list for errors."""

    name = ""
    description = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def quantize(self, model: nn.Module, config, arch: str = ""):
        """Fake-quantize ``model`` in place and return its ``QModel``."""
        raise NotImplementedError


def register_adapter(cls):
    """Class decorator: register an adapter class under ``cls.name``."""
    inst = cls()
    if not inst.name:
        raise ValueError("adapter needs a name")
    _ADAPTERS[inst.name] = inst
    return cls


def list_adapters() -> dict[str, str]:
    return {n: a.description for n, a in _ADAPTERS.items()}


def get_adapter(name: str) -> Adapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"no adapter named {name!r}; available: {', '.join(sorted(_ADAPTERS))}") from None


def adapter_for(model: nn.Module) -> Adapter:
    for a in _ADAPTERS.values():
        if a.matches(model):
            return a
    fams = "; ".join(f"{n} ({a.description})" for n, a in _ADAPTERS.items())
    raise UnsupportedModelError(
        f"no adapter supports {type(model).__name__}; supported families: {fams}; {GUIDE}")
