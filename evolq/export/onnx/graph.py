"""The graph: traced with ``torch.onnx.export`` (TorchScript exporter) while the export
forwards emit placeholders, then lowered: each placeholder node becomes the ONNX nodes its
kind's lowering builds (``exporter.NODES``), with their initializers; the float weights
that only placeholders read and the placeholder domain are dropped."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from ...errors import ExportError
from .exporter import NODES
from .plan import DOMAIN, Plan

__all__ = ["Initializers", "trace", "lower"]


class Initializers:
    """The initializers the lowerings add, with names made unique per base name."""

    def __init__(self):
        self.tensors: list = []
        self._used: dict[str, int] = {}

    def uniq(self, base: str) -> str:
        base = base or "q"
        k = self._used.get(base, 0)
        self._used[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def floats(self, name: str, arr: np.ndarray) -> str:
        from onnx import TensorProto, helper

        self.tensors.append(helper.make_tensor(name, TensorProto.FLOAT, list(arr.shape), arr.reshape(-1).tolist()))
        return name

    def ints(self, name: str, arr, dtype: int) -> str:
        """Integers as ``dtype`` (8-bit, or 4-bit packed two to a byte, low nibble first)."""
        from onnx import TensorProto, helper

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
        self.tensors.append(t)
        return name


def trace(module, example, opset) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    return f.getvalue()


def lower(proto, plan: Plan):
    """Replace ``proto``'s placeholders by the nodes of ``plan``'s specs, in place; returns ``proto``."""
    graph = proto.graph
    inits = Initializers()
    nodes = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        build = NODES.get(node.op_type)
        if build is None:  # pragma: no cover
            raise ExportError(f"internal: unknown placeholder {node.op_type}")
        index = next(a.i for a in node.attribute if a.name == "index")
        nodes.extend(build(plan.get(node.op_type, index), node.output[0], node.input, inits))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits.tensors)
    # drop float weights only the placeholders read, and the placeholder domain
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]  # the tracer's shapes around the placeholders; onnxruntime infers them again
    ops = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(ops)
    domains = {n.domain for n in graph.node} - {"", "ai.onnx"} - {o.domain for o in ops}
    if domains:  # contrib operators (com.microsoft's MatMulNBits)
        from onnx import helper

        proto.opset_import.extend(helper.make_opsetid(d, 1) for d in sorted(domains))
    return proto
