"""ONNX QDQ export: file size, onnxruntime latency, agreement with the PyTorch model,
and which nodes onnxruntime runs as integer kernels.

For ViT-Tiny (W8A8 outlier-aware, W4A8 fq-vit) and EfficientNet-Lite0 (W8A8, W4A8),
with real ImageNet weights from the assets folder:

* the start point (``prepare_model``; calibration on the first ``--calib`` images of
  the calibration pool, even labels), exported with ``evolq.export_onnx`` (opset 21);
  the FP32 model (a fresh float copy, BatchNorms unfolded) exported by torch.onnx;
* file sizes (FP32 ONNX vs QDQ ONNX);
* ``check_onnx`` on the evaluation split (odd labels): top-1 agreement of onnxruntime
  (CPU) with evolq's PyTorch model, max and mean absolute logit difference, top-1 of both;
* onnxruntime latency per image, batch 1 and batch 32, FP32 vs QDQ: the median (and
  min) of ``--runs`` timed runs after two warm-up runs, ``--threads`` intra-op threads;
* the op types of the optimized graph onnxruntime saves (``optimized_model_filepath``,
  ORT_ENABLE_ALL): integer kernels (QLinearMatMul, QGemm, QLinearConv,
  MatMulIntegerToFloat, MatMulInteger, MatMulNBits, ...) vs float compute nodes
  (MatMul, Gemm, Conv, FusedConv, FusedMatMul, ...) and the Q/DQ nodes left;
* both forms of weight bias correction (``export_onnx(bias_correction=...)``):
  ``weights`` (default; bit-identical weights) and ``output`` (DequantizeLinear feeds
  the MatMul/Conv directly, so onnxruntime can fuse integer kernels);
* the numerical floor of the check: the top-1 agreement of evolq's PyTorch model with
  itself when PyTorch's oneDNN kernels are switched off (``torch.backends.mkldnn``; its
  native convolution instead), i.e. the same arithmetic summed in another order. A
  quantized model whose predictions move under such float32 rounding differences cannot
  agree with any other runtime more closely than that.

Writes ``benchmarks/results/export.json`` (``evolq.io.write_json``).

    .venv/bin/python benchmarks/export.py                 # 1 thread; ~1.5 h on a loaded 2-core machine
    .venv/bin/python benchmarks/export.py --configs vit-w4a8 --calib 32 --eval 50 --runs 3 --out /tmp/e.json
    # split over two processes, then merge:
    .venv/bin/python benchmarks/export.py --configs effnet-w8a8 effnet-w4a8 --out /tmp/cnn.json
    .venv/bin/python benchmarks/export.py --merge /tmp/vit.json /tmp/cnn.json
"""
from __future__ import annotations

import argparse
import collections
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evolq import QuantConfig, check_onnx, export_onnx, prepare_model  # noqa: E402
from evolq.data import assets_dir, load_images  # noqa: E402
from evolq.export import export_float_onnx, onnx_session  # noqa: E402
from evolq.export.runtimes.onnxruntime import FLOAT_OPS, INTEGER_OPS  # noqa: E402
from evolq.io import write_json  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

