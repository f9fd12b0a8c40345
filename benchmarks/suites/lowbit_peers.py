"""Peer low-bit *weight-only* tools on the same model, images and protocol: what a user who wants a
model with 4-, 3- or 2-bit weights would run instead of evolq, each with the recipe its own docs
recommend, and what each ships (top-1, packed and on-disk size, latency in its own runtime).

* ``nncf/...``: the float timm model converted by ``openvino.convert_model`` (example input 1x3x224x224,
  dynamic shape), then ``nncf.compress_weights`` (INT4_SYM / INT4_ASYM with group size 32/64/128,
  ``ratio`` mixing INT4 with the INT8_ASYM backup picked by a sensitivity metric, AWQ / scale
  estimation / GPTQ, and the INT3_SYM / INT2_SYM modes the installed NNCF has); the data-aware ones
  get ``dataset=nncf.Dataset(calibration images, one per item)``, ``subset_size`` = all of them.
  Run in the OpenVINO CPU plugin (its compressed-weight FullyConnected kernels; dynamic int8
  activation quantization at the plugin's default group size).
* ``ort/...``: the float ONNX export (``evolq.export.export_float_onnx``, opset 17, dynamic batch),
  then onnxruntime's ``MatMulNBitsQuantizer`` (``default``: its own min/max quantizer, the docs'
  example; ``rtn``; ``hqq``; ``gptq`` on the calibration images), 4-bit, block 32/64/128,
  ``accuracy_level=4`` (int8 compute; set on HQQ's nodes afterwards: its config has no such field).
  Run in onnxruntime (CPU, all graph optimizations).
* ``fp32/openvino``, ``fp32/onnxruntime``: the float baselines in the same runtimes.

Every point: top-1 / top-5 / agreement / KL on the evaluation split (odd labels, against the
FP32 PyTorch logits), the packed size counted from the compressed model (``PACKED``), the file
size, and the latency at each batch size (default 32 and 1) with 2 threads, alternating with the
same runtime's FP32 model (``evolq.export.bench.time_alternating``: median, min, max and the
per-round speedup), the 1-minute load around it and ``contended`` when others used the CPU.
Calibration: the first ``--calib`` images of the calibration pool (even labels), as evolq's starts
use. A point that fails is recorded with a one-line ``error``; points already in the results file
are skipped, failed ones too (``--force`` re-runs them, ``--points`` selects by substring of the key). The peers are
not evolq dependencies: ``pip install -e '.[peers]'`` (openvino, nncf, onnxruntime, onnx); without
them the suite says so in one line and exits.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib.util
import logging
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ..report import Col, Section, Table
from ..runner import Suite, cpu_info, register
from .deploy_peers import ov_kernels, padded_logits, version

NNCF_DOC = ("https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/weight-compression/"
            "4-bit-weight-quantization.html; nncf docs/compression_algorithms/CompressWeights.md")
ORT_DOC = ("onnxruntime/quantization/matmul_nbits_quantizer.py (MatMulNBitsQuantizer; DefaultWeightOnlyQuantConfig"
           "(block_size, is_symmetric, accuracy_level=4) as in the onnxruntime docs' int4 example)")
PACKED = ("bytes of every weight-bearing constant of the compressed model as stored: low-bit integers at their "
          "width (u4/i4: half a byte, packed MatMulNBits blobs: their uint8 bytes), int8 weights at one byte, "
          "scales and zero points at their stored dtypes (NNCF: f16 scales, u4/u8 zero points; MatMulNBits: f32 "
          "scales, packed uint8 zero points, HQQ: f32 zero points), and every other float tensor (biases, norms, "
          "position embedding, class token, weights left float) at its dtype; integer shape/index constants "
          "(int32/int64) left out. evolq's SizeModel counts the same things (its float remainder at 4 bytes).")
CONTENDED = "contended: the 1-minute load before or after the timed rounds exceeded the core count + 0.5"
PEERS = ("openvino", "nncf", "onnxruntime", "onnx")


# -- the grid ---------------------------------------------------------------------------------
def _nncf(mode, group, ratio=None, metric=None, data=False, **opts):
    bits = {"int4_sym": 4, "int4_asym": 4, "int3_sym": 3, "int2_sym": 2}[mode]
    key = f"nncf/{mode}/g{group}" + (f"/r{ratio}" if ratio is not None else "") + (f"/{metric}" if metric else "")
    key += "".join(f"/{k}" for k, v in opts.items() if v)
    return {"key": key, "tool": "nncf", "runtime": "openvino", "mode": mode, "bits": bits, "group": group,
            "ratio": ratio if ratio is not None else 1.0, "sensitivity": metric, "options": opts,
            "data_aware": bool(data or metric not in (None, "weight_quantization_error") or any(opts.values()))}


def _ort(method, block, sym=None):
    sym = {"default": True, "rtn": False, "hqq": False, "gptq": False}[method] if sym is None else sym
    return {"key": f"ort/{method}{'-sym' if sym else '-asym'}/b{block}", "tool": "onnxruntime",
            "runtime": "onnxruntime", "method": method, "bits": 4, "group": block, "symmetric": sym,
            "data_aware": method == "gptq", "accuracy_level": 4}


def grid() -> list[dict]:
    """Every point, the most informative first (a run cut short keeps those). ``same_format_as``: a point
    whose weights have the format (bits, groups, mode, the same layers in INT8) of an earlier timed point,
    so that its latency is that point's (timed too with ``--time-all``)."""
    pts = [{"key": "fp32/openvino", "tool": "fp32", "runtime": "openvino", "bits": 32},
           {"key": "fp32/onnxruntime", "tool": "fp32", "runtime": "onnxruntime", "bits": 32}]
    pts += [_nncf(m, g) for g in (128, 64, 32) for m in ("int4_sym", "int4_asym")]
    pts += [_ort("default", b) for b in (128, 64, 32)]
    pts += [_ort("hqq", b) for b in (128, 64, 32)] + [_ort("rtn", b) for b in (64, 32)]
    same = "nncf/int4_asym/g64"
    pts += [_nncf("int4_asym", 64, awq=True), _nncf("int4_asym", 64, scale_estimation=True),
            _nncf("int4_asym", 64, gptq=True), _nncf("int4_asym", 64, awq=True, scale_estimation=True),
            {**_nncf("int4_sym", 64, scale_estimation=True), "same_format_as": "nncf/int4_sym/g64"}]
    for p in pts[-5:-1]:
        p["same_format_as"] = same
    pts += [_nncf("int4_asym", 64, r, "max_activation_variance") for r in (0.8, 0.6)]
    pts += [{**_nncf("int4_asym", 64, 0.8, m), "same_format_as": "nncf/int4_asym/g64/r0.8 (other layers in INT8)"}
            for m in ("weight_quantization_error", "hessian_input_activation", "mean_activation_magnitude")]
    pts += [_nncf("int3_sym", g) for g in (64, 32)]
    pts += [{**_nncf("int3_sym", 32, scale_estimation=True), "same_format_as": "nncf/int3_sym/g32"},
            _nncf("int2_sym", 32)]
    pts += [{**_ort("gptq", b), "same_format_as": f"ort/rtn-asym/b{b}"} for b in (64, 32)]
    # asymmetric RTN/GPTQ at block 64 fail in onnxruntime's packing of zero points (3 blocks per 192-wide row):
    # their symmetric forms, in the format of the default quantizer's
    pts += [{**_ort(m, 64, sym=True), "same_format_as": "ort/default-sym/b64"} for m in ("rtn", "gptq")]
    return pts


