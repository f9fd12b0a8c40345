"""PyTorch's x86 path: a ``torch.export`` program (``--format pt2``) compiled by inductor
with freezing on, which lowers the PT2E quantize/dequantize patterns to oneDNN int8 kernels
(``qlinear_pointwise``, ``qconv_pointwise``; the patterns are registered by torchao, where
PT2E lives since torch 2.14). One compile per batch shape and thread count: inductor fixes
the OpenMP thread count of its kernels when it compiles."""
from __future__ import annotations

import re
from collections import Counter

import torch

from .base import Runner, Runtime

__all__ = ["InductorRuntime", "count_kernels", "compile_module"]

_CALL = re.compile(r"torch\.ops\.(onednn|mkldnn|aten|quantized|torchao)\.(\w+)\.|extern_kernels\.(\w+)\(")


def count_kernels(codes: list[str]) -> dict:
    """Compute kernels called by inductor's generated code: oneDNN int8 (``onednn.q*``) as
    integer, other matmul/convolution/attention kernels as float."""
    integer, flt = Counter(), Counter()
    for code in codes:
        for ns, op, ext in _CALL.findall(code):
            name = f"{ns}.{op}" if ns else f"extern_kernels.{ext}"
            base = op or ext
            if ns == "onednn" and base.startswith("q") or "int8" in base:
                integer[name] += 1
            elif any(k in base for k in ("mm", "linear", "conv", "attention", "addmm", "baddbmm")):
                flt[name] += 1
    return {"integer": dict(integer), "float": dict(flt)}


def _setup():
    import torch._inductor.config as cfg
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - the quantize ops
    try:  # importing torchao's X86InductorQuantizer registers inductor's int8 weight-prepack and fusion passes
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError:  # pragma: no cover - checked by Runtime.require
        pass
    cfg.freezing = True


def _run_and_get_code(fn, x):
    """``fn(x)`` and the code inductor generated for it. Unlike ``torch._inductor.utils.run_and_get_code``
    this does not reset dynamo first, which would drop every other program compiled in this process
    (each would then be compiled again on its next call: twice the compile time when several
    programs are timed in alternation, as ``evolq.allocation.latency`` does); only when dynamo did
    not even look at a frame (it had this module's code already) is it reset and run again."""
    from unittest import mock

    from torch._dynamo.utils import counters
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    frames = counters["frames"]["total"]
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(x)
    if not codes and counters["frames"]["total"] == frames:
        from torch._inductor.utils import run_and_get_code

        return run_and_get_code(fn, x)
    return out, list(dict.fromkeys(codes))


class _CompiledRunner(Runner):
    def __init__(self, module: torch.nn.Module, threads: int):
        _setup()
        self.module, self.threads = module, threads
        self.compiled: dict = {}
        self.codes: list[str] = []

    def __call__(self, x):
        torch.set_num_threads(self.threads)
        key = tuple(x.shape)
        with torch.no_grad():
            if key not in self.compiled:
                fn = torch.compile(self.module, dynamic=False)
                out, codes = _run_and_get_code(fn, x)
                self.compiled[key] = fn
                self.codes.extend(codes)
                return out.float()
            return self.compiled[key](x).float()

    def kernels(self):
        return count_kernels(self.codes[-1:] if self.codes else [])


def compile_module(module: torch.nn.Module, threads: int) -> Runner:
    """``module`` (a ``torch.export`` program's ``.module()``, so that it has code of its own
    for dynamo to cache) compiled by inductor with freezing at ``threads`` threads, as this
    runtime compiles a pt2 file: compiled on its first call, once per input shape."""
    return _CompiledRunner(module, threads)


class InductorRuntime(Runtime):
    name = "inductor"
    format = "pt2"
    package = "torchao"
    extra = "deploy"

    def load(self, path, threads: int) -> Runner:
        from ..pt2 import load_pt2

        return _CompiledRunner(load_pt2(path).module(), threads)

    def load_float(self, qmodel, threads: int, folder, example=None) -> Runner:
        from ..pt2 import float_program

        return _CompiledRunner(float_program(qmodel, example).module(), threads)
