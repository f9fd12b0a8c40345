"""The deploy regime's SmoothQuant strength (and weight grid), swept on calibration data only: the
calibration pool split into 256 images that calibrate and 244 that score (KL and agreement to the
FP32 model); the evaluation split is not read. ``QuantConfig.deploy_strength`` is set from this."""
from __future__ import annotations

import copy
import time

import torch

from evolq import QuantConfig, prepare_model
from evolq.evaluate import metrics, predict

from ..report import Col, Pivot, Section
from ..runner import Suite, cpu_info, register


def run(run):
    a = run.args
    cal, dev, _ = run.dev_split(a.model, a.calib)
    base = run.model()
    with torch.no_grad():
        ref = predict(base, dev)
    rows = []
    for s in a.strengths:
        t0 = time.perf_counter()
        q = prepare_model(copy.deepcopy(base), cal, QuantConfig.preset(
            "deploy", w_bits=a.w_bits, a_bits=a.a_bits, smooth_strength=s, start=a.start, edge_bits=a.edge_bits,
            deploy_weights=a.deploy_weights, start_options={"progress": False} if a.start == "ofq" else {}))
        with torch.no_grad():
            m = metrics(predict(q.model, dev), torch.zeros(len(ref), dtype=torch.long), ref)
        rows.append({"strength": s, "kl": m["kl"], "agreement": m["agreement"], "seconds": time.perf_counter() - t0})
        print(f"strength {s:.2f}: dev KL {m['kl']:.4f}, agreement {m['agreement']:.1f}%", flush=True)
    run.save({"model": a.model, "w_bits": a.w_bits, "a_bits": a.a_bits, "start": a.start, "edge_bits": a.edge_bits,
              "deploy_weights": a.deploy_weights, "calibrate": int(cal.shape[0]), "dev": int(dev.shape[0]),
              "split": "calibration pool only", "rows": rows, "chosen": min(rows, key=lambda r: r["kl"])["strength"],
              "cpu": cpu_info(), "torch": torch.__version__})


def cells(docs):
    return [{**r, "bits": f"W{d['w_bits']}A{d['a_bits']}", "start": d.get("start", "rtn"),
             "grid": d.get("deploy_weights", "symmetric"), "edge": str(d.get("edge_bits") or "")}
            for d in sorted(docs.values(), key=lambda d: (-d["w_bits"], d.get("start", "rtn"))) for r in d["rows"]]


GPTQ = "--w-bits 4 --start gptq --edge-bits 8"
register(Suite(
    name="deploy_strengths", doc=__doc__, run=run, order=11,
    what="SmoothQuant strength and weight grid of the deploy regime, calibration pool only",
    out="deploy_strengths_{short}_w{w_bits}a{a_bits}",
    common={"model": "vit_tiny_patch16_224", "calib": 256, "dev": None, "threads": 2},
    args=[(("--strengths",), {"type": float, "nargs": "+", "default": [0.0, 0.5, 0.8, 0.95, 1.0]}),
          (("--start",), {"default": "rtn", "help": "the start point (rtn, gptq, ofq)"}),
          (("--edge-bits",), {"type": int, "default": None}), (("--w-bits",), {"type": int, "default": 8}),
          (("--a-bits",), {"type": int, "default": 8}),
          (("--deploy-weights",), {"default": "symmetric", "choices": ("symmetric", "asymmetric"),
                                   "help": "QuantConfig.deploy_weights (weights below 8 bits)"})],
    results={"deploy_strengths_vit_tiny_w8a8": "--strengths 0 0.5 0.8 0.95 1",
             "deploy_strengths_vit_tiny_w4a8": "--w-bits 4 --strengths 0 0.5 0.8 1",
             "deploy_strengths_vit_tiny_w4a8_gptq_symmetric": f"{GPTQ} --strengths 0.5 0.8 --out "
                                                              f"deploy_strengths_vit_tiny_w4a8_gptq_symmetric",
             "deploy_strengths_vit_tiny_w4a8_gptq_asymmetric": f"{GPTQ} --deploy-weights asymmetric --strengths 0.5 "
                                                               f"0.8 0.9 1 --out "
                                                               f"deploy_strengths_vit_tiny_w4a8_gptq_asymmetric"},
    smoke={"calib": 16, "dev": 8, "strengths": [0.5]},
    report=[Section("deploy_strengths_*", each=False, blocks=[
        "SmoothQuant strength and weight grid of the deploy regime, calibration pool only (256 images calibrate, 244 "
        "score; `python -m benchmarks deploy_strengths`): dev KL (agreement %) per strength.",
        Pivot(cells, [Col("bits", "bits"), Col("start", "start"), Col("weight grid", "grid"),
                      Col("edge bits", "edge")], "strength", "{:g}".format,
              lambda r: f"{r['kl']:.4f} ({r['agreement']:.1f})", missing="")])]))
