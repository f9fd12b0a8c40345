"""The latency objective of the bit allocation (``evolq.allocation.latency``) on a real model.

Default: the per-layer table alone. The model is calibrated on ``--calib`` calibration-pool
images in the deploy regime at ``--w-bits`` (round-to-nearest, as the allocation's proxy is),
then ``measure_latency_table`` times every layer's int8 and float lowering in the deploy runtime
(inductor with freezing) at ``--batch`` images and ``--threads`` threads, fits the constant on
the all-int8 and all-float whole-model timings and validates the additive model on ``--mixed``
seeded mixed allocations: the table, the prediction error and the measurement time. The timings
are the result: run it alone on the machine.

``--allocate BUDGET`` (e.g. ``latency-ms=15``): ``evolq.allocate_bits`` end to end under that
budget at small settings (``--evaluations``, ``--fitness-images``, ``--start``), with the table the
run measures itself, and the chosen allocation's predicted latency, size, top-1 on ``--eval``
evaluation images and seconds."""
from __future__ import annotations

import copy
import time

import torch

from evolq import QuantConfig, prepare_model
from evolq.allocation.latency import measure_latency_table
from evolq.problems.menu import parse_menu

from ..report import Col, Section, Table
from ..runner import Suite, register


def _print_table(rec, seconds, path=None):
    print(f"batch {rec['batch']}, {rec['threads']} threads, {rec['cpu']['model']} ({', '.join(rec['cpu']['flags'])}), "
          f"load {rec['load_1m']['start']:.2f} -> {rec['load_1m']['end']:.2f}")
    print(f"{'signature':<62} {'n':>2} {'int8 ms':>8} {'float ms':>8} {'call ms':>7}")
    for s in rec["signatures"]:
        print(f"{s['signature'][:62]:<62} {s['layers']:>2} {s['int8_ms']:8.3f} {s['float_ms']:8.3f} "
              f"{s['call_ms']:7.3f}")
    print(f"fit {rec['model']}: constant {rec['constant_ms']:.3f} ms (raw {rec['raw_constant_ms']:.3f} ms; "
          f"scaled: gap scale {rec['scale']:.3f})")
    print(f"{'allocation':<22} {'float':>5} {'measured':>9} {'raw pred':>9} {'error':>7} {'scaled pred':>11} "
          f"{'error':>7}")
    for w in rec["validation"]:
        sc = (f"{w['predicted_scaled_ms']:11.3f} {100 * w['error_scaled']:6.1f}%" if "error_scaled" in w
              else f"{'-':>11} {'-':>7}")
        print(f"{w['allocation']:<22} {w['float_layers']:>5} {w['measured_ms']:9.3f} {w['predicted_raw_ms']:9.3f} "
              f"{100 * w['error_raw']:6.1f}% {sc}{'  (fitted)' if w['fitted'] else ''}")
    print(f"measurement {seconds:.0f} s (layers {rec['seconds']['layers']:.0f} s)", flush=True)


def _cold_cache(a):
    """A fresh, empty inductor cache for this process with ``--cold-cache`` (else the user's, warm after
    a first run): the measurement time is then a first run's."""
    if a.cold_cache:
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="evolq-inductor-")
    return bool(a.cold_cache)


def _table(run):
    a = run.args
    cold = _cold_cache(a)
    xc, _ = run.images(None, "calib", a.calib)
    t0 = time.perf_counter()
    q = prepare_model(copy.deepcopy(run.model()), xc, QuantConfig.preset("deploy", w_bits=a.w_bits), arch=a.model)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure_latency_table(q, parse_menu(a.menu), xc, threads=a.threads, batch=a.batch, pairs=a.pairs,
                                  model_pairs=a.model_pairs, warmup=a.warmup, mixed=a.mixed, seed=a.seed,
                                  fit=a.fit, progress=True)
    measure_s = time.perf_counter() - t0
    _print_table(table.record, measure_s)
    run.save({"kind": "table", "model": a.model, "menu": a.menu, "w_bits": a.w_bits, "calib_images": int(xc.shape[0]),
              "batch": a.batch, "threads": a.threads, "cold_inductor_cache": cold,
              "calibration_seconds": calib_s, "measure_seconds": measure_s,
              "torch": torch.__version__, "table": table.to_dict()})


