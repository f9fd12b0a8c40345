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
from ...quant.groups import group_view, per_weight
from ...quant.quantizers import bias_correct
from ...quant.range import split_zero_point
from .exporter import Exporter, lowers_node
from .plan import WeightSpec, fake_quant, to_np

__all__ = ["INT4_OPSET", "PACKED_BITS", "container", "packs", "weight_spec", "dq_weight", "dqw_nodes", "pack_bits"]

INT4_OPSET = 21  # uint4/int4 tensors
PACKED_BITS = (2, 3, 5, 6, 7)  # widths no ONNX integer type holds without wasted bits


def packs(bits: int, pack: str) -> bool:
    """Whether weights of ``bits`` are stored bit-packed (``export_onnx(pack=...)``): ``"auto"`` packs
    the widths that a 4- or 8-bit container would waste bits on (2, 3, 5, 6, 7)."""
    return pack == "auto" and bits in PACKED_BITS


def container(bits: int, signed: bool, packed: bool = False) -> int:
    """The ONNX integer type that stores ``bits``-bit weights (packed ones are unpacked into 8 bits)."""
    from onnx import TensorProto

    if bits <= 4 and not packed:
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
    if wq.bits <= 4 and not packs(wq.bits, getattr(exporter, "pack", "none")) and exporter.opset < INT4_OPSET:
        raise ExportError(f"layer {name} has {wq.bits}-bit weights, stored as 4-bit integers, which need opset "
                          f">= {INT4_OPSET} (got opset {exporter.opset})")
    w = w.detach().float()
    out_ch = w.shape[0]
    if wq.ch_axis % w.ndim != 0:
        raise ExportError(f"layer {name}: weights quantized along axis {wq.ch_axis}; only per output channel "
                          f"(axis 0) is exported")
    group = getattr(wq, "group", None)
    shape = [-1] + [1] * (w.ndim - 1)
    if group is not None:  # one grid per (row, group of input columns), repeated over its columns
        scale, zp = (per_weight(t.float(), w.shape, group).contiguous() for t in (wq.scale, wq.zero_point))
    else:
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
    if group is not None:  # the spec keeps one scale and zero-point per (row, group)
        sq, zq = (group_view(t, group)[:, :, 0] for t in (scale, zp))
    else:
        sq, zq = scale.reshape(-1), zp.reshape(-1)
    spec = WeightSpec(name, to_np(ints, np.int64), to_np(sq), to_np(zq, np.int64),
                      wq.bits, wq.signed, 0, packed=packs(wq.bits, getattr(exporter, "pack", "none")), group=group)
    return spec, deq, affine, shift


