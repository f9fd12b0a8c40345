"""Accuracy over seeds: FP32 / start point / Evol-Q at W8A8, W4A8 and W3A8 for ViT-Tiny and
EfficientNet-Lite0, seeds 0, 1, 2, reported as mean and spread. A seed draws the calibration
images (``--calib`` of the 500-image pool) and seeds the search, so the spread covers both;
metrics are on the evaluation split, which neither calibration nor search sees. Resumable:
rows already in the file (same settings) are skipped."""
from __future__ import annotations

import statistics

import torch

from evolq import EvolQConfig
from evolq.evaluate import metrics, predict

from ..common import start_and_search
from ..report import Col, Section, Table, f2, ms
from ..runner import Suite, register
from .search import PAPER_DEIT_T

METRICS = ("top1", "top5", "agreement", "kl")
SETTINGS = ("calib", "eval", "passes", "cycles", "searcher", "loss", "infonce_batch", "holdout", "preset")


def draw_calibration(pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images of the pool, drawn without replacement by ``seed``."""
    idx = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(1000 + seed))[:n]
    return pool[idx.sort().values]


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation, min, max) over seeds, per model, bits and stage."""
    out = []
    for model, bits in sorted({(r["model"], r["w_bits"]) for r in runs}, key=lambda k: (k[0], -k[1])):
        rs = [r for r in runs if r["model"] == model and r["w_bits"] == bits]
        for stage in ("start", "final"):
            row = {"model": model, "w_bits": bits, "a_bits": 8, "stage": stage, "seeds": [r["seed"] for r in rs]}
            for k in METRICS:
                v = [r[stage][k] for r in rs]
                row[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "min": min(v), "max": max(v)}
            out.append(row)
    return out


def run(run):
    a = run.args
    settings = {k: getattr(a, k) for k in SETTINGS}
    old = run.doc
    doc = {"benchmark": "accuracy", "settings": dict(settings, seeds=a.seeds, bits=a.bits),
           "split": "calibration: --calib images drawn per seed from the pool (even labels, first 500); "
                    "evaluation: odd labels, first n_eval", "fp32": {}, "runs": []}
    if all({"preset": "fq-vit", **old.get("settings", {})}.get(k) == v for k, v in settings.items()):
        doc["runs"], doc["fp32"] = old.get("runs", []), old.get("fp32", {})  # resume: the finished rows
    run.doc = {**old, **doc}
    for model in a.models:
        todo = [(b, s) for b in a.bits for s in a.seeds
                if not any(r["model"] == model and r["w_bits"] == b and r["seed"] == s for r in doc["runs"])]
        if not todo:
            continue
        d = run.data(model, calib=500)  # the whole calibration pool
        run.doc["n_eval"] = int(d.xe.shape[0])
        fp_logits = predict(d.base, d.xe, 50)
        run.doc["fp32"][model] = metrics(fp_logits, d.ye)
        for bits, seed in todo:
            xc = draw_calibration(d.xc, a.calib, seed)
            cfg = EvolQConfig.make(preset=a.preset, w_bits=bits, a_bits=8, passes=a.passes, cycles=a.cycles,
                                   searcher=a.searcher, loss=a.loss, infonce_batch=a.infonce_batch,
                                   holdout=a.holdout, seed=seed, progress=False)
            r = start_and_search(d.base, xc, d.xe, d.ye, cfg, model, fp_logits)
            rep = r["report"]
            run.doc["runs"].append({"model": model, "w_bits": bits, "a_bits": 8, "seed": seed,
                                    "quant": cfg.to_dict()["quant"], "start": r["start"], "final": r["final"],
                                    "evaluations": rep["evaluations"], "search_seconds": rep["search_seconds"],
                                    "calib_seconds": r["calib_s"], "passes_kept": [p["kept"] for p in rep["passes"]]})
            run.doc["summary"] = summarize(run.doc["runs"])
            run.save()
            print(f"  {model} W{bits}A8 seed {seed}: top-1 {r['start']['top1']:.1f} -> {r['final']['top1']:.1f}",
                  flush=True)


def summary_rows(d):
    rows = []
    for model, fp in d["fp32"].items():
        rows.append({"model": model, "bits": "FP32", "stage": "", "fp": fp})
        rows += [{**r, "model": "", "bits": f"W{r['w_bits']}A{r['a_bits']}",
                  "stage": "start" if r["stage"] == "start" else "Evol-Q"} for r in d["summary"] if r["model"] == model]
    return rows


def delta_rows(d):
    rows = []
    for model in d["fp32"]:
        for bits in sorted({r["w_bits"] for r in d["runs"] if r["model"] == model}, reverse=True):
            rs = [r for r in d["runs"] if r["model"] == model and r["w_bits"] == bits]
            dt = [r["final"]["top1"] - r["start"]["top1"] for r in rs]
            paper = PAPER_DEIT_T.get(bits)
            rows.append({"model": model, "bits": f"W{bits}A8", "dt": dt, "evals": rs[0]["evaluations"],
                         "paper": f"{paper[1] - paper[0]:+.2f}" if paper else "-",
                         "kept": ", ".join("/".join("kept" if k else "rolled back" for k in r["passes_kept"]) or "-"
                                           for r in rs)})
    return rows


def stat_col(head, key, digits=1):
    return Col(head, lambda r: ms(r[key], digits) if "fp" not in r else
               {"top1": f2(r["fp"]["top1"]), "agreement": "100", "kl": "0"}[key])


register(Suite(
    name="accuracy", doc=__doc__, run=run, order=90, resume=True, out="accuracy",
    what="FP32 / start / Evol-Q for ViT-Tiny and EfficientNet-Lite0, seeds 0-2",
    common={"calib": 128, "eval": 500, "seeds": [0, 1, 2], "threads": 1},
    args=[(("--models",), {"nargs": "+", "default": ["vit_tiny_patch16_224", "tf_efficientnet_lite0"]}),
          (("--bits",), {"type": int, "nargs": "+", "default": [8, 4, 3], "help": "weight bits (activations 8)"}),
          (("--passes",), {"type": int, "default": 1}), (("--cycles",), {"type": int, "default": 3}),
          (("--searcher",), {"default": "tournament"}), (("--loss",), {"default": "infonce"}),
          (("--infonce-batch",), {"type": int, "default": 64}), (("--holdout",), {"type": float, "default": 0.2}),
          (("--preset",), {"default": "fq-vit", "choices": ("fq-vit", "outlier-aware")})],
    results={"accuracy": "", "accuracy_outlier-aware": "--preset outlier-aware --out accuracy_outlier-aware"},
    stale=("accuracy", "accuracy_outlier-aware"),
    smoke={"models": ["vit_tiny_patch16_224"], "bits": [4], "seeds": [0], "calib": 24, "eval": 16, "cycles": 1,
           "infonce_batch": 8},
    report=[Section("accuracy|accuracy_outlier-aware", when=lambda d: bool(d.get("summary")), blocks=[
        "## Accuracy over seeds (`{file}.json`)",
        lambda d: f"`benchmarks/suites/accuracy.py`: start point `{d['settings'].get('preset', 'fq-vit')}`; per "
                  f"seed, {d['settings']['calib']} calibration images drawn from the 500-image pool "
                  f"({d['settings']['holdout']:.0%} held out to keep or roll back a pass) and the search seeded; "
                  f"Evol-Q {d['settings']['passes']} pass(es) x {d['settings']['cycles']} cycles per block, "
                  f"{d['settings']['searcher']}, {d['settings']['loss']}; {d['n_eval']} evaluation images. Mean ± "
                  f"sample standard deviation over seeds {d['settings']['seeds']}.",
        Table([Col("model", "model"), Col("bits", "bits"), Col("stage", "stage"), stat_col("top-1", "top1"),
               stat_col("agreement", "agreement"), stat_col("KL", "kl", 4)], summary_rows),
        "Evol-Q minus start point, top-1 per seed, against the paper's published delta (DeiT-Tiny, full ImageNet "
        "val, 10 passes x 3 cycles):",
        Table([Col("model", "model"), Col("bits", "bits"),
               Col("delta per seed", "dt", lambda v: " ".join(f"{x:+.1f}" for x in v)),
               Col("mean delta", "dt", lambda v: f"{sum(v) / len(v):+.2f}"), Col("paper delta (DeiT-T)", "paper"),
               Col("evals per run", "evals"), Col("pass per seed (hold-out decision)", "kept")], delta_rows)])]))
