"""Cost of one fitness evaluation on ViT-Tiny (real weights, W4A8): seconds per ``BlockFitness``
call as the calibration size, the population size and the block position vary (one factor at a
time around a base point), plus a ``torch.profiler`` summary (top operators by self CPU time) of
one search pass over the last two blocks."""
from __future__ import annotations

import copy
import time

import torch

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.data import fitness_part
from evolq.fitness import BlockFitness, reference_outputs
from evolq.losses import infonce
from evolq.qnn.scales import ScaleSpace

from ..common import search_last_blocks
from ..report import Col, Section, Table
from ..runner import Suite, register


def time_call(qmodel, x, index, pop, repeats):
    """Seconds of one batched fitness call (cache filled beforehand, best of ``repeats``)."""
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x), lambda o, r: infonce(o, r, batch_size=min(100, len(x))))
    space = ScaleSpace(qmodel.blocks[index].searched("attn-weights"))
    cands = space.vector() * (1 + 1e-2 * torch.randn(pop, len(space), generator=torch.Generator().manual_seed(0)))
    fit.block_input(index)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fit(index, space, cands)
        best = min(best, time.perf_counter() - t)
    return best


def profile_pass(base, x, cfg, arch) -> dict:
    from torch.profiler import ProfilerActivity, profile

    qm = prepare_model(copy.deepcopy(base), fitness_part(x, cfg.search), cfg.quant, arch=arch)
    search_last_blocks(qm, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        _, rep = quantize_model(qm, x, cfg)
        pass_s = time.perf_counter() - t
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"calib": int(x.shape[0]), "blocks": 2, "cycles": 2, "evaluations": rep["evaluations"], "seconds": pass_s,
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                         "share": e.self_cpu_time_total / total} for e in top]}


def run(run):
    a = run.args
    d = run.data(calib=max(a.sizes + [a.base_size, a.profile_calib]), n_eval=1)
    cfg = EvolQConfig.make(w_bits=4, a_bits=8, passes=1, cycles=2, progress=False, infonce_batch=25)
    qmodel = prepare_model(copy.deepcopy(d.base), d.xc[:max(a.sizes)], cfg.quant, arch=a.model)
    names = [b.name for b in qmodel.blocks]
    rows = []
    plan = ([("calib", n, a.base_pop, a.base_block) for n in a.sizes]
            + [("population", a.base_size, p, a.base_block) for p in a.pops]
            + [("block", a.base_size, a.base_pop, b) for b in a.blocks])
    for kind, n, pop, blk in plan:
        s = time_call(qmodel, d.xc[:n], names.index(f"blocks.{blk}"), pop, a.repeats)
        rows.append({"vary": kind, "calib": n, "population": pop, "block": blk, "seconds": s,
                     "ms_per_candidate_image": 1e3 * s / (n * pop)})
        print(f"{kind:<11} calib {n:4d} pop {pop:3d} block {blk:2d}: {s:7.3f} s/call", flush=True)
    run.save({"benchmark": "scaling", "model": a.model, "w_bits": 4, "a_bits": 8, "threads": a.threads,
              "timings": rows, "profile": profile_pass(d.base, d.xc[:a.profile_calib], cfg, a.model)})


register(Suite(
    name="scaling", doc=__doc__, run=run, order=170,
    what="seconds per fitness call vs calibration size, population, block; profiler",
    common={"model": "vit_tiny_patch16_224", "threads": 1},
    args=[(("--sizes",), {"type": int, "nargs": "+", "default": [25, 50, 100]}),
          (("--pops",), {"type": int, "nargs": "+", "default": [1, 4, 16]}),
          (("--blocks",), {"type": int, "nargs": "+", "default": [0, 4, 8, 11]}),
          (("--base-size",), {"type": int, "default": 50}), (("--base-pop",), {"type": int, "default": 4}),
          (("--base-block",), {"type": int, "default": 11}), (("--repeats",), {"type": int, "default": 2}),
          (("--profile-calib",), {"type": int, "default": 50})],
    results={"scaling": ""}, stale=("scaling",),
    smoke={"sizes": [8], "pops": [1], "blocks": [11], "base_size": 8, "base_pop": 1, "repeats": 1,
           "profile_calib": 28},
    report=[Section("scaling", [
        "## Cost of a fitness evaluation",
        "`benchmarks/suites/scaling.py`: {model} W4A8, {threads} CPU thread(s); seconds of one batched fitness call "
        "(population x images through the block and everything after it).",
        Table([Col("varied", "vary"), Col("calib images", "calib"), Col("population", "population"),
               Col("block", "block"), Col("s / call", "seconds", "{:.3f}"),
               Col("ms / (candidate x image)", "ms_per_candidate_image", "{:.2f}")], "timings"),
        "Profile of one pass ({profile[blocks]} blocks, {profile[cycles]} cycles, {profile[calib]} calibration images, "
        "{profile[evaluations]} evaluations, {profile[seconds]:.1f} s), top operators by self CPU time:",
        Table([Col("op", "op"), Col("calls", "calls"), Col("self s", "self_cpu_s", "{:.2f}"),
               Col("share", "share", lambda v: f"{100 * v:.1f}%")], lambda d: d["profile"]["top_ops"][:10])])]))
