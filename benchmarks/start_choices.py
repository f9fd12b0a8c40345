"""Start-point choices, decided on the calibration pool only (issue 11): the outlier-aware
``linear_input_strength`` under a gptq start, and ``edge_bits`` (first layer and
classifier at 8 bits). The 500 calibration-pool images (even labels) are split: the first
``--calib`` calibrate (and feed GPTQ), the rest are the *dev* set on which top-1,
agreement and KL to the float model are measured. The evaluation split (odd labels) is
not read.

A variant is ``key=value`` pairs joined by ``+``: ``preset``, ``start``, ``st``
(linear_input_strength), ``edge`` (edge_bits), ``wobs`` (weight observer), and for a brecq
start ``init`` (``rtn`` or ``gptq``) and ``iters``. Every finished variant is written at once
(resumable).

    python -m benchmarks.start_choices --model vit_tiny_patch16_224 --w-bits 3 --a-bits 8 \\
        --variants preset=outlier-aware+st=0.25,preset=outlier-aware+st=0.5
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runs as a script
    sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, setup, write_json  # noqa: E402
from evolq.api import prepare_model  # noqa: E402
from evolq.config import QuantConfig  # noqa: E402
from evolq.evaluate import evaluate_qmodel, predict  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--calib", type=int, default=256, help="calibration-pool images that calibrate; the rest: dev")
    ap.add_argument("--variants", required=True, help="comma-separated variants (see the module doc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from evolq.data import assets_dir, load_images
    from evolq.models import load_model, model_transform

    short = {"vit_tiny_patch16_224": "vit_tiny", "tf_efficientnet_lite0": "efficientnet_lite0"}.get(args.model,
                                                                                                    args.model)
    out = Path(args.out) if args.out else RESULTS / f"start_choices_{short}_w{args.w_bits}a{args.a_bits}.json"
    res = json.loads(out.read_text()) if out.exists() else {"variants": {}}
    base = load_model(args.model)
    x, y = load_images(assets_dir() / "imagenet-sample", model_transform(base), "calib")
    xc, xd, yd = x[:args.calib], x[args.calib:], y[args.calib:]
    fp = predict(base, xd, 50)
    res["settings"] = {"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits, "calib": args.calib,
                       "dev": int(xd.shape[0]), "threads": args.threads, "split": "calibration pool (even labels)"}
    res["fp32_dev_top1"] = round(float((fp.argmax(1) == yd).float().mean()) * 100, 3)
    for text in [v for v in args.variants.split(",") if v]:
        if text in res["variants"]:
            print(f"{text}: done, skipped")
            continue
        v = parse_variant(text)
        q = quant_of(v, args.w_bits, args.a_bits)
        t0 = time.perf_counter()
        qm = prepare_model(copy.deepcopy(base), xc, q, arch=args.model, progress=False)
        secs = time.perf_counter() - t0
        m, _ = evaluate_qmodel(qm, xd, yd, fp_logits=fp, batch_size=50)
        r = {k: round(float(m["quantized"][k]), 4) for k in ("top1", "agreement", "kl")}
        r.update(seconds=round(secs, 1), linear_input_strength=q.linear_input_strength, edge_bits=q.edge_bits,
                 start=q.start, preset=v.get("preset", "fq-vit"))
        res["variants"][text] = r
        res["best_kl"] = min(res["variants"], key=lambda k: res["variants"][k]["kl"])
        write_json(out, res)
        print(f"{text}: {r}", flush=True)
    print(f"lowest dev KL: {res['best_kl']}; wrote {out}")


if __name__ == "__main__":
    main()
