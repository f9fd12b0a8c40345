"""The weight-only regime's Linears as onnxruntime ``MatMulNBits`` nodes (com.microsoft; the layout
and arithmetic in ``evolq.quant.nbits``).

A ``QLinear`` whose input quantizer is a ``DynamicBlockQuantizer`` is one node: its unsigned codes
packed at the container's bits (``container_bits``: 3-bit codes in 4-bit containers) per (output
row, block of ``block_size`` input columns), a float32 scale and a packed zero-point per (row, block)
(a per-channel weight repeats its row's in every block), the bias, and ``accuracy_level=4``, so that
onnxruntime quantizes the input per row and block to int8 as the PyTorch model does. What has no
such form (bias correction, StatsQ's half-step grid, codes outside the container) is refused in
one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import ExportError
from ...quant.nbits import container_bits, dynamic_block_quant
from .exporter import Exporter, lowers_node
from .weights import pack_bits, weight_spec

__all__ = ["NBitsSpec", "MS_DOMAIN", "nbits_forward", "pack_rows"]

MS_DOMAIN = "com.microsoft"


@dataclass
class NBitsSpec:
    """One ``MatMulNBits``: ``codes`` (N, K) unsigned, ``scale``/``zp`` (N, blocks), ``bits`` the container."""
    name: str
    codes: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    bits: int
    block: int
    bias: np.ndarray | None


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row of non-negative ``values`` (rows, n) at ``bits`` (2, 4 or 8) per value, low bits first,
    every row padded to whole bytes: uint8 (rows, ceil(n * bits / 8))."""
    per = 8 // bits
    v = np.asarray(values, np.uint16)
    pad = (-v.shape[1]) % per
    if pad:
        v = np.concatenate([v, np.zeros((v.shape[0], pad), np.uint16)], axis=1)
    v = v.reshape(v.shape[0], -1, per) << (np.arange(per, dtype=np.uint16) * bits)
    return v.sum(axis=2, dtype=np.uint16).astype(np.uint8)


def nbits_forward(exporter: Exporter, layer):
    """The export forward of a weight-only ``QLinear`` (see the module docstring)."""
    name = exporter.names.get(layer, "?")
    if layer._factor() is not None or getattr(layer, "input_scale", None) is not None:  # pragma: no cover
        raise ExportError(f"layer {name}: per-channel input factors have no MatMulNBits form")
    iq = layer.input_quant
    exporter.claimed.add(id(iq))
    spec, deq, affine, shift = weight_spec(exporter, layer, layer.weight.detach().float())
    if affine is not None or shift is not None:
        raise ExportError(f"layer {name}: MatMulNBits stores integer zero-points and no bias correction; quantize "
                          f"without bias_correction and without StatsQ's half-step grid (the weight-only preset)")
    if spec.signed:
        raise ExportError(f"layer {name}: MatMulNBits takes unsigned weight codes; quantize with the weight-only "
                          f"preset")
    n, k = spec.values.shape
    block = iq.block_for(k)
    if spec.group is not None and spec.group != block:  # pragma: no cover - layer_bits keeps them equal
        raise ExportError(f"layer {name}: its input blocks ({block}) differ from its weight groups ({spec.group})")
    cb = container_bits(spec.bits, block)
    nb = math.ceil(k / block)
    if spec.group is not None:
        scale, zp = spec.scale.reshape(n, nb), spec.zp.reshape(n, nb)
    else:
        scale, zp = np.repeat(spec.scale.reshape(n, 1), nb, 1), np.repeat(spec.zp.reshape(n, 1), nb, 1)
    hi = 2**cb - 1
    if spec.values.min() < 0 or spec.values.max() > hi or zp.min() < 0 or zp.max() > hi:  # pragma: no cover
        raise ExportError(f"layer {name}: its codes or zero-points leave the {cb}-bit container")
    bias = layer.bias.detach().float() if layer.bias is not None else None
    ns = NBitsSpec(name, spec.values, np.ascontiguousarray(scale, np.float32), zp, cb, block,
                   None if bias is None else bias.numpy().astype(np.float32))
    w = deq.contiguous()

    def forward(mod, x):
        y = torch.nn.functional.linear(dynamic_block_quant(x, block), w, bias)
        return exporter.emit("NBITS", ns, x, y)

    return forward


@lowers_node("NBITS")
def nbits_nodes(s: NBitsSpec, out: str, inputs, inits) -> list:
    from onnx import TensorProto, helper

    base = inits.uniq(s.name + ".weight")
    n, k = s.codes.shape
    nb = s.scale.shape[1]
    codes = s.codes
    pad = nb * s.block - k
    if pad:  # the last block padded with its zero-point: those columns dequantize to zero
        codes = np.concatenate([codes, np.repeat(s.zp[:, -1:], pad, 1)], axis=1)
    packed = pack_bits(codes.reshape(-1), s.bits).reshape(n, nb, s.block * s.bits // 8)
    b = f"{base}.nbits"
    inits.tensors.append(helper.make_tensor(b, TensorProto.UINT8, list(packed.shape), packed.tobytes(), raw=True))
    sc = inits.floats(f"{base}.scales", s.scale.reshape(-1))
    zp = pack_rows(s.zp, s.bits).reshape(-1)
    zn = f"{base}.zero_points"
    inits.tensors.append(helper.make_tensor(zn, TensorProto.UINT8, [zp.size], zp.tobytes(), raw=True))
    ins = [inputs[0], b, sc, zn]
    if s.bias is not None:
        ins += ["", inits.floats(f"{base}.bias", s.bias)]
    return [helper.make_node("MatMulNBits", ins, [out], name=f"{base}/MatMulNBits", domain=MS_DOMAIN, K=k, N=n,
                             bits=s.bits, block_size=s.block, accuracy_level=4)]
