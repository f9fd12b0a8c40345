"""Peer int8 deployment tools on the same data and protocol: accuracy, what each one runs
as integer kernels, and its speed against the FP32 model in the same runtime.

For one model (``--model``; real ImageNet weights from the assets folder, ``load_model``),
each peer quantizes W8A8 with the recipe its own documentation recommends, calibrating
(where it calibrates) on the 500 images of the calibration pool, and is evaluated on the
500 images of the evaluation split:

* ``ort-static-s8s8`` / ``ort-static-u8s8``: onnxruntime ``quant_pre_process`` then
  ``quantize_static`` (QDQ, per-channel weights, MinMax); activations int8 (the data types
  onnxruntime's docs call the default and first choice) or uint8; weights int8;
* ``ort-dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` (int8 weights; activations
  quantized at run time);
* ``openvino-nncf``: ``ov.convert_model`` then ``nncf.quantize`` (``ModelType.TRANSFORMER`` for
  a ViT, the default recipe otherwise; ``subset_size`` = all calibration images), run by
  OpenVINO's CPU plugin;
* ``pt2e-x86-inductor``: ``torch.export`` -> ``prepare_pt2e`` with ``X86InductorQuantizer``'s
  default config -> calibration -> ``convert_pt2e`` -> ``torch.compile`` with inductor
  freezing (torchao's PT2E flow);
* ``torchao-int8-dynamic``: ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``
  (Linear layers only, by design) -> ``torch.compile`` with freezing.

Per peer: top-1, agreement with the FP32 PyTorch logits and mean KL(FP32 || peer) on the
evaluation split (``evolq.evaluate.metrics``), the same for the runtime's own FP32 model
(the speed baseline); seconds of the quantization step (calibration included); what
actually runs as integer vs float kernels (onnxruntime: op types of its optimized graph;
OpenVINO: ``layerType``/``runtimePrecision`` of the compiled runtime model; inductor: the
kernels called by the generated code); and the latency of int8 vs that runtime's FP32 model
with identical settings (``evolq.export.bench.time_alternating``: warm-up, then alternating
timed rounds, median per-round speedup), batch 32 and 1, 2 and 1 threads. Compiled torch
models get fixed shapes (``dynamic=False``), compiled once per batch size and thread count
(inductor bakes the thread count into its kernels). OpenVINO gets an explicit thread count,
the LATENCY hint and f32 inference precision for both models: on a CPU with AMX or
AVX512-BF16 its default would run the "FP32" model's float ops in bf16.

The peers are not evolq dependencies; they live in the benchmark's own environment:

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peer-venv/bin/pip install -e '.[export]' nncf openvino torchao onnxruntime onnx

Run in pieces of a few minutes each on 2 cores (the PT2E and torchao peers in processes of their own: importing
the PT2E x86 quantizer registers inductor passes that change how torchao's int8 linears lower; their 1-thread
latency in a second process, ``--latency-only``), then merge the pieces into one file per model:

    P=/work/peer-venv/bin/python M=vit_tiny_patch16_224
    $P benchmarks/deploy_peers.py --model $M --peers ort-static-s8s8 ort-static-u8s8 --out /tmp/ort_static.json
    $P benchmarks/deploy_peers.py --model $M --peers ort-dynamic openvino-nncf --out /tmp/ort_dyn_ov.json
    $P benchmarks/deploy_peers.py --model $M --peers pt2e-x86-inductor --threads 2 --out /tmp/pt2e_t2.json
    $P benchmarks/deploy_peers.py --model $M --peers pt2e-x86-inductor --threads 1 --latency-only \\
        --out /tmp/pt2e_t1.json
    $P benchmarks/deploy_peers.py --model $M --peers torchao-int8-dynamic --threads 2 --out /tmp/ao_t2.json
    $P benchmarks/deploy_peers.py --model $M --peers torchao-int8-dynamic --threads 1 --latency-only \\
        --out /tmp/ao_t1.json
    $P benchmarks/deploy_peers.py --merge /tmp/ort_static.json /tmp/ort_dyn_ov.json /tmp/pt2e_t2.json \\
        /tmp/pt2e_t1.json /tmp/ao_t2.json /tmp/ao_t1.json --out benchmarks/results/deploy_peers_vit_tiny.json

(the same with ``--model tf_efficientnet_lite0`` for ``deploy_peers_efficientnet_lite0.json``).
A peer that fails is recorded with a one-line ``error`` and the run goes on.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import re
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from evolq.data import assets_dir, load_images  # noqa: E402
from evolq.evaluate import metrics  # noqa: E402
from evolq.export import export_float_onnx  # noqa: E402
from evolq.export.bench import cpu_info, time_alternating  # noqa: E402
from evolq.fsio import write_json  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

ORT_DOC = "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"
RECIPES = {
    "ort-static-s8s8": (
        "quant_pre_process; quantize_static(quant_format=QDQ, per_channel=True, calibrate_method=MinMax, "
        "activation_type=QInt8, weight_type=QInt8); onnxruntime CPU, ORT_ENABLE_ALL",
        ORT_DOC + " ('S8S8 with QDQ is the default setting ... It should be the first choice'; pre-processing "
        "recommended before quantization)"),
    "ort-static-u8s8": (
        "quant_pre_process; quantize_static(quant_format=QDQ, per_channel=True, calibrate_method=MinMax, "
        "activation_type=QUInt8, weight_type=QInt8); onnxruntime CPU, ORT_ENABLE_ALL",
        ORT_DOC + " (U8S8: uint8 activations, int8 weights; no reduce_range: the CPU has VNNI)"),
    "ort-dynamic": (
        "quant_pre_process; quantize_dynamic(weight_type=QInt8); onnxruntime CPU, ORT_ENABLE_ALL",
        ORT_DOC + " (dynamic quantization; the docs suggest it for transformers, static for CNNs)"),
    "openvino-nncf": (
        "ov.convert_model(torch model); nncf.quantize(ov_model, nncf.Dataset(calibration images, one per item), "
        "subset_size=all, model_type=TRANSFORMER for ViT else default); OpenVINO CPU plugin",
        "https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/quantizing-models-post-training/"
        "basic-quantization-flow.html (model_type=nncf.ModelType.TRANSFORMER for transformer models)"),
    "pt2e-x86-inductor": (
        "torch.export.export(model).module(); prepare_pt2e(X86InductorQuantizer().set_global("
        "get_default_x86_inductor_quantization_config())); calibrate; convert_pt2e; "
        "torch._inductor.config.freezing=True; torch.compile",
        "https://docs.pytorch.org/ao/main/tutorials_source/pt2e_quant_x86_inductor.html (PyTorch 2 Export "
        "Quantization with X86 Backend through Inductor; the flow now lives in torchao.quantization.pt2e)"),
    "torchao-int8-dynamic": (
        "quantize_(model, Int8DynamicActivationInt8WeightConfig()) (defaults: per-token symmetric int8 activations, "
        "per-channel int8 weights, Linear layers only); torch._inductor.config.freezing=True; torch.compile",
        "https://docs.pytorch.org/ao/stable/api_reference/generated/torchao.quantization."
        "Int8DynamicActivationInt8WeightConfig.html"),
}
PEERS = list(RECIPES)

# onnxruntime optimized-graph op types: integer compute kernels vs float compute kernels
ORT_INTEGER = {"QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "ConvInteger", "QAttention", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul",
               "QLinearSigmoid",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax",
               "QLinearWhere", "QLinearReduceMean"}
# integer element-wise / pooling / softmax kernels: counted among the integer ones, left out of the compute count
ORT_INTEGER_ELEMENTWISE = {"QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool",
                           "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
                           "QLinearReduceMean"}
ORT_FLOAT = {"MatMul", "Gemm", "Conv", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv", "ConvTranspose",
             "Attention", "MultiHeadAttention"}
# OpenVINO runtime layer types that do the multiply-accumulate work (plus the fused "Subgraph"s that hold a MatMul
# or a ScaledDotProductAttention: the CPU plugin fuses a ViT's attention MatMul-Softmax-MatMul into one)
OV_COMPUTE = {"FullyConnected", "Convolution", "GroupConvolution", "MatMul", "Deconvolution",
              "ScaledDotProductAttention"}
# inductor generated code: the kernels its ``call`` invokes (``bufN = torch.ops.x.y.default(...)``,
# ``extern_kernels.mm(...)``); integer ones by name, float compute ones by name, the rest left out
CALL = re.compile(r"^\s*(?:buf\w*\s*=\s*)?((?:torch\.ops|extern_kernels)\.[\w.]+)\(")
INDUCTOR_INTEGER = ("qlinear", "qconv", "_int_mm", "int8", "qmatmul", "int_scaled")
INDUCTOR_FLOAT = ("mm", "linear", "conv", "attention", "matmul")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--peers", nargs="+", default=PEERS, choices=PEERS)
    p.add_argument("--calib", type=int, default=500, help="calibration images (first N of the calibration pool)")
    p.add_argument("--eval", type=int, default=500, help="evaluation images (first N of the evaluation split)")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 1], help="latency batch sizes")
    p.add_argument("--threads", nargs="+", type=int, default=[2, 1], help="latency thread counts (the first one "
                   "also evaluates)")
    p.add_argument("--pairs", type=int, default=5, help="timed alternating rounds per latency figure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=32, help="batch size of the evaluation runs")
    p.add_argument("--latency-only", action="store_true", help="skip the evaluation (for latency pieces of a run "
                   "split over processes; --merge adds their latency entries to the peer's full entry)")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge the peers of these result files (one model, runs split over processes) into "
                        "--out, then exit; a later evaluated entry of a peer replaces an earlier one, a --latency-only "
                        "entry adds its latency figures")
    return p.parse_args(argv)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def padded_logits(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits of ``fn`` on ``x`` in batches of exactly ``batch`` (the last one padded with zeros)."""
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        if n < batch:
            xb = torch.cat([xb, xb.new_zeros((batch - n, *xb.shape[1:]))])
        outs.append(torch.as_tensor(np.asarray(fn(xb)))[:n].float())
    return torch.cat(outs)


