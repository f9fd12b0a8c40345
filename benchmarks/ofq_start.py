"""The ``ofq`` start (OFQ fine-tune) against rtn and gptq, in two steps that never mix.

``--mode dev``: the recipe is chosen on the calibration pool only. The 500 calibration-pool
images (even labels) are split: the first ``--calib`` calibrate and train, the rest are the
dev set on which top-1, agreement and KL to the float model are measured (as
``benchmarks/start_choices.py``). The evaluation split is not read.

``--mode eval``: the chosen starts on the evaluation split (odd labels), as
``benchmarks/start_points.py`` measures rtn and gptq: the calibration pool's hold-out
(``evolq.data.split_calibration``, 10%, the seed) is split off first, the start is calibrated
and fine-tuned on the rest, and the fine-tune reports the hold-out KL before and after.

A variant is a start name, optionally with ``start_options`` as ``key=value`` pairs joined by
``+`` (values read as JSON where they parse): ``rtn``, ``gptq``, ``ofq+epochs=2+statsq=false``.
Every finished variant is written at once to the JSON and skipped when the script is
started again with the same output file.

    python benchmarks/ofq_start.py --mode dev --variants gptq,ofq+epochs=2,ofq+epochs=2+statsq=false
    python benchmarks/ofq_start.py --mode eval --variants rtn,gptq,ofq+epochs=2
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
from evolq.data import split_calibration  # noqa: E402
from evolq.evaluate import evaluate_qmodel, predict  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    start, *parts = text.split("+")
    opts = {}
    for part in parts:
        key, _, value = part.partition("=")
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    if start == "ofq":
        opts.setdefault("progress", False)
    return start, opts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("dev", "eval"), required=True)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--w-bits", type=int, default=3)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--preset", default="outlier-aware")
    ap.add_argument("--edge-bits", type=int, default=8)
    ap.add_argument("--calib", type=int, default=300, help="dev mode: calibration-pool images that calibrate and "
                                                           "train; the rest of the pool is the dev set")
    ap.add_argument("--eval", type=int, default=500, help="eval mode: evaluation images (odd labels)")
    ap.add_argument("--holdout", type=float, default=0.1, help="eval mode: hold-out share of the calibration pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", required=True, help="comma-separated variants (see the module doc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup(args.threads)
    from evolq.data import assets_dir, load_images
    from evolq.models import load_model, model_transform

    short = {"vit_tiny_patch16_224": "vit_tiny"}.get(args.model, args.model)
    out = Path(args.out) if args.out else RESULTS / f"ofq_{args.mode}_{short}_w{args.w_bits}a{args.a_bits}.json"
    res = json.loads(out.read_text()) if out.exists() else {"variants": {}}
    base = load_model(args.model)
    tf = model_transform(base)
    data = assets_dir() / "imagenet-sample"
    x, y = load_images(data, tf, "calib", progress=False)
    if args.mode == "dev":
        xc, hold = x[:args.calib], None
        xm, ym = x[args.calib:], y[args.calib:]
        split = f"calibration pool (even labels): {args.calib} calibrate/train, {xm.shape[0]} dev"
    else:
        xc, hold = split_calibration(x, args.holdout, args.seed)
        xm, ym = load_images(data, tf, "eval", limit=args.eval, progress=False)
        split = f"evaluation split (odd labels), {xm.shape[0]} images; {xc.shape[0]} calibrate/train, " \
                f"{hold.shape[0]} hold-out"
    fp = predict(base, xm, 50)
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "variants")}
    res["settings"]["split"] = split
    res["fp32_top1"] = round(float((fp.argmax(1) == ym).float().mean()) * 100, 3)
    for text in [v for v in args.variants.split(",") if v]:
        if text in res["variants"]:
            print(f"{text}: done, skipped")
            continue
        start, opts = parse_variant(text)
        q = QuantConfig.preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, start=start,
                               start_options=opts, edge_bits=args.edge_bits)
        t0 = time.perf_counter()
        qm = prepare_model(copy.deepcopy(base), xc, q, arch=args.model, progress=False, holdout=hold)
        secs = time.perf_counter() - t0
        m, _ = evaluate_qmodel(qm, xm, ym, fp_logits=fp, batch_size=50)
        r = {k: round(float(m["quantized"][k]), 4) for k in ("top1", "agreement", "kl")}
        r.update(seconds=round(secs, 1), linear_input_strength=q.linear_input_strength, start=start, options=opts)
        rep = qm.start_report or {}
        for k in ("holdout_kl", "fitness_kl", "qkr", "history", "status", "warnings", "fallbacks", "epochs_run",
                  "act_scales"):
            if k in rep:
                r[k] = rep[k]
        res["variants"][text] = r
        res["best_kl"] = min(res["variants"], key=lambda k: res["variants"][k]["kl"])
        write_json(out, res)
        print(f"{text}: top1 {r['top1']} agreement {r['agreement']} KL {r['kl']} ({secs:.0f} s) "
              f"{r.get('holdout_kl', '')} {[h.get('train_kl') for h in r.get('history', [])]}", flush=True)
    print(f"lowest KL: {res['best_kl']}; wrote {out}")


if __name__ == "__main__":
    main()
