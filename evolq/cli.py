"""Command line: ``evolq eval``, ``evolq quantize``, ``evolq allocate``, ``evolq demo``, ``evolq landscape``,
``evolq export``.

User mistakes print one line (``evolq: error: ...``) and exit with code 2;
Ctrl-C exits with 130 after the last finished block has been checkpointed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .config import QuantConfig, SearchConfig, field_default
from .errors import EvolQError

__all__ = ["main", "build_parser", "quant_config"]


def _q(name):
    return field_default(QuantConfig, name)


def _s(name):
    return field_default(SearchConfig, name)


# `evolq demo`: the uniform row's regime is the lowest calibration-pool KL at W3A8
# (`python -m benchmarks start_choices`, benchmarks/suites/start_choices.py); the sizes keep the demo under
# 5 minutes on 2 cores (`python -m benchmarks demo`, benchmarks/results/demo.json)
DEMO = {"preset": "outlier-aware", "start": "gptq", "edge_bits": 8, "w_bits": 3, "calib_size": 96, "limit": 250,
        "menu": "3,4,8", "searcher": "ilp", "evaluations": 120, "fitness_images": 32, "tables": "rtn"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``evolq: error: ...``, exit 2), like evolq's own."""

    def error(self, message):
        self.exit(2, f"evolq: error: {message} (see {self.prog} --help)\n")


