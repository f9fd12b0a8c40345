"""Observers: collect statistics of a tensor during calibration and turn them into
quantization parameters (scale, zero-point).

Observers know nothing about models. They see tensors, optionally with a channel
axis, and return ``(scale, zero_point)`` for a given integer range.
"""
from __future__ import annotations

import torch

from .range import fake_quant, qparams_from_range, statsq_qparams

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "OMSEObserver",
    "StatsQObserver",
    "OBSERVERS",
    "WEIGHT_ONLY_OBSERVERS",
    "make_observer",
]

_SAMPLE_CAP = 1 << 18  # values kept per batch for error-driven observers


def _channel_view(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """Return x as (C, N) for per-channel stats, or (1, N) for per-tensor."""
    x = x.detach().float()
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


class Observer:
    """Base class. ``update`` sees calibration tensors; ``compute`` returns qparams."""

    name = "base"

    def __init__(self, ch_axis: int | None = None):
        self.ch_axis = ch_axis
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        xv = _channel_view(x, self.ch_axis)
        mn, mx = xv.min(dim=1).values, xv.max(dim=1).values
        self._merge(mn, mx)

    def _merge(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)

    @property
    def ready(self) -> bool:
        return self.min_val is not None

    def compute(self, qmin: int, qmax: int, symmetric: bool):
        if not self.ready:
            raise RuntimeError(f"{type(self).__name__} saw no data: run calibration first")
        return qparams_from_range(self.min_val, self.max_val, qmin, qmax, symmetric)


class MinMaxObserver(Observer):
    """Running minimum and maximum over all calibration batches."""

    name = "minmax"


class EMAObserver(Observer):
    """Exponential moving average of per-batch minimum and maximum."""

    name = "ema"

    def __init__(self, ch_axis: int | None = None, momentum: float = 0.9):
        super().__init__(ch_axis)
        self.momentum = momentum

    def _merge(self, mn, mx):
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            m = self.momentum
            self.min_val = m * self.min_val + (1 - m) * mn
            self.max_val = m * self.max_val + (1 - m) * mx


class PercentileObserver(Observer):
    """Per-batch lower/upper percentiles, averaged over batches (robust to outliers)."""

    name = "percentile"

    def __init__(self, ch_axis: int | None = None, percentile: float = 99.99):
        super().__init__(ch_axis)
        self.q = percentile / 100.0
        self._n = 0

    def update(self, x):
        xv = _channel_view(x, self.ch_axis)
        if xv.shape[1] > _SAMPLE_CAP:  # torch.quantile has an input size limit
            idx = torch.linspace(0, xv.shape[1] - 1, _SAMPLE_CAP).long()
            xv = xv.sort(dim=1).values[:, idx]
        mn = torch.quantile(xv, 1 - self.q, dim=1)
        mx = torch.quantile(xv, self.q, dim=1)
        self._n += 1
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:  # running mean over batches
            w = 1.0 / self._n
            self.min_val = (1 - w) * self.min_val + w * mn
            self.max_val = (1 - w) * self.max_val + w * mx


class OMSEObserver(Observer):
    """Optimal-MSE clipping: shrink the min/max range by ratios 1.00, 0.99, ... 0.11
    and keep the ratio with the least L2 quantization error on the observed data
    (Choukroun et al., as used by FQ-ViT). Keeps a deterministic strided sample of
    the calibration values so the error is measured on real data.
    """

    name = "omse"

    def __init__(self, ch_axis: int | None = None, steps: int = 90):
        super().__init__(ch_axis)
        self.steps = steps
        self._samples: list[torch.Tensor] = []

    def update(self, x):
        xv = _channel_view(x, self.ch_axis)
        self._merge(xv.min(dim=1).values, xv.max(dim=1).values)
        per_ch_cap = max(1, _SAMPLE_CAP // xv.shape[0])
        if xv.shape[1] > per_ch_cap:
            stride = xv.shape[1] // per_ch_cap
            xv = xv[:, ::stride][:, :per_ch_cap]
        self._samples.append(xv.clone())

    def compute(self, qmin, qmax, symmetric):
        if not self.ready:
            raise RuntimeError("OMSEObserver saw no data: run calibration first")
        data = torch.cat(self._samples, dim=1)  # (C, N)
        best_err = None
        best = None
        for i in range(self.steps):
            r = 1.0 - 0.01 * i
            scale, zp = qparams_from_range(self.min_val * r, self.max_val * r, qmin, qmax, symmetric)
            xq = fake_quant(data, scale[:, None], zp[:, None], qmin, qmax)
            err = (xq - data).pow(2).mean(dim=1)
            if best_err is None:
                best_err, best = err, (scale.clone(), zp.clone())
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
        return best


class StatsQObserver(Observer):
    """StatsQ (OFQ): the step is ``2 * mean|w| / 2^(b-1)`` per channel, the grid has 2^b levels
    and none at zero (fractional zero-point, ``evolq.quant.range.statsq_qparams``). For weights
    only (``QuantConfig(weight_observer="statsq")``): a weight tensor seen in several calibration
    batches is the same tensor, so the mean is taken over the last one seen."""

    name = "statsq"

    def __init__(self, ch_axis: int | None = None):
        super().__init__(ch_axis)
        self._last = None

    def update(self, x):
        super().update(x)
        self._last = x.detach().float().clone()

    def compute(self, qmin, qmax, symmetric):
        if not self.ready:
            raise RuntimeError("StatsQObserver saw no data: run calibration first")
        return statsq_qparams(self._last, qmin, qmax, self.ch_axis)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "omse": OMSEObserver,
    "statsq": StatsQObserver,
}
WEIGHT_ONLY_OBSERVERS = ("statsq",)


def make_observer(name: str, ch_axis: int | None = None) -> Observer:
    try:
        cls = OBSERVERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}") from None
    return cls(ch_axis=ch_axis)
