"""Start-point choices, decided on the calibration pool only: the outlier-aware
``linear_input_strength`` under a gptq start, ``edge_bits`` (first layer and classifier at 8 bits),
the weight observer, brecq's init. The first ``--calib`` pool images calibrate (and feed GPTQ),
the rest are the dev set; the evaluation split is not read. A variant is ``key=value`` pairs
joined by ``+``: ``preset``, ``start``, ``st`` (linear_input_strength), ``edge`` (edge_bits), ``wobs``
(weight observer), and for a brecq start ``init`` and ``iters``. Resumable."""
from __future__ import annotations

from evolq.config import QuantConfig

from ..common import score_variants
from ..report import Col, Section, Table, f2
from ..runner import Suite, register

KEYS = {"preset": str, "start": str, "st": float, "edge": int, "wobs": str, "init": str, "iters": int}


def parse_variant(text: str) -> dict:
    out = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}; keys: {', '.join(KEYS)}")
        out[key] = KEYS[key](value)
    return out


def quant_of(v: dict, w_bits: int, a_bits: int) -> QuantConfig:
    kw = {"w_bits": w_bits, "a_bits": a_bits, "start": v.get("start", "gptq")}
    if "st" in v:
        kw["linear_input_strength"] = v["st"]
    if v.get("edge"):
        kw["edge_bits"] = v["edge"]
    if "wobs" in v:
        kw["weight_observer"] = v["wobs"]
    opts = {k: v[k] for k in ("init", "iters") if k in v}
    if opts:
        kw["start_options"] = {**opts, "progress": False}
    return QuantConfig.preset(v.get("preset", "fq-vit"), **kw)


def run(run):
    a = run.args
    xc, xd, yd = run.dev_split(a.model, a.calib)
    run.doc["settings"] = {"model": a.model, "w_bits": a.w_bits, "a_bits": a.a_bits, "calib": a.calib,
                           "dev": int(xd.shape[0]), "threads": a.threads, "split": "calibration pool (even labels)"}
    fp = score_variants(run, [v for v in a.variants.split(",") if v],
                        lambda text: quant_of(parse_variant(text), a.w_bits, a.a_bits), xc, xd, yd,
                        extra=lambda q, text, qm: {"linear_input_strength": q.linear_input_strength,
                                                   "edge_bits": q.edge_bits, "start": q.start,
                                                   "preset": parse_variant(text).get("preset", "fq-vit")})
    run.doc["fp32_dev_top1"] = round(float((fp.argmax(1) == yd).float().mean()) * 100, 3)
    run.save()


OA = "preset=outlier-aware"
ST = [f"{OA}+st={s}" for s in ("0.25", "0.375", "0.5", "0.625", "0.75")]
register(Suite(
    name="start_choices", doc=__doc__, run=run, order=50, resume=True, out="start_choices_{short}_w{w_bits}a{a_bits}",
    what="start-point choices (outlier-aware strength under gptq, edge bits, weight observer, brecq init), "
         "calibration pool only",
    common={"model": "vit_tiny_patch16_224", "calib": 256, "dev": None, "threads": 2},
    args=[(("--w-bits",), {"type": int, "default": 4}), (("--a-bits",), {"type": int, "default": 8}),
          (("--variants",), {"default": "preset=outlier-aware,preset=outlier-aware+edge=8",
                             "help": "comma-separated variants"})],
    results={"start_choices_vit_tiny_w3a8": "--w-bits 3 --a-bits 8 --threads 1 --variants " + ",".join(
                 ST + [f"{OA}+st=0.5+edge=8", f"{OA}+start=rtn+edge=8", "preset=fq-vit+start=rtn",
                       f"{OA}+st=0.5+edge=8+wobs=omse", f"{OA}+st=0.5+edge=8+start=brecq+init=gptq"]),
             "start_choices_vit_tiny_w4a8": "--w-bits 4 --a-bits 8 --threads 1 --variants " + ",".join(
                 ST + [f"{OA}+st=0.5+edge=8", f"{OA}+st=0.625+edge=8", f"{OA}+st=0.625+edge=8+wobs=omse"]),
             "start_choices_efficientnet_lite0_w4a4": "--model tf_efficientnet_lite0 --w-bits 4 --a-bits 4 --variants "
                                                      "preset=fq-vit,preset=fq-vit+edge=8"},
    smoke={"calib": 16, "dev": 8, "variants": "preset=fq-vit+start=rtn"},
    report=[Section("start_choices_*", each=False, blocks=[
        "## Start-point choices, on the calibration pool only (`benchmarks/suites/start_choices.py`)",
        "The 500 calibration-pool images split into images that calibrate (and feed GPTQ) and a *dev* set that "
        "scores; the evaluation split is not read. These decide `QuantConfig.outlier_strength` under a gptq start, "
        "whether `edge_bits=8` is used in the start-point benchmarks, and the start of `evolq demo` (W3A8). "
        "`wobs=omse`: the weights' per-channel range clipped to the least squared error (OMSE) instead of min/max "
        "under GPTQ; not adopted: slightly lower KL at W3A8, much higher at W4A8. `init=gptq`: brecq starting from "
        "GPTQ's weights."]),
        Section("start_choices_*", [
            lambda d: f"{d['settings']['model']} W{d['settings']['w_bits']}A{d['settings']['a_bits']}: "
                      f"{d['settings']['calib']} calibrate, {d['settings']['dev']} dev images (FP32 dev top-1 "
                      f"{d['fp32_dev_top1']:.1f}).",
            Table([Col("variant", "variant"), Col("start", "start"),
                   Col("strength", lambda r: f"{r['linear_input_strength']:g}" if r["preset"] == "outlier-aware"
                       else ""),
                   Col("edge bits", lambda r: str(r["edge_bits"] or "")), Col("dev top-1", "top1", f2),
                   Col("agreement", "agreement", f2),
                   Col("KL", lambda r: f"{r['kl']:.4f}" + (" (lowest)" if r["lowest"] else "")),
                   Col("s", "seconds", "{:.0f}")],
                  lambda d: [{**r, "variant": k, "lowest": k == d.get("best_kl")}
                             for k, r in d["variants"].items()])])]))