def _searcher_arg(text: str):
    """KEY=VALUE, the value read as JSON where it parses (numbers, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _actors_arg(text: str):
    """--actors: a count (0: in-process), max or num_gpus."""
    if text in ("max", "num_gpus"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of actors, max or num_gpus, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of actors >= 0, got {n}")
    return n


def add_scale_out_args(p, what: str = ""):
    """``--actors`` and ``--ray-address`` (``SearchConfig``/``AllocationConfig`` ``actors`` and
    ``ray_address``), for every command that searches."""
    p.add_argument("--actors", type=_actors_arg, default=_s("actors"), metavar="N|max|num_gpus",
                   help=f"evaluate {what or 'the fitness'} on N Ray actors (one CPU each; max: one per free CPU; "
                        f"num_gpus: one per GPU); 0 (default): in this process. The result is the same" +
                        ("" if what else "; only population searchers (batched-tournament, cmaes, snes, pgpe) gain "
                                         "from actors") + " (docs/scale-out.md)")
    p.add_argument("--ray-address", default=_s("ray_address"), metavar="auto|HOST:PORT",
                   help="join a running Ray cluster (ray start --head ...) instead of starting a local Ray with this "
                        "machine's cores")


def _add_model_args(p, quantize: bool, w_default=8):
    p.add_argument("--model", required=True, help="timm model name (or torchvision:NAME)")
    p.add_argument("--weights", help="local weights file (.safetensors or tensors-only .pth); "
                                     "default: the assets folder, else timm's hub")
    p.add_argument("--data", help="image folder: labels.csv layout (even labels calibrate, odd labels "
                                  "evaluate) or ImageFolder tree; default: the bundled ImageNet sample")
    p.add_argument("--w-bits", type=int, default=w_default if not quantize else None, required=quantize,
                   help="weight bits (2-8)" if w_default is not None else
                   "weight bits of layers the allocation does not name, and what the regime's strengths follow "
                   "(default: the avg-bits budget rounded down, else 4)")
    p.add_argument("--a-bits", type=int, default=8 if not quantize else None, required=quantize,
                   help="activation bits (4-8)")
    p.add_argument("--calib-size", type=int, default=500, help="calibration images (default 500)")
    p.add_argument("--limit", type=int, default=None, help="evaluation images (default: all of the split)")
    from .quant import OBSERVERS

    p.add_argument("--act-observer", default=_q("act_observer"), choices=tuple(OBSERVERS),
                   help=f"activation observer (default {_q('act_observer')})")
    p.add_argument("--attn-probs", default=_q("attn_probs"), choices=("uniform", "log2"))
    p.add_argument("--no-ptf", action="store_true", help="plain uniform quantizers on LayerNorm inputs")
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--preset", default="fq-vit", choices=tuple(QuantConfig.PRESETS),
                   help="quantization regime: fq-vit (the authors' start point, default), outlier-aware "
                        "(PTF with per-channel zero-points; per-channel linear inputs folded into the weights) or "
                        "deploy (what CPU integer kernels run: per-tensor u8 layer inputs, s8 symmetric per-channel "
                        "weights, nothing else; export with evolq export --format pt2|onnx)")
    p.add_argument("--smooth-strength", type=float, default=None,
                   help="deploy: SmoothQuant migration strength, 0..1 (0 = off; default by weight bits, "
                        "QuantConfig.deploy_strength)")
    p.add_argument("--deploy-weights", default=None, choices=("auto", "symmetric", "asymmetric"),
                   help="deploy, weights below 8 bits: asymmetric (a per-channel zero-point; the integers q - z "
                        "are still stored as s8 with zero-point 0) or symmetric; auto (default): asymmetric")
    p.add_argument("--linear-input-strength", type=float, default=None,
                   help="outlier-aware: share of each Linear input channel's range moved into the weights "
                        "(0..1; default by weight bits and start: 0.75 at 8; at 4 and below 0.25 with rtn, "
                        "0.625 at 4 and 0.5 below with gptq/brecq)")
    p.add_argument("--edge-bits", type=int, default=None,
                   help="at least this many bits for the first layer and the classifier, weights and inputs "
                        "(e.g. 8, as BRECQ/QDrop do; default or 0: every layer alike)")
    p.add_argument("--layer-bits", default=None, metavar="FILE.json",
                   help="per-layer widths: a JSON object of layer names or glob patterns -> weight bits, \"float\" "
                        "or {\"w_bits\": .., \"a_bits\": ..} (QuantConfig.layer_bits; evolq allocate writes one "
                        "in its report)")
    from .qnn.rotate import ROTATIONS

    p.add_argument("--rotation", default=_q("rotation"), choices=ROTATIONS,
                   help="orthogonal rotations fused into the float model before quantization (timm ViT/DeiT: "
                        "residual stream and attention heads, exact, no run-time cost): hadamard (randomised "
                        "Hadamard) or random (random orthogonal); default none. Other families stay unrotated")
    p.add_argument("--rotation-seed", type=int, default=_q("rotation_seed"),
                   help="seed of the rotation's random signs / matrices (default 0)")
    p.add_argument("--rotation-mlp", action="store_true",
                   help="with --rotation: also an online Hadamard on every MLP hidden before fc2 (costs run time)")
    _add_start_args(p)


def _add_start_args(p):
    from .config import STARTS

    p.add_argument("--start", default=_q("start"), choices=STARTS,
                   help="weight rounding of the start point: rtn (round-to-nearest, default), gptq (Hessian-based "
                        "error compensation), brecq (block reconstruction, AdaRound + QDrop) or ofq (a short "
                        "distillation fine-tune of the quantized weights, OFQ's StatsQ/CGA as switches; eval holds "
                        "out 10%% of the calibration images from it)")
    p.add_argument("--start-arg", type=_searcher_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="gptq/brecq/ofq setting, repeatable (e.g. iters=500, batch_size=32, qdrop=0, device=cuda, "
                        "act_order=false; init=gptq: brecq learns the rounding of GPTQ's weights; ofq: epochs=2, "
                        "lr=1e-4, statsq=false, cga=true, qkr=false: no OFQ query-key reparameterization (default "
                        "auto: on for timm ViTs outside the deploy regime), qkr_bias=drop: OFQ's form without the "
                        "q/k biases)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evolq", description="Post-training quantization by evolutionary "
                                                                "search over quantization scales (Evol-Q).")
    sub = parser.add_subparsers(dest="command", required=True)

    pe = sub.add_parser("eval", help="FP32 vs start-point (FQ-ViT regime) metrics")
    _add_model_args(pe, quantize=False)
    pe.add_argument("--json", action="store_true", help="print one JSON object")

    pq = sub.add_parser("quantize", help="start point + Evol-Q search; writes report.json and the model")
    _add_model_args(pq, quantize=True)
    from .config import SCOPES
    from .losses import list_losses
    from .search import list_searchers

    pq.add_argument("--searcher", default=_s("searcher"), choices=list_searchers(), help="the search algorithm")
    pq.add_argument("--searcher-arg", type=_searcher_arg, action="append", default=[], metavar="KEY=VALUE",
                    help="extra searcher argument, repeatable (e.g. abs_child=false for the tournament)")
    pq.add_argument("--popsize", type=int, default=_s("popsize"),
                    help="generation size of cmaes/snes/pgpe (default: their own); the candidates --actors share")
    pq.add_argument("--loss", default=_s("loss"), choices=list_losses(), help="the fitness loss")
    pq.add_argument("--passes", type=int, default=_s("passes"))
    pq.add_argument("--cycles", type=int, default=_s("cycles"), help="fitness evaluations per block and pass")
    pq.add_argument("--scope", default=_s("scope"), choices=SCOPES,
                    help="attn-weights (authors' code: qkv and proj weights), weights (every weight of the block) "
                         "or block (paper: every scale)")
    from .config import UNITS

    pq.add_argument("--unit", default=_s("unit"), choices=UNITS,
                    help="search unit: block (default) or layer (each conv/linear layer's weight scales alone)")
    pq.add_argument("--noise", default=_s("noise"), choices=("absolute", "relative"),
                    help="absolute (+U(-eps,eps)) or relative")
    pq.add_argument("--eps", type=float, default=_s("eps"), help="mutation range (default by weight bits)")
    pq.add_argument("--infonce-batch", type=int, default=_s("infonce_batch"))
    pq.add_argument("--holdout", type=float, default=_s("holdout"), help="calibration fraction that decides passes")
    pq.add_argument("--holdout-metric", default=_s("holdout_metric"), choices=("kl", "agreement", "loss"),
                    help="what the hold-out compares before and after a pass (default kl to the float outputs)")
    pq.add_argument("--max-batch", type=int, default=_s("max_batch"),
                    help=f"candidates x images per forward chunk (default {_s('max_batch')}, CPU-cache friendly; "
                         f"raise on GPU)")
    pq.add_argument("--seed", type=int, default=_s("seed"))
    pq.add_argument("--device", default=_s("device"))
    pq.add_argument("--out", required=True, help="output folder (report.json, model/, checkpoint)")
    pq.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    pq.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scale_out_args(pq)

    pa = sub.add_parser("allocate", help="choose bits per layer under a size or latency budget by evolutionary "
                                         "search (NSGA-II on [loss, size] or [loss, size, latency]), then build, "
                                         "evaluate and save that model")
    _add_model_args(pa, quantize=False, w_default=None)
    from .config import AllocationConfig
    from .search.allocators import list_allocators

    def _a(name):
        return field_default(AllocationConfig, name)

    pa.add_argument("--menu", default=_a("menu"), help=f"the widths a layer may take, comma-separated (2..8 and "
                                                       f"float; default {_a('menu')})")
    pa.add_argument("--budget", default=_a("budget"),
                    help=f"avg-bits=B (parameter-weighted mean weight bits), size-mb=S (packed size) or latency-ms=T "
                         f"(default {_a('budget')})")
    pa.add_argument("--searcher", default=_a("searcher"), choices=list_allocators(),
                    help="nsga2 (evolutionary, default), ilp (sensitivity + integer linear program), greedy (bit "
                         "dropping) or random")
    pa.add_argument("--searcher-arg", type=_searcher_arg, action="append", default=[], metavar="KEY=VALUE",
                    help="extra searcher argument, repeatable (nsga2: rate=0.05, neighbour=0.7, ilp_seeds=12)")
    pa.add_argument("--evaluations", type=int, default=_a("evaluations"),
                    help=f"fitness evaluations of the search, the sensitivities included (default {_a('evaluations')})")
    pa.add_argument("--popsize", type=int, default=_a("popsize"), help=f"population (default {_a('popsize')})")
    pa.add_argument("--fitness-images", type=int, default=_a("fitness_images"),
                    help=f"calibration images of the fitness (default {_a('fitness_images')})")
    pa.add_argument("--holdout", type=float, default=_a("holdout"),
                    help=f"calibration fraction kept out of everything; it chooses among the front (default "
                         f"{_a('holdout')})")
    pa.add_argument("--loss", default=_a("loss"), choices=list_losses(), help="the fitness loss (default kl)")
    pa.add_argument("--tables", default=_a("tables"), choices=("auto", "gptq", "rtn"),
                    help="how the fitness quantizes each layer at each width (auto: rtn for the rtn start, else gptq)")
    pa.add_argument("--latency-batch", type=int, default=_a("latency_batch"),
                    help=f"with latency-ms: images per call the layers are timed at (default {_a('latency_batch')})")
    pa.add_argument("--latency-threads", type=int, default=_a("latency_threads"),
                    help=f"with latency-ms: threads of the deploy runtime (default {_a('latency_threads')})")
    pa.add_argument("--passes", type=int, default=0, help="Evol-Q scale-search passes on the chosen model (default 0)")
    pa.add_argument("--cycles", type=int, default=_s("cycles"), help="with --passes: evaluations per block and pass")
    pa.add_argument("--seed", type=int, default=_a("seed"))
    pa.add_argument("--out", required=True, help="output folder (pareto.json, pareto.png, report.json, model/)")
    pa.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    pa.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scale_out_args(pa, what="the allocation search's fitness")

    pd = sub.add_parser("demo", help="ViT-Tiny on the bundled assets in < 5 min: FP32, uniform W3A8, the same size "
                                     "with bits allocated per layer, the W8A8 deploy model exported and timed")
    pd.add_argument("--calib-size", type=int, default=DEMO["calib_size"],
                    help=f"calibration images (default {DEMO['calib_size']}; 20%% of them are the hold-out)")
    pd.add_argument("--limit", type=int, default=DEMO["limit"], help=f"evaluation images (default {DEMO['limit']})")
    pd.add_argument("--menu", default=DEMO["menu"], help=f"widths the allocation may give a layer "
                                                         f"(default {DEMO['menu']})")
    pd.add_argument("--searcher", default=DEMO["searcher"], help=f"allocation searcher (default {DEMO['searcher']})")
    pd.add_argument("--evaluations", type=int, default=DEMO["evaluations"],
                    help=f"allocation fitness evaluations (default {DEMO['evaluations']})")
    pd.add_argument("--fitness-images", type=int, default=DEMO["fitness_images"],
                    help=f"images of the allocation's fitness (default {DEMO['fitness_images']})")
    pd.add_argument("--tables", default=DEMO["tables"], choices=("auto", "gptq", "rtn"),
                    help=f"how the allocation's fitness quantizes each layer at each width (default {DEMO['tables']})")
    pd.add_argument("--pairs", type=int, default=3, help="timed pairs of the speed measurement (default 3)")
    pd.add_argument("--no-export", action="store_true", help="skip the pt2 export and its timing")
    pd.add_argument("--out", default=None, help="also write report.json and the models here")
    pd.add_argument("--quiet", action="store_true", help="no progress bars")

    pl = sub.add_parser("landscape", help="loss surfaces of one block's scales along two random directions "
                                          "(heat map + 3-D PNG and JSON)")
    _add_model_args(pl, quantize=False)
    pl.add_argument("--block", default="-1", help="searchable block: index (3 -> blocks.3; -1 the last) or name "
                                                  "(blocks.5.0)")
    pl.add_argument("--layer", default="attn-weights",
                    help="a scope (attn-weights, weights, activations, block) or one layer's weight scales "
                         "(qkv, proj, fc1, fc2; "
                         "conv_pw, conv_dw, ...)")
    pl.add_argument("--grid", type=int, default=9, help="points per axis (default 9)")
    pl.add_argument("--radius", type=float, default=0.1, help="largest relative change (RMS) per axis")
    pl.add_argument("--losses", default="infonce,mse", help="calibration losses, comma-separated")
    pl.add_argument("--infonce-batch", type=int, default=100)
    pl.add_argument("--max-batch", type=int, default=512, help="candidates x images per forward chunk")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.png")

    px = sub.add_parser("export", help="a saved quantized model (RUN_DIR/model) as an ONNX QDQ file or a torch.export "
                                       "program (pt2); --check runs it in its runtime against the PyTorch model, "
                                       "--bench times it against the same model's FP32")
    px.add_argument("model_dir", help="folder written by evolq quantize (RUN_DIR/model) or save_quantized")
    px.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    px.add_argument("--format", default="onnx", choices=("onnx", "pt2"),
                    help="onnx (QDQ graph for onnxruntime / OpenVINO; default) or pt2 (torch.export program in PT2E "
                         "form for PyTorch's x86 int8 path; deploy regime only)")
    px.add_argument("--runtime", default=None, choices=("onnxruntime", "openvino", "inductor"),
                    help="runtime of --check/--bench (default: onnxruntime for onnx, inductor for pt2)")
    px.add_argument("--model", default=None, help="build the float model from this name (timm name or "
                                                  "torchvision:NAME) instead of the saved architecture")
    px.add_argument("--weights", default=None, help="with --model: local weights file of the float model")
    px.add_argument("--opset", type=int, default=21, help="ONNX opset (13-21; 4-bit weights need 21; default 21)")
    px.add_argument("--check", action="store_true", help="run the file in its runtime (CPU) on the evaluation images: "
                                                         "top-1 of both, agreement, float floor, kernels executed")
    px.add_argument("--bench", action="store_true", help="time the file against the same model's FP32 in the same "
                                                         "runtime: batch 32 and 1, 2 and 1 threads, alternating pairs")
    px.add_argument("--pairs", type=int, default=5, help="with --bench: timed pairs per setting (default 5)")
    px.add_argument("--threads", type=int, default=2, help="with --check: runtime threads (default 2)")
    px.add_argument("--data", help="with --check: image folder (default: the bundled ImageNet sample, odd labels)")
    px.add_argument("--limit", type=int, default=None, help="with --check: evaluation images (default: all)")
    px.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")
    return parser


def _read_layer_bits(path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as e:
        raise EvolQError(f"--layer-bits: cannot read {str(path)!r} ({e.strerror or e})") from None
    except ValueError as e:
        raise EvolQError(f"--layer-bits: {str(path)!r} is not JSON ({str(e).splitlines()[0][:80]})") from None
    if isinstance(spec, dict) and isinstance(spec.get("allocation"), dict):  # an evolq allocate report.json
        spec = spec["allocation"]
    if not isinstance(spec, dict):
        raise EvolQError(f"--layer-bits: {str(path)!r} must hold a JSON object of layer names to bits")
    return spec


def quant_config(args) -> QuantConfig:
    """The ``QuantConfig`` that parsed ``eval`` / ``quantize`` arguments describe."""
    extra = {} if args.linear_input_strength is None else {"linear_input_strength": args.linear_input_strength}
    if args.smooth_strength is not None:
        extra["smooth_strength"] = args.smooth_strength
    if args.deploy_weights is not None:
        extra["deploy_weights"] = args.deploy_weights
    if getattr(args, "layer_bits", None):
        extra["layer_bits"] = _read_layer_bits(args.layer_bits)
    for name in ("rotation", "rotation_seed", "rotation_mlp"):
        if getattr(args, name, None) is not None:
            extra[name] = getattr(args, name)
    return QuantConfig.preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, act_observer=args.act_observer,
                              attn_probs=args.attn_probs, ptf=not args.no_ptf,
                              bias_correction=not args.no_bias_correction and args.preset != "deploy", start=args.start,
                              start_options=dict(args.start_arg), edge_bits=args.edge_bits or None, **extra)


def _load(args, quiet=False):
    from .data import assets_dir, load_images
    from .models import load_model, model_transform

    quant = quant_config(args)
    for name in ("calib_size", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvolQError(f"--{name.replace('_', '-')} must be positive, got {v}")
    model = load_model(args.model, args.weights)
    tf = model_transform(model)
    data = Path(args.data) if args.data else assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=args.calib_size, progress=not quiet)
    xe, ye = load_images(data, tf, "eval", limit=args.limit, progress=not quiet)
    return model, quant, xc, xe, ye


def _short(m):
    return {k: m[k] for k in ("top1", "top5", "agreement", "kl") if k in m}


def _table(rows) -> str:
    lines = [f"{'model':<12}{'top1':>8}{'top5':>8}{'agree':>8}{'KL':>9}"]
    for name, m in rows:
        lines.append(f"{name:<12}{m['top1']:8.2f}{m['top5']:8.2f}{m['agreement']:8.2f}{m['kl']:9.4f}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .api import prepare_model
    from .evaluate import evaluate_qmodel

    model, quant, xc, xe, ye = _load(args, quiet=args.json)
    hold = None
    if quant.start == "ofq":  # the fine-tune's overfitting shows on images it never sees (quantize's hold-out)
        from .data import split_calibration

        xc, hold = split_calibration(xc, _s("holdout"), _s("seed"))
    qmodel = prepare_model(model, xc, quant, arch=args.model, progress=not args.json, holdout=hold)
    res, _ = evaluate_qmodel(qmodel, xe, ye, progress=not args.json)
    out = {"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits, "calib_images": int(xc.shape[0]),
           "eval_images": int(xe.shape[0]), "fp32": _short(res["fp32"]), "quantized": _short(res["quantized"])}
    rep = qmodel.start_report
    if rep is not None and rep.get("start") == "ofq":
        out["start"] = {k: rep[k] for k in ("holdout_images", "holdout_kl", "fitness_kl", "epochs_run", "status",
                                            "warnings", "seconds") if k in rep}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} W{args.w_bits}A{args.a_bits}: {xc.shape[0]} calibration / {xe.shape[0]} evaluation images")
        print(_table([("fp32", res["fp32"]), ("quantized", res["quantized"])]))
        if "start" in out:
            st = out["start"]
            kl = st.get("holdout_kl") or st.get("fitness_kl") or {}
            print(f"ofq fine-tune: {st['epochs_run']} epochs, {st['status']}; hold-out KL {kl.get('before', 0):.4f} "
                  f"-> {kl.get('after', 0):.4f} ({st['holdout_images']} images)")
            for w in st.get("warnings", []):
                print(f"warning: {w}")
    return 0


def _run_quantize(model, arch, quant, search, xc, xe, ye, out_dir, resume) -> dict:
    from .api import prepare_model, quantize_model
    from .config import EvolQConfig
    from .data import split_calibration
    from .evaluate import evaluate_qmodel
    from .io import save_quantized, write_json

    t0 = time.perf_counter()
    fit, hold = split_calibration(xc, search.holdout, search.seed)  # the hold-out never calibrates (nor trains)
    qmodel = prepare_model(model, fit, quant, arch=arch, progress=search.progress, checkpoint_dir=out_dir,
                           resume=resume, holdout=hold)
    start, fp_logits = evaluate_qmodel(qmodel, xe, ye, progress=search.progress)
    qmodel, rep = quantize_model(qmodel, xc, EvolQConfig(quant, search), checkpoint_dir=out_dir, resume=resume)
    final, _ = evaluate_qmodel(qmodel, xe, ye, fp_logits=fp_logits, progress=search.progress)
    report = {"model": arch, "fp32": _short(start["fp32"]), "start": _short(start["quantized"]),
              "final": _short(final["quantized"]), "evaluations": rep["evaluations"],
              "seconds": time.perf_counter() - t0, "search_seconds": rep["search_seconds"],
              "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "search": rep}
    if qmodel.start_report is not None:
        report["start_point"] = qmodel.start_report
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_quantized(qmodel, out_dir / "model")
        write_json(out_dir / "report.json", report)
    return report


def cmd_quantize(args) -> int:
    search = SearchConfig(searcher=args.searcher, searcher_kwargs=dict(args.searcher_arg), popsize=args.popsize,
                          loss=args.loss,
                          passes=args.passes, cycles=args.cycles, scope=args.scope, unit=args.unit, noise=args.noise,
                          eps=args.eps, infonce_batch=args.infonce_batch, holdout=args.holdout,
                          holdout_metric=args.holdout_metric, max_batch=args.max_batch,
                          seed=args.seed, device=args.device, progress=not args.quiet, actors=args.actors,
                          ray_address=args.ray_address)
    from .checkpoint import check_run_folder
    from .config import EvolQConfig

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvolQError(f"--out {str(out)!r} exists and is not a folder")
    check_run_folder(out, EvolQConfig(quant_config(args), search), args.resume)  # before any expensive work
    with ray_connected(search):
        model, quant, xc, xe, ye = _load(args, quiet=args.quiet)
        report = _run_quantize(model, args.model, quant, search, xc, xe, ye, out, args.resume)
    print(_table([("fp32", report["fp32"]), ("start", report["start"]), ("evol-q", report["final"])]))
    print(f"{report['evaluations']} fitness evaluations, {report['seconds']:.0f} s; wrote {out / 'report.json'}")
    return 0


@contextmanager
def ray_connected(*configs):
    """Start or join Ray for each config's ``actors`` on entering (``evolq.api.connect_ray``), so
    an unusable cluster fails before anything is loaded or written; its warning is printed once,
    as one line."""
    import warnings

    from .api import connect_ray
    from .scaleout import ScaleOutWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ScaleOutWarning)
        for config in configs:
            connect_ray(config)
    for w in seen:
        if issubclass(w.category, ScaleOutWarning):
            print(f"evolq: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ScaleOutWarning)  # quantize_model's connect_ray finds Ray up
        yield


def _alloc_w_bits(args, budget: str) -> int:
    from .config import parse_budget

    if args.w_bits is not None:
        return args.w_bits
    kind, value = parse_budget(budget)
    return max(2, min(8, int(value))) if kind == "avg-bits" else 4


def cmd_allocate(args) -> int:
    from .api import allocate_bits
    from .config import AllocationConfig, parse_budget
    from .evaluate import evaluate_qmodel
    from .io import save_quantized, write_json

    config = AllocationConfig(menu=args.menu, budget=args.budget, searcher=args.searcher,
                              searcher_kwargs=dict(args.searcher_arg), evaluations=args.evaluations,
                              popsize=args.popsize, fitness_images=args.fitness_images, holdout=args.holdout,
                              loss=args.loss, tables=args.tables, latency_batch=args.latency_batch,
                              latency_threads=args.latency_threads, seed=args.seed, progress=not args.quiet,
                              actors=args.actors, ray_address=args.ray_address)
    parse_budget(args.budget)
    args.w_bits = _alloc_w_bits(args, args.budget)
    quant = quant_config(args)
    search = None
    if args.passes:
        # the tournament of --passes evaluates one candidate per step: it stays in this process (docs/scale-out.md)
        search = SearchConfig(passes=args.passes, cycles=args.cycles, progress=not args.quiet)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvolQError(f"--out {str(out)!r} exists and is not a folder")
    from .allocation.latency import check_latency_budget
    from .api import check_alloc_folder

    check_latency_budget(quant, config)  # before any expensive work
    check_alloc_folder(out, args.resume, create=False)
    with ray_connected(config):
        model, quant, xc, xe, ye = _load(args, quiet=args.quiet)
        t0 = time.perf_counter()
        qmodel, rep = allocate_bits(model, xc, quant, config, arch=args.model, checkpoint_dir=out,
                                    resume=args.resume, search=search)
    res, _ = evaluate_qmodel(qmodel, xe, ye, progress=not args.quiet)
    rep.update({"model": args.model, "fp32": _short(res["fp32"]), "final": _short(res["quantized"]),
                "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]),
                "seconds": time.perf_counter() - t0})
    save_quantized(qmodel, out / "model")
    pareto = {"model": args.model, "budget": rep["budget"], "menu": config.menu,
              "layers": list(rep["allocation"]), "front": rep["front"], "uniform": rep["uniform"],
              "chosen": rep["chosen_index"]}
    write_json(out / "pareto.json", pareto)
    from .allocation.plot import plot_fronts

    bud = rep["budget"]
    plot_fronts({config.searcher if isinstance(config.searcher, str) else "search": rep["front"]}, out / "pareto.png",
                uniform=rep["uniform"], chosen=rep["chosen"],
                budget_bytes=bud["value"] * 1e6 if bud["kind"] == "size-mb" else None,
                title=f"{args.model} {bud['kind']}={bud['value']:g} ({config.searcher}, "
                      f"{rep['search']['evaluations']} evaluations)")
    write_json(out / "report.json", rep)
    print(_table([("fp32", rep["fp32"]), ("allocated", rep["final"])]))
    counts = {}
    for o in rep["allocation"].values():
        counts[o] = counts.get(o, 0) + 1
    mix = ", ".join(f"{n} layers at {o}" for o, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
    lat = ""
    if "latency" in rep:
        r = rep["latency"]
        err = r.get("max_abs_error_mixed")
        lat = (f", {rep['latency_ms']:.2f} ms predicted (batch {r['batch']}, {r['threads']} threads; the table's "
               f"error on whole-model timings {100 * err:.1f}% at most)" if err is not None else
               f", {rep['latency_ms']:.2f} ms predicted (batch {r['batch']}, {r['threads']} threads)")
    print(f"allocation: {mix}; {rep['avg_bits']:.3f} mean weight bits, {rep['size_bytes'] / 1e6:.3f} MB packed{lat} "
          f"({bud['kind']}={bud['value']:g})")
    print(f"{rep['search']['evaluations']} fitness evaluations, search {rep['search_seconds']:.0f} s, total "
          f"{rep['seconds']:.0f} s; wrote {out / 'report.json'}, {out / 'pareto.json'}, {out / 'pareto.png'} and "
          f"{out / 'model'} (evolq export {out / 'model'} --out model.onnx)")
    return 0


def _packed_bytes(qmodel, quant) -> float:
    """The packed size of ``qmodel`` at the widths its layers hold (``evolq.allocation.menu.SizeModel``)."""
    from .allocation.menu import Menu, SizeModel, option_bits
    from .qnn.layer_bits import layer_bits_summary

    held = layer_bits_summary(qmodel.model)["layers"]
    menu = Menu(tuple(sorted({v["w_bits"] for v in held.values()}, key=option_bits)))
    sym = quant.deploy_symmetric if quant.deploy else None
    sizes = SizeModel(qmodel.model, menu, asymmetric=(lambda o: not sym(o)) if sym else True)
    return sizes.bytes_of_bits({n: held[n]["w_bits"] for n in sizes.layers})


def _demo_table(rows) -> str:
    lines = [f"{'model':<36}{'top1':>7}{'top5':>7}{'agree':>7}{'KL':>8}{'weights MB':>12}"]
    for name, m, mb in rows:
        lines.append(f"{name:<36}{m['top1']:7.2f}{m['top5']:7.2f}{m['agreement']:7.2f}{m['kl']:8.4f}{mb:12.2f}")
    return "\n".join(lines)


def demo_commands(args, budget: str = "size-mb=S") -> dict:
    """The ``evolq`` commands behind the demo's rows (at the demo's sizes), at full size, and the
    ones that ship the models. The demo builds its rows from these very commands' parsed arguments."""
    arch = "vit_tiny_patch16_224"
    common = (f"--model {arch} --preset {DEMO['preset']} --edge-bits {DEMO['edge_bits']} --start {DEMO['start']} "
              f"--w-bits {DEMO['w_bits']} --a-bits 8")
    size = f"--calib-size {args.calib_size} --limit {args.limit}"
    kind, _, value = budget.partition("=")
    full_budget = f"{kind}={math.floor(float(value) * 1000) / 1000:.3f}" if value[:1].isdigit() else budget
    return {
        "uniform": f"evolq eval {common} {size}",
        "allocated": f"evolq allocate {common} --menu {args.menu} --budget {budget} --searcher {args.searcher} "
                     f"--evaluations {args.evaluations} --fitness-images {args.fitness_images} "
                     f"--tables {args.tables} {size} --out runs/alloc",
        "deploy": f"evolq eval --model {arch} --preset deploy --w-bits 8 --a-bits 8 {size}",
        "allocated_full": f"evolq allocate {common} --menu 2,3,4,8 --budget {full_budget} --out runs/alloc_full",
        "ship": f"evolq quantize --model {arch} --preset deploy --w-bits 8 --a-bits 8 --passes 0 --out runs/w8",
        "ship_export": "evolq export runs/w8/model --format pt2 --out vit_w8.pt2 --check --bench",
        "ship_allocated": "evolq export runs/alloc/model --format onnx --out vit_mixed.onnx --check",
    }


