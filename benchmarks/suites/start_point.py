"""The FQ-ViT start point on real data, no search: ViT-Tiny calibrated on the calibration pool,
evaluated on the evaluation split, at W8A8 / W4A8 / W3A8; a one-factor-at-a-time ablation at W4A8
(activation observer, bias correction, PTF, log2 probabilities); the outlier-aware preset per bit
width and its two pieces one at a time. ``--only LABEL ...`` re-runs some rows, keeping the others."""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

from evolq.adapters import wrap_model
from evolq.config import QuantConfig
from evolq.evaluate import metrics, predict
from evolq.qnn.calibrate import calibrate

from ..report import Col, Section, Table, f2
from ..runner import Suite, register

ARCH = "vit_tiny_patch16_224"
WEIGHTS = "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
RUNS = [  # (table, label, QuantConfig overrides); the W4A8 default doubles as the ablation baseline
    ("bits", "W8A8", dict(w_bits=8, a_bits=8)),
    ("bits", "W4A8", dict(w_bits=4, a_bits=8)),
    ("bits", "W3A8", dict(w_bits=3, a_bits=8)),
    ("ablation", "act observer: minmax", dict(w_bits=4, act_observer="minmax")),
    ("ablation", "no bias correction", dict(w_bits=4, bias_correction=False)),
    ("ablation", "no PTF", dict(w_bits=4, ptf=False)),
    ("ablation", "attn probs: log2 (4-bit)", dict(w_bits=4, attn_probs="log2")),
    ("outlier", "W8A8 outlier-aware", dict(preset="outlier-aware", w_bits=8)),
    ("outlier", "W4A8 outlier-aware", dict(preset="outlier-aware", w_bits=4)),
    ("outlier", "W3A8 outlier-aware", dict(preset="outlier-aware", w_bits=3)),
    ("outlier", "W8A8 outlier-aware, strength 1", dict(preset="outlier-aware", w_bits=8, linear_input_strength=1.0)),
    ("outlier", "W4A8 outlier-aware, strength 1", dict(preset="outlier-aware", w_bits=4, linear_input_strength=1.0)),
    ("outlier-ablation", "W8A8 + PTF channel zero-points, alpha<=5",
     dict(w_bits=8, ptf_zero_point="channel", ptf_max_alpha=5)),
    ("outlier-ablation", "W8A8 + per-channel linear inputs, strength 0.75",
     dict(w_bits=8, linear_input="channel", linear_input_strength=0.75)),
    ("outlier-ablation", "W4A8 + PTF channel zero-points, alpha<=5",  # at low bits the folded factors hurt
     dict(w_bits=4, ptf_zero_point="channel", ptf_max_alpha=5)),
    ("outlier-ablation", "W3A8 + PTF channel zero-points, alpha<=5",
     dict(w_bits=3, ptf_zero_point="channel", ptf_max_alpha=5)),
]


def run(run):
    from evolq.data import assets_dir

    a = run.args
    float_model = run.model(ARCH, weights=assets_dir() / "models" / WEIGHTS)
    d = run.data(ARCH)
    t = time.time()
    fp_logits = predict(float_model, d.xe, a.batch_size)
    fp = {**metrics(fp_logits, d.ye), "eval_s": time.time() - t}
    old = run.doc
    run.doc = {"benchmark": "start_point", "model": ARCH, "weights": WEIGHTS, "n_calib": int(d.xc.shape[0]),
               "n_eval": int(d.xe.shape[0]),
               "split": "calibration = even labels (first n_calib), evaluation = odd labels (first n_eval)",
               "env": {"calib_batch_size": a.calib_batch_size}, "fp32": fp, "runs": []}
    if a.only is not None and (old.get("n_calib"), old.get("n_eval")) == (run.doc["n_calib"], run.doc["n_eval"]):
        run.doc["runs"] = [r for r in old.get("runs", []) if r["label"] not in a.only]  # the other rows
    order = {label: i for i, (_, label, _) in enumerate(RUNS)}
    for tab, label, overrides in [r for r in RUNS if a.only is None or r[1] in a.only]:
        overrides = dict(overrides)
        cfg = QuantConfig.preset(overrides.pop("preset", "fq-vit"), **overrides)
        qm = wrap_model(copy.deepcopy(float_model), cfg, ARCH)
        t = time.time()
        calibrate(qm, d.xc, batch_size=a.calib_batch_size)
        calib_s = time.time() - t
        t = time.time()
        q_logits = predict(qm.model, d.xe, a.batch_size)
        eval_s = time.time() - t
        m = metrics(q_logits, d.ye, fp_logits)
        m["logit_cosine"] = torch.nn.functional.cosine_similarity(q_logits, fp_logits, dim=1).mean().item()
        run.doc["runs"].append({"table": tab, "label": label, "config": dataclasses.asdict(cfg), "metrics": m,
                                "calib_s": calib_s, "eval_s": eval_s})
        run.doc["runs"].sort(key=lambda r: order.get(r["label"], len(order)))
        print(f"  {label:26s} top-1 {m['top1']:5.1f}  agree {m['agreement']:5.1f}  KL {m['kl']:.4f}", flush=True)
        run.save()


register(Suite(
    name="start_point", doc=__doc__, run=run, order=100, resume=True,
    what="start point without search: bit widths, ablations, presets",
    common={"calib": 500, "eval": 500, "threads": 1},
    args=[(("--batch-size",), {"type": int, "default": 50, "help": "evaluation batch size"}),
          (("--calib-batch-size",), {"type": int, "default": 100,
                                     "help": "calibration batch size (observer statistics depend on it)"}),
          (("--only",), {"nargs": "*", "default": None, "help": "run only these labels (e.g. W8A8); rows of other "
                                                                "labels already in the file are kept"})],
    results={"start_point": ""}, stale=("start_point",),
    smoke={"calib": 16, "eval": 8, "only": ["W8A8"]},
    report=[Section("start_point", [
        "## Start point (no search)",
        lambda d: f"`benchmarks/suites/start_point.py`: {d['model']} ({d.get('weights', '')}), {d['n_calib']} "
                  f"calibration / {d['n_eval']} evaluation images. FP32 top-1 {f2(d['fp32']['top1'])}. Tables "
                  "`bits` and `ablation`: the authors' FQ-ViT regime (the default); `outlier` and "
                  "`outlier-ablation`: the `outlier-aware` preset and its pieces (see docs/concepts.md).",
        Table([Col("table", "table"), Col("config", "label"), Col("top-1", "metrics.top1", f2),
               Col("agreement", "metrics.agreement", f2), Col("KL", "metrics.kl", "{:.4f}")])])]))
