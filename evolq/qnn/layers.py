"""Quantized wrappers of standard torch layers.

Each wrapper keeps a reference to the original layer's parameters (no copy) and adds
quantizers around it. All of them accept *population mode* (see
``evolq.quant.quantizers``): when the weight quantizer returns P stacked weights,
the input batch is P*B samples, population-major, and sample block p is computed
with weight p.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Quantizer
from ..quant.quantizers import memo

__all__ = ["QLinear", "QConv2d", "QConv2dSame", "QAct", "QNorm", "conv_forward", "quantizers_of"]


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """``F.conv2d`` with ``conv``'s geometry and weights ``w``: one weight (4-D), or a
    population of P weights (5-D) run as one grouped convolution on a population-major
    batch of P*B samples."""
    if w.ndim == 4:
        return conv._conv_forward(x, w, bias)  # F.conv2d, or the padding mode's own pad first
    if conv.padding_mode != "zeros":
        raise NotImplementedError("population mode supports zero padding only")
    p = w.shape[0]
    b = x.shape[0] // p
    xs = x.reshape(p, b, *x.shape[1:]).transpose(0, 1).reshape(b, p * x.shape[1], *x.shape[2:])
    bias = bias.repeat(p) if bias is not None else None
    out = F.conv2d(xs, w.reshape(-1, *w.shape[2:]), bias, conv.stride, conv.padding, conv.dilation, conv.groups * p)
    out = out.reshape(b, p, -1, *out.shape[2:]).transpose(0, 1)
    return out.reshape(p * b, *out.shape[2:])


class QLinear(nn.Module):
    """``nn.Linear`` with a quantized input and quantized weights.

    If the input quantizer has per-channel factors that must be folded into the
    weights (``folds_into_weight``, e.g. ``ChannelFactorQuantizer``), the weight
    quantizer sees ``W * factor`` (input columns scaled) and the result is divided by
    the factors again: the product equals the deployed per-tensor integer matmul.
    """

    def __init__(self, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant if input_quant is not None else nn.Identity()
        self.input_scale = None
        self._fold_cache = None

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        if scale is None:
            self._buffers.pop("input_scale", None)
            self.input_scale = None
        else:
            self.__dict__.pop("input_scale", None)
            self.register_buffer("input_scale", scale.detach().float().clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "input_scale" in state_dict and self.input_scale is None:  # present after deploy smoothing
            self.set_input_scale(torch.empty_like(state_dict[prefix + "input_scale"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _factor(self):
        iq = self.input_quant
        if getattr(iq, "folds_into_weight", False) and bool(iq.calibrated) and not iq.calibrating:
            return iq.factor
        return None

    def folded_weight(self, f):
        """``W * f``, the weight the weight quantizer sees when the input has per-channel factors
        ``f``; cached until the weight or the factors change."""
        return memo(self, "_fold_cache", (self.weight, f), lambda: self.weight * f)  # W * factor

    @torch.no_grad()
    def after_calibration(self) -> None:
        """Refit the weight quantizer on the folded weight once the input factors are known."""
        f = self._factor()
        if f is not None and hasattr(self.weight_quant, "calibrate_from"):
            self.weight_quant.calibrate_from(self.folded_weight(f))

    def forward(self, x):
        if self.input_scale is not None:
            x = x * self.input_scale
        x = self.input_quant(x)
        f = self._factor()
        if f is None:
            w = self.weight_quant(self.weight)
        else:
            w = self.weight_quant(self.folded_weight(f)) / f
        if w.ndim == 2:
            return F.linear(x, w, self.bias)
        p = w.shape[0]  # population of weights: x is (P*B, ..., in)
        xs = x.reshape(p, -1, x.shape[-1])
        if self.bias is not None:
            out = torch.baddbmm(self.bias.view(1, 1, -1), xs, w.transpose(1, 2))
        else:
            out = torch.bmm(xs, w.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.out_features)


class QConv2d(nn.Module):
    """``nn.Conv2d`` with a quantized input and quantized weights.

    In population mode the P weight copies run as one grouped convolution."""

    def __init__(self, conv: nn.Conv2d, weight_quant: Quantizer, input_quant: Quantizer | None):
        super().__init__()
        self.conv = conv
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant if input_quant is not None else nn.Identity()

    def forward(self, x):
        return conv_forward(self.conv, self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QConv2dSame(QConv2d):
    """``QConv2d`` for timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from
    the input size at run time). The input is quantized first, then zero-padded, as an
    integer kernel would pad its quantized input (zero is always on the grid)."""

    def forward(self, x):
        from timm.layers import pad_same

        c = self.conv
        x = self.input_quant(x)
        x = pad_same(x, c.weight.shape[-2:], c.stride, c.dilation)
        return conv_forward(c, x, self.weight_quant(self.weight), self.bias)


class QAct(nn.Module):
    """Runs a module and quantizes its output (e.g. GELU output)."""

    def __init__(self, module: nn.Module, output_quant: Quantizer):
        super().__init__()
        self.module = module
        self.output_quant = output_quant

    def forward(self, x):
        return self.output_quant(self.module(x))


class QNorm(nn.Module):
    """Quantizes the input of a normalization layer (PTF for LayerNorm), then runs it."""

    def __init__(self, norm: nn.Module, input_quant: Quantizer):
        super().__init__()
        self.norm = norm
        self.input_quant = input_quant

    def forward(self, x):
        return self.norm(self.input_quant(x))


def quantizers_of(module: nn.Module, prefix: str = "") -> dict[str, Quantizer]:
    """All quantizers inside ``module`` by qualified name, in module order."""
    out = {}
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, Quantizer):
            out[name] = m
    return out
