"""Accuracy table: FP32 / start point / Evol-Q at W8A8, W4A8 and W3A8 for ViT-Tiny and
EfficientNet-Lite0 (assets), seeds 0, 1, 2, reported as mean and spread.

A seed draws the calibration images (``--calib`` of the 500-image calibration pool,
even labels) and seeds the search; so the spread covers both the calibration sample
and the search. Metrics are on the evaluation split (odd labels, first ``--eval``
images), which neither calibration nor search sees. Nothing is selected on it.

    python benchmarks/accuracy.py                               # full table (see README for time)
    python benchmarks/accuracy.py --models vit_tiny_patch16_224 --bits 4 --seeds 0 --eval 100

Rows are written to the JSON as they finish; running the same command again skips
the rows already there (same settings), so an interrupted run loses at most one row.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import load_data, write_json  # noqa: E402  (benchmarks/_common.py)

from evolq import EvolQConfig, prepare_model, quantize_model  # noqa: E402
from evolq.data import fitness_part  # noqa: E402
from evolq.evaluate import metrics, predict  # noqa: E402

MODELS = ["vit_tiny_patch16_224", "tf_efficientnet_lite0"]
METRICS = ("top1", "top5", "agreement", "kl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3], help="weight bits (activations 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=128, help="calibration images drawn per seed from the pool of 500")
    p.add_argument("--eval", type=int, default=500, help="evaluation images (first N of the split)")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--searcher", default="tournament")
    p.add_argument("--loss", default="infonce")
    p.add_argument("--infonce-batch", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--preset", default="fq-vit", choices=("fq-vit", "outlier-aware"),
                   help="start-point regime (default fq-vit, the authors')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    return p.parse_args(argv)



def draw_calibration(pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images of the pool, drawn without replacement by ``seed``."""
    g = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randperm(pool.shape[0], generator=g)[:n]
    return pool[idx.sort().values]


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation, min, max) over seeds, per model, bits and stage."""
    out = []
    keys = sorted({(r["model"], r["w_bits"]) for r in runs}, key=lambda k: (k[0], -k[1]))
    for model, bits in keys:
        rs = [r for r in runs if r["model"] == model and r["w_bits"] == bits]
        for stage in ("start", "final"):
            row = {"model": model, "w_bits": bits, "a_bits": 8, "stage": stage, "seeds": [r["seed"] for r in rs]}
            for k in METRICS:
                v = [r[stage][k] for r in rs]
                row[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "min": min(v), "max": max(v)}
            out.append(row)
    return out


def print_table(result: dict) -> None:
    print(f"\nEvaluation split: {result['n_eval']} images. Mean ± sample std over seeds "
          f"{result['settings']['seeds']}; {result['settings']['calib']} calibration images per seed; "
          f"search {result['settings']['passes']} pass(es) x {result['settings']['cycles']} cycles, "
          f"{result['settings']['searcher']}, {result['settings']['loss']}; start point: "
          f"{result['settings'].get('preset', 'fq-vit')}")
    head = f"{'model':<24}{'config':<14}{'top1':>14}{'agree':>14}{'KL':>18}"
    print(head)
    print("-" * len(head))
    for model, fp in result["fp32"].items():
        print(f"{model:<24}{'FP32':<14}{fp['top1']:>14.1f}{100.0:>14.1f}{0.0:>18.4f}")
        for row in result["summary"]:
            if row["model"] != model:
                continue
            label = f"W{row['w_bits']}A8 {'start' if row['stage'] == 'start' else 'Evol-Q'}"
            t, a, k = row["top1"], row["agreement"], row["kl"]
            print(f"{'':<24}{label:<14}{t['mean']:>8.1f} ±{t['std']:>4.1f}{a['mean']:>8.1f} ±{a['std']:>4.1f}"
                  f"{k['mean']:>10.4f} ±{k['std']:>6.4f}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("calib", "eval", "passes", "cycles", "searcher", "loss",
                                               "infonce_batch", "holdout", "preset")}
    result = {"benchmark": "accuracy", "settings": dict(settings, seeds=args.seeds, bits=args.bits),
              "split": "calibration: --calib images drawn per seed from the pool (even labels, first 500); "
                       "evaluation: odd labels, first n_eval",
              "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                      "cpus": os.cpu_count()},
              "fp32": {}, "runs": []}
    if out.exists():  # resume: keep finished rows that were made with the same settings
        old = json.loads(out.read_text())
        old_settings = {"preset": "fq-vit", **old.get("settings", {})}
        if all(old_settings.get(k) == v for k, v in settings.items()):
            result["runs"] = old.get("runs", [])
            result["fp32"] = old.get("fp32", {})
            print(f"resuming: {len(result['runs'])} finished row(s) in {out}")
    for model_name in args.models:
        todo = [(b, s) for b in args.bits for s in args.seeds
                if not any(r["model"] == model_name and r["w_bits"] == b and r["seed"] == s for r in result["runs"])]
        if not todo:
            continue
        base, pool, xe, ye = load_data(model_name, 500, args.eval)  # the whole calibration pool
        result["n_eval"] = int(xe.shape[0])
        fp_logits = predict(base, xe, 50)
        result["fp32"][model_name] = metrics(fp_logits, ye)
        print(f"{model_name}: FP32 top-1 {result['fp32'][model_name]['top1']:.1f} on {xe.shape[0]} images",
              flush=True)
        for bits, seed in todo:
            xc = draw_calibration(pool, args.calib, seed)
            cfg = EvolQConfig.make(preset=args.preset, w_bits=bits, a_bits=8, passes=args.passes,
                                   cycles=args.cycles,
                                   searcher=args.searcher, loss=args.loss, infonce_batch=args.infonce_batch,
                                   holdout=args.holdout, seed=seed, progress=False)
            t = time.time()
            qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, cfg.search), cfg.quant, arch=model_name)
            calib_s = time.time() - t
            start = metrics(predict(qmodel.model, xe, 50), ye, fp_logits)
            qmodel, rep = quantize_model(qmodel, xc, cfg)
            final = metrics(predict(qmodel.model, xe, 50), ye, fp_logits)
            row = {"model": model_name, "w_bits": bits, "a_bits": 8, "seed": seed, "quant": cfg.to_dict()["quant"],
                   "start": start,
                   "final": final, "evaluations": rep["evaluations"], "search_seconds": rep["search_seconds"],
                   "calib_seconds": calib_s, "passes_kept": [p["kept"] for p in rep["passes"]]}
            result["runs"].append(row)
            result["summary"] = summarize(result["runs"])
            write_json(out, result)
            print(f"  W{bits}A8 seed {seed}: top-1 {start['top1']:.1f} -> {final['top1']:.1f}, agreement "
                  f"{start['agreement']:.1f} -> {final['agreement']:.1f}, KL {start['kl']:.4f} -> {final['kl']:.4f} "
                  f"({rep['evaluations']} evaluations, search {rep['search_seconds']:.0f}s)", flush=True)
            del qmodel
    result["summary"] = summarize(result["runs"])
    result["total_s_this_run"] = time.time() - t0
    write_json(out, result)
    print_table(result)
    print(f"\nwrote {out} ({result['total_s_this_run']:.0f}s this run)")
    return result


if __name__ == "__main__":
    main()
