"""Reconstruction start points: ``QuantConfig(start="gptq" | "brecq" | "ofq")``.

``run_start`` runs after calibration (``evolq.api.prepare_model``), block by block
over any ``QModel``, and leaves its result in the weight quantizers (``weight_delta``
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
from .brecq import brecq_block
from .common import BRECQOptions, GPTQOptions, OFQOptions, StartCheckpoint, block_layers, start_options
from .gptq import gptq_block

__all__ = ["run_start", "start_options", "GPTQOptions", "BRECQOptions", "OFQOptions", "block_layers"]


@torch.no_grad()
def _forward(run, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([run(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


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
        from .ofq import run_ofq

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
                _run_blocks(qmodel, x.to(dev), quant.start, opts, todo, state, ckpt, t0, progress)
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


def _run_blocks(qmodel, x, start, opts, todo, state, ckpt, t0, progress) -> None:
    bs = getattr(opts, "batch_size", 32) if start == "gptq" else max(32, opts.batch_size)
    first = state["next"]
    x_q = x
    for i in range(first):  # the quantized prefix of a resumed run (its blocks are restored)
        x_q = _forward(qmodel.blocks[i].run, x_q, bs)
    x_fp = None
    if start == "brecq":
        qmodel.set_quant_enabled(False)
        try:
            x_fp = x
            for i in range(first):
                x_fp = _forward(qmodel.blocks[i].run, x_fp, bs)
        finally:
            qmodel.set_quant_enabled(True)
    for i in range(first, len(qmodel.blocks)):
        block = qmodel.blocks[i]
        y_fp = None
        if start == "brecq":
            qmodel.set_quant_enabled(False)
            try:
                y_fp = _forward(block.run, x_fp, bs)
            finally:
                qmodel.set_quant_enabled(True)
        if i in todo:
            layers = block_layers(qmodel, block)
            t_b = time.perf_counter()
            if start == "gptq":
                rec = {"block": block.name, "layers": gptq_block(qmodel, i, x_q, opts, layers)}
            else:
                gptq_rec = gptq_block(qmodel, i, x_q, GPTQOptions(device=opts.device), layers) \
                    if opts.init == "gptq" else None
                rec = brecq_block(qmodel, i, x_q, x_fp, y_fp, opts, layers, progress=progress and opts.progress)
                if gptq_rec is not None:
                    rec["gptq_layers"] = gptq_rec
            rec["seconds"] = time.perf_counter() - t_b
            state["blocks"].append(rec)
        x_q = _forward(block.run, x_q, bs)
        x_fp = y_fp
        state["next"] = i + 1
        state["seconds"] = time.perf_counter() - t0
        ckpt.save(state)
