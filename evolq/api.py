"""The public entry points: ``prepare_model`` (the FQ-ViT start point) and
``quantize_model`` (start point + Evol-Q search), plus saving and loading."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import quantize_structure
from .calibrate import calibrate
from .checkpoint import CKPT_NAME, fingerprint
from .config import EvolQConfig, QuantConfig
from .errors import CheckpointError, ConfigError, DataError, EvolQError
from .qmodel import QModel

__all__ = ["prepare_model", "quantize_model", "as_tensor_data", "split_calibration",
           "save_quantized", "load_quantized"]

FORMAT_VERSION = 1


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


def quantize_model(model: nn.Module | QModel, calib_data, config: EvolQConfig | None = None, *,
                   arch: str = "", checkpoint_dir=None, resume: bool = False):
    """Quantize ``model`` and improve its scales block by block with evolutionary search.

    Args:
        model: a float model (quantized in place and calibrated on ``calib_data``)
            or a ``QModel`` from ``prepare_model`` (already calibrated).
        calib_data: tensor of inputs, dataset or DataLoader (labels are ignored).
        config: ``EvolQConfig``; defaults are the paper's/the authors' settings.
        arch: architecture name, recorded for saving and loading.
        checkpoint_dir: folder for a checkpoint after every block.
        resume: continue from the checkpoint in ``checkpoint_dir`` (same run only).

    Returns:
        ``(qmodel, report)``: the quantized model (``qmodel.model`` is the module)
        and a JSON-able report (per block: start/final fitness, evaluations,
        seconds; per pass: hold-out loss before/after and whether it was kept).
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
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and (ckpt_dir / CKPT_NAME).exists() and not resume:
        raise CheckpointError(f"{str(ckpt_dir)!r} already holds a run's checkpoint: resume it or choose another folder")
    t0 = time.perf_counter()
    if isinstance(model, QModel):
        qmodel = model
    else:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
        qmodel = prepare_model(model, x, config.quant, arch=arch, progress=scfg.progress)
    qmodel.model.to(scfg.device)
    fit_x, hold_x = fit_x.to(scfg.device), hold_x.to(scfg.device)
    run_id = fingerprint(qmodel.arch, qmodel.family, config.to_dict()["quant"],
                         {k: v for k, v in config.to_dict()["search"].items() if k not in ("progress", "max_batch", "device")},
                         x[:: max(1, x.shape[0] // 16)])
    engine = SearchEngine(qmodel, fit_x, hold_x, scfg, config.quant.w_bits, ckpt_dir, run_id)
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
def save_quantized(qmodel: QModel, folder) -> Path:
    """Save as ``model.safetensors`` (every tensor, quantizer state included) plus
    ``evolq.json`` (architecture, config, file hash). No pickled code."""
    import hashlib

    from safetensors.torch import save_file

    if not qmodel.arch:
        raise EvolQError("the model's architecture name is unknown; pass arch= to prepare_model/quantize_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(sd, str(tmp))
    tmp.replace(folder / "model.safetensors")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    meta = {"format": FORMAT_VERSION, "arch": qmodel.arch, "family": qmodel.family,
            "quant": dataclasses.asdict(qmodel.config), "sha256": digest}
    (folder / "evolq.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_quantized(folder) -> QModel:
    """Load a model saved by ``save_quantized``; refuses tampered or mismatched files."""
    import hashlib

    from safetensors.torch import load_file

    from .models import create_model

    folder = Path(folder)
    meta_path, weights = folder / "evolq.json", folder / "model.safetensors"
    if not meta_path.exists() or not weights.exists():
        raise CheckpointError(f"{str(folder)!r} holds no saved evolq model (evolq.json + model.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
        arch, quant = meta["arch"], QuantConfig(**meta["quant"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(meta_path)!r} is not a valid evolq.json ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported format {meta.get('format')!r} in {str(meta_path)!r}")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{str(weights)!r} does not match the hash in evolq.json: tampered or mismatched")
    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"cannot read {str(weights)!r} ({type(e).__name__})") from None
    model = create_model(arch).eval()
    qmodel = quantize_structure(model, quant, arch=arch)
    try:
        qmodel.model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"saved tensors do not fit {arch}: {str(e).splitlines()[0][:200]}") from None
    return qmodel