def dq_weight(exporter: Exporter, spec: WeightSpec, carrier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The placeholder of ``spec``'s DequantizeLinear on the float weight ``carrier`` (torch value ``value``)."""
    return exporter.emit("DQW", spec, carrier, value)


@lowers_node("DQW")
def dqw_nodes(w: WeightSpec, out: str, inputs, inits) -> list:
    """The integer initializer, its scale and zero-point, and the DequantizeLinear into ``out``."""
    from onnx import helper

    base = inits.uniq(w.name + ".weight")
    dtype = container(w.bits, w.signed, w.packed)
    nodes = []
    if w.float_ops:
        return _float_dequant(base, w, out, inits)
    if w.group is not None:
        return _grouped_dqw(base, w, dtype, out, inits)
    if w.packed:
        wi, nodes = _unpack_nodes(base, w, dtype, inits)
    else:
        wi = inits.ints(f"{base}.quantized", w.values, dtype)
    scale, zp, attrs = w.scale, w.zp, {"axis": w.axis}
    if w.block:  # (K, N) weights, one scale per column: the same scale in each of the K / block rows
        rows = w.values.shape[0] // w.block
        scale, zp = np.tile(scale, (rows, 1)), np.tile(zp, (rows, 1))
        attrs = {"axis": 0, "block_size": w.block}
    ws = inits.floats(f"{base}.scale", scale)
    wz = inits.ints(f"{base}.zero_point", zp, dtype)
    return nodes + [helper.make_node("DequantizeLinear", [wi, ws, wz], [out], name=f"{base}/DequantizeLinear",
                                     **attrs)]


def _float_dequant(base: str, w: WeightSpec, out: str, inits) -> list:
    """A weight whose layer keeps a float input (a convolution in the weight-only regime): the
    integers bit-packed (``bits`` per weight; 8-bit ones as uint8) and dequantized by plain
    ``Cast -> Sub(zero-point) -> Mul(scale)`` on constants, which onnxruntime and OpenVINO fold into
    a float weight once at load (a ``DequantizeLinear`` there is kept for QDQ fusion and would run at
    every inference), per output channel or per group."""
    from onnx import TensorProto, helper

    shape = w.values.shape
    rows = shape[0]
    view = (rows, -1, w.group) if w.group is not None else (rows, -1)
    vals = w.values.reshape(view)
    flat = WeightSpec(w.name, vals, w.scale, w.zp, w.bits, w.signed, 0, packed=True)
    dtype = TensorProto.INT8 if w.signed else TensorProto.UINT8
    if w.bits < 8:
        wi, nodes = _unpack_nodes(base, flat, dtype, inits)
    else:
        wi, nodes = inits.ints(f"{base}.quantized", vals, dtype), []
    qshape = (rows, -1, 1) if w.group is not None else (rows, 1)
    zf = inits.floats(f"{base}.zero_point_f", np.asarray(w.zp, np.float32).reshape(qshape))
    sf = inits.floats(f"{base}.scale", np.asarray(w.scale, np.float32).reshape(qshape))
    t = [f"{base}/dequant_{i}" for i in range(3)]
    target = f"{base}.shape_w"
    inits.tensors.append(helper.make_tensor(target, TensorProto.INT64, [len(shape)], list(shape)))
    return nodes + [
        helper.make_node("Cast", [wi], [t[0]], to=TensorProto.FLOAT, name=t[0]),
        helper.make_node("Sub", [t[0], zf], [t[1]], name=t[1]),
        helper.make_node("Mul", [t[1], sf], [t[2]], name=t[2]),
        helper.make_node("Reshape", [t[2], target], [out], name=f"{base}/Reshape"),
    ]


def _grouped_dqw(base: str, w: WeightSpec, dtype: int, out: str, inits) -> list:
    """A group-wise weight (a convolution's, whose input stays float in the weight-only regime): the
    integers as (rows, columns), one blocked DequantizeLinear (opset 21, ``block_size`` = the group
    along axis 1) and a Reshape to the weight's shape. Every input is constant."""
    from onnx import TensorProto, helper

    shape = w.values.shape
    flat = WeightSpec(w.name, w.values.reshape(shape[0], -1), w.scale, w.zp, w.bits, w.signed, 0, packed=w.packed)
    if flat.packed:
        wi, nodes = _unpack_nodes(base, flat, dtype, inits)
    else:
        wi, nodes = inits.ints(f"{base}.quantized", flat.values, dtype), []
    ws = inits.floats(f"{base}.scale", np.ascontiguousarray(w.scale, np.float32))
    wz = inits.ints(f"{base}.zero_point", w.zp, dtype)
    nodes.append(helper.make_node("DequantizeLinear", [wi, ws, wz], [f"{base}.dequantized"],
                                  name=f"{base}/DequantizeLinear", axis=1, block_size=w.group))
    target = f"{base}.shape4"
    inits.tensors.append(helper.make_tensor(target, TensorProto.INT64, [len(shape)], list(shape)))
    nodes.append(helper.make_node("Reshape", [f"{base}.dequantized", target], [out], name=f"{base}/Reshape"))
    return nodes


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ``codes`` < 2^bits, ``bits`` each, little-endian: every group of 8 codes fills
    ``bits`` bytes (the last group padded with zeros). Returns uint8 (groups, bits)."""
    flat = np.asarray(codes, np.uint64).reshape(-1)
    pad = (-flat.size) % 8
    flat = np.concatenate([flat, np.zeros(pad, np.uint64)]).reshape(-1, 8)
    words = (flat << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(1, dtype=np.uint64)
    return ((words[:, None] >> (np.arange(bits, dtype=np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint8)


def _unpack_nodes(base: str, w: WeightSpec, dtype: int, inits) -> tuple[str, list]:
    """``w``'s integers bit-packed into a uint8 initializer (``pack_bits`` of ``values - low``), and the
    nodes that unpack them into ``dtype`` (8 bits) in ``w.values``' shape. Every input is constant, so
    a runtime folds them once when it loads the model (onnxruntime's and OpenVINO's constant folding):
    the file holds ``bits`` per weight and the kernels see an ordinary 8-bit DequantizeLinear."""
    from onnx import TensorProto, helper

    vals = np.asarray(w.values, np.int64)
    low = int(vals.min())
    codes = vals - low
    if int(codes.max()) >= 2**w.bits:  # pragma: no cover - integers wider than their bits
        raise ExportError(f"layer {w.name}: its integers span more than {w.bits} bits")
    b = w.bits
    packed = pack_bits(codes, b)
    name = f"{base}.packed{b}"
    inits.tensors.append(helper.make_tensor(name, TensorProto.UINT8, list(packed.shape), packed.tobytes(), raw=True))

    def const(suffix, arr):
        n = f"{base}.{suffix}"
        inits.tensors.append(helper.make_tensor(n, TensorProto.INT64, list(np.shape(arr)),
                                                np.asarray(arr, np.int64).reshape(-1).tolist()))
        return n

    byte_w = const("byte_weights", (256 ** np.arange(b, dtype=np.int64)).reshape(1, b))
    code_div = const("code_divisors", ((2**b) ** np.arange(8, dtype=np.int64)).reshape(1, 8))
    modulus = const("code_modulus", np.array(2**b))
    offset = const("code_low", np.array(low))
    shape = const("shape", np.array(vals.shape))
    count = const("count", np.array([vals.size]))
    zero = const("zero", np.array([0]))
    t = [f"{base}/unpack_{i}" for i in range(9)]
    out = f"{base}.quantized"
    nodes = [
        helper.make_node("Cast", [name], [t[0]], to=TensorProto.INT64, name=t[0]),
        helper.make_node("Mul", [t[0], byte_w], [t[1]], name=t[1]),
        helper.make_node("ReduceSum", [t[1], const("axis1", np.array([1]))], [t[2]], keepdims=1, name=t[2]),
        helper.make_node("Div", [t[2], code_div], [t[3]], name=t[3]),
        helper.make_node("Mod", [t[3], modulus], [t[4]], name=t[4]),
        helper.make_node("Reshape", [t[4], const("flat", np.array([-1]))], [t[5]], name=t[5]),
        helper.make_node("Slice", [t[5], zero, count], [t[6]], name=t[6]),
        helper.make_node("Add", [t[6], offset], [t[7]], name=t[7]),
        helper.make_node("Reshape", [t[7], shape], [t[8]], name=t[8]),
        helper.make_node("Cast", [t[8]], [out], to=dtype, name=out + "/Cast"),
    ]
    return out, nodes
