"""Plan -> ONNX: the placeholder ``kind`` of every spec, and the exporter that installs
the export forwards while the model is traced.

Each lowering is registered by what it lowers, so that a new layer type or quantizer
regime is one module here plus one import line in ``evolq.export.onnx``:

* ``LAYERS``: module type -> ``build(exporter, layer)`` returning the layer's export
  forward ``forward(mod, x)`` (``linear``, ``conv``);
* ``ACTIVATIONS``: quantizer type -> ``lower(q, x_ndim, name)`` returning
  ``(scale, zero_point, axis, signed)`` of its Q/DQ pair, None when the quantizer is off,
  or raising ``ExportError`` for what ONNX cannot express (``activations``);
* ``NODES``: placeholder kind -> ``nodes(spec, out, inputs, inits)`` returning the ONNX
  nodes that replace the placeholder (``activations``: ``"QDQ"``; ``weights``: ``"DQW"``).

Lookups follow the class hierarchy (a ``QConv2dSame`` lowers as a ``QConv2d``).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable

import numpy as np
import torch

from ...errors import ExportError
from ...qnn.layer_bits import is_float_layer
from ...qnn.qmodel import QModel
from ...quant import Quantizer
from .plan import ActSpec, Placeholder, Plan, dq_value, to_np

__all__ = ["LAYERS", "ACTIVATIONS", "NODES", "lowers_layer", "lowers_activation", "lowers_node", "lowering_for",
           "Exporter", "export_mode"]

LAYERS: dict[type, Callable] = {}
ACTIVATIONS: dict[type, Callable] = {}
NODES: dict[str, Callable] = {}


def _registrar(registry: dict, keys):
    def add(fn):
        for k in keys:
            registry[k] = fn
        return fn

    return add


def lowers_layer(*types_):
    """``@lowers_layer(QLinear)``: register the export forward builder of a layer type."""
    return _registrar(LAYERS, types_)


def lowers_activation(*types_):
    """``@lowers_activation(UniformQuantizer)``: register how a quantizer type becomes a Q/DQ pair."""
    return _registrar(ACTIVATIONS, types_)


def lowers_node(kind: str):
    """``@lowers_node("QDQ")``: register the ONNX nodes that replace a placeholder kind."""
    return _registrar(NODES, (kind,))


def lowering_for(registry: dict, obj):
    """The entry for ``type(obj)`` or its nearest registered base class; None if there is none."""
    return next((registry[c] for c in type(obj).__mro__ if c in registry), None)


class Exporter:
    """The export's state: the model, the options, module names (for messages), the quantizers
    a lowering claimed, and the ``Plan`` the trace fills."""

    def __init__(self, qmodel: QModel, opset: int, bias_correction: str = "weights", channel_factors: str = "fold",
                 pack: str = "auto"):
        self.qmodel, self.opset, self.plan = qmodel, opset, Plan()
        self.pack = pack
        self.bias_correction, self.channel_factors = bias_correction, channel_factors
        self.names = {m: n for n, m in qmodel.model.named_modules()}
        self.claimed: set[int] = set()

    def act_spec(self, q: Quantizer, x_ndim: int) -> ActSpec | None:
        """The Q/DQ pair of activation quantizer ``q`` on an ``x_ndim``-D input (None: ``q`` is off)."""
        name = self.names.get(q, "?")
        self.claimed.add(id(q))
        lower = lowering_for(ACTIVATIONS, q)
        if lower is None:
            raise ExportError(f"quantizer {name} of type {type(q).__name__} has no ONNX form")
        got = lower(q, x_ndim, name)
        if got is None:
            return None
        scale, zp, axis, signed = got
        qmin, qmax = q.qmin, q.qmax
        if signed:  # int8 grid -> the same grid shifted into uint8 (onnxruntime's x86 kernels use uint8 activations)
            zp, qmin, qmax = zp + 128, qmin + 128, qmax + 128
        return ActSpec(name, to_np(scale), to_np(zp, np.int64), to_np(scale), to_np(zp, np.int64), qmin, qmax, False,
                       axis)

    def emit(self, kind: str, spec, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A placeholder of ``kind`` on ``x`` whose torch value is ``value``; ``spec`` joins the plan."""
        return Placeholder.apply(x, value, kind, self.plan.add(kind, spec))

    def qdq(self, spec: ActSpec, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the Q -> [Clip] -> DQ of ``spec``."""
        return self.emit("QDQ", spec, x, dq_value(x, spec))

    def quant_act(self, q: Quantizer, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec(q, x.ndim)
        return x if spec is None else self.qdq(spec, x)


@contextlib.contextmanager
def export_mode(qmodel: QModel, exporter: Exporter):
    """Give every quantized layer and activation quantizer its export forward; restore on exit."""
    patched = []
    model = qmodel.model
    try:
        for m in model.modules():
            if is_float_layer(m):
                continue  # layer_bits "float": the float layer as PyTorch computes it
            build = lowering_for(LAYERS, m)
            if build is None:
                continue
            m.forward = types.MethodType(build(exporter, m), m)
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


def _quant_forward(exporter: Exporter):
    def forward(mod, x):
        return exporter.quant_act(mod, x)
    return forward
