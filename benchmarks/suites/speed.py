"""Speed: evolq's search against a re-implementation of the authors' loop (``joint_evol_opt.py``
of enyac-group/evol-q, read for its behaviour; no code copied) at equal fitness evaluations.

The baseline computes the full-precision outputs once (batches of 100); every evaluation sets the
candidate's scales and runs the whole quantized model over the calibration set in batches of 100;
every block starts by evaluating its start scales again; the tournament samples with Python's
``random``, mutates with NumPy and drops the *newest* of the tied worst. evolq runs its own
tournament with ``reuse_fitness=False`` so both spend the same evaluations; ``loss_check`` checks
that the two fitness paths give the same loss for the same candidate. Runs alternate (baseline,
evolq, ...) from the same start point; then a profile (FLOPs of one evaluation against the
measured matmul rate, top operators). ``--chunks`` instead times one evaluation per chunk size."""
from __future__ import annotations

import os
import platform
import random
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import evolq
from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.engine import block_seed
from evolq.fitness import BlockFitness, reference_outputs
from evolq.losses import make_loss
from evolq.qnn.scales import ScaleSpace

from ..report import Col, Section, Table, load, table
from ..runner import Suite, register

SCOPE = "attn-weights"
AUTHORS_BATCH = 100


# -- the authors' loop -------------------------------------------------------------
class AuthorsLoop:
    """The authors' fitness and tournament on an evolq ``QModel`` (see the module doc)."""

    def __init__(self, qmodel, x, search, eps):
        self.qmodel, self.search, self.eps = qmodel, search, eps
        self.batches = list(torch.split(x, AUTHORS_BATCH))
        self.loss_fn = make_loss(search)  # the same infoNCE as evolq (float64), so losses can be compared
        self.evaluations = 0

    @torch.no_grad()
    def fp_outputs(self):
        """Full-precision outputs, once per run."""
        self.qmodel.set_quant_enabled(False)
        try:
            self.o_fps = [self.qmodel.model(xb).float() for xb in self.batches]
        finally:
            self.qmodel.set_quant_enabled(True)

    @torch.no_grad()
    def loss(self, space: ScaleSpace, vec) -> float:
        """Set the scales, run the whole quantized model per batch of 100, mean of the batch losses."""
        space.write(torch.as_tensor(vec, dtype=torch.float32))
        res = 0.0
        for xb, o_fp in zip(self.batches, self.o_fps):
            out = self.qmodel.model(xb).float()
            res += float(self.loss_fn(out.unsqueeze(0), o_fp)[0])
        self.evaluations += 1
        return res / len(self.batches)

    def search_block(self, space: ScaleSpace, seed: int, cycles: int):
        rnd, nrs = random.Random(seed), np.random.RandomState(seed % 2**32)
        start = space.vector().double().numpy()
        obj = self.loss(space, start)
        population = [(obj, start)] * self.search.population
        for _ in range(cycles):
            samples = rnd.choices(population, k=self.search.samples)
            parent = min(samples, key=lambda m: m[0])  # the first sampled among equal losses
            child = np.abs(parent[1] + nrs.uniform(-self.eps, self.eps, size=parent[1].shape))
            child = child.astype(np.float32).astype(np.float64)  # what the model will hold
            population.append((self.loss(space, child), child))
            population = sorted(population, key=lambda m: m[0])  # stable: ties stay in insertion order
            population.pop()  # the newest of the tied worst
        best = min(population, key=lambda m: m[0])
        space.write(torch.as_tensor(best[1], dtype=torch.float32))
        return best[0]

    def run(self, blocks: list[int], seed: int, cycles: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        self.evaluations = 0
        self.fp_outputs()
        per_block = []
        for idx in sorted(blocks, reverse=True):  # last block first
            tb, cb, e0 = time.perf_counter(), time.process_time(), self.evaluations
            final = self.search_block(ScaleSpace(self.qmodel.blocks[idx].searched(SCOPE)), block_seed(seed, 0, idx),
                                      cycles)
            per_block.append({"index": idx, "block": self.qmodel.blocks[idx].name, "final_fitness": final,
                              "evaluations": self.evaluations - e0, "seconds": time.perf_counter() - tb,
                              "cpu_seconds": time.process_time() - cb})
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "evaluations": self.evaluations, "blocks": per_block}


