"""The deploy regime end to end: accuracy in PyTorch and in the runtime, the kernels the runtime
runs, and its speed. Per configuration (``--configs``): the start point calibrated with
``QuantConfig.preset("deploy")`` on the calibration pool (10% hold-out split off first, seed 0);
top-1, agreement and KL to FP32 on the evaluation split; file sizes; then (unless ``--no-export``)
the model exported (pt2, and ONNX with ``--onnx`` / ``--openvino``) and checked in its runtime
(``check_export``: runtime top-1, agreement with PyTorch, float floor, integer and float kernels),
and every exported form timed with the FP32 compiles of the same model in one alternation
(``benchmarks/timing.py``: speedup against the fastest FP32 compile). Configurations are merged
by name into the results file."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from evolq import QuantConfig, prepare_model
from evolq.data import split_calibration
from evolq.evaluate import metrics, predict
from evolq.export import export_float_onnx, export_onnx, export_pt2
from evolq.export.check import check_export
from evolq.export.pt2 import float_module
from evolq.export.runtimes import get_runtime

from ..common import gap
from ..report import Col, Section, Table, f2
from ..runner import Suite, cpu_info, register
from ..timing import HARNESS, fp32_compiles, time_common_baseline

VIT, EFF = "vit_tiny_patch16_224", "tf_efficientnet_lite0"
FIRST_OFQ = {"augment": "flip", "block_weight": 0.0, "epochs": 6}
SYM, ASYM = {"edge_bits": 8, "deploy_weights": "symmetric"}, {"edge_bits": 8, "deploy_weights": "asymmetric"}
CONFIGS = {  # name -> (architecture, w_bits, a_bits, start, other QuantConfig fields)
    "vit-w8a8": (VIT, 8, 8, "rtn", {}),
    "vit-w4a8-gptq": (VIT, 4, 8, "gptq", SYM),
    "vit-w4a8-gptq-asym": (VIT, 4, 8, "gptq", ASYM),
    # ofq / ofq-asym: the first ofq recipe; ofq-mixblock-asym: the second, today's defaults in the deploy regime
    "vit-w4a8-ofq": (VIT, 4, 8, "ofq", {**SYM, "start_options": FIRST_OFQ}),
    "vit-w4a8-ofq-asym": (VIT, 4, 8, "ofq", {**ASYM, "start_options": FIRST_OFQ}),
    "vit-w4a8-ofq-mixblock-asym": (VIT, 4, 8, "ofq", {**ASYM, "start_options": {"augment": "mix", "block_weight": 1.0,
                                                                                "epochs": 12}}),
    "vit-w4a4": (VIT, 4, 4, "rtn", SYM),
    "vit-w4a4-gptq": (VIT, 4, 4, "gptq", SYM),
    "vit-w4a4-asym": (VIT, 4, 4, "rtn", ASYM),
    "vit-w4a4-gptq-asym": (VIT, 4, 4, "gptq", ASYM),
    "effnet-w8a8": (EFF, 8, 8, "rtn", {}),
}


def sizes(q) -> dict:
    with tempfile.TemporaryDirectory() as d:  # FP32 ONNX, the ONNX export (4-bit weights packed), pt2
        s = {"fp32_onnx": export_float_onnx(float_module(q), Path(d) / "fp32.onnx").stat().st_size,
             "onnx": export_onnx(q, Path(d) / "q.onnx").stat().st_size,
             "pt2": export_pt2(q, Path(d) / "q.pt2").stat().st_size}
    return {**s, "onnx_vs_fp32": s["onnx"] / s["fp32_onnx"]}


def exported(run, name, q, base, xe, ye) -> dict:
    """Each form checked in its runtime, then all timed with the FP32 compiles in one alternation."""
    a, out, int8 = run.args, {}, {}
    forms = [] if a.only_openvino else [("pt2", "inductor", export_pt2, "pt2")]
    forms += [("onnx", "onnxruntime", export_onnx, "onnx")] if a.onnx and not a.only_openvino else []
    forms += [("onnx", "openvino", export_onnx, "openvino")] if a.openvino or a.only_openvino else []
    folder = Path(tempfile.mkdtemp(prefix="evolq-deploy-"))
    for fmt, runtime, writer, key in forms:
        path = writer(q, folder / f"{name}.{fmt}")
        rt = get_runtime(runtime, fmt)
        out[key] = {"bytes": path.stat().st_size,
                    "check": check_export(q, path, fmt, runtime, xe, ye, threads=max(a.threads))}
        int8[key] = lambda t, b, rt=rt, path=path: rt.load(path, t)
        c = out[key]["check"]
        print(f"  {fmt}/{runtime}: top-1 {c['top1_runtime']:.1f} (torch {c['top1_torch']:.1f}), agreement "
              f"{c['agreement']:.1f}% (floor {c['floor']:.1f}%), integer {c['integer_kernels']}", flush=True)
    timing = time_common_baseline(int8, fp32_compiles(base, xe, folder, openvino=bool(a.openvino or
                                                                                       a.only_openvino)),
                                  xe, tuple(a.threads), tuple(a.batches), a.pairs, warmup=3)
    for (fmt, runtime, _, key) in forms:
        runs = [{"batch": r["batch"], "threads": r["threads"], "baseline": r["baseline"], "harness": HARNESS,
                 "fp32_ms": r["times_ms"][r["baseline"]], "int8_ms": r["times_ms"][key], "speedup": r["speedup"][key],
                 "rounds_s": r["rounds_s"], "load_1m": r["load_1m"]} for r in timing.values()]
        out[key]["bench"] = {"runtime": runtime, "format": fmt, "harness": HARNESS, "pairs": a.pairs,
                             "cpu": cpu_info(), "runs": runs, "speedup": runs[0]["speedup"]["median"]}
    return out


def run(run):
    a = run.args
    res = run.doc.setdefault("configs", {})
    for name in a.configs:
        arch, w, act, start, extra = CONFIGS[name]
        d = run.data(arch)
        with torch.no_grad():
            fp = predict(d.base, d.xe)
        fit, hold = split_calibration(d.xc, 0.1, 0)
        if start == "ofq":
            extra = {**extra, "start_options": {**extra.get("start_options", {}), "progress": False}}
        quant = QuantConfig.preset("deploy", w_bits=w, a_bits=act, start=start, **extra)
        t0 = time.perf_counter()
        q = prepare_model(copy.deepcopy(d.base), fit, quant, arch=arch, holdout=hold)  # ofq: hold-out KL
        secs = time.perf_counter() - t0
        with torch.no_grad():
            m = metrics(predict(q.model, d.xe), d.ye, fp)
        row = {"arch": arch, "w_bits": w, "a_bits": act, "start": start,
               "quant": {"smooth_strength": quant.smoothing, **extra}, "calib_images": int(fit.shape[0]),
               "eval_images": int(d.xe.shape[0]), "fp32_top1": metrics(fp, d.ye)["top1"],
               "torch": {"top1": m["top1"], "agreement": m["agreement"], "kl": m["kl"]}, "start_seconds": secs,
               "cpu": cpu_info(), "torch_version": torch.__version__}
        if start == "ofq":
            row["start_report"] = {k: q.start_report.get(k) for k in ("holdout_kl", "fitness_kl", "epochs_run",
                                                                       "status", "fallbacks", "warnings")}
        print(f"{name}: PyTorch top-1 {m['top1']:.1f} (FP32 {row['fp32_top1']:.1f}), KL {m['kl']:.4f}", flush=True)
        if a.gap:
            row["gap"] = gap(q, d.xe, d.ye, fp)
        row["bytes"] = sizes(q)
        if not a.no_export:
            row.update(exported(run, name, q, d.base, d.xe, d.ye))
        res[name] = {**res.get(name, {}), **row}  # runtimes not run this time are kept
        run.save()


# -- report: the deployed-int8 section (evolq's rows here, the peers' from deploy_peers_*.json) -----------
OLD = "own runtime's FP32 (old harness)"
SPEED_OLD = "this code; speedups by the old harness (own runtime's FP32)"


def speed(runs, batch, threads) -> str:
    for r in runs:
        if r["batch"] == batch and r["threads"] == threads:
            s = r["speedup"]
            return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"
    return ""


def against(runs) -> str:
    """What a row's speedups are relative to: the common baseline, or (files written before it) the
    tool's own runtime's FP32."""
    new = next((r for r in runs if r.get("harness")), None)
    return f"fastest FP32 ({new['baseline']})" if new else OLD


def evolq_rows(doc):
    rows = []
    for name, r in ((doc or {}).get("configs") or {}).items():
        t, forms = r["torch"], [k for k in ("pt2", "onnx", "openvino") if r.get(k)]
        for key in forms:  # pt2/inductor, onnx/onnxruntime, onnx/openvino
            ck, runs = r[key]["check"], r[key]["bench"]["runs"]
            rows.append({"model": r["arch"], "tool": f"evolq {name} ({ck.get('format', key)}, {ck['runtime']})",
                         "rt_top1": f2(ck["top1_runtime"]), "pt_top1": f2(t["top1"]), "agree": f2(t["agreement"]),
                         "vs": f"{ck['agreement']:.1f} (floor {ck['floor']:.1f})", "kl": f"{t['kl']:.4f}",
                         "b32": speed(runs, 32, 2), "b1": speed(runs, 1, 2), "against": against(runs),
                         "kernels": f"{sum(ck['integer_kernels'].values())} / {sum(ck['float_kernels'].values())}",
                         "secs": f"{r['start_seconds']:.0f}"})
        if not forms:
            rows.append({"model": r["arch"], "tool": f"evolq {name} (PyTorch only)", "pt_top1": f2(t["top1"]),
                         "agree": f2(t["agreement"]), "kl": f"{t['kl']:.4f}", "secs": f"{r['start_seconds']:.0f}"})
    return rows


def peer_rows(docs):
    rows = []
    for d in docs.values():
        for name, p in d["peers"].items():
            if "int8" not in p:
                rows.append({"model": d["model"], "tool": name, "rt_top1": "failed: " + str(p.get("error", ""))[:80]})
                continue
            k, lat = p["kernels"]["int8"], p.get("latency") or {}
            runs = [{"batch": int(key[1:].split("_t")[0]), "threads": int(key.split("_t")[1]),
                     "speedup": v["speedup"]["int8"], "baseline": v.get("baseline"), "harness": v.get("harness")}
                    for key, v in lat.items()]
            rows.append({"model": d["model"], "tool": name, "rt_top1": f2(p["int8"]["top1"]),
                         "agree": f2(p["int8"]["agreement"]), "kl": f"{p['int8']['kl']:.4f}",
                         "b32": speed(runs, 32, 2), "b1": speed(runs, 1, 2), "against": against(runs) if runs else "",
                         "kernels": f"{k.get('integer_compute_total', k.get('integer_total', ''))} / "
                                    f"{k.get('float_total', '')}", "secs": f"{p['quant_seconds']:.0f}"})
    return rows


def cpu_line(docs) -> str:
    ours = (docs.get("deploy") or {}).get("configs", {})
    cpu = next(iter(ours.values()))["cpu"] if ours else next(d for d in docs.values() if d)["cpu"]
    other = [f"{n} ({r['cpu']['model']}, int8 flags {', '.join(r['cpu']['flags'])})"
             for n, r in ours.items() if r.get("cpu", cpu)["model"] != cpu["model"]]
    return (f"CPU: {cpu['model']}, {cpu['cores']} cores, int8 flags: {', '.join(cpu['flags'])}"
            + (f"; except the evolq rows of {'; '.join(other)}" if other else "") + ".")


COLS = [Col("model", "model"), Col("tool", "tool"), Col("top-1 (runtime)", lambda r: r.get("rt_top1", "")),
        Col("top-1 (PyTorch)", lambda r: r.get("pt_top1", "")), Col("agreement to FP32", lambda r: r.get("agree", "")),
        Col("runtime vs PyTorch (floor)", lambda r: r.get("vs", "")), Col("KL to FP32", lambda r: r.get("kl", "")),
        Col("speedup b32 2t", lambda r: r.get("b32", "")), Col("speedup b1 2t", lambda r: r.get("b1", "")),
        Col("speedup against", lambda r: r.get("against", "")),
        Col("int / float kernels", lambda r: r.get("kernels", "")), Col("quantize s", lambda r: r.get("secs", ""))]
INTRO = (
    "500 calibration-pool images (evolq: the 450 left after its 10% hold-out), 500 evaluation images. *speedup* is "
    "the median ratio (min-max) of alternating timed rounds against an FP32 model with the same settings; *speedup "
    "against* names which: the fastest FP32 compile of the model (inductor with freezing, onnxruntime, OpenVINO) "
    "timed in the same rounds as every tool's int8 model (`benchmarks/timing.py`), or, for rows measured before "
    "that harness (*old harness*), the tool's own runtime's FP32 (pt2: both compiled by inductor with freezing), "
    "which makes two tools' ratios incomparable when their FP32 programs differ in speed; *int / float* counts the "
    "integer and float matmul/convolution kernels the runtime executes (attention matmuls included where the runtime "
    "reports them). Peers ran with their own recommended recipes (`recipe` and `doc` in their JSON); the cores were "
    "shared with other jobs during parts of these runs: the load averages are in the JSON files.")
NOTE = (
    "evolq rows: *agreement to FP32* and *KL* are the PyTorch model's (the model the runtime must match); *runtime vs "
    "PyTorch* is the runtime's top-1 agreement with it, beside the float floor (the PyTorch model in float32 against "
    "itself in float64). Peer rows: the runtime's own agreement and KL to FP32. The large maxima of evolq's pt2 "
    "spreads are one FP32 round each: a recompile in the first timed round (`rounds_s` in the JSON), since fixed by "
    "interleaving the warm-up; the medians are unaffected.")


def other_machine(d) -> str:
    cpus = sorted({(c["cpu"]["model"], c["cpu"]["cores"], ", ".join(c["cpu"]["flags"])) for c in d["configs"].values()})
    loads = [f"{c['cpu']['load_1m']:.1f}" for c in d["configs"].values() if c["cpu"].get("load_1m")]
    return (f"The same evolq configurations on another machine (`python -m benchmarks deploy --out {d['file']}.json`): "
            + "; ".join(f"{m}, {n} cores, int8 flags {fl}" for m, n, fl in cpus)
            + (f"; 1-minute load {' / '.join(loads)} at the end of each configuration" if loads else "") + ".")


def size_rows(d):
    return [{"config": n, **r["bytes"]} for n, r in d["configs"].items() if "bytes" in r]


def gap_rows(d):
    return [{"config": n, **r} for n, r in d["configs"].items() if "gap" in r]


MB = lambda v: f"{v / 1e6:.1f}"
register(Suite(
    name="deploy", doc=__doc__, run=run, order=10, resume=True,
    what="the deploy regime: PyTorch and runtime top-1, kernels, speed against the fastest FP32 compile",
    common={"calib": 500, "eval": 500},
    args=[(("--configs",), {"nargs": "+", "default": ["vit-w8a8", "effnet-w8a8"], "choices": list(CONFIGS)}),
          (("--threads",), {"type": int, "nargs": "+", "default": [2]}),
          (("--batches",), {"type": int, "nargs": "+", "default": [32, 1]}),
          (("--pairs",), {"type": int, "default": 5}),
          (("--onnx",), {"action": "store_true", "help": "also export ONNX and check/time it in onnxruntime"}),
          (("--openvino",), {"action": "store_true", "help": "also check/time the ONNX export in OpenVINO"}),
          (("--only-openvino",), {"action": "store_true", "help": "OpenVINO only (other runtimes' results kept)"}),
          (("--no-export",), {"action": "store_true", "help": "PyTorch accuracy only"}),
          (("--gap",), {"action": "store_true", "help": "also with float activations and with float weights"})],
    results={"deploy": ["--configs vit-w8a8 effnet-w8a8 --onnx --openvino --threads 2 1 --batches 32 1",
                        "--configs vit-w4a8-gptq vit-w4a8-gptq-asym --no-export --gap",
                        "--configs vit-w4a4 vit-w4a4-gptq vit-w4a8-ofq-asym --no-export",
                        "--configs vit-w4a8-ofq-mixblock-asym --batches 32"],
             "deploy_on_amd_epyc_zen4": "--configs vit-w8a8 effnet-w8a8 --onnx --out deploy_on_amd_epyc_zen4",
             "deploy_w4a8_intel_xeon": ["--configs vit-w4a8-gptq-asym --no-export --gap --out deploy_w4a8_intel_xeon",
                                        "--configs vit-w4a8-ofq-asym --no-export --out deploy_w4a8_intel_xeon"]},
    stale={"deploy": SPEED_OLD, "deploy_on_amd_epyc_zen4": SPEED_OLD,
           "deploy_w4a8_intel_xeon": "an earlier session's code"},
    smoke={"configs": ["vit-w8a8"], "calib": 16, "eval": 8, "threads": [1], "batches": [2], "pairs": 1, "onnx": True},
    report=[Section("deploy|deploy_peers_vit_tiny|deploy_peers_efficientnet_lite0", each=False, blocks=[
        "## Deployed int8: evolq's deploy regime and peer tools (`benchmarks/suites/deploy.py`, "
        "`benchmarks/suites/deploy_peers.py`)", INTRO, cpu_line,
        Table(COLS, lambda docs: evolq_rows(docs.get("deploy")) + peer_rows(
            {k: v for k, v in docs.items() if k.startswith("deploy_peers")})), NOTE]),
        Section("deploy_on_*", [other_machine, Table(COLS, evolq_rows)]),
        Section("deploy", [
            lambda d: "File sizes (MB; the ONNX export packs weights of 4 bits or fewer as int4, the pt2 program holds "
                      "int8 containers):" if size_rows(d) else None,
            Table([Col("config", "config"), Col("FP32 ONNX", "fp32_onnx", MB), Col("ONNX", "onnx", MB),
                   Col("ONNX / FP32", "onnx_vs_fp32", lambda v: f"{100 * v:.0f}%"), Col("pt2", "pt2", MB)], size_rows),
            lambda d: "What the gap is made of (PyTorch, evaluation split): the same model with only its weights "
                      "quantized (activations float), and with only its activations quantized (weights float)."
            if gap_rows(d) else None,
            Table([Col("config", "config"), Col("both", "torch.top1", f2),
                   Col("weights only", "gap.weights_only.top1", f2),
                   Col("activations only", "gap.activations_only.top1", f2)], gap_rows)])]))