def _parsed(command: str):
    import shlex

    return build_parser().parse_args(shlex.split(command)[1:])


def cmd_demo(args) -> int:
    """The library's main path on the bundled assets, sized to finish in < 5 minutes on 2 cores."""
    import copy
    import tempfile

    from .api import allocate_bits, prepare_model
    from .config import AllocationConfig
    from .data import assets_dir, load_images
    from .evaluate import evaluate_qmodel
    from .io import save_quantized, write_json
    from .models import load_model, model_transform

    for name in ("calib_size", "limit", "evaluations", "fitness_images", "pairs"):
        if getattr(args, name) < 1:
            raise EvolQError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    arch, t0, steps = "vit_tiny_patch16_224", time.perf_counter(), {}
    progress = not args.quiet
    n_steps = 4 if args.no_export else 5
    commands = demo_commands(args)
    uni_args, dep_args = _parsed(commands["uniform"]), _parsed(commands["deploy"])
    quant, dquant = quant_config(uni_args), quant_config(dep_args)
    hold = field_default(AllocationConfig, "holdout")
    print(f"evolq demo: {arch} (real ImageNet weights), {args.calib_size} calibration images of the bundled sample "
          f"(even labels; the allocation holds {hold:.0%} of them out), {args.limit} evaluation images (odd labels). "
          f"Small settings, to end in minutes on 2 cores; the commands at the end reproduce each row, and at full "
          f"size.", flush=True)

    def step(k, text):
        steps[k] = round(time.perf_counter() - t0, 1)
        print(f"[{len(steps)}/{n_steps} {time.perf_counter() - t0:4.0f} s] {text}", flush=True)

    step("load", "loading the model and the images")
    model = load_model(arch)
    tf = model_transform(model)
    data = assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=args.calib_size, progress=progress)
    xe, ye = load_images(data, tf, "eval", limit=args.limit, progress=progress)
    fp32_mb = 4.0 * sum(p.numel() for p in model.parameters()) / 1e6

    step("uniform", f"uniform W{quant.w_bits}A8: {DEMO['preset']} regime, {quant.start} start, first layer and "
                    f"classifier at {DEMO['edge_bits']} bits")
    uni = prepare_model(copy.deepcopy(model), xc, quant, arch=arch, progress=progress)
    res_u, fp_logits = evaluate_qmodel(uni, xe, ye, progress=progress)
    uni_bytes = _packed_bytes(uni, quant)
    del uni
    budget = f"size-mb={uni_bytes / 1e6:.6f}"
    commands = demo_commands(args, budget)
    al = _parsed(commands["allocated"])
    alloc = AllocationConfig(menu=al.menu, budget=al.budget, searcher=al.searcher, evaluations=al.evaluations,
                             fitness_images=al.fitness_images, tables=al.tables, popsize=al.popsize,
                             holdout=al.holdout, loss=al.loss, seed=al.seed, progress=progress)

    step("allocate", f"bits per layer at the uniform model's packed size: allocate_bits (menu {alloc.menu}, "
                     f"{budget}, searcher {alloc.searcher}, <= {alloc.evaluations} evaluations on "
                     f"{alloc.fitness_images} images, tables {alloc.table_method(quant.start)})")
    aq, arep = allocate_bits(copy.deepcopy(model), xc, quant_config(al), alloc, arch=arch)
    res_a, _ = evaluate_qmodel(aq, xe, ye, fp_logits=fp_logits, progress=progress)
    counts = {}
    for o in arep["allocation"].values():
        counts[o] = counts.get(o, 0) + 1
    mix = ", ".join(f"{n} at {o} bits" for o, n in sorted(counts.items(), key=lambda kv: str(kv[0])))

    step("deploy", "W8A8 deploy model (what CPU int8 kernels run: u8 inputs, s8 weights, SmoothQuant folded)")
    dep = prepare_model(copy.deepcopy(model), xc, dquant, arch=arch, progress=progress)
    res_d, _ = evaluate_qmodel(dep, xe, ye, fp_logits=fp_logits, progress=progress)
    dep_bytes = _packed_bytes(dep, dquant)

    out = Path(args.out) if args.out else None
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = out if out is not None else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    ship = None
    if not args.no_export:
        step("export", f"the W8A8 model as a pt2 program, timed against its FP32 in inductor (batch 32, 2 threads, "
                       f"{args.pairs} alternating pairs; compiling both takes most of this step)")
        try:
            from .export import export_pt2
            from .export.check import bench_export

            path = export_pt2(dep, folder / "vit_tiny_w8a8.pt2")
            b = bench_export(dep, path, "pt2", "inductor", xe[0], batches=(32,), threads=(2,), pairs=args.pairs)
            r = b["runs"][0]
            ship = {"file": path.name, "mb": path.stat().st_size / 1e6, "speedup": r["speedup"]["median"],
                    "fp32_ms": r["fp32_ms"], "int8_ms": r["int8_ms"], "cpu": b["cpu"]["model"],
                    "cpu_flags": b["cpu"]["flags"], "runtime": "inductor", "batch": 32, "threads": 2,
                    "pairs": args.pairs}
        except Exception as e:  # the export extras missing, or a runtime failure: the table still stands
            print(f"evolq demo: the pt2 export or its timing failed ({type(e).__name__}: {str(e)[:200]}); "
                  f"pip install -e '.[deploy]'", file=sys.stderr)
    seconds = time.perf_counter() - t0

    rows = [("fp32", res_u["fp32"], fp32_mb),
            (f"W3A8 uniform ({quant.start}, edge 8)", res_u["quantized"], uni_bytes / 1e6),
            (f"same size, bits per layer ({alloc.menu})", res_a["quantized"], arep["size_bytes"] / 1e6),
            ("W8A8 deploy (ships as int8)", res_d["quantized"], dep_bytes / 1e6)]
    print()
    print(_demo_table(rows))
    print(f"bits per layer: {mix}; {arep['avg_bits']:.2f} mean weight bits; {arep['search']['evaluations']} "
          f"fitness evaluations")
    if ship is not None:
        print(f"shipped: {ship['file']}, {ship['mb']:.1f} MB, {ship['speedup']:.2f}x faster than FP32 in inductor "
              f"(batch 32, 2 threads: {ship['fp32_ms']:.0f} -> {ship['int8_ms']:.0f} ms) on {ship['cpu']} "
              f"({', '.join(ship['cpu_flags'])})")
    print("Evol-Q's block-scale search is not run: from the gptq and ofq starts it adds about 0 top-1 "
          "(benchmarks/results/start_points_vit_tiny_w3a8.json).")
    print(f"top-1 on {xe.shape[0]} evaluation images; weights MB: the packed size (weights at their bits, scales, "
          f"float tensors), FP32 4 bytes per parameter; {seconds:.0f} s in all.")
    print("\nEach row (fp32 and uniform from the first command):")
    for k in ("uniform", "allocated", "deploy"):
        print(f"  {commands[k]}")
    print("Full size (500 calibration images, every evaluation image; NSGA-II, 500 evaluations):")
    print(f"  {commands['allocated_full']}")
    print("Ship the int8 model (pt2 for torch.compile; --format onnx for onnxruntime), then the allocated one:")
    for k in ("ship", "ship_export", "ship_allocated"):
        print(f"  {commands[k]}")
    report = {"model": arch, "seconds": seconds, "steps": steps,
              "settings": {"calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "menu": alloc.menu,
                           "searcher": alloc.searcher, "evaluations": alloc.evaluations,
                           "fitness_images": alloc.fitness_images, "tables": alloc.table_method(quant.start),
                           "preset": DEMO["preset"], "start": quant.start, "edge_bits": DEMO["edge_bits"],
                           "w_bits": quant.w_bits},
              "rows": [{"model": n, **_short(m), "weights_mb": round(mb, 4)} for n, m, mb in rows],
              "allocation": arep["allocation"], "avg_bits": arep["avg_bits"], "budget": budget,
              "allocation_evaluations": arep["search"]["evaluations"], "shipped": ship, "commands": commands}
    if out is not None:
        write_json(out / "report.json", report)
        save_quantized(aq, out / "alloc_model")
        save_quantized(dep, out / "w8_model")
    if tmp is not None:
        tmp.cleanup()
    return 0


