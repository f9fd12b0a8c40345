"""Evol-Q on a CNN with real weights: EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``,
ImageNet weights from the assets folder), BatchNorm folded, every conv/linear weight
(per output channel) and input (per tensor) fake-quantized.

For each bit setting: the start point (calibrated on the calibration pool, even
labels) and the model after a short block-wise search (default scope: for CNN
blocks the weight scales of every conv of the block; 18 blocks: stem, 16 MBConv
blocks, head), evaluated on the evaluation split (odd labels), which neither the
calibration nor the search sees. Metrics: top-1, top-5, top-1 agreement with FP32,
KL(FP32 || quantized).

Default schedule (fits ~10 min with one thread): 128 calibration images (first 128
of the pool; 20% = 26 held out to decide whether the pass is kept, 102 in the fitness
set, infoNCE batch 64), the full evaluation split (500 images), W4A8 and W4A4, one
pass of 3 fitness evaluations per block (tournament, infoNCE, the paper's eps = 1e-3),
seed 0. Measured here: 582 s wall (user 285 s + sys 271 s) on the shared 2-core
machine. A heavier run (--calib 160 --cycles 4) is kept as
results/efficientnet_calib160_cycles4.json.

    .venv/bin/python benchmarks/efficientnet.py                       # ~10 min, 1 thread
    .venv/bin/python benchmarks/efficientnet.py --bits 4:8 --calib 80 --eval 100 --cycles 1 --out /tmp/e.json
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import write_json  # noqa: E402  (benchmarks/_common.py)

from evolq import EvolQConfig, prepare_model, quantize_model  # noqa: E402
from evolq.data import (  # noqa: E402
    assets_dir,
    fitness_part,
    load_images,
)
from evolq.evaluate import metrics, predict  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

ARCH = "tf_efficientnet_lite0"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", nargs="+", default=["4:8", "4:4"], help="W:A settings (default 4:8 4:4)")
    p.add_argument("--calib", type=int, default=128, help="calibration images (first N of the pool; max 500)")
    p.add_argument("--eval", type=int, default=500, help="evaluation images (first N of the split; max 500)")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--cycles", type=int, default=3, help="fitness evaluations per block and pass")
    p.add_argument("--searcher", default="tournament")
    p.add_argument("--loss", default="infonce")
    p.add_argument("--infonce-batch", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of calibration images held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficientnet.json"))
    return p.parse_args(argv)



def evaluate(qmodel, xe, ye, fp_logits):
    t = time.time()
    logits = predict(qmodel.model, xe, 50)
    m = metrics(logits, ye, fp_logits)
    m["eval_s"] = time.time() - t
    return m


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    root = assets_dir(required=True)
    float_model = load_model(ARCH, hub=False)
    tf = model_transform(float_model)
    xc, _ = load_images(root / "imagenet-sample", tf, "calib", limit=args.calib)
    xe, ye = load_images(root / "imagenet-sample", tf, "eval", limit=args.eval)
    t = time.time()
    fp_logits = predict(float_model, xe, 50)
    fp = metrics(fp_logits, ye)
    fp["eval_s"] = time.time() - t
    print(f"{ARCH}: {xc.shape[0]} calibration images ({args.holdout:.0%} held out), {xe.shape[0]} evaluation "
          f"images, {args.threads} thread(s); FP32 top-1 {fp['top1']:.1f} top-5 {fp['top5']:.1f}", flush=True)
    out = Path(args.out)
    result = {
        "benchmark": "efficientnet", "model": ARCH, "weights": "assets/models/tf_efficientnet_lite0.in1k.safetensors",
        "n_calib": int(xc.shape[0]), "n_eval": int(xe.shape[0]),
        "split": "calibration = even labels (first n_calib), evaluation = odd labels (first n_eval)",
        "regime": "BatchNorm folded; weights per-channel asymmetric MinMax + bias correction; conv/linear inputs "
                  "per-tensor OMSE; residual adds, activations, pooling in float",
        "schedule": {"passes": args.passes, "cycles": args.cycles, "searcher": args.searcher, "loss": args.loss,
                     "infonce_batch": args.infonce_batch, "holdout": args.holdout, "seed": args.seed,
                     "scope": "attn-weights (CNN: weight scales of every conv/linear of a block)"},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                "cpus": os.cpu_count()},
        "fp32": fp, "runs": [],
    }
    for setting in args.bits:
        w, a = (int(v) for v in setting.split(":"))
        cfg = EvolQConfig.make(w_bits=w, a_bits=a, passes=args.passes, cycles=args.cycles, searcher=args.searcher,
                               loss=args.loss, infonce_batch=args.infonce_batch, holdout=args.holdout,
                               seed=args.seed, progress=False)
        t = time.time()
        qmodel = prepare_model(copy.deepcopy(float_model), fitness_part(xc, cfg.search), cfg.quant, arch=ARCH)
        calib_s = time.time() - t
        start = evaluate(qmodel, xe, ye, fp_logits)
        print(f"  W{w}A{a} start: top-1 {start['top1']:.1f} agree {start['agreement']:.1f} KL {start['kl']:.4f} "
              f"(calib {calib_s:.0f}s)", flush=True)
        qmodel, rep = quantize_model(qmodel, xc, cfg)
        final = evaluate(qmodel, xe, ye, fp_logits)
        improved = sum(b["final_fitness"] < b["start_fitness"] for b in rep["blocks"])
        print(f"  W{w}A{a} searched: top-1 {final['top1']:.1f} agree {final['agreement']:.1f} KL {final['kl']:.4f} "
              f"({rep['evaluations']} evaluations, {rep['search_seconds']:.0f}s; {improved}/{len(rep['blocks'])} "
              f"blocks improved; passes kept: {[p['kept'] for p in rep['passes']]})", flush=True)
        result["runs"].append({
            "w_bits": w, "a_bits": a, "calib_s": calib_s, "start": start, "final": final,
            "evaluations": rep["evaluations"], "search_seconds": rep["search_seconds"],
            "passes": rep["passes"],
            "blocks": [{k: b[k] for k in ("pass", "block", "start_fitness", "final_fitness", "evaluations",
                                          "seconds")} for b in rep["blocks"]],
        })
        write_json(out, result)  # partial results survive an interrupted run
        del qmodel

    s = result["schedule"]
    print(f"\n{ARCH} on {xe.shape[0]} evaluation images; search: {s['passes']} pass(es) x {s['cycles']} cycles per "
          f"block, {s['searcher']}, {s['loss']} (batch {s['infonce_batch']}), {xc.shape[0]} calibration images")
    head = f"{'config':<16}{'top1':>7}{'top5':>7}{'agree':>7}{'KL':>9}"
    print(head)
    print("-" * len(head))
    print(f"{'FP32':<16}{fp['top1']:7.1f}{fp['top5']:7.1f}{100.0:7.1f}{0.0:9.4f}")
    for r in result["runs"]:
        for tag in ("start", "final"):
            m = r[tag]
            label = f"W{r['w_bits']}A{r['a_bits']} {'start' if tag == 'start' else 'Evol-Q'}"
            print(f"{label:<16}{m['top1']:7.1f}{m['top5']:7.1f}{m['agreement']:7.1f}{m['kl']:9.4f}")
    result["total_s"] = time.time() - t0
    write_json(out, result)
    print(f"\nwrote {out} ({result['total_s']:.0f}s in all)")
    return result


if __name__ == "__main__":
    main()
