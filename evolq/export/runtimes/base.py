"""What every runtime module provides (``evolq.export.runtimes``)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ...errors import ExportError

__all__ = ["Runtime", "Runner"]


class Runner:
    """A loaded model: ``runner(x)`` -> float32 logits (a torch tensor) for an image batch."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def kernels(self) -> dict:
        """``{"integer": {kernel: count}, "float": {kernel: count}}``: the compute kernels run."""
        return {"integer": {}, "float": {}}


class Runtime:
    """A runtime: ``name``, the export ``format`` it reads, the package it needs (``package``,
    installed by the ``extra``), the ``runner`` class that ``load(path, threads)`` builds (or an
    overridden ``load``) and ``load_float(qmodel, threads, folder, example)``."""

    name = ""
    format = ""
    package = ""
    extra = "export"

    def require(self) -> None:
        try:
            importlib.import_module(self.package)
        except ImportError:
            raise ExportError(f"runtime {self.name} needs the package {self.package}, which is not installed: "
                              f"pip install 'evolq[{self.extra}]'") from None

    runner: type[Runner] | None = None  # called as runner(path, threads) by load()

    def load(self, path, threads: int) -> Runner:
        return self.runner(path, threads)

    def load_float(self, qmodel, threads: int, folder, example=None) -> Runner:
        """The same model in float in this runtime (``example``: an input to trace with); by default
        its float ONNX file (ONNX runtimes)."""
        from ..onnx import export_float_onnx
        from ..pt2 import float_module

        path = export_float_onnx(float_module(qmodel), Path(folder) / "fp32.onnx", example=example)
        return self.load(path, threads)
