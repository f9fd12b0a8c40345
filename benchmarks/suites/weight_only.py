"""The weight-only regime (``QuantConfig.preset("weight-only")``) as shipped: every Linear's weights
unsigned with integer zero-points per group (or per output channel), its input dynamic int8 per row
and block, exported by ``evolq.export.export_onnx`` as onnxruntime ``MatMulNBits`` nodes
(``accuracy_level=4``), against the same float model's FP32 and its int8 QDQ export in onnxruntime.

Rows (``--rows`` selects by substring of the key): ViT-Tiny, the first ``--calib`` calibration-pool
images (even labels), ``edge_bits`` 8 (patch embedding and classifier at 8 bits), the rtn and gptq
starts at W4 g32, W4 g64, W4 per channel, W3 g32, W3 g64 and W8 per channel (W4 g128 cannot be built:
128 does not divide ViT-Tiny's 192-wide inputs, so it is listed under ``skipped``), and for reference
the outlier-aware regime's W4A8 per-channel gptq start, a static A8 QDQ model. Per row:

* top-1 / top-5 / agreement / KL of the PyTorch model on the first ``--eval`` evaluation images (odd
  labels) against the FP32 PyTorch logits (``evolq.evaluate``);
* the packed size (``evolq.problems.menu.model_bytes``) and the exported file's size, and their ratio;
* ``evolq.export.check.check_export`` on the same images: onnxruntime's top-1, its top-1 agreement
  with the PyTorch model (and the float floor), the MatMulNBits count against the model's Linears,
  the float matmuls left; ``session_memory``: resident memory of a fresh process after it creates the
  session;
* ``evolq.export.check.bench_export``: the file against the same model's FP32 and against the int8
  QDQ export of the same float model (``int8_twin``: ``QuantConfig.preset("deploy")`` W8A8 rtn on the
  calibration images; built once, its file reused by every row) in the same alternating rounds, batch
  32 and 1, ``--threads`` threads, ``--pairs`` rounds: fp32_ms, int8_ms (this file), int8_qdq_ms, the
  speedup vs FP32 and ``vs_int8_qdq`` (this file's time / the int8 QDQ file's, per round; above 1 is
  slower), with the load around it.

The microbenchmark (``micro``, run first): each ViT-Tiny Linear shape, M = 32 x 197 rows (one batch of
32), (K, N) in (192, 576) qkv, (192, 192) proj, (192, 768) fc1, (768, 192) fc2, as one-node onnxruntime
graphs on random data: the float MatMul, ``MatMulNBits`` (``accuracy_level=4``, bits 4 and 8, blocks 32,
64 and the largest power of two <= 256 dividing K) and an int8 QDQ MatMul (the input through
QuantizeLinear/DequantizeLinear u8 per tensor, the weights s8 per output channel through
DequantizeLinear, feeding the MatMul, which onnxruntime fuses into ``MatMulIntegerToFloat``: the form of
evolq's deploy export), timed alternating (``evolq.export.bench.time_alternating``), with the kernels of
onnxruntime's optimized graph named. It says what the model-level latency gap is made of.

Resumable: the results file is written after the microbenchmark and after every row; rows (and the
microbenchmark) already in it are skipped, failed ones too (``--force`` re-runs them). A row that fails
is recorded with a one-line ``error``.
"""
from __future__ import annotations

import copy
import platform
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ..report import Col, Section, Table
from ..runner import Suite, cpu_info, register

SHAPES = ((192, 576, "qkv"), (192, 192, "proj"), (192, 768, "fc1"), (768, 192, "fc2"))
CONTENDED = "contended: the 1-minute load before or after the timed rounds exceeded the core count + 0.5"
SKIPPED = {"wo/rtn/w4g128": "128 does not divide ViT-Tiny's 192-wide Linear inputs",
           "wo/gptq/w4g128": "128 does not divide ViT-Tiny's 192-wide Linear inputs"}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        return ""