# -- sizes and counts -------------------------------------------------------------------------
def ov_packed(model) -> dict:
    """``PACKED`` of an OpenVINO model: total bytes and the bytes per element type."""
    by = collections.Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        et = op.get_element_type()
        name, bits = et.get_type_name(), et.bitwidth
        if name in ("i64", "i32", "u64", "u32", "boolean"):
            continue
        n = int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
        by[name] += -(-n * bits // 8)
    return {"bytes": int(sum(by.values())), "by_dtype": dict(sorted(by.items()))}


ONNX_BITS = {1: 32, 10: 16, 16: 16, 11: 64, 2: 8, 3: 8, 21: 4, 22: 4, 25: 2, 26: 2}  # TensorProto data types


def onnx_packed(model) -> dict:
    """``PACKED`` of an ONNX model (initializers and Constant nodes), by dtype and by MatMulNBits input."""
    import onnx

    by, role = collections.Counter(), collections.Counter()
    roles = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            for i, r in zip(n.input[1:4], ("nbits_weights", "nbits_scales", "nbits_zero_points")):
                roles[i] = r
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                                for a in n.attribute if a.name == "value"]
    for t in tensors:
        bits = ONNX_BITS.get(t.data_type)
        if bits is None:
            continue
        b = -(-int(np.prod(list(t.dims), dtype=np.int64)) * bits // 8)
        by[onnx.TensorProto.DataType.Name(t.data_type).lower()] += b
        role[roles.get(t.name, "other")] += b
    return {"bytes": int(sum(by.values())), "by_dtype": dict(sorted(by.items())), "by_role": dict(sorted(role.items()))}


def onnx_nodes(model) -> dict:
    """MatMul nodes of ``model``: how many became MatMulNBits, how many weight MatMul/Gemm stayed float."""
    inits = {t.name for t in model.graph.initializer}
    c = collections.Counter(n.op_type for n in model.graph.node)
    float_w = collections.Counter(n.op_type for n in model.graph.node
                                  if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in inits for i in n.input[1:2]))
    return {"MatMulNBits": c.get("MatMulNBits", 0), "float_weight_nodes": dict(float_w),
            "activation_MatMul": c.get("MatMul", 0) - float_w.get("MatMul", 0)}


