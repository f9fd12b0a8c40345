"""Peers on the same images: established PTQ tools run side by side with evolq on the same
model, the same calibration images and the same evaluation split.

Every row uses one tensor file that this runner writes once per model under ``/tmp``
(calibration images: the first ``--calib`` of the pool, even labels; evaluation: the first
``--eval`` of the split, odd labels; decoded with the model's timm transform by evolq's own
loader) and the FP32 logits of the float model on the evaluation images. evolq's rows run in
this process; each peer runs in its own virtual environment (its own torch) as a subprocess
(``benchmarks/peers_brevitas.py``, ``benchmarks/peers_modelopt.py``) that loads the tensor
file and the weights file, applies the tool's recommended PTQ recipe, and writes the logits
of the evaluation images. This runner scores every row with ``evolq.evaluate.metrics``
(top-1, agreement with FP32 top-1, KL(FP32 || quantized)), counts the quantized operations
and writes ``benchmarks/results/peers.json``. Rows already there are skipped (resumable)
unless ``--force``.

Peer environments (outside the repository; one torch each; about 3 min and 6 GB each):

    python3 -m venv /work/venv-brevitas
    /work/venv-brevitas/bin/pip install "brevitas==0.13.*" torch torchvision onnx timm safetensors pillow numpy
    python3 -m venv /work/venv-modelopt
    /work/venv-modelopt/bin/pip install "nvidia-modelopt[torch]==0.47.*" torch torchvision timm safetensors \
        pillow numpy requests  # ModelOpt 0.47 imports requests without requiring it

Run (from the repository root, with evolq's environment):

    .venv/bin/python benchmarks/peers.py                       # ViT-Tiny, every tool and config
    .venv/bin/python benchmarks/peers.py --models tf_efficientnet_lite0
    .venv/bin/python benchmarks/peers.py --only brevitas --force   # re-run one tool's rows
    .venv/bin/python benchmarks/peers.py --search                  # add Evol-Q search rows (slow)

More evolq rows: add an entry to ``EVOLQ_ROWS`` (a label -> function of the float model,
the calibration tensor and the weight bits that returns the quantized module and the
quantizers it holds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evolq import EvolQConfig, QuantConfig, prepare_model, quantize_model  # noqa: E402
from evolq.data import asset_model_file, assets_dir, load_images  # noqa: E402
from evolq.evaluate import metrics, predict  # noqa: E402
from evolq.io import write_json  # noqa: E402
from evolq.models import load_model, model_transform  # noqa: E402

BENCH = Path(__file__).resolve().parent
MODELS = ["vit_tiny_patch16_224"]
WORK = Path("/tmp/evolq-peers")
PEER_SCRIPTS = {"brevitas": BENCH / "peers_brevitas.py", "modelopt": BENCH / "peers_modelopt.py"}
PEER_PYTHON = {"brevitas": "/work/venv-brevitas/bin/python", "modelopt": "/work/venv-modelopt/bin/python"}


# -- what is quantized ------------------------------------------------------------------
def evolq_ops(qmodel) -> dict:
    """Quantizers of a QModel by the operation they feed (names end with the quantizer role)."""
    out: dict[str, int] = {}
    modules = dict(qmodel.model.named_modules())
    for name, q in qmodel.quantizers().items():
        if not getattr(q, "enabled", True):
            continue
        owner, role = name.rsplit(".", 1)
        mod = modules.get(owner)
        kind = type(getattr(mod, "conv", getattr(mod, "linear", getattr(mod, "norm", mod)))).__name__
        if role in ("q_quant", "k_quant", "v_quant"):
            cat = "matmul in"
        elif role == "probs_quant":
            cat = "softmax out"
        elif "Norm" in kind:
            cat = "LayerNorm in"
        elif role == "weight_quant":
            cat = ("conv" if "Conv" in kind else "linear") + " W"
        else:
            cat = ("conv" if "Conv" in kind else "linear") + " in"
        out[cat] = out.get(cat, 0) + 1
    return dict(sorted(out.items()))


def ops_text(ops: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in ops.items()) if ops else "-"


# -- evolq's own rows --------------------------------------------------------------------
def _start(preset):
    def run(model, xc, w_bits, a_bits):
        qm = prepare_model(model, xc, QuantConfig.preset(preset, w_bits=w_bits, a_bits=a_bits))
        return qm

    return run


def _search(preset):
    def run(model, xc, w_bits, a_bits):
        qm, _ = quantize_model(model, xc, EvolQConfig.make(preset=preset, w_bits=w_bits, a_bits=a_bits))
        return qm

    return run


# label -> (function(model, calib, w_bits, a_bits) -> QModel, description)
EVOLQ_ROWS = {
    "start fq-vit": (_start("fq-vit"), "evolq.prepare_model, QuantConfig(w_bits, a_bits=8) (the FQ-ViT start point)"),
    "start outlier-aware": (_start("outlier-aware"),
                            "evolq.prepare_model, QuantConfig.preset('outlier-aware', w_bits, a_bits=8)"),
    "Evol-Q outlier-aware": (_search("outlier-aware"),
                             "evolq.quantize_model, EvolQConfig.make(preset='outlier-aware', w_bits, a_bits=8): "
                             "outlier-aware start point + default search (10 passes x 12 blocks, 3 cycles, infoNCE)"),
}
SEARCH_ROWS = {"Evol-Q outlier-aware"}  # only with --search: 120 block searches (hours on a loaded 2-core machine)

# tool -> [(config name, w_bits, a_bits)]; the peer scripts know each config's recipe
PEER_CONFIGS = {
    "brevitas": [("W8A8", 8, 8), ("W4A8", 4, 8), ("W3A8", 3, 8), ("W4A4", 4, 4)],
    "modelopt": [("INT8_DEFAULT_CFG", 8, 8), ("INT8_SMOOTHQUANT_CFG", 8, 8), ("INT8_DEFAULT_CFG:w4", 4, 8),
                 ("INT4_AWQ_CFG", 4, 16), ("W4A8_AWQ_BETA_CFG", 4, 8)],
}
EVOLQ_BITS = [(8, 8), (4, 8), (3, 8)]
# CNNs (EfficientNet-Lite0): W8A8 and W4A8 only; ModelOpt's docs support only INT8 for CNNs
# ("Please use quantization config INT8_DEFAULT_CFG for CNN models"), so its LLM formats are left out
CNN_BITS = {(8, 8), (4, 8)}
CNN_PEER_CONFIGS = {"brevitas": [("W8A8", 8, 8), ("W4A8", 4, 8)],
                    "modelopt": [("INT8_DEFAULT_CFG", 8, 8), ("INT8_DEFAULT_CFG:w4", 4, 8)]}


def is_cnn(model_name: str) -> bool:
    return "vit" not in model_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--calib", type=int, default=128, help="calibration images (first N of the pool; max 500)")
    p.add_argument("--eval", type=int, default=500, help="evaluation images (first N of the split; max 500)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only rows whose key contains one of these strings (e.g. brevitas, 'W4A8')")
    p.add_argument("--skip", nargs="+", default=[], help="leave out rows whose key contains one of these strings")
    p.add_argument("--force", action="store_true", help="re-run rows already in the JSON")
    p.add_argument("--search", action="store_true", help="add the Evol-Q search rows (SEARCH_ROWS; slow)")
    p.add_argument("--reuse", action="store_true",
                   help="collect a peer's output already in /tmp/evolq-peers (same command) instead of re-running it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per peer subprocess")
    p.add_argument("--brevitas-python", default=PEER_PYTHON["brevitas"])
    p.add_argument("--modelopt-python", default=PEER_PYTHON["modelopt"])
    p.add_argument("--out", default=str(BENCH / "results" / "peers.json"))
    return p.parse_args(argv)


def prepare_data(model_name: str, n_calib: int, n_eval: int) -> tuple[Path, dict]:
    """Decode the images once (evolq's loader and the model's transform), compute the FP32
    logits, and save both to a tensor file the peer scripts read."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{model_name}_c{n_calib}_e{n_eval}.pt"
    if path.exists():
        return path, torch.load(path, weights_only=True)
    base = load_model(model_name)
    tf = model_transform(base)
    folder = assets_dir() / "imagenet-sample"
    xc, _ = load_images(folder, tf, "calib", limit=n_calib)
    xe, ye = load_images(folder, tf, "eval", limit=n_eval)
    t = time.time()
    fp = predict(base.eval(), xe, 50)
    d = {"calib": xc, "eval": xe, "labels": ye, "fp32_logits": fp, "fp32_seconds": torch.tensor(time.time() - t)}
    torch.save(d, path)
    return path, d


