"""OFQ's query-key reparameterization (QKR; Liu et al., ICML 2023) of a multi-head attention
whose q and k are rows of one quantized ``qkv`` Linear (timm's ViT/DeiT attention).

Per head h, ``W_qk,h = W_q,h^T W_k,h`` (D x D, D the attention's input width) is one weight,
quantized as one, instead of ``W_q`` and ``W_k`` separately; the intermediate
``u_h = x W_qk,h`` (B, N, D) is quantized (a signed per-tensor activation quantizer at
``a_bits``), and ``logits_h = u_h x^T * scale``. ``x`` is the attention's input after qkv's
input quantizer: W_qk's layer shares that quantizer, so it reads the same quantized input as
qkv (per-channel input factors are folded into W_qk as into qkv).

The biases: ``q_i . k_j = x_i W_qk,h x_j^T + b_q,h^T W_k,h x_j + (terms of i alone)``. The terms
of the query alone (``x_i^T W_q,h^T b_k,h + b_q,h^T b_k,h``) add a constant to each query's
logits, which softmax ignores. The q-bias term ``r_h . x_j`` with ``r_h = W_k,h^T b_q,h`` does
not cancel: ``bias="exact"`` keeps it as the bias of W_qk's layer (``u_h = x W_qk,h + r_h``, so
the form equals the original attention in float); ``bias="drop"`` is OFQ's form, which drops
both biases and so changes the function (on ViT-Tiny, the float logits' KL to the original
model is about 5.9).

W_qk is stored as one Linear weight (H*D, D): rows ``h*D .. h*D + D - 1`` are
``M_h = W_k,h^T W_q,h``, so ``u = x @ weight^T`` and W_qk's layer is an ordinary ``QLinear``
(``QKR.qk``): everything that handles a quantized Linear (the GPTQ init, the ofq fine-tune's
weight change ``D``, StatsQ, CGA, the scale search's population mode, saving and loading)
handles it. The float ``weight`` is the product of the float q/k weights and stays so; what
training changes is the quantizer's ``weight_delta``.

The float model stays the original one: the QKR form runs only while it is switched on
(``switch_qkr``) and W_qk's quantizer is enabled, so with quantization off
(``QModel.set_quant_enabled(False)``) the attention computes the original ``q k^T`` with
biases: the teacher of the fine-tune and the reference of the search and of the metrics are
the user's model. ``qkr_float_form`` runs the QKR form in float (to measure what dropping the
biases costs).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .builder import act_quant, weight_quant
from .layers import QLinear

__all__ = ["QKR", "merged_qk", "merged_qk_bias", "qkr_modules", "switch_qkr", "qkr_float_form",
           "qkr_active_names", "qkr_export_refusal"]


def merged_qk_bias(qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, num_heads: int,
                   head_dim: int) -> torch.Tensor:
    """The stacked ``r_h = W_k,h^T b_q,h`` (H*D): with it as W_qk's bias, ``(x M_h^T + r_h) . x'``
    differs from ``q . k'`` by terms of the query alone, which softmax ignores. Zeros without
    a bias."""
    a = num_heads * head_dim
    d = qkv_weight.shape[1]
    if qkv_bias is None:
        return qkv_weight.new_zeros(num_heads * d)
    wk = qkv_weight[a:2 * a].reshape(num_heads, head_dim, d)
    return torch.einsum("hcd,hc->hd", wk, qkv_bias[:a].reshape(num_heads, head_dim)).reshape(num_heads * d)


def merged_qk(qkv_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The stacked ``M_h = W_k,h^T W_q,h`` (H*D, D) of a qkv weight whose rows are q (H*dh),
    k (H*dh), v: ``(x @ M_h^T) . x'`` equals ``(W_q,h x) . (W_k,h x')``."""
    a = num_heads * head_dim
    d = qkv_weight.shape[1]
    wq = qkv_weight[:a].reshape(num_heads, head_dim, d)
    wk = qkv_weight[a:2 * a].reshape(num_heads, head_dim, d)
    return torch.einsum("hci,hcj->hij", wk, wq).reshape(num_heads * d, d)


