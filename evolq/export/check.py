"""Check and time an exported file in its runtime against the PyTorch model.

``check_export``: top-1 of the PyTorch model and of the runtime on labelled images, their
top-1 agreement, the float floor (the agreement of the PyTorch model in float32 with the
same model in float64: how many predictions float rounding alone flips, which no runtime
can be expected to beat), KL of the runtime's logits to the PyTorch model's, and the
integer and float kernels the runtime really executes, with the layers it left in float.

``bench_export``: the exported model against the same model's FP32 in the same runtime
with the same settings (pt2: both compiled by inductor with freezing), per batch size and
thread count, in alternating timed rounds (``evolq.export.bench``), with the CPU's model
and int8 flags.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import warnings

import torch
import torch.nn.functional as F

from ..errors import ExportError
from ..qnn.layers import QConv2d, QLinear
from .bench import cpu_info, time_alternating
from .runtimes import get_runtime

__all__ = ["check_export", "bench_export", "float_floor", "session_memory", "int8_twin", "DeployWarning"]

_MEMORY_PROBE = """
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
from evolq.export.runtimes import get_runtime
rt = get_runtime(sys.argv[2], sys.argv[3])
rt.require()
before = rss()
runner = rt.load(sys.argv[1], int(sys.argv[4]))
print(json.dumps({"before_mb": before, "after_mb": rss()}))
"""


def session_memory(path, fmt: str, runtime: str, threads: int = 2) -> dict | None:
    """Resident memory of a fresh process before and after it loads ``path`` in ``runtime``
    (``{"before_mb", "after_mb", "session_mb"}``, Linux ``/proc``); None where it cannot be read."""
    import json
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), runtime, fmt, str(threads)],
                             capture_output=True, text=True, timeout=600, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    got["session_mb"] = got["after_mb"] - got["before_mb"]
    return got


class DeployWarning(UserWarning):
    """A deploy-regime model whose runtime leaves quantized layers in float."""


def _logits(fn, x, batch_size):
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch_size]).float().cpu() for i in range(0, x.shape[0], batch_size)])


def float_floor(qmodel, images: torch.Tensor, reference: torch.Tensor, batch_size: int = 50) -> float:
    """Top-1 agreement (%) of ``reference`` (the model's float32 logits) with the same model
    run in float64."""
    m64 = copy.deepcopy(qmodel.model).double()
    with torch.no_grad():
        alt = torch.cat([m64(images[i:i + batch_size].double()).float() for i in range(0, images.shape[0], batch_size)])
    return (alt.argmax(1) == reference.argmax(1)).float().mean().item() * 100


def _quantized_layers(qmodel) -> int:
    return sum(isinstance(m, (QLinear, QConv2d)) and getattr(m.weight_quant, "enabled", True)
               for m in qmodel.model.modules())


def check_export(qmodel, path, fmt: str, runtime: str, images: torch.Tensor, labels: torch.Tensor | None = None,
                 threads: int = 2, batch_size: int = 32) -> dict:
    """Run ``path`` in ``runtime`` and ``qmodel`` in PyTorch on ``images``; see the module docstring."""
    rt = get_runtime(runtime, fmt)
    runner = rt.load(path, threads)
    torch.set_num_threads(threads)
    ref = _logits(qmodel.model, images, batch_size)
    got = _logits(runner, images, batch_size)
    kernels = runner.kernels()
    n_int = sum(kernels["integer"].values())
    expected = _quantized_layers(qmodel)
    out = {"format": fmt, "runtime": runtime, "images": int(images.shape[0]),
           "agreement": (ref.argmax(1) == got.argmax(1)).float().mean().item() * 100,
           "floor": float_floor(qmodel, images, ref),
           "kl": F.kl_div(F.log_softmax(got, 1), F.log_softmax(ref, 1), log_target=True,
                          reduction="batchmean").item(),
           "max_abs_diff": (ref - got).abs().max().item(),
           "integer_kernels": kernels["integer"], "float_kernels": kernels["float"],
           "quantized_layers": expected, "layers_in_float": max(0, expected - n_int),
           "matmulnbits": kernels["integer"].get("MatMulNBits", 0),
           "float_matmuls": sum(kernels["float"].get(k, 0) for k in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"))}
    if labels is not None:
        y = labels.cpu()
        out["top1_torch"] = (ref.argmax(1) == y).float().mean().item() * 100
        out["top1_runtime"] = (got.argmax(1) == y).float().mean().item() * 100
    if out["layers_in_float"] and getattr(qmodel.config, "regime", "") == "deploy":  # other regimes: expected
        warnings.warn(f"{runtime} runs {n_int} integer kernels for {expected} quantized layers: "
                      f"{out['layers_in_float']} run in float ({', '.join(kernels['float']) or '?'})",
                      DeployWarning, stacklevel=2)
    return out


def int8_twin(qmodel, calib: torch.Tensor, path) -> str:
    """The same float model quantized as today's int8 QDQ export (``QuantConfig.preset("deploy")``
    W8A8, round-to-nearest, calibrated on ``calib``) written to ``path``: the weight-only regime's
    latency reference in the same runtime."""
    from ..config import QuantConfig
    from ..start import prepare_model
    from .onnx import export_onnx
    from .pt2 import float_module

    twin = prepare_model(float_module(qmodel), calib, QuantConfig.preset("deploy", w_bits=8, a_bits=8),
                         arch=qmodel.arch, progress=False)
    return str(export_onnx(twin, path, example=calib[:1]))


def bench_export(qmodel, path, fmt: str, runtime: str, image: torch.Tensor, batches=(32, 1), threads=(2, 1),
                 pairs: int = 5, warmup: int = 3, compare: dict | None = None) -> dict:
    """Time ``path`` against the same model's FP32 in ``runtime`` (see the module docstring).
    ``image``: one input (C, H, W) or a batch, repeated to each batch size. The result's
    ``speedup`` is the median ratio at the first batch size and thread count. ``compare``: other
    files of the same model (name -> path, same format and runtime, e.g. its int8 QDQ export) timed
    in the same alternating rounds; each run then also has ``"{name}_ms"`` and ``"vs_{name}"`` (the
    median ratio of this file's time to that one's: above 1 is slower)."""
    if pairs < 1:
        raise ExportError(f"pairs must be positive, got {pairs}")
    rt = get_runtime(runtime, fmt)
    x1 = image if image.ndim == 4 else image.unsqueeze(0)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for t in threads:
            quant, flt = rt.load(path, t), rt.load_float(qmodel, t, folder, example=x1[:1])
            others = {name: rt.load(p, t) for name, p in (compare or {}).items()}
            for b in batches:
                xb = x1[:1].expand(b, *x1.shape[1:]).contiguous() if x1.shape[0] < b else x1[:b]
                cands = {"fp32": lambda xb=xb, f=flt: f(xb), "int8": lambda xb=xb, q=quant: q(xb)}
                cands.update({name: (lambda xb=xb, o=o: o(xb)) for name, o in others.items()})
                r = time_alternating(cands, "fp32", pairs=pairs, warmup=warmup)
                run = {"batch": b, "threads": t, "fp32_ms": r["times"]["fp32"]["median_s"] * 1e3,
                       "int8_ms": r["times"]["int8"]["median_s"] * 1e3, "speedup": r["speedup"]["int8"],
                       "rounds_s": {k: v["rounds_s"] for k, v in r["times"].items()},
                       "load_1m": [r["load_1m_before"], r["load_1m_after"]]}
                for name in others:
                    run[f"{name}_ms"] = r["times"][name]["median_s"] * 1e3
                    ratios = [a / c for a, c in zip(r["times"]["int8"]["rounds_s"], r["times"][name]["rounds_s"])]
                    run[f"vs_{name}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
                runs.append(run)
    return {"runtime": runtime, "format": fmt, "pairs": pairs, "warmup": warmup, "cpu": cpu_info(), "runs": runs,
            "speedup": runs[0]["speedup"]["median"]}
