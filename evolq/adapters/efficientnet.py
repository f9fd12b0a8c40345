"""timm EfficientNet adapter (``timm.models.efficientnet.EfficientNet``: the
EfficientNet / EfficientNet-Lite / MobileNetV2 / MnasNet family, e.g.
``tf_efficientnet_lite0``).

Quantized: every Conv2d (stem, pointwise, depthwise, squeeze-excite, head) and the
classifier Linear, each with weights quantized per output channel and its input
quantized per tensor, so every tensor entering a multiply-accumulate is on an
integer grid. BatchNorm is folded into the convolution before it *before* the
weights are quantized (the deployed form; the float reference is the folded model,
equal to the original up to rounding). Residual additions, activations (ReLU6,
SiLU), the squeeze-excite gate and global pooling stay in float, as the residual
additions and non-linearities do in the ViT adapter. timm's TF "SAME" padded
convs (``Conv2dSame``) are quantized then padded (``QConv2dSame``).

Blocks: ``stem`` (conv_stem + folded bn1), one block per MBConv / depthwise-separable
block of ``model.blocks`` (``blocks.{stage}.{index}``), and ``head`` (conv_head,
folded bn2, pooling, classifier). A *conv layer* cannot be a block by itself: a
``Block`` maps one tensor to the next and the engine caches its input, but the
convolutions inside an inverted-residual block are bridged by its skip connection,
so the smallest unit that composes is the residual block. This is the "block" of the
paper's block-wise schedule; its search vector stacks the per-channel weight scales
of the block's convolutions (the paper's CNN experiment perturbs one conv layer's
weight scales, Fig. 3a; here one block holds 2-4 such layers).

Scopes (every block, stem and head included): ``"attn-weights"`` -- the default
scope, named after the ViT case -- means, for CNN blocks, the weight scales of all
conv/linear layers of the block; ``"block"`` adds their input (activation) scales.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.layers import quantizers_of
from ..qnn.qmodel import Block, QModel
from ._cnn import check_all_wrapped, conv_scopes, fold_bn, wrap_all
from ._registry import IMAGES, Adapter, register_adapter

__all__ = ["EfficientNetAdapter", "FOLD_PAIRS"]

# (conv attribute, the BatchNorm right after it) per timm block type; blocks of
# other types (CondConv, MobileNetV4 UIR, attention) are refused.
FOLD_PAIRS = {
    "DepthwiseSeparableConv": [("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")],
    "InvertedResidual": [("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")],
    "EdgeResidual": [("conv_exp", "bn1"), ("conv_pwl", "bn2")],
    "ConvBnAct": [("conv", "bn1")],
}


def _fold_pairs(module: nn.Module, pairs) -> None:
    for conv_name, bn_name in pairs:
        conv = getattr(module, conv_name, None)
        if conv is None:  # optional part (e.g. no space-to-depth stem)
            continue
        bn = getattr(module, bn_name)
        setattr(module, bn_name, fold_bn(conv, bn))


def _is_timm_efficientnet(model) -> bool:
    try:
        from timm.models.efficientnet import EfficientNet
    except Exception:  # pragma: no cover - timm missing
        return False
    return isinstance(model, EfficientNet)


@register_adapter
class EfficientNetAdapter(Adapter):
    name = "efficientnet"
    description = "timm EfficientNet / EfficientNet-Lite / MobileNetV2 / MnasNet"
    input_spec = IMAGES

    def matches(self, model):
        return _is_timm_efficientnet(model)

    def wrap(self, model, quant, arch=""):
        model.eval()
        stages = list(model.blocks)
        for si, stage in enumerate(stages):
            for bi, blk in enumerate(stage):
                if type(blk).__name__ not in FOLD_PAIRS:
                    raise UnsupportedModelError(f"EfficientNet block blocks.{si}.{bi} of type "
                                                f"{type(blk).__name__} is not supported")
        if not isinstance(model.conv_head, nn.Conv2d):
            raise UnsupportedModelError("EfficientNet without a conv head is not supported")
        # fold every BatchNorm into its conv, then wrap every conv/linear
        _fold_pairs(model, [("conv_stem", "bn1"), ("conv_head", "bn2")])
        for stage in stages:
            for blk in stage:
                _fold_pairs(blk, FOLD_PAIRS[type(blk).__name__])
        wrap_all(model, quant)
        check_all_wrapped(model)

        def stem(x):
            return model.bn1(model.conv_stem(x))

        def head(x):
            return model.forward_head(model.bn2(model.conv_head(x)))

        stem_q = quantizers_of(model.conv_stem, "conv_stem")
        blocks = [Block("stem", stem, stem_q, conv_scopes(stem_q))]
        for si, stage in enumerate(stages):
            for bi, blk in enumerate(stage):
                name = f"blocks.{si}.{bi}"
                qs = quantizers_of(blk, name)
                blocks.append(Block(name, blk, qs, conv_scopes(qs)))
        head_q = quantizers_of(model.conv_head, "conv_head")
        head_q.update(quantizers_of(model.classifier, "classifier"))
        blocks.append(Block("head", head, head_q, conv_scopes(head_q)))
        return QModel(model, blocks, self.name, arch, quant)