# -- helpers -------------------------------------------------------------------------
def restrict_blocks(qmodel, keep: list[int]) -> None:
    """Search only the block-view indices ``keep`` under ``SCOPE`` (others keep their start scales)."""
    for i, b in enumerate(qmodel.blocks):
        if b.scopes.get(SCOPE) and i not in keep:
            b.scopes = {**b.scopes, SCOPE: []}


def run_evolq(qmodel, x, cfg) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    _, rep = quantize_model(qmodel, x, cfg)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    blocks = [{"block": b["block"], "final_fitness": b["final_fitness"], "evaluations": b["evaluations"],
               "seconds": b["seconds"]} for b in rep["blocks"]]
    return {"seconds": seconds, "cpu_seconds": cpu, "search_seconds": rep["search_seconds"],
            "evaluations": rep["evaluations"], "blocks": blocks}


def loss_check(qmodel, x, search, blocks, eps, n_cands=2) -> dict:
    """The same candidate vectors through both fitness paths: the authors' full-model
    loss and evolq's cached, chunked ``BlockFitness``."""
    loop = AuthorsLoop(qmodel, x, search, eps)
    loop.fp_outputs()
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       search.max_batch)
    g = torch.Generator().manual_seed(1234)
    rows = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        start = space.vector()
        cands = [start] + [(start.double() + (torch.rand(len(space), generator=g, dtype=torch.float64) * 2 - 1) * eps)
                           .abs().float() for _ in range(n_cands - 1)]
        ev = fit(idx, space, torch.stack(cands)).tolist()
        au = [loop.loss(space, c.double().numpy()) for c in cands]
        space.write(start)
        rows += [{"block": qmodel.blocks[idx].name, "candidate": j, "evolq": e, "authors": a, "abs_diff": abs(e - a)}
                 for j, (e, a) in enumerate(zip(ev, au))]
    return {"candidates": rows, "max_abs_diff": max(r["abs_diff"] for r in rows),
            "max_rel_diff": max(r["abs_diff"] / abs(r["authors"]) for r in rows)}


def matmul_rate(row_counts, repeats: int = 5) -> float:
    """Best FLOP/s (process CPU time) of ``F.linear`` at the block's linear shapes (ViT-Tiny: 192->576,
    192->192, 192->768, 768->192) for each row count."""
    best = 0.0
    for rows in row_counts:
        for k, n in ((192, 576), (192, 192), (192, 768), (768, 192)):
            a, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            for _ in range(repeats):
                t = time.process_time()
                torch.nn.functional.linear(a, w, b)
                best = max(best, 2 * rows * k * n / max(time.process_time() - t, 1e-9))
    return best


def time_eval(fn, repeats: int = 2) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, each the least of ``repeats`` runs."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def chunk_sizes(qmodel, x, search, blocks, sizes, repeats: int = 3) -> dict:
    """CPU seconds of one evaluation (one candidate, the tournament's case) per chunk size
    (``max_batch``), on each searched block, the sizes interleaved; and whether the losses
    are bitwise equal across sizes."""
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       max(sizes))
    out = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        cand = space.vector().unsqueeze(0)
        fit.block_input(idx)
        cpu, losses = {m: float("inf") for m in sizes}, {}
        for _ in range(repeats):
            for m in sizes:
                fit.max_batch = m
                c = time.process_time()
                losses[m] = float(fit(idx, space, cand)[0])
                cpu[m] = min(cpu[m], time.process_time() - c)
        out.append({"block": qmodel.blocks[idx].name, "cpu_seconds": {str(m): cpu[m] for m in sizes},
                    "losses_equal": len(set(losses.values())) == 1})
    return {"sizes": sizes, "repeats": repeats, "blocks": out, "loadavg": list(os.getloadavg())}


