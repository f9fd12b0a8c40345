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

Here: the run (fresh or resumed), the fine-tune's loop (``_FineTune``), the freeze and the report;
the quantizer side is ``ofq_quant``'s, losses and views ``ofq_losses``', the hold-out choice ``ofq_holdout``'s.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import torch

from ...errors import ConfigError, DataError
from ..qkr import qkr_float_form, qkr_modules, switch_qkr
from .blocks import run_blocks
from .common import GPTQOptions, StartCheckpoint, block_layers
from .ofq_holdout import HoldoutChoice
from .ofq_losses import block_outputs, block_term, float_logits, logits, logits_kl, mix_views
from .ofq_quant import TrainingForwards, act_scale_quantizers, cga_masks, fit_statsq, statsq_layers

__all__ = ["run_ofq", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0x0F0, int(epoch)]).generate_state(1)[0])


def _run_gptq_init(qmodel, x, opts, statsq: list[bool], layers) -> list[dict]:
    """GPTQ over every block (no checkpoint: it is redone on a resume that has no epoch yet);
    with StatsQ, on the StatsQ grid of the float weights."""
    fit_statsq(layers, statsq)
    state = {"next": 0, "blocks": [], "seconds": 0.0}
    todo = [i for i, b in enumerate(qmodel.blocks) if block_layers(qmodel, b)]
    no_save = SimpleNamespace(save=lambda state: None)
    run_blocks(qmodel, x, "gptq", GPTQOptions(device=opts.device), todo, state, no_save, time.perf_counter(), False)
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
                state = _fresh_state(qmodel, x, hold, opts, sq, layers, qkr, eval_bs)
            t0 -= state["seconds"]
            _train(qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, t0, progress and opts.progress,
                   hooks)
        finally:
            model.to(home)
    return _report(qmodel, x, hold, opts, state, flip, t0)


def _fresh_state(qmodel, x, hold, opts, sq, layers, qkr: bool, eval_bs: int) -> dict:
    """A fresh run's start: the init (GPTQ's compensation or the float weights, on the StatsQ grid
    with StatsQ), what the QKR switch cost, and the hold-out (or, without one, the fitness) KL
    before the fine-tune."""
    init_blocks = _run_gptq_init(qmodel, x, opts, sq, layers) if opts.init == "gptq" else []
    state = {"epoch": 0, "history": [], "init_blocks": init_blocks, "seconds": 0.0, "status": "ok"}
    if opts.init == "rtn":
        fit_statsq(layers, sq)
    if qkr:
        state["qkr"] = _qkr_costs(qmodel, x, eval_bs)
    model = qmodel.model
    if hold is not None:
        state["holdout_kl_before"] = float(logits_kl(logits(model, hold, eval_bs), float_logits(qmodel, hold, eval_bs)))
    else:
        state["fitness_kl_before"] = float(logits_kl(logits(model, x, eval_bs), float_logits(qmodel, x, eval_bs)))
    return state


@torch.no_grad()
def _qkr_costs(qmodel, x, eval_bs) -> dict:
    """What the switch to QKR costs on the fitness images, with the initialised weights: the KL
    to the float logits in the original q/k form (``before_switch``) and in the QKR form
    (``after_switch``); ``float_kl``: the QKR form with quantization off (the dropped biases alone)."""
    model = qmodel.model
    mods = [m for _, m in qkr_modules(model)]
    ref = float_logits(qmodel, x, eval_bs)
    qmodel.set_quant_enabled(False)
    try:
        with qkr_float_form(model):
            float_kl = float(logits_kl(logits(model, x, eval_bs), ref))
    finally:
        qmodel.set_quant_enabled(True)
    for m in mods:
        m.set_on(False)
    try:
        before = float(logits_kl(logits(model, x, eval_bs), ref))
    finally:
        for m in mods:
            m.set_on(True)
    after = float(logits_kl(logits(model, x, eval_bs), ref))
    return {"attentions": len(mods), "float_kl": float_kl,
            "fitness_kl": {"before_switch": before, "after_switch": after}}


