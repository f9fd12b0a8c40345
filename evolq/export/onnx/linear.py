"""``QLinear`` -> [Mul] -> Q/DQ -> MatMul(DequantizeLinear(W^T)) + bias.

Linear weights are stored transposed (in, out) so that the DequantizeLinear feeds the MatMul
directly; 4-bit weights carry their per-column scales as blocks along the input axis
(onnxruntime's MatMulNBits form). Regimes:

* deploy: SmoothQuant factors on a GELU output (``input_scale``) as a float Mul first;
* per-channel input factors (``ChannelFactorQuantizer``, the outlier-aware preset), with
  ``channel_factors="fold"`` (default) the deployed form: the input quantized per channel with
  steps ``s * f_c`` and zero-points ``z_c`` and dequantized per tensor (step ``s``, zero-point 0),
  the factors folded into the integer weights (the weight quantizer already sees ``W * f``) and
  the zero-points into the bias (``b - s * z @ W'``); with ``"divide"`` PyTorch's own operations,
  ``x_q @ (W' / f)``;
* weight bias correction: the affine after the DequantizeLinear, or the shift as
  ``t * sum(input)`` on the output (a ReduceSum), see ``weights``;
* an attention in OFQ's QKR form: W_qk is a ``QLinear`` like any other.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import ExportError
from ...qnn.layers import QLinear
from ...quant import DynamicBlockQuantizer
from .exporter import Exporter, lowers_layer
from .plan import to_np
from .weights import dq_weight, weight_spec

__all__ = ["linear_forward"]


@lowers_layer(QLinear)
def linear_forward(exporter: Exporter, layer: QLinear):
    iq = layer.input_quant
    if isinstance(iq, DynamicBlockQuantizer):  # the weight-only regime: one MatMulNBits node
        from .nbits import nbits_forward

        return nbits_forward(exporter, layer)
    if getattr(layer.weight_quant, "group", None) is not None:
        raise ExportError(f"layer {exporter.names.get(layer, '?')} has group-wise weights (one grid per "
                          f"{layer.weight_quant.group} input columns) behind a static int8 input, which no ONNX "
                          f"runtime kernel runs: quantize with --preset weight-only (onnxruntime's MatMulNBits)")
    f = layer._factor()
    w_in = layer.weight.detach().float() if f is None else (layer.weight.detach().float() * f.float())
    spec, deq, affine, shift = weight_spec(exporter, layer, w_in)
    spec.values, spec.axis = spec.values.T.copy(), 1  # (in, out): DequantizeLinear feeds MatMul directly
    if spec.bits <= 4 and not spec.packed:  # per column == blocks of any size along the input axis: MatMulNBits
        k = spec.values.shape[0]
        spec.block = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
    w_eff = deq if affine is None else (deq - affine[0]) * affine[1] + affine[2]
    w_eff = w_eff + (shift[:, None] if shift is not None else 0)  # (out, in), in the input's (v) space
    affine_t = None if affine is None else tuple(t.reshape(1, -1) for t in affine)  # for the (in, out) layout
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(layer.out_features)
    act = divide = None
    if f is not None and exporter.channel_factors == "divide":  # PyTorch's own operations: x_q @ (W' / f)
        act = exporter.act_spec(iq, 2)
        divide = f.float().reshape(-1, 1)
    elif f is not None:  # per-channel factors: Q per channel (s * f, z), DQ per tensor (s, 0)
        act = exporter.act_spec(iq, 2)
        if act is not None:
            s = iq.scale.float().reshape(())
            z = iq.zero_point.float().expand_as(f.float()).reshape(-1)
            act.dq_scale, act.dq_zp, act.axis = to_np(s), np.zeros((), np.int64), -1
            bias = (bias.double() - (z.double() * s.double()) @ w_eff.double().T).float()
    elif not isinstance(iq, nn.Identity):
        act = exporter.act_spec(iq, 2)
    if act is not None:
        act.axis = -1 if act.q_scale.ndim else None

    def forward(mod, x):
        if mod.input_scale is not None:  # deploy regime: SmoothQuant factors on a GELU output, a float Mul
            x = x * mod.input_scale
        v = exporter.qdq(act, x) if act is not None else x
        wt = dq_weight(exporter, spec, mod.weight, deq.T.contiguous())
        if affine_t is not None:  # bias correction, the same float operations as the quantizer
            wt = (wt - affine_t[0]) * affine_t[1] + affine_t[2]
        if divide is not None:
            wt = wt / divide
        y = torch.matmul(v, wt) + bias
        if shift is not None:
            y = y + v.sum(dim=-1, keepdim=True) * shift
        return y

    return forward