def cmd_landscape(args) -> int:
    from .api import prepare_model
    from .landscape import block_landscape, save_landscape

    model, quant, xc, xe, ye = _load(args, quiet=True)
    qmodel = prepare_model(model, xc, quant, arch=args.model)
    t0 = time.perf_counter()
    res = block_landscape(qmodel, xc, xe, ye, block=args.block, layer=args.layer, grid=args.grid,
                          radius=args.radius, seed=args.seed, losses=[x for x in args.losses.split(",") if x],
                          infonce_batch=args.infonce_batch, max_batch=args.max_batch)
    res["seconds"] = time.perf_counter() - t0
    res["w_bits"], res["a_bits"] = quant.w_bits, quant.a_bits
    js, png = save_landscape(res, args.out)
    print(f"{args.model} W{quant.w_bits}A{quant.a_bits} {res['block']} [{args.layer}]: {res['dim']} scales, "
          f"{args.grid}x{args.grid} grid, +-{args.radius}, {res['seconds']:.0f} s")
    print(f"{'surface':<16}{'center':>12}{'min':>12}{'max':>12}{'roughness':>11}")
    for k, g in res["surfaces"].items():
        flat = [x for row in g for x in row]
        print(f"{k:<16}{res['center'][k]:12.4f}{min(flat):12.4f}{max(flat):12.4f}{res['roughness'][k]:11.4f}")
    print(f"wrote {js} and {png}")
    return 0


