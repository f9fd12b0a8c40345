"""Model loading: a timm (or torchvision) architecture by name, weights from a local
file (safetensors or a tensors-only torch file), the assets folder, or the hub."""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from .data import asset_model_file
from .errors import UnknownModelError, WeightsError

__all__ = ["create_model", "load_model", "load_weights", "model_transform", "TORCHVISION_PREFIX"]

TORCHVISION_PREFIX = "torchvision:"


def create_model(name: str) -> nn.Module:
    """The architecture ``name`` with random weights (timm name, or ``torchvision:NAME``)."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        arch = name[len(TORCHVISION_PREFIX):]
        try:
            return torchvision.models.get_model(arch, weights=None)
        except (ValueError, KeyError):
            raise UnknownModelError(f"unknown torchvision model {arch!r}") from None
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return timm.create_model(name, pretrained=False)


def _read_state_dict(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise WeightsError(f"weights path {str(path)!r} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, pickled code, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"cannot read weights file {str(path)!r}: {first}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {str(path)!r} holds no state dict of tensors")
    return sd


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a state dict file into ``model``; refuse files that do not fit it."""
    path = Path(path)
    sd = _read_state_dict(path)
    own = model.state_dict()
    for k in own:  # BatchNorm step counters are not weights; many published files omit them
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(sd[k].shape)} vs model "
                         f"{tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise WeightsError(f"weights file {path.name!r} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def load_model(name: str, weights=None, hub: bool = True) -> nn.Module:
    """Create ``name`` and load pretrained weights.

    Weights come from ``weights`` (a file) if given, else from the assets folder
    (``$EVOLQ_ASSETS/models``), else from timm's hub when ``hub`` is true.
    """
    model = create_model(name)
    if weights is None and not name.startswith(TORCHVISION_PREFIX):
        weights = asset_model_file(name)
    if weights is not None:
        load_weights(model, weights)
    elif name.startswith(TORCHVISION_PREFIX):
        raise WeightsError(f"{name!r} needs a local weights file (no torchvision download here): pass weights")
    elif hub:
        import timm

        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:
            raise WeightsError(f"no local weights for {name!r} and the hub is unreachable "
                               f"({type(e).__name__}); pass a weights file") from None
    return model.eval()


def model_transform(model: nn.Module):
    """The evaluation transform from the model's timm ``pretrained_cfg``
    (ImageNet defaults for models without one)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**cfg)
