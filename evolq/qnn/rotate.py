"""Rotations (incoherence processing, as QuaRot / SpinQuant / QuIP#): orthogonal matrices fused
into the float weights before the model is wrapped, so outlier channels of the activations (and
of the weight rows) spread over all channels and every start point sees an easier float model.

This module owns the matrices (``hadamard_matrix``, ``random_orthogonal``), the one online
transform (``OnlineHadamard``), the description of where a model can be rotated
(``RotationPlan``: an adapter names its rotation points the way it names ``smooth_groups``) and
the generic fusing (``rotate_model``). Where each rotation goes, for a pre-norm transformer:

* **Residual stream** (width d), exact and free at run time. A LayerNorm without affine commutes
  with every orthogonal ``Q`` that keeps the all-ones vector (``Q 1 = 1``): the mean of ``x Q``
  is the mean of ``x``, so ``LN(x Q) = LN(x) Q``. Each LayerNorm's affine (gamma, beta) is first
  folded into the Linear(s) reading it (``W <- W diag(gamma)``, ``b <- b + W beta``; gamma = 1,
  beta = 0 afterwards, kept as parameters) and each LayerScale into the Linear writing before it;
  then every writer of the stream (patch embedding, attention proj, fc2, the class/register/
  distillation tokens and the position embedding) becomes ``W <- Q^T W`` and every reader (qkv,
  fc1, the classifier) ``W <- W Q``. SliceGPT and QuaRot reach the same end by centring the
  stream and turning LayerNorm into RMSNorm; keeping ``Q 1 = 1`` instead leaves the LayerNorm
  (and everything that quantizes or exports it) unchanged and needs no centring. It costs no
  generality: ``Q = B diag(1, M) B^T`` with ``B`` orthogonal whose first column is
  ``1 / sqrt(d)``, and ``M`` any orthogonal matrix of size d - 1, so the rotation acts freely on
  every direction but the mean's.
* **Attention heads**, exact and free: per head, v's rows ``W_v,h <- R_h^T W_v,h`` (and its bias)
  and proj's columns ``W_p[:, h] <- W_p[:, h] R_h``; attention mixes tokens, not channels.
* **MLP hidden** (``rotation_mlp``), exact but paid at run time: GELU is elementwise, so the
  hidden activation can only be rotated online: ``OnlineHadamard`` computes ``x -> x T`` between
  the activation and fc2's input quantizer, and ``W_fc2 <- W_fc2 T``. ``T`` is
  ``hadamard_matrix(n)`` applied as a chain of small Kronecker factors (at most 16 wide), a few
  small matmuls per token (for ViT-Tiny's 768 = 3 x 16 x 16: 35 multiply-adds per element
  instead of 768). This is the only rotation that costs run time.

``rotation="hadamard"``: ``M`` random signs (so ``Q = B D B^T``, the randomised Hadamard
conjugated to keep the mean direction) and per head ``R_h = D_h H`` (random signs then the
normalised Hadamard); ``"random"``: ``M`` and ``R_h`` Haar-random orthogonal (QR of a Gaussian).
Both are seeded by ``QuantConfig.rotation_seed``. ``hadamard_matrix(n)`` for ``n = m 2^k``, m odd:
the Kronecker product of the orthonormal DCT-II of size m with the Sylvester Hadamard of size
2^k (a true Hadamard matrix of size m 2^k exists only for some m; for ViT-Tiny's 192 = 3 x 64 and
768 = 3 x 256 the factor 3 is the 3-point DCT); its first row is ``1 / sqrt(n)``, so it is also
the ``B`` above. Families whose adapter names no plan stay unrotated (a ``RotationWarning`` and
``applied: false`` in the report).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["RotationPlan", "RotationWarning", "OnlineHadamard", "hadamard_matrix", "random_orthogonal",
           "residual_rotation", "head_rotation", "rotate_model", "ROTATIONS"]

ROTATIONS = ("none", "hadamard", "random")
MAX_FACTOR = 16  # widest Kronecker factor of the online transform


class RotationWarning(UserWarning):
    """A rotation was asked for but not applied (the family has no exact rotation points)."""


# -- matrices ---------------------------------------------------------------------------------
def _odd_part(n: int) -> tuple[int, int]:
    k = (n & -n).bit_length() - 1
    return n >> k, k


def _dct(m: int) -> torch.Tensor:
    """The orthonormal DCT-II of size m (rows: frequencies; row 0 is ``1 / sqrt(m)``)."""
    i = torch.arange(m, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * m)) * math.sqrt(2.0 / m)
    c[0] = 1.0 / math.sqrt(m)
    return c


def _sylvester(k: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size 2^k (symmetric, orthogonal)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    for _ in range(k):
        h = torch.kron(h, base)
    return h


def _factors(n: int) -> list[torch.Tensor]:
    """Kronecker factors of ``hadamard_matrix(n)``: the odd part's DCT (if any), then Sylvester
    blocks of at most ``MAX_FACTOR``."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive size, got {n}")
    m, k = _odd_part(n)
    out = [_dct(m)] if m > 1 else []
    step = MAX_FACTOR.bit_length() - 1
    while k > 0:
        out.append(_sylvester(min(k, step)))
        k -= min(k, step)
    return out or [torch.ones(1, 1, dtype=torch.float64)]


