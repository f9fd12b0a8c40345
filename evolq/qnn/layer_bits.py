"""Per-layer bit widths: ``QuantConfig.layer_bits``.

A mapping from layer names (or glob patterns, ``fnmatch`` style) to what that Linear/Conv
gets, in place of the config's ``w_bits`` / ``a_bits``:

* an integer 2..8: its weight bits;
* ``"float"``: the layer is left unquantized (no weight or input quantizer);
* a dict ``{"w_bits": 2..8 | "float", "a_bits": 4..8, "group": G | None}``: weight and input bits
  apart, and the weight's group size (``group``: one grid per G input columns,
  ``evolq.quant.groups``; None: per output channel, whatever ``QuantConfig.w_group`` says);
* a string ``"3g64"``: ``{"w_bits": 3, "group": 64}`` (the form ``evolq allocate`` writes).

``QuantConfig.w_group`` groups every quantized layer's weights unless an entry says otherwise; a
group that a layer's input columns (``in_features``; a conv's ``in_channels / groups * kh * kw``)
do not take is a ``ConfigError`` naming the layer and the sizes that would do.

Entries apply in order, after ``edge_bits``: a later entry overrides an earlier one for the
layers both match, and an explicit entry overrides ``edge_bits``. Names are the modules'
dotted paths in the model (``blocks.3.mlp.fc2``, ``patch_embed.proj``, ``head``);
``quantized_layers`` lists them. A pattern that matches no layer is a ``ConfigError`` naming
the closest names. The QKR form's merged ``attn.qkr.qk`` (``evolq.qnn.qkr``) follows its
``attn.qkv`` unless named itself.

``apply_layer_bits`` runs at wrap time, before calibration, so every start (rtn, gptq, brecq,
ofq), saving and loading (the config is saved with the model) and the exports see the
per-layer widths without knowing about them.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping

from torch import nn

from ..errors import ConfigError
from ..quant import DynamicBlockQuantizer, Quantizer, UniformQuantizer
from ..quant.groups import MIN_GROUP, group_error
from ..quant.range import int_range
from .layers import QConv2d, QLinear

__all__ = ["FLOAT", "normalize_layer_bits", "quantized_layers", "resolve_layer_bits", "apply_layer_bits",
           "layer_bits_summary", "is_float_layer", "tied_layer", "parse_grouped", "check_group", "layer_columns"]

FLOAT = "float"
W_RANGE, A_RANGE = (2, 8), (4, 8)
_KEYS = ("w_bits", "a_bits", "group")
_GROUPED = re.compile(r"(\d+)g(\d+)")


def parse_grouped(text: str, what: str = "a grouped width") -> tuple[int, int]:
    """``"3g64"`` -> (3, 64): weight bits 2..8 with a group of at least ``MIN_GROUP`` input columns."""
    m = _GROUPED.fullmatch(str(text).strip())
    if m is None:
        raise ConfigError(f"{what} is BITSgGROUP such as 3g64 (bits 2..8, a group of at least {MIN_GROUP} input "
                          f"columns), got {text!r}")
    bits, group = int(m.group(1)), int(m.group(2))
    if not W_RANGE[0] <= bits <= W_RANGE[1]:
        raise ConfigError(f"{what} {text!r}: weight bits must be in {W_RANGE[0]}..{W_RANGE[1]}")
    check_group(group, f"{what} {text!r}")
    return bits, group


def check_group(group, what: str) -> None:
    """``group`` is None or an integer >= ``MIN_GROUP`` (whether it fits a layer is checked at wrap time)."""
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, int):
        raise ConfigError(f"{what}: a group size is an integer >= {MIN_GROUP} or None, got {group!r}")
    if group < MIN_GROUP:
        raise ConfigError(f"{what}: a group of {group} is below the smallest group size {MIN_GROUP}")


def _bits(value, what: str, lo: int, hi: int, allow_float: bool):
    if allow_float and value == FLOAT:
        return FLOAT
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        extra = ' or "float"' if allow_float else ""
        raise ConfigError(f"layer_bits[{what}] must be an integer in {lo}..{hi}{extra}, got {value!r}")
    return int(value)


def normalize_layer_bits(spec) -> dict[str, dict]:
    """``spec`` as ``{pattern: {"w_bits": int | "float", "a_bits": int (optional)}}``, validated
    (types and ranges only: names are checked against a model by ``resolve_layer_bits``)."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"layer_bits must be a mapping of layer names (or glob patterns) to bits, "
                          f"got {type(spec).__name__}")
    out = {}
    for pattern, value in spec.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"layer_bits keys must be non-empty layer names or patterns, got {pattern!r}")
        if isinstance(value, Mapping):
            unknown = set(value) - set(_KEYS)
            if unknown or not value:
                raise ConfigError(f"layer_bits[{pattern!r}] takes the keys w_bits and a_bits (and group), got "
                                  f"{sorted(map(str, value)) or 'none'}")
            entry = {}
            if "w_bits" in value:
                entry["w_bits"] = _bits(value["w_bits"], f"{pattern!r}].w_bits", *W_RANGE, allow_float=True)
            if "a_bits" in value:
                entry["a_bits"] = _bits(value["a_bits"], f"{pattern!r}].a_bits", *A_RANGE, allow_float=False)
            if "group" in value:
                check_group(value["group"], f"layer_bits[{pattern!r}].group")
                entry["group"] = value["group"]
            for key in ("a_bits", "group"):
                if entry.get("w_bits") == FLOAT and key in entry:
                    raise ConfigError(f"layer_bits[{pattern!r}]: a float layer has no quantizer to give {key}")
        elif isinstance(value, str) and "g" in value and value != FLOAT:
            bits, group = parse_grouped(value, f"layer_bits[{pattern!r}]")
            entry = {"w_bits": bits, "group": group}
        else:
            entry = {"w_bits": _bits(value, repr(pattern), *W_RANGE, allow_float=True)}
        out[pattern] = entry
    return out


