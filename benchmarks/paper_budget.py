"""Evol-Q at the paper's budget, honestly: 10 passes x 3 cycles over every block, all
500 calibration-pool images (10 % of them the hold-out), and what selecting the best
checkpoint on the evaluation split (the authors' code picks on ImageNet val after every
block) would report instead.

Runs (``--runs``, default all):
* ``vit3-fq``: ViT-Tiny W3A8, FQ-ViT start point, seeds 0-2;
* ``vit3-oa``: ViT-Tiny W3A8, outlier-aware start point, seeds 0-2;
* ``vit4-oa``: ViT-Tiny W4A8, outlier-aware, seed 0;
* ``eff44``: EfficientNet-Lite0 W4A4, seed 0;
* ``searchers``: ViT-Tiny W3A8 outlier-aware seed 0 with CMA-ES, SNES, PGPE and the batched
  tournament at (about) the tournament's 3 evaluations per block and pass: one generation
  of 3 (PGPE: 4, it needs an even population), the batched tournament 3 children at once;
* ``vit3-ofq``: ViT-Tiny W3A8 outlier-aware, edge bits 8, the ``ofq`` start (today's
  ``OFQOptions`` defaults, seeded by the run's seed), seed 0;
* ``vit4-deploy``: ViT-Tiny W4A8 in the deploy regime, edge bits 8, GPTQ start on the
  default (asymmetric) 4-bit grid, seed 0.

After every block the evaluation split is scored (top-1, agreement, KL) and after every
pass the calibration loss and the hold-out score are recorded. Reported per run: the
*honest* result (the final model, passes kept or reverted by the hold-out only) and the
*test-selected* one (the block checkpoint, start included, with the best evaluation
top-1): their difference is the inflation that selection on test data adds.

    python benchmarks/paper_budget.py --device cuda --max-batch 4096   # about 1 min a run on one H100
    python benchmarks/paper_budget.py --runs vit3-fq --seeds 0         # tens of minutes on 2 CPU cores

Resumable: finished runs in benchmarks/results/paper_budget.json are kept. With ``--work DIR``
an unfinished run resumes too: its start model (``evolq.io.save_quantized``), the search's
checkpoint after every block (``quantize_model(checkpoint_dir=..., resume=True)``) and the
per-block evaluation points live in ``DIR/<run>_s<seed>_<searcher>_...``, and a rerun of the
same command continues from the last finished block (the folder is removed once the run is in
the JSON):

    python benchmarks/paper_budget.py --runs vit3-ofq --threads 2 --work /tmp/paper_budget_work
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, load_data, write_json

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.evaluate import evaluate_qmodel
from evolq.io import load_quantized, save_quantized

VIT, EFF = "vit_tiny_patch16_224", "tf_efficientnet_lite0"
RUNS = {  # name -> (model, w_bits, a_bits, preset, seeds, searchers[, other QuantConfig fields])
    "vit3-fq": (VIT, 3, 8, "fq-vit", (0, 1, 2), ("tournament",)),
    "vit3-oa": (VIT, 3, 8, "outlier-aware", (0, 1, 2), ("tournament",)),
    "vit4-oa": (VIT, 4, 8, "outlier-aware", (0,), ("tournament",)),
    "eff44": (EFF, 4, 4, "fq-vit", (0,), ("tournament",)),
    "searchers": (VIT, 3, 8, "outlier-aware", (0,), ("cmaes", "snes", "pgpe", "batched-tournament")),
    "vit3-ofq": (VIT, 3, 8, "outlier-aware", (0,), ("tournament",), {"edge_bits": 8, "start": "ofq"}),
    "vit4-deploy": (VIT, 4, 8, "deploy", (0,), ("tournament",), {"edge_bits": 8, "start": "gptq"}),
}
POPSIZE = {"cmaes": 3, "snes": 3, "pgpe": 4, "batched-tournament": 3}


class Tracker:
    """A subscriber: evaluation-split metrics after every block, calibration loss and
    hold-out score after every pass."""

    def __init__(self, xe, ye, fp_logits, path: Path | None = None):
        self.xe, self.ye, self.fp, self.path = xe, ye, fp_logits, path
        self.blocks, self.passes, self.evaluations = [], [], 0
        if path is not None and path.exists():  # a resumed run: the points recorded before the interrupt
            saved = json.loads(path.read_text())
            self.blocks, self.passes, self.evaluations = saved["blocks"], saved["passes"], saved["evaluations"]

    def subscribe(self, engine):
        self.engine = engine
        engine.run_start_hook.append(self.run_start)
        engine.block_end_hook.append(self.block_end)
        engine.pass_end_hook.append(self.pass_end)

    def run_start(self, state):
        if not self.blocks:
            self.blocks.append(self.point("start", None))
        # the engine snapshots before it fires a hook: an interrupt in between leaves the
        # checkpoint one point ahead of this record, and the restored model is that point's
        elif len(self.passes) < len(state["passes"]):
            self.pass_end(state["passes"][-1])
        elif len(self.blocks) - 1 < len(state["blocks"]):
            self.block_end(state["blocks"][-1])
        self.save()

    def save(self):
        if self.path is not None:
            write_json(self.path, {"blocks": self.blocks, "passes": self.passes, "evaluations": self.evaluations})

    def point(self, block, rec):
        q = evaluate_qmodel(self.engine.qmodel, self.xe, self.ye, fp_logits=self.fp)[0]["quantized"]
        return {"block": block, "pass": rec["pass"] if rec else -1, "evaluations": self.evaluations,
                "fitness": rec["final_fitness"] if rec else None,
                **{k: q[k] for k in ("top1", "agreement", "kl")}}

    def block_end(self, rec):
        self.evaluations += rec["evaluations"]
        self.blocks.append(self.point(rec["block"], rec))
        self.save()

    def pass_end(self, rec):
        q = evaluate_qmodel(self.engine.qmodel, self.xe, self.ye, fp_logits=self.fp)[0]["quantized"]
        self.passes.append({**rec, "evaluations": self.evaluations,
                            "calib_loss": self.blocks[-1]["fitness"] if rec["kept"] else None,
                            **{k: q[k] for k in ("top1", "agreement", "kl")}})
        self.save()


def work_dir(args, name, seed, searcher) -> Path | None:
    """Where an unfinished run keeps its resume state (``--work``), named by its settings."""
    if not args.work:
        return None
    return Path(args.work) / f"{name}_s{seed}_{searcher}_p{args.passes}c{args.cycles}_calib{args.calib}_eval{args.eval}"


def run_one(name, model_name, bits, a_bits, preset, seed, searcher, data, args, quant=None):
    base, xc, xe, ye, fp = data
    kw = dict(popsize=POPSIZE[searcher]) if searcher in POPSIZE else {}
    quant = dict(quant or {})
    if quant.get("start") == "ofq":
        quant["start_options"] = {"seed": seed, "device": args.device}
    elif quant.get("start") == "gptq":
        quant["start_options"] = {"device": args.device}
    config = EvolQConfig.make(preset=preset, w_bits=bits, a_bits=a_bits, passes=args.passes, cycles=args.cycles,
                              seed=seed, searcher=searcher, holdout=0.1, max_batch=args.max_batch,
                              infonce_batch=min(100, xc.shape[0] - round(0.1 * xc.shape[0])),
                              device=args.device, progress=False, **kw, **quant)
    work = work_dir(args, name, seed, searcher)
    t0 = time.perf_counter()
    if work is not None and (work / "start" / "evolq.json").exists():  # a resumed run: the same start model
        qmodel = load_quantized(work / "start", copy.deepcopy(base))
        start_seconds = json.loads((work / "start_seconds.json").read_text())["seconds"]
    else:
        qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, config.search), config.quant, arch=model_name)
        start_seconds = time.perf_counter() - t0
        if work is not None:
            save_quantized(qmodel, work / "start")
            write_json(work / "start_seconds.json", {"seconds": start_seconds})
    qmodel.model.to(args.device)
    tracker = Tracker(xe, ye, fp, work / "tracker.json" if work is not None else None)
    qmodel, rep = quantize_model(qmodel, xc, config, subscribers=[tracker],
                                 checkpoint_dir=work / "search" if work is not None else None, resume=work is not None)
    final = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp)[0]["quantized"]
    best = max(tracker.blocks, key=lambda p: (p["top1"], -p["evaluations"]))
    return {"run": name, "model": model_name, "w_bits": bits, "a_bits": a_bits, "preset": preset, "seed": seed,
            "quant": {k: v for k, v in quant.items() if k != "start_options"}, "start_seconds": start_seconds,
            "searcher": searcher, "popsize": kw.get("popsize"), "start": {k: tracker.blocks[0][k] for k in
                                                                          ("top1", "agreement", "kl")},
            "honest": {k: final[k] for k in ("top1", "agreement", "kl")},
            "test_selected": {k: best[k] for k in ("top1", "agreement", "kl", "block", "pass", "evaluations")},
            "inflation_top1": best["top1"] - final["top1"], "evaluations": rep["evaluations"],
            "passes": tracker.passes, "blocks": tracker.blocks, "kept": [p["kept"] for p in rep["passes"]],
            "seconds": start_seconds + rep["search_seconds"] if work is not None else time.perf_counter() - t0,
            "search_seconds": rep["search_seconds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="restrict every run to these seeds")
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--calib", type=int, default=500)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="paper_budget.json")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new runs after this many seconds")
    ap.add_argument("--work", default="", help="folder for each unfinished run's start model, search checkpoint "
                    "and evaluation points: a rerun continues an interrupted run from its last finished block")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / args.out
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    done = {(r["run"], r["seed"], r["searcher"]) for r in doc["runs"] if r["evaluations"] > 0}
    t_all, cache = time.perf_counter(), {}
    device = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu")
    for name in args.runs:
        model_name, bits, a_bits, preset, seeds, searchers, *quant = RUNS[name]
        for seed in (s for s in seeds if args.seeds is None or s in args.seeds):
            for searcher in searchers:
                if (name, seed, searcher) in done:
                    continue
                if args.budget_s and time.perf_counter() - t_all > args.budget_s:
                    print("time budget spent; rerun to continue", flush=True)
                    return
                if model_name not in cache:
                    base, xc, xe, ye = load_data(model_name, args.calib, args.eval)
                    xe, ye = xe.to(args.device), ye.to(args.device)
                    with torch.no_grad():
                        fp = torch.cat([base.to(args.device)(xe[i:i + 100]).float() for i in range(0, len(xe), 100)])
                    cache[model_name] = (base.cpu(), xc, xe, ye, fp)
                r = run_one(name, model_name, bits, a_bits, preset, seed, searcher, cache[model_name], args,
                            quant[0] if quant else None)
                r["device"], r["max_batch"] = device, args.max_batch
                if not args.device.startswith("cuda"):
                    from evolq.export.bench import cpu_info

                    r["cpu"] = cpu_info()
                doc["runs"] = [x for x in doc["runs"] if (x["run"], x["seed"], x["searcher"]) != (name, seed, searcher)]
                doc["runs"].append(r)
                doc["settings"] = {"passes": args.passes, "cycles": args.cycles, "calib": args.calib,
                                   "eval": args.eval, "holdout": 0.1}
                write_json(args.out, doc)
                if args.work:  # the run is in the JSON: its resume state is no longer needed
                    shutil.rmtree(work_dir(args, name, seed, searcher), ignore_errors=True)
                print(f"{name:<10} s{seed} {searcher:<19} start {r['start']['top1']:5.1f}  honest "
                      f"{r['honest']['top1']:5.1f} (KL {r['honest']['kl']:.3f})  test-selected "
                      f"{r['test_selected']['top1']:5.1f}  inflation {r['inflation_top1']:+.1f}  kept "
                      f"{sum(r['kept'])}/{len(r['kept'])}  {r['evaluations']} evals  {r['seconds']:.0f} s",
                      flush=True)


if __name__ == "__main__":
    main()