# -- the rows ---------------------------------------------------------------------------------
def grid() -> list[dict]:
    """Every row: key, preset, bits, group, start."""
    rows = []
    for start in ("rtn", "gptq"):
        for bits, group in ((4, 32), (4, 64), (4, None), (3, 32), (3, 64), (8, None)):
            g = f"g{group}" if group else "pc"
            rows.append({"key": f"wo/{start}/w{bits}{g}", "preset": "weight-only", "w_bits": bits, "a_bits": 8,
                         "w_group": group, "start": start})
    rows.append({"key": "oa/gptq/w4a8pc", "preset": "outlier-aware", "w_bits": 4, "a_bits": 8, "w_group": None,
                 "start": "gptq", "note": "static A8 QDQ model of the same bits (reference)"})
    return rows


def quant_config(r: dict, edge_bits):
    from evolq import QuantConfig

    kw = {"w_bits": r["w_bits"], "a_bits": r["a_bits"], "start": r["start"], "edge_bits": edge_bits}
    if r["preset"] == "weight-only":
        kw["w_group"] = r["w_group"]
    return QuantConfig.preset(r["preset"], **kw)


def measure(r: dict, ctx) -> dict:
    from evolq import prepare_model
    from evolq.evaluate import metrics, predict
    from evolq.export import export_onnx
    from evolq.export.check import bench_export, check_export, int8_twin, session_memory
    from evolq.problems.menu import model_bytes

    a = ctx["args"]
    t0 = time.perf_counter()
    torch.manual_seed(ctx["seed"])
    q = prepare_model(copy.deepcopy(ctx["base"]), ctx["xc"], quant_config(r, a.edge_bits), arch=a.model)
    prep_s = time.perf_counter() - t0
    out = {k: v for k, v in r.items() if k != "key"} | {"edge_bits": a.edge_bits, "seed": ctx["seed"],
                                                          "start_seconds": round(prep_s, 1)}
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        m = metrics(predict(q.model, ctx["xe"], 50), ctx["ye"], ctx["ref"])
    out["torch"] = {k: round(float(m[k]), 4) for k in ("top1", "top5", "agreement", "kl")}
    out["packed_mb"] = model_bytes(q.model, q.config) / 1e6
    path = ctx["tmp"] / f"{r['key'].replace('/', '_')}.onnx"
    export_onnx(q, path, example=ctx["xc"][:1])
    out["file_mb"] = path.stat().st_size / 1e6
    out["file_over_packed"] = out["file_mb"] / out["packed_mb"]
    if "twin" not in ctx:  # the int8 QDQ export of the same float model, once for all rows
        t = time.perf_counter()
        ctx["twin"] = int8_twin(q, ctx["xc"], ctx["tmp"] / "int8_qdq.onnx")
        ctx["twin_seconds"] = time.perf_counter() - t
    print(f"{r['key']}: start {prep_s:.0f} s, top-1 {m['top1']:.1f}, packed {out['packed_mb']:.3f} MB, "
          f"file {out['file_mb']:.3f} MB", flush=True)
    c = check_export(q, path, "onnx", "onnxruntime", ctx["xe"], ctx["ye"], threads=a.threads)
    out["check"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}
    out["linears"] = ctx["linears"]
    out["memory"] = session_memory(path, "onnx", "onnxruntime", a.threads)
    b = bench_export(q, path, "onnx", "onnxruntime", ctx["xe"][0], batches=tuple(a.batches), threads=(a.threads,),
                     pairs=a.pairs, warmup=a.warmup, compare={"int8_qdq": ctx["twin"]})
    cores = cpu_info()["cores"] or 1
    for run in b["runs"]:
        run["contended"] = max(run["load_1m"][0] or 0, run["load_1m"][1] or 0) > cores + 0.5
    out["bench"] = b["runs"]
    out["uptime"] = uptime()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# -- the microbenchmark -----------------------------------------------------------------------
def _model(nodes, inits, k, m, ms=False):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    ops = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(g, opset_imports=ops).SerializeToString()


def _blocks(k: int) -> list[int]:
    """32, 64 and the largest power of two <= 256 that divides ``k`` (those that divide it)."""
    big = max(b for b in (16, 32, 64, 128, 256) if k % b == 0)
    return sorted(b for b in {32, 64, big} if k % b == 0)


