"""The argument groups more than one verb takes: the model and its regime (``add_model_args``), the
start point (``add_start_args``), scale-out (``add_scale_out_args``), and the argument types
(``KEY=VALUE``, ``--actors``); their defaults come from the configs (``field_default``)."""
from __future__ import annotations

import argparse
import json

from ..config import QuantConfig, SearchConfig, field_default


def q_default(name):
    """``QuantConfig``'s default of field ``name``."""
    return field_default(QuantConfig, name)


def s_default(name):
    """``SearchConfig``'s default of field ``name``."""
    return field_default(SearchConfig, name)


def key_value_arg(text: str):
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
    p.add_argument("--actors", type=_actors_arg, default=s_default("actors"), metavar="N|max|num_gpus",
                   help=f"evaluate {what or 'the fitness'} on N Ray actors (one CPU each; max: one per free CPU; "
                        f"num_gpus: one per GPU); 0 (default): in this process. The result is the same" +
                        ("" if what else "; only population searchers (batched-tournament, cmaes, snes, pgpe) gain "
                                         "from actors") + " (docs/scale-out.md)")
    p.add_argument("--ray-address", default=s_default("ray_address"), metavar="auto|HOST:PORT",
                   help="join a running Ray cluster (ray start --head ...) instead of starting a local Ray with this "
                        "machine's cores")


def add_model_args(p, quantize: bool, w_default=8):
    """The model, its images and its quantization regime (what ``shared.quant_config`` and
    ``shared.load_inputs`` read), the start point included."""
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
    from ..quant import OBSERVERS

    p.add_argument("--act-observer", default=q_default("act_observer"), choices=tuple(OBSERVERS),
                   help=f"activation observer (default {q_default('act_observer')})")
    p.add_argument("--attn-probs", default=q_default("attn_probs"), choices=("uniform", "log2"))
    p.add_argument("--no-ptf", action="store_true", help="plain uniform quantizers on LayerNorm inputs")
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--preset", default="fq-vit", choices=tuple(QuantConfig.PRESETS),
                   help="quantization regime: fq-vit (the authors' start point, default), outlier-aware "
                        "(PTF with per-channel zero-points; per-channel linear inputs folded into the weights) or "
                        "deploy (what CPU integer kernels run: per-tensor u8 layer inputs, s8 symmetric per-channel "
                        "weights, nothing else; export with evolq export --format pt2|onnx) or weight-only (what "
                        "onnxruntime's MatMulNBits runs: weights in groups, default 32, Linear inputs dynamic int8 per "
                        "block; export with evolq export --format onnx)")
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
    p.add_argument("--w-group", type=int, default=None, metavar="G",
                   help="group-wise weights: one scale and zero-point per G input columns of each output row "
                        "(e.g. 32, 64, 128; at least 8, dividing every layer's input; default: per output channel; "
                        "QuantConfig.w_group)")
    from ..qnn.rotate import ROTATIONS

    p.add_argument("--rotation", default=field_default(QuantConfig, "rotation"), choices=ROTATIONS,
                   help="orthogonal rotations fused into the float model before quantization (timm ViT/DeiT: "
                        "residual stream and attention heads, exact, no run-time cost): hadamard (randomised "
                        "Hadamard) or random (random orthogonal); default none. Other families stay unrotated")
    p.add_argument("--rotation-seed", type=int, default=field_default(QuantConfig, "rotation_seed"),
                   help="seed of the rotation's random signs / matrices (default 0)")
    p.add_argument("--rotation-mlp", action="store_true",
                   help="with --rotation: also an online Hadamard on every MLP hidden before fc2 (costs run time)")
    add_start_args(p)


def add_start_args(p):
    """``--start`` and ``--start-arg`` (``QuantConfig.start``, ``start_options``)."""
    from ..config import STARTS

    p.add_argument("--start", default=q_default("start"), choices=STARTS,
                   help="weight rounding of the start point: rtn (round-to-nearest, default), gptq (Hessian-based "
                        "error compensation), brecq (block reconstruction, AdaRound + QDrop) or ofq (a short "
                        "distillation fine-tune of the quantized weights, OFQ's StatsQ/CGA as switches; eval holds "
                        "out 10%% of the calibration images from it)")
    p.add_argument("--start-arg", type=key_value_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="gptq/brecq/ofq setting, repeatable (e.g. iters=500, batch_size=32, qdrop=0, device=cuda, "
                        "act_order=false; init=gptq: brecq learns the rounding of GPTQ's weights; ofq: epochs=2, "
                        "lr=1e-4, statsq=false, cga=true, qkr=false: no OFQ query-key reparameterization (default "
                        "auto: on for timm ViTs outside the deploy regime), qkr_bias=drop: OFQ's form without the "
                        "q/k biases)")