def files_bytes(paths) -> dict:
    sizes = {Path(p).name: Path(p).stat().st_size for p in paths}
    return {"bytes": int(sum(sizes.values())), "files": list(sizes), "bytes_per_file": sizes}


# -- builders ---------------------------------------------------------------------------------
def _ov_fp32(ctx):
    if "ov_fp32" not in ctx:
        import openvino as ov

        t0 = time.perf_counter()
        model = ov.convert_model(copy.deepcopy(ctx["base"]).eval(), example_input=ctx["xc"][:1])
        model.reshape({model.input(0).get_any_name(): ov.PartialShape([-1, *ctx["xc"].shape[1:]])})  # dynamic batch
        ctx["ov_fp32"] = model
        ctx["ov_convert_s"] = time.perf_counter() - t0
    return ctx["ov_fp32"]


def _ov_save(model, path: Path) -> list[Path]:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)  # float parts stay f32, as counted
    return [path, path.with_suffix(".bin")]


def build_nncf(p, ctx) -> dict:
    import nncf

    kw = {"mode": nncf.CompressWeightsMode(p["mode"]), "group_size": p["group"]}
    if p["ratio"] != 1.0:
        kw["ratio"] = p["ratio"]
    if p["sensitivity"]:
        kw["sensitivity_metric"] = nncf.SensitivityMetric(p["sensitivity"])
    kw.update({k: v for k, v in p["options"].items() if v})
    if p["group"] == 128:  # ViT-Tiny's 192-wide inputs: NNCF's own advice, the largest power of two that divides
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        kw["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    if p["data_aware"]:
        xc = ctx["xc"]
        kw["dataset"] = nncf.Dataset([xc[i:i + 1].numpy() for i in range(len(xc))])
        kw["subset_size"] = len(xc)
    with _messages("nncf") as said:
        model = nncf.compress_weights(_ov_fp32(ctx).clone(), **kw)
    call = ", ".join(f"{k}={v.value if hasattr(v, 'value') else v}" for k, v in kw.items()
                     if k not in ("dataset", "advanced_parameters"))
    if "advanced_parameters" in kw:
        call += ", advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=ADJUST)"
    call += ", dataset=calibration images" if p["data_aware"] else ""
    return {"model": model, "files": _ov_save(model, ctx["tmp"] / f"{p['key'].replace('/', '_')}.xml"),
            "tool_messages": said, "recipe": f"nncf.compress_weights(ov_model, {call})"}


@contextlib.contextmanager
def _messages(logger: str):
    """The warnings of ``logger`` and its messages that say something was skipped or not done, as a list."""
    said = []

    class Keep(logging.Handler):
        def emit(self, rec):
            msg = rec.getMessage()
            if rec.levelno >= logging.WARNING or any(w in msg.lower() for w in ("skip", "not ", "fail")):
                said.append(msg.strip().splitlines()[0][:300])

    h = Keep(logging.INFO)
    log = logging.getLogger(logger)
    log.addHandler(h)
    try:
        yield said
    finally:
        log.removeHandler(h)


class _Reader:
    """An onnxruntime calibration reader over the calibration images, ``batch`` per item."""

    def __init__(self, xc, batch=16):
        self.xc, self.batch, self.i = xc.numpy(), batch, 0

    def get_next(self):
        if self.i >= len(self.xc):
            return None
        self.i += self.batch
        return {"input": self.xc[self.i - self.batch:self.i]}

    def __iter__(self):
        return iter(self.get_next, None)

    def rewind(self):
        self.i = 0


def build_ort(p, ctx) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger(mnb.__name__).setLevel(logging.WARNING)  # it logs every node it skips at INFO
    model = onnx.load(str(ctx["fp32_onnx"]))
    m, b, sym = p["method"], p["group"], p["symmetric"]
    if m == "default":
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=b, is_symmetric=sym, accuracy_level=4)
        recipe = f"DefaultWeightOnlyQuantConfig(block_size={b}, is_symmetric={sym}, accuracy_level=4)"
    elif m == "rtn":
        cfg = mnb.RTNWeightOnlyQuantConfig()
        recipe = "RTNWeightOnlyQuantConfig()"
    elif m == "hqq":
        cfg = mnb.HQQWeightOnlyQuantConfig(block_size=b, bits=4)
        recipe = f"HQQWeightOnlyQuantConfig(block_size={b}, bits=4)"
    else:
        n = ctx["args"].ort_gptq_calib or len(ctx["xc"])
        cfg = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(ctx["xc"][:n]))
        recipe = f"GPTQWeightOnlyQuantConfig(calibration_data_reader=the first {n} calibration images, 16 per item)"
    q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=b, is_symmetric=sym, accuracy_level=4, algo_config=cfg)
    q.process()
    out = q.model.model
    set_level = 0
    for n in out.graph.node:  # HQQ writes no accuracy_level: give every MatMulNBits the int8 compute asked for
        if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in n.attribute):
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
            set_level += 1
    path = ctx["tmp"] / f"{p['key'].replace('/', '_')}.onnx"
    onnx.save(out, str(path))
    recipe = (f"MatMulNBitsQuantizer(fp32.onnx, bits=4, block_size={b}, is_symmetric={sym}, accuracy_level=4, "
              f"algo_config={recipe}).process()" + (f"; accuracy_level=4 set on {set_level} MatMulNBits nodes"
                                                     if set_level else ""))
    return {"model": out, "files": [path], "recipe": recipe}


