"""How the outlier-aware preset's ``linear_input_strength`` per weight bit width was chosen, on
calibration-pool images only: per bit width and strength, the start point calibrated on the
first ``--calib`` pool images, scored (KL and agreement with FP32) on the next ``--score``."""
from __future__ import annotations

import copy

from evolq.adapters import wrap_model
from evolq.config import QuantConfig
from evolq.evaluate import metrics, predict
from evolq.qnn.calibrate import calibrate

from ..report import Col, Pivot, Section
from ..runner import Suite, register

ARCH = "vit_tiny_patch16_224"


def run(run):
    a = run.args
    xc, xs, _ = run.dev_split(ARCH, a.calib)
    xs = xs[:a.score]
    base = run.model(ARCH)
    fp = predict(base, xs, 50)
    labels = fp.argmax(1)  # only to fill metrics(); agreement and KL are what is scored
    rows = []
    for bits in a.bits:
        for st in a.strengths:
            qm = wrap_model(copy.deepcopy(base), QuantConfig.preset("outlier-aware", w_bits=bits,
                                                                    linear_input_strength=st), ARCH)
            calibrate(qm, xc)
            m = metrics(predict(qm.model, xs, 50), labels, fp)
            rows.append({"w_bits": bits, "strength": st, "kl": m["kl"], "agreement": m["agreement"]})
            print(f"W{bits}A8 strength {st:.2f}: KL {m['kl']:.4f}  agreement {m['agreement']:.1f}", flush=True)
    best = {str(b): min((r for r in rows if r["w_bits"] == b), key=lambda r: r["kl"])["strength"] for b in a.bits}
    run.save({"benchmark": "preset_strength", "model": ARCH, "n_calib": int(xc.shape[0]), "n_score": int(xs.shape[0]),
              "split": "both from the calibration pool (even labels); the evaluation split is not used",
              "rows": rows, "best": best})


register(Suite(
    name="preset_strength", doc=__doc__, run=run, order=110,
    what="outlier-aware migration strength per bit width (calibration pool only)",
    common={"calib": 200, "threads": 1},
    args=[(("--bits",), {"type": int, "nargs": "+", "default": [8, 4, 3]}),
          (("--strengths",), {"type": float, "nargs": "+", "default": [0.0, 0.25, 0.5, 0.75, 1.0]}),
          (("--score",), {"type": int, "default": 200, "help": "scoring images (the next N of the pool)"})],
    results={"preset_strength": ""}, stale=("preset_strength",),
    smoke={"calib": 16, "score": 8, "bits": [8], "strengths": [0.5]},
    report=[Section("preset_strength", [
        "## Choosing the outlier-aware migration strength (calibration pool only)",
        lambda d: f"`benchmarks/suites/preset_strength.py`: {d['model']}, outlier-aware start point calibrated on "
                  f"{d['n_calib']} calibration-pool images and scored on {d['n_score']} other calibration-pool "
                  "images (KL and agreement with FP32; the evaluation split is not used). The preset takes the "
                  "lowest KL per weight bit width: " + ", ".join(f"W{b}: {s:g}" for b, s in d["best"].items()) + ".",
        Pivot("rows", [Col("bits", "w_bits", "W{}A8")], "strength", "strength {:g}".format,
              lambda r: f"{r['kl']:.4f} / {r['agreement']:.1f}", order="desc"),
        "Each cell: KL / agreement (%)."])]))