def micro_graphs(k: int, n: int, m: int, rng) -> dict:
    """name -> ONNX model bytes: fp32 MatMul, MatMulNBits b{bits}/{block}, int8 QDQ MatMul."""
    from onnx import helper, numpy_helper

    from evolq.export.onnx.graph import Initializers
    from evolq.export.onnx.nbits import NBitsSpec, nbits_nodes

    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    out = {"fp32": _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")], k, m)}
    for bits in (4, 8):
        for block in _blocks(k):
            nb = k // block
            hi = 2**bits - 1
            spec = NBitsSpec("l", rng.integers(0, hi + 1, (n, k)), (rng.random((n, nb)) * 0.01 + 1e-3).astype(
                np.float32), rng.integers(0, hi + 1, (n, nb)), bits, block, None)
            inits = Initializers()
            nodes = nbits_nodes(spec, "y", ["x"], inits)
            out[f"nbits{bits}/b{block}"] = _model(nodes, inits.tensors, k, m, ms=True)
    ws = np.abs(w).max(0) / 127
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.03, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8),
                                                                                               "xz"),
             numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(ws.astype(np.float32), "Ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "Wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=1),
             helper.make_node("MatMul", ["xd", "Wd"], ["y"])]
    out["int8_qdq"] = _model(nodes, inits, k, m)
    return out


def optimized_ops(model_bytes_: bytes, threads: int) -> dict:
    import collections

    import onnx

    from evolq.export.onnx import onnx_session

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "opt.onnx"
        onnx_session(model_bytes_, threads, optimized_path=opt)
        return dict(collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node))


def micro(a) -> dict:
    from evolq.export.bench import time_alternating
    from evolq.export.onnx import onnx_session

    rng = np.random.default_rng(0)
    m = a.micro_rows
    cores = cpu_info()["cores"] or 1
    shapes = []
    for k, n, layer in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        graphs = micro_graphs(k, n, m, rng)
        sess = {name: onnx_session(g, a.threads) for name, g in graphs.items()}
        cands = {name: (lambda s=s, x=x: s.run(None, {"x": x})) for name, s in sess.items()}
        r = time_alternating(cands, "fp32", pairs=a.micro_pairs, warmup=a.micro_warmup, repeat=a.micro_repeat)
        row = {"layer": layer, "M": m, "K": k, "N": n, "threads": a.threads,
               "gmacs": m * k * n / 1e9, "load_1m": [r["load_1m_before"], r["load_1m_after"]],
               "contended": max(r["load_1m_before"] or 0, r["load_1m_after"] or 0) > cores + 0.5, "ops": {}}
        for name in graphs:
            t = r["times"][name]
            row["ops"][name] = {"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3,
                                "max_ms": t["max_s"] * 1e3,
                                "kernels": optimized_ops(graphs[name], a.threads)}
            if name != "fp32":
                row["ops"][name]["speedup_vs_fp32"] = r["speedup"][name]
                qdq = r["times"]["int8_qdq"]["rounds_s"]
                ratios = [u / v for u, v in zip(t["rounds_s"], qdq)]
                row["ops"][name]["vs_int8_qdq"] = float(np.median(ratios))
        shapes.append(row)
        print(f"micro {layer} ({k}x{n}): " + ", ".join(f"{nm} {v['median_ms']:.2f}" for nm, v in row["ops"].items())
              + " ms", flush=True)
    return {"M": m, "threads": a.threads, "pairs": a.micro_pairs, "warmup": a.micro_warmup, "repeat": a.micro_repeat,
            "protocol": "one-node onnxruntime graphs on random data (CPUExecutionProvider, ORT_ENABLE_ALL), all of "
                        "a shape's candidates in alternating rounds (time_alternating, each round the mean of "
                        "`repeat` calls); vs_int8_qdq: median per-round ratio of the candidate's time to the int8 "
                        "QDQ MatMul's (above 1 is slower); kernels: op types of onnxruntime's optimized graph",
            "shapes": shapes, "uptime": uptime(), "cpu": cpu_info()}


