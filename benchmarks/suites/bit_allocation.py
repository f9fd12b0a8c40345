"""Per-layer bit allocation (``evolq allocate``): the allocation searchers at equal fitness
evaluations on one proxy, each one's chosen allocation built with a real start and scored on the
evaluation split, the uniform allocation of the same packed size beside them, and (``--spearman N``)
the proxy's rank agreement with N final models.

Every searcher of a seed shares one proxy, its weight tables and, for the searchers that use it,
one sensitivity measurement, whose evaluations are charged to each of them; the fitness memo is
reset between searchers, so none gets another's evaluations for free. Each allocation is chosen
by the hold-out (calibration images kept out of calibration, tables and fitness); the evaluation
split only reports. ``--budget uniform=B`` is the packed size of every layer at B bits with
``--edge-bits`` on the first layer and the classifier; any ``evolq allocate`` budget works too.
Resumable: finished (searcher, seed) runs are skipped.

``--searchers`` takes registered allocation searchers (nsga2, ilp, greedy, random, evopress) and
the labels of ``VARIANTS`` (``nsga2-staged``: nsga2 with its children pre-screened on 8 fitness
images). ``--searcher-arg KEY=VALUE`` goes to every listed searcher whose factory takes KEY. A
staged searcher's ``--evaluations`` are full-fitness equivalents by images seen
(``evolq.search.staged``), so the searchers meet at equal images seen. Every row records the
candidates scored per minute (all stages, memo misses, the sensitivity pass included, over the
search's wall time), a staged row its stages' counts and, ``--rank-check N`` (default 32), the
Spearman rho of the last generation's first-stage losses against the last stage's on N of those
candidates (scored again after the search: not charged to it)."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import time

import torch

from evolq.allocation.engine import AllocationEngine
from evolq.allocation.plot import plot_fronts
from evolq.allocation.setup import budget_cost, genes_to_bits, prepare_allocation, reference_genes
from evolq.api import prepare_model
from evolq.config import AllocationConfig, QuantConfig, field_default
from evolq.data import split_calibration
from evolq.evaluate import evaluate_qmodel, predict
from evolq.problems.bit_allocation import BitAllocationProblem
from evolq.search.allocators import ALLOCATORS, NEEDS_SENSITIVITY

from ..report import Col, Section, Table, mean_sd
from ..runner import Suite, cpu_info, register


def _slug(arch: str, budget: str, start: str, menu: str = "") -> str:
    """The figure's name part: ``vit_tiny_uniform3_gptq``, plus ``_m34568`` for a menu other than the default."""
    short = arch.replace("_patch16_224", "").replace("tf_", "")
    m = "" if menu in ("", _a("menu")) else "_m" + re.sub(r"[^0-9a-z]", "", menu)
    return f"{short}_{budget.replace('=', '').replace('.', 'p')}_{start}{m}"


def _group(row) -> str:
    """A run's group, its key less the searcher: model, preset, start and tag, budget, menu."""
    return row["key"].rsplit("|", 1)[0]


def _plot(run, row) -> None:
    """The figure of ``row``'s (group, seed), drawn from the record (every searcher run so far, the
    uniform point, the budget): a resumed run draws what an uninterrupted one would."""
    rows = [r for r in run.doc["runs"] if _group(r) == _group(row) and r["seed"] == row["seed"]]
    fronts = {r["searcher"]: r["front"] for r in rows if r.get("front")}
    if not fronts:
        return
    kind, _, value = row["budget"].partition("=")
    uniform = [{"option": row["budget_label"].partition("=")[2], "size_bytes": r["chosen"]["size_bytes"],
                "loss": r["chosen"]["loss"]} for r in rows if r["searcher"] == "uniform"]
    name = f"{run.path.stem}_{_slug(row['model'], row['budget_label'], row['start'], row['menu'])}_seed{row['seed']}"
    plot_fronts(fronts, run.path.with_name(f"{name}{row.get('tag', '')}.png"), uniform=uniform,
                budget_bytes=float(value) * 1e6 if kind == "size-mb" else None,
                title=f"{row['model']} {row['budget_label']} ({row['preset']}, menu {row['menu']}, seed {row['seed']})")


