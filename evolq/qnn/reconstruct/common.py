"""What the starts share: the quantized layers of a block, the checkpoint of a start
(``StartCheckpoint``) and the options of every start."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ...checkpoint import RunFolder, fingerprint, load_checkpoint, save_checkpoint
from ...errors import CheckpointError
from ...quant import UniformQuantizer
from ...start_options import BRECQOptions, GPTQOptions, OFQOptions, start_options
from ..layers import QConv2d, QLinear

__all__ = ["GPTQOptions", "BRECQOptions", "OFQOptions", "start_options", "block_layers", "folded_weight",
           "StartCheckpoint", "START_CKPT_NAME"]

START_CKPT_NAME = "start.safetensors"
EXTRA = "extra/"


def folded_weight(layer):
    """(the weight ``layer``'s weight quantizer sees, its input factor or None)."""
    f = layer._factor() if isinstance(layer, QLinear) else None
    return (layer.folded_weight(f) if f is not None else layer.weight), f


def block_layers(qmodel, block) -> list[tuple[str, nn.Module]]:
    """The quantized Linear/Conv layers whose weight quantizer ``block`` owns (a
    per-output-channel or per-tensor ``UniformQuantizer``), in module order."""
    owned = {id(q) for q in block.quantizers.values()}
    out = []
    for name, m in qmodel.model.named_modules():
        if isinstance(m, (QLinear, QConv2d)) and id(m.weight_quant) in owned:
            q = m.weight_quant
            if isinstance(q, UniformQuantizer) and q.kind == "weight" and (not q.per_channel or q.ch_axis == 0
                                                                           or q.scale.numel() == 1):
                out.append((name, m))
    return out


class StartCheckpoint(RunFolder):
    """Per-block checkpoint of a gptq/brecq start: every quantizer buffer (rounding
    offsets, weight deltas, learned activation steps) and the records of finished
    blocks, written atomically after each block to ``START_CKPT_NAME`` in ``folder``.
    A resumed start continues after the last finished block; since every block's
    randomness comes from its own seed, the result equals an uninterrupted run's."""

    def __init__(self, qmodel, folder, run_id: str, resume: bool):
        self.qmodel, self.run_id = qmodel, run_id
        self.path = Path(folder) / START_CKPT_NAME if folder is not None else None
        self.resume = resume
        self.extra: dict[str, torch.Tensor] = {}  # tensors a start keeps beside the quantizer buffers (ofq)

    @staticmethod
    def run_id_of(qmodel, quant, x: torch.Tensor) -> str:
        return fingerprint(qmodel.arch, qmodel.family, json.loads(json.dumps(dataclasses.asdict(quant), default=str)),
                           x[:: max(1, x.shape[0] // 16)])

    def restore(self) -> dict | None:
        """Install the checkpoint (if resuming and one exists); returns its progress record."""
        if self.path is None or not self.path.exists():
            return None
        if not self.resume:
            raise CheckpointError(f"{str(self.path.parent)!r} already holds a start-point checkpoint: resume it or "
                                  f"choose another folder")
        tensors, meta = load_checkpoint(self.path)
        if meta.get("run_id") != self.run_id:
            raise CheckpointError(f"start checkpoint {str(self.path)!r} belongs to another run (different model, "
                                  f"data or settings); use another output folder")
        qs = self.qmodel.quantizers()
        self.extra = {k[len(EXTRA):]: t for k, t in tensors.items() if k.startswith(EXTRA)}
        for key, t in tensors.items():
            if key.startswith(EXTRA):
                continue
            name, _, bname = key.rpartition(".")
            if name not in qs:
                raise CheckpointError(f"start checkpoint names unknown quantizer {name!r}")
            q = qs[name]
            old = q._buffers.get(bname)
            t = t.to(old.device if old is not None else q.scale.device)
            if bname in ("weight_delta", "round_offset"):
                q.register_buffer(bname, t.clone())
            else:
                setattr(q, bname, t.clone())  # new tensors: the quantizer's caches see the change
        return meta["state"]

    def save(self, state: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Write every quantizer buffer, ``extra`` tensors (read back as ``self.extra``) and ``state``."""
        if self.path is None:
            return
        tensors = {EXTRA + k: t for k, t in (extra or {}).items()}
        for name, q in self.qmodel.quantizers().items():
            for bname, buf in q.named_buffers(recurse=False):
                tensors[f"{name}.{bname}"] = buf
        save_checkpoint(self.path, tensors, {"run_id": self.run_id, "state": state})
