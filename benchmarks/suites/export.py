"""ONNX QDQ export: file size, onnxruntime latency, agreement with the PyTorch model, and which
nodes onnxruntime runs as integer kernels, for ViT-Tiny and EfficientNet-Lite0 start points
(``prepare_model`` on the first ``--calib`` pool images, exported with ``evolq.export_onnx``) against
the FP32 model's ONNX: ``check_onnx`` on the evaluation split, latency per image at batch 1 and 32
(median of ``--runs`` after two warm-ups), the op types of onnxruntime's optimized graph, both
forms of weight bias correction, and the float floor (the PyTorch model with oneDNN off).
Configurations are merged by name into the results file. ``export_profile``: where onnxruntime
spends the time, per op type, in each exported file."""
from __future__ import annotations

import collections
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evolq import QuantConfig, check_onnx, export_onnx, prepare_model
from evolq.export import export_float_onnx, onnx_session
from evolq.export.runtimes.onnxruntime import FLOAT_OPS, INTEGER_OPS

from ..report import Col, Section, Table, f2
from ..runner import Suite, register

CONFIGS = {  # name -> (architecture, preset, w_bits, a_bits, other QuantConfig fields)
    "vit-w8a8-outlier": ("vit_tiny_patch16_224", "outlier-aware", 8, 8, {}),
    "vit-w4a8": ("vit_tiny_patch16_224", "fq-vit", 4, 8, {}),
    "vit-w4a8-outlier": ("vit_tiny_patch16_224", "outlier-aware", 4, 8, {}),
    "effnet-w8a8": ("tf_efficientnet_lite0", "fq-vit", 8, 8, {}),
    "effnet-w4a8": ("tf_efficientnet_lite0", "fq-vit", 4, 8, {}),
    # without weight bias correction nothing sits between the weights' DequantizeLinear and the Conv
    "effnet-w8a8-no-bias-correction": ("tf_efficientnet_lite0", "fq-vit", 8, 8, {"bias_correction": False}),
}


def profile(files, threads: int, runs: int = 3) -> dict:
    """Where onnxruntime spends the time: per op type, milliseconds per batch-1 run (onnxruntime's
    own profiler, ``runs`` runs after one warm-up), for each ONNX file; plus the cost of one
    QuantizeLinear+DequantizeLinear pair on a (32, 197, 192) tensor per tensor vs per channel on the
    last axis (the layout of the LayerNorm and channel-factor inputs)."""
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
    return out



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


def exports(run, names, folder: Path):
    """Per configuration: the start point and its ONNX files (each bias-correction form), with the FP32
    ONNX of its architecture first; yields ``(name, qmodel, {form: path}, data, fp32 path)``."""
    a, done = run.args, {}
    for name in names:
        arch, preset, w_bits, a_bits, extra = CONFIGS[name]
        d = run.data(arch)
        if arch not in done:
            done[arch] = export_float_onnx(copy.deepcopy(d.base), folder / f"{arch}_fp32.onnx", opset=a.opset,
                                           example=d.xe[:1])
        quant = QuantConfig.preset(preset, w_bits=w_bits, a_bits=a_bits, **extra)
        qmodel = prepare_model(copy.deepcopy(d.base), d.xc, quant, arch=arch)
        paths = {form: export_onnx(qmodel, folder / f"{name}_{form}.onnx", opset=a.opset, example=d.xe[:1],
                                   bias_correction=form)
                 for form in (("weights", "output") if quant.bias_correction else ("weights",))}
        yield name, qmodel, paths, d, done[arch]


