"""What the ofq fine-tune (``ofq.run_ofq``) learns from and scores with: the KL of the logits
to the float model's (``logits_kl``; ``logits``, ``float_logits`` without gradients), the
DeiT-style mixed views of an image batch (``mix_views``) and the block-output term of the loss
(``block_outputs``, ``block_term``)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["logits_kl", "logits", "float_logits", "mix_views", "block_outputs", "block_term"]


def logits_kl(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(ref) || softmax(out)) (as ``evolq.losses.kl``)."""
    lo = torch.log_softmax(out.double(), dim=-1)
    lr = torch.log_softmax(ref.double(), dim=-1)
    return (lr.exp() * (lr - lo)).sum(dim=-1).mean()


@torch.no_grad()
def logits(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s logits on ``x``, ``batch_size`` at a time, without gradients."""
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


def float_logits(qmodel, x, batch_size):
    """The float model's logits (``qmodel`` with quantization off) on ``x``."""
    qmodel.set_quant_enabled(False)
    try:
        return logits(qmodel.model, x, batch_size)
    finally:
        qmodel.set_quant_enabled(True)


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


def block_outputs(qmodel, xb: torch.Tensor) -> list:
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