# -- the suite --------------------------------------------------------------------------------
def run(run):
    import onnxruntime

    from evolq.evaluate import metrics

    a = run.args
    doc = run.doc
    doc.update({"model": a.model, "calib_images": a.calib, "eval_images": a.eval, "edge_bits": a.edge_bits,
                "seeds": a.seeds, "threads": a.threads, "cpu": cpu_info(), "machine": platform.machine(),
                "env": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "python": platform.python_version()},
                "calibration": "the first --calib images of the calibration pool (even labels)",
                "evaluation": "the first --eval images of the evaluation split (odd labels)",
                "reference": "FP32 PyTorch logits of load_model(model) on the evaluation split",
                "contended": CONTENDED, "skipped": SKIPPED,
                "int8_qdq": "evolq.export.check.int8_twin: the same float model, QuantConfig.preset('deploy') "
                            "W8A8 rtn calibrated on the calibration images, exported as int8 QDQ; one file for "
                            "every row"})
    doc.setdefault("uptime", []).append({"at": "start", "uptime": uptime()})
    if "micro" in a.parts and ("micro" not in doc or a.force):
        try:
            doc["micro"] = micro(a)
        except Exception as e:  # recorded, the rows still run
            traceback.print_exc()
            doc["micro"] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
        run.save()
    if "rows" not in a.parts:
        doc["uptime"].append({"at": "end", "uptime": uptime()})
        run.save()
        return 0
    d = run.data()
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        ref = torch.cat([d.base(d.xe[i:i + 50]).float() for i in range(0, len(d.xe), 50)])
    doc["fp32"] = {k: round(float(v), 4) for k, v in metrics(ref, d.ye).items() if k in ("top1", "top5")}
    keep = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="evolq-weight-only-"))
    keep.mkdir(parents=True, exist_ok=True)
    ctx = {"args": a, "base": d.base, "xc": d.xc, "xe": d.xe, "ye": d.ye, "ref": ref, "tmp": keep,
           "seed": a.seeds[0], "linears": sum(isinstance(m, torch.nn.Linear) for m in d.base.modules())}
    rows = doc.setdefault("rows", {})
    for r in grid():
        if a.rows and not any(s in r["key"] for s in a.rows):
            continue
        if r["key"] in rows and not a.force:
            print(f"{r['key']}: {'failed' if 'error' in rows[r['key']] else 'done'} before, skipped (--force: again)")
            continue
        try:
            out = measure(r, ctx)
            b = {x["batch"]: x for x in out["bench"]}
            print(f"{r['key']}: ort top-1 {out['check']['top1_runtime']:.1f} (agreement {out['check']['agreement']:.1f}"
                  f"), MatMulNBits {out['check']['matmulnbits']}/{out['linears']}, " + ", ".join(
                      f"b{k} {v['int8_ms']:.1f} ms (fp32 {v['fp32_ms']:.1f}, int8 QDQ {v['int8_qdq_ms']:.1f})"
                      for k, v in b.items()) + f" ({out['seconds']:.0f} s)", flush=True)
        except Exception as e:  # a row that fails is recorded, the others still run
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            out = {k: v for k, v in r.items() if k != "key"} | {"error": f"{type(e).__name__}: {first}"}
        rows[r["key"]] = out
        if "twin_seconds" in ctx:
            doc["int8_qdq_build_seconds"] = round(ctx["twin_seconds"], 1)
        run.save()
    doc["uptime"].append({"at": "end", "uptime": uptime()})
    run.save()
    return 0


# -- the report -------------------------------------------------------------------------------
def _bench(r, batch):
    return next((b for b in r.get("bench", []) if b["batch"] == batch), None)


def _ms(r, batch, key):
    b = _bench(r, batch)
    return f"{b[key]:.1f}" if b else ""


def _ratio(r, batch, key):
    b = _bench(r, batch)
    if not b:
        return ""
    v = b[key]["median"]
    return f"{v:.2f}" + (" c" if b.get("contended") else "")


