"""Speed: evolq's search vs a faithful re-implementation of the authors' loop
(``joint_evol_opt.py`` of enyac-group/evol-q, read for its behaviour; no code copied).

The baseline does what the authors' code does:

* the full-precision outputs of the calibration set are computed once (batches of 100);
* every fitness evaluation sets the candidate's scales and runs the whole quantized
  model over the calibration set in batches of 100, one candidate at a time;
* every block starts by evaluating its start scales again (1 + cycles evaluations);
* tournament: 15 copies of the start, sample 10 with replacement (Python ``random``),
  the best is the parent, child = abs(parent + U(-eps, eps)) (NumPy), the population is
  sorted by loss (stable) and the last member dropped: the *newest* of the tied worst.

evolq runs its own tournament (torch generator, drops the *oldest* of the tied worst) with
``reuse_fitness=False``, so it also re-evaluates every block's start and both sides spend
the same number of evaluations. Both get the same seeds (``block_seed``), but the random
schemes and the tie-break differ, so the scales they reach differ; instead the script
compares total time and time per evaluation at equal evaluations, and checks that the
two fitness paths give the same loss for the same candidate (``loss_check``).

Runs alternate (baseline, evolq, baseline, evolq, ...) from the same start point; the
result is the median ratio over the pairs, with the spread and the load average of
each pair (the machine may be shared). Then a profile: FLOPs of one evaluation per
searched block (torch's FLOP counter) against the measured matmul rate (the physical
limit), and the top operators of one evaluation.

    python -m benchmarks.speed --pairs 3 --cycles 2 --blocks 1 5 9
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's evolq, also when run as a script
sys.path.insert(1, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import setup, write_json  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import evolq  # noqa: E402
from evolq import EvolQConfig, prepare_model, quantize_model  # noqa: E402
from evolq.data import assets_dir, load_images  # noqa: E402
from evolq.engine import block_seed  # noqa: E402
from evolq.fitness import BlockFitness, reference_outputs  # noqa: E402
from evolq.losses import make_loss  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402
from evolq.qnn.scales import ScaleSpace  # noqa: E402

SCOPE = "attn-weights"
AUTHORS_BATCH = 100


# -- the authors' loop -------------------------------------------------------------
class AuthorsLoop:
    """The authors' fitness and tournament on an evolq ``QModel`` (see the module doc)."""

    def __init__(self, qmodel, x, search, eps):
        self.qmodel, self.search, self.eps = qmodel, search, eps
        self.batches = list(torch.split(x, AUTHORS_BATCH))
        self.loss_fn = make_loss(search)  # the same infoNCE as evolq (float64), so losses can be compared
        self.evaluations = 0

    @torch.no_grad()
    def fp_outputs(self):
        """Full-precision outputs, once per run."""
        self.qmodel.set_quant_enabled(False)
        try:
            self.o_fps = [self.qmodel.model(xb).float() for xb in self.batches]
        finally:
            self.qmodel.set_quant_enabled(True)

    @torch.no_grad()
    def loss(self, space: ScaleSpace, vec) -> float:
        """Set the scales, run the whole quantized model per batch of 100, mean of the batch losses."""
        space.write(torch.as_tensor(vec, dtype=torch.float32))
        res = 0.0
        for xb, o_fp in zip(self.batches, self.o_fps):
            out = self.qmodel.model(xb).float()
            res += float(self.loss_fn(out.unsqueeze(0), o_fp)[0])
        self.evaluations += 1
        return res / len(self.batches)

    def search_block(self, space: ScaleSpace, seed: int, cycles: int):
        rnd, nrs = random.Random(seed), np.random.RandomState(seed % 2**32)
        start = space.vector().double().numpy()
        obj = self.loss(space, start)
        population = [(obj, start)] * self.search.population
        for _ in range(cycles):
            samples = rnd.choices(population, k=self.search.samples)
            parent = min(samples, key=lambda m: m[0])  # the first sampled among equal losses
            child = np.abs(parent[1] + nrs.uniform(-self.eps, self.eps, size=parent[1].shape))
            child = child.astype(np.float32).astype(np.float64)  # what the model will hold
            population.append((self.loss(space, child), child))
            population = sorted(population, key=lambda m: m[0])  # stable: ties stay in insertion order
            population.pop()  # the newest of the tied worst
        best = min(population, key=lambda m: m[0])
        space.write(torch.as_tensor(best[1], dtype=torch.float32))
        return best[0]

    def run(self, blocks: list[int], seed: int, cycles: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        self.evaluations = 0
        self.fp_outputs()
        per_block = []
        for idx in sorted(blocks, reverse=True):  # last block first
            tb, cb, e0 = time.perf_counter(), time.process_time(), self.evaluations
            final = self.search_block(ScaleSpace(self.qmodel.blocks[idx].searched(SCOPE)), block_seed(seed, 0, idx),
                                      cycles)
            per_block.append({"index": idx, "block": self.qmodel.blocks[idx].name, "final_fitness": final,
                              "evaluations": self.evaluations - e0, "seconds": time.perf_counter() - tb,
                              "cpu_seconds": time.process_time() - cb})
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "evaluations": self.evaluations, "blocks": per_block}


