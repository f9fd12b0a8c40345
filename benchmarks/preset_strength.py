"""How the outlier-aware preset's ``linear_input_strength`` per weight bit width was chosen,
on calibration-pool images only (never on the evaluation split).

For each weight bit width and strength: calibrate the outlier-aware start point on the first
``--calib`` images of the calibration pool (even labels), then score KL(FP32 || quantized)
and top-1 agreement with FP32 on ``--score`` *other* calibration-pool images (no labels
needed). The preset takes, per bit width, the strength with the lowest KL.

    python benchmarks/preset_strength.py            # 3 bit widths x 5 strengths
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import write_json  # noqa: E402  (benchmarks/_common.py)

from evolq.adapters import wrap_model  # noqa: E402
from evolq.config import QuantConfig  # noqa: E402
from evolq.data import assets_dir, load_images  # noqa: E402
from evolq.evaluate import metrics, predict  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402
from evolq.qnn.calibrate import calibrate  # noqa: E402

ARCH = "vit_tiny_patch16_224"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--calib", type=int, default=200, help="calibration images (first N of the pool)")
    p.add_argument("--score", type=int, default=200, help="scoring images (the next N of the pool)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preset_strength.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = load_model(ARCH, hub=False)
    pool, _ = load_images(assets_dir() / "imagenet-sample", model_transform(base), "calib",
                          limit=args.calib + args.score)
    xc, xs = pool[:args.calib], pool[args.calib:]
    fp = predict(base, xs, 50)
    labels = fp.argmax(1)  # only to fill metrics(); agreement and KL are what is scored
    rows = []
    for bits in args.bits:
        for st in args.strengths:
            qm = wrap_model(copy.deepcopy(base), QuantConfig.preset("outlier-aware", w_bits=bits,
                                                                            linear_input_strength=st), ARCH)
            calibrate(qm, xc)
            m = metrics(predict(qm.model, xs, 50), labels, fp)
            rows.append({"w_bits": bits, "strength": st, "kl": m["kl"], "agreement": m["agreement"]})
            print(f"W{bits}A8 strength {st:.2f}: KL {m['kl']:.4f}  agreement {m['agreement']:.1f}", flush=True)
    best = {b: min((r for r in rows if r["w_bits"] == b), key=lambda r: r["kl"])["strength"] for b in args.bits}
    print("\nlowest KL on calibration-pool images:", ", ".join(f"W{b}: strength {s:g}" for b, s in best.items()))
    write_json(Path(args.out), {"benchmark": "preset_strength", "model": ARCH, "n_calib": int(xc.shape[0]),
                                "n_score": int(xs.shape[0]),
                                "split": "both from the calibration pool (even labels); the evaluation split is "
                                         "not used", "rows": rows, "best": {str(b): s for b, s in best.items()},
                                "seconds": time.time() - t0})
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