def hadamard_matrix(n: int) -> torch.Tensor:
    """An orthogonal n x n matrix (float64) with Hadamard structure: the Kronecker product of
    the orthonormal DCT-II of n's odd part and the normalised Sylvester Hadamard of its
    power-of-two part (a plain Hadamard matrix when n is a power of two). Row 0 is ``1 / sqrt(n)``."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for f in _factors(n):
        out = torch.kron(out, f)
    return out


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal n x n matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)[None, :]


def _signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def residual_rotation(d: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The residual stream's rotation: ``Q = B diag(1, M) B^T`` (d x d, float64), orthogonal with
    ``Q 1 = 1`` (so LayerNorm commutes with it), ``B = hadamard_matrix(d)^T``; ``M`` random signs
    (``"hadamard"``) or Haar-random (``"random"``)."""
    b = hadamard_matrix(d).T
    if kind == "hadamard":
        core = torch.diag(torch.cat([torch.ones(1, dtype=torch.float64), _signs(d - 1, generator)]))
    else:
        core = torch.eye(d, dtype=torch.float64)
        core[1:, 1:] = random_orthogonal(d - 1, generator)
    return b @ core @ b.T


def head_rotation(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One attention head's rotation (n x n, float64): ``D H`` (random signs, then the normalised
    Hadamard) for ``"hadamard"``, Haar-random for ``"random"``."""
    if kind == "hadamard":
        return _signs(n, generator)[:, None] * hadamard_matrix(n)
    return random_orthogonal(n, generator)


class OnlineHadamard(nn.Module):
    """``x -> x @ hadamard_matrix(n)`` on the last dimension, computed as one small matmul per
    Kronecker factor (the odd part's DCT and Sylvester blocks of at most 16): the run-time half of
    an MLP hidden rotation (``W_fc2 <- W_fc2 @ hadamard_matrix(n)`` is the offline half). No
    state is saved: the factors are rebuilt from ``n``."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        factors = _factors(n)
        self.sizes = tuple(f.shape[0] for f in factors)
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f, persistent=False)  # float64: cast to the input's dtype

    def extra_repr(self):
        return f"n={self.n}, factors={'x'.join(map(str, self.sizes))}"

    def matrix(self) -> torch.Tensor:
        return hadamard_matrix(self.n)

    def forward(self, x):
        shape = x.shape
        y = x.reshape(-1, *self.sizes)
        last = len(self.sizes)  # positive axes throughout: ONNX Transpose takes no negative perm
        for i in range(last):
            f = getattr(self, f"factor{i}").to(y.dtype)
            y = y @ f if i + 1 == last else (y.transpose(i + 1, last) @ f).transpose(i + 1, last)
        return y.reshape(shape)


# -- the plan an adapter names ------------------------------------------------------------------
@dataclass
class HeadRotation:
    """Per-head rotation points of one attention: v's rows of ``qkv`` (rows ``v_offset + h * head_dim``
    onwards) and the matching input columns of ``proj``."""

    qkv: nn.Linear
    proj: nn.Linear
    num_heads: int
    head_dim: int
    v_offset: int


@dataclass
class MlpRotation:
    """An online rotation of an MLP hidden: ``parent.<attr>`` (the activation feeding ``fc2``) is
    replaced by ``Sequential(activation, OnlineHadamard(fc2.in_features))``."""

    parent: nn.Module
    attr: str
    fc2: nn.Linear


@dataclass
class RotationPlan:
    """Where a model's residual stream (width ``dim``) can be rotated exactly.

    ``writers``: Linear/Conv layers whose output channels (dim 0 of the weight) write into the
    stream; ``embeddings``: parameters added to or concatenated into it (last dim ``dim``);
    ``layer_scales``: (gamma parameter, the writer it scales), folded into the writer first;
    ``readers``: (LayerNorm or None, Linear layers reading its output, or the stream itself for
    None); ``heads``: per-head rotations; ``mlps``: online MLP rotation points (used with
    ``rotation_mlp``)."""

    dim: int
    writers: list = field(default_factory=list)
    embeddings: list = field(default_factory=list)
    layer_scales: list = field(default_factory=list)
    readers: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    mlps: list = field(default_factory=list)


# -- fusing -----------------------------------------------------------------------------------
def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


