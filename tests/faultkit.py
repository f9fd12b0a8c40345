"""Helpers shared by tests/test_reliability.py and benchmarks/suites/faults.py: tiny random
ViTs, forked worker processes that can be killed at any moment, and the
kill-and-resume driver."""
from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import time
import traceback
from pathlib import Path

import torch

ARCH = "vit_tiny_patch16_224"
TINY_KW = dict(depth=2, img_size=32, patch_size=8, num_classes=10, embed_dim=48, num_heads=3)
TIMING_KEYS = ("seconds", "search_seconds")


def tiny_vit(seed: int = 0, **kw):
    """A small random timm ViT (2 blocks, 32x32 inputs): fast mechanics, no accuracy meaning."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, **{**TINY_KW, **kw}).eval()


def images(n: int = 24, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_config(**kw):
    from evolq import EvolQConfig

    base = dict(w_bits=4, passes=2, cycles=4, infonce_batch=8, eps=0.01, progress=False)
    base.update(kw)
    return EvolQConfig.make(**base)


DEGENERATE_FACTORS = (0.0, 1e-30, 1e-9, 1e-6, 1e6, 1e30, float("nan"), float("inf"), -1.0)


def degenerate_searcher(problem, budget, sigma, seed):
    """A "searcher" (``SearchConfig.searcher`` callable) that evaluates only
    degenerate scale vectors on the real model: start x {0, 1e-30, 1e-9, 1e-6, 1e6,
    1e30, NaN, inf, -1}. Records the losses it saw on ``degenerate_searcher.seen``."""
    class Step:
        def step(self):
            c = problem.center
            vals = torch.stack([c * f if math.isfinite(f) else torch.full_like(c, f) for f in DEGENERATE_FACTORS])
            degenerate_searcher.seen.append(problem.evaluate_values(vals).clone())

    return Step(), 1


degenerate_searcher.seen = []


def strip_timings(obj):
    """A report without wall-clock fields (everything else must be reproducible)."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def scales_of(qmodel) -> dict[str, torch.Tensor]:
    """Every quantizer buffer (scales, zero-points, PTF factors...), cloned."""
    out = {}
    for name, q in qmodel.quantizers().items():
        for bname, buf in q.named_buffers(recurse=False):
            out[f"{name}.{bname}"] = buf.detach().cpu().clone()
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- forked workers ----------------------------------------------------------------
def fork_call(fn, *args):
    """Run ``fn(write_fd, *args)`` in a forked child (which inherits the imported
    modules, so it starts in milliseconds). The child exits with ``fn``'s return
    value, 130 on KeyboardInterrupt, 1 on any other exception. Returns
    ``(pid, read_fd)``: the child writes progress markers to the pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = int(fn(w, *args) or 0)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


class Markers:
    """Reads a child's markers (single bytes) from its pipe."""

    def __init__(self, fd):
        self.fd, self.seen, self.eof = fd, b"", False

    def poll(self, timeout: float) -> bytes:
        if self.eof:
            time.sleep(min(timeout, 0.01))
            return b""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        data = os.read(self.fd, 4096)
        if not data:
            self.eof = True
        self.seen += data
        return data

    def wait_for(self, marker: bytes, count: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.seen.count(marker) < count:
            if self.eof or time.monotonic() > end:
                return False
            self.poll(end - time.monotonic())
        return True

    def drain(self) -> bytes:
        while not self.eof:
            self.poll(1.0)
        os.close(self.fd)
        return self.seen


def wait_exit(pid: int, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"worker {pid} did not finish in {timeout} s")
        time.sleep(0.01)


# -- the kill / resume driver ---------------------------------------------------------
def quantize_worker(w, out_dir, x, cfg, hook_sleep: float):
    """Child body: resume (or start) the run in ``out_dir``. Writes b"B" when a
    block search starts and b"W" when a checkpoint's temporary file is complete;
    each write then pauses ``hook_sleep`` s before the rename, so the parent can
    kill it in the middle of a write. Writes the final scales and report to
    ``out_dir/result.*`` and b"F"."""
    from safetensors.torch import save_file

    from evolq import quantize_model
    from evolq.io import replace_hooks

    def hook(tmp, path):
        os.write(w, b"W")
        time.sleep(hook_sleep)

    def markers(engine):
        engine.block_start_hook.append(lambda info: os.write(w, b"B"))

    replace_hooks.append(hook)  # (a forked child: the parent's list is untouched)
    torch.set_num_threads(1)
    qm, rep = quantize_model(tiny_vit(), x, cfg, arch=ARCH, checkpoint_dir=out_dir, resume=True,
                             subscribers=[markers])
    save_file(scales_of(qm), str(Path(out_dir) / "result.safetensors"))
    (Path(out_dir) / "result.json").write_text(json.dumps(strip_timings(rep)))
    os.write(w, b"F")
    return 0


def checkpoint_progress(out_dir) -> int | None:
    """Finished block searches recorded in the checkpoint (None: no checkpoint);
    raises if the checkpoint is unreadable (it never should be)."""
    from evolq.checkpoint import CKPT_NAME, read_checkpoint_meta

    f = Path(out_dir) / CKPT_NAME
    if not f.exists():
        return None
    return len(read_checkpoint_meta(f)["state"]["blocks"])


KILL_MODES = ("mid-write", "mid-search", "early")


def kill_resume(out_dir, x, cfg, kills: int, seed: int = 0, hook_sleep: float = 0.3) -> dict:
    """SIGKILL a run ``kills`` times and resume it each time, then let the last
    resume finish. Kill moments cycle through three kinds, each at a random point:
    ``mid-write`` (the 1st or 2nd checkpoint write of the run, after its temporary
    file is complete and before the rename), ``mid-search`` (a random moment of
    the run's first block search) and ``early`` (0-0.4 s after start: model
    preparation, calibration, reference outputs).

    Returns figures: kills (per kind), resumes, the checkpoint progress seen after
    every kill, stale temporary files found after kills, and whether every
    checkpoint left behind was readable.
    """
    rng = random.Random(seed)
    stats = {"kills": 0, "kills_by_kind": {k: 0 for k in KILL_MODES}, "resumes": 0, "runs": 0,
             "progress_after_kill": [], "stale_tmp_files": 0, "checkpoints_readable": True,
             "finished_before_kill": 0}
    while stats["kills"] < kills:
        if checkpoint_progress(out_dir) is not None:
            stats["resumes"] += 1
        pid, fd = fork_call(quantize_worker, out_dir, x, cfg, hook_sleep)
        stats["runs"] += 1
        m = Markers(fd)
        mode = KILL_MODES[stats["kills"] % len(KILL_MODES)]
        if mode == "mid-write":
            hit = m.wait_for(b"W", rng.randint(1, 2), timeout=120)
            delay = hook_sleep * rng.uniform(0.1, 0.9)
        elif mode == "mid-search":
            hit = m.wait_for(b"B", 1, timeout=120)
            delay = rng.uniform(0.0, 0.15)
        else:
            hit, delay = True, rng.uniform(0.0, 0.4)
        if hit:
            end = time.monotonic() + delay
            while time.monotonic() < end and not m.eof:
                m.poll(end - time.monotonic())
            hit = not m.eof
        killed = False
        if hit:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        code = wait_exit(pid)
        m.drain()
        if killed and code == -signal.SIGKILL:
            stats["kills"] += 1
            stats["kills_by_kind"][mode] += 1
            stats["stale_tmp_files"] += len(list(Path(out_dir).glob("checkpoint.safetensors.tmp*")))
            try:
                stats["progress_after_kill"].append(checkpoint_progress(out_dir))
            except Exception:
                stats["checkpoints_readable"] = False
        elif code == 0:
            stats["finished_before_kill"] += 1
            (Path(out_dir) / "result.safetensors").unlink(missing_ok=True)
            break  # nothing left to interrupt
        else:
            raise RuntimeError(f"worker exited with {code}")
    # the final resume, undisturbed
    if checkpoint_progress(out_dir) is not None:
        stats["resumes"] += 1
    pid, fd = fork_call(quantize_worker, out_dir, x, cfg, 0.0)
    stats["runs"] += 1
    m = Markers(fd)
    code = wait_exit(pid)
    m.drain()
    if code != 0:
        raise RuntimeError(f"final resume exited with {code}")
    return stats


def load_result(out_dir) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return (load_file(str(Path(out_dir) / "result.safetensors")),
            json.loads((Path(out_dir) / "result.json").read_text()))
