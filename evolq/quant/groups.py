"""Group-wise weight grids: one scale and zero-point per ``group`` consecutive input columns of
each output row, instead of one per row (GPTQ's ``group_size``, llama.cpp's blocks,
onnxruntime's ``MatMulNBits`` blocks).

A weight's *columns* are its dimensions after the first, flattened in memory order: a Linear's
``in_features``, a convolution's ``in_channels / groups * kh * kw`` (the order of ``F.unfold``,
so GPTQ's columns and the groups agree). A grouped quantizer holds its scale and zero-point as
``(rows, columns / group)`` buffers. This module owns that layout (``group_view``,
``per_weight``), the checks of a group size (``group_error``) and what the qparams of a grid
cost in bytes (``qparam_bytes``, ``weight_bytes``: the one size rule the allocation's size model
and the reports share). Nothing here knows about models.
"""
from __future__ import annotations

import math

import torch

__all__ = ["MIN_GROUP", "SCALE_BYTES", "ZERO_POINT_BYTES", "group_view", "per_weight", "group_error",
           "valid_groups", "qparam_bytes", "weight_bytes"]

MIN_GROUP = 8  # smaller groups store more scale bytes than weight bytes at 4 bits
SCALE_BYTES = 4  # the ONNX export writes float32 scales (evolq/export/onnx/weights.py)
ZERO_POINT_BYTES = 1  # and one integer zero-point per row or group (at most 8 bits) where the grid is asymmetric


def group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` (rows, ...) as (rows, columns / group, group)."""
    cols = math.prod(w.shape[1:])
    if cols % group:
        raise ValueError(f"a group of {group} does not divide the weight's {cols} columns")
    return w.reshape(w.shape[0], cols // group, group)


def per_weight(t: torch.Tensor, shape, group: int, pop: bool = False) -> torch.Tensor:
    """A qparam with one value per (row, group), ``(rows, ngroups)`` (any shape holding rows * ngroups
    values in that order), repeated over each group's columns to the weight ``shape``. ``pop``:
    ``t`` carries a leading population dim P, the result is (P, *shape)."""
    rows = shape[0]
    ng = math.prod(shape[1:]) // group
    if pop:
        p = t.shape[0]
        return t.reshape(p, rows, ng, 1).expand(p, rows, ng, group).reshape(p, *shape)
    return t.reshape(rows, ng, 1).expand(rows, ng, group).reshape(shape)


def valid_groups(columns: int) -> list[int]:
    """The group sizes a layer of ``columns`` input columns can take (divisors >= ``MIN_GROUP``)."""
    return [g for g in range(MIN_GROUP, columns + 1) if columns % g == 0]


def group_error(group, columns: int) -> str | None:
    """Why ``group`` cannot group a layer's ``columns`` (None: it can)."""
    if isinstance(group, bool) or not isinstance(group, int):
        return f"a group size is an integer, got {group!r}"
    if group < MIN_GROUP:
        return f"a group of {group} is below the smallest group size {MIN_GROUP}"
    if group > columns:
        return f"a group of {group} is above the layer's {columns} input columns"
    if columns % group:
        ok = valid_groups(columns)
        sizes = ", ".join(map(str, ok[:12])) + (", ..." if len(ok) > 12 else "")
        return f"a group of {group} does not divide the layer's {columns} input columns (sizes that would: {sizes})"
    return None


def qparam_bytes(rows: int, columns: int, group: int | None, asymmetric: bool) -> float:
    """Bytes of the qparams of one weight: a scale (``SCALE_BYTES``) and, for an asymmetric grid, a
    zero-point (``ZERO_POINT_BYTES``) per output row (``group`` None) or per group of each row."""
    n = rows if group is None else rows * (columns // group)
    return float(n * (SCALE_BYTES + (ZERO_POINT_BYTES if asymmetric else 0)))


def weight_bytes(rows: int, columns: int, bits: int, group: int | None, asymmetric: bool) -> float:
    """Packed bytes of a quantized weight: its ``rows * columns`` integers at ``bits``, bit-packed
    (``ceil(params * bits / 8)``), plus ``qparam_bytes``."""
    return float(math.ceil(rows * columns * bits / 8.0)) + qparam_bytes(rows, columns, group, asymmetric)
