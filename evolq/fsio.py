"""The one atomic write every writer uses (checkpoints, saved models, run reports,
exported files, benchmark results).

``atomic_write`` writes a temporary file next to the target, flushes it to disk,
renames it into place and syncs the folder, so a reader sees the old file or the
new one, never half of one, whenever the writer dies. This module imports nothing
of evolq's, so every layer may use it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_json", "replace_hooks"]

# Called as ``hook(tmp_path, final_path)`` once the temporary file is complete and
# synced, just before it is renamed into place: fault-injection tests subscribe here
# to kill a process in the middle of a write.
replace_hooks: list[Callable[[Path, Path], None]] = []


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


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync of
    the folder. On any error (a full disk, Ctrl-C) the old file stays and the
    temporary one is removed. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for hook in list(replace_hooks):
            hook(tmp, path)
        os.replace(tmp, path)  # atomic: a reader sees the old or the new file, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (plus a newline), written with ``atomic_write``."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")
