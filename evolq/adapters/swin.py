"""timm SwinTransformer adapter (v1: shifted-window attention, patch merging).

Quantized (the FQ-ViT regime of the ViT adapter): every Linear and the patch-embedding
Conv (weights and inputs), q, k and v, the attention probabilities (uniform or log2),
the GELU output, and the input of every LayerNorm (PTF), including the patch
embedding's and patch merging's LayerNorms. The relative position bias, the
shifted-window mask, residual additions and the LayerNorm/GELU/softmax arithmetic
stay in float.

Blocks: ``stem`` (patch embedding and its LayerNorm); per stage ``i``: its patch
merging ``layers.{i}.downsample`` (stages after the first; a block of its own,
searched only under the ``block`` scope, as it has no attention), then
``layers.{i}.blocks.{j}`` (searched: ``attn-weights`` = qkv and proj weight scales,
``block`` = every searchable scale); ``head`` (final LayerNorm, pooling, classifier).

The window partition and the mask broadcast take the batch size from the tensor, so
a population batch of P*B samples (population-major) runs through unchanged.

In the deploy regime the adapter names where SmoothQuant factors fold exactly
(``swin_smooth_groups``, set as ``QModel.smooth_groups``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.builder import (
    operand_quant,
    probs_quant,
    replace_module,
    wrap_conv,
    wrap_head,
    wrap_linear,
    wrap_mlp_act,
    wrap_norm,
)
from ..qnn.layers import QLinear, quantizers_of
from ..qnn.qmodel import Block, QModel
from ..qnn.smooth import SmoothGroup
from ._registry import IMAGES, Adapter, register_adapter
from .vit import attention_scopes

__all__ = ["QWindowAttention", "SwinAdapter", "swin_smooth_groups"]


class QWindowAttention(nn.Module):
    """Window attention with relative position bias and quantized q, k, v and
    attention probabilities.

    Wraps a timm ``WindowAttention``: its parameters are kept (the relative position
    bias table and the qkv/proj weights, now inside ``QLinear``s); only the attention
    arithmetic is re-expressed so the matmul inputs can be quantized.
    """

    def __init__(self, attn: nn.Module, quant):
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.qkv = wrap_linear(attn.qkv, quant)
        self.proj = wrap_linear(attn.proj, quant)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.q_quant, self.k_quant, self.v_quant = (operand_quant(quant) for _ in range(3))
        self.probs_quant = probs_quant(quant)

    def set_window_size(self, window_size):
        raise UnsupportedModelError("a quantized Swin model cannot change its window size; "
                                    "resize the float model before quantizing it")

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x, mask=None):
        b, n, _ = x.shape  # b = windows x batch (x population), batch-major
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias()
        if mask is not None:  # (windows, N, N), repeated for every sample of the batch
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.num_heads, n, n) + mask.view(1, nw, 1, n, n)).view(b, self.num_heads, n, n)
        attn = self.probs_quant(attn.softmax(dim=-1))
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


def _quantize_swin_block(block: nn.Module, quant) -> None:
    block.norm1 = wrap_norm(block.norm1, quant)
    block.attn = QWindowAttention(block.attn, quant)
    block.norm2 = wrap_norm(block.norm2, quant)
    mlp = block.mlp
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModelError("Swin MLPs with an inner norm are not supported")
    mlp.fc1 = wrap_linear(mlp.fc1, quant)
    mlp.act, mlp.fc2 = wrap_mlp_act(mlp.act, mlp.fc2, quant)  # GELU output quantized once


def _affine_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and m.weight is not None


def swin_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Where SmoothQuant factors fold exactly in a (wrapped) timm Swin v1, in module order.

    Per stage: its patch merging's LayerNorm -> ``reduction`` (the norm reads the 2x2
    neighbourhood already concatenated into 4C channels; zero padding of odd sizes happens
    before the norm). Per block: norm1 -> qkv (the cyclic shift, the window partition and
    the zero padding to whole windows only move or add tokens: a padded token is 0 whatever
    the factors, and qkv maps it to its bias either way); the v rows of qkv -> proj (window
    attention mixes tokens, not channels: the relative position bias and the shift mask are
    added to the q.k logits only, Swin v1 has no q/k norm, and ``(attn @ v)`` comes back in
    proj's input order, head-major as the v rows); norm2 -> fc1; fc2's input is the GELU
    output, which has no affine producer: an explicit multiply before its quantizer. Head:
    the final LayerNorm -> ``head.fc`` when the pooling keeps channels apart and is
    positively homogeneous per channel (avg, max, avgmax or none: ``max(x / f) =
    max(x) / f`` for f > 0); catavgmax (2C features) gets no group.
    """
    from timm.models.swin_transformer import PatchMerging

    groups = []
    for stage in model.layers:
        ds = stage.downsample
        if isinstance(ds, PatchMerging) and isinstance(ds.reduction, QLinear) and _affine_norm(ds.norm):
            groups.append(SmoothGroup(ds.norm, [ds.reduction]))
        for blk in stage.blocks:
            attn = blk.attn
            if _affine_norm(blk.norm1):
                groups.append(SmoothGroup(blk.norm1, [attn.qkv]))
            dim = attn.proj.in_features
            if attn.qkv.out_features == 3 * dim:
                groups.append(SmoothGroup(attn.qkv, [attn.proj], rows=(2 * dim, 3 * dim)))
            if _affine_norm(blk.norm2):
                groups.append(SmoothGroup(blk.norm2, [blk.mlp.fc1]))
            groups.append(SmoothGroup(None, [blk.mlp.fc2]))
    fc, pool = getattr(model.head, "fc", None), getattr(model.head, "global_pool", None)
    if isinstance(fc, QLinear) and _affine_norm(model.norm) and fc.in_features == model.norm.weight.numel() \
            and not getattr(pool, "pool_type", "").lower().endswith("catavgmax"):
        groups.append(SmoothGroup(model.norm, [fc]))
    return groups


