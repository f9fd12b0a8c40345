"""The public entry points: ``prepare_model`` (the FQ-ViT start point) and
``quantize_model`` (start point + Evol-Q search), plus saving and loading."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import quantize_structure
from .calibrate import calibrate
from .checkpoint import CKPT_NAME, fingerprint, read_checkpoint_meta
from .config import EvolQConfig, QuantConfig
from .errors import CheckpointError, ConfigError, DataError, EvolQError
from .qmodel import QModel

__all__ = ["prepare_model", "quantize_model", "as_tensor_data", "split_calibration", "check_run_folder",
           "run_settings", "save_quantized", "load_quantized"]

FORMAT_VERSION = 2  # 2: the record is also embedded in model.safetensors


def as_tensor_data(data, name: str = "calibration data") -> torch.Tensor:
    """Turn a tensor, a DataLoader (batches) or a dataset (single samples), each item a
    tensor or an (input, label) pair, into one float tensor of inputs; check it."""
    if isinstance(data, torch.Tensor):
        x = data
    else:
        try:
            parts = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
        except TypeError:
            raise DataError(f"{name} must be a tensor, a dataset or a DataLoader, got {type(data).__name__}") from None
        if not parts:
            raise DataError(f"{name} is empty")
        bad = [type(p).__name__ for p in parts if not isinstance(p, torch.Tensor)]
        if bad:
            raise DataError(f"{name} yields {bad[0]}, expected tensors or (tensor, label) pairs")
        batched = isinstance(data, torch.utils.data.DataLoader)
        shapes = {tuple(p.shape[1:] if batched else p.shape) for p in parts}
        if len(shapes) > 1:
            raise DataError(f"{name} has inconsistent sample shapes: {sorted(shapes)[:3]}")
        x = torch.cat(parts) if batched else torch.stack(parts)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{name} is empty")
    if not x.is_floating_point():
        raise DataError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or inf values")
    return x.float()


def _check_input_shape(qmodel: QModel, x: torch.Tensor) -> None:
    family = qmodel.family
    if family in ("vit", "swin", "levit", "efficientnet", "resnet", "torchvision_vit") and x.ndim != 4:
        raise DataError(f"a {family} model takes images shaped (N, 3, H, W); got {tuple(x.shape)}")
    try:
        with torch.no_grad():
            qmodel.model(x[:1])
    except EvolQError:
        raise
    except Exception as e:
        raise DataError(f"the model cannot run on inputs shaped {tuple(x.shape[1:])}: "
                        f"{str(e).splitlines()[0][:160]}") from None


def prepare_model(model: nn.Module, calib_data, quant: QuantConfig | None = None, arch: str = "",
                  progress: bool = False) -> QModel:
    """Quantize ``model`` in place (FQ-ViT regime) and calibrate it: the start point."""
    quant = quant or QuantConfig()
    quant.validate()
    x = as_tensor_data(calib_data)
    model.eval()
    qmodel = quantize_structure(model, quant, arch=arch)
    qmodel.set_quant_enabled(False)
    _check_input_shape(qmodel, x)
    qmodel.set_quant_enabled(True)
    calibrate(qmodel, x, progress=progress)
    return qmodel


def split_calibration(x: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split into (fitness set, hold-out set)."""
    n = x.shape[0]
    n_hold = int(round(n * holdout))
    if holdout > 0 and n_hold == 0 and n >= 2:
        n_hold = 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return x[perm[n_hold:]], x[perm[:n_hold]]


# settings that do not change the result (or only by float rounding) and may differ on resume
RESUME_FREE = ("progress", "max_batch", "device")


def run_settings(config: EvolQConfig) -> dict:
    """The settings a resumed run must share with the run it continues."""
    d = config.to_dict()
    return {"quant": d["quant"], "search": {k: v for k, v in d["search"].items() if k not in RESUME_FREE}}


def _device(name) -> torch.device:
    try:
        dev = torch.device(name)
        torch.zeros(1, device=dev)
    except Exception as e:
        raise ConfigError(f"device {name!r} is not usable here ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    return dev


def check_run_folder(checkpoint_dir, config: EvolQConfig | None = None, resume: bool = False) -> Path | None:
    """Check a run folder before any expensive work; returns it as a ``Path``.

    Raises ``CheckpointError`` if it holds a checkpoint and ``resume`` is false, if
    that checkpoint is unreadable, or if it was written with other settings than
    ``config`` (naming them); ``ConfigError`` for ``resume`` without a folder.
    A folder without a checkpoint is fine either way (``resume`` then starts afresh).
    """
    if checkpoint_dir is None:
        if resume:
            raise ConfigError("resume needs the checkpoint folder of the run to continue")
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} exists and is not a folder")
    ckpt = folder / CKPT_NAME
    if not ckpt.exists():
        return folder
    if not resume:
        raise CheckpointError(f"{str(folder)!r} already holds a run's checkpoint: resume it or choose another folder")
    meta = read_checkpoint_meta(ckpt)
    if config is not None and isinstance(meta.get("config"), dict) and meta["config"]:
        old, new = meta["config"], json.loads(json.dumps(run_settings(config), default=str))
        diffs = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {new[sec].get(k)!r}"
                 for sec in ("quant", "search") for k in sorted(set(old.get(sec, {})) | set(new[sec]))
                 if old.get(sec, {}).get(k) != new[sec].get(k)]
        if diffs:
            raise CheckpointError(f"cannot resume {str(folder)!r} with other settings ({'; '.join(diffs[:4])}); "
                                  f"use the original settings or another folder")
    return folder