def kernel_counts(counts: dict, integer, floating) -> dict:
    i = {k: v for k, v in sorted(counts.items()) if k in integer and v}
    f = {k: v for k, v in sorted(counts.items()) if k in floating and v}
    return compute_total({"integer": i, "float": f, "integer_total": sum(i.values()), "float_total": sum(f.values())})


def compute_total(k: dict) -> dict:
    """Add ``integer_compute_total``: the integer kernels that do a Linear/MatMul/Conv's work (all integer ones
    but onnxruntime's element-wise, pooling, concat and softmax QLinear* ops)."""
    k["integer_compute_total"] = sum(v for n, v in k["integer"].items() if n not in ORT_INTEGER_ELEMENTWISE)
    return k


# -- onnxruntime -------------------------------------------------------------------------
def ort_session(path, threads: int, optimized_path=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_kernels(path, threads: int, tmp: Path) -> dict:
    import onnx

    opt = tmp / (Path(path).stem + "_optimized.onnx")
    ort_session(path, threads, optimized_path=opt)
    counts = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    out = kernel_counts(counts, ORT_INTEGER, ORT_FLOAT)
    out["quantize_linear"] = counts.get("QuantizeLinear", 0)
    out["dequantize_linear"] = counts.get("DequantizeLinear", 0)
    out["source"] = "op types of onnxruntime's optimized graph (optimized_model_filepath, ORT_ENABLE_ALL)"
    return out


def peer_ort(kind, base, xc, xe, tmp: Path, args):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp = tmp / "fp32.onnx"
    if not fp.exists():
        export_float_onnx(copy.deepcopy(base), fp, opset=17, example=xe[:1])
    q = tmp / f"{kind}.onnx"
    t0 = time.perf_counter()
    pre = tmp / "fp32_pre.onnx"
    quant_pre_process(str(fp), str(pre))
    if kind == "ort-dynamic":
        quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8)
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(range(0, len(xc), 8))

            def get_next(self):
                i = next(self.it, None)
                return None if i is None else {"input": xc[i:i + 8].numpy()}

        act = QuantType.QInt8 if kind == "ort-static-s8s8" else QuantType.QUInt8
        # CalibMaxIntermediateOutputs: fold the collected outputs into the min/max ranges every 4 batches (the
        # same ranges as one pass over all images; keeping every activation of 500 images would not fit in memory)
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibMaxIntermediateOutputs": 4})
    quant_s = time.perf_counter() - t0

    def build(threads, batch):
        fs, qs = ort_session(fp, threads), ort_session(q, threads)
        run = lambda s: (lambda x: s.run(None, {"input": x.numpy() if isinstance(x, torch.Tensor) else x})[0])
        return run(fs), run(qs)

    return quant_s, build, {"fp32": ort_kernels(fp, args.threads[0], tmp), "int8": ort_kernels(q, args.threads[0], tmp)}


