"""Speed: evolq's cached, batched fitness vs a straightforward re-implementation of
the authors' loop (Algorithm 1 + 2: every fitness evaluation runs the full quantized
model and the full-precision model on every calibration batch, one candidate at a
time, and the start of every block is evaluated again).

Both run the same tournament schedule at the same seed on the same start point; the
script asserts the same final scales and prints the wall-time ratio.

    python benchmarks/speed.py --calib 100 --passes 1 --cycles 3
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import assets_dir, fitness_part, load_images
from evolq.engine import block_seed
from evolq.losses import infonce
from evolq.models import load_model, model_transform
from evolq.qnn.scales import ScaleSpace


@torch.no_grad()
def naive_fitness(qmodel, space, vec, x, batch, temperature):
    """Algorithm 2 as written: quantized and full-precision forward per batch."""
    space.write(vec)
    losses = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        p = qmodel.model(xb)
        qmodel.set_quant_enabled(False)
        o = qmodel.model(xb)
        qmodel.set_quant_enabled(True)
        losses.append(infonce(p.unsqueeze(0), o, batch_size=batch, temperature=temperature)[0])
    return float(torch.stack(losses).mean())


def naive_search(qmodel, x, scope, passes, cycles, k, s, eps, seed, batch, temperature):
    order = [i for i, b in enumerate(qmodel.blocks) if b.scopes.get(scope)][::-1]
    evals = 0
    for p in range(passes):
        for idx in order:
            space = ScaleSpace(qmodel.blocks[idx].searched(scope))
            gen = torch.Generator().manual_seed(block_seed(seed, p, idx))
            start = space.vector()
            f0 = naive_fitness(qmodel, space, start, x, batch, temperature)
            evals += 1
            pop = [(start.clone(), f0, age) for age in range(k)]
            nxt = k
            for _ in range(cycles):
                fs = torch.tensor([m[1] for m in pop], dtype=torch.float64)
                pick = torch.randint(0, len(pop), (s,), generator=gen)
                parent = pop[int(pick[torch.argmin(fs[pick])])][0]
                noise = (torch.rand(parent.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
                child = (parent.double() + noise).abs().float()
                pop.append((child, naive_fitness(qmodel, space, child, x, batch, temperature), nxt))
                evals += 1
                nxt += 1
                worst = max(m[1] for m in pop)
                drop = min((m[2], j) for j, m in enumerate(pop) if m[1] == worst)[1]
                pop.pop(drop)
            best = min(pop, key=lambda m: (m[1], m[2]))
            space.write(best[0])
    return evals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = "vit_tiny_patch16_224"
    model = load_model(arch)
    xc, _ = load_images(assets_dir() / "imagenet-sample", model_transform(model), "calib", limit=args.calib)
    batch = min(100, xc.shape[0])
    cfg = EvolQConfig.make(w_bits=args.w_bits, passes=args.passes, cycles=args.cycles, holdout=0.0, seed=args.seed,
                           infonce_batch=batch, progress=False)
    qmodel = prepare_model(model, fitness_part(xc, cfg.search), cfg.quant, arch=arch)
    start_state = {k: v.clone() for k, v in qmodel.model.state_dict().items()}
    eps = cfg.search.eps_for(args.w_bits)
    spaces = [ScaleSpace(b.searched("attn-weights")) for b in qmodel.blocks if b.scopes.get("attn-weights")]

    t0 = time.perf_counter()
    naive_evals = naive_search(qmodel, xc, "attn-weights", args.passes, args.cycles, cfg.search.population,
                               cfg.search.samples, eps, args.seed, batch, cfg.search.temperature)
    t_naive = time.perf_counter() - t0
    naive_scales = torch.cat([sp.vector() for sp in spaces])

    qmodel.model.load_state_dict(start_state)
    t0 = time.perf_counter()
    qmodel, rep = quantize_model(qmodel, xc, cfg)
    t_evolq = time.perf_counter() - t0
    evolq_scales = torch.cat([sp.vector() for sp in spaces])
    start_scales = torch.cat([start_state[f"{n}.scale"] for sp in spaces for n in sp.names])

    same = torch.equal(naive_scales, evolq_scales)
    res = {
        "model": arch, "w_bits": args.w_bits, "calib_images": int(xc.shape[0]), "passes": args.passes,
        "cycles": args.cycles, "threads": torch.get_num_threads(), "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "naive": {"seconds": t_naive, "evaluations": naive_evals, "seconds_per_pass": t_naive / args.passes},
        "evolq": {"seconds": t_evolq, "evaluations": rep["evaluations"], "seconds_per_pass": t_evolq / args.passes},
        "ratio": t_naive / t_evolq,
        "same_final_scales": same,
        "max_abs_scale_diff": float((naive_scales - evolq_scales).abs().max()),
        "scales_changed": int((evolq_scales != start_scales).sum()),
    }
    print(f"{'':<8}{'seconds':>10}{'evals':>8}{'s/pass':>10}")
    for k in ("naive", "evolq"):
        print(f"{k:<8}{res[k]['seconds']:10.1f}{res[k]['evaluations']:8d}{res[k]['seconds_per_pass']:10.1f}")
    print(f"ratio naive/evolq: {res['ratio']:.2f}x; same final scales: {same} "
          f"(max diff {res['max_abs_scale_diff']:.3g}; {res['scales_changed']} of {len(evolq_scales)} scales moved)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    assert same, "naive and evolq ended with different scales"


if __name__ == "__main__":
    main()