def _short(m):
    return {k: round(float(m[k]), 4) for k in ("top1", "top5", "agreement", "kl")}


def uniform_bits(layers, bits: int, edge: int | None) -> dict:
    out = {n: bits for n in layers}
    if edge:
        out[layers[0]] = out[layers[-1]] = max(bits, edge)
    return out


def resolve_budget(text: str, sizes, edge):
    """``uniform=B`` -> (the size-mb budget of that uniform model, its allocation); else (text, None)."""
    if text.startswith("uniform="):
        bits = uniform_bits(sizes.layers, int(text.split("=")[1]), edge)
        return f"size-mb={sizes.bytes_of_bits(bits) / 1e6:.6f}", bits
    return text, None


# searcher labels that are a registered searcher with set arguments (``--searcher-arg`` adds to them)
VARIANTS = {"nsga2-staged": ("nsga2", {"screen": 8})}


def _base(name: str) -> str:
    """The registered searcher behind a ``--searchers`` label."""
    return VARIANTS.get(name, (name, {}))[0]


def searcher_kwargs(name: str, given: dict) -> dict:
    """The arguments of ``name``: its variant's, then those of ``given`` its factory takes."""
    import inspect

    base, fixed = VARIANTS.get(name, (name, {}))
    if base == "uniform":
        return {}
    params = inspect.signature(ALLOCATORS.get(base)).parameters
    return {**fixed, **{k: v for k, v in given.items() if k in params and k != "holdout"}}


def _rank_check(eng, s, n: int) -> dict | None:
    """Spearman rho of the last generation's first-stage losses against the last stage's (the full
    fitness, or that generation's last-stage sample), on the first ``n`` of its first-stage candidates."""
    from scipy.stats import spearmanr

    staged = getattr(eng.searcher, "staged", None)
    if staged is None or staged.first is None or n < 3:
        return None
    genes, first = staged.first["genes"][:n], staged.first["losses"][:n]
    t0 = time.perf_counter()
    last = staged.samples[-1]
    scores = s.fitness(genes) if last is None else eng.problem.sample_losses(genes, last)[0]
    rho = spearmanr(first.tolist(), scores.tolist()).statistic
    return {"candidates": int(genes.shape[0]), "first_images": staged.images[0], "last_images": staged.images[-1],
            "spearman": None if rho != rho else float(rho), "seconds": time.perf_counter() - t0}


def _final(base, fit_x, hold_x, quant, bits, xe, ye, fp_logits, arch):
    t0 = time.perf_counter()
    qm = prepare_model(copy.deepcopy(base), fit_x, dataclasses.replace(quant, layer_bits=bits), arch=arch,
                       holdout=hold_x)
    sec = time.perf_counter() - t0
    res, _ = evaluate_qmodel(qm, xe, ye, fp_logits=fp_logits)
    return _short(res["quantized"]), sec


def _reset(f):
    f.memo = {}
    f.clear_cache()
    f.evaluations = f.requests = f.blocks_run = f.blocks_full = 0
    f.seconds = 0.0
    f.clear_samples()
    f.sample_evaluations = f.sample_images = 0


