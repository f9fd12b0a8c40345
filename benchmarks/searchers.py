"""Searchers at equal fitness-evaluation budgets on ViT-Tiny (real weights).

tournament (the paper's), CMA-ES, SNES and PGPE each get ``--budget`` fitness
evaluations per block and pass (population searchers: whole generations of
``--popsize``), over the last ``--last`` attention blocks (0 = all twelve). Reported:
the fitness-vs-evaluations curve (PNG), the final fitness and hold-out loss, and
evaluation-split top-1 / agreement / KL (odd-label images, never seen by the search).

    python benchmarks/searchers.py --bits 3 --budget 24 --popsize 8 --last 4 --calib 100 --eval 200
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, CurveRecorder, load_data, search_last_blocks, setup, write_json

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.evaluate import evaluate_qmodel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--searchers", nargs="+", default=["tournament", "cmaes", "snes", "pgpe"])
    ap.add_argument("--budget", type=int, default=24, help="fitness evaluations per block and pass")
    ap.add_argument("--popsize", type=int, default=8, help="generation size of cmaes/snes/pgpe")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--last", type=int, default=4, help="search only the last N blocks (0: all)")
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="searchers")
    args = ap.parse_args()
    setup(args.threads)
    t_all = time.perf_counter()
    base, xc, xe, ye = load_data(args.model, args.calib, args.eval)
    n_fit = xc.shape[0] - int(round(xc.shape[0] * 0.1))
    ib = min(100, n_fit)
    rows, fp, start = [], None, None
    for name in args.searchers:
        cfg = EvolQConfig.make(w_bits=args.bits, a_bits=8, passes=args.passes, cycles=args.budget,
                               popsize=args.popsize, searcher=name, seed=args.seed, infonce_batch=ib,
                               progress=False)
        qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, cfg.search), cfg.quant, arch=args.model)
        searched = search_last_blocks(qmodel, args.last, cfg.search.scope)
        if start is None:
            res, fp_logits = evaluate_qmodel(qmodel, xe, ye)
            fp, start = res["fp32"], res["quantized"]
        t0 = time.perf_counter()
        rec = CurveRecorder()
        qmodel, rep = quantize_model(qmodel, xc, cfg, subscribers=[rec])
        secs = time.perf_counter() - t0
        final, _ = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp_logits)
        q = final["quantized"]
        rows.append({"searcher": name, "evaluations": rep["evaluations"], "search_seconds": secs,
                     "start_fitness": rep["blocks"][0]["start_fitness"],
                     "final_fitness": rep["blocks"][-1]["final_fitness"], "passes": rep["passes"],
                     "final": q, "curve": {"evaluations": rec.x, "fitness": rec.y}})
        print(f"{name:<11} {rep['evaluations']:4d} evals {secs:6.0f} s  fitness {rows[-1]['start_fitness']:.4f} -> "
              f"{rows[-1]['final_fitness']:.4f}  top1 {q['top1']:.2f}", flush=True)
    print(f"\n{args.model} W{args.bits}A8, {xc.shape[0]} calibration images ({n_fit} fitness), {xe.shape[0]} "
          f"evaluation images; budget {args.budget}/block/pass, {args.passes} pass(es), blocks {', '.join(searched)}")
    print(f"{'searcher':<12}{'evals':>6}{'fitness':>10}{'top1':>8}{'agree':>8}{'KL':>9}{'sec':>7}")
    print(f"{'fp32':<12}{'':>6}{'':>10}{fp['top1']:8.2f}{100:8.2f}{0:9.4f}")
    print(f"{'start':<12}{0:6d}{rows[0]['start_fitness']:10.4f}{start['top1']:8.2f}{start['agreement']:8.2f}"
          f"{start['kl']:9.4f}")
    for r in rows:
        q = r["final"]
        print(f"{r['searcher']:<12}{r['evaluations']:6d}{r['final_fitness']:10.4f}{q['top1']:8.2f}"
              f"{q['agreement']:8.2f}{q['kl']:9.4f}{r['search_seconds']:7.0f}")
    out = {"benchmark": "searchers", "model": args.model, "w_bits": args.bits, "a_bits": 8,
           "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "budget_per_block": args.budget,
           "popsize": args.popsize, "passes": args.passes, "blocks": searched, "seed": args.seed,
           "fp32": fp, "start": start, "runs": rows, "seconds": time.perf_counter() - t_all}
    print("wrote", write_json(f"{args.out}.json", out))
    plot(out, RESULTS / f"{args.out}.png")


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in out["runs"]:
        ax.plot(r["curve"]["evaluations"], r["curve"]["fitness"],
                label=f"{r['searcher']} (top-1 {r['final']['top1']:.1f})",
                drawstyle="steps-post")
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel("best infoNCE of the block being searched")
    ax.set_title(f"ViT-Tiny W{out['w_bits']}A8, {out['budget_per_block']} evals/block, "
                 f"{len(out['blocks'])} blocks", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
