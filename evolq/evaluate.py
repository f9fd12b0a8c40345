"""Metrics on a labelled split: top-1, top-5, agreement with the float model's
top-1, and mean KL(float || quantized)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .qnn.calibrate import iter_batches

__all__ = ["predict", "metrics", "evaluate_qmodel"]


@torch.no_grad()
def predict(fn, images: torch.Tensor, batch_size: int = 100, progress: bool = False, desc="evaluating"):
    outs = []
    it = list(iter_batches(images, batch_size))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    for xb in it:
        outs.append(fn(xb).float())
    return torch.cat(outs)


def metrics(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None = None) -> dict:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    out = {
        "top1": (top5[:, 0] == labels).float().mean().item() * 100,
        "top5": (top5 == labels[:, None]).any(dim=1).float().mean().item() * 100,
        "n": int(labels.numel()),
    }
    if ref_logits is not None:
        out["agreement"] = (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item() * 100
        out["kl"] = F.kl_div(F.log_softmax(logits.double(), 1), F.log_softmax(ref_logits.double(), 1),
                             log_target=True, reduction="batchmean").item()
    else:
        out["agreement"], out["kl"] = 100.0, 0.0
    return out


def evaluate_qmodel(qmodel, images, labels, fp_logits=None, batch_size=100, progress=False) -> dict:
    """FP32 and quantized metrics of a ``QModel``: ``{"fp32": {...}, "quantized": {...}}``.
    The float logits are computed with the quantizers switched off, unless given."""
    if fp_logits is None:
        qmodel.set_quant_enabled(False)
        try:
            fp_logits = predict(qmodel.model, images, batch_size, progress, "fp32")
        finally:
            qmodel.set_quant_enabled(True)
    q_logits = predict(qmodel.model, images, batch_size, progress, "quantized")
    return {"fp32": metrics(fp_logits, labels), "quantized": metrics(q_logits, labels, fp_logits)}, fp_logits