def build_fp32(p, ctx) -> dict:
    if p["runtime"] == "openvino":
        model = _ov_fp32(ctx)
        return {"model": model, "files": _ov_save(model, ctx["tmp"] / "fp32_openvino.xml"),
                "recipe": "ov.convert_model(timm model, example_input=1x3x224x224)"}
    import onnx

    return {"model": onnx.load(str(ctx["fp32_onnx"])), "files": [ctx["fp32_onnx"]],
            "recipe": "evolq.export.export_float_onnx(opset=17)"}


BUILDERS = {"nncf": build_nncf, "onnxruntime": build_ort, "fp32": build_fp32}


# -- measuring --------------------------------------------------------------------------------
def _make(runtime, path):
    from ..timing import onnxruntime_session, openvino_model

    return openvino_model(path) if runtime == "openvino" else onnxruntime_session(path)


def _batch(x, b):
    return (x[:b] if x.shape[0] >= b else x[:1].expand(b, *x.shape[1:])).contiguous().numpy()


def latency(fn_of, base_of, ctx) -> dict:
    """Per batch: the point alternating with its runtime's FP32 (``base_of(b)``; None for the FP32 itself)."""
    from evolq.export.bench import time_alternating

    a, out = ctx["args"], {}
    for b in a.batches:
        x = _batch(ctx["xe"], b)
        fn, base = fn_of(b), base_of(b)
        cands = {"point": lambda f=fn, v=x: f(v)}
        if base is not None:
            cands = {"fp32": lambda f=base, v=x: f(v), **cands}
        r = time_alternating(cands, next(iter(cands)), pairs=a.pairs, warmup=a.warmup)
        t = r["times"]["point"]
        rec = {"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "max_ms": t["max_s"] * 1e3,
               "rounds_ms": [v * 1e3 for v in t["rounds_s"]], "threads": ctx["threads"],
               "pairs": a.pairs, "warmup": a.warmup,
               "load_1m": [r["load_1m_before"], r["load_1m_after"]],
               "contended": max(r["load_1m_before"] or 0, r["load_1m_after"] or 0) > (ctx["cores"] or 1) + 0.5}
        if base is not None:
            rec["fp32_median_ms"] = r["times"]["fp32"]["median_s"] * 1e3
            rec["speedup_vs_fp32"] = r["speedup"]["point"]
        out[f"b{b}"] = rec
    return out


