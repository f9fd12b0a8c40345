"""Fitness losses between quantized outputs and cached full-precision outputs.

Every loss takes ``out`` of shape (P, N, K) (P candidates, N samples) and ``ref``
of shape (N, K) and returns P losses (lower is better), in float64.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .registry import Registry

__all__ = ["infonce", "mse", "cosine", "kl", "LOSSES", "register_loss", "list_losses", "get_loss", "make_loss"]

LOSSES: Registry = Registry("loss")


def register_loss(name: str, fn=None):
    """Register a loss ``fn(out (P, N, K), ref (N, K), **settings) -> (P,)`` (lower is better);
    ``settings`` are ``batch_size`` and ``temperature`` from ``SearchConfig``."""
    return LOSSES.register(name, fn)


def list_losses() -> tuple[str, ...]:
    return LOSSES.names()


@register_loss("infonce")
def infonce(out, ref, batch_size: int = 100, temperature: float = 3.0, **_):
    """The authors' code form: L2-normalised outputs, in-batch similarity / T,
    cross-entropy against the diagonal, times 2T; averaged over batches of
    ``batch_size`` consecutive samples (a last, smaller batch counts as one)."""
    out, ref = out.double(), ref.double()
    p, n, _ = out.shape
    o = F.normalize(out, dim=-1)
    r = F.normalize(ref, dim=-1)
    losses = []
    for i in range(0, n, batch_size):
        ob, rb = o[:, i:i + batch_size], r[i:i + batch_size]
        logits = ob @ rb.T / temperature  # (P, b, b)
        target = torch.arange(ob.shape[1], device=out.device).expand(p, -1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        losses.append(ce.reshape(p, -1).mean(dim=1) * 2 * temperature)
    return torch.stack(losses, dim=1).mean(dim=1)


@register_loss("mse")
def mse(out, ref, **_):
    return (out.double() - ref.double()).pow(2).mean(dim=(1, 2))


@register_loss("cosine")
def cosine(out, ref, **_):
    return 1 - F.cosine_similarity(out.double(), ref.double().unsqueeze(0), dim=-1).mean(dim=1)


@register_loss("kl")
def kl(out, ref, **_):
    """Mean KL(softmax(ref) || softmax(out)) per sample."""
    lo = F.log_softmax(out.double(), dim=-1)
    lr = F.log_softmax(ref.double(), dim=-1)
    return (lr.exp() * (lr - lo)).sum(dim=-1).mean(dim=1)


def get_loss(name: str):
    return LOSSES.get(name)


def make_loss(search):
    """The loss of ``search`` (a ``SearchConfig``) with its settings bound."""
    return functools.partial(LOSSES.get(search.loss), batch_size=search.infonce_batch, temperature=search.temperature)
