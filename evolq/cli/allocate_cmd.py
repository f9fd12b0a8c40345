"""``evolq allocate``: bits per layer under a size, mean-bits or latency budget, then the chosen
model built, evaluated and saved with its Pareto front (pareto.json, pareto.png)."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import AllocationConfig, SearchConfig, field_default
from ..errors import EvolQError
from .args import add_model_args, add_scale_out_args, key_value_arg, s_default
from .shared import load_inputs, quant_config, ray_connected, short_metrics, table, width_counts


def _a(name):
    return field_default(AllocationConfig, name)


def add_parser(sub):
    pa = sub.add_parser("allocate", help="choose bits per layer under a size or latency budget by evolutionary "
                                         "search (NSGA-II on [loss, size] or [loss, size, latency]), then build, "
                                         "evaluate and save that model")
    add_model_args(pa, quantize=False, w_default=None)
    from ..losses import list_losses
    from ..search.allocators import list_allocators

    pa.add_argument("--menu", default=_a("menu"), help=f"the widths a layer may take, comma-separated (2..8 per "
                                                       f"output channel, BITSgGROUP such as 3g64 for group-wise "
                                                       f"weights, and float; default {_a('menu')})")
    pa.add_argument("--budget", default=_a("budget"),
                    help=f"avg-bits=B (parameter-weighted mean weight bits), size-mb=S (packed size) or latency-ms=T "
                         f"(default {_a('budget')})")
    pa.add_argument("--searcher", default=_a("searcher"), choices=list_allocators(),
                    help="nsga2 (evolutionary, default), evopress (EvoPress's (1+lambda) level-switch evolution with "
                         "staged selection), ilp (sensitivity + integer linear program), greedy (bit dropping) or "
                         "random")
    pa.add_argument("--searcher-arg", type=key_value_arg, action="append", default=[], metavar="KEY=VALUE",
                    help="extra searcher argument, repeatable (nsga2: rate=0.05, neighbour=0.7, ilp_seeds=12, "
                         "screen=8; evopress: offspring=32, survivors=4,1, images=0.015625,0.125,1.0)")
    pa.add_argument("--evaluations", type=int, default=_a("evaluations"),
                    help=f"fitness evaluations of the search, the sensitivities included (default {_a('evaluations')})")
    pa.add_argument("--popsize", type=int, default=_a("popsize"), help=f"population (default {_a('popsize')})")
    pa.add_argument("--fitness-images", type=int, default=_a("fitness_images"),
                    help=f"calibration images of the fitness (default {_a('fitness_images')})")
    pa.add_argument("--holdout", type=float, default=_a("holdout"),
                    help=f"calibration fraction kept out of everything; it chooses among the front (default "
                         f"{_a('holdout')})")
    pa.add_argument("--compare-additive", action="store_true",
                    help="the additive answer (sensitivity + ILP at the budget) competes on the hold-out for the "
                         "final choice (it is reported either way)")
    pa.add_argument("--loss", default=_a("loss"), choices=list_losses(), help="the fitness loss (default kl)")
    pa.add_argument("--tables", default=_a("tables"), choices=("auto", "gptq", "rtn"),
                    help="how the fitness quantizes each layer at each width (auto: rtn for the rtn start, else gptq)")
    pa.add_argument("--latency-batch", type=int, default=_a("latency_batch"),
                    help=f"with latency-ms: images per call the layers are timed at (default {_a('latency_batch')})")
    pa.add_argument("--latency-threads", type=int, default=_a("latency_threads"),
                    help=f"with latency-ms: threads of the deploy runtime (default {_a('latency_threads')})")
    pa.add_argument("--passes", type=int, default=0, help="Evol-Q scale-search passes on the chosen model (default 0)")
    pa.add_argument("--cycles", type=int, default=s_default("cycles"),
                    help="with --passes: evaluations per block and pass")
    pa.add_argument("--seed", type=int, default=_a("seed"))
    pa.add_argument("--out", required=True, help="output folder (pareto.json, pareto.png, report.json, model/)")
    pa.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    pa.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scale_out_args(pa, what="the allocation search's fitness")


def alloc_config(args) -> AllocationConfig:
    """The ``AllocationConfig`` that parsed ``allocate`` arguments describe."""
    return AllocationConfig(menu=args.menu, budget=args.budget, searcher=args.searcher,
                            searcher_kwargs=dict(args.searcher_arg), evaluations=args.evaluations,
                            popsize=args.popsize, fitness_images=args.fitness_images, holdout=args.holdout,
                            compare_additive=args.compare_additive, loss=args.loss, tables=args.tables,
                            latency_batch=args.latency_batch, latency_threads=args.latency_threads, seed=args.seed,
                            progress=not args.quiet,
                            actors=args.actors, ray_address=args.ray_address)


def _alloc_w_bits(args, budget: str) -> int:
    from ..config import parse_budget

    if args.w_bits is not None:
        return args.w_bits
    kind, value = parse_budget(budget)
    return max(2, min(8, int(value))) if kind == "avg-bits" else 4


def run(args) -> int:
    from ..api import allocate_bits
    from ..config import parse_budget
    from ..evaluate import evaluate_qmodel
    from ..io import save_quantized, write_json

    config = alloc_config(args)
    parse_budget(args.budget)
    args.w_bits = _alloc_w_bits(args, args.budget)
    quant = quant_config(args)
    search = None
    if args.passes:
        # the tournament of --passes evaluates one candidate per step: it stays in this process (docs/scale-out.md)
        search = SearchConfig(passes=args.passes, cycles=args.cycles, progress=not args.quiet)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvolQError(f"--out {str(out)!r} exists and is not a folder")
    from ..allocation.latency import check_latency_budget
    from ..api import check_alloc_folder

    check_latency_budget(quant, config)  # before any expensive work
    check_alloc_folder(out, args.resume, create=False)
    with ray_connected(config):
        model, quant, xc, xe, ye = load_inputs(args, quiet=args.quiet)
        t0 = time.perf_counter()
        qmodel, rep = allocate_bits(model, xc, quant, config, arch=args.model, checkpoint_dir=out,
                                    resume=args.resume, search=search)
    res, _ = evaluate_qmodel(qmodel, xe, ye, progress=not args.quiet)
    rep.update({"model": args.model, "fp32": short_metrics(res["fp32"]), "final": short_metrics(res["quantized"]),
                "calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]),
                "seconds": time.perf_counter() - t0})
    save_quantized(qmodel, out / "model")
    pareto = {"model": args.model, "budget": rep["budget"], "menu": config.menu,
              "layers": list(rep["allocation"]), "front": rep["front"], "uniform": rep["uniform"],
              "chosen": rep["chosen_index"]}
    write_json(out / "pareto.json", pareto)
    from ..allocation.plot import plot_fronts

    bud = rep["budget"]
    plot_fronts({config.searcher if isinstance(config.searcher, str) else "search": rep["front"]}, out / "pareto.png",
                uniform=rep["uniform"], chosen=rep["chosen"],
                budget_bytes=bud["value"] * 1e6 if bud["kind"] == "size-mb" else None,
                title=f"{args.model} {bud['kind']}={bud['value']:g} ({config.searcher}, "
                      f"{rep['search']['evaluations']} evaluations)")
    write_json(out / "report.json", rep)
    print(table([("fp32", rep["fp32"]), ("allocated", rep["final"])]))
    mix = ", ".join(f"{n} layers at {o}" for o, n in width_counts(rep["allocation"]))
    lat = ""
    if "latency" in rep:
        r = rep["latency"]
        err = r.get("max_abs_error_mixed")
        lat = (f", {rep['latency_ms']:.2f} ms predicted (batch {r['batch']}, {r['threads']} threads; the table's "
               f"error on whole-model timings {100 * err:.1f}% at most)" if err is not None else
               f", {rep['latency_ms']:.2f} ms predicted (batch {r['batch']}, {r['threads']} threads)")
    print(f"allocation: {mix}; {rep['avg_bits']:.3f} mean weight bits, "
          f"{rep['size_bytes'] / 1e6:.3f} MB packed{lat} ({bud['kind']}={bud['value']:g})")
    add = rep["search"].get("additive")
    if add is not None and "holdout_loss" in add and "holdout_loss" in rep["chosen"]:
        who = "it" if add.get("chosen") else f"the {config.searcher} allocation"
        print(f"hold-out KL: chosen {rep['chosen']['holdout_loss']:.4f}, the additive answer (sensitivity + ILP) "
              f"{add['holdout_loss']:.4f}: {who} was chosen")
    print(f"{rep['search']['evaluations']} fitness evaluations, search {rep['search_seconds']:.0f} s, total "
          f"{rep['seconds']:.0f} s; wrote {out / 'report.json'}, {out / 'pareto.json'}, {out / 'pareto.png'} and "
          f"{out / 'model'} (evolq export {out / 'model'} --out model.onnx)")
    return 0
