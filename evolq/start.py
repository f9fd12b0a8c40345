"""The start point of every run: ``prepare_model`` wraps a float model in fake-quantized layers
(the ``QuantConfig`` regime), folds SmoothQuant factors in the deploy regime, calibrates the
quantizers and runs the chosen start (``rtn``, ``gptq``, ``brecq``, ``ofq``). It sits below both
the user verbs (``evolq.api``) and the bit allocation (``evolq.allocation``, whose proxy it
builds), and imports neither."""
from __future__ import annotations

import torch
from torch import nn

from .adapters import check_inputs, wrap_model
from .config import QuantConfig
from .data import as_tensor_data
from .qnn.calibrate import calibrate
from .qnn.qmodel import QModel

__all__ = ["prepare_model"]


def prepare_model(model: nn.Module, calib_data, quant: QuantConfig | None = None, arch: str = "",
                  progress: bool = False, checkpoint_dir=None, resume: bool = False, holdout=None,
                  subscribers=()) -> QModel:
    """Quantize ``model`` in place (the ``quant`` regime, FQ-ViT by default) and
    calibrate it on ``calib_data``: the start point of the search. In the deploy regime
    SmoothQuant factors are folded into the float model first (``evolq.qnn.smooth``). With
    ``quant.start`` "gptq" or "brecq" the weights' rounding is then reconstructed
    block by block (``evolq.qnn.reconstruct``; report in ``qmodel.start_report``),
    checkpointed after every block in ``checkpoint_dir`` and resumable; with "ofq" the
    quantized weights are fine-tuned on ``calib_data`` (checkpointed after every epoch).
    ``holdout``: inputs kept out of calibration and of the start, on which the ``ofq``
    start reports the KL to the float model before and after its fine-tune. ``subscribers``:
    objects with a ``subscribe(hooks)`` method, or callables ``f(hooks)``, attached to the
    start's hooks (``evolq.hooks.StartHooks``: the ``ofq`` fine-tune's epochs, CGA phase and
    end of training) before it runs."""
    quant = quant or QuantConfig()
    quant.validate()
    x = as_tensor_data(calib_data)
    model.eval()
    qmodel = wrap_model(model, quant, arch=arch)
    check_inputs(qmodel, x)
    if quant.smoothing > 0:  # deploy regime: an exact float transform, before any statistics are taken
        from .qnn.smooth import smooth_model

        qmodel.smooth_report = smooth_model(qmodel, x, quant.smoothing)
    calibrate(qmodel, x, progress=progress)
    if quant.start != "rtn":
        from .hooks import StartHooks
        from .qnn.reconstruct import run_start

        hooks = StartHooks()
        for s in subscribers:
            s.subscribe(hooks) if hasattr(s, "subscribe") else s(hooks)
        empty = holdout is None or (isinstance(holdout, torch.Tensor) and holdout.ndim > 0 and holdout.shape[0] == 0)
        hold = None if empty else as_tensor_data(holdout, "hold-out data")
        qmodel.start_report = run_start(qmodel, x, quant, progress=progress, checkpoint_dir=checkpoint_dir,
                                        resume=resume, holdout=hold, hooks=hooks)
    return qmodel
