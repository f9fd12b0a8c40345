"""timm VisionTransformer / DeiT adapter.

Quantized (FQ-ViT regime): every Linear and the patch-embedding Conv (weights and
inputs), q, k and v, the attention probabilities (uniform or log2), the GELU
output, and the input of every LayerNorm (PTF). Residual additions and the
LayerNorm/GELU/softmax arithmetic stay in float.

With ``QuantConfig(start="ofq", start_options={"qkr": True})`` every attention also holds
its QKR form (OFQ's query-key reparameterization, ``evolq.qnn.qkr``), which the ofq start
switches on: a merged, quantized ``W_q^T W_k`` per head instead of quantized q and k.

With ``QuantConfig(rotation=...)`` the float model is rotated before it is wrapped, at the points
``vit_rotation_plan`` names (``evolq.qnn.rotate``): the residual stream, the attention heads and,
with ``rotation_mlp``, every MLP hidden.

Blocks: ``stem`` (patch embedding, class token, position embedding), ``blocks.0``
... ``blocks.{n-1}`` (searched), ``head`` (final norm, pooling, classifier).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..qnn.builder import (
    operand_quant,
    probs_quant,
    qkr_mode,
    replace_module,
    wrap_conv,
    wrap_head,
    wrap_linear,
    wrap_mlp_act,
    wrap_norm,
)
from ..qnn.layers import QLinear, quantizers_of
from ..qnn.qkr import QKR
from ..qnn.qmodel import Block, QModel
from ..qnn.rotate import HeadRotation, MlpRotation, RotationPlan
from ..qnn.smooth import SmoothGroup
from ._registry import IMAGES, Adapter, register_adapter

__all__ = ["QAttention", "ViTAdapter", "quantize_vit_block_attention", "attention_scopes", "vit_rotation_plan"]


class QAttention(nn.Module):
    """Multi-head self-attention with quantized q, k, v and attention probabilities.

    Wraps a timm ``Attention`` (its qkv/proj are already ``QLinear``), keeping its
    parameters; only the attention arithmetic is re-expressed so the matmul inputs
    can be quantized. ``qkr``: the attention also holds its QKR form (``self.qkr``, a
    ``evolq.qnn.qkr.QKR``); once switched on, the logits are ``Q(Q(x) Q(W_qk,h)) Q(x)^T``
    and only v is taken from qkv (q, k and their quantizers are unused).
    """

    def __init__(self, attn: nn.Module, quant, qkr: bool | str = False):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        if qkr == "auto":  # the ofq default: where q and k can be merged
            qkr = plain_qk
        if qkr and not plain_qk:
            raise ConfigError("ofq qkr (query-key reparameterization) cannot merge q and k across this ViT's q/k "
                              "norms (qk_norm=True); use qkr=false")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv = wrap_linear(attn.qkv, quant)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity())
        self.proj = wrap_linear(attn.proj, quant)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.q_quant, self.k_quant, self.v_quant = (operand_quant(quant) for _ in range(3))
        self.probs_quant = probs_quant(quant)
        self.qkr = QKR(self.qkv, self.num_heads, self.head_dim, quant) if qkr else None
        # deploy regime: nothing quantized inside the attention, which then runs as one fused float kernel
        self.float_attention = all(isinstance(m, nn.Identity) for m in (self.q_quant, self.k_quant, self.v_quant,
                                                                         self.probs_quant))

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention does not take masks")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.qkr is not None and self.qkr.active:
            attn = self.probs_quant(self.qkr.logits(x, self.scale).softmax(dim=-1))
            x = self.attn_drop(attn) @ self.v_quant(v)
        elif self.float_attention:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.probs_quant(attn.softmax(dim=-1))
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def quantize_vit_block_attention(block: nn.Module, quant, qkr: bool | str = False) -> None:
    """Quantize a pre-norm transformer block with ``norm1/attn/norm2/mlp`` in place
    (``qkr``: its attention also holds the QKR form; ``"auto"``: where q and k can be merged)."""
    block.norm1 = wrap_norm(block.norm1, quant)
    block.attn = QAttention(block.attn, quant, qkr=qkr)
    block.norm2 = wrap_norm(block.norm2, quant)
    mlp = block.mlp
    mlp.fc1 = wrap_linear(mlp.fc1, quant)
    mlp.act, mlp.fc2 = wrap_mlp_act(mlp.act, mlp.fc2, quant)  # GELU output quantized once


def attention_scopes(name: str, block: nn.Module, quantizers: dict) -> dict[str, list[str]]:
    """Search scopes of a transformer block: the authors' code (qkv and proj weight
    scales) and the paper's text (every searchable scale of the block). With the QKR form
    (``block.attn.qkr``), W_qk's weight scales join both and u's scale the block scope;
    q's and k's activation scales, which that form does not use, leave it."""
    attn_w = [f"{name}.attn.qkv.weight_quant", f"{name}.attn.proj.weight_quant"]
    unused = set()
    if getattr(block.attn, "qkr", None) is not None:
        attn_w.append(f"{name}.attn.qkr.qk.weight_quant")
        unused = {f"{name}.attn.q_quant", f"{name}.attn.k_quant"}
    return {
        "attn-weights": attn_w,
        "block": [n for n, q in quantizers.items() if q.searchable and n not in unused],
    }


def vit_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Where SmoothQuant factors fold exactly in a pre-norm ViT: norm1 -> qkv, norm2 -> fc1,
    the v rows of qkv -> proj (attention mixes tokens, not channels), and the final norm ->
    the classifier (class-token or mean pooling keeps channels apart). fc2's input is the
    GELU output, which has no affine producer: an explicit multiply before its quantizer."""
    groups = []
    for blk in model.blocks:
        attn, dim = blk.attn, blk.attn.attn_dim
        groups.append(SmoothGroup(blk.norm1, [attn.qkv]))
        if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity) \
                and isinstance(attn.norm, nn.Identity):
            groups.append(SmoothGroup(attn.qkv, [attn.proj], rows=(2 * dim, 3 * dim)))
        groups.append(SmoothGroup(blk.norm2, [blk.mlp.fc1]))
        groups.append(SmoothGroup(None, [blk.mlp.fc2]))
    head = model.head
    if isinstance(head, QLinear):  # positive per-channel factors pass through token or mean pooling
        if not isinstance(model.fc_norm, nn.Identity):
            groups.append(SmoothGroup(model.fc_norm, [head]))
        elif getattr(model, "global_pool", "") in ("token", "avg") and not isinstance(model.norm, nn.Identity):
            groups.append(SmoothGroup(model.norm, [head]))
    return groups


