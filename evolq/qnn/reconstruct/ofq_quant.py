"""The quantizer side of the ofq fine-tune (``ofq.run_ofq``): the training forwards that
put the trained change ``D`` in front of every weight quantizer and pass gradients straight
through (``TrainingForwards``), which layers StatsQ quantizes and its refit of their scales
(``statsq_layers``, ``fit_statsq``), CGA's confidence masks (``cga_masks``) and the activation
quantizers whose scales may train (``act_scale_quantizers``)."""
from __future__ import annotations

import torch
from torch import nn

from ...quant import UniformQuantizer
from ...quant.quantizers import lsq_quant, straight_through
from ...quant.range import split_zero_point
from .common import folded_weight

__all__ = ["TrainingForwards", "cga_masks", "act_scale_quantizers", "statsq_layers", "fit_statsq"]


class TrainingForwards:
    """Installs the training forwards for the duration of a ``with``: every quantizer passes
    gradients straight through; every trained layer's weight quantizer sees ``w + D`` (``D``
    a parameter, started from its ``weight_delta``) and, with StatsQ, refits its scale to
    ``w + D`` first. The float parameters are frozen meanwhile."""

    def __init__(self, qmodel, layers, statsq: list[bool], act_quants=()):
        self.qmodel, self.layers, self.statsq = qmodel, layers, statsq
        self.act_quants = list(act_quants)  # (name, quantizer) whose scales train (OFQOptions.act_lr)
        self.deltas: list[nn.Parameter] = []
        self.log_scales: list[nn.Parameter] = []
        self._patched, self._grad = [], []

    def __enter__(self):
        self._grad = [(p, p.requires_grad) for p in self.qmodel.model.parameters()]
        for p, _ in self._grad:
            p.requires_grad_(False)
        wqs = {id(layer.weight_quant) for _, layer in self.layers}
        trained = {id(q) for _, q in self.act_quants}
        for q in self.qmodel.quantizers().values():
            if id(q) not in wqs and id(q) not in trained:
                orig = type(q).forward.__get__(q)
                self._patch(q, lambda x, q=q, orig=orig: straight_through(q, x, orig))
        for _, q in self.act_quants:
            log_s = nn.Parameter(q.scale.detach().float().log().clone())
            self.log_scales.append(log_s)
            self._patch(q, self._act_forward(q, log_s))
        for (_, layer), sq in zip(self.layers, self.statsq):
            q = layer.weight_quant
            w, _ = folded_weight(layer)
            d = q._buffers.get("weight_delta")
            delta = nn.Parameter((d if d is not None else torch.zeros_like(w)).detach().float().clone())
            q.set_rounding()  # D is the change while training
            self.deltas.append(delta)
            self._patch(q, self._weight_forward(q, delta, sq))
        return self

    @staticmethod
    def _weight_forward(q, delta, statsq: bool):
        orig = type(q).forward.__get__(q)

        def forward(w):
            if not q.active:
                return w
            x = w + delta
            if statsq:
                with torch.no_grad():
                    q.fit_statsq(x)
            return straight_through(q, x, orig)

        return forward

    @staticmethod
    def _act_forward(q, log_s):
        """``lsq_quant`` at ``s = exp(log_s)``: the frozen quantizer's value with that scale."""

        def forward(x):
            return lsq_quant(q, x, log_s.exp()) if q.active else x

        return forward

    def _patch(self, q, fn):
        q.forward = fn  # an instance attribute: nn.Module.__call__ runs it
        self._patched.append(q)

    def __exit__(self, *exc):
        for q in self._patched:
            q.__dict__.pop("forward", None)
        self._patched = []
        for p, rg in self._grad:
            p.requires_grad_(rg)
        return False


def cga_masks(layers, deltas, br: float, statsq: list[bool]) -> list[torch.Tensor]:
    """True where a weight is confident: its latent value ``(w + D) / step + f`` lies farther
    than ``br`` from a rounding threshold (a half-integer)."""
    masks = []
    with torch.no_grad():
        for (_, layer), d, sq in zip(layers, deltas, statsq):
            q = layer.weight_quant
            w, _ = folded_weight(layer)
            x = w + d
            if sq:
                q.fit_statsq(x)
            step, z = q.qparams_like(x)  # per channel or per group of input columns
            _, f = split_zero_point(z)
            u = x / step + (f if f is not None else 0.0)
            masks.append((u - torch.floor(u) - 0.5).abs() > br)
    return masks


def act_scale_quantizers(qmodel, layers) -> list:
    """The activation quantizers whose scales ``OFQOptions.act_lr`` trains: the calibrated
    uniform ones (per tensor or per channel) with integer zero-points. PTF / channel-factor
    quantizers (LayerNorm inputs of the FQ-ViT regimes) and log2 ones keep their calibration."""
    wqs = {id(layer.weight_quant) for _, layer in layers}
    out = []
    for name, q in qmodel.quantizers().items():
        if (type(q) is UniformQuantizer and q.kind == "activation" and q.active and id(q) not in wqs
                and bool((q.scale > 0).all()) and bool((q.zero_point == q.zero_point.round()).all())):
            out.append((name, q))
    return out


def statsq_layers(layers, quant, statsq: bool) -> list[bool]:
    """Which layers StatsQ quantizes: those at ``quant.w_bits`` or fewer bits (at most 4 bits
    beside a lower ``w_bits``, for ``layer_bits``). Layers that ``edge_bits`` raised (8-bit first
    layer and classifier) keep their calibrated grid: StatsQ's clip at ``2 * mean|w|`` is made
    for 2-4 bits and costs far more than it gains at 8."""
    limit = max(quant.w_bits, 4) if getattr(quant, "layer_bits", None) else quant.w_bits
    return [statsq and layer.weight_quant.bits <= limit for _, layer in layers]


@torch.no_grad()
def fit_statsq(layers, statsq: list[bool], deltas=None) -> None:
    for j, ((_, layer), sq) in enumerate(zip(layers, statsq)):
        if sq:
            w = folded_weight(layer)[0]
            layer.weight_quant.fit_statsq(w if deltas is None else w + deltas[j])
