"""The block view of a quantized model: what search code sees.

An adapter turns a model into a ``QModel``: the (in-place) fake-quantized model
plus an ordered list of ``Block``s. Running the blocks one after another on an
input gives the model's output, so the quantized activations entering block i can
be cached while block i is searched. Each block names the quantizers it owns,
grouped by search scope.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant import Quantizer

__all__ = ["Block", "QModel"]


@dataclass
class Block:
    """One stage of the model.

    Attributes:
        name: a readable name (``"blocks.3"``).
        run: maps this block's input to its output (batch dimension first).
        quantizers: every quantizer the block owns, by qualified name.
        scopes: search scope -> names (keys of ``quantizers``) of the quantizers whose
            scales are searched under that scope. A scope with no names means the
            block is not searched under it. ``"weights"`` is derived from ``"block"``
            (its weight quantizers) unless the adapter gives it.
    """

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    quantizers: dict[str, Quantizer] = field(default_factory=dict)
    scopes: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        # "weights": the weight scales among the block's searchable scales (derived unless given)
        if "block" in self.scopes and "weights" not in self.scopes:
            self.scopes["weights"] = [n for n in self.scopes["block"]
                                      if getattr(self.quantizers.get(n), "kind", None) == "weight"]

    def searched(self, scope: str) -> dict[str, Quantizer]:
        return {n: self.quantizers[n] for n in self.scopes.get(scope, [])}


@dataclass
class QModel:
    """A fake-quantized model and its block view (not a module: run ``qmodel.model(x)``).

    Attributes:
        model: the quantized ``nn.Module`` (the user's model, modified in place).
        blocks: ordered blocks; running them in order equals ``model(x)``.
        family: adapter name that built it.
        arch: architecture name (e.g. the timm model name), for saving/loading.
    """

    model: nn.Module
    blocks: list[Block]
    family: str
    arch: str = ""
    config: object = None
    calibration_digests: frozenset | None = None  # per-sample hashes of the calibration inputs (None: unknown)
    start_report: dict | None = None  # what a gptq/brecq start did (evolq.qnn.reconstruct)

    def quantizers(self) -> dict[str, Quantizer]:
        out = {}
        for b in self.blocks:
            out.update(b.quantizers)
        return out

    def set_quant_enabled(self, enabled: bool) -> None:
        for q in self.quantizers().values():
            q.enabled = enabled

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for b in self.blocks[start:stop]:
            x = b.run(x)
        return x
