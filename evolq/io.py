"""Saving and loading a quantized model. ``atomic_write``, ``write_json`` and
``replace_hooks`` live in ``evolq.fsio`` (re-exported here)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from torch import nn

from .config import QuantConfig
from .errors import CheckpointError, ConfigError, EvolQError
from .fsio import atomic_write, replace_hooks, write_json
from .qnn.qmodel import QModel

__all__ = ["atomic_write", "write_json", "replace_hooks", "save_quantized", "load_quantized",
           "WEIGHTS_NAME", "META_NAME", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: the record is also embedded in model.safetensors
WEIGHTS_NAME, META_NAME = "model.safetensors", "evolq.json"





# -- saved models ----------------------------------------------------------------


def _model_record(qmodel: QModel, arch: str, model_kwargs: dict) -> dict:
    return {"format": FORMAT_VERSION, "arch": arch, "family": qmodel.family, "model_kwargs": model_kwargs,
            "quant": dataclasses.asdict(qmodel.config)}


def save_quantized(qmodel: QModel, folder, model_kwargs: dict | None = None) -> Path:
    """Save as ``model.safetensors`` (every tensor, quantizer state included) plus
    ``evolq.json`` (architecture, constructor arguments, quantization config, the
    weights' SHA-256). No pickled code; both files are written atomically.

    Args:
        qmodel: a quantized model (``prepare_model`` / ``quantize_model``).
        folder: output folder (created).
        model_kwargs: extra arguments the architecture was built with
            (``timm.create_model(arch, **model_kwargs)``), e.g. ``{"num_classes": 10}``.
    """
    from safetensors.torch import save as st_save

    if not isinstance(qmodel, QModel):
        raise ConfigError(f"save_quantized takes a QModel, got {type(qmodel).__name__}")
    arch = qmodel.arch or (getattr(qmodel.model, "pretrained_cfg", None) or {}).get("architecture", "")
    if not arch:
        raise ConfigError("the model's architecture name is unknown; pass arch= to prepare_model/quantize_model")
    if not dataclasses.is_dataclass(qmodel.config):
        raise ConfigError("this QModel has no quantization config (built by hand?); only adapter-built models "
                          "can be saved and rebuilt")
    model_kwargs = dict(model_kwargs or {})
    try:
        json.dumps(model_kwargs)
    except (TypeError, ValueError):
        raise ConfigError("model_kwargs must be JSON-able (numbers, strings, lists, dicts)") from None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    record = _model_record(qmodel, arch, model_kwargs)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.model.state_dict().items()}
    # the record is also stored inside the weights file, so a weights file and an
    # evolq.json that do not belong together are detected on loading
    blob = st_save(sd, metadata={"evolq": json.dumps(record, sort_keys=True)})
    atomic_write(folder / WEIGHTS_NAME, blob)
    meta = dict(record, sha256=hashlib.sha256(blob).hexdigest())
    atomic_write(folder / META_NAME, json.dumps(meta, indent=2).encode())
    return folder


def _build_model(arch: str, model_kwargs: dict) -> nn.Module:
    from .models import TORCHVISION_PREFIX, create_model

    if not model_kwargs:
        return create_model(arch)
    try:
        if arch.startswith(TORCHVISION_PREFIX):
            import torchvision

            return torchvision.models.get_model(arch[len(TORCHVISION_PREFIX):], weights=None, **model_kwargs)
        import timm

        if not timm.is_model(arch.split(".")[0]):
            return create_model(arch)  # raises UnknownModelError with suggestions
        return timm.create_model(arch, pretrained=False, **model_kwargs)
    except EvolQError:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"cannot build {arch!r} with {model_kwargs}: {first}") from None


def load_quantized(folder, model: nn.Module | None = None) -> QModel:
    """Load a model saved by ``save_quantized``; refuses tampered or mismatched files.

    Args:
        folder: the folder ``save_quantized`` wrote.
        model: optionally, a float model of the saved architecture to load into
            (quantized in place); by default it is built from the saved name and
            constructor arguments.

    Raises ``CheckpointError`` when a file is missing or unreadable, the weights do
    not match the SHA-256 in ``evolq.json``, the two files do not belong together,
    or the tensors do not fit the architecture.
    """
    from safetensors.torch import load as st_load

    folder = Path(folder)
    meta_path, weights = folder / META_NAME, folder / WEIGHTS_NAME
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{str(folder)!r} holds no saved evolq model (evolq.json + model.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise TypeError("not an object")
        arch, quant, kwargs = meta["arch"], QuantConfig(**meta["quant"]), meta.get("model_kwargs") or {}
        if not isinstance(arch, str) or not isinstance(kwargs, dict):
            raise TypeError("arch or model_kwargs has the wrong type")
    except (ValueError, KeyError, TypeError, EvolQError) as e:
        raise CheckpointError(f"{str(meta_path)!r} is not a valid evolq.json "
                              f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported format {meta.get('format')!r} in {str(meta_path)!r}")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{str(weights)!r} does not match the hash in evolq.json: tampered or mismatched")
    try:
        sd = st_load(blob)  # the very bytes that were hashed
        n = int.from_bytes(blob[:8], "little")
        inner = json.loads((json.loads(blob[8:8 + n]).get("__metadata__") or {}).get("evolq", "null"))
    except Exception as e:
        raise CheckpointError(f"cannot read {str(weights)!r} ({type(e).__name__})") from None
    record = {k: meta.get(k) for k in ("format", "arch", "family", "model_kwargs", "quant")}
    record["model_kwargs"] = record["model_kwargs"] or {}
    if inner != json.loads(json.dumps(record, sort_keys=True)):
        raise CheckpointError(f"{str(meta_path)!r} does not describe {str(weights)!r} (architecture or "
                              f"quantization settings differ): tampered or mismatched")
    if model is None:
        model = _build_model(arch, kwargs)
    elif not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
    from .adapters import wrap_model

    qmodel = wrap_model(model.eval(), quant, arch=arch)
    if meta.get("family") and qmodel.family != meta["family"]:
        raise CheckpointError(f"saved model is a {meta['family']!r} model, the given one a {qmodel.family!r} model")
    try:
        qmodel.model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"saved tensors do not fit {arch}: {str(e).splitlines()[0][:200]}") from None
    return qmodel