def profile(qmodel, x, search, blocks, baseline_runs) -> dict:
    """FLOPs of one evaluation (per searched block, and the authors' full model) against
    the measured matmul rate, and the top operators of one evaluation."""
    fit = BlockFitness(qmodel, x, reference_outputs(qmodel, x, min(256, search.max_batch)), make_loss(search),
                       search.max_batch)
    tokens = qmodel.blocks[1].run(qmodel.blocks[0].run(x[:1])).shape[1]
    rows = [min(search.max_batch, x.shape[0]) * tokens, min(AUTHORS_BATCH, x.shape[0]) * tokens]
    rate = matmul_rate(rows)
    per_block = []
    for idx in blocks:
        space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
        cand = space.vector().unsqueeze(0)
        fit.block_input(idx)
        with FlopCounterMode(display=False) as fc:
            fit(idx, space, cand)
        flops = fc.get_total_flops()
        wall, cpu = time_eval(lambda i=idx, s=space, c=cand: fit(i, s, c))
        per_block.append({"block": qmodel.blocks[idx].name, "flops_per_eval": flops, "limit_seconds": flops / rate,
                          "seconds_per_eval": wall, "cpu_seconds_per_eval": cpu,
                          "fraction_of_limit": flops / rate / cpu})
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        qmodel.model(x[:AUTHORS_BATCH])
    full = fc.get_total_flops() * x.shape[0] / min(AUTHORS_BATCH, x.shape[0])
    base = [b for r in baseline_runs for b in r["blocks"]]
    base_wall = statistics.median(b["seconds"] / b["evaluations"] for b in base)
    base_cpu = statistics.median(b["cpu_seconds"] / b["evaluations"] for b in base)
    idx = blocks[len(blocks) // 2]
    space = ScaleSpace(qmodel.blocks[idx].searched(SCOPE))
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        fit(idx, space, space.vector().unsqueeze(0))
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    matmul = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::addmm", "aten::mm", "aten::bmm",
                                                                 "aten::baddbmm"))
    return {
        "matmul_gflops_per_s": rate / 1e9, "matmul_rows": rows,
        "evolq_per_block": per_block,
        "evolq_limit_seconds_mean": statistics.mean(b["limit_seconds"] for b in per_block),
        "evolq_seconds_per_eval_mean": statistics.mean(b["seconds_per_eval"] for b in per_block),
        "evolq_cpu_seconds_per_eval_mean": statistics.mean(b["cpu_seconds_per_eval"] for b in per_block),
        "baseline": {"flops_per_eval": full, "limit_seconds": full / rate, "seconds_per_eval": base_wall,
                     "cpu_seconds_per_eval": base_cpu, "fraction_of_limit": full / rate / base_cpu},
        "profiled_block": qmodel.blocks[idx].name,
        "profiled_seconds": total / 1e6, "profiled_matmul_share": matmul / total,
        "top_ops": [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:12]],
    }


