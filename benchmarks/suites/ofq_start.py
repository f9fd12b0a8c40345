"""The ``ofq`` start (OFQ fine-tune) against rtn and gptq, in two steps that never mix.
``--mode dev``: the recipe is chosen on the calibration pool only: the first ``--calib`` pool
images calibrate and train, the rest are the dev set (the evaluation split is not read).
``--mode eval``: the chosen starts on the evaluation split: the pool's hold-out (10%, the seed)
is split off first, the start is calibrated and fine-tuned on the rest, and the fine-tune reports
the hold-out KL before and after. A variant is a start name, optionally with ``start_options``
as ``key=value`` pairs joined by ``+`` (values read as JSON where they parse), e.g.
``ofq+epochs=2+statsq=false``. Resumable: finished variants are skipped."""
from __future__ import annotations

from evolq.config import QuantConfig
from evolq.data import split_calibration

from ..common import key_values, score_variants
from ..report import Col, Section, Table, f2
from ..runner import Suite, register

REPORT_KEYS = ("holdout_kl", "fitness_kl", "qkr", "history", "status", "warnings", "fallbacks", "epochs_run",
               "act_scales")


def parse_variant(text: str) -> tuple[str, dict]:
    start, *parts = text.split("+")
    opts = key_values(parts)
    if start == "ofq":
        opts.setdefault("progress", False)
    return start, opts


def run(run):
    a = run.args
    if a.mode == "dev":
        xc, xm, ym = run.dev_split(a.model, a.calib)
        hold = None
        split = f"calibration pool (even labels): {a.calib} calibrate/train, {xm.shape[0]} dev"
    else:
        xc, hold = split_calibration(run.images(a.model, "calib")[0], a.holdout, a.seeds[0])
        xm, ym = run.images(a.model, "eval", a.eval)
        split = f"evaluation split (odd labels), {xm.shape[0]} images; {xc.shape[0]} calibrate/train, " \
                f"{hold.shape[0]} hold-out"
    run.doc["settings"] = {"mode": a.mode, "model": a.model, "w_bits": a.w_bits, "a_bits": a.a_bits,
                           "preset": a.preset, "edge_bits": a.edge_bits, "calib": a.calib, "eval": a.eval,
                           "holdout": a.holdout, "seed": a.seeds[0], "threads": a.threads, "split": split}

    def quant_of(text):
        start, opts = parse_variant(text)
        return QuantConfig.preset(a.preset, w_bits=a.w_bits, a_bits=a.a_bits, start=start, start_options=opts,
                                  edge_bits=a.edge_bits)

    def extra(q, text, qm):
        rep = qm.start_report or {}
        return {"linear_input_strength": q.linear_input_strength, "start": q.start,
                "options": parse_variant(text)[1], **{k: rep[k] for k in REPORT_KEYS if k in rep}}

    fp = score_variants(run, [v for v in a.variants.split(",") if v], quant_of, xc, xm, ym, hold, extra)
    run.doc["fp32_top1"] = round(float((fp.argmax(1) == ym).float().mean()) * 100, 3)
    run.save()


def variant_rows(d):
    return [{**r, "variant": k, "lowest": k == d.get("best_kl"), "kl_pair": r.get("holdout_kl") or r.get("fitness_kl")}
            for k, r in d["variants"].items()]


def cols(what):
    return [Col("variant", "variant"), Col(f"{what} top-1", "top1", f2), Col("agreement", "agreement", f2),
            Col("KL", lambda r: f"{r['kl']:.4f}" + (" (lowest)" if r["lowest"] else "")),
            Col("train KL per epoch", lambda r: " / ".join(f"{h['train_kl']:.3f}" for h in r.get("history") or [])),
            Col("hold-out KL" if what == "eval" else "fitness KL (train images)", "kl_pair",
                lambda v: f"{v['before']:.3f} -> {v['after']:.3f}" if v else ""),
            Col("status", lambda r: r.get("status", "")), Col("start s", "seconds", "{:.0f}")]