def row_cells(d) -> list[dict]:
    out = []
    for key, r in d.get("rows", {}).items():
        if "error" in r:
            out.append({"key": key, "what": r["error"]})
            continue
        c = r["check"]
        g = f"g{r['w_group']}" if r.get("w_group") else "per channel"
        what = (f"W{r['w_bits']} {g}" if r["preset"] == "weight-only" else f"W{r['w_bits']}A8 {g}, {r['preset']}")
        mem = r.get("memory") or {}
        out.append({"key": key, "what": what, "start": r["start"], "top1": f"{r['torch']['top1']:.1f}",
                    "top5": f"{r['torch']['top5']:.1f}", "packed": f"{r['packed_mb']:.3f}",
                    "file": f"{r['file_mb']:.3f}", "ratio": f"{r['file_over_packed']:.2f}",
                    "ort": f"{c['top1_runtime']:.1f} ({c['agreement']:.1f})",
                    "nbits": f"{c['matmulnbits']}/{r['linears']}",
                    "mem": f"{mem['after_mb']:.0f} (+{mem['session_mb']:.0f})" if mem else "",
                    "kernels": ", ".join(f"{k} {v}" for k, v in c["integer_kernels"].items())
                               + (f"; {c['layers_in_float']} in float" if c["layers_in_float"] else ""),
                    **{f"{k}{b}": _ms(r, b, f"{k}_ms") for b in (32, 1) for k in ("fp32", "int8", "int8_qdq")},
                    **{f"s{b}": _ratio(r, b, "speedup") for b in (32, 1)},
                    **{f"v{b}": _ratio(r, b, "vs_int8_qdq") for b in (32, 1)}})
    return out


def micro_cells(d) -> list[dict]:
    mi = d.get("micro") or {}
    out = []
    for s in mi.get("shapes", []):
        ops = s["ops"]
        row = {"shape": f"{s['layer']} {s['K']}x{s['N']}", "fp32": f"{ops['fp32']['median_ms']:.2f}",
               "qdq": f"{ops['int8_qdq']['median_ms']:.2f}" + (" c" if s.get("contended") else "")}
        nb = [(k, v) for k, v in ops.items() if k.startswith("nbits")]
        row["nbits"] = ", ".join(f"{k.replace('nbits', '').replace('/b', ' bits b')}: {v['median_ms']:.2f} "
                                 f"({v['vs_int8_qdq']:.2f}x)" for k, v in nb)
        row["fused"] = "+".join(k for k in ops["int8_qdq"]["kernels"] if k not in ("QuantizeLinear",
                                                                                   "DequantizeLinear"))
        out.append(row)
    return out


def _load_line(d):
    """The ``uptime`` load averages recorded at each invocation's start and end."""
    parts, n = [], 0
    for u in d.get("uptime", []):
        n += u["at"] == "start"
        if u.get("uptime"):
            parts.append(f"invocation {n} {u['at']}: {u['uptime'].split('load average:')[-1].strip()}")
    return "Load (`uptime`, 1/5/15-minute averages): " + "; ".join(parts) + "." if parts else None