def row_keys(model_name: str, args) -> list[tuple[str, str, str, int, int]]:
    """(key, tool, config, w_bits, a_bits) of every row for this model, in table order."""
    rows = [(f"{model_name}/fp32", "fp32", "FP32", 32, 32)]
    for w, a in EVOLQ_BITS:
        if is_cnn(model_name) and (w, a) not in CNN_BITS:
            continue
        for label in EVOLQ_ROWS:
            if label in SEARCH_ROWS and not args.search:
                continue
            rows.append((f"{model_name}/evolq/{label}/W{w}A{a}", "evolq", f"{label} W{w}A{a}", w, a))
    for tool, configs in (CNN_PEER_CONFIGS if is_cnn(model_name) else PEER_CONFIGS).items():
        for cfg, w, a in configs:
            rows.append((f"{model_name}/{tool}/{cfg}", tool, cfg, w, a))
    keep = []
    for r in rows:
        if args.only and not any(s in r[0] for s in args.only):
            continue
        if any(s in r[0] for s in args.skip):
            continue
        keep.append(r)
    return keep


def run_evolq(model_name, label, w, a, data) -> dict:
    fn, desc = EVOLQ_ROWS[label]
    model = load_model(model_name).eval()
    t = time.time()
    qm = fn(model, data["calib"], w, a)
    ptq_s = time.time() - t
    t = time.time()
    logits = predict(qm.model, data["eval"], 50)
    return {"logits": logits, "ptq_seconds": ptq_s, "eval_seconds": time.time() - t, "recipe": desc,
            "ops": evolq_ops(qm), "version": _evolq_version()}


