"""torchvision ResNet adapter (``torchvision.models.ResNet``: resnet18/34/50/101/152,
wide_resnet, resnext).

Quantized: every Conv2d (stem, the block convolutions, the downsampling shortcut
convolutions) and the ``fc`` classifier, weights per output channel and inputs per
tensor. BatchNorm is folded into the convolution before it before quantizing (the
deployed form). ReLU, max/avg pooling and the residual additions stay in float.

Blocks: ``stem`` (conv1 + folded bn1, ReLU, max-pool), one block per residual block
(``layer{1..4}.{i}``, a BasicBlock or Bottleneck), and ``head`` (pooling, ``fc``).
A single conv layer cannot be a block: a ``Block`` maps one tensor to the next (its
input is cached while it is searched), and inside a residual block the shortcut
carries the block input past the convolutions; the residual block is the smallest
unit that composes. Its search vector stacks the per-channel weight scales of its
2-3 convolutions (plus the shortcut conv in a downsampling block), the CNN analogue
of the paper's one-conv-layer scale vector (Sec. 5.6, Fig. 3a).

Scopes (every block, stem and head included): ``"attn-weights"`` (the default,
named after the ViT case) is, for CNN blocks, the weight scales of the block's
conv/linear layers; ``"block"`` adds their input (activation) scales.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.layers import quantizers_of
from ..qnn.qmodel import Block, QModel
from ._cnn import check_all_wrapped, conv_scopes, fold_bn, wrap_all
from ._registry import IMAGES, Adapter, register_adapter

__all__ = ["ResNetAdapter"]

_PAIRS = {"BasicBlock": [("conv1", "bn1"), ("conv2", "bn2")],
          "Bottleneck": [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]}


def _is_torchvision_resnet(model) -> bool:
    try:
        from torchvision.models import ResNet
    except Exception:  # pragma: no cover - torchvision missing
        return False
    return isinstance(model, ResNet)


def _fold_block(blk: nn.Module, name: str) -> None:
    for conv_name, bn_name in _PAIRS[type(blk).__name__]:
        setattr(blk, bn_name, fold_bn(getattr(blk, conv_name), getattr(blk, bn_name)))
    ds = blk.downsample
    if ds is not None:
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)):
            raise UnsupportedModelError(f"ResNet block {name} has an unsupported shortcut {type(ds).__name__}")
        ds[1] = fold_bn(ds[0], ds[1])


@register_adapter
class ResNetAdapter(Adapter):
    name = "resnet"
    description = "torchvision ResNet / ResNeXt / Wide ResNet"
    input_spec = IMAGES

    def matches(self, model):
        return _is_torchvision_resnet(model)

    def wrap(self, model, quant, arch=""):
        model.eval()
        layers = [(f"layer{li}.{bi}", blk) for li in range(1, 5) for bi, blk in enumerate(getattr(model, f"layer{li}"))]
        for name, blk in layers:
            if type(blk).__name__ not in _PAIRS:
                raise UnsupportedModelError(f"ResNet block {name} of type {type(blk).__name__} is not supported")
        model.bn1 = fold_bn(model.conv1, model.bn1)
        for name, blk in layers:
            _fold_block(blk, name)
        wrap_all(model, quant)
        check_all_wrapped(model)

        def stem(x):
            return model.maxpool(model.relu(model.bn1(model.conv1(x))))

        def head(x):
            return model.fc(torch.flatten(model.avgpool(x), 1))

        stem_q = quantizers_of(model.conv1, "conv1")
        blocks = [Block("stem", stem, stem_q, conv_scopes(stem_q))]
        for name, blk in layers:
            qs = quantizers_of(blk, name)
            blocks.append(Block(name, blk, qs, conv_scopes(qs)))
        head_q = quantizers_of(model.fc, "fc")
        blocks.append(Block("head", head, head_q, conv_scopes(head_q)))
        return QModel(model, blocks, self.name, arch, quant)