def _fire(hooks, name: str, *args) -> None:
    """Fire ``hooks.<name>`` (``evolq.hooks.StartHooks``) where the caller gave hooks."""
    if hooks is not None:
        getattr(hooks, name)(*args)


def _train(qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, t0, progress, hooks) -> None:
    """The fine-tune from ``state["epoch"]`` to ``opts.epochs`` (``_FineTune``), then the freeze:
    each change becomes its quantizer's ``weight_delta``, the last StatsQ scale its scale, and
    trained activation scales their quantizers' scales."""
    run = _FineTune(qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, hooks)
    acts = act_scale_quantizers(qmodel, layers) if opts.act_lr > 0 else []
    with TrainingForwards(qmodel, layers, sq, acts) as tr:
        start_log = [ls.detach().clone() for ls in tr.log_scales]
        run.setup(tr, acts)
        run.epochs(t0, progress)
        _fire(hooks, "train_end_hook", qmodel)
        final = [d.detach().clone() for d in tr.deltas]
        final_log = [ls.detach().clone() for ls in tr.log_scales]
    with torch.no_grad():
        for (_, layer), d in zip(layers, final):
            layer.weight_quant.set_rounding(delta=d)
        for (_, q), ls in zip(acts, final_log):
            q.scale.copy_(ls.exp().to(q.scale))
    fit_statsq(layers, sq, [layer.weight_quant.weight_delta for _, layer in layers])
    if acts:
        change = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(final_log, start_log)])
        state["act_scales"] = {"trained": len(acts), "mean_abs_log_change": float(change.mean()),
                               "max_abs_log_change": float(change.max())}