CONFIGS = {  # name -> (architecture, preset, w_bits, a_bits, other QuantConfig fields)
    "vit-w8a8-outlier": ("vit_tiny_patch16_224", "outlier-aware", 8, 8, {}),
    "vit-w4a8": ("vit_tiny_patch16_224", "fq-vit", 4, 8, {}),
    "vit-w4a8-outlier": ("vit_tiny_patch16_224", "outlier-aware", 4, 8, {}),
    "effnet-w8a8": ("tf_efficientnet_lite0", "fq-vit", 8, 8, {}),
    "effnet-w4a8": ("tf_efficientnet_lite0", "fq-vit", 4, 8, {}),
    # without weight bias correction nothing sits between the weights' DequantizeLinear and the Conv
    "effnet-w8a8-no-bias-correction": ("tf_efficientnet_lite0", "fq-vit", 8, 8, {"bias_correction": False}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--calib", type=int, default=128, help="calibration images (first N of the pool)")
    p.add_argument("--eval", type=int, default=500, help="evaluation images (first N of the split)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per latency figure (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    p.add_argument("--profile", nargs="+", default=None, metavar="ONNX",
                   help="only profile these ONNX files (time per op type at batch 1, onnxruntime's profiler) and a "
                        "per-tensor vs per-axis Q/DQ pair into --out, then exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge the models and configs of these result files (runs split over processes) "
                        "into --out, then exit")
    return p.parse_args(argv)


def profile(files, out_path, threads: int, runs: int = 3) -> int:
    """Where onnxruntime spends the time: per op type, milliseconds per batch-1 run (onnxruntime's
    own profiler, ``runs`` runs after one warm-up), for each ONNX file; plus the cost of one
    QuantizeLinear+DequantizeLinear pair on a (32, 197, 192) tensor per tensor vs per channel on the
    last axis (the layout of the LayerNorm and channel-factor inputs)."""
    import json

    import onnxruntime as ort
    from onnx import TensorProto, helper

    def qdq_pair(per_axis: bool):
        c = 192
        dims = [c] if per_axis else []
        s = helper.make_tensor("s", TensorProto.FLOAT, dims, [0.01] * (c if per_axis else 1))
        z = helper.make_tensor("z", TensorProto.UINT8, dims, [128] * (c if per_axis else 1))
        at = {"axis": -1} if per_axis else {}
        g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **at),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **at)], "qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 197, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 197, c])], [s, z])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()

    out = {"threads": threads, "runs": runs, "onnxruntime": ort.__version__, "files": {}, "qdq_pair_ms": {}}
    x = np.random.default_rng(0).standard_normal((32, 197, 192)).astype(np.float32)
    for name, per_axis in (("per_tensor", False), ("per_axis_last", True)):
        sess = onnx_session(qdq_pair(per_axis), threads)
        sess.run(None, {"x": x})
        t = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {"x": x})
        out["qdq_pair_ms"][name] = (time.perf_counter() - t) / runs * 1e3
    for f in files:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
        sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
        xb = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sess.run(None, {sess.get_inputs()[0].name: xb})
        for _ in range(runs):
            sess.run(None, {sess.get_inputs()[0].name: xb})
        events = json.loads(Path(sess.end_profiling()).read_text())
        per_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
        total = sum(per_op.values())
        out["files"][Path(f).name] = {"total_ms": total, "bytes": Path(f).stat().st_size,
                                      "ms_per_op_type": {k: round(v, 3) for k, v in per_op.most_common()}}
        print(Path(f).name, f"{total:.1f} ms", dict(per_op.most_common(6)), flush=True)
    write_json(out_path, out)
    return 0


def merge(files, out_path) -> int:
    import json

    out = None
    for f in files:
        d = json.loads(Path(f).read_text())
        if out is None:
            out = d
        else:
            out["models"].update(d["models"])
            out["configs"].update(d["configs"])
    write_json(out_path, out)
    print(f"merged {len(files)} files into {out_path}: {', '.join(out['configs'])}")
    return 0


def latency(path, x: np.ndarray, runs: int, threads: int) -> dict:
    """Seconds per image: median and min of ``runs`` timed runs (two warm-up runs first)."""
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    for _ in range(2):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) / x.shape[0])
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": runs}


