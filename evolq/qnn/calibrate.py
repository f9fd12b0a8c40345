"""Calibration: observers watch full-precision tensors, then fix every scale."""
from __future__ import annotations

import torch

from ..errors import DataError

__all__ = ["calibrate", "iter_batches", "sample_digests"]


def sample_digests(x: torch.Tensor) -> frozenset[str]:
    """One short hash per sample of ``x``: lets a search check that no hold-out sample
    reached the calibration statistics."""
    import hashlib

    x = x.detach().cpu().contiguous()
    return frozenset(hashlib.blake2b(x[i].numpy().tobytes(), digest_size=12).hexdigest() for i in range(x.shape[0]))


def iter_batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@torch.no_grad()
def calibrate(qmodel, images: torch.Tensor, batch_size: int = 100, progress: bool = False) -> None:
    """Run ``images`` through the model with every quantizer observing (the float
    model's tensors, as FQ-ViT does), then turn the statistics into scales."""
    if not isinstance(images, torch.Tensor) or images.shape[0] == 0:
        raise DataError("calibration needs a non-empty tensor of inputs")
    qs = list(qmodel.quantizers().values())
    for q in qs:
        q.calibrating = True
    try:
        it = list(iter_batches(images, batch_size))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="calibrating", leave=False)
        for xb in it:
            qmodel.model(xb)
    finally:
        for q in qs:
            q.calibrating = False
    for q in qs:
        q.finalize()
    seen = getattr(qmodel, "calibration_digests", None)
    qmodel.calibration_digests = (seen or frozenset()) | sample_digests(images)
    for m in qmodel.model.modules():  # layers whose weight quantization depends on activation qparams
        hook = getattr(m, "after_calibration", None)
        if callable(hook):
            hook()
