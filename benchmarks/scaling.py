"""Cost of one fitness evaluation on ViT-Tiny (real weights, W4A8): seconds per
``BlockFitness`` call as the calibration size, the population size and the block
position vary (one factor at a time around a base point), plus a ``torch.profiler``
summary (top operators by self CPU time) of one search pass.

    python benchmarks/scaling.py --sizes 25 50 100 --pops 1 4 16 --blocks 0 4 8 11
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import load_data, search_last_blocks, setup, write_json

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.fitness import BlockFitness, reference_outputs
from evolq.losses import infonce
from evolq.qnn.scales import ScaleSpace


def time_call(qmodel, x, index, pop, repeats):
    """Seconds of one batched fitness call (cache filled beforehand, best of ``repeats``)."""
    ref = reference_outputs(qmodel, x)
    fit = BlockFitness(qmodel, x, ref, lambda o, r: infonce(o, r, batch_size=min(100, x.shape[0])))
    space = ScaleSpace(qmodel.blocks[index].searched("attn-weights"))
    s0 = space.vector()
    g = torch.Generator().manual_seed(0)
    cands = s0 * (1 + 1e-2 * torch.randn(pop, len(space), generator=g))
    fit.block_input(index)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fit(index, space, cands)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--pops", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 4, 8, 11])
    ap.add_argument("--base-size", type=int, default=50)
    ap.add_argument("--base-pop", type=int, default=4)
    ap.add_argument("--base-block", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-calib", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="scaling")
    args = ap.parse_args()
    setup(args.threads)
    t_all = time.perf_counter()
    base, xc, _, _ = load_data(args.model, max(args.sizes + [args.base_size, args.profile_calib]), 1)
    cfg = EvolQConfig.make(w_bits=4, a_bits=8, passes=1, cycles=2, progress=False, infonce_batch=25)
    qmodel = prepare_model(copy.deepcopy(base), xc[:max(args.sizes)], cfg.quant, arch=args.model)
    names = [b.name for b in qmodel.blocks]
    idx = lambda i: names.index(f"blocks.{i}")
    rows = []

    def run(kind, n, pop, blk):
        s = time_call(qmodel, xc[:n], idx(blk), pop, args.repeats)
        rows.append({"vary": kind, "calib": n, "population": pop, "block": blk, "seconds": s,
                     "ms_per_candidate_image": 1e3 * s / (n * pop)})
        print(f"{kind:<11} calib {n:4d} pop {pop:3d} block {blk:2d}: {s:7.3f} s/call "
              f"({rows[-1]['ms_per_candidate_image']:.2f} ms per candidate-image)", flush=True)

    for n in args.sizes:
        run("calib", n, args.base_pop, args.base_block)
    for p in args.pops:
        run("population", args.base_size, p, args.base_block)
    for b in args.blocks:
        run("block", args.base_size, args.base_pop, b)

    # profile one pass over the last two blocks
    from torch.profiler import ProfilerActivity, profile

    fit = fitness_part(xc[:args.profile_calib], cfg.search)
    qm = prepare_model(copy.deepcopy(base), fit, cfg.quant, arch=args.model)
    search_last_blocks(qm, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        _, rep = quantize_model(qm, xc[:args.profile_calib], cfg)
        pass_s = time.perf_counter() - t
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    ops = [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total} for e in top]
    print(f"\nprofile: one pass, last 2 blocks, {args.profile_calib} calibration images, "
          f"{rep['evaluations']} evaluations, {pass_s:.1f} s (profiled)")
    print(f"{'op':<40}{'calls':>8}{'self s':>9}{'share':>8}")
    for o in ops:
        print(f"{o['op'][:39]:<40}{o['calls']:8d}{o['self_cpu_s']:9.2f}{100 * o['share']:7.1f}%")
    out = {"benchmark": "scaling", "model": args.model, "w_bits": 4, "a_bits": 8, "threads": args.threads,
           "timings": rows, "profile": {"calib": args.profile_calib, "blocks": 2, "cycles": 2,
                                        "evaluations": rep["evaluations"], "seconds": pass_s, "top_ops": ops},
           "seconds": time.perf_counter() - t_all}
    print("wrote", write_json(f"{args.out}.json", out))


if __name__ == "__main__":
    main()
