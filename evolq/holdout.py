"""The hold-out rule: after every pass, held-out calibration inputs decide whether the
pass is kept or its scales are reverted (model selection that never sees test data).

The hold-out inputs are split off before calibration (``evolq.data.split_calibration``)
and never reach the calibration statistics or the fitness. The default criterion is the
mean KL divergence of the quantized model's outputs from the float outputs on those
inputs: it is defined for any number of images, unlike infoNCE, which is 0 for a single
image and in-batch noise for a dozen. ``"agreement"`` (top-1 agreement with the float
model) and ``"loss"`` (the fitness loss, the previous rule) are options. Below
``MIN_HOLDOUT`` images a ``HoldoutWarning`` says the decision is noise.
"""
from __future__ import annotations

import math
import warnings

import torch

from .fitness import chunked_forward, reference_outputs
from .losses import kl

__all__ = ["HoldOut", "HoldoutWarning", "MIN_HOLDOUT"]

MIN_HOLDOUT = 8


class HoldoutWarning(UserWarning):
    """A hold-out too small to decide anything."""


class HoldOut:
    """Scores the model on held-out inputs against their float outputs (lower is better).

    Args:
        qmodel: the quantized model.
        inputs: the held-out inputs (may be empty: every pass is kept).
        loss: the fitness loss, ``loss(out (1, N, K), ref (N, K)) -> (1,)`` (metric "loss").
        max_batch: most samples per forward.
        metric: "kl", "agreement" or "loss".
    """

    def __init__(self, qmodel, inputs: torch.Tensor, loss, max_batch: int, metric: str = "kl"):
        self.qmodel, self.inputs, self.loss, self.max_batch, self.metric = qmodel, inputs, loss, max_batch, metric
        n = inputs.shape[0]
        self.ref = reference_outputs(qmodel, inputs, min(256, max_batch)) if n else None
        if 0 < n < MIN_HOLDOUT:
            warnings.warn(f"the hold-out has {n} images (fewer than {MIN_HOLDOUT}): its keep/revert decisions are "
                          f"noise; give more calibration data, raise holdout, or set holdout=0 to keep every pass",
                          HoldoutWarning, stacklevel=4)  # the caller of quantize_model

    @torch.no_grad()
    def score(self) -> float | None:
        """The criterion on the held-out inputs (lower is better); None without a hold-out."""
        if self.ref is None:
            return None
        out = chunked_forward(lambda xb: self.qmodel.run_blocks(xb).float(), self.inputs,
                              min(256, self.max_batch)).unsqueeze(0)
        if self.metric == "kl":
            return float(kl(out, self.ref)[0])
        if self.metric == "agreement":
            return -100.0 * float((out[0].argmax(-1) == self.ref.argmax(-1)).double().mean())
        return float(self.loss(out, self.ref)[0])

    @staticmethod
    def keep(before: float | None, after: float | None) -> bool:
        """Keep the pass unless its held-out score got worse (or became non-finite)."""
        return (after is None or before is None
                or (math.isfinite(after) and (not math.isfinite(before) or after <= before)))