def measure(p, ctx) -> dict:
    from evolq.evaluate import metrics

    a, t = ctx["args"], ctx["threads"]
    t0 = time.perf_counter()
    built = BUILDERS[p["tool"]](p, ctx)
    quant_s = time.perf_counter() - t0
    model, files = built["model"], built["files"]
    r = {k: v for k, v in p.items() if k != "key"}
    r.update({"recipe": built["recipe"], "quant_seconds": round(quant_s, 1), "file": files_bytes(files)})
    if built.get("tool_messages"):
        r["tool_messages"] = list(dict.fromkeys(built["tool_messages"]))
    if p["runtime"] == "openvino":
        r["packed"] = ov_packed(model)
    else:
        r["packed"] = onnx_packed(model)
        r["nodes"] = onnx_nodes(model)
    r["packed_mb"], r["file_mb"] = r["packed"]["bytes"] / 1e6, r["file"]["bytes"] / 1e6
    make = _make(p["runtime"], files[0])
    fns = {a.eval_batch: make(t, a.eval_batch)}
    if p["runtime"] == "openvino":
        r["kernels"] = ov_kernels(fns[a.eval_batch].compiled)
        r["kernels"] = {k: r["kernels"][k] for k in ("integer", "float", "primitives")}
    logits = padded_logits(fns[a.eval_batch], ctx["xe"], a.eval_batch)
    r["metrics"] = {k: round(float(v), 4) for k, v in metrics(logits, ctx["ye"], ctx["ref"]).items()}
    fn_of = lambda b: fns.setdefault(b, make(t, b))
    if p.get("same_format_as") and not a.time_all:
        r["latency"] = {}
    elif p["tool"] == "fp32":
        ctx["fp32_fns"][p["runtime"]] = fn_of
        r["latency"] = latency(fn_of, lambda b: None, ctx)
    else:
        base = ctx["fp32_fns"].get(p["runtime"])
        if base is None:  # the FP32 of this runtime, compiled once per process
            mk, cache = _make(p["runtime"], build_fp32({"runtime": p["runtime"]}, ctx)["files"][0]), {}
            base = ctx["fp32_fns"][p["runtime"]] = lambda b: cache.setdefault(b, mk(t, b))
        r["latency"] = latency(fn_of, base, ctx)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def run(run):
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"lowbit_peers: skipped, {' and '.join(missing)} not installed (pip install -e '.[peers]')")
        return 0
    from evolq.export import export_float_onnx

    a = run.args
    d = run.data()
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="evolq-lowbit-peers-"))
    tmp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        ref = torch.cat([d.base(d.xe[i:i + 50]).float() for i in range(0, len(d.xe), 50)])
    fp32_onnx = export_float_onnx(copy.deepcopy(d.base).eval(), tmp / "fp32.onnx", opset=17, example=d.xc[:1])
    ctx = {"args": a, "base": d.base, "xc": d.xc, "xe": d.xe, "ye": d.ye, "ref": ref, "tmp": tmp,
           "threads": a.threads, "cores": cpu_info()["cores"], "fp32_onnx": fp32_onnx, "fp32_fns": {}}
    doc = run.doc
    doc.update({"model": a.model, "calib_images": len(d.xc), "eval_images": len(d.xe),
                "calibration": "the first --calib images of the calibration pool (even labels)",
                "evaluation": "the first --eval images of the evaluation split (odd labels)",
                "reference": "FP32 PyTorch eager logits of load_model(model) on the evaluation split",
                "packed_size": PACKED, "contended": CONTENDED, "cpu": cpu_info(), "machine": platform.machine(),
                "env": {k: version(k) for k in ("torch", "timm", "onnx", "onnxruntime", "openvino", "nncf",
                                                 "numpy")} | {"python": platform.python_version()},
                "docs": {"nncf": NNCF_DOC, "onnxruntime": ORT_DOC},
                "protocol": {"latency": "per batch size, the point and its runtime's FP32 model in alternating rounds "
                                        "(evolq.export.bench.time_alternating), threads as given; speedup_vs_fp32: "
                                        "median/min/max of the per-round ratio",
                             "openvino": "read from the saved .xml, static input shape per batch, inference_num_threads"
                                         "=threads, performance_mode=LATENCY, inference_precision=f32 (the plugin's "
                                         "dynamic int8 activation quantization of compressed weights left at its "
                                         "default)",
                             "onnxruntime": "CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=threads, "
                                            "inter_op_num_threads=1",
                             "evaluation": f"batches of {a.eval_batch}, the last one padded"}})
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        doc["openvino_cpu"] = {"dynamic_quantization_group_size": int(ov.Core().get_property(
            "CPU", ov.properties.hint.dynamic_quantization_group_size()))}
    points = doc.setdefault("points", {})
    for p in grid():
        if a.points and not any(s in p["key"] for s in a.points):
            continue
        if p["key"] in points and not a.force:
            print(f"{p['key']}: {'failed' if 'error' in points[p['key']] else 'done'} before, skipped (--force: again)")
            continue
        try:
            r = measure(p, ctx)
            lat = ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in r["latency"].items())
            print(f"{p['key']}: top-1 {r['metrics']['top1']:.1f}, packed {r['packed_mb']:.3f} MB, file "
                  f"{r['file_mb']:.3f} MB, {lat} ({r['seconds']:.0f} s)", flush=True)
        except Exception as e:  # a point that fails is recorded, the others still run
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            r = {k: v for k, v in p.items() if k != "key"} | {"error": f"{type(e).__name__}: {first}"}
        points[p["key"]] = r
        doc["ov_convert_seconds"] = ctx.get("ov_convert_s", doc.get("ov_convert_seconds"))
        run.save()
    run.save()


