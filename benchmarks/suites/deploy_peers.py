"""Peer int8 deployment tools and evolq's deploy regime on the same data and protocol: accuracy,
what each runs as integer kernels, and its speed. For one model, each tool quantizes W8A8 with the
recipe its own documentation recommends, calibrating on the calibration pool, and is evaluated on
the evaluation split (against the FP32 PyTorch logits):

* ``ort-static-s8s8`` / ``ort-static-u8s8``: onnxruntime ``quant_pre_process`` then ``quantize_static``
  (QDQ, per-channel int8 weights, MinMax), int8 or uint8 activations; ``ort-dynamic``: ``quantize_dynamic``;
* ``openvino-nncf``: ``ov.convert_model`` then ``nncf.quantize`` (``ModelType.TRANSFORMER`` for a ViT);
* ``pt2e-x86-inductor``: ``torch.export`` -> ``prepare_pt2e(X86InductorQuantizer)`` -> calibration ->
  ``convert_pt2e`` -> ``torch.compile`` with freezing; ``torchao-int8-dynamic``: ``quantize_(model,
  Int8DynamicActivationInt8WeightConfig())`` -> ``torch.compile`` with freezing;
* ``evolq-pt2-inductor``, ``evolq-onnx-onnxruntime``, ``evolq-onnx-openvino``: evolq's deploy regime
  (``QuantConfig.preset("deploy")``, calibrated on the pool less its 10% hold-out) exported as pt2 / ONNX.

Speed (``benchmarks/timing.py``): every tool's int8 model and the FP32 compiles of the model (inductor,
onnxruntime, OpenVINO) timed alternately in this process, each speedup against the fastest FP32.
Kernels: onnxruntime's optimized graph, OpenVINO's compiled runtime model, inductor's generated code.
Importing PT2E's x86 quantizer (evolq's pt2 runtime does too) registers inductor passes that rewrite
torchao's int8 dynamic linears, so ``torchao-int8-dynamic`` runs in a process of its own; processes
writing the same results file add their tools to it. A tool that fails is recorded with a one-line
``error``. The peers are not evolq dependencies: run with a venv that has them::

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install -e '.[export]' nncf openvino torchao onnxruntime onnx
"""
from __future__ import annotations

import collections
import copy
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

from evolq.evaluate import metrics
from evolq.export import onnx_session

from ..report import Col, Section, Table
from ..runner import Suite, cpu_info, register
from ..timing import HARNESS, fp32_compiles, inductor, onnxruntime_session, openvino_model, time_common_baseline
from .deploy import SPEED_OLD

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


def ort_kernels(path, threads: int, tmp: Path) -> dict:
    import onnx

    opt = tmp / (Path(path).stem + "_optimized.onnx")
    onnx_session(path, threads, optimized_path=opt)
    counts = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    out = kernel_counts(counts, ORT_INTEGER, ORT_FLOAT)
    out["quantize_linear"] = counts.get("QuantizeLinear", 0)
    out["dequantize_linear"] = counts.get("DequantizeLinear", 0)
    out["source"] = "op types of onnxruntime's optimized graph (optimized_model_filepath, ORT_ENABLE_ALL)"
    return out


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


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def ort_quantized(kind, ctx) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q, pre, xc = ctx["tmp"] / f"{kind}.onnx", ctx["tmp"] / "fp32_pre.onnx", ctx["xc"]
    quant_pre_process(str(ctx["fp32_onnx"]), str(pre))
    if kind == "ort-dynamic":
        quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8)
        return q

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(xc), 8))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {"input": xc[i:i + 8].numpy()}

    act = QuantType.QInt8 if kind == "ort-static-s8s8" else QuantType.QUInt8
    # CalibMaxIntermediateOutputs: fold the collected outputs into the min/max ranges every 4 batches (the
    # same ranges as one pass over all images; keeping every activation of 500 images would not fit in memory)
    quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=act,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"CalibMaxIntermediateOutputs": 4})
    return q


def ort_tool(kind, ctx) -> dict:
    q = ort_quantized(kind, ctx)
    return {"make": onnxruntime_session(q), "kernels": lambda: ort_kernels(q, ctx["threads"], ctx["tmp"])}


