"""Quantizers with per-channel factors on the last axis: one searchable layer ``scale`` times
fixed per-channel ``factor`` s. ``PTFQuantizer`` (FQ-ViT's power-of-two factors, LayerNorm
inputs) and ``ChannelFactorQuantizer`` (per-channel activations folded into the next Linear's
weights, RepQ-ViT / SmoothQuant). Population mode as in ``evolq.quant.quantizers``."""
from __future__ import annotations

import torch

from .observers import MinMaxObserver, make_observer
from .quantizers import Quantizer
from .range import fake_quant, fake_quant_axis, int_range, qparams_from_range

__all__ = ["PTFQuantizer", "ChannelFactorQuantizer"]

class _ChannelFactorBase(Quantizer):
    """One searchable layer ``scale`` times fixed per-channel ``factor`` s (channels on
    the last axis), with one shared or one per-channel zero-point. Channel c is
    quantized with step ``scale * factor[c]``. The search sees the single layer scale."""

    searchable = True
    folds_into_weight = False  # True: a following linear layer must absorb ``factor``

    def __init__(self, bits=8, zero_point="shared"):
        super().__init__()
        if zero_point not in ("shared", "channel"):
            raise ValueError(f"zero_point must be 'shared' or 'channel', got {zero_point!r}")
        self.bits, self.zp_mode = bits, zero_point
        self.qmin, self.qmax = int_range(bits, signed=False)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))

    @property
    def factor(self) -> torch.Tensor:
        raise NotImplementedError

    def step_like(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.factor).reshape(*([1] * (x.ndim - 1)), -1)

    def forward(self, x):
        if self.calibrating:
            self.observe(x)
            return x
        if not self.active:
            return x
        factor = self.factor
        zp = self.zero_point.expand_as(factor)
        if self.pop_scale is None:
            return fake_quant_axis(x, self.scale * factor, zp, self.qmin, self.qmax, -1)
        p = self.pop_scale.shape[0]
        s = (self.pop_scale.reshape(p, 1) * factor).reshape(p, *([1] * (x.ndim - 1)), -1)
        xs = x.reshape(p, -1, *x.shape[1:])
        return fake_quant(xs, s, zp, self.qmin, self.qmax).reshape(x.shape)


class PTFQuantizer(_ChannelFactorBase):
    """Power-of-two-factor quantizer (FQ-ViT) for LayerNorm inputs.

    Channels are on the last axis. Channel c uses ``scale * 2**alpha[c]`` with alpha in
    {0..max_alpha}, chosen per channel for the least L2 error on the calibration data;
    the top step ``scale * 2**max_alpha`` covers the whole observed range.

    ``zero_point="shared"`` (FQ-ViT) uses one zero-point for all channels.
    ``"channel"`` gives each channel its own zero-point (still integer, so an integer
    LayerNorm subtracts it before the shift): with one shared zero-point, a layer whose
    range is set by a few large negative channels leaves the normal channels only a
    few levels above zero.
    """

    def __init__(self, bits=8, max_alpha=3, zero_point="shared"):
        super().__init__(bits, zero_point)
        if not isinstance(max_alpha, int) or not 0 <= max_alpha <= 12:
            raise ValueError(f"max_alpha must be an integer in 0..12, got {max_alpha!r}")
        self.max_alpha = max_alpha
        self.observer = MinMaxObserver(ch_axis=-1)
        self._rows: list[torch.Tensor] = []
        self.register_buffer("alpha", torch.zeros(1))

    def extra_repr(self):
        return f"bits={self.bits}, max_alpha={self.max_alpha}, zero_point={self.zp_mode}"

    @property
    def factor(self):
        return torch.pow(2.0, self.alpha)

    def observe(self, x):
        self.observer.update(x)
        rows = x.detach().float().reshape(-1, x.shape[-1])
        if rows.shape[0] > 4096:
            rows = rows[:: rows.shape[0] // 4096][:4096]
        self._rows.append(rows.clone())

    def finalize(self):
        if not self.observer.ready:
            return
        mn, mx = self.observer.min_val.clamp(max=0), self.observer.max_val.clamp(min=0)
        scale_top, zp = qparams_from_range(mn.min(), mx.max(), self.qmin, self.qmax, symmetric=False)
        base = scale_top / 2**self.max_alpha
        rows = torch.cat(self._rows, dim=0)  # (N, C)
        errs, zps = [], []
        for a in range(self.max_alpha + 1):
            step = base * 2**a
            z = torch.clamp(self.qmin - torch.round(mn / step), self.qmin, self.qmax) if self.zp_mode == "channel" \
                else zp.expand_as(mn)
            xq = fake_quant(rows, step, z, self.qmin, self.qmax)
            errs.append((xq - rows).pow(2).mean(dim=0))
            zps.append(z)
        alpha = torch.stack(errs).argmin(dim=0)
        dev = self.scale.device
        self.scale = base.reshape(1).to(dev)
        self.zero_point = (torch.stack(zps).gather(0, alpha[None])[0] if self.zp_mode == "channel"
                           else zp.reshape(1)).to(dev)
        self.alpha = alpha.float().to(dev)
        self.calibrated.fill_(True)
        self._rows = []


class ChannelFactorQuantizer(_ChannelFactorBase):
    """Per-channel asymmetric quantizer (channels on the last axis) written as one
    layer scale times fixed per-channel factors, with per-channel zero-points.

    Calibration runs a per-channel observer (scales s_c, zero-points). With
    ``strength=1`` the layer scale is the mean of the s_c and ``factor[c]`` = s_c / layer
    scale (RepQ-ViT's reparameterization: fully per-channel steps). With ``strength``
    b < 1 the factors are (s_c / mean s)^b and the layer scale max_c s_c / factor[c],
    so every channel's range still fits: part of each channel's range moves into the
    weights, part stays in the activation step (SmoothQuant's migration strength);
    b = 0 keeps one step for all channels and only per-channel zero-points. Meant for the
    input of a linear layer that absorbs the factors into its weight columns before weight
    quantization (``folds_into_weight``):
    the deployed matmul then takes one per-tensor scale, and the per-channel zero-points
    become a bias term. ``QLinear`` does that fold.
    """

    folds_into_weight = True

    def __init__(self, bits=8, observer="omse", strength=1.0):
        super().__init__(bits, zero_point="channel")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        self.observer_name, self.strength = observer, float(strength)
        self.observer = make_observer(observer, -1)
        self.register_buffer("channel_factor", torch.ones(1))

    def extra_repr(self):
        return f"bits={self.bits}, per-channel factors (strength {self.strength:g}), observer={self.observer_name}"

    @property
    def factor(self):
        return self.channel_factor

    def observe(self, x):
        self.observer.update(x)

    def finalize(self):
        if not self.observer.ready:
            return
        scale, zp = self.observer.compute(self.qmin, self.qmax, False)
        scale, zp = scale.reshape(-1), zp.reshape(-1)
        if self.strength == 1.0:
            layer = scale.mean()
            factor = scale / layer
        else:  # factors (s_c / mean s)^strength; the layer scale widens so every channel's range still fits
            factor = (scale / scale.mean()).pow(self.strength)
            layer = (scale / factor).max()
            lo = (self.qmin - zp) * scale  # each channel's lower clip value
            zp = torch.clamp(self.qmin - torch.round(lo / (layer * factor)), self.qmin, self.qmax)
        dev = self.scale.device
        self.scale = layer.reshape(1).to(dev)
        self.channel_factor = factor.to(dev)
        self.zero_point = zp.to(dev)
        self.calibrated.fill_(True)