def quantize_model(model: nn.Module | QModel, calib_data, config: EvolQConfig | None = None, *,
                   arch: str = "", checkpoint_dir=None, resume: bool = False):
    """Quantize ``model`` and improve its scales block by block with evolutionary search.

    Args:
        model: a float model (quantized in place and calibrated on ``calib_data``)
            or a ``QModel`` from ``prepare_model`` (already calibrated).
        calib_data: tensor of inputs, dataset or DataLoader (labels are ignored).
        config: ``EvolQConfig``; defaults are the paper's/the authors' settings.
        arch: architecture name, recorded for saving and loading.
        checkpoint_dir: folder for an atomic checkpoint after every block (one run
            per folder; see docs/reliability.md).
        resume: continue from the checkpoint in ``checkpoint_dir`` (same settings,
            model and data only); the result equals an uninterrupted run's. Without
            a checkpoint there, the run starts afresh.

    Returns:
        ``(qmodel, report)``: the quantized model (``qmodel.model`` is the module)
        and a JSON-able report (per block: start/final fitness, evaluations,
        seconds; per pass: hold-out loss before/after and whether it was kept).

    Raises:
        ConfigError, DataError, UnsupportedModelError, CheckpointError: user
        mistakes, with one-line messages. ``KeyboardInterrupt`` propagates after
        the model (and the checkpoint) are back at the last finished block.
    """
    from .engine import SearchEngine

    config = config or EvolQConfig()
    if not isinstance(config, EvolQConfig):
        raise ConfigError(f"config must be an EvolQConfig, got {type(config).__name__}")
    config.quant.validate()
    config.search.validate()
    scfg = config.search
    x = as_tensor_data(calib_data)
    fit_x, hold_x = split_calibration(x, scfg.holdout, scfg.seed)
    if scfg.loss == "infonce" and fit_x.shape[0] < scfg.infonce_batch:
        raise DataError(f"the fitness set has {fit_x.shape[0]} samples (after holding out {hold_x.shape[0]}), fewer "
                        f"than the infoNCE batch of {scfg.infonce_batch}: give more calibration data or lower "
                        f"infonce_batch")
    ckpt_dir = check_run_folder(checkpoint_dir, config, resume)
    t0 = time.perf_counter()
    if isinstance(model, QModel):
        qmodel = model
    else:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
        qmodel = prepare_model(model, x, config.quant, arch=arch, progress=scfg.progress)
    qmodel.model.to(_device(scfg.device))
    fit_x, hold_x = fit_x.to(scfg.device), hold_x.to(scfg.device)
    summary = run_settings(config)
    run_id = fingerprint(qmodel.arch, qmodel.family, summary["quant"], summary["search"],
                         x[:: max(1, x.shape[0] // 16)])
    engine = SearchEngine(qmodel, fit_x, hold_x, scfg, config.quant.w_bits, ckpt_dir, run_id, summary)
    state = engine.run(resume=resume)
    report = {
        "config": config.to_dict(),
        "calibration": {"fitness_samples": int(fit_x.shape[0]), "holdout_samples": int(hold_x.shape[0])},
        "blocks": [{k: v for k, v in b.items() if k != "history"} for b in state["blocks"]],
        "passes": state["passes"],
        "evaluations": state["evaluations"],
        "search_seconds": state["seconds"],
        "seconds": time.perf_counter() - t0,
        "fitness_curve": [h for b in state["blocks"] for h in b["history"]],
    }
    return qmodel, report


# -- save / load -----------------------------------------------------------------
WEIGHTS_NAME, META_NAME = "model.safetensors", "evolq.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    import hashlib

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
    _atomic_write_bytes(folder / WEIGHTS_NAME, blob)
    meta = dict(record, sha256=hashlib.sha256(blob).hexdigest())
    _atomic_write_bytes(folder / META_NAME, json.dumps(meta, indent=2).encode())
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
        raise CheckpointError(f"cannot build {arch!r} with {model_kwargs}: {(str(e).splitlines() or [''])[0][:160]}") from None


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
    import hashlib

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
    qmodel = quantize_structure(model.eval(), quant, arch=arch)
    if meta.get("family") and qmodel.family != meta["family"]:
        raise CheckpointError(f"saved model is a {meta['family']!r} model, the given one a {qmodel.family!r} model")
    try:
        qmodel.model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"saved tensors do not fit {arch}: {str(e).splitlines()[0][:200]}") from None
    return qmodel
