"""timm LeViT adapter (``levit_*`` and ``levit_conv_*``, distilled or not).

LeViT pairs every Linear/Conv with a BatchNorm (timm's ``LinearNorm``/``ConvNorm``:
Linear/Conv then BN; ``NormLinear`` in the heads: BN then Linear). The adapter
**folds each BatchNorm into its Linear/Conv** (eval statistics) and quantizes the
folded weight, as an integer deployment would run it; the folded layers replace
the originals at the same paths (``attn.qkv``, ``mlp.ln1``, ``head``...).

Quantized: every folded Linear/Conv (per-channel weights, and the input where it is
not already a quantized activation), q, k and v, the attention probabilities
(uniform or log2), and the output of every Hardswish (stem, attention projection,
MLP). Attention biases, residual additions, pooling and softmax stay in float.
LeViT has no LayerNorm, so nothing uses PTF.

Blocks: ``stem`` (the conv stem, then flattening to tokens in linear mode);
``stages.{i}.downsample`` (the subsample block: attention with a strided query
plus its residual MLP), ``stages.{i}.blocks.{j}`` (residual attention + residual
MLP), all searched (``attn-weights`` = the weight scales of qkv (kv and q for the
subsample block) and of the attention projection; ``block`` = every searchable
scale); ``head`` (average pooling, classifier; a distilled model averages ``head``
and ``head_dist`` as timm does in eval mode).
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..qnn.builder import operand_quant, probs_quant, wrap_act, wrap_conv, wrap_head, wrap_linear
from ..qnn.fold import fold_bn, fold_bn_before
from ..qnn.layers import quantizers_of
from ..qnn.qmodel import Block, QModel
from ._registry import IMAGES, Adapter, register_adapter

__all__ = ["QLevitAttention", "LevitAdapter"]


def _wrap_folded(mod: nn.Module, quant, quant_input: bool = True) -> nn.Module:
    """Fold a timm ``LinearNorm``/``ConvNorm`` and wrap it in ``QLinear``/``QConv2d``."""
    folded = mod.linear
    fold_bn(folded, mod.bn)
    return (wrap_linear if isinstance(folded, nn.Linear) else wrap_conv)(folded, quant, quant_input=quant_input)


# -- attention ---------------------------------------------------------------------
class QLevitAttention(nn.Module):
    """LeViT attention (``Attention`` or the subsample ``AttentionDownsample``) with
    quantized q, k, v and attention probabilities, in linear or conv mode.

    Keeps the module's attention biases; the qkv (or kv and q) and projection layers
    are folded and quantized; only the attention arithmetic is re-expressed.
    """

    def __init__(self, attn: nn.Module, quant):
        super().__init__()
        self.subsample = hasattr(attn, "kv")
        self.use_conv, self.num_heads, self.scale = attn.use_conv, attn.num_heads, attn.scale
        self.key_dim, self.val_dim, self.val_attn_dim = attn.key_dim, attn.val_dim, attn.val_attn_dim
        self.stride = getattr(attn, "stride", 1)
        if self.subsample:
            self.kv = _wrap_folded(attn.kv, quant)
            attn.q.ln = _wrap_folded(attn.q.ln, quant)  # input: the subsampled tokens
            self.q = attn.q
        else:
            self.qkv = _wrap_folded(attn.qkv, quant)
        attn.proj.act = wrap_act(attn.proj.act, quant)
        attn.proj.ln = _wrap_folded(attn.proj.ln, quant, quant_input=False)  # input: the quantized activation
        self.proj = attn.proj
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.q_quant, self.k_quant, self.v_quant = (operand_quant(quant) for _ in range(3))
        self.probs_quant = probs_quant(quant)

    def _probs(self, q, k):
        """q (B, h, Nq, d), k (B, h, d, Nk) -> quantized attention probabilities."""
        attn = (q @ k) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        return self.probs_quant(attn.softmax(dim=-1))

    def forward(self, x):
        h, kd, vd = self.num_heads, self.key_dim, self.val_dim
        if self.use_conv:  # x (B, C, H, W); per head: (d, H*W)
            b, _, hh, ww = x.shape
            if self.subsample:
                k, v = self.kv(x).view(b, h, -1, hh * ww).split([kd, vd], dim=2)
                q = self.q(x).view(b, h, kd, -1)
                hh, ww = (hh - 1) // self.stride + 1, (ww - 1) // self.stride + 1
            else:
                q, k, v = self.qkv(x).view(b, h, -1, hh * ww).split([kd, kd, vd], dim=2)
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
            attn = self._probs(q.transpose(-2, -1), k)
            x = (v @ attn.transpose(-2, -1)).reshape(b, self.val_attn_dim, hh, ww)
        else:  # x (B, N, C)
            b, n, _ = x.shape
            if self.subsample:
                k, v = self.kv(x).view(b, n, h, -1).split([kd, vd], dim=3)
                q = self.q(x).view(b, -1, h, kd)
            else:
                q, k, v = self.qkv(x).view(b, n, h, -1).split([kd, kd, vd], dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
            attn = self._probs(q, k)
            x = (attn @ v).transpose(1, 2).reshape(b, -1, self.val_attn_dim)
        return self.proj(x)


def _quantize_mlp(mlp: nn.Module, quant) -> None:
    mlp.ln1 = _wrap_folded(mlp.ln1, quant)
    mlp.act = wrap_act(mlp.act, quant)
    mlp.ln2 = _wrap_folded(mlp.ln2, quant, quant_input=False)  # input: the quantized activation


def _quantize_stem(stem: nn.Module, quant, conv_norm) -> None:
    """Conv stem: ConvNorm / activation pairs; only the first conv quantizes its input
    (the image), the others take a quantized activation."""
    first = True
    for name, child in list(stem.named_children()):
        if isinstance(child, conv_norm):
            setattr(stem, name, _wrap_folded(child, quant, quant_input=first))
            first = False
        elif isinstance(child, (nn.Hardswish, nn.GELU, nn.ReLU, nn.SiLU, nn.Hardsigmoid)):
            setattr(stem, name, wrap_act(child, quant))
        else:
            raise UnsupportedModelError(f"LeViT stems with a {type(child).__name__} layer are not supported")


def _attn_scopes(name: str, attn_name: str, attn: QLevitAttention, qs: dict) -> dict[str, list[str]]:
    p = f"{name}.{attn_name}"
    weights = ([f"{p}.kv.weight_quant", f"{p}.q.ln.weight_quant"] if attn.subsample else [f"{p}.qkv.weight_quant"])
    weights.append(f"{p}.proj.ln.weight_quant")
    return {"attn-weights": weights, "block": [n for n, q in qs.items() if q.searchable]}


def _is_timm_levit(model) -> bool:
    try:
        from timm.models.levit import Levit
    except Exception:  # pragma: no cover - timm missing
        return False
    return isinstance(model, Levit)


@register_adapter
class LevitAdapter(Adapter):
    name = "levit"
    description = "timm LeViT and LeViT-conv"
    input_spec = IMAGES

    def matches(self, model):
        return _is_timm_levit(model)

    def wrap(self, model, quant, arch=""):
        from timm.models.levit import ConvNorm, LevitBlock, LevitDownsample, NormLinear, Stem8, Stem16

        model.eval()
        if not isinstance(model.stem, (Stem8, Stem16)):
            raise UnsupportedModelError("LeViT models with a custom stem backbone are not supported")
        for stage in model.stages:
            if not isinstance(stage.downsample, (LevitDownsample, nn.Identity)):
                raise UnsupportedModelError("this LeViT variant's downsampling is not supported")
            if not all(isinstance(b, LevitBlock) for b in stage.blocks):
                raise UnsupportedModelError("this LeViT variant's blocks are not supported")
        if model.global_pool != "avg":
            raise UnsupportedModelError("LeViT without average pooling is not supported")

        _quantize_stem(model.stem, quant, ConvNorm)
        for stage in model.stages:
            if isinstance(stage.downsample, LevitDownsample):
                stage.downsample.attn_downsample = QLevitAttention(stage.downsample.attn_downsample, quant)
                _quantize_mlp(stage.downsample.mlp, quant)
            for blk in stage.blocks:
                blk.attn = QLevitAttention(blk.attn, quant)
                _quantize_mlp(blk.mlp, quant)
        head_names = [n for n in ("head", "head_dist") if isinstance(getattr(model, n, None), NormLinear)]
        for n in head_names:
            nl = getattr(model, n)
            setattr(model, n, wrap_head(fold_bn_before(nl.bn, nl.linear), quant))

        def stem(x):
            x = model.stem(x)
            return x if model.use_conv else x.flatten(2).transpose(1, 2)

        blocks = [Block("stem", stem, quantizers_of(model.stem, "stem"))]
        for i, stage in enumerate(model.stages):
            if isinstance(stage.downsample, LevitDownsample):
                name = f"stages.{i}.downsample"
                qs = quantizers_of(stage.downsample, name)
                blocks.append(Block(name, stage.downsample, qs,
                                    _attn_scopes(name, "attn_downsample", stage.downsample.attn_downsample, qs)))
            for j, blk in enumerate(stage.blocks):
                name = f"stages.{i}.blocks.{j}"
                qs = quantizers_of(blk, name)
                blocks.append(Block(name, blk, qs, _attn_scopes(name, "attn", blk.attn, qs)))
        head_q = {}
        for n in head_names:
            head_q.update(quantizers_of(getattr(model, n), n))
        blocks.append(Block("head", model.forward_head, head_q))
        return QModel(model, blocks, self.name, arch, quant)