def _search(name, s, cfg, costs, cname, limit, shared, seed, kwargs, rank_check=0):
    _reset(s.fitness)
    p = BitAllocationProblem(s.fitness, costs, limit, budget_cost=cname, seed=seed)
    eng = AllocationEngine(p, s.fitness, searcher=name, searcher_kwargs=kwargs, popsize=cfg.popsize,
                           evaluations=cfg.evaluations, seed=seed, holdout=s.holdout,
                           reference=reference_genes(p, cfg.sensitivity), select=cfg.select)
    sens = name in NEEDS_SENSITIVITY and shared is not None
    if sens:  # the shared measurement, charged to this searcher
        eng.sensitivity = shared["sensitivity"]
        s.fitness.memo.update(shared["memo"])
        p.archive.update(shared["archive"])
    t0 = time.perf_counter()
    res = eng.run()
    res["wall_seconds"] = time.perf_counter() - t0 + (shared["seconds"] if sens else 0.0)
    fit = res["fitness"]  # computed allocations at every fidelity (memo misses), the shared sensitivity pass added
    scored = fit["evaluations"] + fit.get("sample_evaluations", 0) + (len(shared["archive"]) if sens else 0)
    res["candidates_scored"] = scored
    res["candidates_per_min"] = scored / (res["wall_seconds"] / 60) if res["wall_seconds"] else 0.0
    res["rank_check"] = _rank_check(eng, s, rank_check)
    return res