def _evolq_version() -> str:
    import evolq

    return evolq.__version__


def run_peer(tool, model_name, cfg, data_path, python, timeout, threads, reuse=False) -> dict:
    stem = WORK / f"{model_name}_{tool}_{cfg}".replace(":", "_")
    out_json, out_logits = stem.with_suffix(".json"), stem.with_suffix(".logits.pt")
    if reuse and out_json.exists() and out_logits.exists():  # the peer finished, the runner did not record it
        print(f"  reusing {out_json} and {out_logits.name} (--reuse)")
        res = json.loads(out_json.read_text())
        res["logits"] = torch.load(out_logits, weights_only=True)
        res["reused_output"] = True
        return res
    for f in (out_json, out_logits):
        f.unlink(missing_ok=True)
    weights = asset_model_file(model_name)
    cmd = [python, str(PEER_SCRIPTS[tool]), "--data", str(data_path), "--arch", model_name, "--weights", str(weights),
           "--config", cfg, "--out", str(out_json), "--logits", str(out_logits), "--threads", str(threads)]
    log = stem.with_suffix(".log")
    print("  $", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out_json.exists():
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{tool} exited {proc.returncode}: " + " | ".join(tail)[-1500:])
    res = json.loads(out_json.read_text())
    res["logits"] = torch.load(out_logits, weights_only=True)
    return res


def save_row(out: Path, result: dict, key: str, row: dict) -> dict:
    """Re-read the JSON and add one row before writing it back, so that runners with other ``--only``
    filters can write to the same file side by side."""
    if out.exists():
        disk = json.loads(out.read_text())
        result["rows"] = {**result["rows"], **disk.get("rows", {})}  # the file's rows are the newest
    result["rows"][key] = row
    write_json(out, result)
    return result


def print_table(result: dict) -> None:
    print(f"\n{'model':22} {'tool':9} {'config':44} {'top-1':>6} {'agree':>6} {'KL':>7} {'PTQ s':>7}  ops quantized")
    order = ["fp32", "evolq", *PEER_CONFIGS]
    rows = sorted(result["rows"].items(), key=lambda kv: (kv[1].get("model", ""), order.index(kv[1]["tool"])
                                                           if kv[1]["tool"] in order else 99, -kv[1]["w_bits"]))
    for key, r in rows:
        model = key.split("/")[0][:22]
        if r.get("status") != "ok":
            print(f"{model:22} {r['tool']:9} {r['config'][:44]:44} failed: {r.get('error', '')[:150]}")
            continue
        m = r["metrics"]
        print(f"{model:22} {r['tool']:9} {r['config'][:44]:44} {m['top1']:6.1f} {m['agreement']:6.1f} {m['kl']:7.4f} "
              f"{r.get('ptq_seconds', 0):7.1f}  {ops_text(r.get('ops', {}))}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("benchmark", "peers")
    result.setdefault("rows", {})
    result["settings"] = {"calib": args.calib, "eval": args.eval, "threads": args.threads}
    result["split"] = ("calibration: first --calib images of the pool (even labels); evaluation: first --eval images "
                       "of the split (odd labels); the same tensors for every row")
    result["env"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "evolq": _evolq_version()}
    pythons = {"brevitas": args.brevitas_python, "modelopt": args.modelopt_python}
    for model_name in args.models:
        data_path, data = prepare_data(model_name, args.calib, args.eval)
        ye, fp = data["labels"], data["fp32_logits"]
        for key, tool, cfg, w, a in row_keys(model_name, args):
            old = result["rows"].get(key)
            if old and old.get("status") == "ok" and not args.force:
                print(f"[skip] {key} (in {out.name}; --force re-runs)")
                continue
            print(f"[run] {key}", flush=True)
            row = {"tool": tool, "config": cfg, "w_bits": w, "a_bits": a, "model": model_name,
                   "n_calib": int(data["calib"].shape[0]), "n_eval": int(ye.numel())}
            t0 = time.time()
            try:
                if tool == "fp32":
                    res = {"logits": fp, "ptq_seconds": 0.0, "eval_seconds": float(data["fp32_seconds"]),
                           "recipe": "float model", "ops": {}, "version": _evolq_version()}
                elif tool == "evolq":
                    label = cfg.rsplit(" ", 1)[0]
                    res = run_evolq(model_name, label, w, a, data)
                else:
                    res = run_peer(tool, model_name, cfg, data_path, pythons[tool], args.timeout, args.threads,
                                   args.reuse)
                logits = res.pop("logits")
                row.update(res)
                row["metrics"] = metrics(logits, ye, fp)
                row["status"] = "ok"
            except Exception as e:  # a peer that cannot run here: record exactly why
                row["status"] = "failed"
                row["error"] = f"{type(e).__name__}: {e}"
            row["wall_seconds"] = time.time() - t0
            if row.get("reused_output"):  # the peer's own run: its script time (else PTQ + evaluation)
                row["wall_seconds"] = row.get("script_seconds", row["ptq_seconds"] + row["eval_seconds"])
            row["load_avg_1min"] = os.getloadavg()[0]
            result = save_row(out, result, key, row)
            if row["status"] == "ok":
                m = row["metrics"]
                print(f"  top-1 {m['top1']:.1f}  agreement {m['agreement']:.1f}  KL {m['kl']:.4f}  "
                      f"PTQ {row['ptq_seconds']:.1f} s  wall {row['wall_seconds']:.1f} s  {ops_text(row['ops'])}")
            else:
                print(f"  failed: {row['error'][:400]}")
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
