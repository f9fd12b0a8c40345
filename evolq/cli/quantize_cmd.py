"""``evolq quantize``: the start point, then Evol-Q's search; writes report.json, the model and a
checkpoint after every block (``--resume`` finishes an interrupted run)."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import SearchConfig
from ..errors import EvolQError
from .args import add_model_args, add_scale_out_args, key_value_arg, s_default
from .shared import load_inputs, quant_config, ray_connected, short_metrics, table


def add_parser(sub):
    pq = sub.add_parser("quantize", help="start point + Evol-Q search; writes report.json and the model")
    add_model_args(pq, quantize=True)
    from ..config import SCOPES, UNITS
    from ..losses import list_losses
    from ..search import list_searchers

    pq.add_argument("--searcher", default=s_default("searcher"), choices=list_searchers(),
                    help="the search algorithm")
    pq.add_argument("--searcher-arg", type=key_value_arg, action="append", default=[], metavar="KEY=VALUE",
                    help="extra searcher argument, repeatable (e.g. abs_child=false for the tournament)")
    pq.add_argument("--popsize", type=int, default=s_default("popsize"),
                    help="generation size of cmaes/snes/pgpe (default: their own); the candidates --actors share")
    pq.add_argument("--loss", default=s_default("loss"), choices=list_losses(), help="the fitness loss")
    pq.add_argument("--passes", type=int, default=s_default("passes"))
    pq.add_argument("--cycles", type=int, default=s_default("cycles"), help="fitness evaluations per block and pass")
    pq.add_argument("--scope", default=s_default("scope"), choices=SCOPES,
                    help="attn-weights (authors' code: qkv and proj weights), weights (every weight of the block) "
                         "or block (paper: every scale)")
    pq.add_argument("--unit", default=s_default("unit"), choices=UNITS,
                    help="search unit: block (default) or layer (each conv/linear layer's weight scales alone)")
    pq.add_argument("--noise", default=s_default("noise"), choices=("absolute", "relative"),
                    help="absolute (+U(-eps,eps)) or relative")
    pq.add_argument("--eps", type=float, default=s_default("eps"), help="mutation range (default by weight bits)")
    pq.add_argument("--infonce-batch", type=int, default=s_default("infonce_batch"))
    pq.add_argument("--holdout", type=float, default=s_default("holdout"),
                    help="calibration fraction that decides passes")
    pq.add_argument("--holdout-metric", default=s_default("holdout_metric"), choices=("kl", "agreement", "loss"),
                    help="what the hold-out compares before and after a pass (default kl to the float outputs)")
    pq.add_argument("--max-batch", type=int, default=s_default("max_batch"),
                    help=f"candidates x images per forward chunk (default {s_default('max_batch')}, CPU-cache "
                         f"friendly; raise on GPU)")
    pq.add_argument("--seed", type=int, default=s_default("seed"))
    pq.add_argument("--device", default=s_default("device"))
    pq.add_argument("--out", required=True, help="output folder (report.json, model/, checkpoint)")
    pq.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    pq.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scale_out_args(pq)


def _run_quantize(model, arch, quant, search, xc, xe, ye, out_dir, resume) -> dict:
    from ..api import prepare_model, quantize_model
    from ..config import EvolQConfig
    from ..data import split_calibration
    from ..evaluate import evaluate_qmodel
    from ..io import save_quantized, write_json

    t0 = time.perf_counter()
    fit, hold = split_calibration(xc, search.holdout, search.seed)  # the hold-out never calibrates (nor trains)
    qmodel = prepare_model(model, fit, quant, arch=arch, progress=search.progress, checkpoint_dir=out_dir,
                           resume=resume, holdout=hold)
    start, fp_logits = evaluate_qmodel(qmodel, xe, ye, progress=search.progress)
    qmodel, rep = quantize_model(qmodel, xc, EvolQConfig(quant, search), checkpoint_dir=out_dir, resume=resume)
    final, _ = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp_logits, progress=search.progress)
    report = {"model": arch, "fp32": short_metrics(start["fp32"]), "start": short_metrics(start["quantized"]),
              "final": short_metrics(final["quantized"]), "evaluations": rep["evaluations"],
              "seconds": time.perf_counter() - t0, "search_seconds": rep["search_seconds"],
              "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "search": rep}
    if qmodel.start_report is not None:
        report["start_point"] = qmodel.start_report
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_quantized(qmodel, out_dir / "model")
        write_json(out_dir / "report.json", report)
    return report


def run(args) -> int:
    search = SearchConfig(searcher=args.searcher, searcher_kwargs=dict(args.searcher_arg), popsize=args.popsize,
                          loss=args.loss,
                          passes=args.passes, cycles=args.cycles, scope=args.scope, unit=args.unit, noise=args.noise,
                          eps=args.eps, infonce_batch=args.infonce_batch, holdout=args.holdout,
                          holdout_metric=args.holdout_metric, max_batch=args.max_batch,
                          seed=args.seed, device=args.device, progress=not args.quiet, actors=args.actors,
                          ray_address=args.ray_address)
    from ..checkpoint import check_run_folder
    from ..config import EvolQConfig

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvolQError(f"--out {str(out)!r} exists and is not a folder")
    check_run_folder(out, EvolQConfig(quant_config(args), search), args.resume)  # before any expensive work
    with ray_connected(search):
        model, quant, xc, xe, ye = load_inputs(args, quiet=args.quiet)
        report = _run_quantize(model, args.model, quant, search, xc, xe, ye, out, args.resume)
    print(table([("fp32", report["fp32"]), ("start", report["start"]), ("evol-q", report["final"])]))
    print(f"{report['evaluations']} fitness evaluations, {report['seconds']:.0f} s; wrote {out / 'report.json'}")
    return 0