def _allocate(run):
    from evolq import allocate_bits
    from evolq.config import AllocationConfig
    from evolq.evaluate import evaluate_qmodel

    a = run.args
    cold = _cold_cache(a)
    d = run.data(calib=a.calib, n_eval=a.eval)
    quant = QuantConfig.preset("deploy", w_bits=a.w_bits, start=a.start)
    budget, folder, frac = a.allocate, None, None
    t0 = time.perf_counter()
    if budget.startswith("latency-ms=") and budget.endswith("%"):
        # a budget at F% of the way from the fastest to the slowest allocation of the table, measured
        # first into the run folder, where allocate_bits (resume) reads it instead of measuring again
        frac = float(budget.split("=")[1][:-1]) / 100
        budget, folder = _pre_measure(copy.deepcopy(d.base), d.xc, quant, a, frac)
    config = AllocationConfig(menu=a.menu, budget=budget, evaluations=a.evaluations, popsize=a.popsize,
                              fitness_images=a.fitness_images, latency_batch=a.batch, latency_threads=a.threads,
                              seed=a.seed, progress=False)
    qmodel, rep = allocate_bits(copy.deepcopy(d.base), d.xc, quant, config, arch=a.model, checkpoint_dir=folder,
                                resume=folder is not None)
    seconds = time.perf_counter() - t0
    res, _ = evaluate_qmodel(qmodel, d.xe, d.ye)
    lat = rep["latency"]
    measured = _measure_chosen(qmodel, d.xc[:a.batch], a)
    _print_table(lat, lat["seconds"]["total"])
    counts = {}
    for o in rep["allocation"].values():
        counts[str(o)] = counts.get(str(o), 0) + 1
    out = {"kind": "allocate", "model": a.model, "menu": a.menu, "budget": budget, "budget_spec": a.allocate,
           "budget_fraction": frac, "start": a.start,
           "w_bits": a.w_bits, "cold_inductor_cache": cold, "calib_images": int(d.xc.shape[0]),
           "eval_images": int(d.xe.shape[0]),
           "evaluations": rep["search"]["evaluations"], "fitness_images": rep["calibration"]["fitness_images"],
           "latency_ms": rep["latency_ms"], "avg_bits": rep["avg_bits"], "size_bytes": rep["size_bytes"],
           "counts": counts, "allocation": rep["allocation"], "chosen": rep["chosen"], "uniform": rep["uniform"],
           "front_points": len(rep["front"]), "fp32": res["fp32"], "quantized": res["quantized"],
           "search_seconds": rep["search_seconds"], "seconds": seconds, "latency_seconds": lat["seconds"],
           "measured": measured, "torch": torch.__version__, "latency": lat}
    run.save(out)
    print(f"chosen: {', '.join(f'{n} layers at {o}' for o, n in sorted(counts.items()))}; predicted "
          f"{rep['latency_ms']:.2f} ms under {budget}; {rep['avg_bits']:.3f} mean weight bits, "
          f"{rep['size_bytes'] / 1e6:.3f} MB; top-1 {res['quantized']['top1']:.1f} (fp32 {res['fp32']['top1']:.1f}) "
          f"on {int(d.xe.shape[0])} images; {seconds:.0f} s", flush=True)
    print(f"measured whole model: chosen {measured['chosen_ms']:.2f} ms, all-float {measured['all_float_ms']:.2f} ms "
          f"(the same final model, alternating rounds)", flush=True)


def _pre_measure(base, x, quant, a, frac):
    """The latency table of ``allocate_bits``' proxy (the same calibration split, regime and table
    method), measured into a fresh run folder; the budget ``frac`` of the way across its range."""
    import tempfile

    from evolq.allocation.latency import load_or_measure
    from evolq.allocation.setup import proxy_quant
    from evolq.config import AllocationConfig
    from evolq.data import split_calibration

    cfg = AllocationConfig(menu=a.menu, seed=a.seed)
    fit_x, _ = split_calibration(x, cfg.holdout, a.seed)
    proxy = prepare_model(base, fit_x, proxy_quant(quant, cfg.table_method(quant.start)), arch=a.model)
    folder = tempfile.mkdtemp(prefix="evolq-latency-alloc-")
    t = load_or_measure(proxy, parse_menu(a.menu), fit_x, threads=a.threads, batch=a.batch, folder=folder,
                        progress=True)
    lo, hi = t.range()
    return f"latency-ms={lo + frac * (hi - lo):.3f}", folder


@torch.no_grad()
def _measure_chosen(qmodel, x, a) -> dict:
    """The final model at the chosen allocation and its all-float form, lowered as ``evolq export
    --format pt2`` lowers them, compiled by inductor and timed in alternating rounds."""
    from evolq.export.bench import time_alternating
    from evolq.export.pt2 import lower_deploy
    from evolq.export.runtimes.inductor import compile_module

    fns = {}
    for name, quantized in (("chosen", True), ("all-float", False)):
        ep = torch.export.export(lower_deploy(qmodel, quantized).eval(), (x,), strict=False)
        runner = compile_module(ep.module(), a.threads)
        runner(x)
        fns[name] = (lambda r=runner: r(x))
    r = time_alternating(fns, "all-float", pairs=a.model_pairs, warmup=a.warmup)
    t = r["times"]
    return {"chosen_ms": t["chosen"]["median_s"] * 1e3, "all_float_ms": t["all-float"]["median_s"] * 1e3,
            "chosen_min_ms": t["chosen"]["min_s"] * 1e3, "chosen_max_ms": t["chosen"]["max_s"] * 1e3,
            "pairs": a.model_pairs, "load_1m": [r["load_1m_before"], r["load_1m_after"]]}


