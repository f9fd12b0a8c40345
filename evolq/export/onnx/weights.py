"""Weights as integer initializers feeding one DequantizeLinear each.

``weight_spec`` turns a layer's weight quantizer into the integers it rounds to (uint8/int8
for 5-8 bits, uint4/int4 for 2-4 bits, which needs opset 21), per output channel scale and
zero-point, with every start's rounding (GPTQ/OFQ's ``weight_delta``, AdaRound's offsets), a
half-step StatsQ grid, and weight bias correction either as the quantizer's own float
operations after the DequantizeLinear (``bias_correction="weights"``) or as a ratio in the
scale plus a per-channel shift on the layer's output (``"output"``). The result is checked
against the fake-quantized weights. ``dqw_nodes`` writes the initializers and the node.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import ExportError
from ...quant import UniformQuantizer
from ...quant.quantizers import bias_correct
from ...quant.range import split_zero_point
from .exporter import Exporter, lowers_node
from .plan import WeightSpec, fake_quant, to_np

__all__ = ["INT4_OPSET", "container", "weight_spec", "dq_weight", "dqw_nodes"]

INT4_OPSET = 21  # uint4/int4 tensors


def container(bits: int, signed: bool) -> int:
    """The ONNX integer type that stores ``bits``-bit weights."""
    from onnx import TensorProto

    if bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def weight_spec(exporter: Exporter, layer: nn.Module, w: torch.Tensor):
    """The integer weights of ``layer`` (``w`` is what its weight quantizer sees), their
    dequantized value as the graph computes it, the bias-correction affine (applied after
    the DequantizeLinear) and the shift (a term on the layer's output)."""
    wq = layer.weight_quant
    name = exporter.names.get(layer, "?")
    exporter.claimed.add(id(wq))
    if not isinstance(wq, UniformQuantizer):
        raise ExportError(f"layer {name}: weight quantizer {type(wq).__name__} has no ONNX form")
    if not bool(wq.calibrated):
        raise ExportError(f"the model was never calibrated: quantizer {name}.weight_quant has no scale yet "
                          f"(run evolq.prepare_model or evolq.calibrate first)")
    if wq.pop_scale is not None:
        raise ExportError(f"quantizer {name}.weight_quant is in population mode; clear pop_scale first")
    if wq.bits > 8:
        raise ExportError(f"layer {name} has {wq.bits}-bit weights; at most 8 bits are exported")
    if wq.bits <= 4 and exporter.opset < INT4_OPSET:
        raise ExportError(f"layer {name} has {wq.bits}-bit weights, stored as 4-bit integers, which need opset "
                          f">= {INT4_OPSET} (got opset {exporter.opset})")
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
        ints, w_q = fake_quant(w, scale, zp, wq.qmin, wq.qmax)
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
        if exporter.bias_correction == "weights":
            affine = (mu_q, ratio, mu)
        else:  # == (ints - z) * (s * r) + (mu - mu_q * r): the shift becomes a term on the layer's output
            scale = scale * ratio
            shift = (mu - mu_q * ratio).reshape(-1)
    elif half is not None:
        if exporter.bias_correction == "weights":
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
    spec = WeightSpec(name, to_np(ints, np.int64), to_np(scale.reshape(-1)), to_np(zp.reshape(-1), np.int64),
                      wq.bits, wq.signed, 0)
    return spec, deq, affine, shift


def dq_weight(exporter: Exporter, spec: WeightSpec, carrier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The placeholder of ``spec``'s DequantizeLinear on the float weight ``carrier`` (torch value ``value``)."""
    return exporter.emit("DQW", spec, carrier, value)


@lowers_node("DQW")
def dqw_nodes(w: WeightSpec, out: str, inputs, inits) -> list:
    """The integer initializer, its scale and zero-point, and the DequantizeLinear into ``out``."""
    from onnx import helper

    base = inits.uniq(w.name + ".weight")
    dtype = container(w.bits, w.signed)
    wi = inits.ints(f"{base}.quantized", w.values, dtype)
    scale, zp, attrs = w.scale, w.zp, {"axis": w.axis}
    if w.block:  # (K, N) weights, one scale per column: the same scale in each of the K / block rows
        rows = w.values.shape[0] // w.block
        scale, zp = np.tile(scale, (rows, 1)), np.tile(zp, (rows, 1))
        attrs = {"axis": 0, "block_size": w.block}
    ws = inits.floats(f"{base}.scale", scale)
    wz = inits.ints(f"{base}.zero_point", zp, dtype)
    return [helper.make_node("DequantizeLinear", [wi, ws, wz], [out], name=f"{base}/DequantizeLinear", **attrs)]
