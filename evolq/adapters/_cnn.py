"""Helpers shared by the convolutional adapters (EfficientNet, ResNet).

* ``fold_bn``: fold an eval-mode BatchNorm into the convolution before it, so the
  quantized weights are the ones a deployed integer network would hold (the usual
  PTQ practice, e.g. BRECQ, which the paper's CNN experiment starts from).
* ``wrap_conv_exact`` / ``wrap_linear_exact``: wrap a layer only if its forward is the
  plain ``F.conv2d`` / ``F.linear`` the wrappers re-implement (plus timm's dynamic
  "same" padding, see ``QConv2dSame``); anything else is refused rather than run
  wrongly.
* ``conv_scopes``: the search scopes of a CNN block.
* ``check_all_wrapped``: an adapter's self-check that no float Conv2d/Linear is left.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..layers import QConv2d, QLinear
from ._builder import act_quant, weight_quant

__all__ = ["FoldedBNAct", "fold_bn", "QConv2dSame", "conv_forward", "wrap_conv_exact", "wrap_linear_exact",
           "conv_scopes", "check_all_wrapped", "wrap_all"]


class FoldedBNAct(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` after its affine part was folded into
    the convolution before it: dropout (identity in eval) and the activation."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x):
        return self.act(self.drop(x))


def _is_batchnorm(bn) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """Fold eval-mode ``bn`` into ``conv`` in place and return the module that replaces
    ``bn``: ``nn.Identity`` for a plain BatchNorm2d, ``FoldedBNAct`` (drop + act) for
    timm's ``BatchNormAct2d``.

    ``w' = w * g / sqrt(var + eps)`` per output channel, ``b' = beta + (b - mean) * g / sqrt(var + eps)``.
    The weight keeps its ``Parameter`` object (values overwritten); a missing bias is added.
    """
    if not _is_batchnorm(bn):
        raise UnsupportedModelError(f"cannot fold {type(bn).__name__} into a convolution (needs an eval-mode "
                                    f"BatchNorm2d with running statistics)")
    if bn.num_features != conv.out_channels:
        raise UnsupportedModelError(f"BatchNorm of {bn.num_features} channels after a conv of {conv.out_channels}")
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(std)
    new_bias = beta + (bias - bn.running_mean.float()) * factor
    conv.weight.mul_(factor.view(-1, *([1] * (conv.weight.ndim - 1))).to(conv.weight))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight))
    else:
        conv.bias.copy_(new_bias)
    if hasattr(bn, "act") or hasattr(bn, "drop"):  # timm BatchNormAct2d
        return FoldedBNAct(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return nn.Identity()


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """``F.conv2d`` with ``conv``'s geometry and weights ``w``: one weight (4-D), or a
    population of P weights (5-D) run as one grouped convolution on a population-major
    batch of P*B samples (the same arithmetic as ``QConv2d``)."""
    if w.ndim == 4:
        return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    p = w.shape[0]
    b = x.shape[0] // p
    xs = x.reshape(p, b, *x.shape[1:]).transpose(0, 1).reshape(b, p * x.shape[1], *x.shape[2:])
    bias = bias.repeat(p) if bias is not None else None
    out = F.conv2d(xs, w.reshape(-1, *w.shape[2:]), bias, conv.stride, conv.padding, conv.dilation, conv.groups * p)
    out = out.reshape(b, p, -1, *out.shape[2:]).transpose(0, 1)
    return out.reshape(p * b, *out.shape[2:])


class QConv2dSame(QConv2d):
    """``QConv2d`` for timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from
    the input size at run time). The input is quantized first, then zero-padded, as an
    integer kernel would pad its quantized input (zero is always on the grid)."""

    def forward(self, x):
        from timm.layers import pad_same

        c = self.conv
        x = self.input_quant(x)
        x = pad_same(x, c.weight.shape[-2:], c.stride, c.dilation)
        return conv_forward(c, x, self.weight_quant(self.weight), self.bias)


def _conv_kind(conv: nn.Module) -> str:
    """``"plain"`` (forward is nn.Conv2d's), ``"same"`` (timm Conv2dSame) or ``""`` (other)."""
    try:
        from timm.layers import Conv2dSame
    except Exception:  # pragma: no cover - timm missing
        Conv2dSame = None
    if Conv2dSame is not None and type(conv) is Conv2dSame:
        return "same"
    if isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward:
        return "plain"
    return ""


def wrap_conv_exact(conv: nn.Conv2d, cfg, name: str = "", quant_input: bool = True) -> QConv2d:
    """Wrap ``conv`` (weights per output channel + input, per tensor) if its forward is
    reproduced exactly; refuse it otherwise (e.g. weight-standardised convs)."""
    kind = _conv_kind(conv)
    if not kind:
        raise UnsupportedModelError(f"convolution {name or ''} of type {type(conv).__name__} has a custom forward "
                                    f"that the quantized wrapper cannot reproduce")
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"convolution {name} uses padding_mode={conv.padding_mode!r}; only zero "
                                    f"padding is supported")
    cls = QConv2dSame if kind == "same" else QConv2d
    return cls(conv, weight_quant(cfg), act_quant(cfg) if quant_input else None)


def wrap_linear_exact(linear: nn.Linear, cfg, name: str = "", quant_input: bool = True) -> QLinear:
    if type(linear).forward is not nn.Linear.forward:
        raise UnsupportedModelError(f"linear layer {name} of type {type(linear).__name__} has a custom forward")
    return QLinear(linear, weight_quant(cfg), act_quant(cfg) if quant_input else None)


def wrap_all(root: nn.Module, cfg) -> None:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` inside ``root`` by its quantized
    wrapper (quantized weights per output channel, quantized input)."""
    from ._builder import replace_module

    targets = [(n, m) for n, m in root.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
    for name, m in targets:
        if isinstance(m, nn.Conv2d):
            new = wrap_conv_exact(m, cfg, name)
        else:
            new = wrap_linear_exact(m, cfg, name)
        replace_module(root, name, new)


def check_all_wrapped(model: nn.Module) -> None:
    """Refuse a model where a Conv2d/Linear escaped wrapping or a BatchNorm escaped folding."""
    wrappers = {id(m.conv) for m in model.modules() if isinstance(m, QConv2d)}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in wrappers:
            raise UnsupportedModelError(f"convolution {name} was not quantized (unknown layout)")
        if isinstance(m, nn.Linear):  # QLinear keeps the parameters, not the nn.Linear
            raise UnsupportedModelError(f"linear layer {name} was not quantized (unknown layout)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(f"BatchNorm {name} was not folded (unknown block layout)")


def conv_scopes(quantizers: dict) -> dict[str, list[str]]:
    """Search scopes of a CNN block.

    ``"attn-weights"`` (the default scope, named after the ViT case) is, for a CNN
    block, the weight scales of every conv/linear layer in the block: the stacked
    per-output-channel weight scales that the paper's CNN experiment searches.
    ``"block"`` adds the activation (input) scales.
    """
    weights = [n for n, q in quantizers.items() if q.searchable and getattr(q, "kind", "") == "weight"]
    return {"attn-weights": weights, "block": [n for n, q in quantizers.items() if q.searchable]}
