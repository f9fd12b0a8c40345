"""Fitness losses (infoNCE, MSE, cosine, KL) on ViT-Tiny (real weights), measured on the
evaluation split after every pass (the paper's Fig. 6 question, small settings). Each loss drives
its own search from the same start point, one pass at a time; by default every pass is kept
(``--holdout 0``), so the curves show what each loss does, not the hold-out's choice."""
from __future__ import annotations

import copy
import time

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.evaluate import metrics, predict

from ..common import plot, quantized_metrics, search_last_blocks
from ..report import Col, Image, Section, Table
from ..runner import Suite, register

KEYS = ("top1", "agreement", "kl")


def run(run):
    a = run.args
    d = run.data()
    fp_logits = predict(d.base, d.xe, 100)
    n_fit = d.xc.shape[0] - int(round(d.xc.shape[0] * a.holdout))
    rows, start = [], None
    for loss in a.losses:
        qmodel, curve, t0 = None, [], time.perf_counter()
        for p in range(a.passes):  # a different seed per pass: pass p of a longer schedule
            cfg = EvolQConfig.make(w_bits=a.bits, a_bits=8, passes=1, cycles=a.cycles, loss=loss,
                                   seed=a.seeds[0] + p, infonce_batch=min(100, n_fit), holdout=a.holdout,
                                   progress=False)
            if qmodel is None:
                qmodel = prepare_model(copy.deepcopy(d.base), fitness_part(d.xc, cfg.search), cfg.quant, arch=a.model)
                searched = search_last_blocks(qmodel, a.last, cfg.search.scope)
                start = start or quantized_metrics(qmodel, d.xe, d.ye, fp_logits)
                curve.append({"pass": 0, **{k: start[k] for k in KEYS}, "kept": None})
            qmodel, rep = quantize_model(qmodel, d.xc, cfg)
            q = quantized_metrics(qmodel, d.xe, d.ye, fp_logits)
            kept = bool(rep["passes"][0].get("kept", True)) if rep["passes"] else None
            curve.append({"pass": p + 1, **{k: q[k] for k in KEYS}, "kept": kept})
            print(f"{loss:<8} pass {p + 1}: top1 {q['top1']:.2f} KL {q['kl']:.4f} kept={kept}", flush=True)
        rows.append({"loss": loss, "per_pass": curve, "search_seconds": time.perf_counter() - t0})
    run.save({"benchmark": "losses", "model": a.model, "w_bits": a.bits, "a_bits": 8,
              "calib_images": int(d.xc.shape[0]), "eval_images": int(d.xe.shape[0]), "cycles": a.cycles,
              "passes": a.passes, "holdout": a.holdout, "blocks": searched, "seed": a.seeds[0],
              "fp32": metrics(fp_logits, d.ye), "start": start, "runs": rows})
    panels = [("pass", ylabel, [(r["loss"], [c["pass"] for c in r["per_pass"]], [c[k] for c in r["per_pass"]],
                                 {"marker": "o"}) for r in rows])
              for k, ylabel in (("top1", "eval top-1 (%)"), ("kl", "eval KL(fp32 || quantized)"))]
    plot(run.path.with_suffix(".png"), panels, f"ViT-Tiny W{a.bits}A8, fitness loss vs evaluation split", (8, 3.2))


def pass_cols(d):
    return [Col("loss", "loss")] + [Col(f"pass {c['pass']}", lambda r, i=i: r["per_pass"][i],
                                        lambda c: f"{c['top1']:.2f} / {c['agreement']:.2f} / {c['kl']:.3f}")
                                    for i, c in enumerate(d["runs"][0]["per_pass"])]


register(Suite(
    name="losses", what="infoNCE vs MSE vs cosine vs KL", doc=__doc__, run=run, order=160,
    common={"model": "vit_tiny_patch16_224", "calib": 100, "eval": 200, "seeds": [0], "threads": 1},
    args=[(("--bits",), {"type": int, "default": 3}),
          (("--losses",), {"nargs": "+", "default": ["infonce", "mse", "cosine", "kl"]}),
          (("--passes",), {"type": int, "default": 2}), (("--cycles",), {"type": int, "default": 3}),
          (("--last",), {"type": int, "default": 4, "help": "search only the last N blocks (0: all)"}),
          (("--holdout",), {"type": float, "default": 0.0, "help": "calibration fraction that decides whether a "
                                                                   "pass is kept (0: every pass is kept)"})],
    results={"losses": "--bits 3 --passes 3 --cycles 3 --last 4 --calib 100 --eval 200"}, stale=("losses",),
    smoke={"calib": 24, "eval": 8, "passes": 1, "cycles": 1, "last": 1, "losses": ["mse"]},
    report=[Section("losses", [
        "## Fitness losses over passes (evaluation split)",
        lambda d: f"`benchmarks/suites/losses.py`: {d['model']} W{d['w_bits']}A8, {d['cycles']} cycles per block, "
                  f"blocks {', '.join(d['blocks'])}, {d['calib_images']} calibration / {d['eval_images']} "
                  f"evaluation images, hold-out {d.get('holdout', 0.1):.0%} (0%: every pass kept). Each cell: "
                  f"top-1 / agreement / KL on the evaluation split.",
        Image("losses.png", "losses"),
        Table(pass_cols)])]))
