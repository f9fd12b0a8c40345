"""The deploy regime as a ``torch.export`` program in PyTorch's PT2E quantize/dequantize
form, for PyTorch's x86 int8 path.

``export_pt2(qmodel, path)`` lowers a deploy-regime ``QModel`` (``QuantConfig.preset("deploy")``)
to a plain module tree whose quantized layers carry evolq's own integers and scales (no
re-calibration, no re-rounding):

* each Linear/Conv input: ``quantize_per_tensor`` -> ``dequantize_per_tensor`` (uint8, the
  calibrated or searched scale and zero-point; fewer than 8 bits clamp to their range);
* its weight: an int8 constant (the codes the weight quantizer rounds to: GPTQ/AdaRound
  rounding included) -> ``dequantize_per_channel`` (axis 0, zero-point 0);
* the float bias, and an explicit ``input_scale`` multiply (SmoothQuant on a GELU output)
  before the input's quantize;

which is the graph ``convert_pt2e`` produces for ``X86InductorQuantizer``. ``torch.compile``
with ``torch._inductor.config.freezing = True`` matches these patterns and runs the layers
in oneDNN's ``qlinear_pointwise`` / ``qconv_pointwise`` int8 kernels; everything else
(LayerNorm, GELU, softmax, the attention matmuls, residual adds) stays float.

The file is an ``ExportedProgram`` saved by ``torch.export.save``: it loads with
``torch.export.load`` alone (no evolq), after ``import torch.ao.quantization.fx._decomposed``
registers the quantize ops. An AOTInductor package would compile the kernels ahead of time
for one CPU; the exported program keeps that choice to the machine that runs it, where
inductor sees the CPU's own instructions (VNNI, AMX).
"""
from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError
from ..qnn.layer_bits import is_float_layer
from ..qnn.layers import QAct, QConv2d, QLinear, QNorm
from ..qnn.qkr import qkr_export_refusal
from ..qnn.qmodel import QModel
from ..quant import DynamicBlockQuantizer, Quantizer, UniformQuantizer
from ..quant.range import quant_codes
from .files import check_path, example_input, write_file

__all__ = ["export_pt2", "load_pt2", "float_program", "lower_deploy", "deploy_module", "float_module"]


def _qd():
    import torch.ao.quantization.fx._decomposed

    return torch.ops.quantized_decomposed


class _ActQ(nn.Module):
    """quantize_per_tensor -> dequantize_per_tensor with fixed uint8 qparams."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, input_scale=None):
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.detach().float().clone())
        else:
            self.input_scale = None

    def forward(self, x):
        if self.input_scale is not None:
            x = x * self.input_scale
        qd = _qd()
        x = qd.quantize_per_tensor.default(x, self.scale, self.zero_point, self.qmin, self.qmax, torch.uint8)
        return qd.dequantize_per_tensor.default(x, self.scale, self.zero_point, self.qmin, self.qmax, torch.uint8)


class _QWeight(nn.Module):
    """An int8 weight constant and its per-output-channel scales (zero-point 0)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", torch.zeros(scale.numel(), dtype=torch.int64))

    def forward(self):
        return _qd().dequantize_per_channel.default(self.qweight, self.scale, self.zero_point, 0, -128, 127,
                                                    torch.int8)


class DeployLinear(nn.Module):
    def __init__(self, act: nn.Module, weight: _QWeight, bias):
        super().__init__()
        self.act, self.weight = act, weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(self.act(x), self.weight(), self.bias)


class DeployConv2d(nn.Module):
    def __init__(self, act: nn.Module, weight: _QWeight, bias, conv: nn.Conv2d, same: bool):
        super().__init__()
        self.act, self.weight, self.same = act, weight, same
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = tuple(conv.weight.shape[-2:])

    def forward(self, x):
        if self.same:  # zero padding commutes with an asymmetric quantize (0 is on the grid)
            from timm.layers import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(self.act(x), self.weight(), self.bias, self.stride,
                        0 if self.same else self.padding, self.dilation, self.groups)


# -- checks: what the x86 int8 path can express ---------------------------------------
def _name(names, m):
    return names.get(m, "?")


