"""``QConv2d`` -> Q/DQ -> [pad] -> Conv(DequantizeLinear(W)) [+ bias-correction term].

In the weight-only regime a convolution's input stays float and its weights are dequantized by
float operations on constants that runtimes fold at load (``weights._float_dequant``). timm's
"same"-padded convolutions (``QConv2dSame``) pad the dequantized input as PyTorch
does; with ``bias_correction="output"`` the per-channel shift becomes a box sum over the
receptive field on the output (``box_sum``), which leaves DequantizeLinear -> Conv intact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ExportError
from ...qnn.layers import QConv2d, QConv2dSame
from .exporter import Exporter, lowers_layer
from .weights import dq_weight, weight_spec

__all__ = ["conv_forward", "box_sum"]


@lowers_layer(QConv2d)
def conv_forward(exporter: Exporter, layer: QConv2d):
    conv = layer.conv
    if conv.padding_mode != "zeros":
        raise ExportError(f"convolution {exporter.names.get(layer, '?')} uses padding_mode={conv.padding_mode!r}")
    spec, deq, affine, shift = weight_spec(exporter, layer, layer.weight)
    act = None if isinstance(layer.input_quant, nn.Identity) else exporter.act_spec(layer.input_quant, 4)
    if act is None and getattr(exporter.qmodel.config, "regime", "") == "weight-only":
        spec.float_ops = True  # a float convolution: weights dequantized once at load (weights._float_dequant)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    same = isinstance(layer, QConv2dSame)

    def forward(mod, x):
        if act is not None:
            x = exporter.qdq(act, x)
        if same:
            from timm.layers import pad_same

            x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
        w = dq_weight(exporter, spec, mod.weight, deq)
        if affine is not None:
            w = (w - affine[0]) * affine[1] + affine[2]
        y = conv._conv_forward(x, w, bias)
        if shift is not None:
            y = y + box_sum(conv, x, shift)
        return y

    return forward


def box_sum(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``shift[c] * conv(x, ones)`` for output channel c: the bias-correction term of a
    convolution whose weights are ``integer part + shift[c]``."""
    g = conv.groups
    n, c, h, w = x.shape
    s = x.sum(dim=1, keepdim=True) if g == 1 else x.reshape(n, g, c // g, h, w).sum(dim=2)
    ones = torch.ones(g, 1, *conv.weight.shape[-2:])
    s = F.conv2d(s, ones, None, conv.stride, conv.padding, conv.dilation, g)
    if g == 1:
        return s * shift.reshape(1, -1, 1, 1)
    s = s.unsqueeze(2) * shift.reshape(1, g, conv.out_channels // g, 1, 1)
    return s.flatten(1, 2)
