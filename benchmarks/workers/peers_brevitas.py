"""Brevitas PTQ on the images of ``python -m benchmarks peers`` (run with the Brevitas environment's python,
not evolq's; see benchmarks/suites/peers.py for its install line).

The recipe is the one of Brevitas' own ImageNet PTQ example (``brevitas_examples/imagenet_classification/
ptq/ptq_evaluate.py``), called through that example's functions in the same order: graph preprocessing with
graph equalization (20 iterations, merge bias), activation equalization (layerwise, alpha 0.5), the layerwise
target backend (the fx backend does not handle timm's ViT), float scales, per-channel weights from
statistics, per-tensor activations at the 99.999th percentile, 8-bit first and last layers (the example's
default), calibration, GPTQ with act order, bias correction. Activations are asymmetric: the best ViT rows
of the example's RESULTS_TORCHVISION_BEST_CONFIGS.csv use asymmetric activations.

Writes the evaluation logits (``--logits``) and a JSON (``--out``): seconds, what it quantized, versions.
"""
from __future__ import annotations

import time

import torch
from _peer_common import eval_logits, finish, load_data, load_model, parse_args


def quantized_ops(model) -> dict:
    """Enabled weight and input quantizers of Brevitas' quantized layers, by layer kind."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QWBIOL

    out: dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, QWBIOL):
            continue
        kind = "conv" if "Conv" in type(m).__name__ else "linear"
        for role, q in (("W", m.weight_quant), ("in", m.input_quant), ("out", m.output_quant)):
            if q is not None and q.is_quant_enabled:
                out[f"{kind} {role}"] = out.get(f"{kind} {role}", 0) + 1
    return dict(sorted(out.items()))


def main():
    args = parse_args(__doc__, "W<bits>A<bits>, e.g. W4A8", 64, "calibration batch size (the example's default)")
    import brevitas
    from brevitas.export.inference import quant_inference_mode
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (
        apply_act_equalization,
        apply_bias_correction,
        apply_gptq,
        calibrate,
        quantize_model,
    )

    w_bits, a_bits = (int(s) for s in args.config[1:].split("A"))
    xc, xe = load_data(args)
    loader = [(xc[i:i + args.batch_size], torch.zeros(0)) for i in range(0, len(xc), args.batch_size)]
    model = load_model(args.arch, args.weights)
    notes = []
    t0 = time.time()
    steps = {}
    with torch.no_grad():
        t = time.time()
        try:
            model = preprocess_for_quantize(model, equalize_iters=20, equalize_merge_bias=True, merge_bn=True)
        except Exception as e:  # record why, go on untraced as the layerwise backend allows
            notes.append(f"preprocess_for_quantize (fx trace + graph equalization) failed, skipped: "
                         f"{type(e).__name__}: {str(e)[:200]}")
            model = load_model(args.arch, args.weights)
        steps["preprocess"] = time.time() - t
        t = time.time()
        try:
            apply_act_equalization(model, loader, layerwise=True)
        except Exception as e:
            notes.append(f"activation equalization failed, skipped: {type(e).__name__}: {str(e)[:200]}")
        steps["act_equalization"] = time.time() - t
    t = time.time()
    qmodel = quantize_model(model, dtype=torch.float32, device=torch.device("cpu"), backend="layerwise",
                            scale_factor_type="float_scale", bias_bit_width=32, weight_bit_width=w_bits,
                            weight_narrow_range=False, weight_param_method="stats",
                            weight_quant_granularity="per_channel", act_quant_granularity="per_tensor",
                            weight_quant_type="sym", layerwise_first_last_bit_width=8, act_bit_width=a_bits,
                            act_param_method="stats", act_quant_percentile=99.999, act_quant_type="asym",
                            quant_format="int", act_scale_computation_type="static",
                            uint_sym_act_for_unsigned_values=True)
    qmodel.eval()
    with torch.no_grad():
        qmodel(xc[:args.batch_size])
    steps["quantize_model"] = time.time() - t
    t = time.time()
    calibrate(loader, qmodel)
    steps["calibrate"] = time.time() - t
    t = time.time()
    apply_gptq(loader, qmodel, act_order=True, create_weight_orig=True)
    steps["gptq"] = time.time() - t
    t = time.time()
    apply_bias_correction(loader, qmodel)
    steps["bias_correction"] = time.time() - t
    ptq_s = time.time() - t0
    t = time.time()
    with torch.no_grad(), quant_inference_mode(qmodel):
        qmodel(xe[:1])
        logits = eval_logits(qmodel, xe)
    eval_s = time.time() - t
    res = {"tool": "brevitas", "version": brevitas.__version__, "ptq_seconds": ptq_s, "eval_seconds": eval_s,
           "step_seconds": steps, "ops": quantized_ops(qmodel), "notes": notes,
           "recipe": (f"brevitas_examples ptq_common: preprocess_for_quantize(graph eq 20 iters, merge bias), "
                      f"act equalization layerwise alpha 0.5, layerwise backend, W{w_bits} per-channel sym "
                      f"float scale (stats), A{a_bits} per-tensor asym percentile 99.999, first/last layer 8 bit, "
                      f"GPTQ act order, bias correction; calib batch {args.batch_size}")}
    finish(args, res, logits, brevitas=brevitas.__version__)


if __name__ == "__main__":
    main()