def run(run):
    a = run.args
    out = run.doc
    out.update({"calib_images": a.calib, "eval_images": a.eval, "threads": a.threads, "opset": a.opset,
                "latency_runs": a.runs, "onnxruntime": __import__("onnxruntime").__version__,
                "torch": torch.__version__})
    out.setdefault("models", {})
    out.setdefault("configs", {})
    for name, qmodel, paths, d, fp_path in exports(run, a.configs, Path(tempfile.mkdtemp(prefix="evolq-export-"))):
        t0 = time.perf_counter()
        arch, preset, w_bits, a_bits, extra = CONFIGS[name]
        fp = {"bytes": fp_path.stat().st_size, "latency_b1": latency(fp_path, d.xe[:1].numpy(), a.runs, a.threads),
              "latency_b32": latency(fp_path, d.xe[:32].numpy(), a.runs, a.threads),
              "ops": optimized_ops(fp_path, a.threads)}
        out["models"][arch] = {"fp32_onnx": fp}
        with torch.no_grad():
            ref = torch.cat([qmodel.model(d.xe[i:i + 50]) for i in range(0, len(d.xe), 50)])
            with torch.backends.mkldnn.flags(enabled=False):
                alt = torch.cat([qmodel.model(d.xe[i:i + 50]) for i in range(0, len(d.xe), 50)])
        res = {"arch": arch, "preset": preset, "w_bits": w_bits, "a_bits": a_bits, "quant": dict(extra),
               "pytorch_floor": {"agreement": (alt.argmax(1) == ref.argmax(1)).float().mean().item() * 100,
                                 "max_abs_diff": (alt - ref).abs().max().item(),
                                 "mean_abs_diff": (alt - ref).abs().mean().item()}}
        for form, path in paths.items():
            r = {"bytes": path.stat().st_size, "size_vs_fp32": path.stat().st_size / fp["bytes"],
                 "check": check_onnx(qmodel, path, d.xe, d.ye, batch_size=50, threads=a.threads, reference=ref),
                 "latency_b1": latency(path, d.xe[:1].numpy(), a.runs, a.threads),
                 "latency_b32": latency(path, d.xe[:32].numpy(), a.runs, a.threads),
                 "ops": optimized_ops(path, a.threads)}
            r["speedup_b1"] = fp["latency_b1"]["median_ms"] / r["latency_b1"]["median_ms"]
            r["speedup_b32"] = fp["latency_b32"]["median_ms"] / r["latency_b32"]["median_ms"]
            res[f"bias_correction_{form}"] = r
            print(f"{name} [{form}]: agreement {r['check']['agreement']:.1f}%, {r['latency_b1']['median_ms']:.1f} / "
                  f"{r['latency_b32']['median_ms']:.1f} ms/img (b1/b32)", flush=True)
        res["seconds"] = time.perf_counter() - t0
        out["configs"][name] = res
        run.save()


def run_profile(run):
    a = run.args
    folder = Path(tempfile.mkdtemp(prefix="evolq-export-"))
    files = [p for *_, paths, _, fp in exports(run, a.configs, folder) for p in (fp, *paths.values())]
    run.save(profile(list(dict.fromkeys(files)), a.threads, a.runs))


def export_rows(d):
    rows = [{"model": arch, "config": "FP32", "form": "", "mb": f"{m['fp32_onnx']['bytes'] / 1e6:.2f}",
             "b1": m["fp32_onnx"]["latency_b1"]["median_ms"], "b32": m["fp32_onnx"]["latency_b32"]["median_ms"]}
            for arch, m in d["models"].items()]
    for c in d["configs"].values():
        for form in ("weights", "output"):
            r = c.get(f"bias_correction_{form}")
            if r:
                rows.append({"model": c["arch"], "form": form, "r": r, "floor": c["pytorch_floor"]["agreement"],
                             "config": f"W{c['w_bits']}A{c['a_bits']} {c['preset']}" + (
                                 " no bias corr." if c.get("quant", {}).get("bias_correction") is False else ""),
                             "mb": f"{r['bytes'] / 1e6:.2f} ({r['size_vs_fp32'] * 100:.0f}%)",
                             "b1": r["latency_b1"]["median_ms"], "b32": r["latency_b32"]["median_ms"]})
    return rows


def opt(head, fmt):
    """A column of an exported file's row (empty on the FP32 rows)."""
    return Col(head, lambda r: fmt(r["r"]) if "r" in r else "")