def _act(q, names, input_scale=None) -> nn.Module:
    if isinstance(q, nn.Identity) or (isinstance(q, Quantizer) and not q.enabled):
        if input_scale is not None:
            return _Scale(input_scale)
        return nn.Identity()
    if not isinstance(q, UniformQuantizer):
        raise ExportError(f"quantizer {_name(names, q)} ({type(q).__name__}) has no PT2E form: the pt2 format takes "
                          f"the deploy regime (QuantConfig.preset('deploy'))")
    _common(q, names)
    if q.per_channel and q.scale.numel() > 1:
        raise ExportError(f"quantizer {_name(names, q)} is per channel: integer kernels take a per-tensor input "
                          f"(use the deploy regime)")
    zp = int(round(q.zero_point.reshape(-1)[0].item()))
    qmin, qmax = q.qmin, q.qmax
    if q.signed:  # the same grid shifted into uint8, as the x86 kernels take it
        zp, qmin, qmax = zp + 128, qmin + 128, qmax + 128
    return _ActQ(float(q.scale.reshape(-1)[0].item()), zp, qmin, qmax, input_scale)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("input_scale", s.detach().float().clone())

    def forward(self, x):
        return x * self.input_scale


def _common(q, names):
    if not bool(q.calibrated):
        raise ExportError(f"the model was never calibrated: quantizer {_name(names, q)} has no scale yet")
    if q.pop_scale is not None:
        raise ExportError(f"quantizer {_name(names, q)} is in population mode; clear pop_scale before exporting")
    if q.bits > 8:
        raise ExportError(f"quantizer {_name(names, q)} has {q.bits} bits; the int8 kernels take at most 8")


def _weight(layer, names) -> _QWeight:
    wq = layer.weight_quant
    name = _name(names, wq)
    if not isinstance(wq, UniformQuantizer):
        raise ExportError(f"weight quantizer {name} ({type(wq).__name__}) has no PT2E form")
    _common(wq, names)
    if getattr(wq, "group", None) is not None:
        raise ExportError(f"group-wise weights export to ONNX only: weight quantizer {name} has one grid per "
                          f"{wq.group} input columns, and the pt2 program's int8 kernels take one per output channel")
    zp = wq.zero_point.float()
    if bool((zp != zp.round()).any()):
        raise ExportError(f"weight quantizer {name} has a half-step grid (StatsQ: no zero level); the int8 "
                          f"kernels take integer weights with zero-point 0")
    if not wq.signed or (not wq.symmetric and (wq.qmax - wq.qmin) > 127):
        raise ExportError(f"weight quantizer {name} is asymmetric ({wq.bits} bits, zero-points): the int8 kernels "
                          f"take signed weights with zero-point 0; quantize with the deploy regime "
                          f"(QuantConfig.preset('deploy'))")
    if wq.bias_correction:
        raise ExportError(f"weight quantizer {name} applies bias correction, which moves weights off the integer "
                          f"grid; the deploy regime has none")
    if isinstance(layer, QLinear) and layer._factor() is not None:
        raise ExportError(f"layer {_name(names, layer)} folds per-channel input factors (outlier-aware preset); "
                          f"the pt2 format takes the deploy regime")
    if wq.ch_axis % layer.weight.ndim != 0:
        raise ExportError(f"weight quantizer {name} is not per output channel")
    out_ch = layer.weight.shape[0]
    scale = wq.scale.float().reshape(-1)
    scale = scale.expand(out_ch) if scale.numel() == 1 else scale
    with torch.no_grad():
        w_q = wq(layer.weight.detach().float())  # the quantizer's own rounding (GPTQ / AdaRound state included)
        shape = [-1] + [1] * (w_q.ndim - 1)
        # q - z: an asymmetric grid below 8 bits (deploy_weights="asymmetric") fits s8 with zero-point 0
        codes = quant_codes(w_q, scale.reshape(shape), torch.zeros(()), -128, 127)
        if (codes * scale.reshape(shape) - w_q).abs().max().item() > 1e-5 * max(w_q.abs().max().item(), 1e-12):
            raise ExportError(f"layer {_name(names, layer)}: weights are not on the integer grid")  # pragma: no cover
    return _QWeight(codes, scale)


def _lower_layer(m, names, quantized: bool) -> nn.Module:
    quantized = quantized and not is_float_layer(m)  # layer_bits "float": the plain float layer
    if isinstance(m, QLinear):
        s = m.input_scale
        if not quantized:  # the float layer: the input scale folded back into the weight columns
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight.detach() * (s.reshape(1, -1) if s is not None else 1.0))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.detach())
            return lin.requires_grad_(False)
        return DeployLinear(_act(m.input_quant, names, s), _weight(m, names), m.bias)
    if isinstance(m, QConv2d):
        if m.conv.padding_mode != "zeros":
            raise ExportError(f"convolution {_name(names, m)} uses padding_mode={m.conv.padding_mode!r}")
        if not quantized:
            return copy.deepcopy(m.conv).requires_grad_(False)
        same = type(m).__name__ == "QConv2dSame"
        return DeployConv2d(_act(m.input_quant, names), _weight(m, names), m.bias, m.conv, same)
    if isinstance(m, QAct):
        return nn.Sequential(m.module, _act(m.output_quant, names)) if quantized else m.module
    if isinstance(m, QNorm):
        if quantized and not (isinstance(m.input_quant, Quantizer) and not m.input_quant.enabled):
            raise ExportError(f"{_name(names, m)} quantizes a LayerNorm input ({type(m.input_quant).__name__}): "
                              f"the x86 int8 path has no kernel for it; the pt2 format takes the deploy regime")
        return m.norm
    return m


