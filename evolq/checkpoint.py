"""Atomic checkpoints: tensors in one safetensors file, progress as JSON in its
metadata, written to a temporary file and renamed into place."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "fingerprint", "CKPT_NAME"]

CKPT_NAME = "checkpoint.safetensors"


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts and tensors (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"evolq": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old or the new file, never half of one


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["evolq"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(e).__name__})") from None
    return tensors, meta
