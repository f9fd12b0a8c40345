"""Fake-quantizer modules: the base ``Quantizer``, uniform (per tensor, per channel or per group
of input columns, ``evolq.quant.groups``) and log2; the per-channel-factor ones (PTF, channel
factors) are in ``evolq.quant.channel_factor``.

A quantizer owns its quantization parameters as plain tensor buffers (``scale``,
``zero_point``) that search code may read and overwrite. For evaluating many
candidate scale vectors at once, a quantizer can be put in *population mode* by
setting ``pop_scale`` to a tensor whose first dimension is the population size P:

* a ``weight`` quantizer then returns P quantized copies of its input, stacked
  along a new leading dimension;
* an ``activation`` quantizer expects a batch whose leading dimension is P*B,
  population-major (candidate 0's B samples first) and quantizes each candidate's
  slice with its own scale.

Quantizers know nothing about models.
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import group_view, per_weight
from .observers import make_observer
from .range import fake_quant, fake_quant_axis, int_range, split_zero_point, statsq_qparams

__all__ = ["Quantizer", "UniformQuantizer", "Log2Quantizer",
           "bias_correct", "straight_through", "lsq_quant"]


def bias_correct(w_q: torch.Tensor, w: torch.Tensor, ch_axis: int = 0) -> torch.Tensor:
    """Banner et al. (2019) weight bias correction: per output channel, shift and
    rescale the quantized weights so their mean and standard deviation match the
    full-precision weights. ``w_q`` may carry extra leading (population) dims."""
    extra = w_q.ndim - w.ndim
    ch = ch_axis % w.ndim + extra
    dims = [d for d in range(extra, w_q.ndim) if d != ch]
    wdims = [d for d in range(w.ndim) if d != ch_axis % w.ndim]
    mu, sd = w.mean(dim=wdims, keepdim=True), w.std(dim=wdims, keepdim=True)
    mu_q, sd_q = w_q.mean(dim=dims, keepdim=True), w_q.std(dim=dims, keepdim=True)
    ratio = torch.where(sd_q > 0, sd / sd_q.clamp_min(1e-12), torch.ones_like(sd_q))
    return (w_q - mu_q) * ratio + mu


def memo(owner, slot: str, deps: tuple, compute):
    """``compute()``, kept in ``owner.<slot>`` while every tensor in ``deps`` is the same object
    at the same version (an in-place write bumps the version; a replaced buffer is a new
    object): quantized (or folded) weights are computed once per scale, weight and rounding
    state, not once per forward."""
    versions = tuple(None if t is None else t._version for t in deps)
    c = getattr(owner, slot, None)
    if c is not None and len(c[0]) == len(deps) and all(a is b for a, b in zip(c[0], deps)) and c[1] == versions:
        return c[2]
    out = compute()
    setattr(owner, slot, (deps, versions, out))
    return out


def straight_through(q, x: torch.Tensor, fn=None) -> torch.Tensor:
    """``q(x)`` (or ``fn(x)``, e.g. ``q``'s class forward) in value, with the straight-through
    gradient (Bengio et al.): 1 where ``x`` is inside the quantizer's range (its value moved by
    at most half a step), 0 where it was clipped. Quantizers without a ``step_like`` (log2)
    pass the gradient everywhere. For training through fake quantizers (the ``ofq`` start):
    a quantizer's own forward has no gradient."""
    with torch.no_grad():
        out = (fn or q)(x.detach())
    if not x.requires_grad or out.shape != x.shape:
        return out
    step = q.step_like(x) if (hasattr(q, "step_like") and q.active) else None
    if step is None:
        return out + (x - x.detach())
    with torch.no_grad():
        mask = ((out - x).abs() <= 0.5001 * step).to(x.dtype)
    return out + (x - x.detach()) * mask


