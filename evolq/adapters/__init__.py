"""Adapters map model families to blocks (one family per file, registered by name).

``wrap_model(model, quant)`` finds the adapter for ``model``, fake-quantizes it in
place and returns its ``QModel`` block view. A new family is one file plus one
import line below.
"""
# isort: off  (registration order: the order families are listed and matched in)
from . import (
    efficientnet,  # noqa: F401  (registers)
    levit,  # noqa: F401  (registers)
    resnet,  # noqa: F401  (registers)
    swin,  # noqa: F401  (registers)
    torchvision_vit,  # noqa: F401  (registers)
    vit,  # noqa: F401  (registers)
)
from ._registry import ADAPTERS, IMAGES, Adapter, InputSpec, adapter_for, get_adapter, list_adapters, register_adapter

# isort: on

__all__ = ["ADAPTERS", "IMAGES", "Adapter", "InputSpec", "adapter_for", "get_adapter", "list_adapters",
           "register_adapter", "wrap_model", "check_inputs"]


def wrap_model(model, quant, arch: str = ""):
    """Wrap ``model``'s layers with (uncalibrated) quantizers; returns the ``QModel``. With
    ``quant.rotation`` the float model is rotated first (``evolq.qnn.rotate``, at the adapter's
    ``rotation_plan``): here, so a saved model is rebuilt in its rotated form (the online MLP
    transform; the weights come from the saved state) and the allocation's proxy is rotated too.
    ``ConfigError`` when ``quant`` asks for OFQ's QKR and the family has no attention it
    can be built on (checked before anything is wrapped)."""
    from ..errors import ConfigError, EvolQError
    from ..qnn.builder import apply_edge_bits, qkr_requested
    from ..qnn.layer_bits import apply_layer_bits
    from ..qnn.layers import quantizers_of

    if quantizers_of(model):
        raise EvolQError("this model is already quantized; pass a fresh float model")
    adapter = adapter_for(model)
    if qkr_requested(quant) and not adapter.supports_qkr:
        raise ConfigError(f"ofq qkr (query-key reparameterization) needs timm ViT/DeiT attention (q and k rows of one "
                          f"qkv Linear); {adapter.name} models ({adapter.description}) have none: use qkr=false")
    rotation = None
    if getattr(quant, "rotation", "none") != "none":  # an exact float transform, before anything is wrapped
        from ..qnn.rotate import rotate_model

        rotation = rotate_model(model, adapter.rotation_plan(model), quant, family=adapter.name)
    qmodel = adapter.wrap(model, quant, arch=arch)
    qmodel.rotation_report = rotation
    apply_edge_bits(qmodel.model, quant)
    apply_layer_bits(qmodel, quant)  # after edge_bits: an explicit entry wins
    return qmodel


def check_inputs(qmodel, x) -> None:
    """Check ``x`` against the adapter's ``input_spec`` and run one float sample
    through the model, so a wrong input is a ``DataError``, not a torch traceback."""
    import torch

    from ..errors import DataError, EvolQError

    spec = ADAPTERS.get(qmodel.family).input_spec if qmodel.family in ADAPTERS else None
    if spec is not None and spec.ndim is not None and x.ndim != spec.ndim:
        raise DataError(f"a {qmodel.family} model takes {spec.shape or f'{spec.ndim}-D inputs'}; "
                        f"got {tuple(x.shape)}")
    qmodel.set_quant_enabled(False)
    try:
        with torch.no_grad():
            qmodel.model(x[:1])
    except EvolQError:
        raise
    except Exception as e:
        raise DataError(f"the model cannot run on inputs shaped {tuple(x.shape[1:])}: "
                        f"{str(e).splitlines()[0][:160]}") from None
    finally:
        qmodel.set_quant_enabled(True)