ROUNDS = (
    "ViT-Tiny W3A8, outlier-aware preset, edge bits 8, seed 0, 2 CPU cores. A variant is the start and its "
    "`start_options`; the dev variants ran with the defaults of that time for the options they do not name (3 "
    "epochs, batch 16, lr 1e-4, cosine, flips, init gptq, StatsQ on, CGA off, AdamW without decay); the lowest dev KL "
    "of that round became the first recipe (lr 2e-5, StatsQ off, CGA on, then 6 epochs, flips). The second round's "
    "variants (`augment=mix`, `block_weight`, 12 epochs) ran with that recipe for the options they do not name, so "
    "*ofq+augment=mix* is 6 epochs of mixed views without the block term; its lowest dev KL (mixed views + block "
    "term, 12 epochs) became the second recipe. The third round's variants (`epochs=24`; `qkr=true+qkr_bias=exact`, "
    "QKR with the q bias's exact term) ran with the second recipe; QKR had the lowest dev KL and is on by default "
    "since (`qkr=auto`; *ofq+qkr=true* above it is OFQ's bias-dropping form with the first round's defaults). The "
    "recipe is chosen on the *dev* table only (calibration pool: the first 300 images calibrate and train, the other "
    "200 score; the evaluation split is not read); the evaluation table then reports the chosen recipe beside rtn "
    "and gptq (the calibration pool's 10% hold-out is split off first and never calibrates nor trains; *hold-out KL* "
    "is the fine-tune's own report, before -> after). *train KL*: mean distillation loss per epoch. StatsQ here is on "
    "the layers at w_bits only, except the row marked superseded (StatsQ on the 8-bit edge layers too).")
DEV = ["gptq", "ofq+epochs=3+statsq=false", "ofq+epochs=3", "ofq+epochs=1+statsq=false",
       "ofq+epochs=3+statsq=false+lr=2e-05", "ofq+epochs=3+statsq=false+lr=2e-05+cga=true", "ofq+epochs=6",
       "ofq+init=rtn", "ofq+qkr=true", "ofq+augment=mix", "ofq+block_weight=1", "ofq+augment=mix+block_weight=1",
       "ofq+block_weight=4", "ofq+augment=mix+block_weight=1+epochs=12", "ofq+augment=flip+block_weight=0+epochs=6",
       "ofq+augment=mix+block_weight=1+epochs=12+lr=5e-05", "ofq+epochs=24", "ofq+qkr=true+qkr_bias=exact"]
MAIN = "ofq_dev_vit_tiny_w3a8|ofq_eval_vit_tiny_w3a8"
register(Suite(
    name="ofq_start", doc=__doc__, run=run, order=60, resume=True, out="ofq_{mode}_{short}_w{w_bits}a{a_bits}",
    what="the ofq start (OFQ fine-tune) variants on the calibration pool's dev split, then the chosen recipe "
         "beside rtn and gptq on the evaluation split",
    common={"model": "vit_tiny_patch16_224", "calib": 300, "dev": None, "eval": 500, "seeds": [0], "threads": 2},
    args=[(("--mode",), {"choices": ("dev", "eval"), "required": True}),
          (("--w-bits",), {"type": int, "default": 3}), (("--a-bits",), {"type": int, "default": 8}),
          (("--preset",), {"default": "outlier-aware"}), (("--edge-bits",), {"type": int, "default": 8}),
          (("--holdout",), {"type": float, "default": 0.1, "help": "eval mode: hold-out share of the pool"}),
          (("--variants",), {"default": "gptq,ofq", "help": "comma-separated variants"})],
    results={"ofq_dev_vit_tiny_w3a8": f"--mode dev --variants {','.join(DEV)}",
             "ofq_eval_vit_tiny_w3a8": "--mode eval --variants rtn,gptq,ofq+epochs=3+statsq=false+lr=2e-05+cga=true",
             "ofq_dev_tf_efficientnet_lite0_w4a4": "--mode dev --model tf_efficientnet_lite0 --w-bits 4 --a-bits 4 "
                                                   "--preset fq-vit --variants ofq,ofq+act_lr=0.005 --out "
                                                   "ofq_dev_tf_efficientnet_lite0_w4a4"},
    smoke={"calib": 16, "dev": 8, "eval": 8, "variants": "gptq,ofq+epochs=1+batch_size=8"},
    report=[Section(MAIN, each=False, blocks=[
        "## The ofq start: a short OFQ fine-tune (`benchmarks/suites/ofq_start.py`)", ROUNDS]),
            Section(MAIN, [
                lambda d: f"{'dev' if d['settings']['mode'] == 'dev' else 'evaluation'}: {d['settings']['split']} "
                          f"(FP32 top-1 {d['fp32_top1']:.1f}).",
                Table(lambda d: cols("dev" if d["settings"]["mode"] == "dev" else "eval"), variant_rows)]),
            Section("ofq_dev_*", when=lambda d: d["file"] != "ofq_dev_vit_tiny_w3a8", blocks=[
                lambda d: f"{d['settings']['model']} W{d['settings']['w_bits']}A{d['settings']['a_bits']}, "
                          f"{d['settings']['preset']} preset, edge bits {d['settings']['edge_bits']}, seed "
                          f"{d['settings']['seed']} (`{d['file']}.json`): dev, {d['settings']['split']} (FP32 top-1 "
                          f"{d['fp32_top1']:.1f}); variants with today's defaults for the options they do not name.",
                Table(cols("dev"), variant_rows)])]))
