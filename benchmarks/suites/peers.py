"""Peers on the same images: Brevitas and NVIDIA ModelOpt (each in its own virtual environment,
run as a subprocess: ``benchmarks/workers/peers_*.py``, the tool's recommended PTQ recipe) beside
evolq's start points on the same model, calibration images (the first ``--calib`` of the pool) and
evaluation split (the first ``--eval``), decoded once into a tensor file under ``/tmp/evolq-peers``
with the FP32 logits. Every row is scored with ``evolq.evaluate.metrics`` and the quantized
operations are counted. Rows already in the file are skipped unless ``--force``; runners with other
``--only`` filters can write the same file side by side (it is re-read before each write).

Peer environments (outside the repository; one torch each):

    python3 -m venv /work/venv-brevitas
    /work/venv-brevitas/bin/pip install "brevitas==0.13.*" torch torchvision onnx timm safetensors pillow numpy
    python3 -m venv /work/venv-modelopt
    /work/venv-modelopt/bin/pip install "nvidia-modelopt[torch]==0.47.*" torch torchvision timm safetensors \\
        pillow numpy requests  # ModelOpt 0.47 imports requests without requiring it
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from evolq import EvolQConfig, QuantConfig, prepare_model, quantize_model
from evolq.data import asset_model_file
from evolq.evaluate import metrics, predict

from ..report import Col, Section, Table, f2
from ..runner import ROOT, Suite, register

WORK = Path("/tmp/evolq-peers")
WORKERS = ROOT / "benchmarks" / "workers"


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
        else:
            cat = ("conv" if "Conv" in kind else "linear") + (" W" if role == "weight_quant" else " in")
        out[cat] = out.get(cat, 0) + 1
    return dict(sorted(out.items()))


def _start(preset):
    return lambda model, xc, w, a: prepare_model(model, xc, QuantConfig.preset(preset, w_bits=w, a_bits=a))


def _search(preset):
    return lambda model, xc, w, a: quantize_model(model, xc, EvolQConfig.make(preset=preset, w_bits=w, a_bits=a))[0]


EVOLQ_ROWS = {  # label -> (function(model, calib, w_bits, a_bits) -> QModel, description)
    "start fq-vit": (_start("fq-vit"), "evolq.prepare_model, QuantConfig(w_bits, a_bits=8) (the FQ-ViT start point)"),
    "start outlier-aware": (_start("outlier-aware"),
                            "evolq.prepare_model, QuantConfig.preset('outlier-aware', w_bits, a_bits=8)"),
    "Evol-Q outlier-aware": (_search("outlier-aware"),
                             "evolq.quantize_model, EvolQConfig.make(preset='outlier-aware', w_bits, a_bits=8): "
                             "outlier-aware start point + default search (10 passes x 12 blocks, 3 cycles, infoNCE)"),
}
SEARCH_ROWS = {"Evol-Q outlier-aware"}  # only with --search: 120 block searches (hours on a loaded 2-core machine)
PEER_CONFIGS = {  # tool -> [(config name, w_bits, a_bits)]; the worker scripts know each config's recipe
    "brevitas": [("W8A8", 8, 8), ("W4A8", 4, 8), ("W3A8", 3, 8), ("W4A4", 4, 4)],
    "modelopt": [("INT8_DEFAULT_CFG", 8, 8), ("INT8_SMOOTHQUANT_CFG", 8, 8), ("INT8_DEFAULT_CFG:w4", 4, 8),
                 ("INT4_AWQ_CFG", 4, 16), ("W4A8_AWQ_BETA_CFG", 4, 8)]}
EVOLQ_BITS = [(8, 8), (4, 8), (3, 8)]
# CNNs: W8A8 and W4A8 only; ModelOpt's docs support only INT8 for CNNs ("Please use quantization config
# INT8_DEFAULT_CFG for CNN models"), so its LLM formats are left out
CNN_BITS = {(8, 8), (4, 8)}
CNN_PEER_CONFIGS = {"brevitas": [("W8A8", 8, 8), ("W4A8", 4, 8)],
                    "modelopt": [("INT8_DEFAULT_CFG", 8, 8), ("INT8_DEFAULT_CFG:w4", 4, 8)]}


def prepare_data(run, model_name: str) -> tuple[Path, dict]:
    """The images (evolq's loader, the model's transform) and the FP32 logits, in a tensor file the
    worker scripts read."""
    a = run.args
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{model_name}_c{a.calib}_e{a.eval}.pt"
    if path.exists():
        return path, torch.load(path, weights_only=True)
    d = run.data(model_name)
    t = time.time()
    fp = predict(d.base, d.xe, 50)
    data = {"calib": d.xc, "eval": d.xe, "labels": d.ye, "fp32_logits": fp,
            "fp32_seconds": torch.tensor(time.time() - t)}
    torch.save(data, path)
    return path, data


def row_keys(model_name: str, a) -> list[tuple[str, str, str, int, int]]:
    """(key, tool, config, w_bits, a_bits) of every row for this model, in table order."""
    cnn = "vit" not in model_name
    rows = [(f"{model_name}/fp32", "fp32", "FP32", 32, 32)]
    rows += [(f"{model_name}/evolq/{label}/W{w}A{b}", "evolq", f"{label} W{w}A{b}", w, b) for w, b in EVOLQ_BITS
             if not (cnn and (w, b) not in CNN_BITS) for label in EVOLQ_ROWS if a.search or label not in SEARCH_ROWS]
    rows += [(f"{model_name}/{tool}/{cfg}", tool, cfg, w, b)
             for tool, configs in (CNN_PEER_CONFIGS if cnn else PEER_CONFIGS).items() for cfg, w, b in configs]
    return [r for r in rows if (not a.only or any(s in r[0] for s in a.only)) and not any(s in r[0] for s in a.skip)]


def run_worker(tool, model_name, cfg, data_path, python, a) -> dict:
    stem = WORK / f"{model_name}_{tool}_{cfg}".replace(":", "_")
    out_json, out_logits, log = stem.with_suffix(".json"), stem.with_suffix(".logits.pt"), stem.with_suffix(".log")
    reused = a.reuse and out_json.exists() and out_logits.exists()  # a finished worker the runner did not record
    if not reused:
        for f in (out_json, out_logits):
            f.unlink(missing_ok=True)
        cmd = [python, str(WORKERS / f"peers_{tool}.py"), "--data", str(data_path), "--arch", model_name, "--weights",
               str(asset_model_file(model_name)), "--config", cfg, "--out", str(out_json), "--logits", str(out_logits),
               "--threads", str(a.threads)]
        print("  $", " ".join(cmd), f"> {log}", flush=True)
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=a.timeout)
        if proc.returncode != 0 or not out_json.exists():
            raise RuntimeError(f"{tool} exited {proc.returncode}: "
                               + " | ".join(log.read_text().strip().splitlines()[-15:])[-1500:])
    res = json.loads(out_json.read_text())
    res["logits"] = torch.load(out_logits, weights_only=True)
    res["reused_output"] = reused or None
    return res


def measure(run, model_name, tool, cfg, w, b, data, data_path) -> dict:
    import evolq

    if tool == "fp32":
        return {"logits": data["fp32_logits"], "ptq_seconds": 0.0, "eval_seconds": float(data["fp32_seconds"]),
                "recipe": "float model", "ops": {}, "version": evolq.__version__}
    if tool == "evolq":
        fn, desc = EVOLQ_ROWS[cfg.rsplit(" ", 1)[0]]
        t = time.time()
        qm = fn(run.model(model_name), data["calib"], w, b)
        ptq_s, t = time.time() - t, time.time()
        return {"logits": predict(qm.model, data["eval"], 50), "ptq_seconds": ptq_s, "eval_seconds": time.time() - t,
                "recipe": desc, "ops": evolq_ops(qm), "version": evolq.__version__}
    return run_worker(tool, model_name, cfg, data_path, getattr(run.args, f"{tool}_python"), run.args)


def run(run):
    a = run.args
    run.doc.setdefault("rows", {})
    run.doc.update({"benchmark": "peers", "settings": {"calib": a.calib, "eval": a.eval, "threads": a.threads},
                    "split": "calibration: first --calib images of the pool (even labels); evaluation: first --eval "
                             "images of the split (odd labels); the same tensors for every row"})
    for model_name in a.models:
        data_path, data = prepare_data(run, model_name)
        for key, tool, cfg, w, b in row_keys(model_name, a):
            old = run.doc["rows"].get(key)
            if old and old.get("status") == "ok" and not a.force:
                print(f"[skip] {key} (--force re-runs)")
                continue
            print(f"[run] {key}", flush=True)
            row = {"tool": tool, "config": cfg, "w_bits": w, "a_bits": b, "model": model_name,
                   "n_calib": int(data["calib"].shape[0]), "n_eval": int(data["labels"].numel())}
            t0 = time.time()
            try:
                res = measure(run, model_name, tool, cfg, w, b, data, data_path)
                row.update({k: v for k, v in res.items() if k != "logits" and v is not None})
                row["metrics"], row["status"] = metrics(res["logits"], data["labels"], data["fp32_logits"]), "ok"
            except Exception as e:  # a peer that cannot run here: record exactly why
                row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"
            row["wall_seconds"] = time.time() - t0
            if row.get("reused_output"):  # the peer's own run: its script time (else PTQ + evaluation)
                row["wall_seconds"] = row.get("script_seconds", row["ptq_seconds"] + row["eval_seconds"])
            row["load_avg_1min"] = os.getloadavg()[0]
            if run.path.exists():  # the file's rows are the newest: another runner may have written some
                run.doc["rows"] = {**run.doc["rows"], **json.loads(run.path.read_text()).get("rows", {})}
            run.doc["rows"][key] = row
            run.save()
            print(f"  {row['status']}: {row.get('metrics', {}).get('top1', row.get('error', ''))}", flush=True)


def peer_rows(d):
    rows = sorted(d["rows"].values(), key=lambda r: (r["model"], -r.get("w_bits", 99), r["tool"], r.get("config", "")))
    return [r for r in rows if r.get("status", "ok") == "ok" and "metrics" in r]


register(Suite(
    name="peers", doc=__doc__, run=run, order=70, resume=True,
    what="Brevitas and NVIDIA ModelOpt beside evolq on the same images (own venvs)",
    common={"calib": 128, "eval": 500, "threads": 1},
    args=[(("--models",), {"nargs": "+", "default": ["vit_tiny_patch16_224"]}),
          (("--only",), {"nargs": "+", "default": None, "help": "rows whose key contains one of these strings"}),
          (("--skip",), {"nargs": "+", "default": [], "help": "leave out rows whose key contains one of these"}),
          (("--force",), {"action": "store_true", "help": "re-run rows already in the JSON"}),
          (("--search",), {"action": "store_true", "help": "add the Evol-Q search rows (SEARCH_ROWS; slow)"}),
          (("--reuse",), {"action": "store_true", "help": "collect a worker's output already in /tmp/evolq-peers"}),
          (("--timeout",), {"type": int, "default": 3600, "help": "seconds per worker subprocess"}),
          (("--brevitas-python",), {"default": "/work/venv-brevitas/bin/python"}),
          (("--modelopt-python",), {"default": "/work/venv-modelopt/bin/python"})],
    results={"peers": ["", "--models tf_efficientnet_lite0"]},
    smoke={"calib": 16, "eval": 8, "only": ["fp32", "start fq-vit/W8A8"]},
    report=[Section("peers", [
        "## Peers on the same images (`benchmarks/suites/peers.py`)",
        "Brevitas and NVIDIA ModelOpt, each with the recipe its own examples recommend (in "
        "`benchmarks/workers/peers_*.py`), beside evolq's start points (no search) on the same tensors: the first "
        "{settings[calib]} calibration-pool images, {settings[eval]} evaluation images; 2 shared CPU cores. *ops*: "
        "what each tool quantizes (evolq also quantizes LayerNorm inputs, q/k/v and the attention probabilities, "
        "which the peers leave in float).",
        Table([Col("model", lambda r: r["model"].split("_patch")[0]), Col("tool", "tool"),
               Col("config", lambda r: r.get("config", "")), Col("top-1", "metrics.top1", f2),
               Col("agreement", lambda r: r["metrics"].get("agreement", 100), f2),
               Col("KL", lambda r: r["metrics"].get("kl", 0), "{:.4f}"),
               Col("PTQ s", lambda r: f"{r['ptq_seconds']:.0f}" if r.get("ptq_seconds") else ""),
               Col("ops quantized", lambda r: ", ".join(f"{k} {v}" for k, v in (r.get("ops") or {}).items()))],
              peer_rows),
        "`INT8_DEFAULT_CFG:w4` is not a ModelOpt recipe: it is INT8_DEFAULT_CFG with 4-bit weights, since ModelOpt "
        "has no integer W4A8 config (its W4A8 uses FP8 activations); ModelOpt's docs support only INT8 for CNNs. In "
        "the W4A8_AWQ_BETA_CFG row, `SequentialQuantizer 0/1` are its int4-then-fp8 weight quantizers. ModelOpt "
        "leaves timm's `Conv2dSame` convolutions unquantized (44 of EfficientNet-Lite0's 49). Brevitas W3A8/W4A4, "
        "Brevitas on EfficientNet and the Evol-Q search rows were not run."])]))
