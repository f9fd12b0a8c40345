"""BatchNorm folding: the one place where an eval-mode BatchNorm is merged into the
Linear/Conv2d next to it, so that the quantized weights are the ones a deployed
integer network holds (the usual PTQ practice; BRECQ, which the paper's CNN
experiment starts from, does the same).

* ``fold_bn(layer, bn)``: ``bn(layer(x))`` -> ``layer'(x)``, in place.
* ``fold_bn_before(bn, linear)``: ``linear(bn(x))`` -> ``linear'(x)``, in place
  (LeViT's classifier heads put the BatchNorm first).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["FoldedBNAct", "fold_bn", "fold_bn_before", "bn_factor"]


class FoldedBNAct(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` after its affine part was folded into
    the convolution before it: dropout (identity in eval) and the activation."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x):
        return self.act(self.drop(x))


def _check(bn, channels: int, where: str) -> None:
    if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
            and bn.running_var is not None):
        raise UnsupportedModelError(f"cannot fold {type(bn).__name__} into a {where} (needs an eval-mode "
                                    f"BatchNorm with running statistics)")
    if bn.num_features != channels:
        raise UnsupportedModelError(f"BatchNorm of {bn.num_features} channels next to a {where} of {channels}")


def bn_factor(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g / sqrt(var + eps), beta)`` of an eval-mode BatchNorm, in float32."""
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(std)
    return gamma / std, beta


def _set_bias(layer: nn.Module, new_bias: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight))
    else:
        layer.bias.copy_(new_bias)


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold eval-mode ``bn`` into the Linear/Conv2d ``layer`` before it, in place, and
    return the module that replaces ``bn``: ``nn.Identity`` for a plain BatchNorm,
    ``FoldedBNAct`` (drop + act) for timm's ``BatchNormAct2d``.

    ``w' = w * g / sqrt(var + eps)`` per output channel, ``b' = beta + (b - mean) * g / sqrt(var + eps)``.
    The weight keeps its ``Parameter`` object (values overwritten); a missing bias is added. A
    ``bn`` that is a ``FoldedBNAct`` or ``nn.Identity`` was folded before and is returned as it is.
    """
    if isinstance(bn, (FoldedBNAct, nn.Identity)):  # folded already (a float copy of a quantized model)
        return bn
    out_ch = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    _check(bn, out_ch, type(layer).__name__)
    factor, beta = bn_factor(bn)
    bias = layer.bias.float() if layer.bias is not None else torch.zeros_like(factor)
    new_bias = beta + (bias - bn.running_mean.float()) * factor
    layer.weight.mul_(factor.view(-1, *([1] * (layer.weight.ndim - 1))).to(layer.weight))
    _set_bias(layer, new_bias)
    if hasattr(bn, "act") or hasattr(bn, "drop"):  # timm BatchNormAct2d
        return FoldedBNAct(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return nn.Identity()


@torch.no_grad()
def fold_bn_before(bn: nn.Module, linear: nn.Linear) -> nn.Linear:
    """Fold eval-mode ``bn`` into the Linear after it, in place: ``linear(bn(x))`` ==
    ``linear'(x)`` with ``W' = W * s`` (per input column) and ``b' = b + W @ t``."""
    _check(bn, linear.in_features, "Linear (input side)")
    factor, beta = bn_factor(bn)
    shift = beta - bn.running_mean.float() * factor
    bias = linear.bias.float() if linear.bias is not None else torch.zeros(linear.out_features)
    new_bias = bias + linear.weight.float() @ shift
    linear.weight.mul_(factor.view(1, -1).to(linear.weight))
    _set_bias(linear, new_bias)
    return linear
