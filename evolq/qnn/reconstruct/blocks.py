"""The block loop of the gptq and brecq starts (``run_blocks``): the blocks one after another,
each reconstructed on the quantized outputs of the blocks before it (brecq also on the float
ones), its record kept and the start's checkpoint written after it. ``run_start`` runs it for
``start="gptq" | "brecq"``, the ofq start for its GPTQ init."""
from __future__ import annotations

import time

import torch

from .brecq import brecq_block
from .common import GPTQOptions, block_layers
from .gptq import gptq_block

__all__ = ["run_blocks"]


@torch.no_grad()
def _forward(run, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([run(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def run_blocks(qmodel, x, start, opts, todo, state, ckpt, t0, progress) -> None:
    """Reconstruct the blocks of ``qmodel`` from ``state["next"]`` on (the indices in ``todo``:
    those with quantized layers) by ``start`` on the inputs ``x``; appends each block's record
    to ``state["blocks"]`` and saves ``state`` to ``ckpt`` after every block."""
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
