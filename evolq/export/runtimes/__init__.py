"""Runtimes that execute an exported file: one module per runtime, each a ``Runtime``
registered in ``RUNTIMES`` (a new runtime is one file plus one line here).

A runtime loads an exported file into a ``Runner`` (a callable on an image batch that
returns float logits), loads the same model's FP32 form for comparison, and reports the
kernels it really executes (``Runner.kernels()``: integer and float compute kernels by
name). ``check_export`` and ``bench_export`` (``evolq.export.check``) build on this.
"""
from __future__ import annotations

import importlib

from ...errors import ExportError
from .base import Runner, Runtime

__all__ = ["Runner", "Runtime", "RUNTIMES", "FORMAT_RUNTIMES", "get_runtime"]

RUNTIMES = {"inductor": "evolq.export.runtimes.inductor:InductorRuntime",
            "onnxruntime": "evolq.export.runtimes.onnxruntime:OnnxRuntime",
            "openvino": "evolq.export.runtimes.openvino:OpenVINORuntime"}
FORMAT_RUNTIMES = {"pt2": ("inductor",), "onnx": ("onnxruntime", "openvino")}  # the first is the default


def get_runtime(name: str, fmt: str | None = None) -> Runtime:
    """The runtime ``name``, checked against the export format and its installed package."""
    if name not in RUNTIMES:
        raise ExportError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    if fmt is not None and name not in FORMAT_RUNTIMES.get(fmt, ()):
        raise ExportError(f"runtime {name} does not run the {fmt} format; for {fmt} choose: "
                          f"{', '.join(FORMAT_RUNTIMES.get(fmt, ()))}")
    module, _, cls = RUNTIMES[name].partition(":")
    runtime = getattr(importlib.import_module(module), cls)()
    runtime.require()
    return runtime
