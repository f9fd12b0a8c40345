"""The deploy regime end to end: accuracy in PyTorch and in the runtime, the kernels the
runtime runs, and its speed against the same model's FP32 in the same runtime.

For each configuration (``--configs``): the model from the assets folder; the 500
calibration-pool images (even labels) split first (10% hold-out, seed 0, as
``quantize_model`` does) and the start point calibrated on the rest with
``QuantConfig.preset("deploy")``; top-1, agreement and KL to the FP32 model on the 500
evaluation images (odd labels); then, unless ``--no-export``, the model exported with
``evolq.export_pt2`` (and ``export_onnx`` with ``--onnx``) and ``check_export`` /
``bench_export`` in the runtime (inductor with freezing for pt2, onnxruntime for onnx):
runtime top-1, agreement with the PyTorch model, the float floor, integer and float kernels,
latency ratio vs the same runtime's FP32 (``--batches``, ``--threads``, ``--pairs``), CPU
model and int8 flags.

``--strengths`` instead sweeps the SmoothQuant strength on calibration data only: the
calibration pool split into 256 images that calibrate and 244 that score (KL and agreement
to the FP32 model); the evaluation split is not read. ``QuantConfig.deploy_strength`` is
set from this sweep.

Writes ``benchmarks/results/deploy.json`` (configurations merged by name) or
``deploy_strengths_<model>_w<bits>.json``.

    .venv/bin/python benchmarks/deploy.py --configs vit-w8a8 effnet-w8a8 --threads 2
    .venv/bin/python benchmarks/deploy.py --configs vit-w4a8-gptq vit-w4a4 --no-export
    .venv/bin/python benchmarks/deploy.py --strengths 0,0.5,0.8,0.95,1 --model vit_tiny_patch16_224 --w-bits 8
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import GAP_PARTS, RESULTS, only_kind, write_json  # noqa: E402
from evolq import QuantConfig, prepare_model  # noqa: E402
from evolq.data import assets_dir, load_images, split_calibration  # noqa: E402
from evolq.evaluate import metrics, predict  # noqa: E402
from evolq.export import export_onnx, export_pt2  # noqa: E402
from evolq.export.bench import cpu_info  # noqa: E402
from evolq.export.check import bench_export, check_export  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

FIRST_OFQ = {"augment": "flip", "block_weight": 0.0, "epochs": 6}
CONFIGS = {  # name -> (architecture, w_bits, a_bits, start, other QuantConfig fields)
    "vit-w8a8": ("vit_tiny_patch16_224", 8, 8, "rtn", {}),
    "vit-w4a8-gptq": ("vit_tiny_patch16_224", 4, 8, "gptq", {"edge_bits": 8, "deploy_weights": "symmetric"}),
    "vit-w4a8-gptq-asym": ("vit_tiny_patch16_224", 4, 8, "gptq", {"edge_bits": 8, "deploy_weights": "asymmetric"}),
    # ofq / ofq-asym: the first ofq recipe (6 epochs of flips, no block term; ofq-asym's rows were made with
    # it); ofq-mixblock-asym: the second recipe, which is what today's defaults run in the deploy regime
    # (QKR is never built there)
    "vit-w4a8-ofq": ("vit_tiny_patch16_224", 4, 8, "ofq", {"edge_bits": 8, "deploy_weights": "symmetric",
                                                           "start_options": FIRST_OFQ}),
    "vit-w4a8-ofq-asym": ("vit_tiny_patch16_224", 4, 8, "ofq", {"edge_bits": 8, "deploy_weights": "asymmetric",
                                                                "start_options": FIRST_OFQ}),
    "vit-w4a8-ofq-mixblock-asym": ("vit_tiny_patch16_224", 4, 8, "ofq", {
        "edge_bits": 8, "deploy_weights": "asymmetric",
        "start_options": {"augment": "mix", "block_weight": 1.0, "epochs": 12}}),
    "vit-w4a4": ("vit_tiny_patch16_224", 4, 4, "rtn", {"edge_bits": 8, "deploy_weights": "symmetric"}),
    "vit-w4a4-gptq": ("vit_tiny_patch16_224", 4, 4, "gptq", {"edge_bits": 8, "deploy_weights": "symmetric"}),
    "vit-w4a4-asym": ("vit_tiny_patch16_224", 4, 4, "rtn", {"edge_bits": 8, "deploy_weights": "asymmetric"}),
    "vit-w4a4-gptq-asym": ("vit_tiny_patch16_224", 4, 4, "gptq", {"edge_bits": 8, "deploy_weights": "asymmetric"}),
    "effnet-w8a8": ("tf_efficientnet_lite0", 8, 8, "rtn", {}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["vit-w8a8", "effnet-w8a8"], choices=list(CONFIGS))
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--onnx", action="store_true", help="also export ONNX and check/bench it in onnxruntime")
    p.add_argument("--openvino", action="store_true", help="also check/bench the ONNX export in OpenVINO "
                                                            "(needs evolq[openvino])")
    p.add_argument("--only-openvino", action="store_true", help="OpenVINO only (the other runtimes' results "
                                                                 "already in the JSON are kept)")
    p.add_argument("--no-export", action="store_true", help="PyTorch accuracy only")
    p.add_argument("--gap", action="store_true", help="also the same model with float activations (weights "
                                                      "quantized only) and with float weights: what the gap is made of")
    p.add_argument("--strengths", default=None, help="comma-separated SmoothQuant strengths to sweep (dev split)")
    p.add_argument("--start", default="rtn", help="--strengths: the start point (rtn, gptq, ofq)")
    p.add_argument("--edge-bits", type=int, default=None, help="--strengths: QuantConfig.edge_bits")
    p.add_argument("--deploy-weights", default="symmetric", choices=("symmetric", "asymmetric"),
                   help="QuantConfig.deploy_weights (weights below 8 bits)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _kl_agree(logits, ref):
    m = metrics(logits, torch.zeros(len(ref), dtype=torch.long), ref)
    return {"kl": m["kl"], "agreement": m["agreement"]}


def sweep(args) -> int:
    torch.set_num_threads(args.threads[0])
    base = load_model(args.model)
    xc, _ = load_images(assets_dir() / "imagenet-sample", model_transform(base), "calib")
    cal, dev = xc[:256], xc[256:]
    with torch.no_grad():
        ref = predict(base, dev)
    rows = []
    for s in (float(v) for v in args.strengths.split(",")):
        t0 = time.perf_counter()
        q = prepare_model(copy.deepcopy(base), cal, QuantConfig.preset(
            "deploy", w_bits=args.w_bits, a_bits=args.a_bits, smooth_strength=s, start=args.start,
            edge_bits=args.edge_bits, deploy_weights=args.deploy_weights,
            start_options={"progress": False} if args.start == "ofq" else {}), progress=False)
        with torch.no_grad():
            r = {"strength": s, **_kl_agree(predict(q.model, dev), ref), "seconds": time.perf_counter() - t0}
        rows.append(r)
        print(f"strength {s:.2f}: dev KL {r['kl']:.4f}, agreement {r['agreement']:.1f}%", flush=True)
    best = min(rows, key=lambda r: r["kl"])
    out = {"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits, "start": args.start,
           "edge_bits": args.edge_bits, "deploy_weights": args.deploy_weights, "calibrate": 256, "dev": 244,
           "split": "calibration pool only", "rows": rows, "chosen": best["strength"], "cpu": cpu_info(),
           "torch": torch.__version__}
    tag = "" if (args.start, args.deploy_weights) == ("rtn", "symmetric") else f"_{args.start}_{args.deploy_weights}"
    write_json(args.out or f"deploy_strengths_{args.model.split('_patch')[0]}_w{args.w_bits}a{args.a_bits}{tag}.json",
               out)
    print(f"lowest dev KL at strength {best['strength']}")
    return 0


def run(args) -> int:
    torch.set_num_threads(max(args.threads))
    target = Path(args.out) if args.out else RESULTS / "deploy.json"
    res = json.loads(target.read_text()) if target.exists() else {"configs": {}}
    data = assets_dir() / "imagenet-sample"
    cache = {}
    for name in args.configs:
        arch, w, a, start, extra = CONFIGS[name]
        if arch not in cache:
            base = load_model(arch)
            tf = model_transform(base)
            xc, _ = load_images(data, tf, "calib")
            xe, ye = load_images(data, tf, "eval")
            with torch.no_grad():
                fp = predict(base, xe)
            cache[arch] = (base, xc, xe, ye, fp)
        base, xc, xe, ye, fp = cache[arch]
        fit, _hold = split_calibration(xc, 0.1, 0)
        if start == "ofq":
            extra = {**extra, "start_options": {**extra.get("start_options", {}), "progress": False}}
        quant = QuantConfig.preset("deploy", w_bits=w, a_bits=a, start=start, **extra)
        t0 = time.perf_counter()
        q = prepare_model(copy.deepcopy(base), fit, quant, arch=arch, holdout=_hold)  # ofq: hold-out KL
        secs = time.perf_counter() - t0
        with torch.no_grad():
            lq = predict(q.model, xe)
        m = metrics(lq, ye, fp)
        row = {"arch": arch, "w_bits": w, "a_bits": a, "start": start, "quant": {"smooth_strength": quant.smoothing,
                                                                                 **extra},
               "calib_images": int(fit.shape[0]), "eval_images": int(xe.shape[0]),
               "fp32_top1": metrics(fp, ye)["top1"], "torch": {"top1": m["top1"], "agreement": m["agreement"],
                                                               "kl": m["kl"]},
               "start_seconds": secs, "cpu": cpu_info(), "torch_version": torch.__version__}
        if start == "ofq":
            row["start_report"] = {k: q.start_report.get(k) for k in ("holdout_kl", "fitness_kl", "epochs_run",
                                                                       "status", "fallbacks", "warnings")}
        print(f"{name}: PyTorch top-1 {m['top1']:.1f} (FP32 {row['fp32_top1']:.1f}), agreement {m['agreement']:.1f}%,"
              f" KL {m['kl']:.4f}, {secs:.0f} s", flush=True)
        if args.gap:
            row["gap"] = {}
            for part, kind in GAP_PARTS:
                with only_kind(q, kind), torch.no_grad():
                    g = metrics(predict(q.model, xe), ye, fp)
                row["gap"][part] = {"top1": g["top1"], "agreement": g["agreement"], "kl": g["kl"]}
                print(f"  {part}: top-1 {g['top1']:.1f}, KL {g['kl']:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as d:  # file sizes: FP32 ONNX, the ONNX export (4-bit weights packed), pt2
            from evolq.export import export_float_onnx
            from evolq.export.pt2 import float_module

            sizes = {"fp32_onnx": export_float_onnx(float_module(q), Path(d) / "fp32.onnx").stat().st_size,
                     "onnx": export_onnx(q, Path(d) / "q.onnx").stat().st_size,
                     "pt2": export_pt2(q, Path(d) / "q.pt2").stat().st_size}
            row["bytes"] = {**sizes, "onnx_vs_fp32": sizes["onnx"] / sizes["fp32_onnx"]}
            print(f"  sizes: FP32 ONNX {sizes['fp32_onnx'] / 1e6:.1f} MB, ONNX {sizes['onnx'] / 1e6:.1f} MB "
                  f"({100 * row['bytes']['onnx_vs_fp32']:.0f}%), pt2 {sizes['pt2'] / 1e6:.1f} MB", flush=True)
        if not args.no_export:
            with tempfile.TemporaryDirectory() as d:
                forms = [] if args.only_openvino else [("pt2", "inductor", export_pt2, "pt2")]
                if args.onnx and not args.only_openvino:
                    forms.append(("onnx", "onnxruntime", export_onnx, "onnx"))
                if args.openvino or args.only_openvino:
                    forms.append(("onnx", "openvino", export_onnx, "openvino"))
                for fmt, runtime, writer, key in forms:
                    path = writer(q, Path(d) / f"{name}.{fmt}")
                    r = {"bytes": path.stat().st_size}
                    r["check"] = check_export(q, path, fmt, runtime, xe, ye, threads=max(args.threads))
                    r["bench"] = bench_export(q, path, fmt, runtime, xe[0], batches=tuple(args.batches),
                                              threads=tuple(args.threads), pairs=args.pairs)
                    row[key] = r
                    c, b = r["check"], r["bench"]
                    print(f"  {fmt}/{runtime}: top-1 {c['top1_runtime']:.1f} (torch {c['top1_torch']:.1f}), "
                          f"agreement {c['agreement']:.1f}% (floor {c['floor']:.1f}%), integer {c['integer_kernels']}, "
                          f"float {c['float_kernels']}", flush=True)
                    for run_ in b["runs"]:
                        s = run_["speedup"]
                        print(f"    batch {run_['batch']}, {run_['threads']} threads: {s['median']:.2f}x "
                              f"({s['min']:.2f}-{s['max']:.2f}); FP32 {run_['fp32_ms']:.1f} ms, "
                              f"int8 {run_['int8_ms']:.1f} ms", flush=True)
        res["configs"][name] = {**res["configs"].get(name, {}), **row}  # runtimes not run this time are kept
        write_json(target, res)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return sweep(args) if args.strengths else run(args)


if __name__ == "__main__":
    sys.exit(main())