class QKR(nn.Module):
    """The QKR form of one attention (see the module doc): ``qk`` (a ``QLinear`` holding
    W_qk, sharing ``qkv``'s input quantizer) and ``u_quant``. Built at wrap time when the
    config asks for it (``evolq.qnn.builder.qkr_requested``), off until ``switch_qkr``; the
    ``on`` buffer is saved, so a loaded model computes the form it was saved in."""

    def __init__(self, qkv: QLinear, num_heads: int, head_dim: int, quant):
        super().__init__()
        self.num_heads, self.head_dim, self.dim = num_heads, head_dim, qkv.in_features
        self._qkv = (qkv,)  # a tuple: not a second registration of qkv's parameters
        lin = nn.utils.skip_init(nn.Linear, self.dim, num_heads * self.dim, bias=True,
                                 device=qkv.weight.device, dtype=qkv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(merged_qk(qkv.weight.detach(), num_heads, head_dim))
            lin.bias.zero_()
        self.qk = QLinear(lin, weight_quant(quant), qkv.input_quant)
        self.u_quant = act_quant(quant, signed=True)
        self.register_buffer("on", torch.tensor(False))
        self._on = False
        self.float_form = False  # run the QKR form with quantization off too (qkr_float_form)

    def extra_repr(self):
        return f"heads={self.num_heads}, dim={self.dim}, on={self._on}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "qk.weight" in state_dict and prefix + "qk.bias" not in state_dict:
            state_dict[prefix + "qk.bias"] = torch.zeros_like(self.qk.bias)  # saved before the bias: "drop"
        if prefix + "on" not in state_dict:  # an ofq model saved before qkr="auto" built the form: it stays off
            for k, v in self.state_dict().items():
                state_dict.setdefault(prefix + k, v)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._on = bool(self.on)

    def set_on(self, on: bool) -> None:
        self.on.fill_(bool(on))
        self._on = bool(on)

    @property
    def active(self) -> bool:
        """Whether the attention computes the QKR form now: switched on, and W_qk's quantizer
        enabled (or ``float_form``)."""
        return self._on and (self.float_form or self.qk.weight_quant.enabled)

    @torch.no_grad()
    def init_weight(self, bias: str = "exact") -> None:
        """W_qk from qkv's float q/k weights (the float weights, not their quantized copies), and
        its bias: ``"exact"`` the q-bias term ``r_h = W_k,h^T b_q,h``, ``"drop"`` zero (OFQ)."""
        if bias not in ("exact", "drop"):
            raise ValueError(f"bias must be 'exact' or 'drop', got {bias!r}")
        qkv = self._qkv[0]
        self.qk.weight.copy_(merged_qk(qkv.weight.detach(), self.num_heads, self.head_dim).to(self.qk.weight))
        b = qkv.bias.detach() if bias == "exact" and qkv.bias is not None else None
        self.qk.bias.copy_(merged_qk_bias(qkv.weight.detach(), b, self.num_heads, self.head_dim).to(self.qk.bias))
        self.qk._fold_cache = None

    def logits(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, H, N, N) attention logits ``Q(u_h) Q(x)^T * scale``, ``u = Q(x) Q(W_qk)``."""
        b, n, d = x.shape
        u = self.u_quant(self.qk(x).reshape(b, n, self.num_heads, d).transpose(1, 2))
        xq = self.qk.input_quant(x)
        return (u @ xq.unsqueeze(1).transpose(-2, -1)) * scale


def qkr_modules(model: nn.Module) -> list[tuple[str, QKR]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QKR)]


def qkr_active_names(model: nn.Module) -> list[str]:
    """The attentions (module names) that compute the QKR form (switched on)."""
    return [n.rpartition(".")[0] or n for n, m in qkr_modules(model) if m._on]


@contextlib.contextmanager
def qkr_float_form(model: nn.Module):
    """Within the ``with``, switched-on QKR attentions run their form with quantization off too."""
    mods = [m for _, m in qkr_modules(model)]
    for m in mods:
        m.float_form = True
    try:
        yield
    finally:
        for m in mods:
            m.float_form = False


@torch.no_grad()
def switch_qkr(qmodel, x: torch.Tensor | None, batch_size: int = 32, bias: str = "exact") -> int:
    """Switch every QKR attention of ``qmodel`` on: W_qk (and its ``bias``, see
    ``QKR.init_weight``) from the float q/k weights and, with
    images ``x``, W_qk's quantizer and ``u``'s calibrated on them as ``calibrate`` does (every
    other quantizer off: the observers see the float model's tensors, W_qk's input factors
    folded). ``x=None`` (a resumed fine-tune) keeps the quantizers' restored state. Returns
    the number of attentions switched."""
    mods = [m for _, m in qkr_modules(qmodel.model)]
    for m in mods:
        m.init_weight(bias)
        m.set_on(True)
    if x is None or not mods:
        return len(mods)
    new = [q for m in mods for q in (m.qk.weight_quant, m.u_quant)]
    qs = list(qmodel.quantizers().values())
    enabled = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    for q in new:
        q.enabled, q.calibrating = True, True
    try:
        for i in range(0, x.shape[0], batch_size):
            qmodel.model(x[i:i + batch_size])
    finally:
        for q in new:
            q.calibrating = False
        for q, e in zip(qs, enabled):
            q.enabled = e
    for m in mods:
        m.u_quant.finalize()
        wq, f = m.qk.weight_quant, m.qk._factor()
        wq.calibrate_from(m.qk.folded_weight(f) if f is not None else m.qk.weight)
    return len(mods)


def qkr_export_refusal(model: nn.Module, fmt: str) -> str | None:
    """The one-line reason an export to ``fmt`` refuses a model with switched-on QKR attention
    (None without): the pt2 export (deploy regime, whose attention stays float) has no form for
    the merged W_qk and the u quantizer. The ONNX export writes the form."""
    names = qkr_active_names(model)
    if not names:
        return None
    return (f"attention {names[0]} is in OFQ's query-key reparameterized form (QKR: one merged, quantized "
            f"W_q^T W_k per head), which the {fmt} export has no form for; quantize with start_options qkr=false "
            f"to export")
