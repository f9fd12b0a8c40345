"""Adapter registry: family name -> adapter, and lookup of the adapter for a model.

An adapter states its metadata as data (``name``, ``description``, ``input_spec``,
``scopes``), the way a timm entrypoint states its ``pretrained_cfg``, and delegates
building to ``wrap``.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..registry import Registry

__all__ = ["Adapter", "InputSpec", "ADAPTERS", "register_adapter", "get_adapter", "adapter_for", "list_adapters"]

ADAPTERS: Registry[Adapter] = Registry("adapter", UnsupportedModelError)

GUIDE = "see docs/adapters.md to write one"


class InputSpec:
    """What a model takes: ``ndim`` dimensions (batch first; None: any) and a
    human-readable ``shape`` for error messages."""

    def __init__(self, ndim: int | None = None, shape: str = ""):
        self.ndim, self.shape = ndim, shape


IMAGES = InputSpec(4, "images shaped (N, 3, H, W)")


class Adapter:
    """Maps one model family to blocks.

    Subclasses set the metadata (``name``, ``description``; ``input_spec`` and
    ``scopes`` when they differ from the defaults) and implement ``matches`` and
    ``wrap``. Register them with ``@register_adapter``.
    """

    name = ""
    description = ""
    input_spec: InputSpec = InputSpec()
    scopes: tuple[str, ...] = ("attn-weights", "weights", "activations", "block")
    supports_qkr = False  # builds OFQ's query-key reparameterized attention (evolq.qnn.qkr) when asked

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def rotation_plan(self, model: nn.Module):
        """Where ``QuantConfig.rotation`` fuses exactly into the float ``model`` (an
        ``evolq.qnn.rotate.RotationPlan``), or None / a reason string: the family stays unrotated."""
        return None

    def wrap(self, model: nn.Module, quant, arch: str = ""):
        """Fake-quantize ``model`` in place (quantizers uncalibrated) and return its ``QModel``."""
        raise NotImplementedError


def register_adapter(cls):
    """Class decorator: register an adapter class under ``cls.name``."""
    inst = cls()
    if not inst.name:
        raise ValueError("adapter needs a name")
    ADAPTERS.register(inst.name, inst)
    return cls


def list_adapters() -> dict[str, str]:
    """Registered families: name -> description."""
    return {n: a.description for n, a in ADAPTERS.items()}


def get_adapter(name: str) -> Adapter:
    return ADAPTERS.get(name)


def adapter_for(model: nn.Module) -> Adapter:
    for a in ADAPTERS._entries.values():
        if a.matches(model):
            return a
    fams = "; ".join(f"{n} ({a.description})" for n, a in ADAPTERS.items())
    raise UnsupportedModelError(
        f"no adapter supports {type(model).__name__}; supported families: {fams}; {GUIDE}")
