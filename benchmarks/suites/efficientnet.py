"""Evol-Q on a CNN with real weights: EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``),
BatchNorm folded, every conv/linear weight (per output channel) and input (per tensor)
fake-quantized. Per W:A setting the start point and the model after a short block-wise search
(for CNN blocks the weight scales of every conv of the block; 18 blocks), on the evaluation split."""
from __future__ import annotations

import time

from evolq import EvolQConfig
from evolq.evaluate import metrics, predict

from ..common import start_and_search
from ..report import Col, Section, Table, f2
from ..runner import Suite, register

ARCH = "tf_efficientnet_lite0"
BLOCK_KEYS = ("pass", "block", "start_fitness", "final_fitness", "evaluations", "seconds")


def run(run):
    a = run.args
    d = run.data(ARCH)
    t = time.time()
    fp_logits = predict(d.base, d.xe, 50)
    fp = {**metrics(fp_logits, d.ye), "eval_s": time.time() - t}
    run.doc = {
        "benchmark": "efficientnet", "model": ARCH, "weights": "assets/models/tf_efficientnet_lite0.in1k.safetensors",
        "n_calib": int(d.xc.shape[0]), "n_eval": int(d.xe.shape[0]),
        "split": "calibration = even labels (first n_calib), evaluation = odd labels (first n_eval)",
        "regime": "BatchNorm folded; weights per-channel asymmetric MinMax + bias correction; conv/linear inputs "
                  "per-tensor OMSE; residual adds, activations, pooling in float",
        "schedule": {"passes": a.passes, "cycles": a.cycles, "searcher": a.searcher, "loss": a.loss,
                     "infonce_batch": a.infonce_batch, "holdout": a.holdout, "seed": a.seeds[0],
                     "scope": "attn-weights (CNN: weight scales of every conv/linear of a block)"},
        "fp32": fp, "runs": []}
    for setting in a.bits:
        w, act = (int(v) for v in setting.split(":"))
        cfg = EvolQConfig.make(w_bits=w, a_bits=act, passes=a.passes, cycles=a.cycles, searcher=a.searcher,
                               loss=a.loss, infonce_batch=a.infonce_batch, holdout=a.holdout, seed=a.seeds[0],
                               progress=False)
        r = start_and_search(d.base, d.xc, d.xe, d.ye, cfg, ARCH, fp_logits)
        rep = r["report"]
        run.doc["runs"].append({"w_bits": w, "a_bits": act, "calib_s": r["calib_s"], "start": r["start"],
                                "final": r["final"], "evaluations": rep["evaluations"],
                                "search_seconds": rep["search_seconds"], "passes": rep["passes"],
                                "blocks": [{k: b[k] for k in BLOCK_KEYS} for b in rep["blocks"]]})
        print(f"  W{w}A{act}: top-1 {r['start']['top1']:.1f} -> {r['final']['top1']:.1f}", flush=True)
        run.save()


register(Suite(
    name="efficientnet", what="EfficientNet-Lite0 W4A8 / W4A4 start point vs Evol-Q", doc=__doc__, run=run, order=140,
    common={"calib": 128, "eval": 500, "seeds": [0], "threads": 1},
    args=[(("--bits",), {"nargs": "+", "default": ["4:8", "4:4"], "help": "W:A settings"}),
          (("--passes",), {"type": int, "default": 1}),
          (("--cycles",), {"type": int, "default": 3, "help": "fitness evaluations per block and pass"}),
          (("--searcher",), {"default": "tournament"}), (("--loss",), {"default": "infonce"}),
          (("--infonce-batch",), {"type": int, "default": 64}),
          (("--holdout",), {"type": float, "default": 0.2, "help": "fraction of calibration images held out"})],
    results={"efficientnet": "", "efficientnet_seed1": "--seeds 1 --out efficientnet_seed1",
             "efficientnet_calib160_cycles4": "--calib 160 --cycles 4 --out efficientnet_calib160_cycles4"},
    stale=("efficientnet", "efficientnet_seed1", "efficientnet_calib160_cycles4"),
    smoke={"bits": ["4:8"], "calib": 16, "eval": 8, "cycles": 1, "infonce_batch": 8},
    report=[Section("efficientnet|efficientnet_seed1|efficientnet_calib160_cycles4", [
        "## EfficientNet-Lite0 (`{file}.json`)",
        lambda d: f"`benchmarks/suites/efficientnet.py`: {d['n_calib']} calibration / {d['n_eval']} evaluation "
                  f"images, {d['schedule'].get('passes')} pass x {d['schedule'].get('cycles')} cycles, seed "
                  f"{d['schedule'].get('seed')}. FP32 top-1 {f2(d['fp32']['top1'])}.",
        Table([Col("bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"), Col("model", "stage"),
               Col("top-1", "m.top1", f2), Col("agreement", "m.agreement", f2), Col("KL", "m.kl", "{:.4f}")],
              lambda d: [{**r, "stage": k, "m": r[k]} for r in d["runs"] for k in ("start", "final")])])]))
