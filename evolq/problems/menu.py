"""The menu of per-layer choices and what each choice costs.

A ``Menu`` is the ordered set of options a layer may take: weight bit widths 2..8 (one grid per
output channel), grouped widths ``"3g64"`` (3 bits, one grid per 64 input columns,
``evolq.quant.groups``) and optionally ``"float"`` (the layer left unquantized). Options are
sorted by their bits per weight with a group's scales counted (``option_key``: ``3`` < ``2g32``
< ``3g64`` < ``4`` < ``4g128`` < ``8`` < ``float``), so gene ``k`` of a layer means
``menu.options[k]`` and a larger index is a finer grid. A grouped option that a layer's input
columns cannot take is not allowed for that layer (``SizeModel.allowed``).

``SizeModel`` is the packed size of a model in bytes, the second objective of the
bit-allocation search: every quantized layer's weights at their bits, bit-packed
(``ceil(params * bits / 8)`` bytes), plus a float32 scale per output channel (or per group)
and one byte of zero-point per channel (or group) where the grid is asymmetric
(``evolq.quant.groups.weight_bytes``, the one rule the reports use too: ``model_bytes``); a
float layer costs 4 bytes per weight; everything else (biases, norms, embeddings) stays float32
and is the same for every allocation. ``evolq export`` containers may hold sub-byte widths in
wider types: the ONNX QDQ file stores 2-4 bit weights as 4-bit integers, the pt2 program every
width in int8 (``docs/bit-allocation.md`` gives both sizes).

Mean bits (``SizeModel.bits_table``, the ``avg-bits`` budget): a per-channel width counts its
bits, as before groups existed; a grouped option counts its bits plus the bits of the scales
and zero-points it stores beyond the one per output channel that every quantized layer carries
(``8 * (qparam_bytes(group) - qparam_bytes(None)) / params``): 3g64 on a 192-column layer with
asymmetric grids, ``3 + 8 * 5 * (3 - 1) / 192 = 3.42`` bits.

In the weight-only regime a Linear is stored as onnxruntime's ``MatMulNBits`` holds it
(``stored_nbits``, ``evolq.quant.nbits.nbits_bytes``): its codes at the container's bits (3 bits
in 4-bit containers), a float32 scale per (row, block) and the zero-points packed at the
container's bits; its mean bits are those bytes less one scale and zero-point per row, per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..qnn.layer_bits import FLOAT, layer_bits_summary, layer_columns, parse_grouped, quantized_layers
from ..quant import Quantizer
from ..quant.groups import SCALE_BYTES, ZERO_POINT_BYTES, group_error, qparam_bytes, weight_bytes
from ..quant.nbits import DynamicBlockQuantizer, nbits_bytes

__all__ = ["Menu", "SizeModel", "stored_nbits",
           "parse_menu", "option_bits", "option_group", "option_key", "model_bytes"]


def option_bits(option) -> int:
    """Bits per weight of an option (``"float"``: 32; ``"3g64"``: 3)."""
    if option == FLOAT:
        return 32
    return parse_grouped(option)[0] if isinstance(option, str) else int(option)


def option_group(option) -> int | None:
    """The group size of an option (None: per output channel, or float)."""
    return parse_grouped(option)[1] if isinstance(option, str) and option != FLOAT else None


def option_key(option) -> float:
    """The menu's order: bits per weight, a group's scale and zero-point counted (per channel: 0)."""
    g = option_group(option)
    return option_bits(option) + (0.0 if g is None else 8.0 * (SCALE_BYTES + ZERO_POINT_BYTES) / g)


@dataclass(frozen=True)
class Menu:
    """The options a layer may take, cheapest first (``"float"`` last; ``option_key``)."""

    options: tuple

    def __post_init__(self):
        if not self.options:
            raise ConfigError("the bit menu is empty: give widths such as 2,3,4,8")
        opts, seen = [], set()
        for o in self.options:
            if isinstance(o, str) and o != FLOAT:
                b, g = parse_grouped(o, "a grouped bit menu entry")
                o = f"{b}g{g}"
            elif o != FLOAT and (isinstance(o, bool) or not isinstance(o, int) or not 2 <= o <= 8):
                raise ConfigError(f"bit menu entries must be widths 2..8, BITSgGROUP (3g64) or \"float\", got {o!r}")
            if o in seen:
                raise ConfigError(f"the bit menu repeats {o!r}")
            seen.add(o)
            opts.append(o)
        object.__setattr__(self, "options", tuple(sorted(opts, key=option_key)))

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

    @property
    def groups(self) -> list[int | None]:
        return [option_group(o) for o in self.options]

    @property
    def grouped(self) -> list:
        """The grouped options."""
        return [o for o in self.options if option_group(o) is not None]

    def label(self) -> str:
        return ",".join(str(o) for o in self.options)


def parse_menu(text) -> Menu:
    """A ``Menu`` from ``"2,3,4,8"`` / ``"3,4,float"`` / ``"2g32,3g64,3,4g128,4,8"`` or a list."""
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
        if isinstance(t, str) and "g" in t:
            opts.append(t)  # BITSgGROUP, checked by Menu
            continue
        try:
            opts.append(int(t))
        except (TypeError, ValueError):
            raise ConfigError(f"bit menu entries must be widths 2..8, BITSgGROUP (3g64) or \"float\", got "
                              f"{t!r}") from None
    return Menu(tuple(opts))


def stored_nbits(layer) -> bool:
    """Whether ``layer`` ships as a ``MatMulNBits`` node (a weight-only Linear, ``evolq.quant.nbits``):
    its codes in the container's bits, a scale and a packed zero-point per block."""
    return isinstance(getattr(layer, "input_quant", None), DynamicBlockQuantizer)


