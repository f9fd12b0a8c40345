"""NVIDIA ModelOpt PTQ on the images of ``python -m benchmarks peers`` (run with the ModelOpt environment's python,
not evolq's; see benchmarks/suites/peers.py for its install line).

The recipe is the one of ModelOpt's quick start and of its timm example (``examples/torch_onnx/
torch_quant_to_onnx.py``): ``mtq.quantize(model, CONFIG, forward_loop)`` with a forward loop over the
calibration images, then ``mtq.disable_quantizer(model, filter_func)`` with that example's filter (patch
embedding, position embedding, pooling...), and for INT4 weight configs the example's Conv2d override to
INT8. ``--config`` is a config name of ``modelopt.torch.quantization`` (INT8_DEFAULT_CFG,
INT8_SMOOTHQUANT_CFG, INT4_AWQ_CFG, W4A8_AWQ_BETA_CFG, ...) or ``INT8_DEFAULT_CFG:w<b>``: INT8_DEFAULT_CFG
with ``num_bits`` of the weight quantizers set to b (ModelOpt has no integer W4A8 config;
its W4A8 is INT4 weights with FP8 activations).

Writes the evaluation logits (``--logits``) and a JSON (``--out``): seconds, what it quantized, versions.
"""
from __future__ import annotations

import copy
import re
import time

import torch
from _peer_common import eval_logits, finish, load_data, load_model, parse_args


def filter_func(name):
    """The layers ModelOpt's timm example leaves unquantized (its ``filter_func``)."""
    pattern = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|"
                         r"pos_embed|time_text_embed|context_embedder|norm_out|x_embedder|patch_embed|cpb_mlp|"
                         r"maxpool|global_pool|downsample\.reduction).*")
    return pattern.match(name) is not None


INT8_CONV_OVERRIDE = [  # the example's override for INT4 weight formats (TensorRT runs Conv2d in INT8 or FP8 only)
    {"parent_class": "nn.Conv2d", "quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
    {"parent_class": "nn.Conv2d", "quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
]


def make_config(name):
    import modelopt.torch.quantization as mtq

    m = re.fullmatch(r"INT8_DEFAULT_CFG:w(\d)", name)
    if m:
        cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["num_bits"] = int(m.group(1))
        return cfg
    cfg = copy.deepcopy(getattr(mtq, name))
    if name in ("INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"):
        cfg["quant_cfg"].extend(copy.deepcopy(INT8_CONV_OVERRIDE))
    return cfg


def quantized_ops(model) -> dict:
    """Enabled TensorQuantizers by the kind of module that holds them and their role."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    def fmt(q):
        return f"int{q.num_bits}" if isinstance(q.num_bits, int) else "fp8" if tuple(q.num_bits) == (4, 3) \
            else str(q.num_bits)

    out: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, SequentialQuantizer):  # counted through its parent
            continue
        for child_name, q in mod.named_children():
            if isinstance(q, SequentialQuantizer):  # e.g. W4A8_AWQ_BETA's weights: int4 blocks, then fp8
                parts = [fmt(sub) for sub in q if sub.is_enabled]
                if not parts:
                    continue
                form = " then ".join(parts)
            elif isinstance(q, TensorQuantizer) and q.is_enabled:
                form = fmt(q)
            else:
                continue
            kind = type(mod).__name__
            kind = ("conv" if "Conv" in kind else "linear" if "Linear" in kind else
                    "LayerNorm" if "LayerNorm" in kind else kind)
            role = {"weight_quantizer": "W", "input_quantizer": "in", "output_quantizer": "out"}.get(child_name,
                                                                                                  child_name)
            key = f"{kind} {role} ({form})"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def main():
    args = parse_args(__doc__, "a modelopt.torch.quantization config name, or INT8_DEFAULT_CFG:w<bits>", 32,
                      "calibration batch size")
    import modelopt
    import modelopt.torch.quantization as mtq

    xc, xe = load_data(args)
    model = load_model(args.arch, args.weights)
    config = make_config(args.config)

    def forward_loop(m):
        for i in range(0, len(xc), args.batch_size):
            m(xc[i:i + args.batch_size])

    t0 = time.time()
    with torch.no_grad():
        model = mtq.quantize(model, config, forward_loop=forward_loop)
    mtq.disable_quantizer(model, filter_func)
    ptq_s = time.time() - t0
    t = time.time()
    logits = eval_logits(model, xe)
    eval_s = time.time() - t
    res = {"tool": "modelopt", "version": modelopt.__version__, "ptq_seconds": ptq_s, "eval_seconds": eval_s,
           "ops": quantized_ops(model),
           "recipe": (f"mtq.quantize(model, {args.config}, forward_loop) (algorithm {config['algorithm']!r}), "
                      f"then mtq.disable_quantizer with the timm example's filter (patch_embed, pos_embed, ...); "
                      f"calib batch {args.batch_size}")}
    finish(args, res, logits, modelopt=modelopt.__version__)


if __name__ == "__main__":
    main()
