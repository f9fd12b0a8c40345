"""onnxruntime (CPU execution provider, all graph optimizations): the kernels it runs are
the node types of the optimized graph it saves."""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import torch

from .base import Runner, Runtime

__all__ = ["OnnxRuntime", "INTEGER_OPS", "FLOAT_OPS"]

INTEGER_OPS = {"QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits",
               "DynamicQuantizeMatMul", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu",
               "QLinearSoftmax", "QAttention", "QLinearWhere", "QLinearReduceMean", "DynamicQuantizeLSTM"}
FLOAT_OPS = {"MatMul", "Gemm", "Conv", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv", "ConvTranspose",
             "Attention", "MultiHeadAttention"}


class _OrtRunner(Runner):
    def __init__(self, path, threads: int):
        from ..onnx import onnx_session

        self.path, self.threads = path, threads
        self.sess = onnx_session(path, threads)
        self.input = self.sess.get_inputs()[0].name

    def __call__(self, x):
        return torch.from_numpy(self.sess.run(None, {self.input: x.cpu().numpy().astype(np.float32)})[0]).float()

    def kernels(self):
        import onnx

        from ..onnx import onnx_session

        with tempfile.TemporaryDirectory() as d:
            opt = Path(d) / "optimized.onnx"
            onnx_session(self.path, self.threads, optimized_path=opt)
            counts = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
        return {"integer": {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS},
                "float": {k: v for k, v in sorted(counts.items()) if k in FLOAT_OPS}}


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    format = "onnx"
    package = "onnxruntime"
    extra = "export"
    runner = _OrtRunner
