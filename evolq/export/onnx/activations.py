"""Activation quantizers as QuantizeLinear [-> Clip] -> DequantizeLinear pairs.

Per tensor (uint8/int8; int8 grids are shifted into uint8, which onnxruntime's x86 kernels
use) for ``UniformQuantizer``; per axis on the last axis for PTF and channel-factor
quantizers (channel c's step is ``scale * factor[c]``: the power-of-two factors are part of
the per-channel scale); an integer Clip between the two below 8 bits. Log2 quantizers
(attention probabilities 2^-k) have no Q/DQ form and are refused by name.
"""
from __future__ import annotations

import numpy as np

from ...errors import ExportError
from ...quant import ChannelFactorQuantizer, Log2Quantizer, PTFQuantizer, UniformQuantizer
from .exporter import lowers_activation, lowers_node

__all__ = ["usable"]


def usable(q, name: str) -> bool:
    """False for a quantizer that is off; ``ExportError`` for one that cannot be exported as
    it stands (never calibrated, in population mode, a weight quantizer, over 8 bits)."""
    if not q.enabled:
        return False
    if not bool(q.calibrated):
        raise ExportError(f"the model was never calibrated: quantizer {name} has no scale yet "
                          f"(run evolq.prepare_model or evolq.calibrate first)")
    if q.pop_scale is not None:
        raise ExportError(f"quantizer {name} is in population mode; clear pop_scale before exporting")
    if getattr(q, "kind", "activation") == "weight":
        raise ExportError(f"weight quantizer {name} is used outside a Linear/Conv2d layer evolq can export")
    if q.bits > 8:
        raise ExportError(f"quantizer {name} has {q.bits} bits; ONNX activations are exported as 8-bit integers")
    return True


@lowers_activation(UniformQuantizer)
def uniform(q, x_ndim: int, name: str):
    if not usable(q, name):
        return None
    axis = q._axis(x_ndim)
    scale, zp = q.scale.float().reshape(-1), q.zero_point.float().reshape(-1)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return scale, zp, axis, q.signed


@lowers_activation(PTFQuantizer, ChannelFactorQuantizer)
def channel_factors(q, x_ndim: int, name: str):
    """Channel c on the last axis, step ``scale * factor[c]``."""
    if not usable(q, name):
        return None
    factor = q.factor.float()
    scale = (q.scale.float() * factor).reshape(-1)
    zp = q.zero_point.float().expand_as(factor).reshape(-1)
    return scale, zp, x_ndim - 1, False


@lowers_activation(Log2Quantizer)
def log2(q, x_ndim: int, name: str):
    if not q.enabled:
        return None
    raise ExportError(f"quantizer {name} is a log2 quantizer (attention probabilities 2^-k), which "
                      f"QuantizeLinear/DequantizeLinear cannot express; quantize with attn_probs='uniform' "
                      f"to export")


@lowers_node("QDQ")
def qdq_nodes(a, out: str, inputs, inits) -> list:
    """QuantizeLinear [-> Clip] -> DequantizeLinear of ``inputs[0]`` into ``out``."""
    from onnx import TensorProto, helper

    base = inits.uniq(a.name)
    dtype = TensorProto.INT8 if a.signed else TensorProto.UINT8
    axis = {} if a.axis is None or a.q_scale.ndim == 0 else {"axis": a.axis}
    qs = inits.floats(f"{base}.q_scale", a.q_scale)
    qz = inits.ints(f"{base}.q_zero_point", a.q_zp, dtype)
    qout = f"{base}.quantized"
    nodes = [helper.make_node("QuantizeLinear", [inputs[0], qs, qz], [qout], name=f"{base}/QuantizeLinear", **axis)]
    lo, hi = (-128, 127) if a.signed else (0, 255)
    if (a.qmin, a.qmax) != (lo, hi):  # fewer than 8 bits: integer clip
        cmin = inits.ints(f"{base}.qmin", np.array(a.qmin), dtype)
        cmax = inits.ints(f"{base}.qmax", np.array(a.qmax), dtype)
        nodes.append(helper.make_node("Clip", [qout, cmin, cmax], [qout + ".clipped"], name=f"{base}/Clip"))
        qout += ".clipped"
    daxis = {} if a.axis is None or a.dq_scale.ndim == 0 else {"axis": a.axis}
    same = a.dq_scale.shape == a.q_scale.shape and np.array_equal(a.dq_scale, a.q_scale)
    ds = qs if same else inits.floats(f"{base}.dq_scale", a.dq_scale)
    same = a.dq_zp.shape == a.q_zp.shape and np.array_equal(a.dq_zp, a.q_zp)
    dz = qz if same else inits.ints(f"{base}.dq_zero_point", a.dq_zp, dtype)
    nodes.append(helper.make_node("DequantizeLinear", [qout, ds, dz], [out], name=f"{base}/DequantizeLinear", **daxis))
    return nodes
