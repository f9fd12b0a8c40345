"""The hold-out rule: after every pass, held-out calibration inputs decide whether the
pass is kept or its scales are reverted (model selection that never sees test data)."""
from __future__ import annotations

import math

import torch

from .fitness import chunked_forward, reference_outputs

__all__ = ["HoldOut"]


class HoldOut:
    """Scores the model on held-out inputs against their float outputs.

    Args:
        qmodel: the quantized model.
        inputs: the held-out inputs (may be empty: every pass is kept).
        loss: the fitness loss, ``loss(out (1, N, K), ref (N, K)) -> (1,)``.
        max_batch: most samples per forward.
    """

    def __init__(self, qmodel, inputs: torch.Tensor, loss, max_batch: int):
        self.qmodel, self.inputs, self.loss, self.max_batch = qmodel, inputs, loss, max_batch
        self.ref = reference_outputs(qmodel, inputs, min(256, max_batch)) if inputs.shape[0] else None

    @torch.no_grad()
    def score(self) -> float | None:
        """The loss on the held-out inputs (lower is better); None without a hold-out."""
        if self.ref is None:
            return None
        out = chunked_forward(lambda xb: self.qmodel.run_blocks(xb).float(), self.inputs,
                              min(256, self.max_batch))
        return float(self.loss(out.unsqueeze(0), self.ref)[0])

    @staticmethod
    def keep(before: float | None, after: float | None) -> bool:
        """Keep the pass unless its held-out score got worse (or became non-finite)."""
        return (after is None or before is None
                or (math.isfinite(after) and (not math.isfinite(before) or after <= before)))