def lsq_quant(q, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The uniform activation quantizer ``q`` at a trainable step ``s`` (LSQ, Esser et al.
    2020): ``round(clamp(x / s, qmin - z, qmax - z)) * s`` with the rounding passed straight
    through, so ``s`` gets the gradient of the rounding error inside the range and of the
    clipped values outside it, and ``x`` gets 1 inside the range and 0 where it clips. In value
    it is ``q``'s forward with ``scale = s`` (its zero-points are integers, so rounding and
    clamping commute). ``s`` is q's scale's shape (per tensor or per channel)."""
    axis = q._axis(x.ndim)
    if axis is None:  # scalar bounds: clamp's gradient is 1 up to and including them
        s = s.to(x.dtype).reshape(())
        z = float(q.zero_point.reshape(()).item())
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.to(x.dtype).reshape(shape), q.zero_point.to(x.dtype).reshape(shape)
    v = torch.clamp(x * torch.reciprocal(s), q.qmin - z, q.qmax - z)
    return (torch.round(v.detach()) + (v - v.detach())) * s


class Quantizer(nn.Module):
    """Common state: calibration switch, enable switch, population override."""

    searchable = False  # has a ``scale`` buffer a search may change

    def __init__(self):
        super().__init__()
        self.calibrating = False
        self.enabled = True
        self._pcache = None
        self.pop_scale = None
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def pop_scale(self) -> torch.Tensor | None:
        """The installed population's scales (P, ...), or None outside population mode."""
        return self._pop_scale

    @pop_scale.setter
    def pop_scale(self, value: torch.Tensor | None) -> None:
        self._pop_scale = value
        self._pcache = None  # a weight quantizer's cached population weights belong to the old population

    def finalize(self) -> None:  # turn observed statistics into qparams
        pass

    def _rounding(self) -> tuple:
        """The start point's rounding state (GPTQ delta, AdaRound offsets), None where absent."""
        return self._buffers.get("weight_delta"), self._buffers.get("round_offset")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # buffers are sized at calibration; adopt the stored sizes when loading
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.calibrated)