# -- OpenVINO + NNCF -----------------------------------------------------------------------
def ov_kernels(compiled) -> dict:
    counts, primitives, others = collections.Counter(), collections.Counter(), collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str)
        names = rt["originalLayersNames"].astype(str).lower()
        if layer == "Subgraph" and ("matmul" in names or "scaled_dot_product" in names):
            layer = "Subgraph[MatMul]"
        elif layer not in OV_COMPUTE:
            others[f"{layer}:{rt['runtimePrecision'].astype(str)}"] += 1
            continue
        counts[f"{layer}:{rt['runtimePrecision'].astype(str)}"] += 1
        primitives[f"{layer}:{rt['primitiveType'].astype(str)}"] += 1
    integer = {k for k in counts if k.split(":")[1] in ("i8", "u8", "i4", "u4")}
    out = kernel_counts(counts, integer, set(counts) - integer)
    out["primitives"] = dict(sorted(primitives.items()))
    out["source"] = ("layerType:runtimePrecision of the compiled runtime model's compute layers (a fused Subgraph "
                     "counts when its originalLayersNames hold a MatMul or ScaledDotProductAttention); primitives: "
                     "their primitiveType")
    out["other_layers"] = dict(sorted(others.items()))
    return out


def peer_openvino(kind, base, xc, xe, tmp: Path, args):
    import nncf
    import openvino as ov

    fp_model = ov.convert_model(copy.deepcopy(base).eval(), example_input=xc[:1])
    t0 = time.perf_counter()
    data = nncf.Dataset([xc[i:i + 1].numpy() for i in range(len(xc))])
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if "vit" in args.model else {}
    q_model = nncf.quantize(fp_model, data, subset_size=len(xc), **extra)
    quant_s = time.perf_counter() - t0
    core = ov.Core()

    def compile_(model, threads, batch):
        m = model.clone()
        m.reshape({m.input(0).get_any_name(): ov.PartialShape([batch, *xc.shape[1:]])})
        cfg = {ov.properties.inference_num_threads(): threads,
               ov.properties.hint.performance_mode(): ov.properties.hint.PerformanceMode.LATENCY,
               ov.properties.hint.inference_precision(): ov.Type.f32}
        return core.compile_model(m, "CPU", cfg)

    def build(threads, batch):
        fc, qc = compile_(fp_model, threads, batch), compile_(q_model, threads, batch)
        run = lambda c: (lambda x: c(x.numpy() if isinstance(x, torch.Tensor) else x)[c.output(0)])
        return run(fc), run(qc)

    b = args.eval_batch
    kernels = {"fp32": ov_kernels(compile_(fp_model, args.threads[0], b)),
               "int8": ov_kernels(compile_(q_model, args.threads[0], b))}
    return quant_s, build, kernels


