"""``evolq landscape``: loss surfaces of one block's scales along two random directions (heat map
+ 3-D PNG and JSON)."""
from __future__ import annotations

import time

from .args import add_model_args
from .shared import load_inputs


def add_parser(sub):
    pl = sub.add_parser("landscape", help="loss surfaces of one block's scales along two random directions "
                                          "(heat map + 3-D PNG and JSON)")
    add_model_args(pl, quantize=False)
    pl.add_argument("--block", default="-1", help="searchable block: index (3 -> blocks.3; -1 the last) or name "
                                                  "(blocks.5.0)")
    pl.add_argument("--layer", default="attn-weights",
                    help="a scope (attn-weights, weights, activations, block) or one layer's weight scales "
                         "(qkv, proj, fc1, fc2; "
                         "conv_pw, conv_dw, ...)")
    pl.add_argument("--grid", type=int, default=9, help="points per axis (default 9)")
    pl.add_argument("--radius", type=float, default=0.1, help="largest relative change (RMS) per axis")
    pl.add_argument("--losses", default="infonce,mse", help="calibration losses, comma-separated")
    pl.add_argument("--infonce-batch", type=int, default=100)
    pl.add_argument("--max-batch", type=int, default=512, help="candidates x images per forward chunk")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.png")


def run(args) -> int:
    from ..api import prepare_model
    from ..landscape import block_landscape, save_landscape

    model, quant, xc, xe, ye = load_inputs(args, quiet=True)
    qmodel = prepare_model(model, xc, quant, arch=args.model)
    t0 = time.perf_counter()
    res = block_landscape(qmodel, xc, xe, ye, block=args.block, layer=args.layer, grid=args.grid,
                          radius=args.radius, seed=args.seed, losses=[x for x in args.losses.split(",") if x],
                          infonce_batch=args.infonce_batch, max_batch=args.max_batch)
    res["seconds"] = time.perf_counter() - t0
    res["w_bits"], res["a_bits"] = quant.w_bits, quant.a_bits
    js, png = save_landscape(res, args.out)
    print(f"{args.model} W{quant.w_bits}A{quant.a_bits} {res['block']} [{args.layer}]: {res['dim']} scales, "
          f"{args.grid}x{args.grid} grid, +-{args.radius}, {res['seconds']:.0f} s")
    print(f"{'surface':<16}{'center':>12}{'min':>12}{'max':>12}{'roughness':>11}")
    for k, g in res["surfaces"].items():
        flat = [x for row in g for x in row]
        print(f"{k:<16}{res['center'][k]:12.4f}{min(flat):12.4f}{max(flat):12.4f}{res['roughness'][k]:11.4f}")
    print(f"wrote {js} and {png}")
    return 0
