"""Loss landscapes (``evolq landscape``, run in this process): one block's scales moved along two
random directions relative to themselves, W4A8, 9x9 grid, +-10 %: ViT-Tiny's last attention block
(qkv+proj weight scales) and one conv of EfficientNet-Lite0's last MBConv block. The PNG is also
copied to docs/figures/."""
from __future__ import annotations

import json
import shutil

from evolq.cli import main as cli

from ..report import Col, Section, Table
from ..runner import ROOT, Suite, register

WHERE = {"vit_tiny_patch16_224": ("11", "attn-weights"), "tf_efficientnet_lite0": ("blocks.6.0", "conv_pwl")}


def run(run):
    a = run.args
    block, layer = WHERE[a.model]
    stem = run.path.with_suffix("")
    code = cli(["landscape", "--model", a.model, "--w-bits", str(a.w_bits), "--a-bits", str(a.a_bits), "--block",
                block, "--layer", layer, "--grid", str(a.grid), "--radius", str(a.radius), "--calib-size",
                str(a.calib), "--limit", str(a.eval), "--infonce-batch", str(a.infonce_batch), "--out", str(stem)])
    if code:
        return code
    run.save(json.loads(run.path.read_text()))
    if not a.smoke:
        shutil.copy(stem.with_suffix(".png"), ROOT / "docs" / "figures")


def surfaces(docs):
    return [{**d, "surface": k} for d in docs.values() for k in d["surfaces"]]


register(Suite(
    name="landscape", doc=__doc__, run=run, order=180, out="landscape_{short}_w{w_bits}a{a_bits}",
    what="loss surfaces, ViT-Tiny block vs EfficientNet-Lite0 layer",
    common={"model": "vit_tiny_patch16_224", "calib": 64, "eval": 32, "threads": 1},
    args=[(("--w-bits",), {"type": int, "default": 4}), (("--a-bits",), {"type": int, "default": 8}),
          (("--grid",), {"type": int, "default": 9}), (("--radius",), {"type": float, "default": 0.1}),
          (("--infonce-batch",), {"type": int, "default": 64})],
    results={"landscape_vit_tiny_w4a8": "--model vit_tiny_patch16_224",
             "landscape_efficientnet_lite0_w4a8": "--model tf_efficientnet_lite0"},
    stale=("landscape_vit_tiny_w4a8", "landscape_efficientnet_lite0_w4a8"),
    smoke={"grid": 3, "calib": 8, "eval": 4, "infonce_batch": 8},
    report=[Section("landscape_*", each=False, blocks=[
        "## Loss landscapes",
        "`evolq landscape` (`python -m benchmarks landscape`): one block's scales moved along two random directions, "
        "relative to themselves. Roughness = mean absolute second difference of the min-max normalised surface "
        "(same grid for every model, so comparable; 0 for a plane).",
        lambda docs: [f"![{s}](../benchmarks/results/{s}.png)" for s in docs],
        Table([Col("model", "arch"), Col("bits", lambda r: f"W{r.get('w_bits', '?')}A{r.get('a_bits', '?')}"),
               Col("block", "block"), Col("scales", "layer"), Col("dim", "dim"),
               Col("grid", lambda r: f"{r['grid']}x{r['grid']} +-{r['radius']}"), Col("surface", "surface"),
               Col("centre", lambda r: r["center"][r["surface"]], "{:.4f}"),
               Col("roughness", lambda r: r["roughness"][r["surface"]], "{:.4f}")], surfaces)])]))
