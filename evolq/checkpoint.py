"""Atomic checkpoints: tensors in one safetensors file, progress as JSON in its
metadata, written to a temporary file, flushed to disk and renamed into place.

A reader (a resumed run) therefore sees either the previous checkpoint or the new
one, never half of one, whenever the writing process dies (SIGKILL, power loss
after the rename's directory sync, Ctrl-C). Leftover temporary files of killed
writers are removed by ``clean_stale_tmp``. ``RunLock`` keeps two runs from
writing into the same folder at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "fingerprint", "clean_stale_tmp",
           "RunLock", "CKPT_NAME"]

CKPT_NAME = "checkpoint.safetensors"
LOCK_NAME = ".evolq.lock"

# Test seam: called as ``_before_replace(tmp_path, final_path)`` after the temporary
# file is complete and synced and before it is renamed into place (fault-injection
# tests sleep here to kill a process in the middle of a checkpoint write).
_before_replace = None


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={"evolq": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace(tmp, path)
        os.replace(tmp, path)  # atomic: a reader sees the old or the new file, never half of one
    except BaseException:  # Ctrl-C or a full disk mid-write: keep the old checkpoint, drop the partial one
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def clean_stale_tmp(folder) -> int:
    """Remove temporary checkpoint files left by killed writers; returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for f in folder.glob(CKPT_NAME + ".tmp*"):
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n


def _open_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["evolq"])
    if not isinstance(meta, dict) or "run_id" not in meta or "state" not in meta:
        raise ValueError("no evolq progress record")
    return meta


def read_checkpoint_meta(path) -> dict:
    """The progress record of a checkpoint, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        return _open_meta(path)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(e).__name__})") from None


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        meta = _open_meta(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(e).__name__})") from None
    return tensors, meta


class RunLock:
    """An exclusive advisory lock on a run folder (``flock`` on ``.evolq.lock``).

    The operating system drops it when the process dies, so a killed run never
    leaves a stale lock. A no-op where ``fcntl`` is unavailable.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.folder / LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(f"another evolq run is using {str(self.folder)!r}; wait for it or choose "
                                  f"another output folder") from None
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