class _FineTune:
    """The fine-tune's loop over the tensors that ``TrainingForwards`` trains: the teacher's logits,
    the optimiser (with the checkpoint's moments on a resume), the epochs and their steps, the CGA
    phase, the NaN fallback, the hold-out choice and the checkpoint after every epoch."""

    def __init__(self, qmodel, x, hold, opts, layers, sq, state, ckpt, flip, eval_bs, hooks):
        self.qmodel, self.model, self.x, self.hold, self.opts = qmodel, qmodel.model, x, hold, opts
        self.layers, self.sq, self.state, self.ckpt, self.hooks = layers, sq, state, ckpt, hooks
        self.flip, self.eval_bs = flip, eval_bs
        self.steps = x.shape[0] // opts.batch_size  # whole batches only: every step sees bs images
        self.total = self.steps * opts.epochs
        self.cga_from = max(1, opts.epochs - opts.cga_epochs) if opts.cga else opts.epochs  # never the first epoch
        self.mix = opts.augment == "mix" and x.ndim == 4
        self.blockwise = opts.block_weight > 0
        self.online = self.mix or self.blockwise  # the teacher runs on every step's images
        self.teacher = None if self.online else float_logits(qmodel, x, eval_bs)
        self.teacher_flip = float_logits(qmodel, x.flip(-1), eval_bs) if flip and not self.online else None
        self.hold_ref = float_logits(qmodel, hold, eval_bs) if hold is not None else None

    def setup(self, tr: TrainingForwards, acts: list) -> None:
        """AdamW over ``tr``'s changes (and log-scales); on a resume, the changes (and scales),
        AdamW's moments and CGA's masks of the last epoch from the checkpoint."""
        opts, extra, resumed = self.opts, self.ckpt.extra, self.state["epoch"] > 0
        self.deltas, self.log_scales = tr.deltas, tr.log_scales
        self.named = [(name, d) for (name, _), d in zip(self.layers, self.deltas)]
        self.named += [(f"act/{name}", ls) for (name, _), ls in zip(acts, self.log_scales)]
        if resumed:
            with torch.no_grad():
                for name, d in self.named:
                    d.copy_(extra[f"D/{name}"].to(d))
        groups = [{"params": self.deltas, "lr": opts.lr, "base_lr": opts.lr, "weight_decay": opts.weight_decay}]
        if self.log_scales:
            groups.append({"params": self.log_scales, "lr": opts.act_lr, "base_lr": opts.act_lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups)
        self.masks = self.anchors = None
        if resumed:
            for name, d in self.named:
                if f"m/{name}" in extra:
                    self.opt.state[d] = {"step": extra[f"step/{name}"].clone(), "exp_avg": extra[f"m/{name}"].to(d),
                                         "exp_avg_sq": extra[f"v/{name}"].to(d)}
            if f"mask/{self.layers[0][0]}" in extra:
                pairs = list(zip(self.layers, self.deltas))
                self.masks = [extra[f"mask/{name}"].to(d.device).bool() for (name, _), d in pairs]
                self.anchors = [extra[f"anchor/{name}"].to(d) for (name, _), d in pairs]
        self.params = self.deltas + self.log_scales
        self.good = [d.detach().clone() for d in self.params]  # the last good epoch's changes (NaN fallback)
        self.keep = HoldoutChoice(opts, self.hold, self.state, extra, self.named, self.params)

    def epochs(self, t0: float, progress: bool) -> None:
        """The epochs from ``state["epoch"]`` on (stopping at a non-finite loss or weights), then
        the hold-out choice."""
        opts, state = self.opts, self.state
        bar = None
        if progress and state["epoch"] < opts.epochs:
            from tqdm.auto import tqdm

            bar = tqdm(total=(opts.epochs - state["epoch"]) * self.steps, desc="ofq fine-tune", leave=False)
        for epoch in range(state["epoch"], opts.epochs):
            _fire(self.hooks, "epoch_start_hook", {"epoch": epoch + 1, "epochs": opts.epochs})
            if opts.cga and epoch == self.cga_from and self.masks is None:
                self._start_cga(epoch)
            rec, bad = self._epoch(epoch, bar)
            if bad is not None:
                self._fall_back(epoch, bad)
                break
            self._end_epoch(epoch, rec, t0)
        if bar is not None:
            bar.close()
        self.keep.apply(self.params, state)

    def _start_cga(self, epoch: int) -> None:
        """CGA's phase begins: the confident weights' masks, and their values to hold them at."""
        self.masks = cga_masks(self.layers, self.deltas, self.opts.cga_br, self.sq)
        self.anchors = [d.detach().clone() for d in self.deltas]
        _fire(self.hooks, "cga_start_hook", {"epoch": epoch + 1, "layers": [name for name, _ in self.layers],
                                             "deltas": self.anchors, "masks": self.masks})

    def _epoch(self, epoch: int, bar) -> tuple[dict | None, str | None]:
        """One pass over the fitness images in the epoch's own order, flips and views (from its
        seed); returns its history record, or None and why it stopped."""
        n = self.x.shape[0]
        gen = torch.Generator().manual_seed(epoch_seed(self.opts.seed, epoch))
        perm = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        rng = np.random.default_rng(epoch_seed(self.opts.seed, 1000 + epoch)) if self.mix else None
        t_e = time.perf_counter()
        losses, kls = [], []
        for i in range(self.steps):
            lr = self._set_lr(epoch * self.steps + i)
            xb, tb, t_outs = self._batch(i, perm, flips, rng)
            lv, kl, bad = self._step(xb, tb, t_outs, f"epoch {epoch + 1}, step {i + 1}")
            if bad is not None:
                return None, bad
            losses.append(lv)
            kls.append(kl)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{lv:.4f}")
        rec = {"epoch": epoch + 1, "train_kl": float(np.mean(kls)), "lr_end": lr,
               "seconds": round(time.perf_counter() - t_e, 2)}
        if self.blockwise:
            rec["train_loss"] = float(np.mean(losses))
        if self.masks is not None:
            rec["cga_trained_share"] = float(sum(int((~m).sum()) for m in self.masks)
                                             / sum(m.numel() for m in self.masks))
        return rec, None

    def _set_lr(self, g: int) -> float:
        """The learning rates of global step ``g`` (cosine to 0 over all steps, or constant)."""
        factor = 0.5 * (1 + math.cos(math.pi * g / self.total)) if self.opts.schedule == "cosine" else 1.0
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.opts.lr * factor

    def _batch(self, i: int, perm, flips, rng) -> tuple:
        """Step ``i``'s images (flipped or mixed views), the teacher's logits on them and, where the
        teacher runs online, all its block outputs."""
        x, bs = self.x, self.opts.batch_size
        idx = perm[i * bs:(i + 1) * bs].to(x.device)
        xb = x[idx]
        if self.mix:
            xb = mix_views(xb, rng)
        elif self.flip:
            fb = flips[i * bs:(i + 1) * bs].to(x.device)
            xb = torch.where(fb[:, None, None, None], xb.flip(-1), xb)
        if not self.online:
            tb = self.teacher[idx]
            return xb, (torch.where(fb[:, None], self.teacher_flip[idx], tb) if self.flip else tb), None
        self.qmodel.set_quant_enabled(False)
        try:
            with torch.no_grad():
                t_outs = block_outputs(self.qmodel, xb) if self.blockwise else [self.model(xb)]
        finally:
            self.qmodel.set_quant_enabled(True)
        return xb, t_outs[-1].float(), t_outs

    def _step(self, xb, tb, t_outs, where: str) -> tuple:
        """One AdamW step on a batch (in CGA's phase the confident weights get no gradient and keep
        their anchors); returns (loss, KL, None), or (None, None, why it stopped at ``where``)."""
        with torch.enable_grad():
            if self.blockwise:
                s_outs = block_outputs(self.qmodel, xb)
                kl = logits_kl(s_outs[-1], tb)
                loss = kl + self.opts.block_weight * block_term(s_outs[:-1], t_outs[:-1])
            else:
                loss = kl = logits_kl(self.model(xb), tb)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                return None, None, f"non-finite loss at {where}"
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.masks is not None:
            for d, m in zip(self.deltas, self.masks):
                if d.grad is not None:
                    d.grad[m] = 0.0
        self.opt.step()
        with torch.no_grad():
            if self.masks is not None:
                for d, m, a in zip(self.deltas, self.masks, self.anchors):
                    d[m] = a[m]
            if not all(bool(torch.isfinite(d).all()) for d in self.params):
                return None, None, f"non-finite weights after {where}"
        return lv, float(kl.detach()), None

    def _fall_back(self, epoch: int, bad: str) -> None:
        """A non-finite loss or weights in ``epoch``: back to the last good epoch's tensors."""
        with torch.no_grad():
            for d, gd in zip(self.params, self.good):
                d.copy_(gd)
        kept = f"epoch {epoch}" if epoch else f"the {self.opts.init} init"
        self.state["status"] = f"stopped: {bad}; kept the weights of {kept}"

    def _end_epoch(self, epoch: int, rec: dict, t0: float) -> None:
        """After a good epoch: its hold-out KL, the hold-out choice, the state and the checkpoint."""
        state = self.state
        if self.hold is not None:
            rec["holdout_kl"] = float(logits_kl(logits(self.model, self.hold, self.eval_bs), self.hold_ref))
            self.keep.offer(rec["holdout_kl"], epoch + 1, self.params)
        state["history"].append(rec)
        state["epoch"] = epoch + 1
        state["seconds"] = time.perf_counter() - t0
        self.good = [d.detach().clone() for d in self.params]
        extra_t = _extra(self.named, self.opt, self.masks, self.anchors)
        self.keep.save(state, extra_t, self.named)
        self.ckpt.save(state, extra_t)
        _fire(self.hooks, "epoch_end_hook", rec)


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
        after = float(logits_kl(logits(model, hold, eval_bs), float_logits(qmodel, hold, eval_bs)))
        rep["holdout_kl"] = {"before": state["holdout_kl_before"], "after": after}
        before, what = state["holdout_kl_before"], "hold-out"
        if "qkr" in state:
            xs = x.to(dev)
            fit_after = float(logits_kl(logits(model, xs, eval_bs), float_logits(qmodel, xs, eval_bs)))
    else:
        xs = x.to(dev)
        after = float(logits_kl(logits(model, xs, eval_bs), float_logits(qmodel, xs, eval_bs)))
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
