"""torchvision VisionTransformer adapter (``vit_b_16``, ``vit_b_32``, ``vit_l_*``, ``vit_h_14``;
load by name as ``torchvision:vit_b_16``).

Quantized (the FQ-ViT regime of the timm ViT adapter): the patch-embedding Conv, the
packed q/k/v input projection of every ``nn.MultiheadAttention`` (its
``in_proj_weight``/``in_proj_bias`` parameters, now inside a ``QLinear`` named
``in_proj``), ``out_proj``, the MLP Linears and the classifier (weights and inputs);
q, k and v; the attention probabilities (uniform or log2); the GELU output; the input
of every LayerNorm (PTF). Residual additions, the position embedding and the
LayerNorm/GELU/softmax arithmetic stay in float.

Blocks: ``stem`` (patch embedding, class token, position embedding),
``encoder.layers.encoder_layer_{i}`` (searched: ``attn-weights`` = in_proj and
out_proj weight scales, ``block`` = every searchable scale), ``head`` (final
LayerNorm, class token, classifier).

In the deploy regime the adapter names where SmoothQuant factors fold exactly
(``torchvision_vit_smooth_groups``, set as ``QModel.smooth_groups``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.builder import (
    operand_quant,
    probs_quant,
    wrap_act,
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

__all__ = ["QMultiheadAttention", "TorchvisionViTAdapter", "torchvision_vit_smooth_groups"]


class QMultiheadAttention(nn.Module):
    """Self-attention with quantized weights, q, k, v and attention probabilities, in
    place of a batch-first ``nn.MultiheadAttention``.

    Keeps the module's parameters: the packed ``in_proj_weight``/``in_proj_bias``
    become the weight/bias of the ``QLinear`` ``in_proj``; ``out_proj`` is wrapped.
    Takes and returns what ``nn.MultiheadAttention`` does (``(output, weights)``)
    for self-attention (query, key and value the same tensor) without masks.
    """

    def __init__(self, mha: nn.MultiheadAttention, quant):
        super().__init__()
        if not mha.batch_first:
            raise UnsupportedModelError("only batch-first nn.MultiheadAttention is supported")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModelError("nn.MultiheadAttention with kdim/vdim, bias_k/bias_v or "
                                        "add_zero_attn is not supported")
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.dropout = mha.dropout
        packed = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device="meta")
        packed.weight = mha.in_proj_weight  # the original parameters, not copies
        packed.bias = mha.in_proj_bias
        self.in_proj = wrap_linear(packed, quant)
        self.out_proj = wrap_linear(mha.out_proj, quant)
        self.q_quant, self.k_quant, self.v_quant = (operand_quant(quant) for _ in range(3))
        self.probs_quant = probs_quant(quant)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("quantized attention supports self-attention only")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention does not take masks")
        b, n, _ = query.shape
        qkv = self.in_proj(query).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        attn = self.probs_quant(attn.softmax(dim=-1))
        dropped = nn.functional.dropout(attn, self.dropout, self.training) if self.dropout > 0 else attn
        out = self.out_proj((dropped @ v).transpose(1, 2).reshape(b, n, self.embed_dim))
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


def _quantize_encoder_block(block: nn.Module, quant) -> None:
    block.ln_1 = wrap_norm(block.ln_1, quant)
    block.self_attention = QMultiheadAttention(block.self_attention, quant)
    block.ln_2 = wrap_norm(block.ln_2, quant)
    mlp = block.mlp  # Sequential: Linear, GELU, Dropout, Linear, Dropout
    kinds = [type(m) for m in mlp]
    if len(mlp) != 5 or not (isinstance(mlp[0], nn.Linear) and isinstance(mlp[3], nn.Linear)):
        raise UnsupportedModelError(f"unexpected torchvision ViT MLP layout: {[k.__name__ for k in kinds]}")
    mlp[0] = wrap_linear(mlp[0], quant)
    mlp[1], mlp[3] = wrap_mlp_act(mlp[1], mlp[3], quant)  # GELU output quantized once


def _affine_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and m.weight is not None


def torchvision_vit_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Where SmoothQuant factors fold exactly in a (wrapped) torchvision ViT, in module order.

    Per encoder block: ln_1 -> the packed q/k/v input projection (``self_attention.in_proj``,
    whose weight is ``nn.MultiheadAttention``'s ``in_proj_weight``: q, k and v all read ln_1's
    channels, so one group holds the whole packed matrix); the v rows ``[2E, 3E)`` of
    in_proj -> ``out_proj`` (attention mixes tokens, not channels; torchvision has no q/k
    norm, no bias_k/bias_v and no zero attention, which the adapter refuses, and
    ``(attn @ v)`` comes back in out_proj's input order, head-major as the v rows); ln_2 ->
    ``mlp[0]``; ``mlp[3]``'s input is the GELU output, which has no affine producer: an
    explicit multiply before its quantizer. Head: the encoder's final LayerNorm ->
    ``heads[0]`` (the classifier, or ``pre_logits`` with a representation layer): the
    class token is taken after the norm, a row selection that keeps channels apart.

    Skipped: with a representation layer, the classifier after ``Tanh`` has no group. Tanh
    is not positively homogeneous (dividing pre_logits' rows by f does not divide Tanh's
    output by f), and an explicit multiply would land after the quantizer: in this adapter
    that input is quantized by the Tanh's own output quantizer (``QAct``), not by the
    classifier's input quantizer, which ``input_scale`` precedes.
    """
    groups = []
    for blk in model.encoder.layers:
        attn = blk.self_attention
        e = attn.embed_dim
        if _affine_norm(blk.ln_1):
            groups.append(SmoothGroup(blk.ln_1, [attn.in_proj]))
        groups.append(SmoothGroup(attn.in_proj, [attn.out_proj], rows=(2 * e, 3 * e)))
        if _affine_norm(blk.ln_2):
            groups.append(SmoothGroup(blk.ln_2, [blk.mlp[0]]))
        groups.append(SmoothGroup(None, [blk.mlp[3]]))
    first = model.heads[0]
    if isinstance(first, QLinear) and _affine_norm(model.encoder.ln):
        groups.append(SmoothGroup(model.encoder.ln, [first]))
    return groups