def vit_rotation_plan(model: nn.Module) -> RotationPlan | str:
    """Where a timm ViT/DeiT rotates exactly (``evolq.qnn.rotate``), on the float model before it is
    wrapped, or why it cannot. Residual writers: the patch embedding, every attention proj and
    fc2 (LayerScales folded into them), the class/register/distillation tokens and the position
    embedding; readers: norm1 -> qkv, norm2 -> fc1, the final norm (or fc_norm) -> the classifier(s).
    Heads: v's rows of qkv -> proj's columns (not across an attention output norm). MLP hidden:
    the activation before fc2 (not across an MLP norm)."""
    d = model.embed_dim
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity) or \
            not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        return "a LayerNorm on the embeddings (norm_pre / patch_embed.norm) writes its affine into the residual stream"
    if getattr(model, "global_pool", "token") not in ("token", "avg", ""):
        return f"global_pool={model.global_pool!r} does not commute with a rotation (only token and mean pooling do)"
    heads = [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if h is not None]
    if not heads or not all(isinstance(h, nn.Linear) for h in heads):
        return "the classifier is not a Linear (the rotated features would be the output)"
    final = [n for n in (model.norm, model.fc_norm) if not isinstance(n, nn.Identity)]
    if len(final) > 1 or not all(isinstance(n, nn.LayerNorm) for n in final):
        return "the final norms are not one LayerNorm before the classifier"
    plan = RotationPlan(d, writers=[model.patch_embed.proj])
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            plan.embeddings.append(p)
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        parts = (getattr(blk, "norm1", None), getattr(blk, "norm2", None), getattr(attn, "qkv", None),
                 getattr(attn, "proj", None), getattr(mlp, "fc1", None), getattr(mlp, "fc2", None))
        if not (isinstance(parts[0], nn.LayerNorm) and isinstance(parts[1], nn.LayerNorm)
                and all(isinstance(m, nn.Linear) for m in parts[2:]) and hasattr(mlp, "act")):
            return f"blocks.{i} is not a pre-norm block (LayerNorm, qkv/proj attention, fc1/act/fc2 MLP)"
        for ls_name, writer in (("ls1", attn.proj), ("ls2", mlp.fc2)):
            ls = getattr(blk, ls_name, nn.Identity())
            if isinstance(getattr(ls, "gamma", None), nn.Parameter):
                plan.layer_scales.append((ls.gamma, writer))
            elif not isinstance(ls, nn.Identity):
                return f"blocks.{i}.{ls_name} is neither a LayerScale nor an Identity"
        plan.writers += [attn.proj, mlp.fc2]
        plan.readers += [(blk.norm1, [attn.qkv]), (blk.norm2, [mlp.fc1])]
        if isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            a = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
            plan.heads.append(HeadRotation(attn.qkv, attn.proj, attn.num_heads, attn.head_dim, 2 * a))
        if isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            plan.mlps.append(MlpRotation(mlp, "act", mlp.fc2))
    plan.readers.append((final[0] if final else None, heads))
    return plan


def _is_timm_vit(model) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception:  # pragma: no cover - timm missing
        return False
    return isinstance(model, VisionTransformer)


@register_adapter
class ViTAdapter(Adapter):
    name = "vit"
    description = "timm VisionTransformer / DeiT"
    input_spec = IMAGES
    supports_qkr = True

    def matches(self, model):
        return _is_timm_vit(model)

    def rotation_plan(self, model):
        return vit_rotation_plan(model)

    def wrap(self, model, quant, arch=""):
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError("attention-pool heads are not supported")
        model.eval()
        model.patch_embed.proj = wrap_conv(model.patch_embed.proj, quant)
        qkr = qkr_mode(quant)
        for blk in model.blocks:
            quantize_vit_block_attention(blk, quant, qkr=qkr)
        if not isinstance(model.norm, nn.Identity):
            model.norm = wrap_norm(model.norm, quant)
        if not isinstance(model.fc_norm, nn.Identity):
            model.fc_norm = wrap_norm(model.fc_norm, quant)
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", wrap_head(model.head, quant))

        def stem(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        def head(x):
            return model.forward_head(model.norm(x))

        blocks = [Block("stem", stem, quantizers_of(model.patch_embed, "patch_embed"))]
        for i, blk in enumerate(model.blocks):
            name = f"blocks.{i}"
            qs = quantizers_of(blk, name)
            blocks.append(Block(name, blk, qs, attention_scopes(name, blk, qs)))
        head_q = quantizers_of(model.norm, "norm")
        head_q.update(quantizers_of(model.fc_norm, "fc_norm"))
        head_q.update(quantizers_of(model.head, "head"))
        blocks.append(Block("head", head, head_q))
        qmodel = QModel(model, blocks, self.name, arch, quant)
        if quant.deploy:
            qmodel.smooth_groups = vit_smooth_groups(model)
        return qmodel
