"""Fitness losses (infoNCE, MSE, cosine, KL) on ViT-Tiny (real weights), measured on
the evaluation split after every pass (the paper's Fig. 6 question, small settings).

Each loss drives its own search from the same start point; after each pass the
model is evaluated on the evaluation split (odd labels, never seen by the search):
top-1, agreement with the float model and KL. One pass at a time (``passes=1``
repeated on the same model). By default every pass is kept (``--holdout 0``): with a
10-image hold-out most passes were rolled back and the curves showed the hold-out's
choice rather than the loss.

    python benchmarks/losses.py --bits 3 --passes 3 --cycles 3 --last 4 --calib 100 --eval 200
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, load_data, search_last_blocks, setup, write_json

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.evaluate import evaluate_qmodel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--losses", nargs="+", default=["infonce", "mse", "cosine", "kl"])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--last", type=int, default=4, help="search only the last N blocks (0: all)")
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="calibration fraction that decides whether a pass is kept (default 0: every pass is "
                         "kept, so the curve shows what each loss does, not the hold-out's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="losses")
    args = ap.parse_args()
    setup(args.threads)
    t_all = time.perf_counter()
    base, xc, xe, ye = load_data(args.model, args.calib, args.eval)
    n_fit = xc.shape[0] - int(round(xc.shape[0] * args.holdout))
    rows, fp, start, fp_logits = [], None, None, None
    for loss in args.losses:
        qmodel = None
        curve = []
        t0 = time.perf_counter()
        for p in range(args.passes):
            # a different seed per pass: pass p of a longer schedule
            cfg = EvolQConfig.make(w_bits=args.bits, a_bits=8, passes=1, cycles=args.cycles, loss=loss,
                                   seed=args.seed + p, infonce_batch=min(100, n_fit), holdout=args.holdout,
                                   progress=False)
            if qmodel is None:
                qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, cfg.search), cfg.quant, arch=args.model)
                searched = search_last_blocks(qmodel, args.last, cfg.search.scope)
                if start is None:
                    res, fp_logits = evaluate_qmodel(qmodel, xe, ye)
                    fp, start = res["fp32"], res["quantized"]
                curve.append({"pass": 0, **{k: start[k] for k in ("top1", "agreement", "kl")}, "kept": None})
            qmodel, rep = quantize_model(qmodel, xc, cfg)
            q = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp_logits)[0]["quantized"]
            kept = bool(rep["passes"][0].get("kept", True)) if rep["passes"] else None
            curve.append({"pass": p + 1, **{k: q[k] for k in ("top1", "agreement", "kl")}, "kept": kept})
            print(f"{loss:<8} pass {p + 1}: top1 {q['top1']:.2f} agreement {q['agreement']:.2f} KL {q['kl']:.4f}"
                  f" kept={kept}", flush=True)
        rows.append({"loss": loss, "per_pass": curve, "search_seconds": time.perf_counter() - t0})
    print(f"\n{args.model} W{args.bits}A8, {xc.shape[0]} calibration / {xe.shape[0]} evaluation images, "
          f"{args.cycles} cycles/block, blocks {', '.join(searched)}")
    print(f"{'loss':<9}" + "".join(f"{'pass ' + str(p):>22}" for p in range(args.passes + 1)))
    for r in rows:
        print(f"{r['loss']:<9}" + "".join(f"{c['top1']:9.2f} {c['agreement']:6.2f} {c['kl']:5.3f}"
                                          for c in r["per_pass"]))
    print("(each cell: top-1, agreement with FP32, KL)")
    out = {"benchmark": "losses", "model": args.model, "w_bits": args.bits, "a_bits": 8,
           "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "cycles": args.cycles,
           "passes": args.passes, "holdout": args.holdout, "blocks": searched, "seed": args.seed,
           "fp32": fp, "start": start, "runs": rows,
           "seconds": time.perf_counter() - t_all}
    print("wrote", write_json(f"{args.out}.json", out))
    plot(out, RESULTS / f"{args.out}.png")


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(8, 3.2))
    for r in out["runs"]:
        ps = [c["pass"] for c in r["per_pass"]]
        axs[0].plot(ps, [c["top1"] for c in r["per_pass"]], marker="o", label=r["loss"])
        axs[1].plot(ps, [c["kl"] for c in r["per_pass"]], marker="o", label=r["loss"])
    axs[0].set_ylabel("eval top-1 (%)")
    axs[1].set_ylabel("eval KL(fp32 || quantized)")
    for ax in axs:
        ax.set_xlabel("pass")
        ax.legend(fontsize=7)
    fig.suptitle(f"ViT-Tiny W{out['w_bits']}A8, fitness loss vs evaluation split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
