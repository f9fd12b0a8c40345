"""The menu of per-layer choices and what each choice costs.

A ``Menu`` is the ordered set of options a layer may take: weight bit widths 2..8 and
optionally ``"float"`` (the layer left unquantized). Options are sorted by cost, so gene
``k`` of a layer means ``menu.options[k]`` and a larger index never costs less.

``SizeModel`` is the packed size of a model in bytes, the second objective of the
bit-allocation search: every quantized layer's weights at their bits, bit-packed
(``ceil(params * bits / 8)`` bytes), plus one float32 scale per output channel and one byte
of zero-point per channel where the grid is asymmetric; a float layer costs 4 bytes per
weight; everything else (biases, norms, embeddings) stays float32 and is the same for every
allocation. ``evolq export`` containers may hold sub-byte widths in wider types: the ONNX QDQ
file stores 2-4 bit weights as 4-bit integers, the pt2 program every width in int8
(``docs/bit-allocation.md`` gives both sizes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..qnn.layer_bits import FLOAT, quantized_layers
from ..quant import Quantizer

__all__ = ["Menu", "SizeModel", "parse_menu", "option_bits"]


def option_bits(option) -> int:
    """Bits per weight of an option (``"float"``: 32)."""
    return 32 if option == FLOAT else int(option)


@dataclass(frozen=True)
class Menu:
    """The options a layer may take, cheapest first (``"float"`` last)."""

    options: tuple

    def __post_init__(self):
        opts = tuple(self.options)
        if not opts:
            raise ConfigError("the bit menu is empty: give widths such as 2,3,4,8")
        seen = set()
        for o in opts:
            if o != FLOAT and (isinstance(o, bool) or not isinstance(o, int) or not 2 <= o <= 8):
                raise ConfigError(f"bit menu entries must be widths 2..8 or \"float\", got {o!r}")
            if o in seen:
                raise ConfigError(f"the bit menu repeats {o!r}")
            seen.add(o)
        object.__setattr__(self, "options", tuple(sorted(opts, key=option_bits)))

    def __len__(self) -> int:
        return len(self.options)

    def index(self, option) -> int:
        try:
            return self.options.index(option)
        except ValueError:
            raise ConfigError(f"{option!r} is not on the menu {self.label()}") from None

    @property
    def bits(self) -> list[int]:
        return [option_bits(o) for o in self.options]

    def label(self) -> str:
        return ",".join(str(o) for o in self.options)


def parse_menu(text) -> Menu:
    """A ``Menu`` from ``"2,3,4,8"`` / ``"3,4,float"`` or a list."""
    if isinstance(text, Menu):
        return text
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    opts = []
    for t in items:
        if t in ("", None):
            raise ConfigError(f"the bit menu {text!r} has an empty entry")
        if t == FLOAT:
            opts.append(FLOAT)
            continue
        try:
            opts.append(int(t))
        except (TypeError, ValueError):
            raise ConfigError(f"bit menu entries must be widths 2..8 or \"float\", got {t!r}") from None
    return Menu(tuple(opts))


class SizeModel:
    """Packed bytes of every (layer, option) and of what does not depend on the allocation.

    Args:
        model: the quantized model (its ``quantized_layers`` are the genes, in order).
        menu: the options.
        asymmetric: whether sub-8-bit grids carry a zero-point per channel (one byte each).
    """

    def __init__(self, model: nn.Module, menu: Menu, asymmetric=True):
        self.menu = menu
        self.layers = list(quantized_layers(model))
        mods = quantized_layers(model)
        self.params = torch.tensor([mods[n].weight.numel() for n in self.layers], dtype=torch.float64)
        rows = torch.tensor([mods[n].weight.shape[0] for n in self.layers], dtype=torch.float64)
        cost = torch.zeros(len(self.layers), len(menu), dtype=torch.float64)
        for k, o in enumerate(menu.options):
            if o == FLOAT:
                cost[:, k] = 4.0 * self.params
            else:
                zp = 1.0 if (asymmetric if not callable(asymmetric) else asymmetric(o)) else 0.0
                cost[:, k] = torch.ceil(self.params * o / 8.0) + rows * (4.0 + zp)
        self.cost = cost  # (layers, options) bytes
        # everything that is not a gene's weight or quantizer state stays float32, whatever the allocation
        skip = {id(m.weight) for m in quantized_layers(model, tied=True).values()}
        skip |= {id(b) for m in model.modules() if isinstance(m, Quantizer) for b in m.buffers()}
        seen, fixed = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in seen or id(t) in skip or not t.is_floating_point():
                continue
            seen.add(id(t))
            fixed += t.numel()
        self.fixed = 4.0 * fixed

    def bytes(self, genes: torch.Tensor) -> torch.Tensor:
        """Packed bytes of allocations ``genes`` (P, layers) (option indices)."""
        g = genes.long().reshape(-1, len(self.layers))
        return self.cost.gather(1, g.T).sum(0) + self.fixed

    def avg_bits(self, genes: torch.Tensor) -> torch.Tensor:
        """Parameter-weighted mean weight bits of allocations ``genes`` (float layers: 32)."""
        g = genes.long().reshape(-1, len(self.layers))
        bits = torch.tensor(self.menu.bits, dtype=torch.float64)[g]
        return (bits * self.params).sum(1) / self.params.sum()

    def uniform(self, option) -> torch.Tensor:
        """The genes of every layer at ``option``."""
        return torch.full((len(self.layers),), self.menu.index(option), dtype=torch.long)

    def bytes_of_bits(self, bits: dict) -> float:
        """Packed bytes of a ``{layer: option}`` mapping (every layer named)."""
        g = torch.tensor([self.menu.index(bits[n]) for n in self.layers])
        return float(self.bytes(g)[0])

    def range(self) -> tuple[float, float]:
        return float(self.cost.min(1).values.sum() + self.fixed), float(self.cost.max(1).values.sum() + self.fixed)