def ov_kernels_of(make, ctx):
    return lambda: ov_kernels(make(ctx["threads"], ctx["eval_batch"]).compiled)


def openvino_tool(kind, ctx) -> dict:
    import nncf
    import openvino as ov

    fp_model = ov.convert_model(copy.deepcopy(ctx["base"]).eval(), example_input=ctx["xc"][:1])
    data = nncf.Dataset([ctx["xc"][i:i + 1].numpy() for i in range(len(ctx["xc"]))])
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if "vit" in ctx["model"] else {}
    make = openvino_model(nncf.quantize(fp_model, data, subset_size=len(ctx["xc"]), **extra))
    return {"make": make, "kernels": ov_kernels_of(make, ctx)}


def compiled_kernels(module, ctx):
    from torch._inductor.utils import run_and_get_code

    def count():
        with torch.no_grad():
            return inductor_kernels(run_and_get_code(torch.compile(module, dynamic=False),
                                                     ctx["xe"][:ctx["eval_batch"]])[1])

    return count


def torch_tool(kind, ctx) -> dict:
    xc, batch = ctx["xc"], ctx["eval_batch"]
    with torch.no_grad():
        if kind == "pt2e-x86-inductor":
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            dim = torch.export.Dim("batch", min=1, max=1024)
            exported = torch.export.export(copy.deepcopy(ctx["base"]).eval(), (xc[:2],), dynamic_shapes=({0: dim},))
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported.module(), quantizer)
            for i in range(0, len(xc), batch):
                prepared(xc[i:i + batch])
            q_model = convert_pt2e(prepared)
            try:
                from torchao.quantization.pt2e import move_exported_model_to_eval

                move_exported_model_to_eval(q_model)
            except ImportError:
                pass
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            q_model = copy.deepcopy(ctx["base"]).eval()
            quantize_(q_model, Int8DynamicActivationInt8WeightConfig())
    return {"make": inductor(q_model), "kernels": compiled_kernels(q_model, ctx)}


def evolq_model(ctx):
    """evolq's deploy-regime start, built once per process for the evolq tools."""
    if "evolq" not in ctx:
        from evolq import QuantConfig, prepare_model
        from evolq.data import split_calibration

        fit, hold = split_calibration(ctx["xc"], 0.1, 0)
        ctx["evolq"] = prepare_model(copy.deepcopy(ctx["base"]), fit, QuantConfig.preset("deploy", w_bits=8, a_bits=8),
                                     arch=ctx["model"], holdout=hold)
    return ctx["evolq"]


def evolq_tool(kind, ctx) -> dict:
    from evolq.export import export_onnx, export_pt2
    from evolq.export.pt2 import load_pt2

    q = evolq_model(ctx)
    if kind == "evolq-pt2-inductor":
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (the int8 inductor passes)

        module = load_pt2(export_pt2(q, ctx["tmp"] / "evolq.pt2")).module()
        return {"make": inductor(module), "kernels": compiled_kernels(module, ctx)}
    path = export_onnx(q, ctx["tmp"] / "evolq.onnx")
    if kind == "evolq-onnx-onnxruntime":
        return {"make": onnxruntime_session(path), "kernels": lambda: ort_kernels(path, ctx["threads"], ctx["tmp"])}
    make = openvino_model(path)
    return {"make": make, "kernels": ov_kernels_of(make, ctx)}


EVOLQ_DOC = "evolq's deploy regime (docs/export.md); QuantConfig.preset('deploy', w_bits=8, a_bits=8)"
TOOLS = {  # name -> (builder, runtime)
    "ort-static-s8s8": (ort_tool, "onnxruntime"), "ort-static-u8s8": (ort_tool, "onnxruntime"),
    "ort-dynamic": (ort_tool, "onnxruntime"), "openvino-nncf": (openvino_tool, "openvino"),
    "pt2e-x86-inductor": (torch_tool, "inductor"), "torchao-int8-dynamic": (torch_tool, "inductor"),
    "evolq-pt2-inductor": (evolq_tool, "inductor"), "evolq-onnx-onnxruntime": (evolq_tool, "onnxruntime"),
    "evolq-onnx-openvino": (evolq_tool, "openvino")}
