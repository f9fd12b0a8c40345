"""Start points (issue 11): rtn / gptq / brecq / ofq, each alone and with a short Evol-Q
search on top, on a real model from the assets; top-1, agreement and KL against the
float model on the evaluation split (odd labels), and wall time. With ``--curve``,
brecq's start accuracy for several iteration counts.

The hold-out is split off the calibration images first (``evolq.data.split_calibration``
with the run's seed, as ``quantize_model`` does) and the start point is calibrated and
reconstructed on the fitness part only; ``--seeds`` repeats a start with other seeds
(another hold-out split, other search draws) and the table reports their mean and spread.

Resumable: every finished run is written at once to the JSON (``evolq.io.write_json``)
and skipped when the script is started again with the same output file.

    python -m benchmarks.start_points --model vit_tiny_patch16_224 --w-bits 4 --a-bits 8
    python -m benchmarks.start_points --model tf_efficientnet_lite0 --w-bits 4 --a-bits 4
    python -m benchmarks.start_points --model vit_tiny_patch16_224 --w-bits 4 --starts brecq --curve 25,50,100 \\
        --no-search
    # GPU, closer to the papers' settings:
    python -m benchmarks.start_points ... --device cuda --calib 256 --brecq-iters 5000 --passes 2 --cycles 10
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runs as a script
    sys.path.insert(0, str(ROOT))

from benchmarks._common import GAP_PARTS, RESULTS, load_data, only_kind, search_last_blocks, setup  # noqa: E402
from benchmarks.ofq_start import parse_variant  # noqa: E402
from evolq.api import prepare_model, quantize_model  # noqa: E402
from evolq.config import EvolQConfig, QuantConfig, SearchConfig, field_default  # noqa: E402
from evolq.data import split_calibration  # noqa: E402
from evolq.evaluate import evaluate_qmodel, predict  # noqa: E402
from evolq.export.bench import cpu_info  # noqa: E402
from evolq.io import load_quantized, save_quantized, write_json  # noqa: E402


def _short(m):
    return {k: round(float(m[k]), 4) for k in ("top1", "agreement", "kl")}


def _cache_dir(args, quant, seed) -> Path | None:
    """The start cache's folder for one start (None: no cache): named by the model, the
    calibration split (images, hold-out, seed) and a hash of the whole QuantConfig (start and
    start options included), so any setting the start depends on gives another folder. The
    search settings are not part of it. Entries are not invalidated when evolq's code changes."""
    if not args.start_cache:
        return None
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(quant), sort_keys=True, default=str).encode()).hexdigest()
    return Path(args.start_cache) / (f"{args.model}_w{args.w_bits}a{args.a_bits}_{quant.start}_calib{args.calib}_"
                                     f"hold{args.holdout}_seed{seed}_{digest[:16]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--preset", default="fq-vit")
    ap.add_argument("--edge-bits", type=int, default=None, help="QuantConfig.edge_bits (first layer and classifier)")
    ap.add_argument("--holdout", type=float, default=0.1, help="SearchConfig.holdout (split off first)")
    ap.add_argument("--starts", default="rtn,gptq,brecq",
                    help="comma-separated: rtn, gptq, brecq, brecq+gptq (brecq with init='gptq'), ofq, "
                         "ofq+KEY=VALUE+... (ofq with these start_options)")
    ap.add_argument("--calib", type=int, default=128, help="calibration images (even labels)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd labels)")
    ap.add_argument("--brecq-iters", type=int, default=None, help="default: the device's default (200 CPU)")
    ap.add_argument("--brecq-batch", type=int, default=None)
    ap.add_argument("--brecq-lr", type=float, default=None)
    ap.add_argument("--qdrop", type=float, default=0.5)
    ap.add_argument("--curve", default="", help="brecq iteration counts for an accuracy-vs-iterations curve")
    ap.add_argument("--no-search", action="store_true", help="start points only")
    ap.add_argument("--gap", action="store_true",
                    help="also the start with float activations (weights only) and with float weights "
                         "(activations only): what the remaining error is made of")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--population", type=int, default=15, help="tournament population K (paper 15)")
    ap.add_argument("--samples", type=int, default=10, help="tournament sample size S (paper 10)")
    ap.add_argument("--last", type=int, default=0, help="search only the last N searchable blocks (0: all)")
    ap.add_argument("--scope", default="attn-weights")
    ap.add_argument("--unit", default="block")
    ap.add_argument("--noise", default=field_default(SearchConfig, "noise"),
                    help="SearchConfig.noise: absolute or relative mutations")
    ap.add_argument("--eps", type=float, default=None, help="SearchConfig.eps (default: the noise's own)")
    ap.add_argument("--loss", default=field_default(SearchConfig, "loss"),
                    help="the search's fitness loss (evolq.losses.list_losses())")
    ap.add_argument("--infonce-batch", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="another QuantConfig field (value read as JSON where it parses), e.g. "
                         "deploy_weights=asymmetric; repeatable")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: hold-out split, search and brecq draws")
    ap.add_argument("--start-cache", default="",
                    help="folder: each start model is saved there (evolq.io.save_quantized) and loaded instead of "
                         "recomputed when a later run asks for the same start, bits, preset and seed")
    ap.add_argument("--tag", default="",
                    help="suffix of the run's key, for the same start searched another way "
                         "(e.g. ' [scope block]'; not '@', which marks brecq iteration counts)")
    ap.add_argument("--out", default=None,
                    help="JSON file (default benchmarks/results/start_points_<model>_w<w>a<a>.json)")
    args = ap.parse_args(argv)
    setup(args.threads)
    short = {"vit_tiny_patch16_224": "vit_tiny", "tf_efficientnet_lite0": "efficientnet_lite0"}.get(args.model,
                                                                                                    args.model)
    out = Path(args.out) if args.out else RESULTS / f"start_points_{short}_w{args.w_bits}a{args.a_bits}.json"
    res = json.loads(out.read_text()) if out.exists() else {}
    res.setdefault("settings", {})
    res.setdefault("runs", {})
    res["settings"].update({k: v for k, v in vars(args).items() if k not in ("out",)})
    base, xc, xe, ye = load_data(args.model, args.calib, args.eval)
    dev = args.device
    if "fp32" not in res:
        res["fp32"] = None
    fp_logits = None

    def start_opts(start, iters, seed):
        if start == "gptq":
            return {"device": dev}
        if start.startswith("ofq"):  # the OFQOptions defaults, or "ofq+key=value+..." (a recipe variant)
            return {"device": dev, "seed": seed, **parse_variant(start)[1]}
        if start.startswith("brecq"):
            o = {"device": dev, "qdrop": args.qdrop, "seed": seed}
            if start == "brecq+gptq":
                o["init"] = "gptq"
            for k, v in (("iters", iters or args.brecq_iters), ("batch_size", args.brecq_batch),
                         ("lr", args.brecq_lr)):
                if v is not None:
                    o[k] = v
            return o
        return {}

    extra_quant = {}
    for item in args.quant_arg:
        key, _, value = item.partition("=")
        try:
            extra_quant[key] = json.loads(value)
        except ValueError:
            extra_quant[key] = value
    seeds = [int(v) for v in args.seeds.split(",") if v]
    jobs = []
    for seed in seeds:
        for start in [s for s in args.starts.split(",") if s]:
            jobs.append((start, None, not args.no_search, seed))
    curve_start = next((s for s in args.starts.split(",") if s.startswith("brecq")), "brecq")
    for it in [int(v) for v in args.curve.split(",") if v]:
        jobs.append((curve_start, it, False, seeds[0]))
    for start, iters, search, seed in jobs:
        key = (start if iters is None else f"{start}@{iters}") + args.tag + (f"/seed{seed}" if seed else "")
        if key in res["runs"] and (not search or "evolq" in res["runs"][key]):
            print(f"{key}: done, skipped")
            continue
        quant = QuantConfig.preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, start=start.split("+")[0],
                                   start_options=start_opts(start, iters, seed), edge_bits=args.edge_bits,
                                   **extra_quant)
        model = copy.deepcopy(base)
        fit_x, hold_x = split_calibration(xc, args.holdout, seed)
        t0 = time.perf_counter()
        cached = _cache_dir(args, quant, seed)
        loaded = cached is not None and (cached / "run.json").is_file()
        if loaded:
            qm = load_quantized(cached, model)
            meta = json.loads((cached / "run.json").read_text())
            qm.start_report, t_start = meta["start_report"], meta["start_seconds"]
            print(f"{key}: start loaded from {cached} (computed in {t_start:.0f} s)", flush=True)
        else:
            qm = prepare_model(model, fit_x, quant, arch=args.model, progress=False, holdout=hold_x)  # ofq: hold-out KL
            t_start = time.perf_counter() - t0
            if cached is not None:
                save_quantized(qm, cached)
                write_json(cached / "run.json", {"start_seconds": t_start, "start_report": qm.start_report})
        qm.model.to(dev)
        if fp_logits is None:
            qm.set_quant_enabled(False)
            fp_logits = predict(qm.model, xe.to(dev), 50).cpu()
            qm.set_quant_enabled(True)
            from evolq.evaluate import metrics

            res["fp32"] = _short(metrics(fp_logits, ye))
        m0, _ = evaluate_qmodel(qm, xe.to(dev), ye.to(dev), fp_logits=fp_logits.to(dev), batch_size=50)
        run = {"seed": seed, "start": _short(m0["quantized"]), "start_seconds": round(t_start, 1), "cpu": cpu_info(),
               "start_loaded": loaded,
               "scope": args.scope, "loss": args.loss, "noise": args.noise, "eps": args.eps,
               "last": args.last, "passes": args.passes, "cycles": args.cycles,
               "population": args.population, "samples": min(args.samples, args.population),
               "calib_images": int(fit_x.shape[0]), "linear_input_strength": quant.linear_input_strength,
               "start_report": {k: v for k, v in (qm.start_report or {}).items() if k != "blocks"}}
        if qm.start_report:
            keep = ("block", "status", "error_start", "error_end", "seconds")
            run["start_blocks"] = [{k: v for k, v in b.items() if k in keep}
                                   for b in qm.start_report.get("blocks", [])]  # ofq reports epochs, not blocks
        print(f"{key}: start {run['start']} ({t_start:.0f} s)", flush=True)
        if args.gap:
            run["gap"] = {}
            for part, kind in GAP_PARTS:
                with only_kind(qm, kind):
                    mg, _ = evaluate_qmodel(qm, xe.to(dev), ye.to(dev), fp_logits=fp_logits.to(dev), batch_size=50)
                run["gap"][part] = _short(mg["quantized"])
                print(f"  {part}: {run['gap'][part]}", flush=True)
        if search:
            s = SearchConfig(passes=args.passes, cycles=args.cycles, scope=args.scope, unit=args.unit, loss=args.loss,
                             noise=args.noise, eps=args.eps,
                             infonce_batch=args.infonce_batch, seed=seed, holdout=args.holdout, device=dev,
                             progress=False,
                             max_batch=32 if dev == "cpu" else 512, population=args.population,
                             samples=min(args.samples, args.population))
            t1 = time.perf_counter()
            run["searched_blocks"] = search_last_blocks(qm, args.last, args.scope)
            qm, rep = quantize_model(qm, xc, EvolQConfig(quant, s))
            m1, _ = evaluate_qmodel(qm, xe.to(dev), ye.to(dev), fp_logits=fp_logits.to(dev), batch_size=50)
            run["evolq"] = _short(m1["quantized"])
            run["search_seconds"] = round(time.perf_counter() - t1, 1)
            run["evaluations"] = rep["evaluations"]
            run["pass_log"] = rep["passes"]  # hold-out score before / after each pass: calibration-pool data
            print(f"{key}: evol-q {run['evolq']} ({run['search_seconds']:.0f} s)", flush=True)
        run["seconds"] = round(time.perf_counter() - t0, 1)
        res["runs"][key] = run
        res["device"] = str(torch.cuda.get_device_name(0)) if dev.startswith("cuda") else "cpu"
        write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
