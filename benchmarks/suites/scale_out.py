"""Scale-out on Ray actors (``actors=N``, ``evolq.scaleout``) on real ViT-Tiny, on this machine's
CPU cores, and a model of the speed-up on more actors built from what was measured.

Two searches, each run in this process and on Ray actors of one CPU (one torch thread) each,
with the same seed (the results are compared: actors give the in-process result):

* the bit-allocation search (``allocate_bits``'s NSGA-II with its sensitivity measurement, rtn
  weight tables): distinct allocations evaluated per second of the search's wall time, in this
  process at ``--threads`` threads and on 1 and 2 actors;
* the block-scale search (Evol-Q, CMA-ES, population ``--popsize``, the last ``--blocks`` blocks,
  ``--generations`` generations per block): seconds per generation, in this process at 1 and
  ``--threads`` threads and on 1 and 2 actors.

Actor start-up (a fresh process importing torch and loading the fitness, once per run) is
measured apart and left out of the rates: it is paid once per run, not per generation. The
first generation of a run is left out for the same reason. Per generation the actors' runs also
give the bytes sent, each actor's busy time (measured on the actor) and the driver's share: the
part of a generation's wall time (the searcher's step included) in which the actors were not
computing on average (serialisation, scheduling, transfer, waiting for the slowest actor, the
searcher's own update).

The model: a generation of P candidates on n actors takes ``T(n) = o(n) + ceil(G / n) * t_g * w(n)``,
where G = ceil(P / g) are the groups of g candidates that one forward evaluates together (the
work unit an actor gets: ``BlockFitness`` groups, g = 1 for the allocation search), t_g the time
of one group on one one-thread actor, o(n) = o_0 + o_1 n the driver's per-generation overhead
(o_1: the extra per actor, from the 1- and 2-actor runs) and w(n) the total work of a split over
one actor's (1 for one actor; measured on 2, kept for more). Speed-up(n) = T(1) / T(n)
stops growing at n = G (every actor holds one group) and falls once o_1 n outgrows what one
more actor saves. Evol-Q's blocks, and the generations within a block, follow each other:
only one generation's candidates are ever evaluated at once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from evolq import EvolQConfig, QuantConfig, prepare_model, quantize_model
from evolq.allocation.engine import AllocationEngine
from evolq.allocation.setup import budget_cost, prepare_allocation, reference_genes
from evolq.config import AllocationConfig
from evolq.data import fitness_part, split_calibration
from evolq.fitness import fitness_chunks
from evolq.problems.bit_allocation import BitAllocationProblem

from ..common import search_last_blocks
from ..report import Col, Section, Table
from ..runner import Suite, cpu_info, register

ACTOR_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _placement(actors: int):
    from evolq.scaleout import connect

    return connect(actors) if actors else None


def _reset(f):
    f.memo = {}
    f.clear_cache()
    f.evaluations = f.requests = f.blocks_run = f.blocks_full = 0
    f.seconds = 0.0


def _gens(log, skip: int = 1):
    """Per-generation records of ``ScaleOutStats.log`` after the first ``skip``."""
    return [{"n": n, "wall": w, "busy": list(b), "sent": s, "received": r} for n, w, b, s, r in log[skip:]]


# -- the bit-allocation search -------------------------------------------------------------
def allocation(d, a) -> list[dict]:
    cfg = AllocationConfig(budget=a.budget, evaluations=a.alloc_evaluations, popsize=a.alloc_popsize,
                           fitness_images=a.fitness_images, tables="rtn", seed=0, progress=False)
    quant = QuantConfig.preset(a.preset, w_bits=3, a_bits=8, start="rtn", edge_bits=8)
    fit_x, hold_x = split_calibration(d.xc, cfg.holdout, 0)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    s = prepare_allocation(d.base, fit_x, hold_x, quant, cfg, arch=a.model)
    prep = time.perf_counter() - t0
    costs, cname, limit = budget_cost(*cfg.budget_kind, s.sizes, cfg.front)
    rows, fronts = [], {}
    for mode, actors, threads in (("in-process", 0, a.threads), ("actors", 1, 1), ("actors", 2, 1)):
        torch.set_num_threads(threads)
        _reset(s.fitness)
        p = BitAllocationProblem(s.fitness, costs, limit, budget_cost=cname, seed=0, placement=_placement(actors))
        eng = AllocationEngine(p, s.fitness, searcher="nsga2", popsize=cfg.popsize, evaluations=cfg.evaluations,
                               seed=0, holdout=s.holdout, reference=reference_genes(p, cfg.sensitivity),
                               select=cfg.select)
        start = 0.0
        if actors:
            t0 = time.perf_counter()
            p._parallelize()  # the actors start and load the fitness (once per run)
            start = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eng.run()
        wall = time.perf_counter() - t0
        row = {"search": "allocation", "mode": mode, "actors": actors, "threads_each": threads,
               "evaluations": res["evaluations"], "generations": res["generations"], "seconds": wall,
               "evaluations_per_s": res["evaluations"] / wall, "actor_start_seconds": start,
               "fitness_seconds": s.fitness.seconds}
        if actors:
            st = p.stats
            row.update(dispatches=st.generations, bytes_sent_per_dispatch=st.bytes_sent / max(1, st.generations),
                       shared_bytes=st.shared_bytes, dispatch_driver_share=st.driver_share,
                       actor_busy_seconds=st.busy_mean_s * max(1, actors), driver_share=1 - st.busy_mean_s / wall,
                       dispatch_log=_gens(st.log, 0))
        fronts[(mode, actors)] = [pt["loss"] for pt in res["front"]]
        rows.append(row)
        print(f"allocation {mode:>10} {actors} actor(s) x {threads} thread(s): {row['evaluations']} evaluations in "
              f"{wall:.1f} s = {row['evaluations_per_s']:.2f}/s (actor start {start:.1f} s)", flush=True)
    same = fronts[("actors", 1)] == fronts[("actors", 2)]
    for r in rows:
        r["prepare_seconds"] = prep
        r["same_front_as_1_actor"] = fronts[(r["mode"], r["actors"])] == fronts[("actors", 1)]
    print(f"allocation: same front on 1 and 2 actors: {same}", flush=True)
    return rows


# -- the block-scale search ----------------------------------------------------------------
class GenerationClock:
    """The end time and size of every fitness call of a run (a generation, or a block's start
    evaluation of one candidate) and the engine (its ``scale_out`` holds the actors' log)."""

    def __init__(self):
        self.calls: list[tuple[float, int]] = []
        self.engine = None

    def subscribe(self, engine):
        self.engine = engine
        engine.fitness_hook.append(lambda index, cands, losses: self.calls.append((time.perf_counter(),
                                                                                   int(losses.numel()))))

    def generations(self, popsize: int) -> list[float]:
        """Wall seconds of each full generation (from the end of the call before it: the searcher's
        step included), the run's first one left out."""
        walls = [t - self.calls[i - 1][0] for i, (t, n) in enumerate(self.calls) if i and n == popsize]
        return walls[1:]


def block_search(d, a) -> tuple[list[dict], dict]:
    cfg = EvolQConfig.make(w_bits=4, a_bits=8, passes=1, cycles=a.popsize * a.generations, searcher="cmaes",
                           popsize=a.popsize, progress=False, infonce_batch=min(100, a.calib // 2))
    torch.set_num_threads(a.threads)
    x_fit = fitness_part(d.xc, cfg.search)
    base = prepare_model(copy.deepcopy(d.base), x_fit, cfg.quant, arch=a.model)
    blocks = search_last_blocks(base, a.blocks)
    n_fit = x_fit.shape[0]
    group, _ = fitness_chunks(n_fit, cfg.search.max_batch)
    rows, scales = [], {}
    for mode, actors, threads in (("in-process", 0, 1), ("in-process", 0, a.threads), ("actors", 1, 1),
                                  ("actors", 2, 1)):
        torch.set_num_threads(threads)
        search = dataclasses.replace(cfg.search, actors=actors)
        clock = GenerationClock()
        t0 = time.perf_counter()
        qm, rep = quantize_model(copy.deepcopy(base), d.xc, dataclasses.replace(cfg, search=search),
                                 subscribers=[clock])
        total = time.perf_counter() - t0
        walls = clock.generations(a.popsize)
        per_gen = sum(walls) / len(walls)
        row = {"search": "block-scale", "mode": mode, "actors": actors, "threads_each": threads, "popsize": a.popsize,
               "group": group, "fitness_images": n_fit, "blocks": blocks, "generations_timed": len(walls),
               "seconds_per_generation": per_gen, "generation_seconds": walls, "run_seconds": total,
               "evaluations": rep["evaluations"]}
        if actors:
            so = rep["scale_out"]
            log = [g for g in _gens(clock.engine.scale_out.stats.log, 0) if g["n"] == a.popsize][1:]
            busy_mean = [sum(g["busy"]) / actors for g in log]
            busy_max = [max(g["busy"]) for g in log]
            row.update(bytes_sent_per_generation=sum(g["sent"] for g in log) / len(log),
                       bytes_received_per_generation=sum(g["received"] for g in log) / len(log),
                       state_bytes=so["state_bytes"], shared_bytes=so["shared_bytes"], restarts=so["restarts"],
                       actor_busy_mean_per_generation=sum(busy_mean) / len(log),
                       actor_busy_max_per_generation=sum(busy_max) / len(log),
                       driver_share=1 - sum(busy_mean) / sum(walls),
                       overhead_per_generation=sum(w - b for w, b in zip(walls, busy_max)) / len(log),
                       dispatch_driver_share=so["driver_share"])
        rows.append(row)
        scales[(mode, threads, actors)] = {k: v.clone() for k, v in qm.model.state_dict().items() if "scale" in k}
        print(f"block-scale {mode:>10} {actors} actor(s) x {threads} thread(s): {per_gen:.3f} s/generation over "
              f"{len(walls)} generations" + (f", driver share {row['driver_share']:.3f}, "
                                              f"{row['bytes_sent_per_generation']:.0f} B sent/generation"
                                              if actors else ""), flush=True)
    ref = scales[("in-process", 1, 0)]
    for r in rows:
        got = scales[(r["mode"], r["threads_each"], r["actors"])]
        r["same_scales_as_in_process_1_thread"] = all(torch.equal(got[k], ref[k]) for k in ref)
    return rows


# -- the model -----------------------------------------------------------------------------
def speedup_model(popsize: int, group: int, t_group: float, o0: float, o1: float,
                  inflation: float = 1.0) -> list[dict]:
    """Speed-up over one actor of a generation of ``popsize`` candidates on n actors (module doc);
    ``inflation``: the total work on n >= 2 actors over one actor's (measured on 2)."""
    groups = math.ceil(popsize / group)

    def t(n):
        return o0 + o1 * n + math.ceil(groups / n) * t_group * (1.0 if n == 1 else inflation)

    return [{"actors": n, "seconds_per_generation": t(n), "speedup": t(1) / t(n), "busy_actors": min(n, groups)}
            for n in ACTOR_COUNTS]


def fit_overhead(one: dict, two: dict) -> tuple[float, float]:
    """o(n) = o_0 + o_1 n through the overheads measured on 1 and 2 actors (o_1 >= 0)."""
    o1 = max(0.0, two["overhead_per_generation"] - one["overhead_per_generation"])
    return one["overhead_per_generation"] - o1, o1


def models(block_rows: list[dict], alloc_rows: list[dict]) -> dict:
    one = next(r for r in block_rows if r["actors"] == 1)
    two = next(r for r in block_rows if r["actors"] == 2)
    p, g = one["popsize"], one["group"]
    t_group = one["actor_busy_mean_per_generation"] / math.ceil(p / g)
    inflation = two["actor_busy_mean_per_generation"] * 2 / one["actor_busy_mean_per_generation"]
    o0, o1 = fit_overhead(one, two)
    out = {"block_scale": {"popsize": p, "group": g, "groups": math.ceil(p / g), "seconds_per_group": t_group,
                           "seconds_per_candidate": t_group / g, "overhead_0": o0, "overhead_per_actor": o1,
                           "work_inflation_2_actors": inflation,
                           "measured_speedup_2": one["seconds_per_generation"] / two["seconds_per_generation"],
                           "model": speedup_model(p, g, t_group, o0, o1, inflation)}}
    if g > 1:  # one candidate per forward (SearchConfig.max_batch = the fitness images): more, smaller pieces
        out["block_scale_group_1"] = {"popsize": p, "group": 1, "seconds_per_candidate": t_group / g,
                                      "model": speedup_model(p, 1, t_group / g, o0, o1, inflation)}
    for pop in (128,):  # a larger population (another search: fewer generations for the same budget)
        out[f"block_scale_popsize_{pop}"] = {"popsize": pop, "group": g,
                                             "model": speedup_model(pop, g, t_group, o0, o1, inflation)}
    out["allocation"] = allocation_model(next(r for r in alloc_rows if r["actors"] == 1),
                                         next(r for r in alloc_rows if r["actors"] == 2))
    return out


def summarise(doc: dict, threads: int) -> None:
    by = {(r["mode"], r["actors"], r["threads_each"]): r for r in doc["allocation"]}
    eps = {k: v["evaluations_per_s"] for k, v in by.items()}
    bs = {(r["mode"], r["actors"], r["threads_each"]): r["seconds_per_generation"] for r in doc["block_scale"]}
    two = next(r for r in doc["block_scale"] if r["actors"] == 2)
    doc["summary"] = {
        "allocation_evals_per_s_2_actors_over_1_actor": eps[("actors", 2, 1)] / eps[("actors", 1, 1)],
        "allocation_evals_per_s_2_actors_over_in_process_2_threads":
            eps[("actors", 2, 1)] / eps[("in-process", 0, threads)],
        "block_scale_speedup_2_actors_over_1_actor": bs[("actors", 1, 1)] / bs[("actors", 2, 1)],
        "block_scale_speedup_2_actors_over_in_process_1_thread": bs[("in-process", 0, 1)] / bs[("actors", 2, 1)],
        "block_scale_speedup_2_actors_over_in_process_2_threads":
            bs[("in-process", 0, threads)] / bs[("actors", 2, 1)],
        "block_scale_bytes_sent_per_generation_2_actors": two["bytes_sent_per_generation"],
        "block_scale_driver_share_2_actors": two["driver_share"],
        "allocation_driver_share_2_actors": by[("actors", 2, 1)]["driver_share"],
        "allocation_bytes_sent_per_dispatch_2_actors": by[("actors", 2, 1)]["bytes_sent_per_dispatch"],
    }
    doc["scaling_model"] = models(doc["block_scale"], doc["allocation"])


def allocation_model(a1: dict, a2: dict) -> dict:
    """The allocation run's dispatches (the sensitivity batch, then the NSGA-II generations' new
    allocations) on n actors: per dispatch the driver's serial work (searcher, repair, memo), the
    dispatch overhead and ``ceil(size / n)`` evaluations at the one-actor time, inflated for n >= 2
    by the extra total work measured on 2 actors (each actor caches its own block inputs, so a
    split batch reuses fewer prefixes; and the two cores share caches and memory bandwidth)."""
    log1, log2 = a1["dispatch_log"], a2["dispatch_log"]
    sizes = [g["n"] for g in log1]
    per_eval = a1["actor_busy_seconds"] / a1["evaluations"]
    inflation = a2["actor_busy_seconds"] / a1["actor_busy_seconds"]
    serial = (a1["seconds"] - sum(g["wall"] for g in log1)) / len(log1)
    over = sum(g["wall"] - max(g["busy"]) for g in log2) / len(log2)

    def t(n):
        return sum(serial + over + math.ceil(k / n) * per_eval * (1.0 if n == 1 else inflation) for k in sizes)

    return {"dispatch_sizes": sizes, "seconds_per_evaluation": per_eval, "work_inflation_2_actors": inflation,
            "driver_serial_per_dispatch": serial, "overhead_per_dispatch": over,
            "measured_speedup_2": a2["evaluations_per_s"] / a1["evaluations_per_s"],
            "model": [{"actors": n, "seconds": t(n), "speedup": t(1) / t(n), "busy_actors": min(n, max(sizes))}
                      for n in ACTOR_COUNTS]}


def run(run):
    a = run.args
    d = run.data(calib=a.calib, n_eval=1)
    doc = run.doc
    doc.update({"benchmark": "scale_out", "model": a.model, "threads": a.threads,
                "gpu": "not measured: no GPU on this machine"})
    doc.setdefault("settings", {}).update({"calib": a.calib, "popsize": a.popsize, "generations_per_block":
                                           a.generations, "blocks": a.blocks, "alloc_evaluations":
                                           a.alloc_evaluations, "alloc_popsize": a.alloc_popsize,
                                           "fitness_images": a.fitness_images, "budget": a.budget,
                                           "preset": a.preset})
    parts = a.parts.split(",")
    try:
        if "allocation" in parts:
            if "allocation" in doc:  # an earlier measurement stays, for the spread between runs
                doc.setdefault("allocation_earlier", []).append(doc["allocation"])
            doc["allocation"] = allocation(d, a)
            for r in doc["allocation"]:
                r["popsize"] = a.alloc_popsize
                r["cpu"] = cpu_info()
            run.save()
        if "block" in parts:
            if "block_scale" in doc:
                doc.setdefault("block_scale_earlier", []).append(doc["block_scale"])
            doc["block_scale"] = block_search(d, a)
            for r in doc["block_scale"]:
                r["cpu"] = cpu_info()
            run.save()
    finally:
        import ray

        ray.shutdown()
    if "allocation" in doc and "block_scale" in doc:
        summarise(doc, a.threads)
        run.save()
        for k, v in doc["summary"].items():
            print(f"{k}: {v:.3f}", flush=True)


register(Suite(
    name="scale_out", doc=__doc__, run=run, order=175, resume=True,
    what="Ray actors: allocation evaluations/s and block-scale seconds/generation on 1-2 actors vs in-process; "
         "bytes, driver share; speed-up model to 256 actors",
    common={"model": "vit_tiny_patch16_224", "calib": 64, "threads": 2},
    args=[(("--popsize",), {"type": int, "default": 32, "help": "block-scale search population"}),
          (("--generations",), {"type": int, "default": 3, "help": "block-scale generations per block"}),
          (("--blocks",), {"type": int, "default": 2, "help": "the last N blocks are searched"}),
          (("--alloc-evaluations",), {"type": int, "default": 170,
                                         "help": "the sensitivity measurement (~150 on ViT-Tiny) included"}),
          (("--alloc-popsize",), {"type": int, "default": 24}),
          (("--fitness-images",), {"type": int, "default": 16, "help": "allocation fitness images"}),
          (("--budget",), {"default": "avg-bits=3.5"}), (("--preset",), {"default": "outlier-aware"}),
          (("--parts",), {"default": "allocation,block", "help": "what to measure (one or both; the file keeps "
                                                                  "the other part)"})],
    results={"scale_out": ["--parts allocation", "--parts block"]},
    smoke={"calib": 12, "popsize": 4, "generations": 2, "blocks": 1, "alloc_evaluations": 8, "alloc_popsize": 4,
           "fitness_images": 4},
    report=[Section("scale_out", [
        "## Scale-out on Ray actors",
        "`benchmarks/suites/scale_out.py`: {model}, {allocation[0][cpu][model]} ({allocation[0][cpu][cores]} cores; "
        "the 1-minute load at the end of each part, last column); one CPU (one torch thread) per actor; GPU: {gpu}. "
        "The model of the speed-up on more actors, and where it stops, is in docs/scale-out.md.",
        Table([Col("search", "search"), Col("mode", "mode"), Col("actors", "actors"),
               Col("threads each", "threads_each"), Col("evaluations / s", "evaluations_per_s", "{:.2f}"),
               Col("actor start s", "actor_start_seconds", "{:.1f}"), Col("driver share", "driver_share",
                                                                          lambda v: "" if v is None else f"{v:.3f}"),
               Col("load", "cpu.load_1m", "{:.1f}")],
              lambda d: d["allocation"]),
        Table([Col("search", "search"), Col("mode", "mode"), Col("actors", "actors"),
               Col("threads each", "threads_each"), Col("s / generation", "seconds_per_generation", "{:.3f}"),
               Col("bytes sent / generation", "bytes_sent_per_generation",
                   lambda v: "" if v is None else f"{v:.0f}"),
               Col("driver share", "driver_share", lambda v: "" if v is None else f"{v:.3f}"),
               Col("same scales", "same_scales_as_in_process_1_thread"), Col("load", "cpu.load_1m", "{:.1f}")],
              lambda d: d["block_scale"])])],
))