def run(run):
    a = run.args
    doc = run.doc
    doc.setdefault("runs", [])
    if a.replot:
        for row in {(_group(r), r["seed"]): r for r in doc["runs"]}.values():
            _plot(run, row)
        return
    kwargs = {k: json.loads(v) for k, _, v in (x.partition("=") for x in a.searcher_arg)}
    names = [n for n in a.searchers.split(",") if n]
    unknown = [n for n in names if _base(n) not in ALLOCATORS.names()]
    if unknown:
        raise SystemExit(f"unknown searcher {', '.join(unknown)}: choose from {', '.join(ALLOCATORS.names())} or "
                         f"{', '.join(VARIANTS)}")
    taken = {k for n in names for k in searcher_kwargs(n, kwargs)}
    if set(kwargs) - taken:
        raise SystemExit(f"no listed searcher takes --searcher-arg {', '.join(sorted(set(kwargs) - taken))}")
    d = run.data()
    arch = a.model
    opts = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v for k, _, v in
            (x.partition("=") for x in a.start_arg)}
    quant = QuantConfig.preset(a.preset, w_bits=a.w_bits, a_bits=a.a_bits, start=a.start, start_options=opts,
                               edge_bits=a.edge_bits or None)
    label = f"{arch}|{a.preset}|{a.start}{a.tag}|{a.budget}|{a.menu}"
    with torch.no_grad():
        fp_logits = None if a.no_final else predict(d.base.eval(), d.xe)
    if a.limit_only:
        return _limit_only(run, a, d, quant, label)
    for seed in a.seeds:
        todo = [n for n in names + (["uniform"] if not a.no_final and a.budget.startswith("uniform=") else [])
                if not any(r["key"] == f"{label}|{n}" and r["seed"] == seed for r in doc["runs"])]
        if not todo and not (a.spearman and seed == a.seeds[0]):
            continue
        cfg = AllocationConfig(menu=a.menu, budget="avg-bits=8", evaluations=a.evaluations, popsize=a.popsize,
                               fitness_images=a.fitness_images, front=a.front, seed=seed, progress=False)
        fit_x, hold_x = split_calibration(d.xc, cfg.holdout, seed)
        t0 = time.perf_counter()
        s = prepare_allocation(d.base, fit_x, hold_x, quant, cfg, arch=arch)
        prep = time.perf_counter() - t0
        budget, ualloc = resolve_budget(a.budget, s.sizes, a.edge_bits)
        cfg = dataclasses.replace(cfg, budget=budget)
        costs, cname, limit = budget_cost(*cfg.budget_kind, s.sizes, cfg.front)
        shared = None
        if any(_base(n) in NEEDS_SENSITIVITY for n in todo):
            p0 = BitAllocationProblem(s.fitness, costs, limit, budget_cost=cname, seed=seed)
            t1 = time.perf_counter()
            sens = p0.sensitivity(reference_genes(p0, cfg.sensitivity))
            shared = {"sensitivity": sens, "memo": dict(s.fitness.memo), "archive": dict(p0.archive),
                      "seconds": time.perf_counter() - t1}
        base_row = {"seed": seed, "model": arch, "preset": a.preset, "start": a.start, "tag": a.tag,
                    "budget": budget, "budget_label": a.budget, "menu": a.menu, "fitness_images": cfg.fitness_images,
                    "popsize": cfg.popsize, "front_floor": cfg.front, "prepare_seconds": prep, "threads": a.threads}
        for name in todo:
            row = dict(base_row, key=f"{label}|{name}", searcher=name)
            if name == "uniform":
                g = torch.tensor([s.menu.index(ualloc[n]) for n in s.layers])
                bits = ualloc
                row["chosen"] = {"loss": float(s.fitness(g[None])[0]), "size_bytes": float(s.sizes.bytes(g)[0]),
                                 "holdout_loss": float(s.holdout(g[None])[0])}
            else:
                skw = searcher_kwargs(name, kwargs)
                res = _search(_base(name), s, cfg, costs, cname, limit, shared, seed, skw, a.rank_check)
                ch = res["front"][res["chosen"]]
                g = torch.tensor(ch["genes"])
                bits = genes_to_bits(s.layers, s.menu, g)
                row.update(evaluations=res["evaluations"], generations=res["generations"],
                           sensitivity_evaluations=len(shared["archive"]) if shared and _base(name) in NEEDS_SENSITIVITY
                           else 0, search_seconds=res["wall_seconds"], fitness=res["fitness"],
                           chosen={k: ch[k] for k in ("loss", "holdout_loss", "size_bytes") if k in ch},
                           front=[{k: pt[k] for k in ("loss", "size_bytes", "holdout_loss") if k in pt}
                                  for pt in res["front"]], searcher_kwargs=skw, spent=res["spent"],
                           candidates_scored=res["candidates_scored"], candidates_per_min=res["candidates_per_min"])
                if res.get("staged") is not None:
                    row.update(staged=res["staged"], rank_check=res["rank_check"])
            row["avg_bits"] = float(s.sizes.avg_bits(g)[0])
            row["allocation"] = bits
            same = next((r for r in doc["runs"] if _group(r) == label and r["seed"] == seed
                         and "final" in r and r["allocation"] == bits), None)
            if same is not None:  # the same seed and allocation builds the same model: its figures, not a rebuild
                row["final"], row["final_seconds"], row["final_same_as"] = same["final"], 0.0, same["searcher"]
            elif not a.no_final:
                row["final"], row["final_seconds"] = _final(d.base, fit_x, hold_x, quant, bits, d.xe, d.ye,
                                                            fp_logits, arch)
            row["cpu"] = cpu_info()
            doc["runs"].append(row)
            run.save()
            print(f"{name:>8} seed {seed}: {row.get('evaluations', 0)} evals, loss {row['chosen']['loss']:.4f}, "
                  f"hold-out {row['chosen'].get('holdout_loss', float('nan')):.4f}, {row['avg_bits']:.3f} bits, "
                  f"final {row.get('final', {}).get('top1', float('nan')):.1f}", flush=True)
        if todo:
            _plot(run, row)
        if a.spearman and seed == a.seeds[0]:
            _spearman(run, a, s, label, seed, d, fit_x, hold_x, quant, fp_logits)


