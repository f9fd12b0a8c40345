"""BRECQ / QDrop start point: block reconstruction with learned rounding.

Block after block, the quantized block (input: the quantized prefix's output) is
trained to reproduce the full-precision block's output (input: the float prefix's
output), minimising the per-sample squared error plus AdaRound's rounding regulariser:

* every weight ``w`` of the block's Linear/Conv layers gets a variable ``V``; the
  weight is quantized as ``clamp(floor(w / s) + h(V) + z, qmin, qmax)`` with
  ``h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)`` (rectified sigmoid), ``V`` starting
  where ``h(V)`` equals the fractional part (round-to-nearest's value);
* the regulariser ``sum(1 - |2h - 1|^beta)`` (weight ``reg_weight``) is off for the
  first ``warmup`` share of the steps, then ``beta`` anneals from 20 to 2, pushing
  every ``h`` to 0 or 1;
* per-tensor uniform activation quantizers inside the block learn their step
  (LSQ-style straight-through gradient) when ``act_lr > 0``;
* QDrop (``qdrop = p``): each element of every activation quantizer's output, and
  of the block input, takes its full-precision value with probability p.

At the end ``h = 1[V >= 0]`` is stored in the weight quantizer as ``round_offset``
(kept through any later change of scale). A ``weight_delta`` already in the quantizer
(``init="gptq"``: GPTQ ran on the block first) is kept: the variables then learn the
rounding of the compensated weights ``w + delta``. The block's output error on the
calibration set is measured before and after: a block whose loss became NaN/inf,
or whose error did not go down, keeps its start (round-to-nearest, or GPTQ's with
``init="gptq"``), and the record says so.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...quant import UniformQuantizer
from ...quant.quantizers import lsq_quant
from ...quant.range import split_zero_point
from .common import folded_weight

__all__ = ["rect_sigmoid", "brecq_block", "block_error", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


def rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with rect_sigmoid(V) == rest (AdaRound's initialisation)."""
    rest = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def block_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0xB2EC, int(index)]).generate_state(1)[0])