# -- torch.compile peers --------------------------------------------------------------------
def inductor_kernels(codes) -> dict:
    counts = collections.Counter(m.group(1) for code in codes for line in code.splitlines()
                                 if (m := CALL.match(line)))
    integer = {k for k in counts if any(p in k.lower() for p in INDUCTOR_INTEGER)}
    floating = {k for k in counts if k not in integer and any(p in k.lower() for p in INDUCTOR_FLOAT)}
    out = kernel_counts(counts, integer, floating)
    out["other_calls"] = {k: v for k, v in sorted(counts.items()) if k not in integer | floating}
    out["source"] = ("kernels called by inductor's generated code (torch._inductor.utils.run_and_get_code); its "
                     "fused C++ loops (cpp_fused_*) are elementwise/reduction code and are not counted")
    return out


def peer_torch(kind, base, xc, xe, tmp: Path, args):
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    inductor_config.freezing = True
    fp_model = copy.deepcopy(base).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        if kind == "pt2e-x86-inductor":
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            batch = torch.export.Dim("batch", min=1, max=1024)
            exported = torch.export.export(copy.deepcopy(base).eval(), (xc[:2],),
                                           dynamic_shapes=({0: batch},)).module()
            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            for i in range(0, len(xc), args.eval_batch):
                prepared(xc[i:i + args.eval_batch])
            q_model = convert_pt2e(prepared)
            try:
                from torchao.quantization.pt2e import move_exported_model_to_eval

                move_exported_model_to_eval(q_model)
            except ImportError:
                pass
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            q_model = copy.deepcopy(base).eval()
            quantize_(q_model, Int8DynamicActivationInt8WeightConfig())
    quant_s = time.perf_counter() - t0
    kernels = {}
    state = {"threads": None}

    def build(threads, batch):
        if state["threads"] != threads:  # inductor bakes the OpenMP thread count into its kernels: recompile
            torch._dynamo.reset()
            torch.set_num_threads(threads)
            state["threads"] = threads
            state["fc"] = torch.compile(fp_model, dynamic=False)
            state["qc"] = torch.compile(q_model, dynamic=False)
        fc, qc = state["fc"], state["qc"]
        if not kernels:
            with torch.no_grad():
                x = xe[:args.eval_batch]
                kernels["fp32"] = inductor_kernels(run_and_get_code(fc, x)[1])
                kernels["int8"] = inductor_kernels(run_and_get_code(qc, x)[1])

        def run(c):
            def f(x):
                with torch.no_grad():
                    return c(x)
            return f

        return run(fc), run(qc)

    return quant_s, build, kernels