def run(run):
    a = run.args
    d = run.data(n_eval=1)
    cfg = EvolQConfig.make(w_bits=a.w_bits, passes=1, cycles=a.cycles, holdout=0.0, seed=a.seeds[0],
                           infonce_batch=min(AUTHORS_BATCH, d.xc.shape[0]), reuse_fitness=False, progress=False)
    search, xc = cfg.search, d.xc
    eps = search.eps_for(a.w_bits)
    qmodel = prepare_model(d.base, xc, cfg.quant, arch=a.model)
    blocks = [i for i, b in enumerate(qmodel.blocks) if b.name in {f"blocks.{j}" for j in a.blocks}]
    restrict_blocks(qmodel, blocks)
    start_state = {k: v.clone() for k, v in qmodel.model.state_dict().items()}
    if a.chunks:
        run.save({"model": a.model, "w_bits": a.w_bits, "calib_images": int(xc.shape[0]),
                  "threads": torch.get_num_threads(), "default_max_batch": search.max_batch,
                  **chunk_sizes(qmodel, xc, search, blocks, a.chunks)})
        return
    res = run.doc = {
        "model": a.model, "w_bits": a.w_bits, "a_bits": 8, "preset": "fq-vit", "calib_images": int(xc.shape[0]),
        "passes": 1, "cycles": a.cycles, "scope": SCOPE, "searcher": search.searcher,
        "blocks": [qmodel.blocks[i].name for i in blocks], "seed": a.seeds[0], "threads": torch.get_num_threads(),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "max_batch": search.max_batch, "authors_batch": AUTHORS_BATCH, "evolq_reuse_fitness": False,
        "evolq_file": evolq.__file__, "pairs": []}
    res["loss_check"] = loss_check(qmodel, xc, search, blocks, eps)
    run.save()
    for p in range(a.pairs):
        load0 = os.getloadavg()
        qmodel.model.load_state_dict(start_state)
        base = AuthorsLoop(qmodel, xc, search, eps).run(blocks, a.seeds[0], a.cycles)
        qmodel.model.load_state_dict(start_state)
        ev = run_evolq(qmodel, xc, cfg)
        res["pairs"].append({"pair": p, "baseline": base, "evolq": ev, "ratio": base["seconds"] / ev["seconds"],
                             "cpu_ratio": base["cpu_seconds"] / ev["cpu_seconds"],
                             "baseline_seconds_per_eval": base["seconds"] / base["evaluations"],
                             "evolq_seconds_per_eval": ev["seconds"] / ev["evaluations"],
                             "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())})
        for key in ("ratio", "cpu_ratio"):
            vals = [q[key] for q in res["pairs"]]
            res.update({f"{key}_median": statistics.median(vals), f"{key}_min": min(vals), f"{key}_max": max(vals)})
        run.save()
        print(f"pair {p}: ratio {res['pairs'][-1]['ratio']:.2f}x (CPU time {res['pairs'][-1]['cpu_ratio']:.2f}x), "
              f"load {load0[0]:.2f}", flush=True)
    qmodel.model.load_state_dict(start_state)
    res["profile"] = profile(qmodel, xc, search, blocks, [q["baseline"] for q in res["pairs"]])
    res["equal_evaluations"] = all(q["baseline"]["evaluations"] == q["evolq"]["evaluations"] for q in res["pairs"])
    run.save()
    assert res["equal_evaluations"], "baseline and evolq spent different numbers of evaluations"
    assert res["loss_check"]["max_rel_diff"] < 1e-6, "the two fitness paths disagree on the same candidate"


def profile_rows(d):
    pr = d["profile"]
    return pr["evolq_per_block"] + [{**pr["baseline"], "block": "baseline (whole model)"}]


def profile_text(d):
    pr, bl = d["profile"], d["profile"]["baseline"]
    return (f"Per evaluation (CPU time), the baseline over evolq's mean over the searched blocks: "
            f"{bl['cpu_seconds_per_eval'] / pr['evolq_cpu_seconds_per_eval_mean']:.2f}x; both at the "
            f"physical limit it would be {bl['limit_seconds'] / pr['evolq_limit_seconds_mean']:.2f}x (the "
            f"suffix's FLOPs are all evolq saves per evaluation; the rest is running closer to the matmul rate). "
            f"5x per evaluation would need evolq at {bl['cpu_seconds_per_eval'] / 5:.2f} s, against a limit "
            f"of {pr['evolq_limit_seconds_mean']:.2f} s. The whole-run ratio is lower: both pay the FP32 "
            f"outputs once and evolq also the forward up to the first searched block (its cache), over only "
            f"{d['pairs'][0]['evolq']['evaluations']} evaluations; and the spread of the pairs is the load's "
            f"doing (CPU time too rises when other jobs share the caches).")


def chunks(d):
    ch = load("speed_chunks")
    if not ch:
        return None
    sizes = [str(m) for m in ch["sizes"]]
    return [f"Chunk size (`python -m benchmarks speed --chunks ...`, `speed_chunks.json`): CPU seconds of one "
            f"evaluation (one candidate, {ch['calib_images']} images, least of {ch['repeats']}, sizes interleaved) "
            f"per `max_batch`; the default is {ch['default_max_batch']}. Load average at the end: "
            f"{ch['loadavg'][0]:.1f}.", "",
            table(["block", *[f"max_batch {m}" for m in sizes], "same losses"],
                  [[b["block"], *[f"{b['cpu_seconds'][m]:.2f}" for m in sizes], b["losses_equal"]]
                   for b in ch["blocks"]])]



register(Suite(
    name="speed", doc=__doc__, run=run, order=130,
    what="evolq vs the authors' loop at equal evaluations, alternating pairs, profile",
    common={"model": "vit_tiny_patch16_224", "calib": 100, "seeds": [0], "threads": 1},
    args=[(("--cycles",), {"type": int, "default": 2}), (("--pairs",), {"type": int, "default": 3}),
          (("--blocks",), {"type": int, "nargs": "+", "default": [1, 5, 9],
                           "help": "transformer blocks searched (0-based; evenly spaced by default)"}),
          (("--w-bits",), {"type": int, "default": 4}),
          (("--chunks",), {"type": int, "nargs": "+", "default": None,
                           "help": "instead of the pairs: CPU time of one evaluation per chunk size (max_batch)"})],
    results={"speed": "", "speed_chunks": "--chunks 8 16 32 64 --out speed_chunks"},
    smoke={"calib": 8, "cycles": 1, "pairs": 1, "blocks": [11]},
    report=[Section("speed", [
        "## Speed: evolq vs the authors' loop",
        lambda d: f"`benchmarks/suites/speed.py`: {d['model']} W{d['w_bits']}A{d['a_bits']} ({d['preset']} preset), "
                  f"{d['calib_images']} calibration images, scope {d['scope']}, {d['searcher']}, {d['passes']} pass "
                  f"x {d['cycles']} cycles over {', '.join(d['blocks'])} (last first), seed {d['seed']}, "
                  f"{d['threads']} torch thread(s) on a {d['cpu_count']}-core {d['device']} shared with other jobs. "
                  f"Baseline: the authors' loop (FP32 outputs once; every evaluation runs the whole quantized model "
                  f"over the calibration set in batches of {d['authors_batch']}; every block's start evaluated "
                  f"again; the newest of the tied worst dropped). evolq: cached suffix, chunks of {d['max_batch']}, "
                  f"reuse_fitness={d['evolq_reuse_fitness']} so both spend the same evaluations "
                  f"(equal: {d.get('equal_evaluations')}). Runs alternate baseline, evolq, ...; wall time is what "
                  f"the user waits, CPU time (user + system of the process) is less sensitive to the other jobs.",
        Table([Col("pair", "pair"), Col("baseline s", "baseline.seconds", "{:.1f}"),
               Col("baseline CPU s", "baseline.cpu_seconds", "{:.1f}"), Col("evolq s", "evolq.seconds", "{:.1f}"),
               Col("evolq CPU s", "evolq.cpu_seconds", "{:.1f}"),
               Col("evaluations", lambda q: f"{q['baseline']['evaluations']} / {q['evolq']['evaluations']}"),
               Col("ratio (wall)", "ratio", "{:.2f}x"), Col("ratio (CPU)", "cpu_ratio", "{:.2f}x"),
               Col("load (1 min)", lambda q: f"{q['loadavg_before'][0]:.1f} -> {q['loadavg_after'][0]:.1f}")],
              "pairs"),
        lambda d: f"Median ratio baseline / evolq at equal evaluations: {d['ratio_median']:.2f}x wall "
                  f"(spread {d['ratio_min']:.2f}-{d['ratio_max']:.2f}), {d['cpu_ratio_median']:.2f}x CPU time "
                  f"(spread {d['cpu_ratio_min']:.2f}-{d['cpu_ratio_max']:.2f}), {len(d['pairs'])} pairs.",
        lambda d: f"Same candidates, both fitness paths (the authors' full-model loss and evolq's cached, chunked "
                  f"one): {len(d['loss_check']['candidates'])} candidates, largest difference "
                  f"{d['loss_check']['max_abs_diff']:.3g} (relative {d['loss_check']['max_rel_diff']:.3g}).",
        lambda d: f"Profile: one evaluation per searched block against the physical limit, its FLOPs (torch's FLOP "
                  f"counter) at the measured matmul rate ({d['profile']['matmul_gflops_per_s']:.1f} GFLOP/s, one "
                  f"thread, CPU time). evolq's times are the least of two calls with the cache filled; the "
                  f"baseline's the median per evaluation over the runs." if d.get("profile") else None,
        Table([Col("evaluation", "block"), Col("GFLOP", "flops_per_eval", lambda v: f"{v / 1e9:.1f}"),
               Col("limit s", "limit_seconds", "{:.2f}"), Col("CPU s", "cpu_seconds_per_eval", "{:.2f}"),
               Col("wall s", "seconds_per_eval", "{:.2f}"), Col("limit / CPU", "fraction_of_limit", "{:.0%}")],
              lambda d: profile_rows(d) if d.get("profile") else []),
        lambda d: profile_text(d) if d.get("profile") else None,
        lambda d: f"Top operators of one evolq evaluation on {d['profile']['profiled_block']} "
                  f"({d['profile']['profiled_seconds']:.2f} s profiled; matrix products "
                  f"{d['profile']['profiled_matmul_share']:.0%}):" if d.get("profile") else None,
        Table([Col("operator", "op"), Col("self s", "self_seconds", "{:.3f}"), Col("calls", "calls")],
              "profile.top_ops"),
        chunks])]))
