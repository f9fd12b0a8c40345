"""SmoothQuant (Xiao et al., 2023) for the deploy regime: move activation outlier channels
into the weights offline, so every Linear input can be quantized per tensor.

A ``SmoothGroup`` is a producer whose output channels can be divided by positive factors
without changing anything else (a LayerNorm's affine, or a slice of a Linear's output
rows) and the Linear layers that read those channels; with no producer (a GELU output)
the one consumer gets an explicit ``input_scale`` multiply before its input quantizer,
which inductor fuses into the elementwise kernel that already computes the activation. With per-channel input maxima
``a_c`` (float model, calibration images) and weight-column maxima ``w_c`` over the
consumers, ``f_c = a_c^s / w_c^(1-s)`` (strength ``s``): the producer's channel c is
divided by ``f_c`` and each consumer's input column c multiplied by it. The float model
computes the same function (up to float rounding); only where quantization loses
precision moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SmoothGroup", "smooth_model"]


@dataclass
class SmoothGroup:
    """``producer``: a LayerNorm (its ``weight`` and ``bias``), a Linear/QLinear whose output
    rows ``rows = (start, stop)`` feed the consumers, or None (an explicit multiply on the
    single consumer's input); ``consumers``: QLinear layers that read exactly those channels."""

    producer: nn.Module | None
    consumers: list
    rows: tuple[int, int] | None = None

    def channels(self) -> int:
        return self.consumers[0].in_features


@torch.no_grad()
def _input_absmax(qmodel, groups: list[SmoothGroup], x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per-channel max |input| of each group's first consumer, on the float model."""
    maxima: list[torch.Tensor | None] = [None] * len(groups)
    handles = []

    def hook(i):
        def record(_module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            maxima[i] = a if maxima[i] is None else torch.maximum(maxima[i], a)
        return record

    for i, g in enumerate(groups):
        handles.append(g.consumers[0].register_forward_pre_hook(hook(i)))
    qs = list(qmodel.quantizers().values())
    was = [q.enabled for q in qs]
    try:
        for q in qs:
            q.enabled = False
        for i in range(0, x.shape[0], batch_size):
            qmodel.model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        for q, e in zip(qs, was):
            q.enabled = e
    return maxima


@torch.no_grad()
def smooth_model(qmodel, x: torch.Tensor, strength: float, batch_size: int = 50) -> dict:
    """Apply SmoothQuant factors to ``qmodel.smooth_groups`` in place (before calibration).

    Returns a report: per group, the producer's name and the largest factor, and the
    largest ratio of a channel's input maximum to the median channel's before and after.
    A no-op (empty report) at strength 0 or without groups.
    """
    groups = list(getattr(qmodel, "smooth_groups", []) or [])
    if strength <= 0 or not groups:
        return {"strength": float(strength), "groups": []}
    names = {m: n for n, m in qmodel.model.named_modules()}
    maxima = _input_absmax(qmodel, groups, x, batch_size)
    report = []
    for g, a in zip(groups, maxima):
        if a is None:  # pragma: no cover - a consumer the forward never reached
            continue
        w = torch.stack([c.weight.detach().abs().amax(dim=0).float() for c in g.consumers]).amax(dim=0)
        f = (a.clamp_min(1e-5).pow(strength) / w.clamp_min(1e-5).pow(1.0 - strength)).clamp(1e-4, 1e4)
        p = g.producer
        if p is None:  # explicit multiply before the quantizer
            if len(g.consumers) != 1:
                raise ValueError("an explicit input scale needs exactly one consumer")
            g.consumers[0].set_input_scale(1.0 / f)
        elif g.rows is None:  # LayerNorm affine
            p.weight.div_(f.to(p.weight))
            if p.bias is not None:
                p.bias.div_(f.to(p.bias))
        else:
            lo, hi = g.rows
            p.weight[lo:hi].div_(f.to(p.weight).unsqueeze(1))
            if p.bias is not None:
                p.bias[lo:hi].div_(f.to(p.bias))
        for c in g.consumers:
            c.weight.mul_(f.to(c.weight).unsqueeze(0))
        med = a.median().clamp_min(1e-12)
        after = a / f
        where = "<input_scale>" if p is None else names.get(p, "?")
        report.append({"producer": where + ("" if g.rows is None else f"[{g.rows[0]}:{g.rows[1]}]"),
                       "consumers": [names.get(c, "?") for c in g.consumers],
                       "max_factor": f.max().item(), "min_factor": f.min().item(),
                       "outlier_ratio_before": (a.max() / med).item(),
                       "outlier_ratio_after": (after.max() / after.median().clamp_min(1e-12)).item()})
    return {"strength": float(strength), "groups": report}

