"""Adapters map model families to blocks (one family per file, registered by name).

``quantize(model, config)`` finds the adapter for ``model``, fake-quantizes it in
place and returns its ``QModel`` block view.
"""
from ._registry import Adapter, adapter_for, get_adapter, list_adapters, register_adapter
from . import vit  # noqa: F401  (registers)
from . import swin  # noqa: F401  (registers)
from . import levit  # noqa: F401  (registers)
from . import torchvision_vit  # noqa: F401  (registers)
from . import efficientnet  # noqa: F401  (registers)
from . import resnet  # noqa: F401  (registers)

__all__ = ["Adapter", "adapter_for", "get_adapter", "list_adapters", "register_adapter", "quantize_structure"]


def quantize_structure(model, config, arch: str = ""):
    """Wrap ``model``'s layers with (uncalibrated) quantizers; returns the ``QModel``."""
    from ..layers import quantizers_of
    from ..errors import EvolQError

    if quantizers_of(model):
        raise EvolQError("this model is already quantized; pass a fresh float model")
    return adapter_for(model).quantize(model, config, arch=arch)