def tied_layer(name: str) -> str | None:
    """The layer whose widths ``name`` follows (the QKR form's ``attn.qkr.qk`` follows ``attn.qkv``)."""
    suffix = ".qkr.qk"
    return name[: -len(suffix)] + ".qkv" if name.endswith(suffix) else None


def is_float_layer(layer: nn.Module) -> bool:
    """True for a quantized-layer wrapper whose weights stay float (``layer_bits`` "float")."""
    return isinstance(layer, (QLinear, QConv2d)) and not isinstance(layer.weight_quant, Quantizer)


def quantized_layers(model: nn.Module, tied: bool = False) -> dict[str, nn.Module]:
    """The model's quantized Linear/Conv wrappers by name, in module order (the names
    ``layer_bits`` takes). ``tied``: also the layers that follow another (``tied_layer``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (QLinear, QConv2d)) and (tied or tied_layer(n) is None)}


def resolve_layer_bits(model: nn.Module, spec) -> dict[str, dict]:
    """``{layer name: {"w_bits": ..., "a_bits": ...}}`` for the layers ``spec`` names, the
    entries merged in order. Raises ``ConfigError`` for a pattern that matches no layer."""
    spec = normalize_layer_bits(spec)
    names = list(quantized_layers(model))
    out: dict[str, dict] = {}
    for pattern, entry in spec.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; layers are named like {names[0]!r}" \
                if names else ""
            raise ConfigError(f"layer_bits names {pattern!r}, which matches no quantized layer of this model{hint}")
        for n in hits:
            merged = dict(out.get(n, {}))
            merged.update(entry)
            if merged.get("w_bits") == FLOAT:
                merged.pop("a_bits", None)
                merged.pop("group", None)
            out[n] = merged
    return out


def _set_input_bits(q, bits: int) -> None:
    if isinstance(q, UniformQuantizer):
        q.set_bits(bits)
    elif isinstance(q, Quantizer) and hasattr(q, "qmin"):  # per-channel factor quantizers (unsigned)
        q.bits = bits
        q.qmin, q.qmax = int_range(bits, signed=False)


def _drop_quantizers(qmodel, dropped: set[int]) -> None:
    """Forget quantizers that were removed from the model in every block's view."""
    for b in qmodel.blocks:
        gone = {n for n, q in b.quantizers.items() if id(q) in dropped}
        if not gone:
            continue
        b.quantizers = {n: q for n, q in b.quantizers.items() if n not in gone}
        b.scopes = {s: [n for n in names if n not in gone] for s, names in b.scopes.items()}