# -- the report -------------------------------------------------------------------------------
def _opts(r):
    if r.get("tool") == "nncf":
        parts = [f"ratio {r['ratio']:g}" + (f" ({r['sensitivity']})" if r.get("sensitivity") else "")]
        parts += [k for k, v in r.get("options", {}).items() if v]
        return ", ".join(parts)
    if r.get("tool") == "onnxruntime":
        n = r.get("nodes", {})
        return (f"{'sym' if r['symmetric'] else 'asym'}, accuracy_level 4"
                + (f", {n['MatMulNBits']} MatMulNBits" if n else ""))
    return ""


def _cell(lat, b, r) -> str:
    if b not in lat:
        return f"as `{r['same_format_as']}`" if r.get("same_format_as") and "metrics" in r else ""
    t, s = lat[b], lat[b].get("speedup_vs_fp32")
    return f"{t['median_ms']:.1f}" + (f" ({s['median']:.2f}x)" if s else "") + (" c" if t.get("contended") else "")


def rows(d) -> list[dict]:
    out = []
    for key, r in d.get("points", {}).items():
        lat = r.get("latency", {})
        out.append({"key": key, "options": _opts(r), "bits": r.get("bits"), "group": r.get("group") or "",
                    "packed": f"{r['packed_mb']:.3f}" if "packed_mb" in r else "",
                    "file": f"{r['file_mb']:.3f}" if "file_mb" in r else "",
                    "top1": f"{r['metrics']['top1']:.1f}" if "metrics" in r else r.get("error", ""),
                    "b32": _cell(lat, "b32", r), "b1": _cell(lat, "b1", r)})
    return out