RECIPES.update({k: (f"prepare_model on the calibration pool less a 10% hold-out; export_{k.split('-')[1]}; "
                    f"{k.split('-')[2]}", EVOLQ_DOC) for k in TOOLS if k.startswith("evolq")})


def build(kind, ctx) -> dict:
    recipe, doc = RECIPES[kind]
    torch.set_num_threads(ctx["threads"])
    t0 = time.perf_counter()
    res = {"recipe": recipe, "doc": doc, **TOOLS[kind][0](kind, ctx)}
    res["quant_seconds"] = time.perf_counter() - t0
    res["kernels"] = compute_total(res["kernels"]())
    return res


def logits_of(make, ctx):
    return padded_logits(make(ctx["threads"], ctx["eval_batch"]), ctx["xe"], ctx["eval_batch"])


def run(run):
    a = run.args
    if {"pt2e-x86-inductor", "torchao-int8-dynamic"} <= set(a.tools) or \
            {"evolq-pt2-inductor", "torchao-int8-dynamic"} <= set(a.tools):
        raise SystemExit("run torchao-int8-dynamic in a process of its own (PT2E's inductor passes rewrite it)")
    d = run.data()
    tmp = Path(tempfile.mkdtemp(prefix="evolq-deploy-peers-"))
    with torch.no_grad():
        ref = torch.cat([d.base(d.xe[i:i + a.eval_batch]).float() for i in range(0, len(d.xe), a.eval_batch)])
    fp32 = fp32_compiles(d.base, d.xe, tmp)
    ctx = {"model": a.model, "base": d.base, "xc": d.xc, "xe": d.xe, "tmp": tmp, "threads": a.threads[0],
           "eval_batch": a.eval_batch, "fp32_onnx": tmp / "fp32.onnx"}
    doc = run.doc
    doc.update({"model": a.model, "calib_images": len(d.xc), "eval_images": len(d.xe), "w_bits": 8, "a_bits": 8,
                "reference": "FP32 PyTorch eager logits of load_model(model) on the evaluation split",
                "fp32_torch": metrics(ref, d.ye), "cpu": cpu_info(), "machine": platform.machine(),
                "env": {k: version(k) for k in ("torch", "torchao", "onnxruntime", "onnx", "openvino", "nncf", "timm",
                                               "numpy")} | {"python": platform.python_version()},
                "protocol": {"latency": HARNESS, "openvino": "inference_num_threads=threads, performance_mode=LATENCY, "
                                                            "inference_precision=f32, static input shape per batch",
                             "torch_compile": "torch._inductor.config.freezing=True, torch.compile(dynamic=False), "
                                              "recompiled per thread count after torch._dynamo.reset()",
                             "onnxruntime": "CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=threads, "
                                            "inter_op_num_threads=1"}})
    doc.setdefault("peers", {})
    fp32_runtime = {rt: metrics(logits_of(fp32[f"fp32/{rt}"], ctx), d.ye, ref) for rt in
                    {TOOLS[k][1] for k in a.tools} if f"fp32/{rt}" in fp32}
    built = {}
    for kind in a.tools:
        try:
            b = build(kind, ctx)
            r = {k: v for k, v in b.items() if k != "make"}
            r["kernels"] = {"int8": b["kernels"]}
            r["int8"] = metrics(logits_of(b["make"], ctx), d.ye, ref)
            r["fp32_runtime"] = fp32_runtime.get(TOOLS[kind][1])
            built[kind] = b["make"]
            print(f"{kind}: top-1 {r['int8']['top1']:.1f}, KL {r['int8']['kl']:.4f}, integer kernels "
                  f"{r['kernels']['int8']['integer']}", flush=True)
        except Exception as e:  # a broken tool is recorded, the others still run
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            r = {"recipe": RECIPES[kind][0], "doc": RECIPES[kind][1], "error": f"{type(e).__name__}: {first}"}
        doc["peers"][kind] = r
        run.save()
    timing = time_common_baseline(built, fp32, d.xe, tuple(a.threads), tuple(a.batches), a.pairs, a.warmup)
    for kind in built:
        doc["peers"][kind]["latency"] = {key: {"speedup": {"int8": t["speedup"][kind]}, "baseline": t["baseline"],
                                               "harness": HARNESS, "times_ms": {n: t["times_ms"][n] for n in
                                                                                (t["baseline"], kind)}}
                                         for key, t in timing.items()}
    doc.setdefault("timing", []).append({"tools": list(built), "argv": sys.argv[1:], "results": timing})
    doc.setdefault("runs", []).append({"peers": a.tools, "batches": a.batches, "threads": a.threads, "pairs": a.pairs,
                                       "warmup": a.warmup, "eval_batch": a.eval_batch,
                                       "seconds": time.perf_counter() - run.t0})
    run.save()


