"""GPTQ start point (Frantar et al., 2023): one-shot weight rounding with
inverse-Hessian error compensation, layer by layer, on any ``QModel``.

For each quantized Linear/Conv, block after block, ``H = 2 X^T X / n`` is collected
from the inputs the layer sees in the already-quantized model (its input after its
input quantizer; divided by the input factors where they are folded into the weights,
so the folded weight ``W * factor`` is the one quantized). Columns are then quantized
in order (optionally by decreasing ``diag(H)``, "act-order"), each one's rounding
error spread over the columns not yet quantized. The grid is the layer's own weight
quantizer (per-channel asymmetric uint, symmetric int, per tensor, or per group of input
columns, ``evolq.quant.groups``).

Group-wise weights: without act-order, the grid of a group is taken when GPTQ reaches the
group's first column, from the weights as GPTQ has updated them by then (the quantizer's
observer on those columns; GPTQ's own ``static_groups=False``), and the quantizer keeps those
grids. With act-order (the default) the groups are *static*: their grids are the calibrated
ones, from the original weights' groups, fixed before the permuted pass (GPTQ's
``static_groups=True``), since a permuted pass reaches a group's columns in no particular order.

What is stored: the *compensated* weights, i.e. each column's value at the moment it
was rounded. Their round-to-nearest on the quantizer's grid is GPTQ's choice; they are
kept as ``weight_delta = compensated - W`` in the weight quantizer (the float layer
keeps its weight, so the float reference stays the original model), and a later scale
search re-rounds the compensated weights at its candidate scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import DataError
from ...quant.observers import make_observer
from ...quant.range import fake_quant, split_zero_point
from ..layers import QLinear
from .common import folded_weight

__all__ = ["gptq_quantize", "layer_rows", "collect_hessian", "gptq_layer", "gptq_block"]


class _Stop(Exception):
    """Raised by the Hessian hook once the layer's input is seen (the rest of the block is not needed)."""


def _conv_padding(layer):
    conv = layer.conv
    if type(layer).__name__ == "QConv2dSame":
        return "same-dynamic"
    if isinstance(conv.padding, str):
        return 0 if conv.padding == "valid" else None
    return conv.padding


