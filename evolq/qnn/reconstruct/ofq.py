"""OFQ start point (Liu et al., "Oscillation-free Quantization for Low-bit Vision
Transformers", ICML 2023), cut to a CPU budget: a short end-to-end fine-tune of the
quantized weights by distillation to the float model's logits on the fitness images.

What is trained is a change ``D`` of every quantized Linear/Conv weight, in the space its
weight quantizer sees (``W`` or, with folded input factors, ``W * factor``), starting from
GPTQ's compensation (``init="gptq"``) or zero (``init="rtn"``). The float layers keep their
weights, so the float model (quantizers off) stays the original one: the teacher here, and
the reference of the Evol-Q search, the hold-out and the evaluation afterwards. Gradients
pass every fake quantizer straight through (``evolq.quant.quantizers.straight_through``:
1 inside the quantizer's range, 0 where it clips); activation scales stay calibrated.

OFQ's parts as switches (``OFQOptions``):

* ``statsq``: every step, each weight row's scale is recomputed from the current weights,
  ``2 * mean|w| / 2^(b-1)`` on a grid of 2^b levels with none at zero (a half-step zero-point,
  ``UniformQuantizer.fit_statsq``); GPTQ's init then runs on that grid too.
* ``cga``: for the last ``cga_epochs`` epochs (not the first), weights whose latent value is farther than
  ``cga_br`` steps from a rounding threshold are frozen (no gradient, restored after every
  step); only the near-threshold, oscillating ones keep training.
* ``qkr``: OFQ's query-key reparameterization (``evolq.qnn.qkr``; the adapter built the form
  from the config: timm ViT/DeiT without q/k norms, by default wherever it can). At the start
  of a fresh run every attention that has the form switches to it: W_qk = W_q,h^T W_k,h per
  head from the float q/k weights (with ``qkr_bias="exact"`` the q bias's term as its bias; OFQ's
  ``"drop"`` drops the q/k biases), its weight quantizer and the quantizer of ``u = x W_qk``
  calibrated on the fitness images (float tensors, as calibration does). W_qk's layer is a
  ``QLinear``, so the GPTQ init, the trained change ``D`` (its ``weight_delta``; the float W_qk
  stays the product of the float weights), StatsQ and CGA treat it as any other layer. The report's ``qkr`` records the
  fitness KL of the initialised weights in the original q/k form and in the QKR form, of the
  QKR form in float (what dropping the biases costs; about 0 with the exact bias), and after
  the fine-tune; ``qkr_used`` whether the form was used.

At the end ``D`` becomes the quantizer's ``weight_delta`` (as GPTQ's compensation) and the
last scale its ``scale``: fixed integers on a fixed scale, which the search then moves like
any start's (the trained weights are re-rounded at each candidate scale). The frozen model
computes exactly what the last training forward computed.

A checkpoint (``StartCheckpoint``, with ``D``, AdamW's moments and CGA's masks as extra
tensors) is written after every epoch; the image order and flips of epoch e come from their
own seed, so a resumed run ends with the same weights as an uninterrupted one. A NaN or inf
loss stops the run, keeps the last good epoch's weights and says so in the report.

The fine-tune fires the hooks of ``evolq.hooks.StartHooks`` (epoch start and end, CGA's masks,
the end of training) for subscribers given to ``prepare_model``: progress, logging, and the
tests' interruptions and observations.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, DataError
from ...quant.quantizers import lsq_quant, straight_through
from ...quant.range import split_zero_point
from ..qkr import qkr_float_form, qkr_modules, switch_qkr
from .common import GPTQOptions, StartCheckpoint, block_layers, folded_weight

__all__ = ["run_ofq", "epoch_seed", "logits_kl", "statsq_layers"]


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0x0F0, int(epoch)]).generate_state(1)[0])


def logits_kl(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(ref) || softmax(out)) (as ``evolq.losses.kl``)."""
    lo = torch.log_softmax(out.double(), dim=-1)
    lr = torch.log_softmax(ref.double(), dim=-1)
    return (lr.exp() * (lr - lo)).sum(dim=-1).mean()


