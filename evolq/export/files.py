"""The file side of every export format: the output path checked before any work, the
example input traced with, and the atomic write (``evolq.fsio``) with one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ExportError
from ..fsio import atomic_write
from ..qnn.qmodel import QModel

__all__ = ["check_path", "example_input", "write_file"]


def example_input(qmodel: QModel, example):
    """``example`` checked, or zeros of the model's input size (batch 1) on its device."""
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise ExportError(f"example must be a tensor, got {type(example).__name__}")
        return example
    cfg = getattr(qmodel.model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    dev = next((p.device for p in qmodel.model.parameters()), torch.device("cpu"))
    return torch.zeros(1, *size, device=dev)


def check_path(path) -> Path:
    """``path`` as a ``Path`` if a file can be written there; ``ExportError`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a folder")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(path)!r}: {str(probe)!r} is not a writable folder")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {str(path)!r}: permission denied")
    return path


def write_file(path: Path, data: bytes) -> Path:
    """``data`` written atomically to ``path`` (no partial file); ``ExportError`` on failure."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise ExportError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path
