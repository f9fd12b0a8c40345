"""Helpers shared by adapters: build quantizers from a ``QuantConfig`` and wrap layers."""
from __future__ import annotations

from torch import nn

from ..layers import QAct, QConv2d, QLinear, QNorm
from ..quant import Log2Quantizer, PTFQuantizer, UniformQuantizer

__all__ = ["weight_quant", "act_quant", "probs_quant", "norm_input_quant", "wrap_linear",
           "wrap_conv", "wrap_act", "wrap_norm", "replace_module"]


def weight_quant(cfg, ch_axis=0) -> UniformQuantizer:
    return UniformQuantizer(cfg.w_bits, signed=False, symmetric=False, per_channel=True, ch_axis=ch_axis,
                            observer=cfg.weight_observer, kind="weight", bias_correction=cfg.bias_correction)


def act_quant(cfg, signed=False) -> UniformQuantizer:
    return UniformQuantizer(cfg.a_bits, signed=signed, symmetric=False, per_channel=False,
                            observer=cfg.act_observer, kind="activation")


def probs_quant(cfg):
    if cfg.attn_probs == "log2":
        return Log2Quantizer(cfg.probs_bits)
    return UniformQuantizer(cfg.probs_bits, signed=False, symmetric=False, observer="minmax", kind="activation")


def norm_input_quant(cfg):
    return PTFQuantizer(cfg.a_bits) if cfg.ptf else act_quant(cfg)


def wrap_linear(linear: nn.Linear, cfg, quant_input=True) -> QLinear:
    return QLinear(linear, weight_quant(cfg), act_quant(cfg) if quant_input else None)


def wrap_conv(conv: nn.Conv2d, cfg, quant_input=True) -> QConv2d:
    return QConv2d(conv, weight_quant(cfg), act_quant(cfg) if quant_input else None)


def wrap_act(module: nn.Module, cfg) -> QAct:
    return QAct(module, act_quant(cfg))


def wrap_norm(norm: nn.Module, cfg) -> QNorm:
    return QNorm(norm, norm_input_quant(cfg))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