class SizeModel:
    """Packed bytes of every (layer, option) and of what does not depend on the allocation.

    Args:
        model: the quantized model (its ``quantized_layers`` are the genes, in order).
        menu: the options.
        asymmetric: whether sub-8-bit grids carry a zero-point per channel or group (one byte
            each); a callable takes the option's bits.

    Attributes:
        cost: (layers, options) bytes. ``allowed``: (layers, options), False where a grouped
        option's group does not fit the layer's input columns (its cost there is the per-channel
        one at those bits; never chosen). ``bits_table``: (layers, options) mean bits per weight.

    Raises ``ConfigError`` for a grouped option that fits no layer, or a layer that fits no option.
    """

    def __init__(self, model: nn.Module, menu: Menu, asymmetric=True):
        self.menu = menu
        mods = quantized_layers(model)
        self.layers = list(mods)
        self.params = torch.tensor([mods[n].weight.numel() for n in self.layers], dtype=torch.float64)
        cols = [layer_columns(mods[n]) for n in self.layers]
        shape = (len(self.layers), len(menu))
        cost, bits = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        allowed = torch.ones(shape, dtype=torch.bool)
        for k, o in enumerate(menu.options):
            if o == FLOAT:
                cost[:, k], bits[:, k] = 4.0 * self.params, 32.0
                continue
            b, g = option_bits(o), option_group(o)
            asym = bool(asymmetric(b) if callable(asymmetric) else asymmetric)
            for i, n in enumerate(self.layers):
                rows, c = mods[n].weight.shape[0], cols[i]
                gi = g if g is not None and group_error(g, c) is None else None
                allowed[i, k] = g is None or gi is not None
                if stored_nbits(mods[n]):  # the weight-only regime's MatMulNBits storage (evolq.quant.nbits)
                    cost[i, k] = nbits_bytes(rows, c, b, gi)
                    bits[i, k] = 8.0 * (cost[i, k] - qparam_bytes(rows, c, None, True)) / (rows * c)
                    continue
                cost[i, k] = weight_bytes(rows, c, b, gi, asym)
                extra = qparam_bytes(rows, c, gi, asym) - qparam_bytes(rows, c, None, asym)
                bits[i, k] = b + 8.0 * extra / (rows * c)
            if g is not None and self.layers and not bool(allowed[:, k].any()):
                raise ConfigError(f"the bit menu's {o} fits no quantized layer: {group_error(g, max(cols))} (the "
                                  f"layers' input columns: {', '.join(map(str, sorted(set(cols))))})")
        for i, n in enumerate(self.layers):
            if not bool(allowed[i].any()):
                raise ConfigError(f"layer {n} can take none of the bit menu's options {menu.label()} (none of the "
                                  f"groups divides its {cols[i]} input columns): add a per-channel width")
        self.cost, self.allowed, self.bits_table = cost, allowed, bits  # (layers, options)
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
        """Parameter-weighted mean weight bits of allocations ``genes`` (float layers: 32; grouped
        options with the scales they add, ``bits_table``)."""
        g = genes.long().reshape(-1, len(self.layers))
        bits = self.bits_table.gather(1, g.T).T
        return (bits * self.params).sum(1) / self.params.sum()

    def uniform(self, option) -> torch.Tensor:
        """The genes of every layer at ``option`` (a layer that a grouped option does not fit: the allowed
        option nearest to it in bytes, as the problem's repair chooses)."""
        k = self.menu.index(option)
        g = torch.full((len(self.layers),), k, dtype=torch.long)
        for i in torch.nonzero(~self.allowed[:, k]).flatten().tolist():
            ok = torch.nonzero(self.allowed[i]).flatten()
            g[i] = ok[torch.argmin((self.cost[i, ok] - self.cost[i, k]).abs())]
        return g

    def bytes_of_bits(self, bits: dict) -> float:
        """Packed bytes of a ``{layer: option}`` mapping (every layer named)."""
        g = torch.tensor([self.menu.index(bits[n]) for n in self.layers])
        return float(self.bytes(g)[0])

    def range(self) -> tuple[float, float]:
        return float(self.cost.min(1).values.sum() + self.fixed), float(self.cost.max(1).values.sum() + self.fixed)


def model_bytes(model: nn.Module, quant) -> float:
    """The packed size of a quantized model at the widths and groups its layers hold (``SizeModel``'s
    rule, for reports; ``quant``: its ``QuantConfig``, for the deploy regime's symmetric widths)."""
    held = layer_bits_summary(model)["layers"]

    def option(v):
        return v["w_bits"] if v["w_bits"] == FLOAT or v.get("group") is None else f"{v['w_bits']}g{v['group']}"

    chosen = {n: option(v) for n, v in held.items()}
    sym = quant.deploy_symmetric if getattr(quant, "deploy", False) else None
    sizes = SizeModel(model, Menu(tuple(set(chosen.values()))), asymmetric=(lambda b: not sym(b)) if sym else True)
    return sizes.bytes_of_bits(chosen)
