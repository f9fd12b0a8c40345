"""Evol-Q on ViT-Tiny (real weights): evaluation-split top-1 / agreement / KL before
(FQ-ViT start point) and after the search, per bit width and seed.

    python benchmarks/search.py --bits 3 4 --passes 1 --cycles 3 --calib 500

Calibration images come from the calibration pool (even labels), 10% of them held
out to decide whether a pass is kept; metrics are on the evaluation split (odd
labels), which the search never sees.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import assets_dir, fitness_part, load_images
from evolq.evaluate import evaluate_qmodel
from evolq.models import load_model, model_transform


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--searcher", default="tournament")
    ap.add_argument("--loss", default="infonce")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--calib", type=int, default=500)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(args.model)
    tf = model_transform(base)
    data = assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=args.calib)
    xe, ye = load_images(data, tf, "eval", limit=args.eval)
    rows, fp = [], None
    for bits in args.bits:
        for seed in args.seeds:
            cfg = EvolQConfig.make(w_bits=bits, a_bits=8, passes=args.passes, cycles=args.cycles, seed=seed,
                                   searcher=args.searcher, loss=args.loss, progress=False)
            qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, cfg.search), cfg.quant, arch=args.model)
            start, fp_logits = evaluate_qmodel(qmodel, xe, ye)
            t0 = time.perf_counter()
            qmodel, rep = quantize_model(qmodel, xc, cfg)
            secs = time.perf_counter() - t0
            final, _ = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp_logits)
            fp = start["fp32"]
            row = {"w_bits": bits, "a_bits": 8, "seed": seed, "start": start["quantized"],
                   "final": final["quantized"], "evaluations": rep["evaluations"], "search_seconds": secs,
                   "passes": rep["passes"]}
            rows.append(row)
            s, f = row["start"], row["final"]
            print(f"W{bits}A8 seed {seed}: top1 {s['top1']:.2f} -> {f['top1']:.2f}, agreement {s['agreement']:.2f} -> "
                  f"{f['agreement']:.2f}, KL {s['kl']:.4f} -> {f['kl']:.4f} ({rep['evaluations']} evals, {secs:.0f} s)",
                  flush=True)
    print(f"\nFP32 top-1 {fp['top1']:.2f} on {xe.shape[0]} evaluation images; schedule: {args.passes} pass(es) x "
          f"{args.cycles} cycles, {args.searcher}, {args.loss}, {xc.shape[0]} calibration images (10% held out)")
    print(f"{'config':<14}{'top1':>14}{'agreement':>18}{'KL':>20}")
    for r in rows:
        s, f = r["start"], r["final"]
        print(f"W{r['w_bits']}A8 s{r['seed']:<8}{s['top1']:6.2f}->{f['top1']:6.2f}"
              f"{s['agreement']:9.2f}->{f['agreement']:6.2f}"
              f"{s['kl']:10.4f}->{f['kl']:.4f}")
    out = {"model": args.model, "fp32": fp, "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]),
           "schedule": {"passes": args.passes, "cycles": args.cycles, "searcher": args.searcher, "loss": args.loss},
           "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