KERNELS = lambda ops, k: ", ".join(f"{n} x{v}" for n, v in ops[k].items()) or "none"
register(Suite(
    name="export", doc=__doc__, run=run, order=80, resume=True,
    what="ONNX QDQ export: size, onnxruntime latency, agreement with PyTorch, fused integer kernels",
    common={"calib": 128, "eval": 500, "threads": 1},
    args=[(("--configs",), {"nargs": "+", "default": list(CONFIGS), "choices": list(CONFIGS)}),
          (("--runs",), {"type": int, "default": 5, "help": "timed runs per latency figure (median reported)"}),
          (("--opset",), {"type": int, "default": 21})],
    results={"export": ["--configs vit-w8a8-outlier vit-w4a8",
                        "--configs effnet-w8a8 effnet-w4a8 effnet-w8a8-no-bias-correction"]},
    smoke={"configs": ["vit-w4a8"], "calib": 16, "eval": 8, "runs": 1},
    report=[Section("export", [
        "## ONNX QDQ export (`export.json`)",
        "`benchmarks/suites/export.py`: start points calibrated on {calib_images} calibration images, checked on "
        "{eval_images} evaluation images; onnxruntime {onnxruntime} CPU, {threads} thread(s), opset {opset}, latency = "
        "median of {latency_runs} runs per image on a shared machine. Agreement = top-1 agreement of onnxruntime with "
        "evolq's PyTorch model; floor = agreement of the PyTorch model with itself with oneDNN off (the same "
        "arithmetic summed in another order).",
        Table([Col("model", "model"), Col("config", "config"), Col("bias corr. form", "form"),
               Col("MB (vs FP32)", "mb"), opt("agreement %", lambda r: f2(r["check"]["agreement"])),
               Col("floor %", lambda r: f2(r["floor"]) if "floor" in r else ""),
               opt("logit diff max / mean", lambda r: f"{r['check']['max_abs_diff']:.3g} / "
                                                        f"{r['check']['mean_abs_diff']:.3g}"),
               opt("top-1 PyTorch / ORT", lambda r: f"{f2(r['check']['top1_torch'])} / "
                                                      f"{f2(r['check']['top1_onnx'])}"),
               Col("ms/img b1", "b1", "{:.1f}"), Col("ms/img b32", "b32", "{:.1f}"),
               opt("integer kernels", lambda r: KERNELS(r["ops"], "integer_kernels")),
               opt("float compute", lambda r: KERNELS(r["ops"], "float_compute"))], export_rows)]),
        Section("export_profile", [
            lambda p: f"Where the time goes (`export_profile.json`, `python -m benchmarks export_profile`: "
                      f"onnxruntime's profiler, batch 1, {p['threads']} thread(s), mean of {p['runs'] + 1} runs; same "
                      f"loaded machine). One QuantizeLinear+DequantizeLinear pair on a (32, 197, 192) tensor: "
                      f"{p['qdq_pair_ms']['per_tensor']:.1f} ms per tensor, {p['qdq_pair_ms']['per_axis_last']:.1f} ms "
                      f"per channel on the last axis.",
            Table([Col("file", "file"), Col("ms per image (b1)", "total_ms", "{:.1f}"),
                   Col("largest op types (ms)", "ms_per_op_type", lambda v: ", ".join(
                       f"{k} {x:.1f}" for k, x in list(v.items())[:5]))],
                  lambda d: [{**r, "file": f} for f, r in d["files"].items()])], order=81)]))
register(Suite(
    name="export_profile", what="where onnxruntime spends the time per op type in the exported files",
    doc="Where onnxruntime spends the time: per op type, milliseconds per batch-1 run (its own profiler) in each "
        "exported file of the configurations, plus one QuantizeLinear+DequantizeLinear pair per tensor vs per "
        "channel.",
    run=run_profile, order=81, common={"calib": 128, "eval": 1, "threads": 1},
    args=[(("--configs",), {"nargs": "+", "default": ["vit-w8a8-outlier", "vit-w4a8", "effnet-w8a8"],
                            "choices": list(CONFIGS)}),
          (("--runs",), {"type": int, "default": 3}), (("--opset",), {"type": int, "default": 21})],
    results={"export_profile": ""}, smoke={"configs": ["vit-w4a8"], "calib": 16, "runs": 1}))
