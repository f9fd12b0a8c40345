"""OpenVINO (CPU plugin) on the ONNX export: the kernels it runs are the layer types and
runtime precisions of the compiled model's execution graph. Needs ``pip install 'evolq[openvino]'``."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .base import Runner, Runtime

__all__ = ["OpenVINORuntime"]

_COMPUTE = ("FullyConnected", "Convolution", "MatMul", "GroupConvolution", "Subgraph")


def _text(info, key: str) -> str:
    """An execution-graph attribute as text (rt_info values are ``OVAny``; ``str()`` of one
    names the class, ``astype(str)`` gives the value)."""
    if key not in info:
        return ""
    value = info[key]
    return value.astype(str) if hasattr(value, "astype") else str(value)


class _OVRunner(Runner):
    def __init__(self, path, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x):
        out = self.request.infer({0: x.cpu().numpy().astype(np.float32)})
        return torch.from_numpy(np.asarray(next(iter(out.values())))).float()

    def kernels(self):
        integer, flt = Counter(), Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = _text(info, "layerType") or op.get_type_name()
            if kind not in _COMPUTE:
                continue
            prec = _text(info, "runtimePrecision")
            (integer if prec in ("u8", "i8") else flt)[kind] += 1
        return {"integer": dict(integer), "float": dict(flt)}


class OpenVINORuntime(Runtime):
    name = "openvino"
    format = "onnx"
    package = "openvino"
    extra = "openvino"
    runner = _OVRunner
