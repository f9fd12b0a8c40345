"""Helpers shared by the convolutional adapters (EfficientNet, ResNet).

* ``fold_bn`` (from ``evolq.qnn.fold``): BatchNorm folded into the conv before it.
* ``wrap_conv_exact`` / ``wrap_linear_exact``: wrap a layer only if its forward is the
  plain ``F.conv2d`` / ``F.linear`` the wrappers re-implement (plus timm's dynamic
  "same" padding, see ``evolq.qnn.layers.QConv2dSame``); anything else is refused rather than run
  wrongly.
* ``conv_scopes``: the search scopes of a CNN block.
* ``check_all_wrapped``: an adapter's self-check that no float Conv2d/Linear is left.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.builder import act_quant, conv_input_quant, linear_input_quant, weight_only_regime, weight_quant
from ..qnn.fold import FoldedBNAct, fold_bn
from ..qnn.layers import QConv2d, QConv2dSame, QLinear, conv_forward

__all__ = ["FoldedBNAct", "fold_bn", "QConv2dSame", "conv_forward", "wrap_conv_exact", "wrap_linear_exact",
           "conv_scopes", "check_all_wrapped", "wrap_all"]


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


def wrap_conv_exact(conv: nn.Conv2d, quant, name: str = "", quant_input: bool = True) -> QConv2d:
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
    return cls(conv, weight_quant(quant), conv_input_quant(quant, quant_input))


def wrap_linear_exact(linear: nn.Linear, quant, name: str = "", quant_input: bool = True) -> QLinear:
    if type(linear).forward is not nn.Linear.forward:
        raise UnsupportedModelError(f"linear layer {name} of type {type(linear).__name__} has a custom forward")
    if weight_only_regime(quant):
        return QLinear(linear, weight_quant(quant), linear_input_quant(quant))
    return QLinear(linear, weight_quant(quant), act_quant(quant) if quant_input else None)


def wrap_all(root: nn.Module, quant) -> None:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` inside ``root`` by its quantized
    wrapper (quantized weights per output channel, quantized input)."""
    from ..qnn.builder import replace_module

    targets = [(n, m) for n, m in root.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
    for name, m in targets:
        if isinstance(m, nn.Conv2d):
            new = wrap_conv_exact(m, quant, name)
        else:
            new = wrap_linear_exact(m, quant, name)
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