register(Suite(
    name="lowbit_peers", doc=__doc__, run=run, order=14, resume=True, out="lowbit_peers_{short}",
    what="peer low-bit weight-only tools (NNCF compress_weights in OpenVINO, onnxruntime MatMulNBitsQuantizer) "
         "at their recommended recipes: top-1, packed and file size, latency in their runtimes",
    common={"model": "vit_tiny_patch16_224", "calib": 128, "eval": 500},
    args=[(("--points",), {"nargs": "+", "default": None,
                           "help": "run only the grid points whose key contains one of these substrings"}),
          (("--force",), {"action": "store_true", "help": "re-run points already in the results file"}),
          (("--batches",), {"nargs": "+", "type": int, "default": [32, 1], "help": "latency batch sizes"}),
          (("--threads",), {"type": int, "default": 2, "help": "runtime threads (latency and evaluation)"}),
          (("--pairs",), {"type": int, "default": 3, "help": "timed alternating rounds per latency figure"}),
          (("--warmup",), {"type": int, "default": 1}),
          (("--eval-batch",), {"type": int, "default": 32, "help": "batch size of the evaluation runs"}),
          (("--time-all",), {"action": "store_true", "help": "also time the points whose weight format an earlier "
                                                              "timed point has (same_format_as)"}),
          (("--ort-gptq-calib",), {"type": int, "default": 0,
                                   "help": "calibration images of onnxruntime's GPTQ (its Hessians run the whole "
                                           "model once per distinct MatMul input: 48 passes on ViT-Tiny; "
                                           "default 0: all of --calib)"}),
          (("--keep",), {"default": None, "help": "folder for the compressed models (default: a temporary one)"})],
    results={"lowbit_peers_vit_tiny": [
        "--model vit_tiny_patch16_224",
        "--model vit_tiny_patch16_224 --points /awq ort/rtn-sym ort/gptq-sym ort/gptq-asym/b32 --force"]},
    smoke={"points": ["fp32/openvino", "nncf/int4_sym/g128", "ort/default-sym/b128"], "calib": 8, "eval": 8,
           "batches": [1], "pairs": 1, "warmup": 1, "eval_batch": 8},
    report=[Section("lowbit_peers_*", blocks=[
        lambda d: f"## Low-bit weight-only peers ({d['model']})",
        lambda d: f"`{d['file']}.json`: each tool's recommended recipe on {d['calib_images']} calibration images, "
                  f"top-1 on {d['eval_images']} evaluation images (FP32 in OpenVINO "
                  f"{d['points'].get('fp32/openvino', {}).get('metrics', {}).get('top1', float('nan')):.1f}). "
                  f"Packed MB: {d['packed_size']} Latency: ms per batch, {d['protocol']['latency']}; "
                  f"'c' marks a contended timing ({d['contended']}).",
        Table([Col("point", "key", "`{}`"), Col("options", "options"), Col("bits", "bits"), Col("group", "group"),
               Col("packed MB", "packed"), Col("file MB", "file"), Col("top-1", "top1"),
               Col("batch 32 ms (vs FP32)", "b32"), Col("batch 1 ms (vs FP32)", "b1")], rows)])]))