def run(run):
    return _allocate(run) if run.args.allocate else _table(run)


def _validation_rows(doc):
    return [{**w, "float_share": f"{w['float_layers']}/{len(doc['table']['layers'])}"}
            for w in doc["table"]["record"]["validation"]]


def _signature_rows(doc):
    return doc["table"]["record"]["signatures"]


def _allocate_text(d):
    m = d["measured"]
    mix = ", ".join(f"{n} layers at {o}" for o, n in sorted(d["counts"].items()))
    return (f"`evolq.allocate_bits` under a latency budget (`{d['budget_spec']}`, i.e. `{d['budget']}`, "
            f"{100 * d['budget_fraction']:.0f}% of the way from the table's fastest to its slowest allocation), "
            f"{d['start']} start, menu {d['menu']}, {d['evaluations']} evaluations on {d['fitness_images']} images: "
            f"{mix}; predicted {d['latency_ms']:.2f} ms, measured {m['chosen_ms']:.2f} ms (all-float "
            f"{m['all_float_ms']:.2f} ms in the same rounds); top-1 {d['quantized']['top1']:.1f} (FP32 "
            f"{d['fp32']['top1']:.1f}) on {d['eval_images']} evaluation images; {d['seconds']:.0f} s in all "
            f"(`{d['file']}.json`).")


VIT_ALLOCATE = ("--cold-cache --allocate latency-ms=30% --start rtn --evaluations 150 --fitness-images 32 --eval 100 "
                "--out latency_allocate_vit_tiny")
register(Suite(
    name="latency_table", doc=__doc__, run=run, order=59,
    what="the allocation's latency objective: per-layer int8/float table in the deploy runtime, the additive "
         "model's error on whole-model timings; an allocation under a latency budget",
    out="latency_table_{short}",
    common={"model": "vit_tiny_patch16_224", "calib": 64, "eval": 100, "threads": 2},
    args=[(("--menu",), {"default": "4,8,float"}),
          (("--w-bits",), {"type": int, "default": 4, "help": "the proxy's regime strengths follow these bits"}),
          (("--batch",), {"type": int, "default": 1, "help": "images per timed call"}),
          (("--pairs",), {"type": int, "default": 15, "help": "alternating timed rounds per layer"}),
          (("--model-pairs",), {"type": int, "default": 40, "help": "alternating timed rounds of the whole models"}),
          (("--warmup",), {"type": int, "default": 3}),
          (("--mixed",), {"type": int, "default": 3, "help": "mixed allocations that validate the sum"}),
          (("--seed",), {"type": int, "default": 0, "help": "which layers the mixed allocations leave in float"}),
          (("--fit",), {"default": "scaled", "choices": ("raw", "scaled")}),
          (("--cold-cache",), {"action": "store_true",
                               "help": "compile into a fresh inductor cache (the time of a first run on a machine)"}),
          (("--allocate",), {"default": "", "metavar": "BUDGET",
                             "help": "run evolq.allocate_bits under this budget (e.g. latency-ms=15) instead"}),
          (("--start",), {"default": "rtn", "help": "with --allocate: the start (and its tables)"}),
          (("--evaluations",), {"type": int, "default": 150}), (("--popsize",), {"type": int, "default": 16}),
          (("--fitness-images",), {"type": int, "default": 32})],
    results={"latency_table_vit_tiny": "--cold-cache", "latency_allocate_vit_tiny": VIT_ALLOCATE},
    smoke={"calib": 8, "eval": 8, "pairs": 2, "model_pairs": 2, "warmup": 1, "mixed": 1, "evaluations": 8,
           "popsize": 4, "fitness_images": 4},
    report=[Section("latency_table_vit_tiny", [
        "## The allocation's latency table (`python -m benchmarks latency_table`)",
        "ViT-Tiny in the deploy regime, menu {menu}, batch {batch}, {threads} threads, timed by "
        "`evolq.allocation.latency.measure_latency_table` in {measure_seconds:.0f} s: whole-model "
        "milliseconds measured and predicted by the per-layer sum (raw: the layers plus a constant fitted on the "
        "two uniform allocations; scaled: the float - int8 gaps scaled so that both are exact).",
        Table([Col("allocation", "allocation"), Col("float layers", "float_share"),
               Col("measured ms", "measured_ms", "{:.2f}"), Col("raw ms", "predicted_raw_ms", "{:.2f}"),
               Col("raw error", "error_raw", lambda v: f"{100 * v:+.1f}%"),
               Col("scaled ms", "predicted_scaled_ms", lambda v: "-" if v is None else f"{v:.2f}"),
               Col("scaled error", "error_scaled", lambda v: "-" if v is None else f"{100 * v:+.1f}%")],
              _validation_rows),
        Table([Col("layer", "signature"), Col("n", "layers"), Col("int8 ms", "int8_ms", "{:.3f}"),
               Col("float ms", "float_ms", "{:.3f}")], _signature_rows)]),
        Section("latency_allocate_vit_tiny", [_allocate_text])],
))