def _limit(s, threads: int) -> dict:
    """The fitness against the physical limit: the FLOPs of one whole evaluation (no prefix reuse, no memo;
    PyTorch's FLOP counter: matmuls and convolutions) at the measured matmul rate (``speed``'s
    ``matmul_rate``: best FLOP per CPU-second of the model's linear shapes) on ``threads`` threads, against
    the measured wall time of such an evaluation (least of 3)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .speed import matmul_rate

    g = torch.zeros(1, len(s.layers), dtype=torch.long)  # the FLOPs do not depend on the widths
    _reset(s.fitness)
    with FlopCounterMode(display=False) as fc:
        s.fitness(g)
    flops = fc.get_total_flops()
    wall = float("inf")
    for _ in range(3):
        _reset(s.fitness)
        t = time.perf_counter()
        s.fitness(g)
        wall = min(wall, time.perf_counter() - t)
    rate = matmul_rate([s.fitness.chunk * 197], repeats=3)  # ViT-Tiny's linear shapes, a chunk of 197 tokens
    limit = flops / (rate * threads)
    return {"flops_per_eval": flops, "matmul_gflops_per_cpu_s": rate / 1e9, "threads": threads,
            "limit_seconds": limit, "seconds_per_full_eval": wall, "fraction_of_limit": limit / wall}


def _limit_only(run, a, d, quant, label):
    """``--limit-only``: the fitness against its FLOP limit on a proxy with round-to-nearest tables (the
    tables' rounding does not change the forward's cost); run it alone on the machine."""
    cfg = AllocationConfig(menu=a.menu, budget="avg-bits=8", fitness_images=a.fitness_images, tables="rtn",
                           seed=a.seeds[0], progress=False)
    fit_x, hold_x = split_calibration(d.xc, cfg.holdout, a.seeds[0])
    s = prepare_allocation(d.base, fit_x, hold_x, quant, cfg, arch=a.model)
    rec = dict(_limit(s, a.threads), seed=a.seeds[0], key=label, alone=True, cpu=cpu_info())
    run.doc.setdefault("limit", []).append(rec)
    run.save()
    print(f"one whole fitness evaluation ({a.fitness_images} images): {rec['seconds_per_full_eval']:.3f} s, "
          f"{rec['flops_per_eval'] / 1e9:.1f} GFLOP, limit {rec['limit_seconds']:.3f} s at "
          f"{rec['matmul_gflops_per_cpu_s']:.1f} GFLOP per CPU-second x {a.threads} threads: "
          f"{rec['fraction_of_limit']:.0%} of the limit", flush=True)


def _spearman(run, a, s, label, seed, d, fit_x, hold_x, quant, fp_logits):
    """Proxy loss and hold-out KL against the final models' evaluation KL and top-1, over ``--spearman``
    allocations spread over the loss range of what the last searcher evaluated."""
    from scipy.stats import spearmanr

    key = f"spearman|{label}"
    doc = run.doc
    rec = next((r for r in doc.setdefault("spearman", []) if r["key"] == key and r["seed"] == seed), None)
    if rec is None:
        memo = sorted(s.fitness.memo.items(), key=lambda kv: kv[1])
        idx = [round(i * (len(memo) - 1) / max(1, a.spearman - 1)) for i in range(a.spearman)]
        rec = {"key": key, "seed": seed, "model": a.model, "start": a.start,
               "allocations": [list(memo[i][0]) for i in dict.fromkeys(idx)], "points": []}
        doc["spearman"].append(rec)
    if len(rec["allocations"]) < a.spearman:  # a later, larger --spearman: extend the same record
        _extend(rec, a.spearman, len(s.menu), seed)
    for genes in rec["allocations"][len(rec["points"]):]:
        g = torch.tensor(genes)
        final, sec = _final(d.base, fit_x, hold_x, quant, genes_to_bits(s.layers, s.menu, g), d.xe, d.ye, fp_logits,
                            a.model)
        rec["points"].append({"loss": float(s.fitness(g[None])[0]), "holdout_loss": float(s.holdout(g[None])[0]),
                              "avg_bits": float(s.sizes.avg_bits(g)[0]), "final": final, "final_seconds": sec})
        if len(rec["points"]) >= 3:
            for proxy in ("loss", "holdout_loss"):
                for target in ("kl", "top1"):
                    v = spearmanr([p[proxy] for p in rec["points"]], [p["final"][target] for p in rec["points"]])
                    rec[f"rho_{proxy}_vs_{target}"] = float(v.statistic)
        run.save()
        print(f"spearman {len(rec['points'])}/{len(rec['allocations'])}: proxy {rec['points'][-1]['loss']:.4f}, final "
              f"KL {final['kl']:.4f}, top-1 {final['top1']:.1f}", flush=True)


def _extend(rec, n, menu_size, seed, changed=3):
    """Add allocations to a Spearman record whose search memo is gone (its searchers ran in an earlier
    invocation): each new one re-draws ``changed`` seeded random genes of a stored allocation, taking the
    stored ones in turn, so the new points stay spread over the stored points' loss range."""
    g = torch.Generator().manual_seed(1000 + seed)
    base, seen = rec["allocations"][:], {tuple(x) for x in rec["allocations"]}
    rec.setdefault("extended", {"from": len(base), "how": f"{changed} seeded random genes re-drawn in each stored "
                                "allocation in turn"})
    i = 0
    while len(rec["allocations"]) < n:
        genes = list(base[i % len(base)])
        for j in torch.randperm(len(genes), generator=g)[:changed].tolist():
            genes[j] = int(torch.randint(menu_size, (1,), generator=g))
        i += 1
        if tuple(genes) not in seen:
            seen.add(tuple(genes))
            rec["allocations"].append(genes)


