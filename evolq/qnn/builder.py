"""Helpers shared by adapters: build quantizers from a ``QuantConfig`` and wrap layers.

Each helper knows both regimes, so an adapter states *where* a model has quantization
points and the regime decides *what* sits there. In the deploy regime
(``QuantConfig.regime == "deploy"``) only the inputs and weights of Linear/Conv layers are
quantized (and a ``QAct`` output where it is the next layer's input): ``wrap_norm``
returns the norm unchanged, and ``operand_quant`` (q, k, v) and ``probs_quant`` give
``nn.Identity``. The weight-only regime (``regime == "weight-only"``, what onnxruntime's
``MatMulNBits`` runs) quantizes weights alike but gives every Linear a dynamic int8 input
(``DynamicBlockQuantizer``, per row and per block of the weight's group) and convolutions float
inputs; nothing else."""
from __future__ import annotations

from torch import nn

from ..quant import ChannelFactorQuantizer, DynamicBlockQuantizer, Log2Quantizer, PTFQuantizer, UniformQuantizer
from .layers import QAct, QConv2d, QLinear, QNorm

__all__ = ["edge_layers", "apply_edge_bits", "weight_quant", "act_quant", "operand_quant", "probs_quant",
           "norm_input_quant",
           "wrap_linear", "linear_input_quant",
           "conv_input_quant", "wrap_head", "wrap_conv", "wrap_act", "wrap_mlp_act", "wrap_norm",
           "replace_module", "qkr_requested", "qkr_mode", "weight_only_regime"]


def _deploy(quant) -> bool:
    """A shipping regime (deploy or weight-only): only Linear/Conv layers are quantized."""
    return getattr(quant, "regime", "fq-vit") in ("deploy", "weight-only")


def weight_only_regime(quant) -> bool:
    """The weight-only regime (``QuantConfig.preset("weight-only")``, onnxruntime's MatMulNBits)."""
    return getattr(quant, "regime", "fq-vit") == "weight-only"


def qkr_mode(quant) -> bool | str:
    """OFQ's query-key reparameterization as ``quant`` asks for it: ``True`` (``start="ofq"`` with
    ``start_options["qkr"]`` true: families that cannot build it are refused), ``"auto"`` (the
    ofq start's default outside the deploy regime: built where the attention has q and k rows
    of one qkv Linear and no q/k norms, skipped elsewhere) or ``False``. Adapters that support
    it build their attention's QKR form (``evolq.qnn.qkr``) unless off, so a saved QKR model is
    rebuilt in that form from its config."""
    if getattr(quant, "start", "rtn") != "ofq" or _deploy(quant):
        return False
    v = (getattr(quant, "start_options", None) or {}).get("qkr", "auto")
    return v if v is True or v == "auto" else False


def qkr_requested(quant) -> bool:
    """Whether ``quant`` asks for OFQ's QKR explicitly (``qkr_mode`` ``True``)."""
    return qkr_mode(quant) is True


def weight_quant(quant, ch_axis=0) -> UniformQuantizer:
    if weight_only_regime(quant):  # MatMulNBits: unsigned codes, an integer zero-point per group or row
        return UniformQuantizer(quant.w_bits, signed=False, symmetric=False, per_channel=True, ch_axis=ch_axis,
                                observer=quant.weight_observer, kind="weight")
    if _deploy(quant):  # what int8 kernels take: signed, per output channel, integers stored with zero-point 0
        return UniformQuantizer(quant.w_bits, signed=True, symmetric=quant.deploy_symmetric(quant.w_bits),
                                per_channel=True, ch_axis=ch_axis, observer=quant.weight_observer, kind="weight")
    return UniformQuantizer(quant.w_bits, signed=False, symmetric=False, per_channel=True, ch_axis=ch_axis,
                            observer=quant.weight_observer, kind="weight",
                            bias_correction=quant.bias_correction and getattr(quant, "start", "rtn") == "rtn")


def act_quant(quant, signed=False) -> UniformQuantizer:
    return UniformQuantizer(quant.a_bits, signed=signed, symmetric=False, per_channel=False,
                            observer=quant.act_observer, kind="activation")


def operand_quant(quant) -> nn.Module:
    """The quantizer of an attention matmul operand (q, k, v): signed per tensor, or
    ``nn.Identity`` in the deploy regime (the attention matmuls run in float)."""
    return nn.Identity() if _deploy(quant) else act_quant(quant, signed=True)


def probs_quant(quant):
    if _deploy(quant):
        return nn.Identity()
    if quant.attn_probs == "log2":
        return Log2Quantizer(quant.probs_bits)
    return UniformQuantizer(quant.probs_bits, signed=False, symmetric=False, observer="minmax", kind="activation")