# -- helpers -------------------------------------------------------------------------
def restrict_blocks(qmodel, keep: list[int]) -> None:
    """Search only the block-view indices ``keep`` under ``SCOPE`` (others keep their start scales)."""
    for i, b in enumerate(qmodel.blocks):
        if b.scopes.get(SCOPE) and i not in keep:
            b.scopes = {**b.scopes, SCOPE: []}


def run_evolq(qmodel, x, cfg) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    _, rep = quantize_model(qmodel, x, cfg)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    blocks = [{"block": b["block"], "final_fitness": b["final_fitness"], "evaluations": b["evaluations"],
               "seconds": b["seconds"]} for b in rep["blocks"]]
    return {"seconds": seconds, "cpu_seconds": cpu, "search_seconds": rep["search_seconds"],
            "evaluations": rep["evaluations"], "blocks": blocks}


def loss_check(qmodel, x, search, blocks, eps, n_cands=2) -> dict:
    """The same candidate vectors through both fitness paths: the authors' full-model
    loss and evolq's cached, chunked ``BlockFitness``."""
    loop = AuthorsLoop(qmodel, x, search, eps)
    loop.fp_outputs()
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       search.max_batch)
    g = torch.Generator().manual_seed(1234)
    rows = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        start = space.vector()
        cands = [start] + [(start.double() + (torch.rand(len(space), generator=g, dtype=torch.float64) * 2 - 1) * eps)
                           .abs().float() for _ in range(n_cands - 1)]
        ev = fit(idx, space, torch.stack(cands)).tolist()
        au = [loop.loss(space, c.double().numpy()) for c in cands]
        space.write(start)
        rows += [{"block": qmodel.blocks[idx].name, "candidate": j, "evolq": e, "authors": a, "abs_diff": abs(e - a)}
                 for j, (e, a) in enumerate(zip(ev, au))]
    return {"candidates": rows, "max_abs_diff": max(r["abs_diff"] for r in rows),
            "max_rel_diff": max(r["abs_diff"] / abs(r["authors"]) for r in rows)}


def matmul_rate(row_counts, repeats: int = 5) -> float:
    """Best FLOP/s (process CPU time) of ``F.linear`` at the block's linear shapes (ViT-Tiny: 192->576,
    192->192, 192->768, 768->192) for each row count."""
    best = 0.0
    for rows in row_counts:
        for k, n in ((192, 576), (192, 192), (192, 768), (768, 192)):
            a, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            for _ in range(repeats):
                t = time.process_time()
                torch.nn.functional.linear(a, w, b)
                best = max(best, 2 * rows * k * n / max(time.process_time() - t, 1e-9))
    return best


def time_eval(fn, repeats: int = 2) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, each the least of ``repeats`` runs."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def chunk_sizes(qmodel, x, search, blocks, sizes, repeats: int = 3) -> dict:
    """CPU seconds of one evaluation (one candidate, the tournament's case) per chunk size
    (``max_batch``), on each searched block, the sizes interleaved; and whether the losses
    are bitwise equal across sizes."""
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       max(sizes))
    out = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        cand = space.vector().unsqueeze(0)
        fit.block_input(idx)
        cpu, losses = {m: float("inf") for m in sizes}, {}
        for _ in range(repeats):
            for m in sizes:
                fit.max_batch = m
                c = time.process_time()
                losses[m] = float(fit(idx, space, cand)[0])
                cpu[m] = min(cpu[m], time.process_time() - c)
        out.append({"block": qmodel.blocks[idx].name, "cpu_seconds": {str(m): cpu[m] for m in sizes},
                    "losses_equal": len(set(losses.values())) == 1})
    return {"sizes": sizes, "repeats": repeats, "blocks": out, "loadavg": list(os.getloadavg())}