register(Suite(
    name="weight_only", doc=__doc__, run=run, order=15, resume=True, out="weight_only_{short}",
    what="the weight-only regime shipped as MatMulNBits: top-1 in PyTorch and onnxruntime, packed and file size, "
         "memory, latency vs FP32 and vs the int8 QDQ export; a per-shape MatMulNBits microbenchmark",
    common={"model": "vit_tiny_patch16_224", "calib": 128, "eval": 500, "seeds": [0]},
    args=[(("--parts",), {"nargs": "+", "default": ["micro", "rows"], "choices": ("micro", "rows"),
                          "help": "what to run (default both, the microbenchmark first)"}),
          (("--rows",), {"nargs": "+", "default": None, "help": "run only the rows whose key contains one of these"}),
          (("--force",), {"action": "store_true", "help": "re-run what the results file holds"}),
          (("--edge-bits",), {"type": int, "default": 8}),
          (("--batches",), {"nargs": "+", "type": int, "default": [32, 1], "help": "latency batch sizes"}),
          (("--threads",), {"type": int, "default": 2, "help": "runtime and torch threads"}),
          (("--pairs",), {"type": int, "default": 5, "help": "bench_export's alternating rounds"}),
          (("--warmup",), {"type": int, "default": 3}),
          (("--micro-rows",), {"type": int, "default": 32 * 197, "help": "M of the microbenchmark (32 x 197)"}),
          (("--micro-pairs",), {"type": int, "default": 21}),
          (("--micro-warmup",), {"type": int, "default": 3}),
          (("--micro-repeat",), {"type": int, "default": 3}),
          (("--keep",), {"default": None, "help": "folder for the exported files (default: a temporary one)"})],
    results={"weight_only_vit_tiny": ["--model vit_tiny_patch16_224",
                                      "--model vit_tiny_patch16_224 --parts micro --force"]},
    smoke={"rows": ["wo/rtn/w4g32"], "calib": 8, "eval": 8, "batches": [1], "pairs": 1, "warmup": 1,
           "micro_rows": 64, "micro_pairs": 1, "micro_warmup": 1, "micro_repeat": 1},
    report=[Section("weight_only_*", blocks=[
        lambda d: f"## The weight-only regime in onnxruntime ({d['model']})",
        lambda d: f"`{d['file']}.json` (`python -m benchmarks weight_only`): {d['calib_images']} calibration images, "
                  f"{d['eval_images']} evaluation images (FP32 top-1 "
                  f"{d.get('fp32', {}).get('top1', float('nan')):.1f}), edge bits {d['edge_bits']}, "
                  f"seed {d['seeds'][0]}. Weight-only rows are exported as MatMulNBits "
                  f"(accuracy_level 4; a per-channel weight in blocks of 64 on 192-wide inputs, 256 on fc2's 768); "
                  f"the outlier-aware row is a static A8 QDQ model. Packed MB: "
                  f"`model_bytes`; file/packed: the ONNX file over it. onnxruntime: its top-1 (agreement with "
                  f"PyTorch %). Integer kernels: onnxruntime's optimized graph (the patch embedding's convolution "
                  f"keeps float inputs in the weight-only regime). Memory: resident MB of a fresh process (torch and "
                  f"evolq imported) after creating the session (the session's own). Latency: ms per "
                  f"batch, {d['threads']} threads, the file, the same model's FP32 and the int8 QDQ export of the "
                  f"same float model in the same alternating rounds (`bench_export`); vs QDQ: this file's time over "
                  f"the int8 QDQ file's (above 1 is slower); 'c' marks a contended timing ({d['contended']}). "
                  f"Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in d.get("skipped", {}).items()) + ".",
        Table([Col("row", "key", "`{}`"), Col("weights", "what"), Col("start", "start"), Col("top-1", "top1"),
               Col("top-5", "top5"), Col("packed MB", "packed"), Col("file MB", "file"),
               Col("file/packed", "ratio"), Col("onnxruntime top-1 (agr.)", "ort"),
               Col("MatMulNBits/Linears", "nbits"), Col("integer kernels", "kernels"),
               Col("memory MB (session)", "mem"),
               Col("b32 FP32 / file / QDQ ms", lambda r: "/".join(str(r.get(k, "")) for k in
                                                                  ("fp3232", "int832", "int8_qdq32"))),
               Col("b32 vs FP32", "s32"), Col("b32 vs QDQ", "v32"),
               Col("b1 FP32 / file / QDQ ms", lambda r: "/".join(str(r.get(k, "")) for k in
                                                                 ("fp321", "int81", "int8_qdq1"))),
               Col("b1 vs FP32", "s1"), Col("b1 vs QDQ", "v1")], row_cells),
        lambda d: (f"Per shape (M = {d['micro']['M']} rows, {d['micro']['threads']} threads, ms per call, median of "
                   f"{d['micro']['pairs']} alternating rounds of {d['micro']['repeat']} calls; MatMulNBits: bits, "
                   f"block: ms (its time over the int8 QDQ MatMul's)); the int8 QDQ MatMul runs as the fused kernel "
                   f"named.") if d.get("micro", {}).get("shapes") else None,
        Table([Col("shape (K x N)", "shape"), Col("FP32 MatMul", "fp32"), Col("int8 QDQ MatMul", "qdq"),
               Col("fused as", "fused"), Col("MatMulNBits", "nbits")], micro_cells),
        _load_line])]))
