"""Exported forms of a quantized model, one module each: ``onnx`` (the QDQ graph that
onnxruntime and OpenVINO read), ``pt2`` (a ``torch.export`` program in PyTorch's PT2E
quantize/dequantize form, which inductor lowers to oneDNN int8 kernels); ``runtimes``
holds one module per runtime that checks and times an exported file (``FORMATS`` and
``RUNTIMES`` are the registries the command line reads)."""
from __future__ import annotations

from . import latency  # noqa: F401  (registers the "inductor" latency runtime)
from .onnx import INT4_OPSET, MIN_OPSET, check_onnx, export_float_onnx, export_onnx, onnx_session
from .pt2 import export_pt2, load_pt2

__all__ = ["export_onnx", "check_onnx", "export_float_onnx", "onnx_session", "export_pt2", "load_pt2", "FORMATS",
           "MIN_OPSET", "INT4_OPSET"]

FORMATS = {"onnx": export_onnx, "pt2": export_pt2}  # format -> writer(qmodel, path, **options)