def profile(qmodel, x, search, blocks, baseline_runs) -> dict:
    """FLOPs of one evaluation (per searched block, and the authors' full model) against
    the measured matmul rate, and the top operators of one evaluation."""
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       search.max_batch)
    tokens = qmodel.blocks[1].run(qmodel.blocks[0].run(x[:1])).shape[1]
    rows = [min(search.max_batch, x.shape[0]) * tokens, min(AUTHORS_BATCH, x.shape[0]) * tokens]
    rate = matmul_rate(rows)
    per_block = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        cand = space.vector().unsqueeze(0)
        fit.block_input(idx)
        with FlopCounterMode(display=False) as fc:
            fit(idx, space, cand)
        flops = fc.get_total_flops()
        wall, cpu = time_eval(lambda i=idx, s=space, c=cand: fit(i, s, c))
        per_block.append({"block": qmodel.blocks[idx].name, "flops_per_eval": flops, "limit_seconds": flops / rate,
                          "seconds_per_eval": wall, "cpu_seconds_per_eval": cpu,
                          "fraction_of_limit": flops / rate / cpu})
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        qmodel.model(x[:AUTHORS_BATCH])
    full = fc.get_total_flops() * x.shape[0] / min(AUTHORS_BATCH, x.shape[0])
    base = [b for r in baseline_runs for b in r["blocks"]]
    base_wall = statistics.median(b["seconds"] / b["evaluations"] for b in base)
    base_cpu = statistics.median(b["cpu_seconds"] / b["evaluations"] for b in base)
    idx = blocks[len(blocks) // 2]
    space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        fit(idx, space, space.vector().unsqueeze(0))
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    matmul = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::addmm", "aten::mm", "aten::bmm",
                                                                 "aten::baddbmm"))
    return {
        "matmul_gflops_per_s": rate / 1e9, "matmul_rows": rows,
        "evolq_per_block": per_block,
        "evolq_limit_seconds_mean": statistics.mean(b["limit_seconds"] for b in per_block),
        "evolq_seconds_per_eval_mean": statistics.mean(b["seconds_per_eval"] for b in per_block),
        "evolq_cpu_seconds_per_eval_mean": statistics.mean(b["cpu_seconds_per_eval"] for b in per_block),
        "baseline": {"flops_per_eval": full, "limit_seconds": full / rate, "seconds_per_eval": base_wall,
                     "cpu_seconds_per_eval": base_cpu, "fraction_of_limit": full / rate / base_cpu},
        "profiled_block": qmodel.blocks[idx].name,
        "profiled_seconds": total / 1e6, "profiled_matmul_share": matmul / total,
        "top_ops": [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:12]],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 5, 9],
                    help="transformer blocks searched (0-based; default evenly spaced, mean suffix 7 blocks + "
                         "head, a little longer than all twelve's 6.5)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=int, nargs="+", default=None,
                    help="instead of the pairs: CPU time of one evaluation per chunk size (max_batch) on each "
                         "searched block, written to results/speed_chunks.json (or --out)")
    ap.add_argument("--out", default=None, help="results/NAME.json (default speed, or speed_chunks with --chunks)")
    args = ap.parse_args()
    setup(args.threads)
    t_all = time.perf_counter()
    arch = "vit_tiny_patch16_224"
    model = load_model(arch)
    xc, _ = load_images(assets_dir() / "imagenet-sample", model_transform(model), "calib", limit=args.calib)
    cfg = EvolQConfig.make(w_bits=args.w_bits, passes=1, cycles=args.cycles, holdout=0.0, seed=args.seed,
                           infonce_batch=min(AUTHORS_BATCH, xc.shape[0]), reuse_fitness=False, progress=False)
    search = cfg.search
    eps = search.eps_for(args.w_bits)
    qmodel = prepare_model(model, xc, cfg.quant, arch=arch)
    blocks = [i for i, b in enumerate(qmodel.blocks) if b.name in {f"blocks.{j}" for j in args.blocks}]
    restrict_blocks(qmodel, blocks)
    start_state = {k: v.clone() for k, v in qmodel.model.state_dict().items()}
    if args.chunks:
        res = {"model": arch, "w_bits": args.w_bits, "calib_images": int(xc.shape[0]),
               "threads": torch.get_num_threads(), "default_max_batch": search.max_batch,
               **chunk_sizes(qmodel, xc, search, blocks, args.chunks)}
        write_json(f"{args.out or 'speed_chunks'}.json", res)
        for b in res["blocks"]:
            print(b["block"], {m: round(v, 3) for m, v in b["cpu_seconds"].items()}, "losses equal:", b["losses_equal"])
        return
    args.out = f"{args.out or 'speed'}.json"

    res = {
        "model": arch, "w_bits": args.w_bits, "a_bits": 8, "preset": "fq-vit", "calib_images": int(xc.shape[0]),
        "passes": 1, "cycles": args.cycles, "scope": SCOPE, "searcher": search.searcher,
        "blocks": [qmodel.blocks[i].name for i in blocks], "seed": args.seed, "threads": torch.get_num_threads(),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "max_batch": search.max_batch, "authors_batch": AUTHORS_BATCH, "evolq_reuse_fitness": False,
        "evolq_file": evolq.__file__, "pairs": [],
    }

    res["loss_check"] = loss_check(qmodel, xc, search, blocks, eps)
    qmodel.model.load_state_dict(start_state)
    write_json(args.out, res)
    print(f"loss check: max abs diff {res['loss_check']['max_abs_diff']:.3g} "
          f"(rel {res['loss_check']['max_rel_diff']:.3g})", flush=True)

    for p in range(args.pairs):
        load0 = os.getloadavg()
        qmodel.model.load_state_dict(start_state)
        base = AuthorsLoop(qmodel, xc, search, eps).run(blocks, args.seed, args.cycles)
        qmodel.model.load_state_dict(start_state)
        ev = run_evolq(qmodel, xc, cfg)
        pair = {"pair": p, "baseline": base, "evolq": ev, "ratio": base["seconds"] / ev["seconds"],
                "cpu_ratio": base["cpu_seconds"] / ev["cpu_seconds"],
                "baseline_seconds_per_eval": base["seconds"] / base["evaluations"],
                "evolq_seconds_per_eval": ev["seconds"] / ev["evaluations"],
                "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())}
        res["pairs"].append(pair)
        ratios = [q["ratio"] for q in res["pairs"]]
        cpu_ratios = [q["cpu_ratio"] for q in res["pairs"]]
        res.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                   cpu_ratio_median=statistics.median(cpu_ratios), cpu_ratio_min=min(cpu_ratios),
                   cpu_ratio_max=max(cpu_ratios))
        write_json(args.out, res)
        print(f"pair {p}: baseline {base['seconds']:.1f} s ({base['evaluations']} evals), evolq {ev['seconds']:.1f} s "
              f"({ev['evaluations']} evals), ratio {pair['ratio']:.2f}x (CPU time {pair['cpu_ratio']:.2f}x), "
              f"load {load0[0]:.2f}", flush=True)

    qmodel.model.load_state_dict(start_state)
    res["profile"] = profile(qmodel, xc, search, blocks, [q["baseline"] for q in res["pairs"]])
    res["equal_evaluations"] = all(q["baseline"]["evaluations"] == q["evolq"]["evaluations"] for q in res["pairs"])
    res["seconds"] = time.perf_counter() - t_all
    write_json(args.out, res)
    pr = res["profile"]
    print(f"ratio median {res['ratio_median']:.2f}x (min {res['ratio_min']:.2f}, max {res['ratio_max']:.2f}) over "
          f"{len(res['pairs'])} pairs (CPU time {res['cpu_ratio_median']:.2f}x); matmul "
          f"{pr['matmul_gflops_per_s']:.1f} GFLOP/s; evolq CPU s per eval {pr['evolq_cpu_seconds_per_eval_mean']:.2f} "
          f"vs limit {pr['evolq_limit_seconds_mean']:.2f}")
    assert res["equal_evaluations"], "baseline and evolq spent different numbers of evaluations"
    assert res["loss_check"]["max_rel_diff"] < 1e-6, "the two fitness paths disagree on the same candidate"


if __name__ == "__main__":
    main()
