"""Deploy speed, one protocol for every tool: every int8 model and the FP32 compiles of the same
float model (inductor with freezing, onnxruntime, OpenVINO where it is installed) run alternately
in one process (``evolq.export.bench.time_alternating``: interleaved warm-up, then rounds whose
order alternates), and each int8 model's speedup is the per-round ratio of the *fastest* FP32
compile (the lowest median in those same rounds) to its own time: one common baseline, so the
ratios of two tools compare as their times do. (Each tool against its own runtime's FP32, the
earlier protocol, can rank two int8 programs that run equally fast apart when their FP32 programs
do not; and on a shared machine the absolute times of one command move between runs, which only
the same rounds cancel.)

Candidates are given as factories ``make(threads, batch) -> fn(x)``, built again for every thread
count after ``torch._dynamo.reset()``: inductor fixes the OpenMP thread count of what it compiles.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evolq.export.bench import time_alternating

__all__ = ["HARNESS", "fp32_compiles", "time_common_baseline", "inductor", "onnxruntime_session", "openvino_model"]

HARNESS = "common FP32 baseline: the fastest FP32 compile, timed in the same alternating rounds"


def inductor(module) -> Callable:
    """``make(threads, batch)`` of ``module`` compiled by inductor (freezing on, fixed shapes)."""
    import torch._inductor.config as cfg

    cfg.freezing = True

    def make(threads, batch):
        fn = torch.compile(module, dynamic=False)

        def run(x):
            with torch.no_grad():
                return fn(x)

        return run

    return make


def onnxruntime_session(path) -> Callable:
    """``make(threads, batch)`` of an ONNX file in onnxruntime (CPU, all graph optimizations)."""
    from evolq.export import onnx_session

    def make(threads, batch):
        sess = onnx_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.asarray(x, dtype=np.float32)})[0]

    make.takes_numpy = True
    return make


def openvino_model(model) -> Callable:
    """``make(threads, batch)`` of an OpenVINO model (or ONNX file): static shape, the LATENCY hint,
    f32 inference precision (on CPUs with AMX or AVX512-BF16 the default would run float ops in bf16)."""
    import openvino as ov

    core = ov.Core()

    def make(threads, batch):
        m = (core.read_model(str(model)) if isinstance(model, (str, Path)) else model).clone()
        shape = list(m.input(0).get_partial_shape().get_min_shape())
        m.reshape({m.input(0).get_any_name(): ov.PartialShape([batch, *shape[1:]])})
        compiled = core.compile_model(m, "CPU", {ov.properties.inference_num_threads(): threads,
                                                 ov.properties.hint.performance_mode():
                                                     ov.properties.hint.PerformanceMode.LATENCY,
                                                 ov.properties.hint.inference_precision(): ov.Type.f32})
        def run(x):
            return compiled(np.asarray(x, dtype=np.float32))[compiled.output(0)]

        run.compiled = compiled  # for its runtime model (the kernels it runs)
        return run

    make.takes_numpy = True
    return make


def fp32_compiles(base, example, folder: Path | None = None, openvino: bool | None = None) -> dict:
    """The FP32 candidates of a float model: ``fp32/inductor`` and ``fp32/onnxruntime`` (its ONNX export,
    opset 17), and ``fp32/openvino`` where OpenVINO is installed (or ``openvino`` says so)."""
    import copy

    from evolq.export import export_float_onnx

    folder = Path(folder or tempfile.mkdtemp(prefix="evolq-fp32-"))
    path = export_float_onnx(copy.deepcopy(base).eval(), folder / "fp32.onnx", opset=17, example=example[:1])
    out = {"fp32/inductor": inductor(copy.deepcopy(base).eval()), "fp32/onnxruntime": onnxruntime_session(path)}
    if openvino is None:
        import importlib.util

        openvino = importlib.util.find_spec("openvino") is not None
    if openvino:
        out["fp32/openvino"] = openvino_model(path)
    return out


def time_common_baseline(int8: dict, fp32: dict, images: torch.Tensor, threads=(2, 1), batches=(32, 1),
                         pairs: int = 5, warmup: int = 2) -> dict:
    """Time every candidate of ``int8`` and ``fp32`` (name -> ``make(threads, batch)``) alternately, per
    thread count and batch size. Returns ``{"b{batch}_t{threads}": {"baseline": the fastest FP32 name,
    "times_ms": name -> median ms, "speedup": int8 name -> {"median", "min", "max"} of the per-round
    ratio baseline / it, "rounds_s", "load_1m"}}``. A factory with ``takes_numpy`` gets a NumPy batch
    (converted before the timing), the others a tensor."""
    out = {}
    for t in threads:
        torch._dynamo.reset()
        torch.set_num_threads(t)
        for b in batches:
            x = images[:b] if images.shape[0] >= b else images[:1].expand(b, *images.shape[1:]).contiguous()
            xn = x.numpy()
            cands = {}
            for name, make in {**fp32, **int8}.items():
                fn, arg = make(t, b), xn if getattr(make, "takes_numpy", False) else x
                cands[name] = lambda f=fn, v=arg: f(v)
            r = time_alternating(cands, next(iter(fp32)), pairs=pairs, warmup=warmup)
            rounds = {n: v["rounds_s"] for n, v in r["times"].items()}
            base = min(fp32, key=lambda n: r["times"][n]["median_s"])
            speed = {}
            for n in int8:
                ratios = [bt / it for bt, it in zip(rounds[base], rounds[n])]
                speed[n] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            out[f"b{b}_t{t}"] = {"batch": b, "threads": t, "baseline": base, "harness": HARNESS,
                                 "times_ms": {n: v["median_s"] * 1e3 for n, v in r["times"].items()},
                                 "speedup": speed, "rounds_s": rounds, "pairs": pairs, "warmup": warmup,
                                 "load_1m": [r["load_1m_before"], r["load_1m_after"]]}
            print(f"  batch {b}, {t} threads: baseline {base} {out[f'b{b}_t{t}']['times_ms'][base]:.1f} ms; "
                  + ", ".join(f"{n} {s['median']:.2f}x" for n, s in speed.items()), flush=True)
    return out