def timing_rows(d):
    rows = []
    for t in d["timing"]:
        for r in t["results"].values():
            for name, ms in sorted(r["times_ms"].items(), key=lambda kv: kv[1]):
                s = r["speedup"].get(name)
                rows.append({"setting": f"batch {r['batch']}, {r['threads']} thread{'s' * (r['threads'] > 1)}",
                             "candidate": name + (" (baseline)" if name == r["baseline"] else ""), "ms": ms,
                             "speedup": f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" if s else "",
                             "load": " -> ".join(f"{v:.1f}" for v in r["load_1m"])})
    return rows


ALL = " ".join(k for k in TOOLS if k != "torchao-int8-dynamic")
register(Suite(
    name="deploy_peers", doc=__doc__, run=run, order=13, resume=True, out="deploy_peers_{short}",
    what="peer int8 tools (onnxruntime static/dynamic, NNCF+OpenVINO, PT2E X86Inductor, torchao) and evolq's "
         "deploy regime, same images, one common FP32 baseline",
    common={"model": "vit_tiny_patch16_224", "calib": 500, "eval": 500},
    args=[(("--tools",), {"nargs": "+", "default": [k for k in TOOLS if k != "torchao-int8-dynamic"],
                          "choices": list(TOOLS)}),
          (("--batches",), {"nargs": "+", "type": int, "default": [32, 1], "help": "latency batch sizes"}),
          (("--threads",), {"nargs": "+", "type": int, "default": [2, 1],
                            "help": "latency thread counts (the first one also evaluates)"}),
          (("--pairs",), {"type": int, "default": 5, "help": "timed alternating rounds per latency figure"}),
          (("--warmup",), {"type": int, "default": 2}),
          (("--eval-batch",), {"type": int, "default": 32, "help": "batch size of the evaluation runs"})],
    results={f"deploy_peers_{s}": [f"--model {m} --tools {ALL}", f"--model {m} --tools torchao-int8-dynamic"]
             for s, m in (("vit_tiny", "vit_tiny_patch16_224"), ("efficientnet_lite0", "tf_efficientnet_lite0"))},
    stale={"deploy_peers_vit_tiny": SPEED_OLD, "deploy_peers_efficientnet_lite0": SPEED_OLD},
    smoke={"tools": ["ort-dynamic", "evolq-onnx-onnxruntime"], "calib": 16, "eval": 8, "threads": [1],
           "batches": [2], "pairs": 1, "warmup": 1, "eval_batch": 4},
    report=[Section("deploy_peers_*", order=10, when=lambda d: bool(d.get("timing")), blocks=[
        lambda d: f"One FP32 baseline for every tool (`{d['file']}.json`, `benchmarks/timing.py`): every int8 model "
                  f"and the FP32 compiles of {d['model']} in the same alternating rounds in one process, on "
                  f"{d['cpu']['model']} ({d['cpu']['cores']} cores, int8 flags {', '.join(d['cpu']['flags'])}); "
                  f"median milliseconds per batch, and the speedup (median, min-max of the per-round ratios) against "
                  f"the fastest FP32 compile. Tools: {', '.join(t for r in d['timing'] for t in r['tools'])}.",
        Table([Col("setting", "setting"), Col("candidate", "candidate"), Col("ms per batch", "ms", "{:.1f}"),
               Col("speedup against the baseline", "speedup"), Col("load (1 min)", "load")], timing_rows)])]))