def cmd_export(args) -> int:
    from .errors import ExportError
    from .export import FORMATS
    from .export.runtimes import FORMAT_RUNTIMES, get_runtime
    from .io import load_quantized

    if args.weights and not args.model:
        raise ExportError("--weights needs --model (the float architecture the weights belong to)")
    for name in ("limit", "pairs", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvolQError(f"--{name} must be positive, got {v}")
    runtime = args.runtime or FORMAT_RUNTIMES[args.format][0]
    if args.check or args.bench:
        get_runtime(runtime, args.format)  # a missing runtime or a wrong pairing fails before any work
    model = None
    if args.model:
        from .models import create_model, load_model

        model = load_model(args.model, args.weights, hub=False) if args.weights else create_model(args.model)
    qmodel = load_quantized(args.model_dir, model=model)
    opts = {"opset": args.opset} if args.format == "onnx" else {}
    path = FORMATS[args.format](qmodel, args.out, **opts)
    out = {"model": qmodel.arch, "out": str(path), "format": args.format, "bytes": path.stat().st_size,
           "regime": getattr(qmodel.config, "regime", "fq-vit")}
    if args.format == "onnx":
        out["opset"] = args.opset
    if args.check or args.bench:
        from .data import assets_dir, load_images
        from .models import model_transform

        data = Path(args.data) if args.data else assets_dir() / "imagenet-sample"
        limit = args.limit if args.check else 1
        xe, ye = load_images(data, model_transform(qmodel.model), "eval", limit=limit, progress=not args.json)
        if args.check:
            from .export.check import check_export

            out.update(check_export(qmodel, path, args.format, runtime, xe, ye, threads=args.threads))
        if args.bench:
            from .export.check import bench_export

            b = bench_export(qmodel, path, args.format, runtime, xe[0], pairs=args.pairs)
            out.update({"speedup": b["speedup"], "cpu_flags": b["cpu"]["flags"], "cpu": b["cpu"]["model"],
                        "bench": b["runs"]})
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"wrote {path} ({out['bytes'] / 1e6:.2f} MB, {args.format})")
    if args.check:
        print(f"{runtime} vs PyTorch on {out['images']} images: top-1 PyTorch {out['top1_torch']:.2f}%, {runtime} "
              f"{out['top1_runtime']:.2f}%; agreement {out['agreement']:.2f}% (float floor {out['floor']:.2f}%), "
              f"KL {out['kl']:.4f}")
        print(f"integer kernels: {out['integer_kernels'] or 'none'}; float kernels: {out['float_kernels'] or 'none'}")
    if args.bench:
        print(f"{out['cpu']} ({', '.join(out['cpu_flags'])})")
        for r in out["bench"]:
            s = r["speedup"]
            print(f"batch {r['batch']:>3}, {r['threads']} threads: FP32 {r['fp32_ms']:.1f} ms, "
                  f"int8 {r['int8_ms']:.1f} ms, speedup {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"eval": cmd_eval, "quantize": cmd_quantize, "allocate": cmd_allocate, "demo": cmd_demo,
                "landscape": cmd_landscape, "export": cmd_export}[args.command](args)
    except EvolQError as e:
        print(f"evolq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evolq: interrupted; finished blocks are checkpointed: rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