@torch.no_grad()
def _logits(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


def _float_logits(qmodel, x, batch_size):
    qmodel.set_quant_enabled(False)
    try:
        return _logits(qmodel.model, x, batch_size)
    finally:
        qmodel.set_quant_enabled(True)


class _Training:
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


def _cga_masks(layers, deltas, br: float, statsq: list[bool]) -> list[torch.Tensor]:
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
    from ...quant.quantizers import UniformQuantizer

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
def _fit_statsq(layers, statsq: list[bool], deltas=None) -> None:
    for j, ((_, layer), sq) in enumerate(zip(layers, statsq)):
        if sq:
            w = folded_weight(layer)[0]
            layer.weight_quant.fit_statsq(w if deltas is None else w + deltas[j])


def _run_gptq_init(qmodel, x, opts, statsq: list[bool], layers) -> list[dict]:
    """GPTQ over every block (no checkpoint: it is redone on a resume that has no epoch yet);
    with StatsQ, on the StatsQ grid of the float weights."""
    from . import _run_blocks  # the block loop of the gptq start (imported here: that package imports this one)

    _fit_statsq(layers, statsq)
    state = {"next": 0, "blocks": [], "seconds": 0.0}
    todo = [i for i, b in enumerate(qmodel.blocks) if block_layers(qmodel, b)]

    class _NoSave:
        def save(self, state):
            pass

    _run_blocks(qmodel, x, "gptq", GPTQOptions(device=opts.device), todo, state, _NoSave(), time.perf_counter(),
                False)
    return state["blocks"]


def run_ofq(qmodel, x: torch.Tensor, quant, opts, holdout: torch.Tensor | None = None, progress: bool = False,
            checkpoint_dir=None, resume: bool = False, hooks=None) -> dict:
    """The OFQ fine-tune of a calibrated ``qmodel`` on the fitness images ``x``; ``holdout``
    (images that never reach calibration or training) is scored before, after and at every
    epoch; ``hooks``: an ``evolq.hooks.StartHooks`` to fire. Returns the start report
    (``qmodel.start_report``)."""
    from ...data import resolve_device

    n, bs = x.shape[0], opts.batch_size
    if n < bs:
        raise DataError(f"the ofq start's batch is {bs} images but the fitness set has {n}: give more calibration "
                        f"data or lower start_options['batch_size']")
    dev = resolve_device(opts.device)
    home = x.device
    t0 = time.perf_counter()
    layers = [(name, layer) for b in qmodel.blocks for name, layer in block_layers(qmodel, b)]
    if not layers:
        raise DataError("the ofq start found no quantized Linear/Conv layer to fine-tune")
    run_id = StartCheckpoint.run_id_of(qmodel, quant, x)
    model = qmodel.model
    if opts.qkr is True and not qkr_modules(model):
        raise ConfigError(f"ofq qkr (query-key reparameterization): this {qmodel.family} model was wrapped without "
                          f"its QKR form; build it with prepare_model and a QuantConfig whose start_options have "
                          f"qkr=true")
    qkr = bool(qkr_modules(model))  # qkr=true (checked above) or "auto" where the adapter built the form
    flip = opts.augment in ("flip", "mix") and x.ndim == 4  # images: "mix" flips too
    hold = holdout if holdout is not None and holdout.shape[0] else None
    sq = statsq_layers(layers, quant, opts.statsq)
    with StartCheckpoint(qmodel, checkpoint_dir, run_id, resume) as ckpt:
        state = ckpt.restore()
        model.to(dev)
        try:
            x = x.to(dev)
            hold = hold.to(dev) if hold is not None else None
            eval_bs = max(bs, 32)
            if qkr:  # fresh: W_qk and its quantizers from the fitness images; resumed: restored already
                switch_qkr(qmodel, x if state is None else None, eval_bs, opts.qkr_bias)
            if state is None:
                init_blocks = _run_gptq_init(qmodel, x, opts, sq, layers) if opts.init == "gptq" else []
                state = {"epoch": 0, "history": [], "init_blocks": init_blocks, "seconds": 0.0, "status": "ok"}
                if opts.init == "rtn":
                    _fit_statsq(layers, sq)
                if qkr:
                    state["qkr"] = _qkr_costs(qmodel, x, eval_bs)
                if hold is not None:
                    state["holdout_kl_before"] = float(logits_kl(_logits(model, hold, eval_bs),
                                                                 _float_logits(qmodel, hold, eval_bs)))
                else:
                    state["fitness_kl_before"] = float(logits_kl(_logits(model, x, eval_bs),
                                                                 _float_logits(qmodel, x, eval_bs)))
            t0 -= state["seconds"]
            _train(qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, t0, progress and opts.progress,
                   hooks)
        finally:
            model.to(home)
    return _report(qmodel, x, hold, opts, state, flip, t0)


@torch.no_grad()
def _qkr_costs(qmodel, x, eval_bs) -> dict:
    """What the switch to QKR costs on the fitness images, with the initialised weights: the KL
    to the float logits in the original q/k form (``before_switch``) and in the QKR form
    (``after_switch``); ``float_kl``: the QKR form with quantization off (the dropped biases alone)."""
    model = qmodel.model
    mods = [m for _, m in qkr_modules(model)]
    ref = _float_logits(qmodel, x, eval_bs)
    qmodel.set_quant_enabled(False)
    try:
        with qkr_float_form(model):
            float_kl = float(logits_kl(_logits(model, x, eval_bs), ref))
    finally:
        qmodel.set_quant_enabled(True)
    for m in mods:
        m.set_on(False)
    try:
        before = float(logits_kl(_logits(model, x, eval_bs), ref))
    finally:
        for m in mods:
            m.set_on(True)
    after = float(logits_kl(_logits(model, x, eval_bs), ref))
    return {"attentions": len(mods), "float_kl": float_kl,
            "fitness_kl": {"before_switch": before, "after_switch": after}}


def mix_views(xb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """DeiT-style views of an image batch (``augment="mix"``): one random resized crop for the
    batch (35-100% of the area, aspect 3/4-4/3, resized back bilinearly), a random horizontal flip
    per image, then with even odds mixup (Beta(0.8, 0.8)) or cutmix (Beta(1, 1)) with a permuted
    partner image. All draws come from ``rng``."""
    b, _, h, w = xb.shape
    area, ratio = rng.uniform(0.35, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = min(h, max(1, round(math.sqrt(area / ratio) * h)))
    cw = min(w, max(1, round(math.sqrt(area * ratio) * w)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = xb[..., top:top + ch, left:left + cw]
    if (ch, cw) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    flips = torch.from_numpy(rng.random(b) < 0.5).to(xb.device)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    partner = torch.from_numpy(rng.permutation(b)).to(xb.device)
    if rng.random() < 0.5:
        lam = float(rng.beta(0.8, 0.8))
        return lam * out + (1 - lam) * out[partner]
    cut = math.sqrt(1 - float(rng.beta(1.0, 1.0)))
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
    mixed = out.clone()
    mixed[..., y0:y1, x0:x1] = out[partner][..., y0:y1, x0:x1]
    return mixed


def _run_blocks_out(qmodel, xb: torch.Tensor) -> list:
    """Every block's output, running the blocks one after another (the last is the logits)."""
    outs, h = [], xb
    for b in qmodel.blocks:
        h = b.run(h)
        outs.append(h)
    return outs


def block_term(student: list, teacher: list) -> torch.Tensor:
    """Mean over blocks of the squared error of each block output to the float model's,
    normalised per channel by the float output's variance over the batch and positions (the
    channel axis: 1 for NCHW maps, the last one otherwise); outputs that are not tensors of one
    shape are skipped."""
    terms = []
    for s, t in zip(student, teacher):
        if not (torch.is_tensor(s) and torch.is_tensor(t) and s.ndim >= 2 and s.shape == t.shape):
            continue
        ax = 1 if s.ndim == 4 else s.ndim - 1
        dims = [d for d in range(s.ndim) if d != ax]
        var = t.float().var(dim=dims, keepdim=True) + 1e-6
        terms.append(((s.float() - t.float()) ** 2 / var).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _fire(hooks, name: str, *args) -> None:
    """Fire ``hooks.<name>`` (``evolq.hooks.StartHooks``) where the caller gave hooks."""
    if hooks is not None:
        getattr(hooks, name)(*args)


def _train(qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, t0, progress, hooks) -> None:
    model = qmodel.model
    n, bs = x.shape[0], opts.batch_size
    steps = n // bs  # whole batches only: every step sees bs images
    total = steps * opts.epochs
    cga_from = max(1, opts.epochs - opts.cga_epochs) if opts.cga else opts.epochs  # never the first epoch
    mix = opts.augment == "mix" and x.ndim == 4
    blockwise = opts.block_weight > 0
    online = mix or blockwise  # the teacher runs on every step's images
    teacher = None if online else _float_logits(qmodel, x, eval_bs)
    teacher_flip = _float_logits(qmodel, x.flip(-1), eval_bs) if flip and not online else None
    hold_ref = _float_logits(qmodel, hold, eval_bs) if hold is not None else None
    acts = act_scale_quantizers(qmodel, layers) if opts.act_lr > 0 else []
    with _Training(qmodel, layers, sq, acts) as tr:
        deltas, log_scales = tr.deltas, tr.log_scales
        start_log = [ls.detach().clone() for ls in log_scales]
        named = [(name, d) for (name, _), d in zip(layers, deltas)]
        named += [(f"act/{name}", ls) for (name, _), ls in zip(acts, log_scales)]
        extra = ckpt.extra
        if state["epoch"] > 0:  # resumed: the changes (and scales), AdamW's moments and CGA's masks of the last epoch
            with torch.no_grad():
                for name, d in named:
                    d.copy_(extra[f"D/{name}"].to(d))
        groups = [{"params": deltas, "lr": opts.lr, "base_lr": opts.lr, "weight_decay": opts.weight_decay}]
        if log_scales:
            groups.append({"params": log_scales, "lr": opts.act_lr, "base_lr": opts.act_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        masks = anchors = None
        if state["epoch"] > 0:
            for name, d in named:
                if f"m/{name}" in extra:
                    opt.state[d] = {"step": extra[f"step/{name}"].clone(), "exp_avg": extra[f"m/{name}"].to(d),
                                    "exp_avg_sq": extra[f"v/{name}"].to(d)}
            if f"mask/{layers[0][0]}" in extra:
                masks = [extra[f"mask/{name}"].to(d.device).bool() for (name, _), d in zip(layers, deltas)]
                anchors = [extra[f"anchor/{name}"].to(d) for (name, _), d in zip(layers, deltas)]
        params = deltas + log_scales
        good = [d.detach().clone() for d in params]  # the last good epoch's changes (NaN fallback)
        choose = opts.keep == "holdout" and hold is not None
        best = None  # (hold-out KL, epoch, the changes): keep="holdout"
        if choose:
            if state["epoch"] > 0 and "best_epoch" in state:
                best = (state["best_holdout_kl"], state["best_epoch"],
                        [extra[f"B/{name}"].to(d) for name, d in named])
            elif state["epoch"] == 0 and state.get("holdout_kl_before") is not None:
                best = (state["holdout_kl_before"], 0, [d.detach().clone() for d in params])
        bar = None
        if progress and state["epoch"] < opts.epochs:
            from tqdm.auto import tqdm

            bar = tqdm(total=(opts.epochs - state["epoch"]) * steps, desc="ofq fine-tune", leave=False)
        for epoch in range(state["epoch"], opts.epochs):
            _fire(hooks, "epoch_start_hook", {"epoch": epoch + 1, "epochs": opts.epochs})
            if opts.cga and epoch == cga_from and masks is None:
                masks = _cga_masks(layers, deltas, opts.cga_br, sq)
                anchors = [d.detach().clone() for d in deltas]
                _fire(hooks, "cga_start_hook", {"epoch": epoch + 1, "layers": [name for name, _ in layers],
                                                "deltas": anchors, "masks": masks})
            gen = torch.Generator().manual_seed(epoch_seed(opts.seed, epoch))
            perm = torch.randperm(n, generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
            rng = np.random.default_rng(epoch_seed(opts.seed, 1000 + epoch)) if mix else None
            t_e = time.perf_counter()
            losses, kls, bad = [], [], None
            for i in range(steps):
                g = epoch * steps + i
                factor = 0.5 * (1 + math.cos(math.pi * g / total)) if opts.schedule == "cosine" else 1.0
                lr = opts.lr * factor
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
                idx = perm[i * bs:(i + 1) * bs].to(x.device)
                xb = x[idx]
                if mix:
                    xb = mix_views(xb, rng)
                elif flip:
                    fb = flips[i * bs:(i + 1) * bs].to(x.device)
                    xb = torch.where(fb[:, None, None, None], xb.flip(-1), xb)
                t_outs = None
                if online:
                    qmodel.set_quant_enabled(False)
                    try:
                        with torch.no_grad():
                            t_outs = _run_blocks_out(qmodel, xb) if blockwise else [model(xb)]
                    finally:
                        qmodel.set_quant_enabled(True)
                    tb = t_outs[-1].float()
                else:
                    tb = teacher[idx]
                    if flip:
                        tb = torch.where(fb[:, None], teacher_flip[idx], tb)
                with torch.enable_grad():
                    if blockwise:
                        s_outs = _run_blocks_out(qmodel, xb)
                        kl = logits_kl(s_outs[-1], tb)
                        loss = kl + opts.block_weight * block_term(s_outs[:-1], t_outs[:-1])
                    else:
                        loss = kl = logits_kl(model(xb), tb)
                    lv = float(loss.detach())
                    if not math.isfinite(lv):
                        bad = f"non-finite loss at epoch {epoch + 1}, step {i + 1}"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                if masks is not None:
                    for d, m in zip(deltas, masks):
                        if d.grad is not None:
                            d.grad[m] = 0.0
                opt.step()
                with torch.no_grad():
                    if masks is not None:
                        for d, m, a in zip(deltas, masks, anchors):
                            d[m] = a[m]
                    if not all(bool(torch.isfinite(d).all()) for d in params):
                        bad = f"non-finite weights after epoch {epoch + 1}, step {i + 1}"
                        break
                losses.append(lv)
                kls.append(float(kl.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{lv:.4f}")
            if bad is not None:
                with torch.no_grad():
                    for d, gd in zip(params, good):
                        d.copy_(gd)
                kept = f"epoch {epoch}" if epoch else f"the {opts.init} init"
                state["status"] = f"stopped: {bad}; kept the weights of {kept}"
                break
            rec = {"epoch": epoch + 1, "train_kl": float(np.mean(kls)), "lr_end": lr,
                   "seconds": round(time.perf_counter() - t_e, 2)}
            if blockwise:
                rec["train_loss"] = float(np.mean(losses))
            if masks is not None:
                rec["cga_trained_share"] = float(sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks))
            if hold is not None:
                rec["holdout_kl"] = float(logits_kl(_logits(model, hold, eval_bs), hold_ref))
                if choose and (best is None or rec["holdout_kl"] < best[0]):
                    best = (rec["holdout_kl"], epoch + 1, [d.detach().clone() for d in params])
            state["history"].append(rec)
            state["epoch"] = epoch + 1
            state["seconds"] = time.perf_counter() - t0
            good = [d.detach().clone() for d in params]
            extra_t = _extra(named, opt, masks, anchors)
            if best is not None:
                state["best_epoch"], state["best_holdout_kl"] = best[1], best[0]
                extra_t.update({f"B/{name}": b for (name, _), b in zip(named, best[2])})
            ckpt.save(state, extra_t)
            _fire(hooks, "epoch_end_hook", rec)
        if bar is not None:
            bar.close()
        if best is not None and best[1] != state["epoch"]:  # keep="holdout": the best epoch's weights
            with torch.no_grad():
                for d, b in zip(params, best[2]):
                    d.copy_(b)
        if best is not None:
            state["kept_epoch"] = best[1]
        _fire(hooks, "train_end_hook", qmodel)
        final = [d.detach().clone() for d in deltas]
        final_log = [ls.detach().clone() for ls in log_scales]
    # freeze: the change becomes the quantizer's weight_delta, the last StatsQ scale its scale, and
    # trained activation scales their quantizers' scales
    with torch.no_grad():
        for (_, layer), d in zip(layers, final):
            layer.weight_quant.set_rounding(delta=d)
        for (_, q), ls in zip(acts, final_log):
            q.scale.copy_(ls.exp().to(q.scale))
    _fit_statsq(layers, sq, [layer.weight_quant.weight_delta for _, layer in layers])
    if acts:
        change = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(final_log, start_log)])
        state["act_scales"] = {"trained": len(acts), "mean_abs_log_change": float(change.mean()),
                               "max_abs_log_change": float(change.max())}


def _extra(named, opt, masks, anchors) -> dict:
    """The checkpoint's extra tensors: each trained tensor (weight changes, then activation
    log-scales), its AdamW moments and, in the CGA phase, the weights' masks and anchors."""
    out = {}
    for j, (name, d) in enumerate(named):
        out[f"D/{name}"] = d.detach()
        st = opt.state.get(d)
        if st:
            out[f"m/{name}"], out[f"v/{name}"] = st["exp_avg"], st["exp_avg_sq"]
            out[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
        if masks is not None and j < len(masks):
            out[f"mask/{name}"], out[f"anchor/{name}"] = masks[j].to(torch.uint8), anchors[j]
    return out


def _report(qmodel, x, hold, opts, state, flip, t0) -> dict:
    eval_bs = max(opts.batch_size, 32)
    used = ("mix" if opts.augment == "mix" else "flip") if flip else "none"
    rep = {"start": "ofq", "options": dict(vars(opts)), "augment_used": used, "qkr_used": "qkr" in state,
           "fitness_images": int(x.shape[0]), "holdout_images": int(hold.shape[0]) if hold is not None else 0,
           "epochs_run": state["epoch"], "history": state["history"], "status": state["status"],
           "kept_epoch": state.get("kept_epoch", state["epoch"]),
           "blocks": state["init_blocks"]}
    if "act_scales" in state:
        rep["act_scales"] = state["act_scales"]
    warnings = []
    model = qmodel.model
    dev = next(iter(model.parameters())).device
    if hold is not None:
        hold = hold.to(dev)
        after = float(logits_kl(_logits(model, hold, eval_bs), _float_logits(qmodel, hold, eval_bs)))
        rep["holdout_kl"] = {"before": state["holdout_kl_before"], "after": after}
        before, what = state["holdout_kl_before"], "hold-out"
        if "qkr" in state:
            xs = x.to(dev)
            fit_after = float(logits_kl(_logits(model, xs, eval_bs), _float_logits(qmodel, xs, eval_bs)))
    else:
        xs = x.to(dev)
        after = float(logits_kl(_logits(model, xs, eval_bs), _float_logits(qmodel, xs, eval_bs)))
        rep["fitness_kl"] = {"before": state["fitness_kl_before"], "after": after}
        before, what = state["fitness_kl_before"], "fitness"
        fit_after = after
    if "qkr" in state:
        rep["qkr"] = {**state["qkr"], "fitness_kl": {**state["qkr"]["fitness_kl"], "after_fine_tune": fit_after}}
    if not after <= before:
        warnings.append(f"the fine-tune raised the {what} KL from {before:.4f} ({opts.init} init) to {after:.4f}: "
                        f"fewer epochs or a lower lr")
    fallbacks = [f"{r['layer']}: {r['reason']}" for b in state["init_blocks"] for r in b.get("layers", [])
                 if isinstance(r, dict) and r.get("method") == "rtn"]
    if state["status"] != "ok":
        fallbacks.append(state["status"])
    rep["warnings"], rep["fallbacks"] = warnings, fallbacks + warnings
    rep["seconds"] = time.perf_counter() - t0
    return rep
