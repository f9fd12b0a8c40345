"""Run state in one place: ``RunCheckpoint``.

A run's state is every quantizer buffer of the model, the progress record (pass,
position, block and pass records, evaluations, seconds) and the scales at the start
of the current pass. ``RunCheckpoint`` snapshots it after every finished block,
writes it as one atomic file (``evolq.fsio.atomic_write``: a reader sees the previous
checkpoint or the new one, never half of one), puts the model back to the last
snapshot on Ctrl-C, restores it on resume, and checks that a resumed run is the
same run (``run_settings``, ``fingerprint``). ``RunLock`` keeps two runs from
writing into one folder at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .fsio import atomic_write

__all__ = ["RunCheckpoint", "RunFolder", "RunLock", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
           "fingerprint", "run_settings", "check_run_folder", "clean_stale_tmp", "new_state", "RESUME_FREE",
           "CKPT_NAME"]

CKPT_NAME = "checkpoint.safetensors"
LOCK_NAME = ".evolq.lock"

# settings that do not change the result (or only by float rounding) and may differ on resume
RESUME_FREE = ("progress", "max_batch", "device", "actors", "ray_address")


# -- run identity ------------------------------------------------------------------
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


def run_settings(config) -> dict:
    """The settings of an ``EvolQConfig`` that a resumed run must share with the run it continues."""
    d = config.to_dict()
    return {"quant": d["quant"], "search": {k: v for k, v in d["search"].items() if k not in RESUME_FREE}}


def check_run_folder(folder, config=None, resume: bool = False) -> Path | None:
    """Check a run folder before any expensive work; returns it as a ``Path``.

    Raises ``CheckpointError`` if it holds a checkpoint and ``resume`` is false, if
    that checkpoint is unreadable, or if it was written with other settings than
    ``config`` (naming them); ``ConfigError`` for ``resume`` without a folder.
    A folder without a checkpoint is fine either way (``resume`` then starts afresh).
    """
    if folder is None:
        if resume:
            raise ConfigError("resume needs the checkpoint folder of the run to continue")
        return None
    folder = Path(folder)
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


# -- files ---------------------------------------------------------------------------
def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` to ``path`` atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, save(tensors, metadata={"evolq": json.dumps(meta)}))


def clean_stale_tmp(folder, name: str = CKPT_NAME) -> int:
    """Remove temporary files of ``name`` left by killed writers; returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for f in folder.glob(name + ".tmp*"):
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


class RunFolder:
    """Base of the per-run checkpoint classes (``RunCheckpoint``, the start point's
    ``StartCheckpoint``): with a ``path``, entering takes the folder's run lock and removes
    the temporary files that killed writers of that file left; without one, a no-op."""

    path: Path | None = None
    _lock: RunLock | None = None

    def __enter__(self):
        if self.path is not None:
            self._lock = RunLock(self.path.parent).__enter__()
            clean_stale_tmp(self.path.parent, self.path.name)
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None
        return False


# -- the run's state -------------------------------------------------------------------
def new_state() -> dict:
    """The progress record of a run that has not started."""
    return {"pass": 0, "pos": 0, "known": None, "pass_start_fitness": None, "hold_before": None, "blocks": [],
            "passes": [], "evaluations": 0, "seconds": 0.0}


class RunCheckpoint(RunFolder):
    """The state of one search run, in memory and (with a ``folder``) on disk.

    Args:
        qmodel: the model whose quantizer buffers are the state.
        folder: run folder for ``checkpoint.safetensors`` (None: memory only).
        run_id: fingerprint of everything that must match to resume.
        settings: the settings behind ``run_id`` (``run_settings``), stored so a resume
            with other settings can say which ones differ.

    Use as a context manager around the run: it takes the run lock and removes
    temporary files of killed writers. ``on_install`` callbacks run whenever
    quantizer buffers are replaced (the engine drops its activation cache there).
    """

    def __init__(self, qmodel, folder=None, run_id: str = "", settings: dict | None = None):
        self.qmodel, self.run_id, self.settings = qmodel, run_id, settings or {}
        self.path = Path(folder) / CKPT_NAME if folder is not None else None
        self.on_install: list = []
        self._snap, self._saved = None, True

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, q in self.qmodel.quantizers().items():
            for bname, buf in q.named_buffers(recurse=False):
                out[f"q/{name}.{bname}"] = buf.detach().clone()
        return out

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        qs = self.qmodel.quantizers()
        for key, t in tensors.items():
            if not key.startswith("q/"):
                continue
            name, _, bname = key[2:].rpartition(".")
            if name not in qs:
                raise CheckpointError(f"checkpoint names unknown quantizer {name!r}")
            old = getattr(qs[name], bname, None)
            device = old.device if isinstance(old, torch.Tensor) else t.device
            setattr(qs[name], bname, t.clone().to(device))
        for f in self.on_install:
            f()

    def begin(self, state: dict, prepass: torch.Tensor) -> None:
        """The state at the start (or just restored): kept in memory, no write needed."""
        self._snap = (json.loads(json.dumps(state)), self.quantizer_state(), prepass.detach().clone())
        self._saved = True

    def snapshot(self, state: dict, prepass: torch.Tensor) -> None:
        """Record the state after a finished block (or pass) and write it."""
        snap = (json.loads(json.dumps(state)), self.quantizer_state(), prepass.detach().clone())
        self._saved = False  # (this order: an interrupt in between re-saves the older snapshot, harmlessly)
        self._snap = snap
        self.save()

    def save(self) -> None:
        if self.path is None or self._snap is None or self._saved:
            return
        state, tensors, prepass = self._snap
        tensors = dict(tensors)
        tensors["prepass"] = prepass
        save_checkpoint(self.path, tensors, {"run_id": self.run_id, "config": self.settings, "state": state})
        self._saved = True

    def rollback(self) -> None:
        """Back to the last snapshot (memory == disk), e.g. on Ctrl-C mid-block."""
        if self._snap is not None:
            self.install(self._snap[1])
        self.save()

    def restore(self, device=None) -> tuple[dict, torch.Tensor] | None:
        """Install the checkpoint on disk; returns ``(state, prepass)``, or None if there is none."""
        if self.path is None or not self.path.exists():
            return None
        tensors, meta = load_checkpoint(self.path)
        if meta.get("run_id") != self.run_id:
            raise CheckpointError(f"checkpoint {str(self.path)!r} belongs to another run (different model, data "
                                  f"or settings); use another output folder")
        scales = [t for k, t in tensors.items() if k.startswith("q/") and k.endswith(".scale")]
        if "prepass" not in tensors or not all(bool(torch.isfinite(t).all() and (t > 0).all()) for t in scales):
            raise CheckpointError(f"checkpoint {str(self.path)!r} holds invalid scales; delete it to start over")
        state = meta["state"]
        if not all(k in state for k in ("pass", "pos", "blocks", "passes", "evaluations")):
            raise CheckpointError(f"checkpoint {str(self.path)!r} has an incomplete progress record")
        self.install(tensors)
        return state, tensors["prepass"].to(device) if device is not None else tensors["prepass"]
