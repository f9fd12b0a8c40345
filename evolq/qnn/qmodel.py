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

__all__ = ["Block", "QModel", "search_units", "unit_block", "layer_units"]


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
            (its weight quantizers) unless the adapter gives it, and ``"activations"`` too
            (the rest of ``"block"``).
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
        # "activations": the rest of "block" (every searchable scale that is not a weight's)
        if "block" in self.scopes and "activations" not in self.scopes:
            self.scopes["activations"] = [n for n in self.scopes["block"]
                                          if getattr(self.quantizers.get(n), "kind", None) != "weight"]

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
    smooth_groups: list = field(default_factory=list)  # deploy regime: where SmoothQuant factors fold (qnn.smooth)
    smooth_report: dict | None = None  # what smoothing did (evolq.qnn.smooth.smooth_model)
    rotation_report: dict | None = None  # what QuantConfig.rotation did (evolq.qnn.rotate.rotate_model)

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


# -- search units: what one evolutionary search optimises -------------------------------
def layer_units(block: Block, scope: str) -> list[tuple[str, dict]]:
    """``SearchConfig(unit="layer")``: a block's scales under ``scope`` split into one unit
    per conv/linear layer (its weight scales, named after the layer), in module order,
    plus one unit with the rest (activation scales, if the scope has any)."""
    qs = block.searched(scope)
    units = [(n[: -len(".weight_quant")] if n.endswith(".weight_quant") else n, {n: q})
             for n, q in qs.items() if getattr(q, "kind", None) == "weight"]
    rest = {n: q for n, q in qs.items() if getattr(q, "kind", None) != "weight"}
    if rest:
        units.append((f"{block.name}/activations", rest))
    return units


def search_units(qmodel: QModel, scope: str, unit: str = "block") -> dict:
    """The search units of ``qmodel`` under ``scope``, in block order: key -> (name, quantizers).
    ``unit="block"``: key = block index, name None; ``unit="layer"``: key = (block index, j)."""
    out = {}
    for i, b in enumerate(qmodel.blocks):
        if not b.scopes.get(scope):
            continue
        if unit == "layer":
            for j, (name, qs) in enumerate(layer_units(b, scope)):
                out[(i, j)] = (name, qs)
        else:
            out[i] = (None, b.searched(scope))
    return out


def unit_block(key) -> int:
    """The block index of a search unit key (a block index, or (block index, j))."""
    return key if isinstance(key, int) else key[0]