def optimized_ops(path, threads: int) -> dict:
    """Op types of the graph onnxruntime optimizes ``path`` into (ORT_ENABLE_ALL, CPU)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        onnx_session(path, threads, optimized_path=opt)
        counts = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return {"integer_kernels": {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS},
            "float_compute": {k: v for k, v in sorted(counts.items()) if k in FLOAT_OPS},
            "quantize_linear": counts.get("QuantizeLinear", 0), "dequantize_linear": counts.get("DequantizeLinear", 0),
            "all": dict(sorted(counts.items()))}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.profile:
        torch.set_num_threads(args.threads)
        return profile(args.profile, args.out, args.threads)
    torch.set_num_threads(args.threads)
    data = assets_dir() / "imagenet-sample"
    out = {"calib_images": args.calib, "eval_images": args.eval, "threads": args.threads, "opset": args.opset,
           "latency_runs": args.runs, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
           "models": {}, "configs": {}}
    cache = {}
    tmp = Path(tempfile.mkdtemp(prefix="evolq-export-"))
    for name in args.configs:
        arch, preset, w_bits, a_bits, extra = CONFIGS[name]
        t0 = time.perf_counter()
        if arch not in cache:
            base = load_model(arch)
            tf = model_transform(base)
            xc, _ = load_images(data, tf, "calib", limit=args.calib)
            xe, ye = load_images(data, tf, "eval", limit=args.eval)
            fp_path = export_float_onnx(copy.deepcopy(base), tmp / f"{arch}_fp32.onnx", opset=args.opset,
                                        example=xe[:1])
            fp = {"bytes": fp_path.stat().st_size,
                  "latency_b1": latency(fp_path, xe[:1].numpy(), args.runs, args.threads),
                  "latency_b32": latency(fp_path, xe[:32].numpy(), args.runs, args.threads),
                  "ops": optimized_ops(fp_path, args.threads)}
            out["models"][arch] = {"fp32_onnx": fp}
            cache[arch] = (base, xc, xe, ye, fp)
            print(f"{arch}: FP32 ONNX {fp['bytes'] / 1e6:.2f} MB, {fp['latency_b1']['median_ms']:.1f} ms/img (b1), "
                  f"{fp['latency_b32']['median_ms']:.1f} ms/img (b32)", flush=True)
        base, xc, xe, ye, fp = cache[arch]
        quant = QuantConfig.preset(preset, w_bits=w_bits, a_bits=a_bits, **extra)
        qmodel = prepare_model(copy.deepcopy(base), xc, quant, arch=arch)
        with torch.no_grad():
            ref = torch.cat([qmodel.model(xe[i:i + 50]) for i in range(0, len(xe), 50)])
            with torch.backends.mkldnn.flags(enabled=False):
                alt = torch.cat([qmodel.model(xe[i:i + 50]) for i in range(0, len(xe), 50)])
        res = {"arch": arch, "preset": preset, "w_bits": w_bits, "a_bits": a_bits, "quant": dict(extra),
               "pytorch_floor": {"agreement": (alt.argmax(1) == ref.argmax(1)).float().mean().item() * 100,
                                 "max_abs_diff": (alt - ref).abs().max().item(),
                                 "mean_abs_diff": (alt - ref).abs().mean().item()}}
        for form in ("weights", "output") if quant.bias_correction else ("weights",):
            path = export_onnx(qmodel, tmp / f"{name}_{form}.onnx", opset=args.opset, example=xe[:1],
                               bias_correction=form)
            r = {"bytes": path.stat().st_size, "size_vs_fp32": path.stat().st_size / fp["bytes"]}
            r["check"] = check_onnx(qmodel, path, xe, ye, batch_size=50, threads=args.threads, reference=ref)
            r["latency_b1"] = latency(path, xe[:1].numpy(), args.runs, args.threads)
            r["latency_b32"] = latency(path, xe[:32].numpy(), args.runs, args.threads)
            r["speedup_b1"] = fp["latency_b1"]["median_ms"] / r["latency_b1"]["median_ms"]
            r["speedup_b32"] = fp["latency_b32"]["median_ms"] / r["latency_b32"]["median_ms"]
            r["ops"] = optimized_ops(path, args.threads)
            res[f"bias_correction_{form}"] = r
            c = r["check"]
            print(f"{name} [{form}]: {r['bytes'] / 1e6:.2f} MB ({r['size_vs_fp32'] * 100:.1f}% of FP32), agreement "
                  f"{c['agreement']:.1f}% (max |d| {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g}), top-1 "
                  f"torch {c['top1_torch']:.1f} onnx {c['top1_onnx']:.1f}; {r['latency_b1']['median_ms']:.1f} / "
                  f"{r['latency_b32']['median_ms']:.1f} ms/img (b1/b32); integer kernels "
                  f"{r['ops']['integer_kernels']}, float {r['ops']['float_compute']}", flush=True)
        print(f"{name}: PyTorch floor (oneDNN off) agreement {res['pytorch_floor']['agreement']:.1f}%", flush=True)
        res["seconds"] = time.perf_counter() - t0
        out["configs"][name] = res
        write_json(args.out, out)  # after every config: a partial run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
