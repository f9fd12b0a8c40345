"""What onnxruntime's ``MatMulNBits`` (com.microsoft, onnxruntime >= 1.30) stores and computes: the
weight-only regime's storage rules and its dynamic block-wise int8 input quantizer.

A ``MatMulNBits`` node holds a Linear's weight (N output rows, K input columns) as unsigned
``bits``-bit codes in blocks of ``block_size`` consecutive input columns (a power of two, 16..256),
one float32 scale and one zero-point per (row, block), the zero-points packed at ``bits`` per value
(two to a byte at 4 bits) and each row's padded to a whole byte. With ``accuracy_level=4`` the x86
kernels quantize the input A per row and per block along K: ``amax / 127`` scale,
``round_half_even(a * 127 / amax)``, signed 8 bits; the int8 dot products are exact and summed in
float, so the node computes ``DynamicBlockQuantizer(A) @ ((q - z) * s)``.

Measured with onnxruntime 1.32 on an AMD EPYC (Zen 4, avx512_vnni): 4- and 8-bit codes run the int8
path at every block size 16..256, 2-bit codes only at 32..128 (elsewhere the node silently computes
in float). So evolq stores 2 bits as 2 where the block allows it and in 4-bit containers elsewhere,
3 bits in 4-bit containers (no 3-bit kernel exists), 5-7 bits in 8-bit ones: ``container_bits``.
``nbits_bytes`` is what such a weight costs in the file, the size rule of the weight-only regime.
"""
from __future__ import annotations

import math

import torch

from .quantizers import Quantizer

__all__ = ["NBITS_BLOCKS", "NBITS_MIN_ORT", "nbits_block", "container_bits", "nbits_group_error", "nbits_bytes",
           "DynamicBlockQuantizer", "dynamic_block_quant"]

NBITS_BLOCKS = (16, 32, 64, 128, 256)  # the block sizes MatMulNBits runs in int8 (accuracy_level 4)
NBITS_MIN_ORT = "1.30"  # the onnxruntime that runs MatMulNBits at 2, 4 and 8 bits with int8 inputs on x86
_TWO_BIT_BLOCKS = (32, 64, 128)  # 2-bit codes: the int8 path only at these blocks (onnxruntime 1.32)


def nbits_block(columns: int, group: int | None) -> int:
    """The ``block_size`` of a layer of ``columns`` inputs: its weight ``group``, or for a per-channel
    weight the largest of ``NBITS_BLOCKS`` that divides ``columns`` (the row's scale repeated in every
    block; 32 with a padded last block when none divides)."""
    if group is not None:
        return int(group)
    return next((b for b in reversed(NBITS_BLOCKS) if columns % b == 0), 32)


def container_bits(bits: int, block: int) -> int:
    """The ``bits`` attribute that stores ``bits``-bit codes in blocks of ``block``: 2 (where the int8
    path runs 2-bit codes), 4 (2- and 3-bit codes elsewhere, 4-bit codes) or 8 (5-8 bits)."""
    if bits == 2 and block in _TWO_BIT_BLOCKS:
        return 2
    return 4 if bits <= 4 else 8


def nbits_group_error(group) -> str | None:
    """Why a weight group cannot be a ``MatMulNBits`` block (None: it can)."""
    if group is None:
        return None
    if group not in NBITS_BLOCKS:
        return (f"onnxruntime's MatMulNBits runs blocks of {', '.join(map(str, NBITS_BLOCKS))} input columns, "
                f"not {group}")
    return None


def nbits_bytes(rows: int, columns: int, bits: int, group: int | None) -> float:
    """Bytes of one Linear weight as ``MatMulNBits`` stores it: the codes at their container's bits
    (every block padded to whole bytes, the last block to ``block`` columns), a float32 scale per
    (row, block) and the zero-points at the container's bits, each row's packed to whole bytes."""
    block = nbits_block(columns, group)
    cb = container_bits(bits, block)
    nb = math.ceil(columns / block)
    codes = rows * nb * math.ceil(block * cb / 8)
    return float(codes + rows * nb * 4 + rows * math.ceil(nb * cb / 8))


def dynamic_block_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as MatMulNBits' int8 path sees it: per row of the last axis, per ``block`` columns,
    ``round(x * 127 / amax) * amax / 127`` (round half to even; a block of zeros stays zero; a last
    partial block is quantized over its own columns)."""
    k = x.shape[-1]
    pad = (-k) % block
    v = torch.nn.functional.pad(x, (0, pad)) if pad else x
    v = v.reshape(*v.shape[:-1], -1, block)
    amax = v.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.round(v * (127.0 / safe)) * (safe / 127.0)
    q = q.reshape(*x.shape[:-1], k + pad)
    return q[..., :k] if pad else q


class DynamicBlockQuantizer(Quantizer):
    """A Linear's input in the weight-only regime: dynamic symmetric int8 per row and per ``block``
    input columns (``dynamic_block_quant``), what ``MatMulNBits`` computes with ``accuracy_level=4``.
    It has no calibration (the scales are the input's own) and nothing to search; ``block`` follows
    the layer's weight group (``nbits_block``; None: from the input's width at run time). Passes
    the float input through while calibrating, like every quantizer's observation pass."""

    kind = "activation"
    bits = 8
    signed = True

    def __init__(self, block: int | None = None):
        super().__init__()
        self.block = block
        self.calibrated.fill_(True)

    def extra_repr(self):
        return f"int8 dynamic, block={self.block or 'auto'}"

    def block_for(self, columns: int) -> int:
        return self.block if self.block is not None else nbits_block(columns, None)

    def forward(self, x):
        if not self.enabled or self.calibrating:
            return x
        return dynamic_block_quant(x, self.block_for(x.shape[-1]))
