"""OpenVINO (CPU plugin) on the ONNX export: the kernels it runs are the layer types and
runtime precisions of the compiled model's execution graph. Needs ``pip install 'evolq[openvino]'``."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .base import Runner, Runtime

__all__ = ["OpenVINORuntime"]

_COMPUTE = ("FullyConnected", "Convolution", "MatMul", "GroupConvolution", "Subgraph")


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
            kind = str(info["layerType"]) if "layerType" in info else op.get_type_name()
            if kind not in _COMPUTE:
                continue
            prec = str(info["runtimePrecision"]) if "runtimePrecision" in info else ""
            (integer if prec in ("u8", "i8") else flt)[kind] += 1
        return {"integer": dict(integer), "float": dict(flt)}


class OpenVINORuntime(Runtime):
    name = "openvino"
    format = "onnx"
    package = "openvino"
    extra = "openvino"

    def load(self, path, threads: int) -> Runner:
        return _OVRunner(path, threads)
