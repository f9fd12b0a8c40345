"""ONNX export of a fake-quantized model as a QDQ graph, and the check that runs it in onnxruntime.

``export_onnx(qmodel, path)`` writes the float model with QuantizeLinear/DequantizeLinear
pairs at exactly the points where evolq fake-quantizes:

* weights: integer initializers (uint8/int8 for 5-8 bits, uint4/int4 for 2-4 bits, which
  needs opset 21), per output channel scale and zero-point, each feeding one
  DequantizeLinear; Linear weights are stored transposed (in, out) so that the
  DequantizeLinear feeds the MatMul directly;
* activations: per-tensor uint8/int8 QuantizeLinear + DequantizeLinear at every
  activation quantizer (layer inputs, q/k/v, attention probabilities, GELU outputs),
  per-axis on LayerNorm inputs (PTF: the power-of-two factors are part of the per-channel
  scale); bit widths below 8 add an integer Clip between the two;
* a Linear whose input has per-channel factors (``ChannelFactorQuantizer``, the
  outlier-aware preset): the input is quantized per channel with steps ``s * f_c`` and
  zero-points ``z_c`` and dequantized per tensor (step ``s``, zero-point 0); the factors
  are folded into the integer weights (the weight quantizer already sees ``W * f``) and
  the zero-points into the bias (``b - s * z @ W'``), the deployed form of the layer;
* weight bias correction (``QuantConfig.bias_correction``, Banner et al.) makes each
  output channel's weights ``(w_q - mu_q) * r + mu``: by default exported as those float
  operations after the DequantizeLinear (bit-identical weights); with
  ``bias_correction="output"`` the scale becomes ``s * r`` and the per-channel shift
  ``t = mu - mu_q * r`` (not an integer, so not a zero-point) an explicit float term
  ``t * sum(input)`` on the output (Linear: a ReduceSum; Conv: a box sum over the
  receptive field), which leaves the DequantizeLinear -> MatMul/Conv pattern intact;
* an attention in OFQ's QKR form (``evolq.qnn.qkr``): W_qk is a quantized Linear like any
  other (integer weights, DequantizeLinear -> MatMul, its bias the q bias's term) and u's
  quantizer a per-tensor Q/DQ pair; the key-side operand ``Q(x)`` (qkv's input quantizer
  applied once more, outside a Linear) is traced as the quantizer's own float operations
  (Round, Clip), which compute the same values.

The graph is traced with ``torch.onnx.export`` (TorchScript exporter) while every
quantized layer runs an export forward that emits placeholder nodes; the placeholders
are then replaced by the Q/DQ nodes and integer initializers built with ``onnx.helper``.
The constants are computed with the same torch operations as the quantizers, so the
integers are the ones the PyTorch model rounds to.

One module per concern: ``export`` (the entry points), ``plan`` (the placeholder specs),
``exporter`` (the registries of lowerings and the export mode), ``graph`` (trace, then
placeholders -> nodes), ``weights`` (integer packing of a weight quantizer), ``activations``
(activation quantizers by type), ``linear`` and ``conv`` (the layers' export forwards),
``check`` (onnxruntime session and check). A new layer type or quantizer regime is one module
that registers its lowering (``exporter.lowers_layer`` / ``lowers_activation`` /
``lowers_node``) plus its import line below.
"""
from __future__ import annotations

# isort: off  (the lowerings register themselves on import)
from . import activations, conv, linear, nbits, weights  # noqa: F401  (register)
from .check import check_onnx, onnx_session
from .export import INT4_OPSET, MAX_OPSET, MIN_OPSET, export_float_onnx, export_onnx

# isort: on

__all__ = ["export_onnx", "check_onnx", "export_float_onnx", "onnx_session", "MIN_OPSET", "INT4_OPSET", "MAX_OPSET"]
