"""Every layer quantized at every menu width, once: the lookup tables of the bit-allocation fitness.

``WeightTables.build`` takes a calibrated ``QModel`` (any adapter, any regime) and, for each
quantized Linear/Conv and each menu option, the weight that layer's quantizer would return at
that width: a fresh copy of its weight quantizer at ``bits`` (and the option's group, a grouped
option ``"3g64"``), calibrated on the layer's
(folded) weight, rounded by round-to-nearest (``"rtn"``) or by GPTQ (``"gptq"``) with the
Hessian of the layer's inputs in the model with float weights and quantized activations (one
forward for every layer at once). A ``"float"`` option is the float weight with the layer's
input quantizer off.

``WeightTables.install(genes)`` then makes the model compute any allocation by swapping
table entries into the layers (no re-quantization): a candidate costs one forward.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..problems.menu import Menu, option_bits, option_group
from ..qnn.layer_bits import FLOAT, layer_columns, quantized_layers
from ..qnn.reconstruct.common import folded_weight
from ..qnn.reconstruct.gptq import gptq_layer, layer_rows
from ..quant import DynamicBlockQuantizer, Quantizer, UniformQuantizer
from ..quant.groups import group_error

__all__ = ["WeightTables", "TableWeight", "collect_hessians"]

METHODS = ("gptq", "rtn")


class TableWeight(nn.Module):
    """Stands in for a layer's weight quantizer while tables are installed: returns the table
    entry of the current option (its input, the float weight, for ``None``: a float layer)."""

    def __init__(self, entries: list):
        super().__init__()
        self.entries = entries
        self.current = 0

    def forward(self, w):
        e = self.entries[self.current]
        return w if e is None else e


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_hessians(qmodel, layers: dict, x: torch.Tensor, batch_size: int = 16, progress: bool = False,
                     quantized_weights: bool = False):
    """``H = 2 X^T X / n`` per group for every layer in ``layers`` (name -> layer), from the inputs
    each one's weight multiplies while the model runs ``x`` with its activation quantizers on and
    float weights (or, ``quantized_weights``, the model's own quantized weights upstream, as a
    sequential GPTQ sees them) (GPTQ's ``layer_rows``). Returns ``{name: (H (groups, d, d) float64, rows)}``."""
    acc = {n: [None, 0] for n in layers}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            xin = args[0]
            for i in range(0, xin.shape[0], 4):  # a few images at a time: unfolded convs are large
                r = layer_rows(mod, xin[i:i + 4])
                h = torch.einsum("ngd,nge->gde", r, r).double()
                a = acc[name]
                a[0] = h if a[0] is None else a[0] + h
                a[1] += r.shape[0]
        return hook

    wqs = [] if quantized_weights else [m.weight_quant for m in layers.values() if isinstance(m.weight_quant,
                                                                                             Quantizer)]
    saved = [q.enabled for q in wqs]
    for q in wqs:
        q.enabled = False
    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(make_hook(name)))
    try:
        it = range(0, x.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="hessians", leave=False)
        for i in it:
            qmodel.model(x[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        for q, e in zip(wqs, saved):
            q.enabled = e
    return {n: (2.0 * a[0] / max(a[1], 1), a[1]) for n, a in acc.items() if a[0] is not None}


def _quantizer_at(q: UniformQuantizer, bits: int, deploy_symmetric=None, group: int | None = None) -> UniformQuantizer:
    new = copy.deepcopy(q)
    new.pop_scale = None
    new.set_rounding()
    if deploy_symmetric is not None:
        new.symmetric = deploy_symmetric(bits)
    new.set_bits(bits)
    new.set_group(group)
    return new


class WeightTables:
    """Per-layer, per-option quantized weights of a ``QModel`` (see the module docstring).

    Attributes:
        layers: gene order: the quantized layers' names (``quantized_layers``).
        menu: the options.
        entries: ``entries[i][k]``: what layer i's weight quantizer returns at option k (None: float).
        records: per layer, per option: GPTQ's layer-output error and method used.
    """

    def __init__(self, qmodel, menu: Menu, layers: list[str], entries: list[list], records: list, method: str,
                 seconds: float):
        self.qmodel, self.menu, self.layers, self.entries = qmodel, menu, layers, entries
        self.records, self.method, self.seconds = records, method, seconds
        self._mods = quantized_layers(qmodel.model)
        self._input_on = {n: getattr(self._mods[n].input_quant, "enabled", None) for n in layers}
        groups = [None if o == FLOAT else option_group(o) for o in menu.options]
        self._blocks = {n: [g if g is not None and group_error(g, layer_columns(self._mods[n])) is None else None
                            for g in groups] for n in layers}  # weight-only: the input blocks of each option
        self._block_on = {n: getattr(self._mods[n].input_quant, "block", None) for n in layers}

    @classmethod
    @torch.no_grad()
    def build(cls, qmodel, x: torch.Tensor, menu: Menu, method: str = "gptq", quant=None, gptq_options=None,
              progress: bool = False, inputs: str = "float") -> WeightTables:
        """Tables for ``qmodel`` (calibrated; its weight quantizers give each layer's grid type and
        observer); ``x``: calibration inputs for GPTQ's Hessians; ``quant``: the ``QuantConfig``
        (the deploy regime's symmetric/asymmetric choice per width); ``inputs``: GPTQ's Hessians from
        the inputs with float weights upstream (``"float"``) or the model's quantized ones
        (``"quantized"``, the widths it holds)."""
        from ..start_options import GPTQOptions

        if method not in METHODS:
            from ..errors import ConfigError

            raise ConfigError(f"unknown table method {method!r}; choose one of: {', '.join(METHODS)}")
        t0 = time.perf_counter()
        mods = quantized_layers(qmodel.model)
        names = list(mods)
        hess = collect_hessians(qmodel, mods, x, progress=progress, quantized_weights=inputs == "quantized") \
            if method == "gptq" else {}
        opts = gptq_options or GPTQOptions()
        deploy_sym = quant.deploy_symmetric if quant is not None and getattr(quant, "deploy", False) else None
        entries, records = [], []
        groups = [option_group(o) for o in menu.options]
        it = names
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(names, desc=f"{method} tables", leave=False)
        for name in it:
            layer = mods[name]
            base = layer.weight_quant
            row, rec = [], []
            for o, group in zip(menu.options, groups):
                if o == FLOAT or not isinstance(base, UniformQuantizer):
                    row.append(None)
                    rec.append({"method": "float"})
                    continue
                if group is not None and group_error(group, layer_columns(layer)) is not None:
                    group = None  # not allowed for this layer (SizeModel.allowed): per channel, never chosen
                q = _quantizer_at(base, option_bits(o), deploy_sym, group)
                layer.weight_quant = q
                try:
                    wf = folded_weight(layer)[0].detach()
                    q.calibrate_from(wf)
                    r = {"method": "rtn"}
                    if method == "gptq" and name in hess:
                        h, n_rows = hess[name]
                        r = gptq_layer(layer, h, n_rows, opts, name)
                    row.append(q(wf).detach().clone())
                    rec.append({k: v for k, v in r.items() if k in ("method", "output_error_gptq",
                                                                    "output_error_rtn")})
                finally:
                    layer.weight_quant = base
            entries.append(row)
            records.append(rec)
        return cls(qmodel, menu, names, entries, records, method, time.perf_counter() - t0)

    def nbytes(self) -> int:
        return sum(e.numel() * e.element_size() for row in self.entries for e in row if e is not None)

    @contextmanager
    def installed(self):
        """Table weights in place of the layers' weight quantizers for the ``with`` block;
        ``set(genes)`` chooses the options."""
        saved = {}
        try:
            for i, name in enumerate(self.layers):
                m = self._mods[name]
                saved[name] = m.weight_quant
                m.weight_quant = TableWeight(self.entries[i])
            yield self
        finally:
            for name, q in saved.items():
                self._mods[name].weight_quant = q
            for name in self.layers:
                iq = self._mods[name].input_quant
                if isinstance(iq, Quantizer):
                    iq.enabled = self._input_on[name]
                if isinstance(iq, DynamicBlockQuantizer):
                    iq.block = self._block_on[name]

    def set(self, genes, layers: range | None = None) -> None:
        """Install options ``genes`` (one index per layer) in layers ``layers`` (default all)."""
        for i in layers if layers is not None else range(len(self.layers)):
            name = self.layers[i]
            m = self._mods[name]
            k = int(genes[i])
            m.weight_quant.current = k
            iq = m.input_quant
            if isinstance(iq, DynamicBlockQuantizer):  # weight-only: the input blocks follow the option's group
                iq.block = self._blocks[name][k]
            if isinstance(iq, Quantizer):
                iq.enabled = bool(self._input_on[name]) and self.entries[i][k] is not None
