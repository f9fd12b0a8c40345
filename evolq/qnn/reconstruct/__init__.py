"""Reconstruction start points: ``QuantConfig(start="gptq" | "brecq" | "ofq")``.

``run_start`` runs after calibration (``evolq.api.prepare_model``), block by block
over any ``QModel`` (``blocks.run_blocks``), and leaves its result in the weight quantizers (``weight_delta``
for GPTQ, ``round_offset`` for AdaRound), so the Evol-Q scale search then runs on top
unchanged. With a run folder, a checkpoint is written after every block and a killed
start resumes after the last finished block with the same result. ``"ofq"`` is an
end-to-end fine-tune instead (``ofq.run_ofq``: checkpointed after every epoch).
"""
from __future__ import annotations

import time

import torch

from ...data import resolve_device
from ...errors import DataError
from .blocks import run_blocks
from .common import BRECQOptions, GPTQOptions, OFQOptions, StartCheckpoint, block_layers, start_options
from .ofq import run_ofq

__all__ = ["run_start", "start_options", "GPTQOptions", "BRECQOptions", "OFQOptions", "block_layers"]


def _check_data(start: str, opts, x: torch.Tensor) -> None:
    n = x.shape[0]
    if (start == "gptq" or getattr(opts, "init", "rtn") == "gptq") and n < 2:
        what = "start" if start == "gptq" else f"init of {start}"
        raise DataError(f"the gptq {what} needs at least 2 calibration samples for its Hessians, got {n}")
    if start == "ofq" and n < opts.batch_size:
        raise DataError(f"the ofq start's batch is {opts.batch_size} images but the fitness set has {n}: give more "
                        f"calibration data or lower start_options['batch_size']")
    if start == "brecq" and n < opts.batch_size:
        raise DataError(f"the brecq start's reconstruction batch is {opts.batch_size} samples but the calibration set "
                        f"has {n}: give more calibration data or lower start_options['batch_size']")


def run_start(qmodel, x: torch.Tensor, quant, progress: bool = False, checkpoint_dir=None,
              resume: bool = False, holdout: torch.Tensor | None = None, hooks=None) -> dict | None:
    """Apply ``quant.start`` to a calibrated ``qmodel`` using calibration inputs ``x``
    (``holdout``: images kept out of calibration and of the start, which the ``ofq`` start
    scores before and after its fine-tune; ``hooks``: an ``evolq.hooks.StartHooks``, which
    the ``ofq`` start fires).

    Returns a JSON-able report (per block and layer: method, errors, fallbacks), or
    None for ``"rtn"``. Raises ``DataError`` for too little calibration data or a
    Hessian that dampening cannot make positive definite; ``CheckpointError`` for a
    foreign or unreadable start checkpoint.
    """
    if quant.start == "rtn":
        return None
    opts = start_options(quant.start, quant.start_options)
    _check_data(quant.start, opts, x)
    if quant.start == "ofq":
        return run_ofq(qmodel, x, quant, opts, holdout=holdout, progress=progress, checkpoint_dir=checkpoint_dir,
                       resume=resume, hooks=hooks)
    dev = resolve_device(opts.device)
    home = x.device
    t0 = time.perf_counter()
    run_id = StartCheckpoint.run_id_of(qmodel, quant, x)
    model = qmodel.model
    with StartCheckpoint(qmodel, checkpoint_dir, run_id, resume) as ckpt:
        state = ckpt.restore() or {"next": 0, "blocks": [], "seconds": 0.0}
        t0 -= state["seconds"]
        todo = [i for i, b in enumerate(qmodel.blocks) if block_layers(qmodel, b)]
        if state["next"] < len(qmodel.blocks):
            model.to(dev)
            try:
                run_blocks(qmodel, x.to(dev), quant.start, opts, todo, state, ckpt, t0, progress)
            finally:
                model.to(home)
    report = {"start": quant.start, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in vars(opts).items()},
              "blocks": state["blocks"], "seconds": time.perf_counter() - t0}
    fallbacks = [f"{r['layer']}: {r['reason']}" for b in state["blocks"]
                 for r in b.get("layers", []) + b.get("gptq_layers", [])
                 if isinstance(r, dict) and r.get("method") == "rtn"]
    fallbacks += [f"{b['block']}: {b['status']}" for b in state["blocks"] if b.get("status", "ok") != "ok"]
    report["fallbacks"] = fallbacks
    return report