def norm_input_quant(quant):
    if quant.ptf:
        return PTFQuantizer(quant.a_bits, max_alpha=quant.ptf_max_alpha, zero_point=quant.ptf_zero_point)
    return act_quant(quant)


def linear_input_quant(quant):
    """Input quantizer of a Linear: per tensor, or per-channel factors folded into its weights; in the
    weight-only regime dynamic int8 per block (its block follows the weight's group, ``layer_bits``)."""
    if weight_only_regime(quant):
        return DynamicBlockQuantizer()
    if quant.linear_input == "channel" and not _deploy(quant):
        return ChannelFactorQuantizer(quant.a_bits, observer=quant.act_observer, strength=quant.linear_input_strength)
    return act_quant(quant)


def conv_input_quant(quant, quant_input=True):
    """Input quantizer of a convolution: per tensor (None with ``quant_input=False``); float (None)
    in the weight-only regime, whose runtime has no int8 convolution for block-wise weights."""
    if not quant_input or weight_only_regime(quant):
        return None
    return act_quant(quant)


def wrap_linear(linear: nn.Linear, quant, quant_input=True) -> QLinear:
    """A Linear; ``quant_input=False`` where an upstream quantizer already quantizes its input (the
    weight-only regime has none upstream: its Linear inputs are always the runtime's dynamic int8)."""
    quant_input = quant_input or weight_only_regime(quant)
    return QLinear(linear, weight_quant(quant), linear_input_quant(quant) if quant_input else None)


def wrap_head(linear: nn.Linear, quant, quant_input=True) -> QLinear:
    """A classifier Linear. Its input has one row per image (pooled features or the class
    token), so it stays per tensor even with ``linear_input="channel"``: per-channel
    statistics from N calibration images would rest on N values per channel."""
    if weight_only_regime(quant):
        return QLinear(linear, weight_quant(quant), DynamicBlockQuantizer())
    return QLinear(linear, weight_quant(quant), act_quant(quant) if quant_input else None)


def wrap_mlp_act(act: nn.Module, fc2: nn.Linear, quant) -> tuple[nn.Module, QLinear]:
    """A transformer MLP's activation and second Linear. FQ-ViT quantizes the GELU
    output per tensor (``QAct``); with ``linear_input="channel"`` or in the deploy regime that
    quantizer moves into fc2 as its input quantizer (same tensor; per-channel factors folded
    into fc2's weights, or per tensor)."""
    if quant.linear_input == "channel" or _deploy(quant):
        return act, wrap_linear(fc2, quant)
    return wrap_act(act, quant), wrap_linear(fc2, quant, quant_input=False)


def wrap_conv(conv: nn.Conv2d, quant, quant_input=True) -> QConv2d:
    return QConv2d(conv, weight_quant(quant), conv_input_quant(quant, quant_input))


def wrap_act(module: nn.Module, quant) -> nn.Module:
    """``module`` with its output quantized per tensor (``QAct``); unchanged in the weight-only regime."""
    if weight_only_regime(quant):
        return module
    return QAct(module, act_quant(quant))


def wrap_norm(norm: nn.Module, quant) -> nn.Module:
    """A norm with a quantized input (PTF on LayerNorm inputs); the deploy regime leaves it float."""
    if _deploy(quant):
        return norm
    return QNorm(norm, norm_input_quant(quant))


def edge_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The first quantized Linear/Conv in module order, and the classifier: the last one
    with the trailing run of layers of its output size before it (LeViT's two heads)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))]
    if not layers:
        return []

    def width(m):
        return m.out_features if isinstance(m, QLinear) else m.conv.out_channels

    last = [layers[-1]]
    for n, m in reversed(layers[:-1]):
        if not isinstance(m, QLinear) or width(m) != width(layers[-1][1]):
            break
        last.insert(0, (n, m))
    return [layers[0]] + [lm for lm in last if lm[1] is not layers[0][1]]


def apply_edge_bits(model: nn.Module, quant) -> list[str]:
    """Raise the weight and input quantizers of ``edge_layers`` to ``quant.edge_bits``
    (never lower them); returns the layers' names. A no-op when ``edge_bits`` is None."""
    bits = getattr(quant, "edge_bits", None)
    if bits is None:
        return []
    names = []
    for name, layer in edge_layers(model):
        for q in (layer.weight_quant, layer.input_quant):
            if isinstance(q, UniformQuantizer) and q.bits < bits:
                if q is layer.weight_quant and getattr(quant, "regime", "") == "deploy":
                    q.symmetric = quant.deploy_symmetric(bits)
                q.set_bits(bits)
        names.append(name)
    return names


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