@torch.no_grad()
def _fold_norm(norm: nn.LayerNorm, readers: list) -> None:
    """LayerNorm affine -> the readers: ``W <- W diag(gamma)``, ``b <- b + W beta``; gamma 1, beta 0."""
    g = norm.weight.double() if norm.weight is not None else None
    beta = norm.bias.double() if getattr(norm, "bias", None) is not None else None
    for lin in readers:
        w = lin.weight.double()
        if beta is not None:
            shift = w @ beta
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.to(lin.weight.dtype))
            else:
                _set(lin.bias, lin.bias.double() + shift)
        if g is not None:
            _set(lin.weight, w * g[None, :])
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


def _rotate_rows(layer, q: torch.Tensor, rows: slice | None = None) -> None:
    """``W[rows] <- q^T W[rows]`` (output channels), ``b[rows] <- b[rows] q``."""
    rows = rows or slice(None)
    w = layer.weight[rows]
    flat = w.double().reshape(w.shape[0], -1)
    _set(layer.weight[rows], (q.T @ flat).reshape(w.shape))
    if layer.bias is not None:
        _set(layer.bias[rows], layer.bias[rows].double() @ q)


def _rotate_cols(layer, q: torch.Tensor, cols: slice | None = None) -> None:
    """``W[:, cols] <- W[:, cols] q`` (input channels)."""
    cols = cols or slice(None)
    _set(layer.weight[:, cols], layer.weight[:, cols].double() @ q)


@torch.no_grad()
def rotate_model(model: nn.Module, plan: RotationPlan | str | None, quant, family: str = "") -> dict:
    """Fuse ``quant.rotation`` into ``model``'s float weights in place, at ``plan``'s points (before
    the model is wrapped); with ``quant.rotation_mlp`` also insert the online MLP rotations.
    ``plan`` None or a string (why the family cannot be rotated): the model stays unrotated with a
    ``RotationWarning``. Returns the report (``QModel.rotation_report``)."""
    kind = quant.rotation
    report = {"rotation": kind, "seed": int(quant.rotation_seed), "mlp": bool(quant.rotation_mlp)}
    if not isinstance(plan, RotationPlan):
        why = plan or f"the {family or 'model'} family's adapter names no exact rotation points"
        warnings.warn(RotationWarning(f"rotation={kind!r} not applied: {why}"), stacklevel=3)
        return {**report, "applied": False, "reason": why}
    names = {m: n for n, m in model.named_modules()}
    pnames = {p: n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(int(quant.rotation_seed))
    for gamma, writer in plan.layer_scales:
        g = gamma.double()
        _set(writer.weight, writer.weight.double() * g.reshape(-1, *([1] * (writer.weight.ndim - 1))))
        if writer.bias is not None:
            _set(writer.bias, writer.bias.double() * g)
        gamma.fill_(1.0)
    for norm, readers in plan.readers:
        if norm is not None:
            _fold_norm(norm, readers)
    q = residual_rotation(plan.dim, kind, gen)
    for w in plan.writers:
        _rotate_rows(w, q)
    for e in plan.embeddings:
        _set(e, e.double() @ q)
    for _norm, readers in plan.readers:
        for lin in readers:
            _rotate_cols(lin, q)
    for h in plan.heads:
        for i in range(h.num_heads):
            r = head_rotation(h.head_dim, kind, gen)
            lo = i * h.head_dim
            _rotate_rows(h.qkv, r, slice(h.v_offset + lo, h.v_offset + lo + h.head_dim))
            _rotate_cols(h.proj, r, slice(lo, lo + h.head_dim))
    online, factors = [], set()
    if quant.rotation_mlp:
        for m in plan.mlps:
            t = OnlineHadamard(m.fc2.in_features)
            _rotate_cols(m.fc2, t.matrix())
            setattr(m.parent, m.attr, nn.Sequential(getattr(m.parent, m.attr), t))
            online.append(names.get(m.fc2, "?"))
            factors.add("x".join(map(str, t.sizes)))
    cost = (f"an online Hadamard (factors {', '.join(sorted(factors))}) before each of {len(online)} fc2 inputs"
            if online else "none (every rotation is fused into the weights)")
    return {**report, "applied": True, "dim": plan.dim,
            "writers": [names.get(w, "?") for w in plan.writers] + [pnames.get(e, "?") for e in plan.embeddings],
            "norms_folded": [names.get(n, "?") for n, _ in plan.readers if n is not None],
            "readers": [names.get(lin, "?") for _, rs in plan.readers for lin in rs],
            "layer_scales": [pnames.get(g, "?") for g, _ in plan.layer_scales],
            "heads": [f"{names.get(h.qkv, '?')}[v] -> {names.get(h.proj, '?')}" for h in plan.heads],
            "online": online, "run_time_cost": cost}
