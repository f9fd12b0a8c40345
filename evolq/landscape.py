"""Loss landscapes of one block's quantization scales (the paper's Fig. 1/3 kind).

The scales ``s`` of one block (a search scope, or one layer's weight scales) are
moved along two random directions, relative to themselves::

    s(a, b) = s * (1 + a * u + b * v)

where ``u`` and ``v`` are seeded Gaussian vectors, made orthogonal and scaled to unit
RMS, so ``a = 0.05`` changes the scales by 5 % (RMS over elements). Every grid point
is a candidate of one batched ``BlockFitness`` call (population mode, cached block
inputs), so a 9 x 9 grid costs 81 candidates through the block and what follows it.

Surfaces: calibration-set losses against the float outputs (infoNCE, MSE, ...) and
evaluation-split metrics (cross-entropy against labels, infoNCE against the float
outputs of the evaluation images, top-1). ``roughness`` is the mean absolute second
difference of the min-max normalised surface (both grid axes), a scale-free measure
of how jagged a surface is on the same grid.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .fitness import BlockFitness, reference_outputs
from .losses import get_loss
from .qnn.qmodel import QModel
from .qnn.scales import ScaleSpace

__all__ = ["resolve_block", "landscape_space", "directions", "block_landscape", "roughness",
           "plot_landscape", "save_landscape"]


def resolve_block(qmodel: QModel, block) -> int:
    """Block index from an index into the searchable blocks (``3`` -> ``blocks.3``),
    a block name (``"blocks.5.0"``) or ``-1`` (the last searchable block)."""
    names = [b.name for b in qmodel.blocks]
    searchable = [i for i, b in enumerate(qmodel.blocks) if any(b.scopes.get(s) for s in b.scopes)]
    if isinstance(block, str) and not block.lstrip("-").isdigit():
        if block not in names:
            raise ConfigError(f"no block named {block!r}; blocks: {', '.join(names)}")
        return names.index(block)
    i = int(block)
    if f"blocks.{i}" in names:
        return names.index(f"blocks.{i}")
    if -len(searchable) <= i < len(searchable):
        return searchable[i]
    raise ConfigError(f"block {block!r} out of range: {len(searchable)} searchable blocks")


def landscape_space(qmodel: QModel, index: int, layer: str = "attn-weights") -> ScaleSpace:
    """The scales perturbed: a search scope of the block (``"attn-weights"``, ``"block"``)
    or one layer's weight scales (``"qkv"``, ``"proj"``, ``"fc1"``, ``"fc2"``,
    ``"conv_pwl"``, ...: the quantizer ``<block>.<...>.<layer>.weight_quant``)."""
    blk = qmodel.blocks[index]
    if layer in blk.scopes:
        qs = blk.searched(layer)
    else:
        qs = {n: q for n, q in blk.quantizers.items()
              if n.endswith(f".{layer}.weight_quant") and getattr(q, "searchable", True)}
    if not qs:
        layers = sorted({n[len(blk.name) + 1:-len(".weight_quant")].split(".")[-1]
                         for n in blk.quantizers if n.endswith(".weight_quant")})
        raise ConfigError(f"block {blk.name!r} has no scales for {layer!r}; choose a scope "
                          f"({', '.join(s for s in blk.scopes if blk.scopes[s]) or 'none'}) or a layer "
                          f"({', '.join(layers) or 'none'})")
    return ScaleSpace(qs)


def directions(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthogonal seeded directions with unit RMS."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    if dim > 1:
        v = v - (v @ u) / (u @ u) * u
    u = u / u.pow(2).mean().sqrt()
    v = v / v.pow(2).mean().sqrt().clamp_min(1e-12)
    return u.float(), v.float()


def roughness(surface) -> float:
    """Mean absolute second difference (both axes) of the min-max normalised surface."""
    z = torch.as_tensor(surface, dtype=torch.float64)
    span = (z.max() - z.min()).item()
    if not math.isfinite(span) or span == 0:
        return 0.0
    z = (z - z.min()) / span
    d0 = (z[2:] - 2 * z[1:-1] + z[:-2]).abs()
    d1 = (z[:, 2:] - 2 * z[:, 1:-1] + z[:, :-2]).abs()
    return torch.cat([d0.reshape(-1), d1.reshape(-1)]).mean().item()


def _eval_surfaces(out, ref, labels, infonce_batch):
    """Evaluation-split surfaces from outputs (P, N, K)."""
    res = {"eval_infonce": get_loss("infonce")(out, ref, batch_size=infonce_batch)}
    if labels is not None:
        p, n, k = out.shape
        lab = labels.to(out.device).expand(p, n).reshape(-1)
        ce = F.cross_entropy(out.double().reshape(-1, k), lab, reduction="none").reshape(p, n).mean(1)
        res["eval_ce"] = ce
        res["eval_top1"] = (out.argmax(-1) == labels.to(out.device)).double().mean(1) * 100
    return res


@torch.no_grad()
def block_landscape(qmodel: QModel, calib_x: torch.Tensor, eval_x: torch.Tensor | None = None,
                    eval_y: torch.Tensor | None = None, *, block=-1, layer: str = "attn-weights",
                    grid: int = 9, radius: float = 0.1, seed: int = 0,
                    losses=("infonce", "mse"), infonce_batch: int = 100, temperature: float = 3.0,
                    max_batch: int = 512) -> dict:
    """Loss surfaces of one block's scales on a ``grid x grid`` lattice over ``[-radius, radius]^2``.

    Returns a JSON-able dict: the axis values, each surface as a nested list
    (``[i][j]`` = direction-1 step i, direction-2 step j), the roughness of each
    surface and what was perturbed. The model's scales are left unchanged.
    """
    if not isinstance(grid, int) or grid < 3:
        raise ConfigError(f"grid must be an integer >= 3, got {grid!r}")
    if not radius > 0:
        raise ConfigError(f"radius must be positive, got {radius!r}")
    index = resolve_block(qmodel, block)
    space = landscape_space(qmodel, index, layer)
    s0 = space.vector()
    u, v = directions(len(space), seed)
    axis = torch.linspace(-radius, radius, grid)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    rel = 1 + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
    cands = (s0 * rel).abs().clamp_min(1e-8)

    ib = min(infonce_batch, calib_x.shape[0])
    fns = {name: get_loss(name) for name in losses}
    ref = reference_outputs(qmodel, calib_x)
    fit = BlockFitness(qmodel, calib_x, ref, fns.get("infonce", get_loss("infonce")), max_batch=max_batch)
    out = fit.outputs(index, space, cands)
    surfaces = {}
    for name, fn in fns.items():
        kw = {"batch_size": ib, "temperature": temperature} if name == "infonce" else {}
        surfaces[f"calib_{name}"] = fn(out, ref, **kw)
    del out
    if eval_x is not None:
        ref_e = reference_outputs(qmodel, eval_x)
        fit_e = BlockFitness(qmodel, eval_x, ref_e, fns.get("infonce", get_loss("infonce")), max_batch=max_batch)
        out_e = fit_e.outputs(index, space, cands)
        surfaces.update(_eval_surfaces(out_e, ref_e, eval_y, min(infonce_batch, eval_x.shape[0])))
        del out_e
    grids = {k: v.double().reshape(grid, grid) for k, v in surfaces.items()}
    center = grid // 2
    return {
        "block": qmodel.blocks[index].name, "layer": layer, "quantizers": space.names, "dim": len(space),
        "family": qmodel.family, "arch": qmodel.arch, "grid": grid, "radius": float(radius), "seed": int(seed),
        "calib_images": int(calib_x.shape[0]), "eval_images": 0 if eval_x is None else int(eval_x.shape[0]),
        "axis": axis.tolist(),
        "surfaces": {k: g.tolist() for k, g in grids.items()},
        "center": {k: g[center, center].item() for k, g in grids.items()},
        "roughness": {k: roughness(g) for k, g in grids.items()},
    }


_TITLES = {"calib_infonce": "calibration infoNCE", "calib_mse": "calibration MSE", "calib_cosine": "calibration cosine",
           "calib_kl": "calibration KL", "eval_ce": "eval cross-entropy", "eval_infonce": "eval infoNCE",
           "eval_top1": "eval top-1 (%)"}


def plot_landscape(result: dict, path, dpi: int = 70) -> Path:
    """Heat map and 3-D surface of every surface in ``result``, one row each, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result["surfaces"])
    axis = np.asarray(result["axis"])
    a, b = np.meshgrid(axis, axis, indexing="ij")
    fig = plt.figure(figsize=(8, 3.2 * len(names)))
    for r, name in enumerate(names):
        z = np.asarray(result["surfaces"][name])
        ax = fig.add_subplot(len(names), 2, 2 * r + 1)
        im = ax.imshow(z.T, origin="lower", extent=[axis[0], axis[-1], axis[0], axis[-1]], cmap="viridis",
                       aspect="auto")
        ax.plot(0, 0, "r+")
        ax.set_xlabel("direction 1 (relative)")
        ax.set_ylabel("direction 2 (relative)")
        ax.set_title(f"{_TITLES.get(name, name)}; roughness {result['roughness'][name]:.3f}", fontsize=9)
        fig.colorbar(im, ax=ax)
        ax3 = fig.add_subplot(len(names), 2, 2 * r + 2, projection="3d")
        ax3.plot_surface(a, b, z, cmap="viridis", linewidth=0)
        ax3.set_title(_TITLES.get(name, name), fontsize=9)
        ax3.tick_params(labelsize=6)
    fig.suptitle(f"{result['arch'] or result['family']} {result['block']} [{result['layer']}], "
                 f"{result['dim']} scales, {result['grid']}x{result['grid']} grid", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_landscape(result: dict, stem) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    js = stem.with_suffix(".json")
    js.write_text(json.dumps(result, indent=1))
    return js, plot_landscape(result, stem.with_suffix(".png"))