def _a(name):
    return field_default(AllocationConfig, name)


def _groups(doc) -> list[dict]:
    """One row per (model, budget, start, searcher): the final models' figures as mean +- std over seeds."""
    by: dict = {}
    for r in doc.get("runs", []):
        by.setdefault((r["model"], r["budget_label"], r["start"] + r.get("tag", ""), r["menu"], r["searcher"]),
                      []).append(r)
    order = {n: i for i, n in enumerate(["uniform", "ilp", "greedy", "random", "nsga2", "nsga2-staged", "evopress"])}
    rows = []
    for (model, budget, start, menu, name), rs in sorted(by.items(),
                                                         key=lambda kv: (*kv[0][:4], order.get(kv[0][4], 9))):
        fin = [r["final"] for r in rs if "final" in r]
        # runs paused for other jobs, or sharing the CPU with them: their wall times are no figures
        timed = [r for r in rs if not r.get("paused") and not r.get("contended")]
        on = f" (seeds {','.join(str(r['seed']) for r in timed)})" if timed and len(timed) < len(rs) else ""
        loads = [r["cpu"]["load_1m"] for r in rs]
        rows.append({
            "model": model.replace("_patch16_224", ""), "budget": budget, "start": start, "menu": menu,
            "searcher": name,
            "seeds": ",".join(str(r["seed"]) for r in rs),
            "top1": mean_sd([f["top1"] for f in fin]), "kl": mean_sd([f["kl"] for f in fin], "{:.3f}"),
            "proxy": mean_sd([r["chosen"]["loss"] for r in rs], "{:.3f}"),
            "holdout": mean_sd([r["chosen"].get("holdout_loss") for r in rs], "{:.3f}"),
            "bits": mean_sd([r["avg_bits"] for r in rs], "{:.3f}"),
            "mb": mean_sd([r["chosen"]["size_bytes"] / 1e6 for r in rs], "{:.3f}"),
            "evals": mean_sd([r.get("evaluations") for r in rs], "{:.0f}") or "-",
            "search_s": _on(mean_sd([r.get("search_seconds") for r in timed], "{:.0f}"), on),
            "evals_s": _on(mean_sd([r["fitness"]["evaluations_per_s"] for r in timed if r.get("fitness")], "{:.2f}"),
                           on),
            "cand_min": _on(mean_sd([r.get("candidates_per_min") for r in timed], "{:.0f}"), on),
            "rho": mean_sd([(r.get("rank_check") or {}).get("spearman") for r in rs], "{:.2f}") or "-",
            "cpu": f"{rs[0]['cpu']['model']} ({rs[0]['cpu']['cores']} cores, load "
                   f"{min(loads):.1f}{f'-{max(loads):.1f}' if max(loads) > min(loads) else ''})"})
    return rows