class _WeightRounding:
    """AdaRound variables of one weight quantizer, installed as a forward hook."""

    def __init__(self, q: UniformQuantizer, w: torch.Tensor):
        self.q = q
        s, z = q.qparams_like(w)  # per tensor, per output channel or per group of input columns
        self.s, self.z = s.detach().float(), z.detach().float()
        zi, f = split_zero_point(self.z)
        self.z, self.frac = (zi, f) if f is not None else (self.z, 0.0)  # half-step (StatsQ) grids: levels (k + f) * s
        x = w.detach().float() * torch.reciprocal(self.s) + self.frac
        self.floor = torch.floor(x)
        self.v = torch.nn.Parameter(_init_v(x - self.floor))
        self.hard = False
        self.handle = q.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        h = (self.v >= 0).float() if self.hard else rect_sigmoid(self.v)
        qv = torch.clamp(self.floor + h, mod.qmin - self.z, mod.qmax - self.z)
        return (qv - self.frac) * self.s

    def reg(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rect_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def offsets(self) -> torch.Tensor:
        return (self.v.detach() >= 0).float()

    def remove(self):
        self.handle.remove()


class _ActStep:
    """A learnable step for a per-tensor uniform activation quantizer (LSQ-style)."""

    def __init__(self, q: UniformQuantizer):
        self.q = q
        self.s = torch.nn.Parameter(q.scale.detach().reshape(()).float().clone())
        self.handle = q.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        return lsq_quant(mod, args[0], self.s)

    def remove(self):
        self.handle.remove()


class _Drop:
    """QDrop on one activation quantizer: each output element keeps its input with probability p."""

    def __init__(self, q, p: float, gen: torch.Generator):
        self.p, self.gen, self.on = p, gen, True
        self.handle = q.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        if not self.on:
            return out
        x = args[0]
        mask = torch.rand(x.shape, generator=self.gen, device=self.gen.device) < self.p
        return torch.where(mask.to(x.device), x, out)

    def remove(self):
        self.handle.remove()


def _sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared errors, averaged over the batch (BRECQ's reconstruction loss)."""
    return (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).sum(1).mean()


@torch.no_grad()
def block_error(run, x_q: torch.Tensor, y_fp: torch.Tensor, batch_size: int) -> float:
    """Mean per-sample squared error of ``run(x_q)`` against ``y_fp``."""
    tot, n = 0.0, 0
    for i in range(0, x_q.shape[0], batch_size):
        out = run(x_q[i:i + batch_size])
        tot += float((out.float() - y_fp[i:i + batch_size].float()).pow(2).reshape(out.shape[0], -1).sum())
        n += out.shape[0]
    return tot / max(n, 1)


def brecq_block(qmodel, index: int, x_q: torch.Tensor, x_fp: torch.Tensor, y_fp: torch.Tensor, opts, layers,
                progress: bool = False) -> dict:
    """Reconstruct block ``index``; installs the learned offsets (and activation steps)
    unless the block got worse or diverged. Returns the block's record."""
    block = qmodel.blocks[index]
    rec = {"block": block.name, "layers": [n for n, _ in layers]}
    eval_bs = max(opts.batch_size, 32)
    err_start = block_error(block.run, x_q, y_fp, eval_bs)
    rec["error_start"] = err_start
    dev = x_q.device
    gen = torch.Generator(device="cpu").manual_seed(block_seed(opts.seed, index))
    gen_dev = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(block_seed(opts.seed, index))
    params = [p for p in qmodel.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    act_qs = [q for q in block.quantizers.values() if getattr(q, "kind", None) != "weight" and q.active]
    rounding, steps, drops, deltas = [], [], [], []
    saved_scales = {id(q): q.scale.detach().clone() for q in act_qs if hasattr(q, "scale")}
    try:
        _install(layers, act_qs, opts, gen_dev, rounding, steps, drops, deltas)
        status = _reconstruct(block, x_q, x_fp, y_fp, opts, rounding, steps, gen, gen_dev, progress)
        for d in drops:
            d.on = False
        offsets = [r.offsets() for r in rounding]
        new_scales = {id(s.q): s.s.detach().reshape(1).clone() for s in steps}
    finally:
        for h in rounding + steps + drops:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    rec["status"] = status
    if status == "ok":
        for r, off, delta in zip(rounding, offsets, deltas):
            r.q.set_rounding(delta=delta, offset=off)
        for q in act_qs:
            if id(q) in new_scales:
                q.scale = new_scales[id(q)].to(q.scale)  # a new tensor: caches keyed on it refresh
        err_end = block_error(block.run, x_q, y_fp, eval_bs)
        rec["error_end"] = err_end
        if not (math.isfinite(err_end) and err_end <= err_start):
            rec["status"] = "reverted: the block's output error did not go down"
    if rec["status"] != "ok":  # keep the block's start (round-to-nearest, or gptq's)
        for r, delta in zip(rounding, deltas):
            r.q.set_rounding(delta=delta)
        for q in act_qs:
            if id(q) in saved_scales:
                q.scale = saved_scales[id(q)]
        rec["error_end"] = err_start
    return rec


def _install(layers, act_qs, opts, gen_dev, rounding, steps, drops, deltas) -> None:
    """The block's hooks, appended to the given lists (so that a failure part-way removes those
    already installed): AdaRound's variables on each layer's weight quantizer (on top of its
    ``weight_delta``, kept in ``deltas``), learned steps (``act_lr``) and QDrop (``qdrop``) on
    the activation quantizers ``act_qs``."""
    for _, layer in layers:
        wq = layer.weight_quant
        delta = wq._buffers.get("weight_delta")
        deltas.append(delta)
        wq.set_rounding(delta=delta)  # drops an earlier round_offset, keeps a gptq init
        w, _ = folded_weight(layer)
        rounding.append(_WeightRounding(wq, w if delta is None else w + delta))
    if opts.act_lr > 0:
        steps.extend(_ActStep(q) for q in act_qs if isinstance(q, UniformQuantizer) and q.scale.numel() == 1)
    if opts.qdrop > 0:
        drops.extend(_Drop(q, opts.qdrop, gen_dev) for q in act_qs)


def _reconstruct(block, x_q, x_fp, y_fp, opts, rounding, steps, gen, gen_dev, progress: bool) -> str:
    """``opts.iters`` Adam steps on random batches of the block's inputs (QDrop: each element
    of the input taken from the float prefix's output with probability ``qdrop``), minimising
    the output error plus the annealed rounding regulariser. Returns the status: ``"ok"`` or
    where the loss stopped being finite."""
    dev = x_q.device
    groups = [{"params": [r.v for r in rounding], "lr": opts.lr}]
    if steps:
        groups.append({"params": [s.s for s in steps], "lr": opts.act_lr})
    opt = torch.optim.Adam(groups)
    n = x_q.shape[0]
    bs = min(opts.batch_size, n)
    warm = int(opts.warmup * opts.iters)
    b0, b1 = opts.beta
    it = range(opts.iters)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(it, desc=f"brecq {block.name}", leave=False)
        it = bar
    status = "ok"
    with torch.enable_grad():
        for step in it:
            idx = torch.randperm(n, generator=gen)[:bs].to(dev)
            xb = x_q[idx]
            if opts.qdrop > 0:
                mask = torch.rand(xb.shape, generator=gen_dev, device=gen_dev.device) < opts.qdrop
                xb = torch.where(mask.to(dev), x_fp[idx], xb)
            out = block.run(xb)
            rec_loss = _sq_err(out, y_fp[idx])
            if step < warm:
                reg = torch.zeros((), device=dev)
            else:
                t = (step - warm) / max(1, opts.iters - warm)
                beta = b1 + 0.5 * (b0 - b1) * (1 + math.cos(t * math.pi))
                reg = opts.reg_weight * sum(r.reg(beta) for r in rounding)
            loss = rec_loss + reg
            if not math.isfinite(float(loss.detach())):
                status = f"non-finite loss at step {step}"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for s in steps:  # keep steps positive
                s.s.data.clamp_(min=1e-8)
            if bar is not None and step % 20 == 0:
                bar.set_postfix(rec=f"{float(rec_loss):.4g}")
    if bar is not None:
        bar.close()
    return status
