"""The latency table of the bit allocation (``evolq.allocation.latency``) on a real model: every
layer's int8 and float time in the deploy runtime (inductor with freezing), the additive model's
error against whole-model timings, and how long the measurement takes.

The model from the assets folder is calibrated on ``--calib`` calibration-pool images (even
labels) in the deploy regime at ``--w-bits`` (round-to-nearest, as the allocation's proxy is),
then ``measure_latency_table`` times it at ``--batch`` images and ``--threads`` threads with the
menu ``--menu``. Run it alone on the machine (the timings are the result):

    flock -x /tmp/evolq-cpu.lock .venv/bin/python benchmarks/latency_table.py --model vit_tiny_patch16_224

Writes ``benchmarks/results/latency_table_<model>.json`` (``_b<batch>`` for batches > 1).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evolq import QuantConfig, prepare_model  # noqa: E402
from evolq.allocation.latency import measure_latency_table  # noqa: E402
from evolq.allocation.menu import parse_menu  # noqa: E402
from evolq.data import assets_dir, load_images  # noqa: E402
from evolq.io import write_json  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {"vit_tiny_patch16_224": "vit_tiny", "tf_efficientnet_lite0": "efficientnet_lite0"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--menu", default="4,8,float")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--model-pairs", type=int, default=40)
    ap.add_argument("--mixed", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="which layers the mixed allocations leave in float")
    ap.add_argument("--fit", default="raw", choices=("raw", "scaled"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    base = load_model(args.model)
    xc, _ = load_images(assets_dir() / "imagenet-sample", model_transform(base), "calib", limit=args.calib)
    t0 = time.perf_counter()
    q = prepare_model(base, xc, QuantConfig.preset("deploy", w_bits=args.w_bits), arch=args.model)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure_latency_table(q, parse_menu(args.menu), xc, threads=args.threads, batch=args.batch,
                                  pairs=args.pairs, model_pairs=args.model_pairs, mixed=args.mixed, seed=args.seed,
                                  fit=args.fit, progress=True)
    measure_s = time.perf_counter() - t0
    rec = table.record
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:  # pragma: no cover
        commit = ""
    out = {"model": args.model, "menu": args.menu, "w_bits": args.w_bits, "calib_images": int(xc.shape[0]),
           "batch": args.batch, "threads": args.threads, "command": " ".join(["benchmarks/latency_table.py", *(
               argv if argv is not None else sys.argv[1:])]), "commit": commit,
           "calibration_seconds": calib_s, "measure_seconds": measure_s,
           "table": table.to_dict()}
    name = f"latency_table_{SHORT.get(args.model, args.model)}" + (f"_b{args.batch}" if args.batch > 1 else "")
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    write_json(path, out)

    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {rec['cpu']['model']} "
          f"({', '.join(rec['cpu']['flags'])}), load {rec['load_1m']['start']:.2f} -> {rec['load_1m']['end']:.2f}")
    print(f"{'signature':<62} {'n':>2} {'int8 ms':>8} {'float ms':>8} {'call ms':>7}")
    for s in rec["signatures"]:
        print(f"{s['signature'][:62]:<62} {s['layers']:>2} {s['int8_ms']:8.3f} {s['float_ms']:8.3f} "
              f"{s['call_ms']:7.3f}")
    print(f"fit {rec['model']}: constant {rec['constant_ms']:.3f} ms (raw {rec['raw_constant_ms']:.3f} ms; "
          f"scaled: gap scale {rec['scale']:.3f})")
    print(f"{'allocation':<22} {'float':>5} {'measured':>9} {'min..max':>13} {'raw pred':>9} {'error':>7} "
          f"{'scaled pred':>11} {'error':>7}")
    for w in rec["validation"]:
        sc = (f"{w['predicted_scaled_ms']:11.3f} {100 * w['error_scaled']:6.1f}%" if "error_scaled" in w
              else f"{'-':>11} {'-':>7}")
        print(f"{w['allocation']:<22} {w['float_layers']:>5} {w['measured_ms']:9.3f} "
              f"{w['measured_min_ms']:6.2f}..{w['measured_max_ms']:<6.2f} {w['predicted_raw_ms']:9.3f} "
              f"{100 * w['error_raw']:6.1f}% {sc}{'  (fitted)' if w['fitted'] else ''}")
    print(f"measurement {measure_s:.0f} s (layers {rec['seconds']['layers']:.0f} s); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
