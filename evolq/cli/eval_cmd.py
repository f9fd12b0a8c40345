"""``evolq eval``: FP32 against the start point (no search) on the evaluation split."""
from __future__ import annotations

import json

from .args import add_model_args, s_default
from .shared import load_inputs, short_metrics, table


def add_parser(sub):
    pe = sub.add_parser("eval", help="FP32 vs start-point (FQ-ViT regime) metrics")
    add_model_args(pe, quantize=False)
    pe.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..api import prepare_model
    from ..evaluate import evaluate_qmodel

    model, quant, xc, xe, ye = load_inputs(args, quiet=args.json)
    hold = None
    if quant.start == "ofq":  # the fine-tune's overfitting shows on images it never sees (quantize's hold-out)
        from ..data import split_calibration

        xc, hold = split_calibration(xc, s_default("holdout"), s_default("seed"))
    qmodel = prepare_model(model, xc, quant, arch=args.model, progress=not args.json, holdout=hold)
    res, _ = evaluate_qmodel(qmodel, xe, ye, progress=not args.json)
    out = {"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits, "calib_images": int(xc.shape[0]),
           "eval_images": int(xe.shape[0]), "fp32": short_metrics(res["fp32"]),
           "quantized": short_metrics(res["quantized"])}
    rep = qmodel.start_report
    if rep is not None and rep.get("start") == "ofq":
        out["start"] = {k: rep[k] for k in ("holdout_images", "holdout_kl", "fitness_kl", "epochs_run", "status",
                                            "warnings", "seconds") if k in rep}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} W{args.w_bits}A{args.a_bits}: {xc.shape[0]} calibration / {xe.shape[0]} evaluation images")
        print(table([("fp32", res["fp32"]), ("quantized", res["quantized"])]))
        if "start" in out:
            st = out["start"]
            kl = st.get("holdout_kl") or st.get("fitness_kl") or {}
            print(f"ofq fine-tune: {st['epochs_run']} epochs, {st['status']}; hold-out KL {kl.get('before', 0):.4f} "
                  f"-> {kl.get('after', 0):.4f} ({st['holdout_images']} images)")
            for w in st.get("warnings", []):
                print(f"warning: {w}")
    return 0
