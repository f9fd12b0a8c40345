"""Fault injection: every reliability case (bad input at the API and the CLI,
degenerate candidates, SIGKILL / Ctrl-C and resume, determinism, save/load
tampering, memory chunking and OOM), one row each: case, expected, observed, pass.

    python benchmarks/faults.py [--kills 12]

Writes benchmarks/results/faults.json. Uses small random timm ViTs (2 blocks,
32x32 inputs): these figures are about mechanics, not accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import faultkit as fk  # noqa: E402
from evolq import QuantConfig, load_quantized, prepare_model, quantize_model, save_quantized  # noqa: E402
from evolq.checkpoint import CKPT_NAME, load_checkpoint, read_checkpoint_meta, save_checkpoint  # noqa: E402
from evolq.errors import (CheckpointError, ConfigError, DataError, EvolQError, UnknownModelError,  # noqa: E402
                          UnsupportedModelError, WeightsError)
from evolq.fitness import BlockFitness, reference_outputs  # noqa: E402
from evolq.losses import infonce  # noqa: E402
from evolq.qnn.scales import ScaleSpace  # noqa: E402

ROWS: list[dict] = []
TMP = Path(tempfile.mkdtemp(prefix="evolq-faults-"))
X = fk.images(24)
SEARCHERS = ("tournament", "cmaes", "snes", "pgpe")


def case(group: str, name: str, expected: str):
    def deco(fn):
        t0 = time.perf_counter()
        try:
            observed, ok, extra = _unpack(fn())
        except Exception as e:  # the case itself broke: a failure, reported, not fatal
            observed, ok, extra = f"crashed: {type(e).__name__}: {str(e)[:120]}", False, {}
            traceback.print_exc()
        row = {"group": group, "case": name, "expected": expected, "observed": observed, "pass": bool(ok),
               "seconds": round(time.perf_counter() - t0, 2), **extra}
        ROWS.append(row)
        print(f"{'PASS' if ok else 'FAIL'}  {group:<12} {name:<46} {observed[:90]}", flush=True)
        return fn
    return deco


def _unpack(r):
    if len(r) == 2:
        return r[0], r[1], {}
    return r


def raises(cls, fn, needle: str = ""):
    """(observed, ok): ``fn`` must raise ``cls`` with a one-line message containing ``needle``."""
    try:
        fn()
    except Exception as e:
        msg = str(e)
        ok = isinstance(e, cls) and isinstance(e, EvolQError) and "\n" not in msg and needle in msg
        return f"{type(e).__name__}: {msg[:110]}", ok
    return "no error", False


def cli(args):
    """In-process ``evolq`` CLI: (exit code, stderr lines)."""
    import io

    from evolq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue().strip().splitlines()


def cli_case(args, needle):
    code, err = cli(args)
    ok = code == 2 and len(err) == 1 and err[0].startswith("evolq: error:") and needle in err[0]
    return f"exit {code}: {(err or [''])[-1][:100]}", ok


# ============================================================== bad input (API)
def run_all(kills: int):
    cfg = fk.small_config

    @case("api", "unknown model name", "UnknownModelError + suggestion")
    def _():
        from evolq.models import load_model

        return raises(UnknownModelError, lambda: load_model("vit_tiny_patch16_244", hub=False), "did you mean")

    @case("api", "unknown searcher", "ConfigError")
    def _():
        return raises(ConfigError, lambda: cfg(searcher="genetic"), "genetic")

    @case("api", "unknown loss", "ConfigError")
    def _():
        return raises(ConfigError, lambda: cfg(loss="l1"), "l1")

    @case("api", "unsupported architecture (nn.Sequential MLP)", "UnsupportedModelError listing families")
    def _():
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 4))
        return raises(UnsupportedModelError, lambda: quantize_model(mlp, torch.randn(8, 3, 8, 8), cfg(infonce_batch=2)),
                      "supported families")

    from safetensors.torch import save_file

    import timm

    @case("api", "weights file missing", "WeightsError")
    def _():
        from evolq.models import load_model

        return raises(WeightsError, lambda: load_model(fk.ARCH, weights=TMP / "none.safetensors", hub=False),
                      "does not exist")

    @case("api", "weights file truncated", "WeightsError")
    def _():
        from evolq.models import load_model

        f = TMP / "trunc.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(fk.ARCH).state_dict().items()}, str(f))
        f.write_bytes(f.read_bytes()[:5000])
        return raises(WeightsError, lambda: load_model(fk.ARCH, weights=f, hub=False), "trunc.safetensors")

    @case("api", "weights of another architecture", "WeightsError (missing/unexpected keys)")
    def _():
        from evolq.models import load_model

        f = TMP / "resnet.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, str(f))
        return raises(WeightsError, lambda: load_model(fk.ARCH, weights=f, hub=False), "missing keys")

    @case("api", "empty calibration set", "DataError")
    def _():
        return raises(DataError, lambda: quantize_model(fk.tiny_vit(), X[:0], cfg()), "empty")

    @case("api", "calibration set < infoNCE batch", "DataError")
    def _():
        return raises(DataError, lambda: quantize_model(fk.tiny_vit(), X[:5], cfg()), "infoNCE batch")

    @case("api", "grayscale / RGBA / palette PNGs", "converted to 3-channel RGB")
    def _():
        import numpy as np
        from PIL import Image

        from evolq.data import load_images

        d = TMP / "modes"
        d.mkdir()
        modes = ["L", "RGBA", "P", "LA"]
        for i, mode in enumerate(modes):
            Image.new(mode, (16, 12), 120 if mode in ("L", "P") else (200, 30, 30, 128)[:len(mode)]).save(d / f"{i}.png")
        (d / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i}\n" for i in range(len(modes))))
        x, _ = load_images(d, lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), dtype="float32")).permute(2, 0, 1))
        return f"loaded {tuple(x.shape)} from modes {modes}", x.shape == (4, 3, 8, 8)

    @case("api", "corrupt (truncated) JPEG", "DataError naming the file")
    def _():
        from PIL import Image

        from evolq.data import load_images

        d = TMP / "jpeg"
        d.mkdir()
        Image.effect_noise((64, 64), 50).convert("RGB").save(d / "bad.jpg")
        (d / "bad.jpg").write_bytes((d / "bad.jpg").read_bytes()[:600])
        (d / "labels.csv").write_text("file,label\nbad.jpg,0\n")
        return raises(DataError, lambda: load_images(d, lambda im: torch.zeros(3)), "bad.jpg")

    loaders = {
        "DataLoader: channels-last images": torch.utils.data.DataLoader(X.permute(0, 2, 3, 1), batch_size=8),
        "DataLoader: uint8 images": torch.utils.data.DataLoader((X.abs() * 50).to(torch.uint8), batch_size=8),
        "DataLoader: dict batches": [{"image": X[:8]}],
        "DataLoader: ragged sample shapes": torch.utils.data.DataLoader([(X[:8], 0), (fk.images(8, size=40), 0)],
                                                                        batch_size=None),
    }
    for name, data in loaders.items():
        case("api", name, "DataError")(lambda data=data: raises(DataError, lambda: quantize_model(fk.tiny_vit(), data, cfg())))

    for bad in ("nan", "inf"):
        def _bad(bad=bad):
            x = X.clone()
            x[3, 1, 2, 2] = float(bad)
            return raises(DataError, lambda: quantize_model(fk.tiny_vit(), x, cfg()), "NaN or inf")
        case("api", f"{bad} in the inputs", "DataError")(_bad)

    for kw in (dict(w_bits=9), dict(w_bits=1), dict(a_bits=3)):
        case("api", f"bits out of range {kw}", "ConfigError")(lambda kw=kw: raises(ConfigError, lambda: cfg(**kw), next(iter(kw))))
    for kw in (dict(passes=-1), dict(cycles=0), dict(population=0), dict(samples=0), dict(popsize=1),
               dict(max_batch=0), dict(eps=0.0)):
        case("api", f"budget {kw}", "ConfigError")(lambda kw=kw: raises(ConfigError, lambda: cfg(**kw), next(iter(kw))))

    @case("api", "passes=0", "start point returned, 0 evaluations")
    def _():
        qm, rep = quantize_model(fk.tiny_vit(), X, cfg(passes=0))
        return f"{rep['evaluations']} evaluations, {len(rep['blocks'])} block searches", rep["evaluations"] == 0

    run = TMP / "run"
    quantize_model(fk.tiny_vit(), X, cfg(passes=1), arch=fk.ARCH, checkpoint_dir=run)

    @case("api", "output folder holds another run's checkpoint", "CheckpointError (no resume)")
    def _():
        return raises(CheckpointError, lambda: quantize_model(fk.tiny_vit(), X, cfg(passes=1), checkpoint_dir=run),
                      "already holds")

    @case("api", "resume with a different config", "CheckpointError naming the setting")
    def _():
        return raises(CheckpointError, lambda: quantize_model(fk.tiny_vit(), X, cfg(passes=1, cycles=5),
                                                              checkpoint_dir=run, resume=True), "cycles")

    @case("api", "resume with other calibration data", "CheckpointError")
    def _():
        return raises(CheckpointError, lambda: quantize_model(fk.tiny_vit(), fk.images(24, seed=4), cfg(passes=1),
                                                              arch=fk.ARCH, checkpoint_dir=run, resume=True),
                      "another run")

    @case("api", "corrupt checkpoint", "CheckpointError")
    def _():
        bad = TMP / "corrupt"
        bad.mkdir()
        (bad / CKPT_NAME).write_bytes((run / CKPT_NAME).read_bytes()[:300])
        return raises(CheckpointError, lambda: quantize_model(fk.tiny_vit(), X, cfg(passes=1), checkpoint_dir=bad,
                                                              resume=True), "corrupt")

    @case("api", "unusable device", "ConfigError")
    def _():
        dev = "cuda:7" if not torch.cuda.is_available() else "nosuchdevice"
        return raises(ConfigError, lambda: quantize_model(fk.tiny_vit(), X, cfg(device=dev)), "device")

    # ============================================================== bad input (CLI)
    q = ["quantize", "--model", fk.ARCH, "--a-bits", "8", "--out", str(TMP / "cli-out")]

    @case("cli", "python -m evolq.cli: w_bits=1 (fresh process)", "exit 2, one stderr line")
    def _():
        p = subprocess.run([sys.executable, "-m", "evolq.cli", *q, "--w-bits", "1"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = p.stderr.strip().splitlines()
        return f"exit {p.returncode}: {(lines or [''])[-1][:90]}", p.returncode == 2 and len(lines) == 1

    case("cli", "unknown model", "exit 2")(lambda: cli_case(["eval", "--model", "no_such_model"], "unknown model"))
    case("cli", "unknown searcher", "exit 2")(lambda: cli_case(q + ["--w-bits", "4", "--searcher", "ga"], "searcher"))
    case("cli", "zero cycles", "exit 2")(lambda: cli_case(q + ["--w-bits", "4", "--cycles", "0"], "cycles"))
    case("cli", "missing weights file", "exit 2")(
        lambda: cli_case(["eval", "--model", fk.ARCH, "--weights", str(TMP / "nope.pth")], "nope.pth"))
    case("cli", "truncated weights file", "exit 2")(
        lambda: cli_case(["eval", "--model", fk.ARCH, "--weights", str(TMP / "trunc.safetensors")], "trunc"))

    @case("cli", "Ctrl-C", "exit 130 + resume hint")
    def _():
        import evolq.cli as c

        orig = c.cmd_eval
        c.cmd_eval = lambda args: (_ for _ in ()).throw(KeyboardInterrupt())
        try:
            code, err = cli(["eval", "--model", fk.ARCH])
        finally:
            c.cmd_eval = orig
        return f"exit {code}: {(err or [''])[-1][:80]}", code == 130 and "resume" in err[-1]

    # ============================================================== numerics
    for searcher in SEARCHERS:
        case("numerics", f"{searcher}: NaN/+inf/-inf losses for some candidates",
             "no crash; finite positive scales; final <= start")(lambda s=searcher: _poisoned(s, "some"))
    for searcher in SEARCHERS:
        case("numerics", f"{searcher}: every loss NaN", "start scales kept exactly")(lambda s=searcher: _poisoned(s, "all"))

    @case("numerics", "scales x{0, 1e-30, 1e-9, 1e-6, 1e6, 1e30, NaN, inf, -1} on the real model",
          "finite losses; start kept")
    def _():
        qm0 = prepare_model(fk.tiny_vit(), X, QuantConfig(w_bits=4))
        fk.degenerate_searcher.seen.clear()
        qm, rep = quantize_model(fk.tiny_vit(), X, cfg(searcher=fk.degenerate_searcher, passes=1, loss="mse",
                                                       holdout=0.0))
        seen = torch.cat(fk.degenerate_searcher.seen)
        kept = fk.same_tensors(fk.scales_of(qm), fk.scales_of(qm0))
        return (f"{seen.numel()} degenerate candidates, losses finite={bool(torch.isfinite(seen).all())} "
                f"(range {seen.min():.2e}..{seen.max():.2e}); start kept={kept}",
                bool(torch.isfinite(seen).all()) and kept)

    # ============================================================== crash safety
    @case("crash", "crash between checkpoint write and rename", "old checkpoint intact, no temp file")
    def _():
        import evolq.checkpoint as ck

        d = TMP / "atomic"
        save_checkpoint(d / CKPT_NAME, {"a": torch.arange(3.0)}, {"run_id": "r", "state": {"n": 0}})

        def crash(tmp, path):
            raise OSError("disk full")

        ck._before_replace = crash
        try:
            save_checkpoint(d / CKPT_NAME, {"a": torch.zeros(3)}, {"run_id": "r", "state": {"n": 1}})
        except OSError:
            pass
        finally:
            ck._before_replace = None
        t, m = load_checkpoint(d / CKPT_NAME)
        files = sorted(p.name for p in d.iterdir())
        return f"state n={m['state']['n']}, files {files}", m["state"]["n"] == 0 and files == [CKPT_NAME]

    kcfg = cfg(passes=3)
    qm, rep = quantize_model(fk.tiny_vit(), X, kcfg, arch=fk.ARCH)
    ref_scales, ref_report = fk.scales_of(qm), json.loads(json.dumps(fk.strip_timings(rep)))

    @case("crash", f"SIGKILL x{kills} (mid-write / mid-search / early) + resume",
          "scales and report identical to an uninterrupted run")
    def _():
        d = TMP / "killed"
        stats = fk.kill_resume(d, X, kcfg, kills=kills, seed=0)
        scales, report = fk.load_result(d)
        same_s, same_r = fk.same_tensors(scales, ref_scales), report == ref_report
        obs = (f"{stats['kills']} kills {stats['kills_by_kind']}, {stats['resumes']} resumes, "
               f"scales identical={same_s}, report identical={same_r}")
        ok = same_s and same_r and stats["checkpoints_readable"] and stats["kills"] == kills
        return obs, ok, {"kill_resume": {**stats, "identical_scales": same_s, "identical_report": same_r,
                                         "checkpoint_writes_per_full_run": 3 * 2 + 3}}

    @case("crash", "Ctrl-C (SIGINT) during a block search", "exit 130; checkpoint = last finished block; resume identical")
    def _():
        d = TMP / "sigint"
        pid, fd = fk.fork_call(_interruptible, d, kcfg)
        m = fk.Markers(fd)
        m.wait_for(b"S", 3, timeout=120)
        time.sleep(0.05)
        os.kill(pid, signal.SIGINT)
        code = fk.wait_exit(pid)
        seen = m.drain()
        st = read_checkpoint_meta(d / CKPT_NAME)["state"]
        done = st["pos"] + 2 * st["pass"]
        qm, rep = quantize_model(fk.tiny_vit(), X, kcfg, arch=fk.ARCH, checkpoint_dir=d, resume=True)
        same = fk.same_tensors(fk.scales_of(qm), ref_scales) and \
            json.loads(json.dumps(fk.strip_timings(rep))) == ref_report
        obs = (f"exit {code}; blocks finished {seen.count(b'E')}, in checkpoint {done}; memory==checkpoint "
               f"{seen.endswith(b'M')}; resume identical {same}")
        return obs, code == 130 and done == seen.count(b"E") and seen.endswith(b"M") and same

    # ============================================================== determinism
    for searcher in SEARCHERS:
        case("determinism", f"{searcher}: same seed twice (different global RNG)", "identical scales and report")(
            lambda s=searcher: _determinism(s))

    # ============================================================== save / load
    qm, _ = quantize_model(fk.tiny_vit(), X, cfg(passes=1), arch=fk.ARCH)
    saved = TMP / "saved"
    save_quantized(qm, saved, model_kwargs=fk.TINY_KW)

    @case("save/load", "load in a fresh process", "bit-identical outputs")
    def _():
        from safetensors.torch import load_file

        x = fk.images(6, seed=9)
        with torch.no_grad():
            y = qm.model(x)
        save_file({"x": x}, str(TMP / "x.safetensors"))
        script = ("import sys, torch; torch.set_num_threads(1)\n"
                  "from safetensors.torch import load_file, save_file\nfrom evolq import load_quantized\n"
                  "qm = load_quantized(sys.argv[1]); x = load_file(sys.argv[2])['x']\n"
                  "with torch.no_grad(): save_file({'y': qm.model(x)}, sys.argv[3])\n")
        p = subprocess.run([sys.executable, "-c", script, str(saved), str(TMP / "x.safetensors"),
                            str(TMP / "y.safetensors")], capture_output=True, text=True, timeout=300)
        if p.returncode:
            return f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1][:100]}", False
        y2 = load_file(str(TMP / "y.safetensors"))["y"]
        return f"max |diff| {float((y2 - y).abs().max()):.1e}, equal={torch.equal(y, y2)}", torch.equal(y, y2)

    for tamper in ("flip a byte of the weights", "truncate weights (hash fixed up)", "evolq.json: w_bits changed",
                   "evolq.json: depth changed", "evolq.json of another model", "evolq.json not JSON",
                   "weights file missing", "load into a model of another depth"):
        case("save/load", tamper, "CheckpointError")(lambda t=tamper: _tampered(t, saved))

    @case("save/load", "every torch.load is weights_only=True; no pickle", "0 offenders")
    def _():
        bad = []
        for folder in ("evolq", "benchmarks", "tests"):
            for f in (ROOT / folder).rglob("*.py"):
                for i, line in enumerate(f.read_text().splitlines(), 1):
                    if "re.search" in line or "rglob" in line:
                        continue
                    if ("torch.load(" in line and "weights_only=True" not in line) or re.search(r"\bpickle\.loads?\(", line):
                        bad.append(f"{f.relative_to(ROOT)}:{i}")
        return f"{len(bad)} offenders {bad[:3]}", not bad

    # ============================================================== memory
    @case("memory", "max_batch bounds every forward; losses agree", "max forward <= max_batch; |dloss| <= 1e-6")
    def _():
        x = X[:16]
        qm, ref, space, cands = _fitness_setup(x)
        seen = []
        for b in qm.blocks:
            b.run = (lambda r: (lambda xb: seen.append(xb.shape[0]) or r(xb)))(b.run)
        loss = lambda o, r: infonce(o, r, batch_size=8)  # noqa: E731
        base = BlockFitness(qm, x, ref, loss, max_batch=10_000)(1, space, cands)
        worst, bounded, identical, rows = 0.0, True, 0, []
        for mb in (1, 3, 16, 40, 120, 512):
            seen.clear()
            got = BlockFitness(qm, x, ref, loss, max_batch=mb)(1, space, cands)
            bounded &= max(seen) <= mb
            d = float((got - base).abs().max())
            worst = max(worst, d)
            identical += torch.equal(got, base)
            rows.append({"max_batch": mb, "largest_forward": max(seen), "max_abs_loss_diff": d})
        obs = f"bounded={bounded}; max |dloss| {worst:.1e}; bit-identical for {identical}/6 max_batch values"
        return obs, bounded and worst <= 1e-6, {"chunking": rows}

    @case("memory", "OOM in a fitness chunk (CPU monkeypatch)", "chunk halved, same losses")
    def _():
        qm, ref, space, cands = _fitness_setup(X)
        loss = lambda o, r: infonce(o, r, batch_size=8)  # noqa: E731
        expected = BlockFitness(qm, X, ref, loss, max_batch=256)(1, space, cands)
        head = qm.blocks[-1]
        real = head.run

        def flaky(xb):
            if xb.shape[0] > 40:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return real(xb)

        head.run = flaky
        fit = BlockFitness(qm, X, ref, loss, max_batch=256)
        got = fit(1, space, cands)
        d = float((got - expected).abs().max())
        same_rank = torch.argsort(got).tolist() == torch.argsort(expected).tolist()
        return (f"{fit.oom_retries} halvings -> max_batch {fit.max_batch}; max |dloss| {d:.1e}; same ranking {same_rank}",
                fit.oom_retries > 0 and d <= 1e-6 and same_rank)


def _fitness_setup(x):
    qm = prepare_model(fk.tiny_vit(), x, QuantConfig(w_bits=4))
    ref = reference_outputs(qm, x)
    space = ScaleSpace(qm.blocks[1].searched("block"))
    v = space.vector()
    cands = v * (1 + 0.05 * torch.randn(7, v.numel(), generator=torch.Generator().manual_seed(0)))
    return qm, ref, space, cands


def _poisoned(searcher, mode):
    real = BlockFitness.__call__
    poisoned = []

    def call(self, index, space, cands):
        losses = real(self, index, space, cands).clone()
        cands = cands.unsqueeze(0) if cands.ndim == 1 else cands
        for i in range(losses.shape[0]):
            if mode == "all" or ((self.calls % 3 == 1 or i % 3 == 2) and self.calls > 1):
                losses[i] = (float("nan"), float("inf"), -float("inf"))[(self.calls + i) % 3]
                poisoned.append(cands[i].clone())
        return losses

    qm0 = prepare_model(fk.tiny_vit(), X, QuantConfig(w_bits=4))
    BlockFitness.__call__ = call
    try:
        c = fk.small_config(searcher=searcher, popsize=4, holdout=0.0,
                            **(dict(eps=0.05, cycles=8) if mode == "some" else dict(passes=1)))
        qm, rep = quantize_model(fk.tiny_vit(), X, c)
    finally:
        BlockFitness.__call__ = real
    scales = [q.scale for q in qm.quantizers().values() if hasattr(q, "scale")]
    finite = all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in scales)
    if mode == "all":
        same = fk.same_tensors(fk.scales_of(qm), fk.scales_of(qm0))
        return f"{len(poisoned)} NaN candidates; start kept={same}", same and finite
    installed = [ScaleSpace(qm.blocks[i].searched("attn-weights")).vector() for i in (1, 2)]
    leaked = sum(any(torch.equal(v, p) for p in poisoned if p.shape == v.shape) for v in installed)
    monotone = all(math.isfinite(b["final_fitness"]) and b["final_fitness"] <= b["start_fitness"] for b in rep["blocks"])
    improved = sum(b["final_fitness"] < b["start_fitness"] for b in rep["blocks"])
    obs = (f"{len(poisoned)} poisoned candidates; scales finite>0={finite}; "
           f"poisoned installed={leaked}; blocks improved {improved}/{len(rep['blocks'])}")
    return obs, finite and monotone and leaked == 0 and len(poisoned) > 0


def _interruptible(w, out_dir, cfg):
    from evolq.engine import SearchEngine

    real_block, real_fit = SearchEngine._search_block, BlockFitness.__call__

    def block(self, *a, **k):
        os.write(w, b"S")
        rec = real_block(self, *a, **k)
        os.write(w, b"E")
        return rec

    def slow_fit(self, *a, **k):
        time.sleep(0.06)
        return real_fit(self, *a, **k)

    SearchEngine._search_block, BlockFitness.__call__ = block, slow_fit
    qm = prepare_model(fk.tiny_vit(), X, cfg.quant, arch=fk.ARCH)
    try:
        quantize_model(qm, X, cfg, checkpoint_dir=out_dir)
    except KeyboardInterrupt:
        tensors, _ = load_checkpoint(Path(out_dir) / CKPT_NAME)
        ok = all(torch.equal(tensors["q/" + k], v) for k, v in fk.scales_of(qm).items())
        os.write(w, b"M" if ok else b"X")
        return 130
    return 0


def _determinism(searcher):
    runs = []
    for g in (1, 2):
        model = fk.tiny_vit()
        torch.manual_seed(g)
        qm, rep = quantize_model(model, X, fk.small_config(searcher=searcher, popsize=4))
        runs.append((fk.scales_of(qm), fk.strip_timings(rep)))
    same = fk.same_tensors(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    qm, _ = quantize_model(fk.tiny_vit(), X, fk.small_config(searcher=searcher, popsize=4, seed=1))
    differs = not fk.same_tensors(fk.scales_of(qm), runs[0][0])
    return f"identical={same}; another seed differs={differs}", same and differs


def _tampered(tamper, saved):
    import hashlib
    import shutil

    d = TMP / ("t-" + re.sub(r"\W+", "-", tamper))
    shutil.copytree(saved, d)
    w, j = d / "model.safetensors", d / "evolq.json"
    model = None
    meta = json.loads(j.read_text())
    if tamper.startswith("flip"):
        b = bytearray(w.read_bytes())
        b[len(b) // 2] ^= 1
        w.write_bytes(bytes(b))
    elif tamper.startswith("truncate"):
        data = w.read_bytes()[:-100]
        w.write_bytes(data)
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        j.write_text(json.dumps(meta))
    elif "w_bits" in tamper:
        meta["quant"]["w_bits"] = 8
        j.write_text(json.dumps(meta))
    elif "depth changed" in tamper:
        meta["model_kwargs"]["depth"] = 3
        j.write_text(json.dumps(meta))
    elif "another model" in tamper:
        other = TMP / "other-model"
        if not other.exists():
            save_quantized(prepare_model(fk.tiny_vit(), X, QuantConfig(w_bits=8), arch=fk.ARCH), other,
                           model_kwargs=fk.TINY_KW)
        j.write_text((other / "evolq.json").read_text())
    elif "not JSON" in tamper:
        j.write_text("{oops")
    elif "missing" in tamper:
        w.unlink()
    else:
        model = fk.tiny_vit(depth=1)
    return raises(CheckpointError, lambda: load_quantized(d, model=model))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs in the kill/resume case (default 12)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_all(args.kills)
    n_pass = sum(r["pass"] for r in ROWS)
    print()
    print(f"{'group':<12} {'case':<52} {'expected':<44} pass")
    for r in ROWS:
        print(f"{r['group']:<12} {r['case'][:52]:<52} {r['expected'][:44]:<44} {'yes' if r['pass'] else 'NO'}")
    print(f"\n{n_pass}/{len(ROWS)} cases passed in {time.perf_counter() - t0:.0f} s")
    kr = next((r.get("kill_resume") for r in ROWS if "kill_resume" in r), None)
    if kr:
        print(f"kill/resume: {kr['kills']} SIGKILLs {kr['kills_by_kind']}, {kr['resumes']} resumes, "
              f"{kr['runs']} processes; identical scales {kr['identical_scales']}, identical report "
              f"{kr['identical_report']}")
    out = {"cases": ROWS, "passed": n_pass, "total": len(ROWS), "kill_resume": kr,
           "environment": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "platform": platform.platform()},
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0 if n_pass == len(ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