def _is_timm_swin(model) -> bool:
    try:
        from timm.models.swin_transformer import SwinTransformer
    except Exception:  # pragma: no cover - timm missing
        return False
    return isinstance(model, SwinTransformer)


@register_adapter
class SwinAdapter(Adapter):
    name = "swin"
    description = "timm Swin Transformer v1"
    input_spec = IMAGES

    def matches(self, model):
        return _is_timm_swin(model)

    def wrap(self, model, quant, arch=""):
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

        model.eval()
        pe = model.patch_embed
        if not isinstance(pe.proj, nn.Conv2d) or not isinstance(pe.norm, (nn.LayerNorm, nn.Identity)):
            raise UnsupportedModelError("this Swin variant's patch embedding is not supported")
        for stage in model.layers:
            if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
                raise UnsupportedModelError("this Swin variant's downsampling is not supported")
            if not all(isinstance(b, SwinTransformerBlock) for b in stage.blocks):
                raise UnsupportedModelError("this Swin variant's blocks are not supported")

        pe.proj = wrap_conv(pe.proj, quant)
        if not isinstance(pe.norm, nn.Identity):
            pe.norm = wrap_norm(pe.norm, quant)
        for stage in model.layers:
            if isinstance(stage.downsample, PatchMerging):
                stage.downsample.norm = wrap_norm(stage.downsample.norm, quant)
                stage.downsample.reduction = wrap_linear(stage.downsample.reduction, quant)
            for blk in stage.blocks:
                _quantize_swin_block(blk, quant)
        if not isinstance(model.norm, nn.Identity):
            model.norm = wrap_norm(model.norm, quant)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            replace_module(model, "head.fc", wrap_head(model.head.fc, quant))

        def head(x):
            return model.forward_head(model.norm(x))

        blocks = [Block("stem", model.patch_embed, quantizers_of(model.patch_embed, "patch_embed"))]
        for i, stage in enumerate(model.layers):
            if isinstance(stage.downsample, PatchMerging):
                name = f"layers.{i}.downsample"
                qs = quantizers_of(stage.downsample, name)
                blocks.append(Block(name, stage.downsample, qs,
                                    {"attn-weights": [], "block": [n for n, q in qs.items() if q.searchable]}))
            for j, blk in enumerate(stage.blocks):
                name = f"layers.{i}.blocks.{j}"
                qs = quantizers_of(blk, name)
                blocks.append(Block(name, blk, qs, attention_scopes(name, blk, qs)))
        head_q = quantizers_of(model.norm, "norm")
        head_q.update(quantizers_of(model.head, "head"))
        blocks.append(Block("head", head, head_q))
        qmodel = QModel(model, blocks, self.name, arch, quant)
        if quant.deploy:
            qmodel.smooth_groups = swin_smooth_groups(model)
        return qmodel
