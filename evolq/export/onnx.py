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
"""
from __future__ import annotations

import contextlib
import io
import os
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError
from ..fsio import atomic_write
from ..qnn.layer_bits import is_float_layer
from ..qnn.layers import QConv2d, QLinear
from ..qnn.qmodel import QModel
from ..quant import ChannelFactorQuantizer, Log2Quantizer, PTFQuantizer, Quantizer, UniformQuantizer
from ..quant.quantizers import bias_correct
from ..quant.range import quant_codes, split_zero_point

__all__ = ["export_onnx", "check_onnx", "export_float_onnx", "MIN_OPSET", "INT4_OPSET"]

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
INT4_OPSET = 21  # uint4/int4 tensors
MAX_OPSET = 21
DOMAIN = "evolq.export"


# -- what each placeholder becomes -------------------------------------------------
@dataclass
class _ActSpec:
    """QuantizeLinear(x, q_scale, q_zp) [-> Clip(qmin, qmax)] -> DequantizeLinear(dq_scale, dq_zp)."""
    name: str
    q_scale: np.ndarray
    q_zp: np.ndarray
    dq_scale: np.ndarray
    dq_zp: np.ndarray
    qmin: int
    qmax: int
    signed: bool
    axis: int | None = None  # per-axis Q (and DQ when dq_scale is a vector)


@dataclass
class _WeightSpec:
    """DequantizeLinear(integer initializer, scale, zero-point, axis)."""
    name: str
    values: np.ndarray  # integers (int64), in the container's range
    scale: np.ndarray
    zp: np.ndarray
    bits: int
    signed: bool
    axis: int
    block: int | None = None  # 4-bit Linear weights: the per-column scales written as blocks along axis 0


@dataclass
class _Plan:
    acts: list = field(default_factory=list)
    weights: list = field(default_factory=list)


class _Placeholder(torch.autograd.Function):
    """Identity on ``x`` in torch (``out`` is the value the graph will compute); one
    ``evolq.export::{kind}`` node with the spec index in the traced graph."""

    @staticmethod
    def forward(ctx, x, out, kind, index):
        return out.clone()

    @staticmethod
    def symbolic(g, x, out, kind, index):
        node = g.op(f"{DOMAIN}::{kind}", x, index_i=index)
        if hasattr(out, "type"):  # the traced value's type and shape, for the exporter's later ops
            node.setType(out.type())
        return node


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def _fake(x, scale, zp, qmin, qmax):
    """The stored integers ``codes + z`` and the dequantized values ``codes * s``, from
    the quantizers' own ``quant_codes`` (so the graph holds exactly evolq's grid)."""
    q = quant_codes(x, scale, zp, qmin, qmax)
    return q + zp, q * scale


def _container(bits: int, signed: bool) -> int:
    from onnx import TensorProto

    if bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


# -- the export forward of each quantized layer ---------------------------------------
class _Exporter:
    def __init__(self, qmodel: QModel, opset: int, bias_correction: str = "weights", channel_factors: str = "fold"):
        self.qmodel, self.opset, self.plan = qmodel, opset, _Plan()
        self.bias_correction, self.channel_factors = bias_correction, channel_factors
        self.names = {m: n for n, m in qmodel.model.named_modules()}
        self.claimed: set[int] = set()

    # activations
    def act_spec(self, q: Quantizer, x_ndim: int) -> _ActSpec | None:
        name = self.names.get(q, "?")
        self.claimed.add(id(q))
        if isinstance(q, Log2Quantizer):
            if not q.enabled:
                return None
            raise ExportError(f"quantizer {name} is a log2 quantizer (attention probabilities 2^-k), which "
                              f"QuantizeLinear/DequantizeLinear cannot express; quantize with attn_probs='uniform' "
                              f"to export")
        if not isinstance(q, (UniformQuantizer, PTFQuantizer, ChannelFactorQuantizer)):
            raise ExportError(f"quantizer {name} of type {type(q).__name__} has no ONNX form")
        if not q.enabled:
            return None
        if not bool(q.calibrated):
            raise ExportError(f"the model was never calibrated: quantizer {name} has no scale yet "
                              f"(run evolq.prepare_model or evolq.calibrate first)")
        if q.pop_scale is not None:
            raise ExportError(f"quantizer {name} is in population mode; clear pop_scale before exporting")
        if getattr(q, "kind", "activation") == "weight":
            raise ExportError(f"weight quantizer {name} is used outside a Linear/Conv2d layer evolq can export")
        if q.bits > 8:
            raise ExportError(f"quantizer {name} has {q.bits} bits; ONNX activations are exported as 8-bit integers")
        if isinstance(q, UniformQuantizer):
            axis = q._axis(x_ndim)
            scale, zp = q.scale.float().reshape(-1), q.zero_point.float().reshape(-1)
            signed = q.signed
            if axis is None:
                scale, zp = scale.reshape(()), zp.reshape(())
        else:  # PTF / channel factors: channel c on the last axis, step scale * factor[c]
            factor = q.factor.float()
            scale = (q.scale.float() * factor).reshape(-1)
            zp = q.zero_point.float().expand_as(factor).reshape(-1)
            axis, signed = x_ndim - 1, False
        qmin, qmax = q.qmin, q.qmax
        if signed:  # int8 grid -> the same grid shifted into uint8 (onnxruntime's x86 kernels use uint8 activations)
            zp, qmin, qmax = zp + 128, qmin + 128, qmax + 128
        return _ActSpec(name, _np(scale), _np(zp, np.int64), _np(scale), _np(zp, np.int64), qmin, qmax, False, axis)

    def quant_act(self, q: Quantizer, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec(q, x.ndim)
        if spec is None:
            return x
        self.plan.acts.append(spec)
        return _Placeholder.apply(x, _dq_value(x, spec), "QDQ", len(self.plan.acts) - 1)

    # weights
    def weight_spec(self, layer: nn.Module, w: torch.Tensor) -> tuple[_WeightSpec, torch.Tensor, torch.Tensor | None]:
        """The integer weights of ``layer`` (``w`` is what its weight quantizer sees),
        their dequantized value as the graph computes it, and the bias-correction shift."""
        wq = layer.weight_quant
        name = self.names.get(layer, "?")
        self.claimed.add(id(wq))
        if not isinstance(wq, UniformQuantizer):
            raise ExportError(f"layer {name}: weight quantizer {type(wq).__name__} has no ONNX form")
        if not bool(wq.calibrated):
            raise ExportError(f"the model was never calibrated: quantizer {name}.weight_quant has no scale yet "
                              f"(run evolq.prepare_model or evolq.calibrate first)")
        if wq.pop_scale is not None:
            raise ExportError(f"quantizer {name}.weight_quant is in population mode; clear pop_scale first")
        if wq.bits > 8:
            raise ExportError(f"layer {name} has {wq.bits}-bit weights; at most 8 bits are exported")
        if wq.bits <= 4 and self.opset < INT4_OPSET:
            raise ExportError(f"layer {name} has {wq.bits}-bit weights, stored as 4-bit integers, which need opset "
                              f">= {INT4_OPSET} (got opset {self.opset})")
        w = w.detach().float()
        out_ch = w.shape[0]
        if wq.ch_axis % w.ndim != 0:
            raise ExportError(f"layer {name}: weights quantized along axis {wq.ch_axis}; only per output channel "
                              f"(axis 0) is exported")
        shape = [-1] + [1] * (w.ndim - 1)
        scale = wq.scale.float().reshape(-1).expand(out_ch) if wq.scale.numel() == 1 else wq.scale.float()
        zp = wq.zero_point.float().reshape(-1).expand(out_ch) if wq.zero_point.numel() == 1 else wq.zero_point.float()
        scale, zp = scale.reshape(shape).contiguous(), zp.reshape(shape).contiguous()
        if "weight_delta" in wq._buffers:  # a gptq/ofq start: the quantizer rounds w + delta
            w = w + wq.weight_delta.float()
        if "round_offset" in wq._buffers:  # a brecq start: AdaRound's up/down decisions, the quantizer's arithmetic
            w_q = wq._offset_quant(w, wq.scale.float(), wq.round_offset.float())
            ints = torch.round(w_q / scale + zp)
        else:
            ints, w_q = _fake(w, scale, zp, wq.qmin, wq.qmax)
        affine = shift = None
        zi, frac = split_zero_point(zp)
        half = None
        if frac is not None:  # a half-step (StatsQ) grid: DequantizeLinear's (ints - zi) * s lies f * s above it
            half, zp = frac * scale, zi
        if wq.bias_correction:  # evolq.quant.bias_correct, per output channel: (w_q - mu_q) * r + mu
            dims = list(range(1, w.ndim))
            mu, sd = w.mean(dim=dims, keepdim=True), w.std(dim=dims, keepdim=True)
            mu_q, sd_q = w_q.mean(dim=dims, keepdim=True), w_q.std(dim=dims, keepdim=True)
            ratio = torch.where(sd_q > 0, sd / sd_q.clamp_min(1e-12), torch.ones_like(sd_q))
            if half is not None:
                mu_q = mu_q + half
            if self.bias_correction == "weights":
                affine = (mu_q, ratio, mu)
            else:  # == (ints - z) * (s * r) + (mu - mu_q * r): the shift becomes a term on the layer's output
                scale = scale * ratio
                shift = (mu - mu_q * ratio).reshape(-1)
        elif half is not None:
            if self.bias_correction == "weights":
                affine = (half, torch.ones_like(half), torch.zeros_like(half))
            else:
                shift = (-half).reshape(-1)
        deq = (ints - zp) * scale  # what DequantizeLinear computes
        ref = bias_correct(w_q, w, 0) if wq.bias_correction else w_q
        got = deq if affine is None else (deq - affine[0]) * affine[1] + affine[2]
        got = got if shift is None else got + shift.reshape(shape)
        err = (got - ref).abs().max().item()
        if err > 1e-5 * max(ref.abs().max().item(), 1e-12):  # pragma: no cover - a derivation bug
            raise ExportError(f"layer {name}: the exported weights differ from the fake-quantized ones ({err:.3g})")
        spec = _WeightSpec(name, _np(ints, np.int64), _np(scale.reshape(-1)), _np(zp.reshape(-1), np.int64),
                           wq.bits, wq.signed, 0)
        return spec, deq, affine, shift

    def dq_weight(self, spec: _WeightSpec, carrier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.plan.weights.append(spec)
        return _Placeholder.apply(carrier, value, "DQW", len(self.plan.weights) - 1)

    def linear_forward(self, layer: QLinear):
        iq = layer.input_quant
        f = layer._factor()
        w_in = layer.weight.detach().float() if f is None else (layer.weight.detach().float() * f.float())
        spec, deq, affine, shift = self.weight_spec(layer, w_in)
        spec.values, spec.axis = spec.values.T.copy(), 1  # (in, out): DequantizeLinear feeds MatMul directly
        if spec.bits <= 4:  # per column == blocks of any size along the input axis: onnxruntime's MatMulNBits form
            k = spec.values.shape[0]
            spec.block = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
        w_eff = deq if affine is None else (deq - affine[0]) * affine[1] + affine[2]
        w_eff = w_eff + (shift[:, None] if shift is not None else 0)  # (out, in), in the input's (v) space
        affine_t = None if affine is None else tuple(t.reshape(1, -1) for t in affine)  # for the (in, out) layout
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(layer.out_features)
        act = divide = None
        if f is not None and self.channel_factors == "divide":  # PyTorch's own operations: x_q @ (W' / f)
            act = self.act_spec(iq, 2)
            divide = f.float().reshape(-1, 1)
        elif f is not None:  # per-channel factors: Q per channel (s * f, z), DQ per tensor (s, 0)
            act = self.act_spec(iq, 2)
            if act is not None:
                s = iq.scale.float().reshape(())
                z = iq.zero_point.float().expand_as(f.float()).reshape(-1)
                act.dq_scale, act.dq_zp, act.axis = _np(s), np.zeros((), np.int64), -1
                bias = (bias.double() - (z.double() * s.double()) @ w_eff.double().T).float()
        elif not isinstance(iq, nn.Identity):
            act = self.act_spec(iq, 2)
        if act is not None:
            act.axis = -1 if act.q_scale.ndim else None
        exporter = self

        def forward(mod, x):
            if mod.input_scale is not None:  # deploy regime: SmoothQuant factors on a GELU output, a float Mul
                x = x * mod.input_scale
            if act is not None:
                exporter.plan.acts.append(act)
                v = _Placeholder.apply(x, _dq_value(x, act), "QDQ", len(exporter.plan.acts) - 1)
            else:
                v = x
            wt = exporter.dq_weight(spec, mod.weight, deq.T.contiguous())
            if affine_t is not None:  # bias correction, the same float operations as the quantizer
                wt = (wt - affine_t[0]) * affine_t[1] + affine_t[2]
            if divide is not None:
                wt = wt / divide
            y = torch.matmul(v, wt) + bias
            if shift is not None:
                y = y + v.sum(dim=-1, keepdim=True) * shift
            return y

        return forward

    def conv_forward(self, layer: QConv2d):
        conv = layer.conv
        if conv.padding_mode != "zeros":
            raise ExportError(f"convolution {self.names.get(layer, '?')} uses padding_mode={conv.padding_mode!r}")
        spec, deq, affine, shift = self.weight_spec(layer, layer.weight)
        act = None if isinstance(layer.input_quant, nn.Identity) else self.act_spec(layer.input_quant, 4)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        same = type(layer).__name__ == "QConv2dSame"
        exporter = self

        def forward(mod, x):
            if act is not None:
                exporter.plan.acts.append(act)
                x = _Placeholder.apply(x, _dq_value(x, act), "QDQ", len(exporter.plan.acts) - 1)
            if same:
                from timm.layers import pad_same

                x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
            w = exporter.dq_weight(spec, mod.weight, deq)
            if affine is not None:
                w = (w - affine[0]) * affine[1] + affine[2]
            y = conv._conv_forward(x, w, bias)
            if shift is not None:
                y = y + _box_sum(conv, x, shift)
            return y

        return forward


def _dq_value(x: torch.Tensor, a: _ActSpec) -> torch.Tensor:
    """What Q -> [Clip] -> DQ computes on ``x`` (torch, for the trace)."""
    shape = [1] * x.ndim
    if a.axis is not None:
        shape[a.axis] = -1
    qs = torch.from_numpy(a.q_scale).reshape(shape if a.q_scale.ndim else [])
    qz = torch.from_numpy(a.q_zp.astype(np.float32)).reshape(shape if a.q_zp.ndim else [])
    ints, _ = _fake(x, qs, qz, a.qmin, a.qmax)
    ds = torch.from_numpy(a.dq_scale).reshape(shape if a.dq_scale.ndim else [])
    dz = torch.from_numpy(a.dq_zp.astype(np.float32)).reshape(shape if a.dq_zp.ndim else [])
    return (ints - dz) * ds


def _box_sum(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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


@contextlib.contextmanager
def _export_mode(qmodel: QModel, exporter: _Exporter):
    """Give every quantized layer and activation quantizer its export forward; restore on exit."""
    patched = []
    model = qmodel.model
    try:
        for m in model.modules():
            if is_float_layer(m):
                continue  # layer_bits "float": the float layer as PyTorch computes it
            if isinstance(m, QLinear):
                fwd = exporter.linear_forward(m)
            elif isinstance(m, QConv2d):
                fwd = exporter.conv_forward(m)
            else:
                continue
            m.forward = types.MethodType(fwd, m)
            patched.append(m)
            exporter.claimed.add(id(m.input_quant))
        for name, m in model.named_modules():
            if isinstance(m, Quantizer) and id(m) not in exporter.claimed:
                if getattr(m, "kind", "") == "weight":
                    parent = name.rpartition(".")[0]
                    typ = type(model.get_submodule(parent)).__name__ if parent else type(model).__name__
                    raise ExportError(f"layer {parent or '<model>'} of type {typ} holds weight quantizer {name} "
                                      f"but is no QLinear/QConv2d: evolq cannot export it")
                exporter.act_spec(m, 2)  # raises for what cannot be expressed; checks calibration
                m.forward = types.MethodType(_quant_forward(exporter), m)
                patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _quant_forward(exporter: _Exporter):
    def forward(mod, x):
        return exporter.quant_act(mod, x)
    return forward


# -- placeholders -> Q/DQ nodes -------------------------------------------------------
def _lower(proto, plan: _Plan, opset: int):
    from onnx import TensorProto, helper

    graph = proto.graph
    inits = []
    nodes = []
    used_names: dict[str, int] = {}

    def uniq(base):
        base = base or "q"
        k = used_names.get(base, 0)
        used_names[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def scalar_or_vec(name, arr, dtype):
        t = helper.make_tensor(name, dtype, list(arr.shape), arr.reshape(-1).tolist())
        inits.append(t)
        return name

    def int_tensor(name, arr, dtype):
        arr = np.asarray(arr, np.int64)
        if dtype in (TensorProto.UINT4, TensorProto.INT4):
            flat = (arr.reshape(-1) & 0x0F).astype(np.uint8)
            if flat.size % 2:
                flat = np.concatenate([flat, np.zeros(1, np.uint8)])
            raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            t = helper.make_tensor(name, dtype, list(arr.shape), raw, raw=True)
        else:
            npt = np.int8 if dtype == TensorProto.INT8 else np.uint8
            t = helper.make_tensor(name, dtype, list(arr.shape), arr.astype(npt).tobytes(), raw=True)
        inits.append(t)
        return name

    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        out = node.output[0]
        if node.op_type == "QDQ":
            a = plan.acts[index]
            base = uniq(a.name)
            dtype = TensorProto.INT8 if a.signed else TensorProto.UINT8
            axis = {} if a.axis is None or a.q_scale.ndim == 0 else {"axis": a.axis}
            qs = scalar_or_vec(f"{base}.q_scale", a.q_scale, TensorProto.FLOAT)
            qz = int_tensor(f"{base}.q_zero_point", a.q_zp, dtype)
            qout = f"{base}.quantized"
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], qs, qz], [qout],
                                          name=f"{base}/QuantizeLinear", **axis))
            lo, hi = (-128, 127) if a.signed else (0, 255)
            if (a.qmin, a.qmax) != (lo, hi):  # fewer than 8 bits: integer clip
                cmin = int_tensor(f"{base}.qmin", np.array(a.qmin), dtype)
                cmax = int_tensor(f"{base}.qmax", np.array(a.qmax), dtype)
                nodes.append(helper.make_node("Clip", [qout, cmin, cmax], [qout + ".clipped"], name=f"{base}/Clip"))
                qout += ".clipped"
            daxis = {} if a.axis is None or a.dq_scale.ndim == 0 else {"axis": a.axis}
            same = a.dq_scale.shape == a.q_scale.shape and np.array_equal(a.dq_scale, a.q_scale)
            ds = qs if same else scalar_or_vec(f"{base}.dq_scale", a.dq_scale, TensorProto.FLOAT)
            same = a.dq_zp.shape == a.q_zp.shape and np.array_equal(a.dq_zp, a.q_zp)
            dz = qz if same else int_tensor(f"{base}.dq_zero_point", a.dq_zp, dtype)
            nodes.append(helper.make_node("DequantizeLinear", [qout, ds, dz], [out],
                                          name=f"{base}/DequantizeLinear", **daxis))
        elif node.op_type == "DQW":
            w = plan.weights[index]
            base = uniq(w.name + ".weight")
            dtype = _container(w.bits, w.signed)
            wi = int_tensor(f"{base}.quantized", w.values, dtype)
            scale, zp, attrs = w.scale, w.zp, {"axis": w.axis}
            if w.block:  # (K, N) weights, one scale per column: the same scale in each of the K / block rows
                rows = w.values.shape[0] // w.block
                scale, zp = np.tile(scale, (rows, 1)), np.tile(zp, (rows, 1))
                attrs = {"axis": 0, "block_size": w.block}
            ws = scalar_or_vec(f"{base}.scale", scale, TensorProto.FLOAT)
            wz = int_tensor(f"{base}.zero_point", zp, dtype)
            nodes.append(helper.make_node("DequantizeLinear", [wi, ws, wz], [out], name=f"{base}/DequantizeLinear",
                                          **attrs))
        else:  # pragma: no cover
            raise ExportError(f"internal: unknown placeholder {node.op_type}")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    # drop float weights only the placeholders read, and the placeholder domain
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]  # the tracer's shapes around the placeholders; onnxruntime infers them again
    ops = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(ops)
    return proto


# -- public API -----------------------------------------------------------------------
def _example_input(qmodel: QModel, example):
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise ExportError(f"example must be a tensor, got {type(example).__name__}")
        return example
    cfg = getattr(qmodel.model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    dev = next((p.device for p in qmodel.model.parameters()), torch.device("cpu"))
    return torch.zeros(1, *size, device=dev)


def _check_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a folder")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(path)!r}: {str(probe)!r} is not a writable folder")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {str(path)!r}: permission denied")
    return path


def _check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (per-axis QuantizeLinear needs "
                          f"{MIN_OPSET}, 4-bit weights {INT4_OPSET}), got {opset!r}")


def _trace(module, example, opset) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    return f.getvalue()


def _write(path: Path, proto) -> Path:
    data = proto.SerializeToString()
    try:
        atomic_write(path, data)
    except OSError as e:
        raise ExportError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def export_onnx(qmodel: QModel, path, *, opset: int = 21, example: torch.Tensor | None = None,
                bias_correction: str = "weights", channel_factors: str = "fold") -> Path:
    """Write ``qmodel`` as an ONNX QDQ model to ``path`` (atomically: no partial file).

    Args:
        qmodel: a calibrated ``QModel`` (``prepare_model``, ``quantize_model``, ``load_quantized``).
        path: the ``.onnx`` file to write.
        opset: ONNX opset, 13..21; weights of 4 bits or fewer are stored as uint4/int4 and need 21.
        example: an input to trace with (default: zeros of the model's input size, batch 1);
            the batch dimension is dynamic in the exported graph.
        bias_correction: where weight bias correction (``QuantConfig.bias_correction``) goes.
            ``"weights"`` (default): ``(DequantizeLinear(W) - mu_q) * r + mu`` per output channel, the
            quantizer's own float operations, so the weights equal the PyTorch model's bit for bit;
            onnxruntime then runs those layers in float. ``"output"``: the ratio ``r`` folded into the
            weight scale and the shift added to the layer's output (``t * sum(input)``), so that the
            DequantizeLinear feeds the MatMul/Conv directly (integer kernels where onnxruntime fuses
            them); equal up to float rounding.
        channel_factors: Linear inputs with per-channel factors (outlier-aware preset). ``"fold"``
            (default): the deployed form, factors in the integer weights, zero-points in the bias, the
            input dequantized per tensor. ``"divide"``: the PyTorch model's own operations, the input
            quantized and dequantized per channel and the dequantized weights divided by the factors
            (no cancellation between a large zero-point bias and the product).

    Returns the path. Raises ``ExportError`` (one line) for a model that was never
    calibrated, a quantizer or layer with no ONNX form (log2 probabilities among them), a
    bad opset or path.
    """
    import onnx

    if not isinstance(qmodel, QModel):
        raise ExportError(f"export_onnx takes a QModel, got {type(qmodel).__name__}")
    _check_opset(opset)
    if bias_correction not in ("weights", "output"):
        raise ExportError(f"bias_correction must be 'weights' or 'output', got {bias_correction!r}")
    if channel_factors not in ("fold", "divide"):
        raise ExportError(f"channel_factors must be 'fold' or 'divide', got {channel_factors!r}")
    path = _check_path(path)
    exporter = _Exporter(qmodel, opset, bias_correction, channel_factors)
    x = _example_input(qmodel, example)
    model = qmodel.model
    was_training = model.training
    model.eval()
    try:
        with _export_mode(qmodel, exporter):
            try:
                blob = _trace(model, x, opset)
            except ExportError:
                raise
            except Exception as e:
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ExportError(f"torch.onnx could not trace the model: {msg}") from None
    finally:
        model.train(was_training)
    proto = _lower(onnx.load_from_string(blob), exporter.plan, opset)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # pragma: no cover - a lowering bug
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).splitlines()[0][:200]}") from None
    return _write(path, proto)


def export_float_onnx(model: nn.Module, path, *, opset: int = 21, example: torch.Tensor | None = None) -> Path:
    """A float (unquantized) model as ONNX, for comparison with the QDQ export."""
    import onnx

    _check_opset(opset)
    path = _check_path(path)
    x = example if example is not None else _example_input(QModel(model, [], ""), None)
    model.eval()
    try:
        blob = _trace(model, x, opset)
    except Exception as e:
        raise ExportError(f"torch.onnx could not trace the model: {str(e).splitlines()[0][:200]}") from None
    return _write(path, onnx.load_from_string(blob))


def onnx_session(path, threads: int | None = None, optimized_path=None):
    """An onnxruntime CPU session for ``path`` (a file, or the model's bytes; all graph optimizations on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        where = "the model" if isinstance(path, bytes) else repr(str(path))
        raise ExportError(f"onnxruntime cannot load {where}: {str(e).splitlines()[0][:200]}") from None


@torch.no_grad()
def check_onnx(qmodel: QModel, path, images: torch.Tensor, labels: torch.Tensor | None = None,
               batch_size: int = 32, threads: int | None = None, reference: torch.Tensor | None = None) -> dict:
    """Run the exported ``path`` in onnxruntime (CPU) and ``qmodel`` in PyTorch on ``images``.

    Returns ``{"images", "agreement"`` (top-1 agreement, percent), ``"max_abs_diff"``,
    ``"mean_abs_diff"`` (logits), and with ``labels`` ``"top1_torch"``, ``"top1_onnx"``}.
    ``reference``: the PyTorch logits, if already computed.
    """
    if not Path(path).is_file():
        raise ExportError(f"{str(path)!r} is not a file")
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    ours, theirs = [], []
    for i in range(0, images.shape[0], batch_size):
        xb = images[i:i + batch_size]
        if reference is None:
            ours.append(qmodel.model(xb).float().cpu())
        theirs.append(torch.from_numpy(sess.run(None, {name: xb.cpu().numpy().astype(np.float32)})[0]).float())
    a, b = (torch.cat(ours) if reference is None else reference.float().cpu()), torch.cat(theirs)
    diff = (a - b).abs()
    out = {"images": int(a.shape[0]),
           "agreement": (a.argmax(1) == b.argmax(1)).float().mean().item() * 100,
           "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    if labels is not None:
        y = labels.cpu()
        out["top1_torch"] = (a.argmax(1) == y).float().mean().item() * 100
        out["top1_onnx"] = (b.argmax(1) == y).float().mean().item() * 100
    return out
