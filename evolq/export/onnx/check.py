"""An exported ONNX file in onnxruntime: the CPU session, and the check against PyTorch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import ExportError
from ...qnn.qmodel import QModel

__all__ = ["onnx_session", "check_onnx"]


def onnx_session(path, threads: int | None = None, optimized_path=None):
    """An onnxruntime CPU session for ``path`` (a file, or the model's bytes; all graph optimizations on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        where = "the model" if isinstance(path, bytes) else repr(str(path))
        raise ExportError(f"onnxruntime cannot load {where}: {str(e).splitlines()[0][:200]}") from None


@torch.no_grad()
def check_onnx(qmodel: QModel, path, images: torch.Tensor, labels: torch.Tensor | None = None,
               batch_size: int = 32, threads: int | None = None, reference: torch.Tensor | None = None) -> dict:
    """Run the exported ``path`` in onnxruntime (CPU) and ``qmodel`` in PyTorch on ``images``.

    Returns ``{"images", "agreement"`` (top-1 agreement, percent), ``"max_abs_diff"``,
    ``"mean_abs_diff"`` (logits), and with ``labels`` ``"top1_torch"``, ``"top1_onnx"``}.
    ``reference``: the PyTorch logits, if already computed.
    """
    if not Path(path).is_file():
        raise ExportError(f"{str(path)!r} is not a file")
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    ours, theirs = [], []
    for i in range(0, images.shape[0], batch_size):
        xb = images[i:i + batch_size]
        if reference is None:
            ours.append(qmodel.model(xb).float().cpu())
        theirs.append(torch.from_numpy(sess.run(None, {name: xb.cpu().numpy().astype(np.float32)})[0]).float())
    a, b = (torch.cat(ours) if reference is None else reference.float().cpu()), torch.cat(theirs)
    diff = (a - b).abs()
    out = {"images": int(a.shape[0]),
           "agreement": (a.argmax(1) == b.argmax(1)).float().mean().item() * 100,
           "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    if labels is not None:
        y = labels.cpu()
        out["top1_torch"] = (a.argmax(1) == y).float().mean().item() * 100
        out["top1_onnx"] = (b.argmax(1) == y).float().mean().item() * 100
    return out