def lower_deploy(qmodel: QModel, quantized: bool = True) -> nn.Module:
    """A copy of ``qmodel.model`` with every quantized layer replaced by its PT2E form
    (``quantized``) or by the plain float layer (the same model's FP32, for comparison).
    Raises ``ExportError`` naming the first quantizer the x86 int8 path cannot express."""
    if not isinstance(qmodel, QModel):
        raise ExportError(f"the pt2 export takes a QModel, got {type(qmodel).__name__}")
    refusal = qkr_export_refusal(qmodel.model, "pt2")
    if refusal:
        raise ExportError(refusal)
    names = {m: n for n, m in qmodel.model.named_modules()}
    if quantized:
        for n, q in qmodel.quantizers().items():
            if isinstance(q, DynamicBlockQuantizer):
                raise ExportError(f"{n} is a weight-only regime input (MatMulNBits' dynamic int8 blocks), which "
                                  f"PyTorch's x86 int8 path has no kernel for: export with --format onnx")
            if isinstance(q, Quantizer) and q.enabled and not isinstance(q, UniformQuantizer):
                raise ExportError(f"quantizer {n} ({type(q).__name__}) has no PT2E form: the pt2 format takes the "
                                  f"deploy regime (QuantConfig.preset('deploy'))")
    lowered = {}
    for name, m in qmodel.model.named_modules():
        if isinstance(m, (QLinear, QConv2d, QAct, QNorm)) and not any(name.startswith(p + ".") for p in lowered):
            lowered[name] = _lower_layer(m, names, quantized)
    orig = {n: qmodel.model.get_submodule(n) for n in lowered}
    memo = {id(m): new for n, m in orig.items() for new in [lowered[n]]}  # deepcopy maps originals to their lowering
    out = copy.deepcopy(qmodel.model, memo)
    out.eval()
    leftover = [n for n, m in out.named_modules() if isinstance(m, Quantizer)]
    if quantized and leftover:
        raise ExportError(f"quantizer {leftover[0]} sits outside a Linear/Conv/activation that the pt2 format "
                          f"lowers; it takes the deploy regime (QuantConfig.preset('deploy'))")
    return out


def deploy_module(qmodel: QModel) -> nn.Module:
    return lower_deploy(qmodel, True)


def float_module(qmodel: QModel) -> nn.Module:
    return lower_deploy(qmodel, False)


def _export(module: nn.Module, example: torch.Tensor, dynamic_batch: bool):
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None

    class Wrap(nn.Module):  # a stable argument name for dynamic_shapes
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    if dynamic_batch and example.shape[0] == 1:  # a batch of 1 would be specialised to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        with torch.no_grad():
            return torch.export.export(Wrap(module).eval(), (example,), dynamic_shapes=dyn, strict=False)
    except ExportError:
        raise
    except Exception as e:
        if dynamic_batch:
            return _export(module, example, False)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"torch.export could not trace the model: {msg}") from None


def float_program(qmodel: QModel, example: torch.Tensor | None = None):
    """The same model in float (quantizers off, input scales folded back) as an ExportedProgram."""
    return _export(float_module(qmodel), example_input(qmodel, example), True)


def export_pt2(qmodel: QModel, path, *, example: torch.Tensor | None = None, dynamic_batch: bool = True):
    """Write ``qmodel`` (deploy regime) as a ``torch.export`` program in PT2E form to ``path``
    (atomically: no partial file). The batch dimension is dynamic unless the model cannot
    trace that way. Returns the path; ``ExportError`` (one line) for a regime the x86 int8
    path cannot express, a model never calibrated, a bad path."""
    path = check_path(path)
    module = deploy_module(qmodel)
    ep = _export(module, example_input(qmodel, example), dynamic_batch)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return write_file(path, buf.getvalue())


def load_pt2(path):
    """``torch.export.load`` with the quantize ops registered; ExportError for a bad file."""
    from pathlib import Path

    _qd()
    if not Path(path).is_file():
        raise ExportError(f"{str(path)!r} is not a file")
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise ExportError(f"cannot load {str(path)!r} as a torch.export program: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