def _on(value: str, on: str) -> str:
    return value + on if value else "-"


def _spearman_lines(doc) -> list[str]:
    out = []
    for r in doc.get("spearman", []):
        if len(r["points"]) >= 3:
            out.append(f"Proxy against final model, {r['model']} {r['start']} seed {r['seed']}, "
                       f"{len(r['points'])} allocations spread over the loss range the nsga2 run evaluated: "
                       f"Spearman rho of the fitness loss vs the final model's evaluation KL {r['rho_loss_vs_kl']:.3f} "
                       f"(vs top-1 {r['rho_loss_vs_top1']:.3f}); of the hold-out loss vs evaluation KL "
                       f"{r['rho_holdout_loss_vs_kl']:.3f} (vs top-1 {r['rho_holdout_loss_vs_top1']:.3f})."
                       + (f" The first {r['extended']['from']} allocations come from that run's evaluations, the "
                          f"others re-draw {r['extended']['how'].split(' seeded')[0]} random genes of them in turn."
                          if r.get("extended") else "") + _near(doc, r))
    return out


def _near(doc, r, width=0.5) -> str:
    """The same rho among the allocations within ``width`` mean bits of the budget's uniform allocation: does
    the proxy still rank the near-equal allocations a search chooses between?"""
    from scipy.stats import spearmanr

    u = next((x["avg_bits"] for x in doc.get("runs", []) if x["searcher"] == "uniform" and x["seed"] == r["seed"]
              and _group(x) == r["key"].split("|", 1)[1]), None)
    pts = [p for p in r["points"] if u is not None and abs(p["avg_bits"] - u) <= width]
    if len(pts) < 4:
        return ""
    loss = [p["loss"] for p in pts]
    return (f" Among the {len(pts)} of them within {width} mean bits of the budget's ({u:.2f}): rho vs KL "
            f"{spearmanr(loss, [p['final']['kl'] for p in pts]).statistic:.3f}, vs top-1 "
            f"{spearmanr(loss, [p['final']['top1'] for p in pts]).statistic:.3f}.")


def _figures(doc) -> list[str]:
    from ..runner import RESULTS

    return [f"![{p.stem}](../benchmarks/results/{p.name})" for p in sorted(RESULTS.glob("bit_allocation_*_seed0.png"))]


REPORT = [
    "## Per-layer bit allocation (`bit_allocation.json`)",
    "`python -m benchmarks bit_allocation` (`benchmarks/suites/bit_allocation.py`): per seed, one proxy (weight tables "
    "of every layer at every menu width from the start, fitness = KL of logits on `fitness_images` calibration images "
    "against cached FP32 logits), each searcher given the same number of fitness evaluations (the sensitivity pass "
    "charged to the searchers that use it), its allocation chosen on the hold-out calibration images, then built with "
    "the real start and scored on the 500-image evaluation split. `uniform` is the uniform allocation defining the "
    "budget (edge layers at 8 bits). Mean +- std over the seeds listed.",
    Table([Col("model", "model"), Col("budget", "budget"), Col("start", "start"), Col("menu", "menu"),
           Col("searcher", "searcher"),
           Col("seeds", "seeds"), Col("top-1", "top1"), Col("KL", "kl"), Col("proxy loss", "proxy"),
           Col("hold-out loss", "holdout"), Col("avg bits", "bits"), Col("MB", "mb"), Col("evals", "evals"),
           Col("search s", "search_s"), Col("fitness evals/s", "evals_s"), Col("candidates/min", "cand_min"),
           Col("stage rho", "rho"), Col("CPU", "cpu")], _groups),
    lambda d: d.get("note"),
    lambda d: [f"A whole fitness evaluation (no prefix reuse, {r['flops_per_eval'] / 1e9:.1f} GFLOP on 64 images) "
               f"took {r['seconds_per_full_eval']:.2f} s alone on {r['cpu']['model']} (int8 flags "
               f"{', '.join(r['cpu']['flags'])}; {r['threads']} threads, load "
               f"{r['cpu']['load_1m']:.1f}); at the measured matmul rate ({r['matmul_gflops_per_cpu_s']:.0f} GFLOP per "
               f"CPU-second) its limit is {r['limit_seconds']:.2f} s: the fitness runs at "
               f"{r['fraction_of_limit']:.0%} of the FLOP limit (`--limit-only`)." for r in d.get("limit", [])],
    _spearman_lines,
    _figures,
]