PEER_FN = {"ort-static-s8s8": peer_ort, "ort-static-u8s8": peer_ort, "ort-dynamic": peer_ort,
           "openvino-nncf": peer_openvino, "pt2e-x86-inductor": peer_torch, "torchao-int8-dynamic": peer_torch}


def run_peer(kind, base, xc, xe, ye, ref, tmp: Path, args) -> dict:
    recipe, doc = RECIPES[kind]
    res = {"recipe": recipe, "doc": doc}
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads[0])
    quant_s, build, kernels = PEER_FN[kind](kind, base, xc, xe, tmp, args)
    res["quant_seconds"] = quant_s
    t_eval = time.perf_counter()
    fp_fn, q_fn = build(args.threads[0], args.eval_batch)
    res["compile_seconds_first"] = time.perf_counter() - t_eval
    res["kernels"] = kernels
    if not args.latency_only:
        q_logits = padded_logits(q_fn, xe, args.eval_batch)
        fp_logits = padded_logits(fp_fn, xe, args.eval_batch)
        res["int8"] = metrics(q_logits, ye, ref)
        res["fp32_runtime"] = metrics(fp_logits, ye, ref)
        res["eval_seconds"] = time.perf_counter() - t_eval
        print(f"{kind}: top-1 {res['int8']['top1']:.1f} (runtime FP32 {res['fp32_runtime']['top1']:.1f}), "
              f"agreement {res['int8']['agreement']:.1f}%, KL {res['int8']['kl']:.4f}; quantized in {quant_s:.1f} s; "
              f"integer kernels {kernels['int8']['integer']}, float {kernels['int8']['float']}", flush=True)
    res["latency"] = {}
    for threads in args.threads:
        for batch in args.batches:
            fp_fn, q_fn = build(threads, batch)
            x = xe[:batch]
            x = x.numpy() if kind.startswith(("ort", "openvino")) else x
            r = time_alternating({"fp32": lambda f=fp_fn, x=x: f(x), "int8": lambda f=q_fn, x=x: f(x)}, "fp32",
                                 pairs=args.pairs, warmup=args.warmup)
            res["latency"][f"b{batch}_t{threads}"] = r
            print(f"  batch {batch}, {threads} threads: FP32 {r['times']['fp32']['median_s'] * 1e3:.1f} ms, int8 "
                  f"{r['times']['int8']['median_s'] * 1e3:.1f} ms, speedup {r['speedup']['int8']['median']:.2f}x "
                  f"(min {r['speedup']['int8']['min']:.2f}, max {r['speedup']['int8']['max']:.2f})", flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def table(out: dict) -> str:
    rows = [f"{'peer':22s} {'top-1':>6s} {'agree':>6s} {'KL':>7s} {'b32/t2':>7s} {'b1/t2':>7s} {'int/float':>10s} "
            f"{'quant s':>8s}"]
    fp = out["fp32_torch"]
    rows.append(f"{'FP32 (PyTorch eager)':22s} {fp['top1']:6.1f} {100.0:6.1f} {0.0:7.4f}")
    for name, r in out["peers"].items():
        if "error" in r:
            rows.append(f"{name:22s} FAILED: {r['error']}")
            continue
        if "int8" not in r:
            rows.append(f"{name:22s} (latency only)")
            continue
        sp = lambda key, r=r: (f"{r['latency'][key]['speedup']['int8']['median']:6.2f}x" if key in r["latency"]
                               else f"{'-':>7s}")
        k = compute_total(r["kernels"]["int8"])
        rows.append(f"{name:22s} {r['int8']['top1']:6.1f} {r['int8']['agreement']:6.1f} {r['int8']['kl']:7.4f} "
                    f"{sp('b32_t2')} {sp('b1_t2')} {k['integer_compute_total']:>4d}/{k['float_total']:<5d} "
                    f"{r['quant_seconds']:8.1f}")
    return "\n".join(rows)


def merge(files, out_path) -> int:
    out = None
    for f in files:
        d = json.loads(Path(f).read_text())
        if out is None:
            out = d
            out["runs"] = [d["run"]]
        else:
            if d["model"] != out["model"]:
                raise SystemExit(f"{f}: model {d['model']} differs from {out['model']}")
            for name, r in d["peers"].items():
                old = out["peers"].get(name)
                if old is None or "error" in old or "error" in r or ("int8" in old and "int8" in r):
                    out["peers"][name] = r  # a new peer, or a later full run of it replaces the earlier one
                elif "int8" not in r:  # a --latency-only piece adds its latency entries
                    old["latency"].update(r["latency"])
                else:  # the evaluated piece after a latency-only one
                    r["latency"] = {**old["latency"], **r["latency"]}
                    out["peers"][name] = r
            out["runs"].append(d["run"])
    out.pop("run", None)
    for r in out["peers"].values():  # files written before integer_compute_total existed
        for k in r.get("kernels", {}).values():
            compute_total(k)
    write_json(out_path, out, indent=1)
    print(table(out))
    print(f"merged {len(files)} files into {out_path}: {', '.join(out['peers'])}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if {"pt2e-x86-inductor", "torchao-int8-dynamic"} <= set(args.peers):
        # importing the PT2E x86 quantizer registers inductor pattern passes that also rewrite torchao's int8
        # dynamic linears (_int_mm -> qlinear_pointwise): each must run in a process of its own
        raise SystemExit("run pt2e-x86-inductor and torchao-int8-dynamic in separate processes")
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads[0])
    base = load_model(args.model).eval()
    tf = model_transform(base)
    data = assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=args.calib)
    xe, ye = load_images(data, tf, "eval", limit=args.eval)
    with torch.no_grad():
        ref = torch.cat([base(xe[i:i + args.eval_batch]).float() for i in range(0, len(xe), args.eval_batch)])
    out = {"model": args.model, "calib_images": len(xc), "eval_images": len(xe), "w_bits": 8, "a_bits": 8,
           "reference": "FP32 PyTorch eager logits of load_model(model) on the evaluation split",
           "fp32_torch": metrics(ref, ye),
           "cpu": cpu_info(), "machine": platform.machine(),
           "env": {k: version(k) for k in ("torch", "torchao", "onnxruntime", "onnx", "openvino", "nncf", "timm",
                                          "numpy")} | {"python": platform.python_version()},
           "protocol": {"latency": "evolq.export.bench.time_alternating, int8 vs the same runtime's FP32 model, same "
                                   "threads and batch; speedup = median per-round FP32 time / int8 time",
                        "openvino": "inference_num_threads=threads, performance_mode=LATENCY, inference_precision=f32 "
                                    "for both models, static input shape per batch",
                        "torch_compile": "torch._inductor.config.freezing=True, torch.compile(dynamic=False), "
                                         "recompiled per thread count; run under torch.no_grad()",
                        "onnxruntime": "CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=threads, "
                                       "inter_op_num_threads=1"},
           "run": {"peers": args.peers, "batches": args.batches, "threads": args.threads, "pairs": args.pairs,
                   "warmup": args.warmup, "eval_batch": args.eval_batch, "argv": sys.argv[1:]},
           "peers": {}}
    tmp = Path(tempfile.mkdtemp(prefix="evolq-deploy-peers-"))
    for kind in args.peers:
        try:
            out["peers"][kind] = run_peer(kind, base, xc, xe, ye, ref, tmp, args)
        except Exception as e:  # a broken peer is recorded, the others still run
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            out["peers"][kind] = {"recipe": RECIPES[kind][0], "doc": RECIPES[kind][1],
                                  "error": f"{type(e).__name__}: {first}"}
        out["run"]["seconds"] = time.perf_counter() - t_start
        write_json(args.out, out, indent=1)  # after every peer: a partial run keeps what it measured
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
