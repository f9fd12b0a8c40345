"""Searchers at equal fitness-evaluation budgets on ViT-Tiny (real weights): tournament (the
paper's), CMA-ES, SNES and PGPE each get ``--budget`` evaluations per block and pass
(population searchers: whole generations of ``--popsize``) over the last ``--last`` attention
blocks; the fitness-vs-evaluations curve (PNG), the final fitness and evaluation-split metrics."""
from __future__ import annotations

from evolq import EvolQConfig
from evolq.evaluate import metrics, predict

from ..common import CurveRecorder, plot, start_and_search
from ..report import Col, Image, Section, Table, f2
from ..runner import Suite, register


def run(run):
    a = run.args
    d = run.data()
    n_fit = d.xc.shape[0] - int(round(d.xc.shape[0] * 0.1))
    fp_logits = predict(d.base, d.xe, 100)
    rows, start = [], None
    for name in a.searchers:
        cfg = EvolQConfig.make(w_bits=a.bits, a_bits=8, passes=a.passes, cycles=a.budget, popsize=a.popsize,
                               searcher=name, seed=a.seeds[0], infonce_batch=min(100, n_fit), progress=False)
        rec = CurveRecorder()
        r = start_and_search(d.base, d.xc, d.xe, d.ye, cfg, a.model, fp_logits, last=a.last, subscribers=[rec])
        start, rep = start or r["start"], r["report"]
        rows.append({"searcher": name, "evaluations": rep["evaluations"], "search_seconds": r["search_s"],
                     "start_fitness": rep["blocks"][0]["start_fitness"],
                     "final_fitness": rep["blocks"][-1]["final_fitness"], "passes": rep["passes"],
                     "final": r["final"], "curve": {"evaluations": rec.x, "fitness": rec.y}})
        print(f"{name:<11} {rep['evaluations']:4d} evals, top1 {r['final']['top1']:.2f}", flush=True)
    out = {"benchmark": "searchers", "model": a.model, "w_bits": a.bits, "a_bits": 8,
           "calib_images": int(d.xc.shape[0]), "eval_images": int(d.xe.shape[0]), "budget_per_block": a.budget,
           "popsize": a.popsize, "passes": a.passes, "blocks": r["blocks"], "seed": a.seeds[0],
           "fp32": metrics(fp_logits, d.ye), "start": start, "runs": rows}
    run.save(out)
    plot(run.path.with_suffix(".png"), [("fitness evaluations", "best infoNCE of the block being searched",
                                         [(f"{r['searcher']} (top-1 {r['final']['top1']:.1f})",
                                           r["curve"]["evaluations"], r["curve"]["fitness"],
                                           {"drawstyle": "steps-post"}) for r in rows])],
         f"ViT-Tiny W{a.bits}A8, {a.budget} evals/block, {len(out['blocks'])} blocks")


register(Suite(
    name="searchers", doc=__doc__, run=run, order=150,
    what="tournament vs CMA-ES vs SNES vs PGPE at equal budgets (last blocks)",
    common={"model": "vit_tiny_patch16_224", "calib": 100, "eval": 200, "seeds": [0], "threads": 1},
    args=[(("--bits",), {"type": int, "default": 3}),
          (("--searchers",), {"nargs": "+", "default": ["tournament", "cmaes", "snes", "pgpe"]}),
          (("--budget",), {"type": int, "default": 24, "help": "fitness evaluations per block and pass"}),
          (("--popsize",), {"type": int, "default": 8, "help": "generation size of cmaes/snes/pgpe"}),
          (("--passes",), {"type": int, "default": 1}),
          (("--last",), {"type": int, "default": 4, "help": "search only the last N blocks (0: all)"})],
    results={"searchers": "--bits 3 --budget 16 --popsize 8 --last 3 --calib 100 --eval 200"}, stale=("searchers",),
    smoke={"calib": 24, "eval": 8, "budget": 2, "popsize": 2, "last": 1, "searchers": ["tournament", "snes"]},
    report=[Section("searchers", [
        "## Searchers at equal budgets",
        lambda d: f"`benchmarks/suites/searchers.py`: {d['model']} W{d['w_bits']}A8, {d['budget_per_block']} "
                  f"fitness evaluations per block and pass (population searchers: generations of {d['popsize']}), "
                  f"{d['passes']} pass(es) over {', '.join(d['blocks'])}; {d['calib_images']} calibration / "
                  f"{d['eval_images']} evaluation images. FP32 top-1 {f2(d['fp32']['top1'])}, start "
                  f"{f2(d['start']['top1'])}.",
        Image("searchers.png", "fitness vs evaluations"),
        Table([Col("searcher", "searcher"), Col("evals", "evaluations"),
               Col("start fitness", "start_fitness", "{:.4f}"),
               Col("final fitness (last block)", "final_fitness", "{:.4f}"), Col("top-1", "final.top1", f2),
               Col("agreement", "final.agreement", f2), Col("KL", "final.kl", "{:.4f}"),
               Col("seconds", "search_seconds", "{:.0f}")])])]))