def _is_torchvision_vit(model) -> bool:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except Exception:  # pragma: no cover - torchvision missing
        return False
    return isinstance(model, VisionTransformer)


@register_adapter
class TorchvisionViTAdapter(Adapter):
    name = "torchvision_vit"
    description = "torchvision VisionTransformer, e.g. torchvision:vit_b_16"
    input_spec = IMAGES

    def matches(self, model):
        return _is_torchvision_vit(model)

    def wrap(self, model, quant, arch=""):
        from torchvision.models.vision_transformer import EncoderBlock

        model.eval()
        if not isinstance(model.conv_proj, nn.Conv2d):
            raise UnsupportedModelError("torchvision ViTs with a convolutional stem are not supported")
        if not all(isinstance(b, EncoderBlock) for b in model.encoder.layers):
            raise UnsupportedModelError("this torchvision ViT variant's blocks are not supported")
        if not all(isinstance(m, (nn.Linear, nn.Tanh)) for m in model.heads):
            raise UnsupportedModelError("this torchvision ViT variant's head is not supported")

        model.conv_proj = wrap_conv(model.conv_proj, quant)
        for blk in model.encoder.layers:
            _quantize_encoder_block(blk, quant)
        model.encoder.ln = wrap_norm(model.encoder.ln, quant)
        after_act = False
        for name, m in list(model.heads.named_children()):
            if isinstance(m, nn.Linear):
                setattr(model.heads, name, wrap_head(m, quant, quant_input=not after_act))
                after_act = False
            else:  # Tanh of the representation layer
                setattr(model.heads, name, wrap_act(m, quant))
                after_act = True

        def stem(x):
            x = model._process_input(x)
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return model.encoder.dropout(x + model.encoder.pos_embedding)

        def head(x):
            return model.heads(model.encoder.ln(x)[:, 0])

        blocks = [Block("stem", stem, quantizers_of(model.conv_proj, "conv_proj"))]
        for name, blk in model.encoder.layers.named_children():
            full = f"encoder.layers.{name}"
            qs = quantizers_of(blk, full)
            blocks.append(Block(full, blk, qs, {
                "attn-weights": [f"{full}.self_attention.in_proj.weight_quant",
                                 f"{full}.self_attention.out_proj.weight_quant"],
                "block": [n for n, q in qs.items() if q.searchable],
            }))
        head_q = quantizers_of(model.encoder.ln, "encoder.ln")
        head_q.update(quantizers_of(model.heads, "heads"))
        blocks.append(Block("head", head, head_q))
        qmodel = QModel(model, blocks, self.name, arch, quant)
        if quant.deploy:
            qmodel.smooth_groups = torchvision_vit_smooth_groups(model)
        return qmodel