class UniformQuantizer(Quantizer):
    """Uniform affine quantizer, per-tensor or per-channel.

    Args:
        bits: bit width (2..16).
        signed: signed integer grid, else unsigned.
        symmetric: zero-point fixed at the grid centre, else asymmetric.
        per_channel: one scale per slice along ``ch_axis``.
        ch_axis: channel axis of the tensors this quantizer sees.
        observer: name of the calibration observer (minmax, ema, percentile, omse).
        kind: ``"weight"`` or ``"activation"``; decides population-mode layout.
        bias_correction: weights only; match per-channel mean/std after rounding.

    ``set_group(g)`` (weights, per output channel) gives each row one scale and zero-point per
    ``g`` consecutive input columns (``evolq.quant.groups``): ``scale`` and ``zero_point`` are then
    (rows, columns / g) and the observer sees every group as a row of its own.
    """

    searchable = True

    def __init__(self, bits=8, signed=False, symmetric=False, per_channel=False, ch_axis=0,
                 observer="minmax", kind="activation", bias_correction=False):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        self.qmin, self.qmax = int_range(bits, signed, symmetric)
        self.bits, self.signed, self.symmetric = bits, signed, symmetric
        self.per_channel, self.ch_axis, self.kind = per_channel, ch_axis, kind
        self.observer_name = observer
        self.bias_correction = bias_correction
        self.observer = make_observer(observer, ch_axis if per_channel else None)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self._wcache = None
        self.group = None
        self._gshape = None

    def set_group(self, group: int | None) -> None:
        """Weights only (before calibration): one grid per ``group`` input columns of each output row
        (``evolq.quant.groups``); None: one per output channel."""
        if group is not None and (self.kind != "weight" or not self.per_channel or self.ch_axis != 0):
            raise ValueError("groups apply to per-output-channel weight quantizers (ch_axis 0)")
        self.group = group
        self._wcache = None

    def _observe(self, x: torch.Tensor) -> None:
        if self.group is not None:  # every group is a row of the observer's view
            v = group_view(x, self.group)
            self._gshape = tuple(v.shape[:2])
            x = v.reshape(-1, self.group)
        self.observer.update(x)

    def qparams_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero-point) shaped to broadcast against the tensor ``x`` this quantizer sees."""
        if self.group is not None:
            return (per_weight(self.scale, x.shape, self.group), per_weight(self.zero_point, x.shape, self.group))
        axis = self._axis(x.ndim)
        if axis is None:
            return self.scale.reshape(()), self.zero_point.reshape(())
        shape = [1] * x.ndim
        shape[axis] = -1
        z = self.zero_point.reshape(shape) if self.zero_point.numel() > 1 else self.zero_point.reshape(())
        return self.scale.reshape(shape), z

    def extra_repr(self):
        s = f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, "
        s += f"{'symmetric' if self.symmetric else 'asymmetric'}, "
        s += f"{'per-channel' if self.per_channel else 'per-tensor'}, observer={self.observer_name}"
        s += f", group={self.group}" if self.group is not None else ""
        return s + (", bias_correction" if self.bias_correction else "")

    # -- calibration ---------------------------------------------------------
    def finalize(self):
        if not self.observer.ready:
            return
        scale, zp = self.observer.compute(self.qmin, self.qmax, self.symmetric)
        dev = self.scale.device
        shape = self._gshape if self.group is not None else (-1,)
        self.scale = scale.reshape(shape).to(dev).clone()
        self.zero_point = zp.reshape(shape).to(dev).clone()
        self.calibrated.fill_(True)
        self._wcache = None

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Fix the qparams from ``x`` alone with a fresh observer (e.g. a weight that
        changed after calibration)."""
        self.observer = make_observer(self.observer_name, self.ch_axis if self.per_channel else None)
        self._observe(x)
        self.finalize()

    def set_bits(self, bits: int) -> None:
        """Change the bit width (before calibration: the integer range follows)."""
        self.qmin, self.qmax = int_range(bits, self.signed, self.symmetric)
        self.bits = bits
        self._wcache = None

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None):
        """Set scale (and zero-point) directly, marking the quantizer calibrated (grouped: (rows, ngroups))."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        self.scale = (scale.reshape(-1) if self.group is None else scale.reshape(scale.shape[0], -1)).clone()
        if zero_point is None:
            zero_point = torch.zeros_like(self.scale)
        self.zero_point = torch.as_tensor(zero_point, dtype=torch.float32).reshape(self.scale.shape).clone()
        self.calibrated.fill_(True)
        self._wcache = None

    def fit_statsq(self, w: torch.Tensor) -> None:
        """Weights only: set the StatsQ scale and zero-point of ``w`` (per channel on ``ch_axis``
        if per-channel): ``2 * mean|w| / 2^(b-1)`` and the half-step grid with 2^b levels, none at
        zero (``evolq.quant.range.statsq_qparams``). OFQ recomputes this at every training step;
        what is left in the buffers afterwards is an ordinary (searchable, saved) scale. Grouped: per group."""
        if self.group is not None:
            v = group_view(w, self.group)
            s, z = statsq_qparams(v.reshape(-1, self.group), self.qmin, self.qmax, 0)
            self.set_qparams(s.reshape(v.shape[:2]), z.reshape(v.shape[:2]))
            return
        self.set_qparams(*statsq_qparams(w, self.qmin, self.qmax, self.ch_axis if self.per_channel else None))

    def step_like(self, x: torch.Tensor) -> torch.Tensor:
        """The quantization step, shaped to broadcast against ``x`` (for ``straight_through``)."""
        return self.qparams_like(x)[0]

    # -- forward ---------------------------------------------------------------
    def _axis(self, ndim: int) -> int | None:
        return self.ch_axis % ndim if self.per_channel and self.scale.numel() > 1 else None

    # -- start-point state of a weight quantizer (evolq.qnn.reconstruct) ------------------
    def set_rounding(self, delta: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:
        """Weights only. ``delta``: added to the weight before quantizing (GPTQ's error
        compensation; the float layer keeps its weight). ``offset``: per-weight rounding
        decisions h in {0, 1}, quantizing as ``clamp(floor(w / s) + h + z, qmin, qmax)``
        instead of round-to-nearest (AdaRound), so each weight keeps its up/down decision
        at any scale. Both are buffers (saved, checkpointed); None removes one."""
        for name, t in (("weight_delta", delta), ("round_offset", offset)):
            if t is None:
                self._buffers.pop(name, None)
            else:
                self.register_buffer(name, t.detach().float().clone())
        self._wcache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight_delta", "round_offset"):  # present only after a gptq/brecq start
            if prefix + name in state_dict and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _offset_quant(self, w: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``(clamp(floor(w / s) + h, qmin - z, qmax - z)) * s``; ``scale`` broadcasts against ``w``
        (with a leading population dim when ``w`` has one more dim than ``h``)."""
        extra = w.ndim - h.ndim
        if self.group is not None:
            s = per_weight(scale, h.shape, self.group, pop=bool(extra))
            return self._offset_levels(w, s, per_weight(self.zero_point, h.shape, self.group), h)
        axis = self._axis(h.ndim)
        shape = [1] * h.ndim
        if axis is not None:
            shape[axis] = -1
        s = scale.reshape(scale.shape[0], *shape) if extra else scale.reshape(shape)
        z = self.zero_point.reshape(shape) if self.zero_point.numel() > 1 else self.zero_point.reshape(())
        return self._offset_levels(w, s, z, h)

    def _offset_levels(self, w, s, z, h):
        zi, f = split_zero_point(z)
        if f is None:
            q = torch.floor(w * torch.reciprocal(s)) + h
            return torch.clamp(q, self.qmin - z, self.qmax - z) * s
        q = torch.floor(w * torch.reciprocal(s) + f) + h  # a half-step (StatsQ) grid: its levels are (k + f) * s
        return (torch.clamp(q, self.qmin - zi, self.qmax - zi) - f) * s

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        x = w + self.weight_delta if "weight_delta" in self._buffers else w
        if "round_offset" in self._buffers:
            out = self._offset_quant(x, self.scale, self.round_offset)
        elif self.group is not None:
            out = fake_quant(x, *self.qparams_like(x), self.qmin, self.qmax)
        else:
            out = fake_quant_axis(x, self.scale, self.zero_point, self.qmin, self.qmax, self._axis(w.ndim))
        return bias_correct(out, x, self.ch_axis) if self.bias_correction else out

    def _pop_weight(self, w: torch.Tensor) -> torch.Tensor:
        """P quantized copies of ``w`` (P, *w.shape), copy p with ``pop_scale[p]``."""
        p = self.pop_scale.shape[0]
        if "weight_delta" in self._buffers:
            w = w + self.weight_delta
        axis = self._axis(w.ndim)
        if "round_offset" in self._buffers:
            out = self._offset_quant(w.unsqueeze(0), self.pop_scale.reshape(p, -1), self.round_offset)
        elif self.group is not None:  # one scale per (row, group) of each copy
            s = per_weight(self.pop_scale, w.shape, self.group, pop=True)
            out = fake_quant(w, s, per_weight(self.zero_point, w.shape, self.group), self.qmin, self.qmax)
        elif axis is None:  # per-tensor: one scale per copy
            out = fake_quant(w.reshape(1, -1), self.pop_scale.reshape(p, 1), self.zero_point, self.qmin, self.qmax)
        else:  # per-channel: channels of all copies on one axis
            wm = w.movedim(axis, 0)
            wp = wm.unsqueeze(0).expand(p, *wm.shape).reshape(p * wm.shape[0], *wm.shape[1:])
            zp = self.zero_point.reshape(1, -1).expand(p, -1).reshape(-1)
            out = fake_quant_axis(wp, self.pop_scale.reshape(-1), zp, self.qmin, self.qmax, 0)
            out = out.reshape(p, *wm.shape).movedim(1, axis + 1)
        out = out.reshape(p, *w.shape)
        return bias_correct(out, w, self.ch_axis) if self.bias_correction else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
            return x
        if not self.active:
            return x
        if self.pop_scale is not None:
            if self.kind == "weight":
                # P quantized weights: a population evaluated on several image chunks is quantized once
                return memo(self, "_pcache", (self.pop_scale, x, self.zero_point, *self._rounding()),
                            lambda: self._pop_weight(x))
            p = self.pop_scale.shape[0]
            if self._axis(x.ndim) is None:  # per-tensor: candidate p's samples share scale p
                xs = x.reshape(p, -1)
                return fake_quant(xs, self.pop_scale.reshape(p, 1), self.zero_point, self.qmin,
                                  self.qmax).reshape(x.shape)
            bshape = [1] * x.ndim
            bshape[self.ch_axis % x.ndim] = -1
            xs = x.reshape(p, -1, *x.shape[1:])
            s = self.pop_scale.reshape(p, *bshape)
            return fake_quant(xs, s, self.zero_point.reshape(bshape), self.qmin, self.qmax).reshape(x.shape)
        if self.kind == "weight":
            return memo(self, "_wcache", (self.scale, x, self.zero_point, *self._rounding()),
                        lambda: self._weight(x))
        return fake_quant_axis(x, self.scale, self.zero_point, self.qmin, self.qmax, self._axis(x.ndim))


class Log2Quantizer(Quantizer):
    """Log2 quantizer for values in [0, 1] (attention probabilities): x -> 2^-q,
    q = round(-log2 x) in [0, 2^bits - 1]; values below the last level become 0."""

    def __init__(self, bits=4):
        super().__init__()
        self.bits = bits
        int_range(bits, signed=False)  # validates bits
        self.calibrated.fill_(True)

    def extra_repr(self):
        return f"bits={self.bits}"

    def forward(self, x):
        if self.calibrating or not self.enabled:
            return x
        q = torch.round(-torch.log2(x.clamp_min(1e-30)))
        levels = 2**self.bits
        out = torch.pow(2.0, -q.clamp(0, levels - 1))
        return torch.where(q >= levels, torch.zeros_like(out), out)

