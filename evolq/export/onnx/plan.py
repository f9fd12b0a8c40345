"""What the traced graph's placeholders become: one spec per placeholder, collected in a
``Plan`` while the model is traced, and the ``Placeholder`` op that marks each one.

A quantized layer's export forward (``linear``, ``conv``, ``activations``) computes in torch
the value the finished graph will compute (``dq_value``; the integers from the quantizers'
own ``quant_codes``) and emits one ``evolq.export::{kind}`` node carrying the index of its
spec; ``graph.lower`` then replaces each node by the ONNX nodes that ``NODES[kind]`` builds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...quant.range import quant_codes

__all__ = ["DOMAIN", "ActSpec", "WeightSpec", "Plan", "Placeholder", "to_np", "fake_quant", "dq_value"]

DOMAIN = "evolq.export"


@dataclass
class ActSpec:
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
class WeightSpec:
    """DequantizeLinear(integer initializer, scale, zero-point, axis)."""
    name: str
    values: np.ndarray  # integers (int64), in the container's range
    scale: np.ndarray
    zp: np.ndarray
    bits: int
    signed: bool
    axis: int
    block: int | None = None  # 4-bit Linear weights: the per-column scales written as blocks along axis 0
    packed: bool = False  # stored bit-packed (uint8 bytes), unpacked by constant nodes into an 8-bit container
    float_ops: bool = False  # dequantized by Cast/Sub/Mul on constants (folded at load), not a DequantizeLinear
    group: int | None = None  # group-wise: scale and zp are (rows, columns / group), a blocked DequantizeLinear


@dataclass
class Plan:
    """Per placeholder kind (``"QDQ"``: ``ActSpec``, ``"DQW"``: ``WeightSpec``, ...), the specs in
    the order the trace emitted their placeholders; a placeholder's index points into its kind's list."""
    specs: dict = field(default_factory=dict)

    def add(self, kind: str, spec) -> int:
        items = self.specs.setdefault(kind, [])
        items.append(spec)
        return len(items) - 1

    def get(self, kind: str, index: int):
        return self.specs[kind][index]


class Placeholder(torch.autograd.Function):
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


def to_np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def fake_quant(x, scale, zp, qmin, qmax):
    """The stored integers ``codes + z`` and the dequantized values ``codes * s``, from
    the quantizers' own ``quant_codes`` (so the graph holds exactly evolq's grid)."""
    q = quant_codes(x, scale, zp, qmin, qmax)
    return q + zp, q * scale


def dq_value(x: torch.Tensor, a: ActSpec) -> torch.Tensor:
    """What Q -> [Clip] -> DQ computes on ``x`` (torch, for the trace)."""
    shape = [1] * x.ndim
    if a.axis is not None:
        shape[a.axis] = -1
    qs = torch.from_numpy(a.q_scale).reshape(shape if a.q_scale.ndim else [])
    qz = torch.from_numpy(a.q_zp.astype(np.float32)).reshape(shape if a.q_zp.ndim else [])
    ints, _ = fake_quant(x, qs, qz, a.qmin, a.qmax)
    ds = torch.from_numpy(a.dq_scale).reshape(shape if a.dq_scale.ndim else [])
    dz = torch.from_numpy(a.dq_zp.astype(np.float32)).reshape(shape if a.dq_zp.ndim else [])
    return (ints - dz) * ds