def layer_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies, grouped: (rows, groups, columns)."""
    if getattr(layer, "input_scale", None) is not None:  # deploy regime: SmoothQuant's explicit input multiply
        x = x * layer.input_scale
    xq = layer.input_quant(x).float()
    if isinstance(layer, QLinear):
        f = layer._factor()
        if f is not None:
            xq = xq / f
        return xq.reshape(-1, 1, xq.shape[-1])
    conv = layer.conv
    pad = _conv_padding(layer)
    if tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and pad in (0, (0, 0), None, "same-dynamic"):
        # a pointwise convolution multiplies each pixel's channels: the rows are the pixels, in
        # unfold's order, without the im2col copy (most of a MobileNet/EfficientNet's layers)
        n, c = xq.shape[:2]
        g = conv.groups
        return xq.reshape(n, g, c // g, -1).permute(0, 3, 1, 2).reshape(-1, g, c // g)
    if pad == "same-dynamic":
        from timm.layers import pad_same

        xq, pad = pad_same(xq, conv.weight.shape[-2:], conv.stride, conv.dilation), 0
    cols = F.unfold(xq, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    n, _, length = cols.shape
    g = conv.groups
    return cols.reshape(n, g, -1, length).permute(0, 3, 1, 2).reshape(n * length, g, -1)


@torch.no_grad()
def collect_hessian(run, layer, inputs: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """``H = 2 X^T X / n`` per group (groups, d, d), float64, from ``layer``'s inputs while
    ``run`` (a block) processes ``inputs``; returns (H, n rows)."""
    acc = {"H": None, "n": 0}

    def hook(mod, args):
        x = args[0]
        for i in range(0, x.shape[0], 4):  # a few images at a time: unfolded convs are large
            r = layer_rows(mod, x[i:i + 4])
            h = torch.einsum("ngd,nge->gde", r, r).double()
            acc["H"] = h if acc["H"] is None else acc["H"] + h
            acc["n"] += r.shape[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for i in range(0, inputs.shape[0], batch_size):
            try:
                run(inputs[i:i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    if acc["H"] is None:
        raise DataError("a quantized layer was never reached while collecting GPTQ Hessians")
    return 2.0 * acc["H"] / max(acc["n"], 1), acc["n"]


def _quant(w, inv_s, s, zp, qmin, qmax, frac=None):
    # the same arithmetic as ``fake_quant`` (x * (1/s), round, clamp, * s): bit-identical to the quantizer;
    # ``frac``: the fractional part of a half-step (StatsQ) zero-point, ``zp`` then its integer part
    q = torch.mul(w, inv_s)
    if frac is not None:
        q.add_(frac).round_()
        return torch.maximum(torch.minimum(q, qmax - zp), qmin - zp).sub_(frac).mul_(s)
    q.round_()
    q = torch.maximum(torch.minimum(q, qmax - zp), qmin - zp)
    return q.mul_(s)


def _inverse_factor(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` per group, with ``H`` dampened by ``damp`` (then up to
    1e4 x ``damp``) times its mean diagonal until both factorisations succeed."""
    d = h.shape[-1]
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=1, dim2=2).mean(1)
    u = None
    for attempt in range(5):
        hd = h + (damp * 10 ** attempt * mean_diag)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if bool((info == 0).all()):
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if bool((info == 0).all()) and bool(torch.isfinite(u).all()):
                break
            u = None
    if u is None:
        raise DataError(f"the GPTQ Hessian of {name or 'a layer'} is not positive definite even with dampening "
                        f"{damp * 1e4:g} x its mean diagonal: the calibration activations are degenerate")
    return u


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, damp: float = 0.01, act_order: bool = True, block_size: int = 128, name: str = "",
                  group: int | None = None, regrid=None):
    """GPTQ on grouped weights (conv groups: independent problems).

    Args:
        w: (groups, rows, d) float weights (rows: output channels of a group).
        h: (groups, d, d) Hessians.
        scale, zero_point: (groups, rows) per-row grid, or with ``group`` (groups, rows, d / group):
            one grid per ``group`` consecutive columns.
        regrid: with ``group`` and without act-order, ``f(columns (groups, rows, group)) -> (scale,
            zero_point)`` each (groups, rows): a group's grid from its columns as GPTQ has updated them
            when it reaches the group's first column. None: the given (static) grids.
    Returns:
        (quantized, compensated), both (groups, rows, d): ``quantized`` is the dequantized
        choice; ``compensated`` each column's value when it was rounded; with ``regrid`` also the
        grids used, (scale, zero_point) each (groups, rows, d / group).
    Raises:
        DataError: a Hessian that is not finite, or not positive definite even after
        dampening with up to 1e4 times ``damp``.
    """
    g, r, d = w.shape
    if not bool(torch.isfinite(h).all()):
        raise DataError(f"the GPTQ Hessian of {name or 'a layer'} is not finite: the calibration activations hold "
                        f"NaN or inf")
    w = w.detach().float().clone()
    h = h.clone()
    diag = h.diagonal(dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # inputs that are always zero: any weight there is as good
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True)
        w = w.gather(2, perm[:, None, :].expand(g, r, d))
        h = h.gather(1, perm[:, :, None].expand(g, d, d)).gather(2, perm[:, None, :].expand(g, d, d))
    u = _inverse_factor(h, damp, name)
    u = u.float()
    if group is not None:
        return _gptq_groups(w, u, scale, zero_point, qmin, qmax, block_size, group, perm, regrid)
    s = scale.reshape(g, r).float()
    zp = zero_point.reshape(g, r).float() if zero_point.numel() > 1 else zero_point.float().reshape(()).expand(g, r)
    inv_s = torch.reciprocal(s)
    zp, frac = split_zero_point(zp)
    quantized, comp = torch.zeros_like(w), torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i].clone()
            q = _quant(col, inv_s, s, zp, qmin, qmax, frac)
            comp[:, :, i1 + i], quantized[:, :, i1 + i] = col, q
            err = (col - q) / u1[:, i, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * u1[:, i, i:][:, None, :]
            err1[:, :, i] = err
        if i2 < d:
            w[:, :, i2:] -= torch.bmm(err1, u[:, i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm, dim=1)[:, None, :].expand(g, r, d)
        quantized, comp = quantized.gather(2, inv), comp.gather(2, inv)
    return quantized, comp


def _gptq_groups(w, u, scale, zero_point, qmin, qmax, block_size, group, perm, regrid):
    """``gptq_quantize``'s column loop with one grid per ``group`` columns (see there); ``w`` and ``u``
    already permuted by ``perm`` (act-order; then the grids are static)."""
    g, r, d = w.shape
    ng = d // group

    def columns(t):  # (g, r, ng) -> (g, r, d): each group's value at its columns, in the pass's order
        t = t.reshape(g, r, ng).float().repeat_interleave(group, dim=2)
        return t if perm is None else t.gather(2, perm[:, None, :].expand(g, r, d))

    s, zp = columns(scale), columns(zero_point.expand_as(scale) if zero_point.numel() == 1 else zero_point)
    grids = (scale.reshape(g, r, ng).float().clone(), zp.new_zeros(g, r, ng)) if regrid is not None else None
    if grids is not None:
        grids[1].copy_(zero_point.reshape(g, r, ng) if zero_point.numel() > 1 else zero_point.reshape(()))
    quantized, comp = torch.zeros_like(w), torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if regrid is not None and j % group == 0:  # this group's grid, from its columns as updated so far
                cur = w1[:, :, i:i + group]
                if cur.shape[2] < group:  # the group runs past this lazy batch: add the batch's pending updates
                    k = group - cur.shape[2]
                    tail = w[:, :, i2:i2 + k] - torch.bmm(err1[:, :, :i], u[:, i1:j, i2:i2 + k])
                    cur = torch.cat([cur, tail], dim=2)
                sg, zg = regrid(cur)
                grids[0][:, :, j // group], grids[1][:, :, j // group] = sg, zg
                s[:, :, j:j + group], zp[:, :, j:j + group] = sg[:, :, None], zg[:, :, None]
            zi, frac = split_zero_point(zp[:, :, j])
            col = w1[:, :, i].clone()
            q = _quant(col, torch.reciprocal(s[:, :, j]), s[:, :, j], zi, qmin, qmax, frac)
            comp[:, :, j], quantized[:, :, j] = col, q
            err = (col - q) / u1[:, i, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * u1[:, i, i:][:, None, :]
            err1[:, :, i] = err
        if i2 < d:
            w[:, :, i2:] -= torch.bmm(err1, u[:, i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm, dim=1)[:, None, :].expand(g, r, d)
        quantized, comp = quantized.gather(2, inv), comp.gather(2, inv)
    return (quantized, comp) if grids is None else (quantized, comp, *grids)


def _group_grid(q, cols: torch.Tensor):
    """The grid ``q``'s observer gives each row of ``cols`` (g, r, group): (scale, zero_point) (g, r)."""
    obs = make_observer(q.observer_name, 0)
    obs.update(cols.reshape(-1, cols.shape[-1]))
    sc, zp = obs.compute(q.qmin, q.qmax, q.symmetric)
    return sc.reshape(cols.shape[:2]).to(cols), zp.reshape(cols.shape[:2]).to(cols)


def _grouped(layer, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (groups, rows, d)."""
    g = 1 if isinstance(layer, QLinear) else layer.conv.groups
    return t.reshape(g, t.shape[0] // g, -1)


@torch.no_grad()
def gptq_layer(layer, h: torch.Tensor, rows: int, opts, name: str = "") -> dict:
    """Quantize one layer with GPTQ given its Hessian; installs ``weight_delta`` in its
    weight quantizer. Returns a record (layer-output error vs round-to-nearest)."""
    q = layer.weight_quant
    q.set_rounding()  # start from plain round-to-nearest
    wf, _ = folded_weight(layer)
    wf = wf.detach().float()
    wg = _grouped(layer, wf)
    g, r, d = wg.shape
    rec = {"layer": name, "columns": d, "rows": rows}
    if rows < d:
        rec.update(method="rtn", reason=f"{rows} input rows for {d} columns: too few for a Hessian (give more "
                                        f"calibration images)")
        return rec
    group, grids = getattr(q, "group", None), None
    if group is not None:  # one grid per group of columns: static with act-order, else taken as GPTQ goes
        regrid = None if opts.act_order else (lambda cols: _group_grid(q, cols))
        out = gptq_quantize(wg, h.to(wg.device), q.scale.reshape(g, r, -1).float(), q.zero_point.reshape(g, r, -1)
                            .float(), q.qmin, q.qmax, opts.damp, opts.act_order, opts.block_size, name, group, regrid)
        quantized, comp, grids = out[0], out[1], out[2:] or None
        rtn = fake_quant(wf, *q.qparams_like(wf), q.qmin, q.qmax).reshape(wg.shape)
    else:
        scale = q.scale.reshape(-1).float()
        zp = q.zero_point.reshape(-1).float()
        if scale.numel() == 1:
            scale = scale.expand(wf.shape[0])
        if zp.numel() == 1:
            zp = zp.expand(wf.shape[0])
        quantized, comp = gptq_quantize(wg, h.to(wg.device), scale.reshape(g, r), zp.reshape(g, r), q.qmin, q.qmax,
                                        opts.damp, opts.act_order, opts.block_size, name)
        rtn = fake_quant(wg, scale.reshape(g, r, 1), zp.reshape(g, r, 1), q.qmin, q.qmax)
    hh = h.to(wg.device)

    def out_err(wq):  # sum over groups of tr((W - Q) H (W - Q)^T): the layer-output error on the calibration rows
        e = (wg - wq).double()
        return float(torch.einsum("grd,gde,gre->", e, hh, e))

    e_gptq, e_rtn = out_err(quantized), out_err(rtn)
    rec.update(output_error_gptq=e_gptq, output_error_rtn=e_rtn)
    if not e_gptq <= e_rtn:
        rec.update(method="rtn", reason="GPTQ's layer-output error was not below round-to-nearest's")
        return rec
    quantized = quantized.reshape(wf.shape)
    delta = comp.reshape(wf.shape) - wf
    if grids is not None:  # the grids GPTQ took as it went are the quantizer's from now on
        q.set_qparams(grids[0].reshape(wf.shape[0], -1), grids[1].reshape(wf.shape[0], -1))
    # the stored compensated weights must round back to GPTQ's choice (float re-association aside)
    if group is not None:
        got = fake_quant(wf + delta, *q.qparams_like(wf), q.qmin, q.qmax)
    else:
        got = fake_quant(wf + delta, scale.reshape(-1, *[1] * (wf.ndim - 1)), zp.reshape(-1, *[1] * (wf.ndim - 1)),
                         q.qmin, q.qmax)
    bad = got != quantized
    if bool(bad.any()):
        delta[bad] = (quantized - wf)[bad]
    q.set_rounding(delta=delta)
    rec["method"] = "gptq"
    return rec


@torch.no_grad()
def gptq_block(qmodel, index: int, x_in: torch.Tensor, opts, layers) -> list[dict]:
    """GPTQ every layer of block ``index`` in module order, each with the Hessian of its
    inputs given the layers before it already quantized."""
    block = qmodel.blocks[index]
    recs = []
    for name, layer in layers:
        h, rows = collect_hessian(block.run, layer, x_in, opts.batch_size)
        recs.append(gptq_layer(layer, h, rows, opts, name))
    return recs