def layer_columns(layer: nn.Module) -> int:
    """The input columns of a quantized layer's weight (what a group divides): ``in_features``, or a
    conv's ``in_channels / groups * kh * kw``."""
    return math.prod(layer.weight.shape[1:])


def apply_layer_bits(qmodel, quant) -> dict[str, dict]:
    """Give the layers that ``quant.layer_bits`` names their widths and groups, and every other
    layer ``quant.w_group`` (before calibration); "float" layers lose their weight and input
    quantizers. Returns the resolved entries."""
    spec = getattr(quant, "layer_bits", None)
    w_group = getattr(quant, "w_group", None)
    if not spec and w_group is None:
        return {}
    model = qmodel.model
    resolved = resolve_layer_bits(model, spec)
    every = quantized_layers(model, tied=True)
    for name in every:  # tied layers follow their leader unless named themselves
        lead = tied_layer(name)
        if lead is not None and lead in resolved and name not in resolved:
            resolved[name] = dict(resolved[lead])
    dropped: set[int] = set()
    deploy = getattr(quant, "regime", "fq-vit") == "deploy"
    for name, entry in resolved.items():
        layer = every[name]
        w = entry.get("w_bits")
        if w == FLOAT:
            for attr in ("weight_quant", "input_quant"):
                q = getattr(layer, attr)
                if isinstance(q, Quantizer):
                    dropped.add(id(q))
                setattr(layer, attr, nn.Identity())
            continue
        wq = layer.weight_quant
        if w is not None and isinstance(wq, UniformQuantizer):
            if deploy:
                wq.symmetric = quant.deploy_symmetric(w)
            wq.set_bits(w)
        if "a_bits" in entry:
            _set_input_bits(layer.input_quant, entry["a_bits"])
    weight_only = getattr(quant, "regime", "fq-vit") == "weight-only"
    for name, layer in every.items():  # groups: an entry's own, else the config's w_group
        wq = layer.weight_quant
        # weight-only: w_group groups the MatMulNBits layers; convolutions (float inputs, weights dequantized at
        # load; a depthwise 3x3 has 9 columns) stay per channel unless an entry gives them a group
        default = None if weight_only and isinstance(layer, QConv2d) else w_group
        group = resolved.get(name, {}).get("group", default)
        if group is None or not isinstance(wq, UniformQuantizer):
            continue
        why = group_error(group, layer_columns(layer))
        if why is not None:
            src = f"layer_bits for {name}" if "group" in resolved.get(name, {}) else f"w_group={group}"
            raise ConfigError(f"{src}: layer {name}: {why}")
        wq.set_group(group)
        if isinstance(layer.input_quant, DynamicBlockQuantizer):  # weight-only: MatMulNBits blocks = the groups
            layer.input_quant.block = group
    if dropped:
        # a quantizer shared with a layer that stays quantized (QKR's qk reads qkv's input) is kept
        kept = {id(q) for m in every.values() for q in (m.weight_quant, m.input_quant) if isinstance(q, Quantizer)}
        _drop_quantizers(qmodel, dropped - kept)
    return resolved


def layer_bits_summary(model: nn.Module) -> dict:
    """What the layers hold now: ``{"layers": {name: {"w_bits", "a_bits", "group", "params"}}, "avg_w_bits"}``
    (float layers count 32 bits; ``a_bits`` None where the input is not quantized there; ``group``
    None per output channel)."""
    layers, tot, bits = {}, 0, 0.0
    for name, m in quantized_layers(model).items():
        wq, iq = m.weight_quant, m.input_quant
        w = wq.bits if isinstance(wq, Quantizer) and hasattr(wq, "bits") else FLOAT
        a = iq.bits if isinstance(iq, Quantizer) and hasattr(iq, "bits") else None
        n = m.weight.numel()
        layers[name] = {"w_bits": w, "a_bits": a, "group": getattr(wq, "group", None), "params": n}
        tot += n
        bits += n * (32 if w == FLOAT else w)
    return {"layers": layers, "avg_w_bits": bits / tot if tot else math.nan}
