"""Per-layer bit allocation (issue 29): the searchers at equal fitness evaluations on one proxy,
each one's chosen allocation built with a real start and scored on the evaluation split, the
uniform allocation at the same size beside them, and the proxy's rank agreement with the final
models.

Every searcher of a seed shares one proxy, its tables and (for those that use it) one
sensitivity measurement, whose evaluations are charged to each of them; the memo is reset
between searchers, so none gets another's evaluations for free. The allocation is chosen by
the hold-out (calibration images kept out of everything); the evaluation split only reports.

    python benchmarks/bit_allocation.py --model vit_tiny_patch16_224 --preset outlier-aware --start gptq \\
        --budget uniform=3 --searchers nsga2,ilp,greedy,random --seeds 0,1,2
    python benchmarks/bit_allocation.py ... --start ofq --searchers nsga2 --seeds 0,1,2 --tag ofq
    python benchmarks/bit_allocation.py ... --spearman 24 --seeds 0      # proxy vs final models

``--budget uniform=B`` is the packed size of every layer at B bits with ``--edge-bits`` on the
first layer and the classifier (the size of the uniform model it is compared with); any
``evolq allocate`` budget (``avg-bits=3.3``, ``size-mb=2.7``) works too. Resumable: finished
runs are kept in the JSON and skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, load_data, setup  # noqa: E402
from evolq.allocation.engine import AllocationEngine  # noqa: E402
from evolq.allocation.plot import plot_fronts  # noqa: E402
from evolq.allocation.setup import budget_cost, genes_to_bits, prepare_allocation, reference_genes  # noqa: E402
from evolq.api import prepare_model  # noqa: E402
from evolq.config import AllocationConfig, QuantConfig  # noqa: E402
from evolq.data import split_calibration  # noqa: E402
from evolq.evaluate import evaluate_qmodel  # noqa: E402
from evolq.export.bench import cpu_info  # noqa: E402
from evolq.io import write_json  # noqa: E402
from evolq.problems.bit_allocation import BitAllocationProblem  # noqa: E402
from evolq.search.allocators import NEEDS_SENSITIVITY  # noqa: E402


def _short(m):
    return {k: round(float(m[k]), 4) for k in ("top1", "top5", "agreement", "kl")}


def uniform_bits(sizes, bits: int, edge: int | None) -> dict:
    layers = sizes.layers
    out = {n: bits for n in layers}
    if edge:
        out[layers[0]] = max(bits, edge)
        out[layers[-1]] = max(bits, edge)
    return out


def resolve_budget(text: str, sizes, edge) -> tuple[str, float, dict | None]:
    """``uniform=B`` -> the size-mb budget of that uniform model (and its allocation)."""
    if text.startswith("uniform="):
        b = int(text.split("=")[1])
        bits = uniform_bits(sizes, b, edge)
        return f"size-mb={sizes.bytes_of_bits(bits) / 1e6:.6f}", b, bits
    return text, None, None


def final_model(base, fit_x, hold_x, quant, bits, xe, ye, fp_logits, arch):
    q = quant if bits is None else dataclasses.replace(quant, layer_bits=bits)
    t0 = time.perf_counter()
    qm = prepare_model(base(), fit_x, q, arch=arch, holdout=hold_x)
    sec = time.perf_counter() - t0
    res, _ = evaluate_qmodel(qm, xe, ye, fp_logits=fp_logits)
    return _short(res["quantized"]), sec


def run_searcher(name, setup_, cfg, limit, costs_name, costs, sens, sens_memo, sens_archive, seed):
    f = setup_.fitness
    f.memo, f._cache = {}, type(f._cache)()
    f._cached = 0
    f.evaluations = f.requests = f.blocks_run = f.blocks_full = 0
    f.seconds = 0.0
    p = BitAllocationProblem(f, costs, limit, budget_cost=costs_name, seed=seed)
    ref = reference_genes(p, cfg.sensitivity)
    eng = AllocationEngine(p, f, searcher=name, popsize=cfg.popsize, evaluations=cfg.evaluations, seed=seed,
                           holdout=setup_.holdout, reference=ref, select=cfg.select)
    uses = name in NEEDS_SENSITIVITY
    if uses and sens is not None:  # the shared measurement, charged to this searcher
        eng.sensitivity = sens
        f.memo.update(sens_memo)
        p.archive.update(sens_archive)
    t0 = time.perf_counter()
    res = eng.run()
    res["wall_seconds"] = time.perf_counter() - t0
    return p, eng, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--preset", default="outlier-aware")
    ap.add_argument("--start", default="gptq")
    ap.add_argument("--start-arg", action="append", default=[], help="KEY=VALUE (JSON values)")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--w-bits", type=int, default=3, help="the regime's strengths follow these bits")
    ap.add_argument("--edge-bits", type=int, default=8)
    ap.add_argument("--menu", default="2,3,4,8")
    ap.add_argument("--budget", default="uniform=3")
    ap.add_argument("--searchers", default="nsga2,ilp,greedy,random")
    ap.add_argument("--evaluations", type=int, default=AllocationConfig.evaluations)
    ap.add_argument("--popsize", type=int, default=AllocationConfig.popsize)
    ap.add_argument("--fitness-images", type=int, default=AllocationConfig.fitness_images)
    ap.add_argument("--front", type=float, default=AllocationConfig.front)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--calib", type=int, default=500)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-final", action="store_true", help="search only (no final models)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform reference model")
    ap.add_argument("--spearman", type=int, default=0, help="final models of N front/archive allocations (seed 0)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bit_allocation.json")
    args = ap.parse_args(argv)
    setup(args.threads)
    out_path = RESULTS / args.out
    data = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    done = {(r["key"], r["seed"]) for r in data["runs"]}
    base_model, xc, xe, ye = load_data(args.model, args.calib, args.eval)
    start_opts = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v for k, _, v in
                  (a.partition("=") for a in args.start_arg)}
    quant = QuantConfig.preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, start=args.start,
                               start_options=start_opts, edge_bits=args.edge_bits or None)
    import copy

    def base():
        return copy.deepcopy(base_model)

    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = AllocationConfig(menu=args.menu, budget="avg-bits=8", evaluations=args.evaluations, popsize=args.popsize,
                               fitness_images=args.fitness_images, front=args.front, seed=seed, progress=False)
        fit_x, hold_x = split_calibration(xc, cfg.holdout, seed)
        t0 = time.perf_counter()
        s = prepare_allocation(base(), fit_x, hold_x, quant, cfg, arch=args.model)
        prep = time.perf_counter() - t0
        budget, ubits, ualloc = resolve_budget(args.budget, s.sizes, args.edge_bits)
        cfg = dataclasses.replace(cfg, budget=budget)
        kind, value = cfg.budget_kind
        costs, cname, limit = budget_cost(kind, value, s.sizes, cfg.front)
        fp_logits = None
        if not args.no_final:
            from evolq.evaluate import predict

            with torch.no_grad():
                fp_logits = predict(base_model.eval(), xe)
        # the shared sensitivity (charged to the searchers that use it)
        sens, sens_memo, sens_archive, sens_sec = None, {}, {}, 0.0
        names = args.searchers.split(",")
        fronts = {}
        if any(n in NEEDS_SENSITIVITY for n in names):
            p0 = BitAllocationProblem(s.fitness, costs, limit, budget_cost=cname, seed=seed)
            t1 = time.perf_counter()
            sens = p0.sensitivity(reference_genes(p0, cfg.sensitivity))
            sens_sec = time.perf_counter() - t1
            sens_memo, sens_archive = dict(s.fitness.memo), dict(p0.archive)
        key_base = f"{args.model}|{args.preset}|{args.start}{args.tag}|{args.budget}|{args.menu}"
        for name in names:
            key = f"{key_base}|{name}"
            if (key, seed) in done:
                print(f"skip {key} seed {seed}")
                continue
            uses = name in NEEDS_SENSITIVITY
            p, eng, res = run_searcher(name, s, cfg, limit, cname, costs, sens if uses else None, sens_memo,
                                       sens_archive, seed)
            if uses and sens is not None:
                res["sensitivity_seconds"] = sens_sec
            ch = res["front"][res["chosen"]]
            genes = torch.tensor(ch["genes"])
            bits = genes_to_bits(s.layers, s.menu, genes)
            row = {"key": key, "seed": seed, "model": args.model, "preset": args.preset, "start": args.start,
                   "tag": args.tag, "searcher": name, "budget": budget, "budget_label": args.budget, "menu": args.menu,
                   "evaluations": res["evaluations"], "sensitivity_evaluations": len(sens_archive) if uses else 0,
                   "generations": res["generations"],
                   "search_seconds": res["wall_seconds"] + (res.get("sensitivity_seconds") or 0.0),
                   "prepare_seconds": prep, "fitness": res["fitness"],
                   "chosen": {k: ch[k] for k in ("loss", "holdout_loss", "size_bytes") if k in ch},
                   "avg_bits": float(s.sizes.avg_bits(genes)[0]), "allocation": bits,
                   "front": [{k: pt[k] for k in ("loss", "size_bytes", "holdout_loss") if k in pt}
                             for pt in res["front"]],
                   "cpu": cpu_info(), "threads": args.threads}
            fronts[name] = row["front"]
            if not args.no_final:
                row["final"], row["final_seconds"] = final_model(base, fit_x, hold_x, quant, bits, xe, ye, fp_logits,
                                                                  args.model)
            data["runs"].append(row)
            write_json(out_path, data, indent=1)
            print(f"{name:>8} seed {seed}: {res['evaluations']} evals, loss {ch['loss']:.4f}, hold-out "
                  f"{ch.get('holdout_loss', float('nan')):.4f}, {row['avg_bits']:.3f} bits, "
                  f"final {row.get('final', {}).get('top1', float('nan')):.1f}", flush=True)
        ukey = f"{key_base}|uniform"
        if ualloc is not None and not args.no_uniform and not args.no_final and (ukey, seed) not in done:
            g = torch.tensor([s.menu.index(ualloc[n]) for n in s.layers])
            final, sec = final_model(base, fit_x, hold_x, quant, ualloc, xe, ye, fp_logits, args.model)
            row = {"key": ukey, "seed": seed, "model": args.model, "preset": args.preset, "start": args.start,
                   "tag": args.tag, "searcher": "uniform", "budget": budget, "budget_label": args.budget,
                   "menu": args.menu, "allocation": ualloc, "avg_bits": float(s.sizes.avg_bits(g)[0]),
                   "chosen": {"loss": float(s.fitness(g[None])[0]), "size_bytes": float(s.sizes.bytes(g)[0]),
                              "holdout_loss": float(s.holdout(g[None])[0])},
                   "final": final, "final_seconds": sec, "cpu": cpu_info(), "threads": args.threads}
            data["runs"].append(row)
            write_json(out_path, data, indent=1)
            print(f" uniform seed {seed}: final {final['top1']:.1f}", flush=True)
        if fronts:
            png = out_path.with_suffix("").as_posix() + f"_{args.model}_seed{seed}{args.tag}.png"
            plot_fronts(fronts, png, budget_bytes=limit if kind == "size-mb" else None,
                        title=f"{args.model} {args.budget} ({args.preset}, seed {seed})")
        if args.spearman and seed == int(args.seeds.split(",")[0]):
            spearman(args, s, data, out_path, base, fit_x, hold_x, quant, xe, ye, fp_logits, seed)


def spearman(args, s, data, out_path, base, fit_x, hold_x, quant, xe, ye, fp_logits, seed):
    """Proxy loss and hold-out KL against the final models' evaluation KL and top-1, over
    ``--spearman`` allocations spread along the last searcher's archive."""
    from scipy.stats import spearmanr

    key = f"spearman|{args.model}|{args.preset}|{args.start}{args.tag}|{args.budget}"
    prev = next((r for r in data.get("spearman", []) if r["key"] == key and r["seed"] == seed), None)
    points = prev["points"] if prev else []
    # candidates: distinct allocations of the memo, spread over the loss range
    memo = sorted(s.fitness.memo.items(), key=lambda kv: kv[1])
    if not memo:
        return
    n = args.spearman
    idx = [round(i * (len(memo) - 1) / max(1, n - 1)) for i in range(n)]
    chosen = [memo[i] for i in dict.fromkeys(idx)]
    for genes, loss in chosen[len(points):]:
        g = torch.tensor(genes)
        bits = genes_to_bits(s.layers, s.menu, g)
        final, sec = final_model(base, fit_x, hold_x, quant, bits, xe, ye, fp_logits, args.model)
        points.append({"loss": loss, "holdout_loss": float(s.holdout(g[None])[0]),
                       "avg_bits": float(s.sizes.avg_bits(g)[0]), "final": final, "final_seconds": sec})
        rec = {"key": key, "seed": seed, "points": points}
        data["spearman"] = [r for r in data.get("spearman", []) if not (r["key"] == key and r["seed"] == seed)]
        if len(points) >= 3:
            for proxy in ("loss", "holdout_loss"):
                for target in ("kl", "top1"):
                    v = spearmanr([p[proxy] for p in points], [p["final"][target] for p in points])
                    rec[f"rho_{proxy}_vs_{target}"] = float(v.statistic)
        data["spearman"].append(rec)
        write_json(out_path, data, indent=1)
        print(f"spearman point {len(points)}: proxy {loss:.4f} final KL {final['kl']:.4f} top-1 {final['top1']:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