VIT = "--model vit_tiny_patch16_224 --preset outlier-aware --evaluations 400"
register(Suite(
    name="bit_allocation", doc=__doc__, run=run, order=58, resume=True, report=[Section("bit_allocation", REPORT)],
    what="per-layer bit allocation: nsga2 (plain, staged), evopress vs sensitivity+ILP, greedy and random at equal "
         "evaluations; final models",
    common={"model": "vit_tiny_patch16_224", "calib": 500, "eval": 500, "seeds": [0], "threads": 2},
    args=[(("--preset",), {"default": "outlier-aware"}), (("--start",), {"default": "gptq"}),
          (("--start-arg",), {"action": "append", "default": [], "help": "KEY=VALUE of the final model's start"}),
          (("--w-bits",), {"type": int, "default": 3, "help": "the regime's strengths follow these bits"}),
          (("--a-bits",), {"type": int, "default": 8}), (("--edge-bits",), {"type": int, "default": 8}),
          (("--menu",), {"default": _a("menu")}), (("--budget",), {"default": "uniform=3"}),
          (("--searchers",), {"default": "nsga2,ilp,greedy,random"}),
          (("--searcher-arg",), {"action": "append", "default": [],
                                 "help": "KEY=VALUE (JSON values) for every listed searcher that takes KEY"}),
          (("--rank-check",), {"type": int, "default": 32,
                               "help": "staged searchers: first vs last stage Spearman on N candidates"}),
          (("--evaluations",), {"type": int, "default": _a("evaluations")}),
          (("--popsize",), {"type": int, "default": _a("popsize")}),
          (("--fitness-images",), {"type": int, "default": _a("fitness_images")}),
          (("--front",), {"type": float, "default": _a("front")}),
          (("--no-final",), {"action": "store_true", "help": "search only"}),
          (("--spearman",), {"type": int, "default": 0, "help": "final models of N allocations (first seed)"}),
          (("--limit-only",), {"action": "store_true", "help": "only the fitness against its FLOP limit"}),
          (("--replot",), {"action": "store_true", "help": "only redraw every figure from the record"}),
          (("--tag",), {"default": ""})],
    results={"bit_allocation": [
        f"{VIT} --budget uniform=3 --searchers ilp,greedy,random,nsga2 --spearman 12 --seeds 0",
        f"{VIT} --budget uniform=3 --searchers nsga2 --spearman 20 --seeds 0",
        f"{VIT} --budget uniform=3 --searchers ilp,nsga2 --seeds 1,2",
        f"{VIT} --budget uniform=3 --start ofq --searchers ilp,nsga2 --seeds 0,1,2",
        "--model tf_efficientnet_lite0 --preset fq-vit --evaluations 400 --budget uniform=3 --searchers ilp,nsga2 "
        "--seeds 0",
        f"{VIT} --budget uniform=4 --w-bits 4 --searchers ilp,nsga2 --seeds 0",
        f"{VIT} --budget uniform=4 --w-bits 4 --menu 3,4,5,6,8 --searchers nsga2 --seeds 0",
        "--model vit_tiny_patch16_224 --preset outlier-aware --limit-only"]},
    smoke={"calib": 24, "eval": 8, "evaluations": 12, "popsize": 4, "fitness_images": 4, "seeds": [0],
           "searchers": "nsga2,ilp"},
))
