"""Generate docs/results.md from benchmarks/results/*.json (no number typed by hand,
except the paper's published table, quoted as the reference).

    python benchmarks/make_results.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "results.md"

# Published ImageNet top-1 (Evol-Q paper, Table 2, fully quantized, DeiT-Tiny): FQ-ViT vs Evol-Q.
PAPER_DEIT_T = {"fp32": 72.21, 8: (71.61, 71.63), 4: (66.91, 67.29), 3: (35.79, 39.45)}


def load(name):
    p = RES / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def f2(x):
    return f"{x:.2f}"


def ms(stat, digits=1):
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def section_accuracy(lines):
    for name in ("accuracy", "accuracy_outlier-aware"):
        d = load(name)
        if not d or not d.get("summary"):
            continue
        st = d["settings"]
        lines += [f"## Accuracy over seeds (`{name}.json`)", "",
                  f"`benchmarks/accuracy.py`: start point `{st.get('preset', 'fq-vit')}`; per seed, "
                  f"{st['calib']} calibration images drawn from the 500-image pool ({st['holdout']:.0%} held out "
                  f"to keep or roll back a pass) and the search seeded; Evol-Q {st['passes']} pass(es) x "
                  f"{st['cycles']} cycles per block, {st['searcher']}, {st['loss']}; {d['n_eval']} evaluation "
                  f"images. Mean ± sample standard deviation over seeds {st['seeds']}.", ""]
        rows = []
        for model, fp in d["fp32"].items():
            rows.append([model, "FP32", "", f2(fp["top1"]), "100", "0"])
            for r in d["summary"]:
                if r["model"] == model:
                    rows.append(["", f"W{r['w_bits']}A{r['a_bits']}", "start" if r["stage"] == "start" else "Evol-Q",
                                 ms(r["top1"]), ms(r["agreement"]), ms(r["kl"], 4)])
        lines += [table(["model", "bits", "stage", "top-1", "agreement", "KL"], rows), ""]
        deltas = []
        for model in d["fp32"]:
            for bits in sorted({r["w_bits"] for r in d["runs"] if r["model"] == model}, reverse=True):
                rs = [r for r in d["runs"] if r["model"] == model and r["w_bits"] == bits]
                dt = [r["final"]["top1"] - r["start"]["top1"] for r in rs]
                paper = PAPER_DEIT_T.get(bits)
                deltas.append([model, f"W{bits}A8", " ".join(f"{v:+.1f}" for v in dt),
                               f"{sum(dt) / len(dt):+.2f}",
                               f"{paper[1] - paper[0]:+.2f}" if paper else "-", rs[0]["evaluations"],
                               ", ".join("/".join("kept" if k else "rolled back" for k in r["passes_kept"]) or "-"
                                        for r in rs)])
        lines += ["Evol-Q minus start point, top-1 per seed, against the paper's published delta (DeiT-Tiny, "
                  "full ImageNet val, 10 passes x 3 cycles):", "",
                  table(["model", "bits", "delta per seed", "mean delta", "paper delta (DeiT-T)", "evals per run",
                         "pass per seed (hold-out decision)"], deltas), ""]


def section_start_point(lines):
    d = load("start_point")
    if not d:
        return
    lines += ["## Start point (no search)", "",
              f"`benchmarks/start_point.py`: {d['model']} ({d.get('weights', '')}), {d['n_calib']} calibration / "
              f"{d['n_eval']} evaluation images. FP32 top-1 {f2(d['fp32']['top1'])}. Tables `bits` and `ablation`: "
              "the authors' FQ-ViT regime (the default); `outlier` and `outlier-ablation`: the "
              "`outlier-aware` preset and its pieces (see docs/concepts.md).", ""]
    rows = [[r["table"], r["label"], f2(r["metrics"]["top1"]), f2(r["metrics"]["agreement"]),
             f"{r['metrics']['kl']:.4f}"] for r in d["runs"]]
    lines += [table(["table", "config", "top-1", "agreement", "KL"], rows), ""]


def section_preset_strength(lines):
    d = load("preset_strength")
    if not d:
        return
    lines += ["## Choosing the outlier-aware migration strength (calibration pool only)", "",
              f"`benchmarks/preset_strength.py`: {d['model']}, outlier-aware start point calibrated on "
              f"{d['n_calib']} calibration-pool images and scored on {d['n_score']} other calibration-pool "
              "images (KL and agreement with FP32; the evaluation split is not used). The preset takes the "
              "lowest KL per weight bit width: "
              + ", ".join(f"W{b}: {s:g}" for b, s in d["best"].items()) + ".", ""]
    strengths = sorted({r["strength"] for r in d["rows"]})
    rows = []
    for b in sorted({r["w_bits"] for r in d["rows"]}, reverse=True):
        by = {r["strength"]: r for r in d["rows"] if r["w_bits"] == b}
        rows.append([f"W{b}A8"] + [f"{by[s]['kl']:.4f} / {by[s]['agreement']:.1f}" if s in by else "-"
                                   for s in strengths])
    lines += [table(["bits"] + [f"strength {s:g}" for s in strengths], rows), "",
              "Each cell: KL / agreement (%).", ""]


def section_search(lines):
    d = load("search")
    if not d:
        return
    sch = d.get("schedule", {})
    lines += ["## Evol-Q search vs start point", "",
              f"`benchmarks/search.py`: {d['model']}, {d['calib_images']} calibration / {d['eval_images']} evaluation "
              f"images, {sch.get('passes')} pass(es) x {sch.get('cycles')} cycles, {sch.get('searcher')}, "
              f"{sch.get('loss')}. FP32 top-1 {f2(d['fp32']['top1'])}.", ""]
    rows, paper = [], []
    for r in d["runs"]:
        dt = r["final"]["top1"] - r["start"]["top1"]
        rows.append([f"W{r['w_bits']}A{r['a_bits']}", r["seed"], f2(r["start"]["top1"]), f2(r["final"]["top1"]),
                     f"{dt:+.2f}", f2(r["start"]["agreement"]), f2(r["final"]["agreement"]),
                     f"{r['start']['kl']:.4f}", f"{r['final']['kl']:.4f}", r["evaluations"]])
        if r["w_bits"] in PAPER_DEIT_T:
            fq, ev = PAPER_DEIT_T[r["w_bits"]]
            paper.append([f"W{r['w_bits']}A8", f"seed {r['seed']}", f"{dt:+.2f}", f"{ev - fq:+.2f}",
                          r["evaluations"]])
    lines += [table(["bits", "seed", "start top-1", "final top-1", "delta", "start agree", "final agree",
                     "start KL", "final KL", "evals"], rows), ""]
    if paper:
        lines += ["### Compared with the paper's published deltas", "",
                  "The paper's delta is Evol-Q minus FQ-ViT on DeiT-Tiny, full ImageNet val (50,000 images), "
                  "1,000 calibration images, 10 passes x 3 cycles over all 12 blocks (Table 2).", "",
                  table(["bits", "run", "delta here (top-1)", "paper delta (DeiT-T)", "evals here"], paper), "",
                  "Honest differences: the model here is timm's augreg ViT-Tiny (in21k pre-trained, FP32 top-1 "
                  "on this sample as above), not DeiT-Tiny; the evaluation split has only the images given above, "
                  "so one image is worth 100/N points and deltas under a few points are within noise; the "
                  "schedule is far shorter than the paper's 480 fitness evaluations per model; the final "
                  "model is selected on held-out calibration data, never on the evaluation split "
                  "(the authors' code selects on ImageNet val).", ""]


def section_searchers(lines):
    d = load("searchers")
    if not d:
        return
    lines += ["## Searchers at equal budgets", "",
              f"`benchmarks/searchers.py`: {d['model']} W{d['w_bits']}A8, {d['budget_per_block']} fitness "
              f"evaluations per block and pass (population searchers: generations of {d['popsize']}), "
              f"{d['passes']} pass(es) over {', '.join(d['blocks'])}; {d['calib_images']} calibration / "
              f"{d['eval_images']} evaluation images. FP32 top-1 {f2(d['fp32']['top1'])}, start "
              f"{f2(d['start']['top1'])}.", "",
              "![fitness vs evaluations](../benchmarks/results/searchers.png)", ""]
    rows = [[r["searcher"], r["evaluations"], f"{r['start_fitness']:.4f}", f"{r['final_fitness']:.4f}",
             f2(r["final"]["top1"]), f2(r["final"]["agreement"]), f"{r['final']['kl']:.4f}",
             f"{r['search_seconds']:.0f}"] for r in d["runs"]]
    lines += [table(["searcher", "evals", "start fitness", "final fitness (last block)", "top-1", "agreement",
                     "KL", "seconds"], rows), ""]


def section_losses(lines):
    d = load("losses")
    if not d:
        return
    lines += ["## Fitness losses over passes (evaluation split)", "",
              f"`benchmarks/losses.py`: {d['model']} W{d['w_bits']}A8, {d['cycles']} cycles per block, "
              f"blocks {', '.join(d['blocks'])}, {d['calib_images']} calibration / {d['eval_images']} evaluation "
              f"images, hold-out {d.get('holdout', 0.1):.0%} (0%: every pass kept). Each cell: top-1 / agreement / "
              f"KL on the evaluation split.", "",
              "![losses](../benchmarks/results/losses.png)", ""]
    head = ["loss"] + [f"pass {c['pass']}" for c in d["runs"][0]["per_pass"]]
    rows = [[r["loss"]] + [f"{c['top1']:.2f} / {c['agreement']:.2f} / {c['kl']:.3f}" for c in r["per_pass"]]
            for r in d["runs"]]
    lines += [table(head, rows), ""]


def section_scaling(lines):
    d = load("scaling")
    if not d:
        return
    lines += ["## Cost of a fitness evaluation", "",
              f"`benchmarks/scaling.py`: {d['model']} W4A8, {d['threads']} CPU thread(s); seconds of one batched "
              "fitness call (population x images through the block and everything after it).", ""]
    rows = [[t["vary"], t["calib"], t["population"], t["block"], f"{t['seconds']:.3f}",
             f"{t['ms_per_candidate_image']:.2f}"] for t in d["timings"]]
    lines += [table(["varied", "calib images", "population", "block", "s / call", "ms / (candidate x image)"],
                    rows), ""]
    p = d["profile"]
    lines += [f"Profile of one pass ({p['blocks']} blocks, {p['cycles']} cycles, {p['calib']} calibration images, "
              f"{p['evaluations']} evaluations, {p['seconds']:.1f} s), top operators by self CPU time:", ""]
    lines += [table(["op", "calls", "self s", "share"],
                    [[o["op"], o["calls"], f"{o['self_cpu_s']:.2f}", f"{100 * o['share']:.1f}%"]
                     for o in p["top_ops"][:10]]), ""]


def section_landscape(lines):
    found = sorted(RES.glob("landscape_*.json"))
    if not found:
        return
    lines += ["## Loss landscapes", "",
              "`evolq landscape` (see `benchmarks/landscape.sh`): one block's scales moved along two random "
              "directions, relative to themselves. Roughness = mean absolute second difference of the min-max "
              "normalised surface (same grid for every model, so comparable; 0 for a plane).", ""]
    rows = []
    for f in found:
        d = json.loads(f.read_text())
        for k in d["surfaces"]:
            rows.append([d["arch"], f"W{d.get('w_bits', '?')}A{d.get('a_bits', '?')}", d["block"], d["layer"],
                         d["dim"], f"{d['grid']}x{d['grid']} +-{d['radius']}", k, f"{d['center'][k]:.4f}",
                         f"{d['roughness'][k]:.4f}"])
        lines.append(f"![{f.stem}](../benchmarks/results/{f.stem}.png)")
    lines += ["", table(["model", "bits", "block", "scales", "dim", "grid", "surface", "centre", "roughness"], rows),
              ""]


def section_speed(lines):
    d = load("speed")
    if not d:
        return
    lines += ["## Speed: evolq vs the authors' loop", "",
              f"`benchmarks/speed.py`: {d['model']} W{d['w_bits']}A{d['a_bits']} ({d['preset']} preset), "
              f"{d['calib_images']} calibration images, scope {d['scope']}, {d['searcher']}, {d['passes']} pass x "
              f"{d['cycles']} cycles over {', '.join(d['blocks'])} (last first), seed {d['seed']}, "
              f"{d['threads']} torch thread(s) on a {d['cpu_count']}-core {d['device']} shared with other jobs. "
              f"Baseline: the authors' loop (FP32 outputs once; every evaluation runs the whole quantized model "
              f"over the calibration set in batches of {d['authors_batch']}; every block's start evaluated again; "
              f"the newest of the tied worst dropped). evolq: cached suffix, chunks of {d['max_batch']}, "
              f"reuse_fitness={d['evolq_reuse_fitness']} so both spend the same evaluations "
              f"(equal: {d.get('equal_evaluations')}). Runs alternate baseline, evolq, ...; wall time is what "
              f"the user waits, CPU time (user + system of the process) is less sensitive to the other jobs.", ""]
    rows = []
    for q in d["pairs"]:
        b, e = q["baseline"], q["evolq"]
        rows.append([q["pair"], f"{b['seconds']:.1f}", f"{b['cpu_seconds']:.1f}", f"{e['seconds']:.1f}",
                     f"{e['cpu_seconds']:.1f}", f"{b['evaluations']} / {e['evaluations']}", f"{q['ratio']:.2f}x",
                     f"{q['cpu_ratio']:.2f}x", f"{q['loadavg_before'][0]:.1f} -> {q['loadavg_after'][0]:.1f}"])
    lines += [table(["pair", "baseline s", "baseline CPU s", "evolq s", "evolq CPU s", "evaluations",
                     "ratio (wall)", "ratio (CPU)", "load (1 min)"], rows), "",
              f"Median ratio baseline / evolq at equal evaluations: {d['ratio_median']:.2f}x wall "
              f"(spread {d['ratio_min']:.2f}-{d['ratio_max']:.2f}), {d['cpu_ratio_median']:.2f}x CPU time "
              f"(spread {d['cpu_ratio_min']:.2f}-{d['cpu_ratio_max']:.2f}), {len(d['pairs'])} pairs.", ""]
    lc = d["loss_check"]
    lines += [f"Same candidates, both fitness paths (the authors' full-model loss and evolq's cached, chunked "
              f"one): {len(lc['candidates'])} candidates, largest difference {lc['max_abs_diff']:.3g} "
              f"(relative {lc['max_rel_diff']:.3g}).", ""]
    pr = d.get("profile")
    if pr:
        rows = [[b["block"], f"{b['flops_per_eval'] / 1e9:.1f}", f"{b['limit_seconds']:.2f}",
                 f"{b['cpu_seconds_per_eval']:.2f}", f"{b['seconds_per_eval']:.2f}", f"{b['fraction_of_limit']:.0%}"]
                for b in pr["evolq_per_block"]]
        bl = pr["baseline"]
        rows.append(["baseline (whole model)", f"{bl['flops_per_eval'] / 1e9:.1f}", f"{bl['limit_seconds']:.2f}",
                     f"{bl['cpu_seconds_per_eval']:.2f}", f"{bl['seconds_per_eval']:.2f}",
                     f"{bl['fraction_of_limit']:.0%}"])
        lines += [f"Profile: one evaluation per searched block against the physical limit, its FLOPs (torch's FLOP "
                  f"counter) at the measured matmul rate ({pr['matmul_gflops_per_s']:.1f} GFLOP/s, one thread, CPU "
                  f"time). evolq's times are the least of two calls with the cache filled; the baseline's the "
                  f"median per evaluation over the runs.", "",
                  table(["evaluation", "GFLOP", "limit s", "CPU s", "wall s", "limit / CPU"], rows), "",
                  f"Per evaluation (CPU time), the baseline over evolq's mean over the searched blocks: "
                  f"{bl['cpu_seconds_per_eval'] / pr['evolq_cpu_seconds_per_eval_mean']:.2f}x; both at the "
                  f"physical limit it would be {bl['limit_seconds'] / pr['evolq_limit_seconds_mean']:.2f}x (the "
                  f"suffix's FLOPs are all evolq saves per evaluation; the rest is running closer to the matmul rate). "
                  f"5x per evaluation would need evolq at {bl['cpu_seconds_per_eval'] / 5:.2f} s, against a limit "
                  f"of {pr['evolq_limit_seconds_mean']:.2f} s. The whole-run ratio is lower: both pay the FP32 "
                  f"outputs once and evolq also the forward up to the first searched block (its cache), over only "
                  f"{d['pairs'][0]['evolq']['evaluations']} evaluations; and the spread of the pairs is the load's "
                  f"doing (CPU time too rises when other jobs share the caches).", "",
                  f"Top operators of one evolq evaluation on {pr['profiled_block']} ({pr['profiled_seconds']:.2f} s "
                  f"profiled; matrix products {pr['profiled_matmul_share']:.0%}):", "",
                  table(["operator", "self s", "calls"],
                        [[o["op"], f"{o['self_seconds']:.3f}", o["calls"]] for o in pr["top_ops"]]), ""]
    ch = load("speed_chunks")
    if ch:
        sizes = [str(m) for m in ch["sizes"]]
        rows = [[b["block"], *[f"{b['cpu_seconds'][m]:.2f}" for m in sizes], b["losses_equal"]] for b in ch["blocks"]]
        lines += [f"Chunk size (`speed.py --chunks`, `speed_chunks.json`): CPU seconds of one evaluation (one "
                  f"candidate, {ch['calib_images']} images, least of {ch['repeats']}, sizes interleaved) per "
                  f"`max_batch`; the default is {ch['default_max_batch']}. Load average at the end: "
                  f"{ch['loadavg'][0]:.1f}.", "",
                  table(["block", *[f"max_batch {m}" for m in sizes], "same losses"], rows), ""]


def section_efficientnet(lines):
    for name in ("efficientnet", "efficientnet_seed1", "efficientnet_calib160_cycles4"):
        d = load(name)
        if not d:
            continue
        sch = d.get("schedule", {})
        lines += [f"## EfficientNet-Lite0 (`{name}.json`)", "",
                  f"`benchmarks/efficientnet.py`: {d['n_calib']} calibration / {d['n_eval']} evaluation images, "
                  f"{sch.get('passes')} pass x {sch.get('cycles')} cycles, seed {sch.get('seed')}. "
                  f"FP32 top-1 {f2(d['fp32']['top1'])}.", ""]
        rows = []
        for r in d["runs"]:
            for k in ("start", "final"):
                m = r[k]
                rows.append([f"W{r['w_bits']}A{r['a_bits']}", k, f2(m["top1"]), f2(m["agreement"]), f"{m['kl']:.4f}"])
        lines += [table(["bits", "model", "top-1", "agreement", "KL"], rows), ""]



def _stats(xs):
    import statistics

    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def section_paper_budget(lines):
    d = load("paper_budget")
    if not d:
        return
    st = d["settings"]
    runs = d["runs"]
    dev = sorted({r["device"] for r in runs})
    lines += ["## Evol-Q at the paper's budget: honest vs test-selected (`benchmarks/paper_budget.py`)", "",
              f"{st['passes']} passes x {st['cycles']} cycles over every searched block, all {st['calib']} "
              f"calibration-pool images ({st['holdout']:.0%} of them the hold-out, KL criterion), evaluated on "
              f"{st['eval']} evaluation-split images after every block. *Honest*: the final model (passes kept or "
              f"reverted by the hold-out only). *Test-selected*: the block checkpoint (start included) with the best "
              f"evaluation top-1, which is what the authors' code returns (it picks on ImageNet val); the "
              f"difference is the inflation that selection on test data adds. Run on {', '.join(dev)} with "
              f"max_batch {', '.join(sorted({str(r['max_batch']) for r in runs}))}; the CPU rows on 2 cores (the "
              f"evaluation after every block is part of their seconds).", ""]
    groups = {}
    for r in runs:
        if r["searcher"] == "tournament":
            groups.setdefault((r["run"], r["model"], r["w_bits"], r["a_bits"], r["preset"]), []).append(r)
    rows = []
    for (_run, model, w, a, preset), rs in groups.items():
        def col(key, sub="top1", rs=rs):
            d = 3 if sub == "kl" else 1
            return ms(_stats([r[key][sub] for r in rs]), d) if len(rs) > 1 else f"{rs[0][key][sub]:.{d}f}"
        infl = [r["inflation_top1"] for r in rs]
        q = rs[0].get("quant") or {}  # runs with a start other than the preset's, or edge bits
        regime = ", ".join([preset] + ([f"edge {q['edge_bits']}"] if q.get("edge_bits") else [])
                           + ([f"{q['start']} start"] if q.get("start") else []))
        c = rs[0].get("cpu")
        where = (f"{c['model']} ({', '.join(c['flags'])}; load {c['load_1m']:.1f})" if c else rs[0]["device"])
        secs = " / ".join(f"{r['start_seconds']:.0f} + {r['search_seconds']:.0f}" if "start_seconds" in r
                          else f"{r['seconds']:.0f}" for r in rs)
        rows.append([model.split("_patch")[0], f"W{w}A{a}", regime, len(rs), col("start"), col("honest"),
                     col("test_selected"), ms(_stats(infl)) if len(rs) > 1 else f"{infl[0]:+.1f}",
                     " ".join(f"{sum(r['kept'])}/{len(r['kept'])}" for r in rs),
                     col("honest", "kl") if len(rs) > 1 else f"{rs[0]['honest']['kl']:.3f}", where, secs])
    lines += [table(["model", "bits", "regime and start", "seeds", "start top-1", "honest top-1",
                     "test-selected top-1", "inflation (points)", "passes kept", "honest KL", "device",
                     "seconds (start + search, or the whole run)"], rows), ""]
    base = [r for r in runs if r["run"] == "vit3-oa" and r["seed"] == 0]
    sr = base + [r for r in runs if r["run"] == "searchers"]
    rows = [[r["searcher"], r["popsize"] or "-", r["evaluations"], f"{r['start']['top1']:.1f}",
             f"{r['honest']['top1']:.1f}", f"{r['honest']['agreement']:.1f}", f"{r['honest']['kl']:.3f}",
             f"{r['test_selected']['top1']:.1f}", f"{sum(r['kept'])}/{len(r['kept'])}", f"{r['search_seconds']:.0f}"]
            for r in sr]
    lines += ["Searchers at this budget (ViT-Tiny W3A8 outlier-aware, seed 0; about 3 evaluations per block and "
              "pass: the tournament 3 cycles, CMA-ES and SNES one generation of 3, PGPE one of 4 (it needs an even "
              "population), the batched tournament 3 children in one batched call). One seed: differences of a "
              "point or two are within the seed-to-seed spread above.", "",
              table(["searcher", "popsize", "evaluations", "start top-1", "honest top-1", "agreement", "KL",
                     "test-selected top-1", "passes kept", "search s"], rows), ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in sr:
            xs = [p["evaluations"] for p in r["blocks"]]
            axes[0].plot(xs, [p["kl"] for p in r["blocks"]], label=r["searcher"])
            axes[1].plot(xs, [p["top1"] for p in r["blocks"]], label=r["searcher"])
        axes[0].set_ylabel("evaluation-split KL")
        axes[1].set_ylabel("evaluation-split top-1 (%)")
        for ax in axes:
            ax.set_xlabel("fitness evaluations")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle("ViT-Tiny W3A8 outlier-aware, 10 passes x 3 cycles (every block checkpoint, before hold-out "
                     "reverts)")
        fig.tight_layout()
        fig.savefig(RES / "paper_budget.png", dpi=110)
        plt.close(fig)
        lines += ["![searchers at the paper's budget](../benchmarks/results/paper_budget.png)", "",
                  "The curves show every block checkpoint; a pass that the hold-out reverts drops back to the "
                  "pre-pass model afterwards (the honest column).", ""]
    except ImportError:  # pragma: no cover
        pass


def section_peers(lines):
    d = load("peers")
    if not d:
        return
    st = d["settings"]
    lines += ["## Peers on the same images (`benchmarks/peers.py`)", "",
              f"Brevitas and NVIDIA ModelOpt, each with the recipe its own examples recommend (in "
              f"`benchmarks/peers_*.py`), beside evolq's start points (no search) on the same tensors: the first "
              f"{st['calib']} calibration-pool images, {st['eval']} evaluation images; 2 shared CPU cores. *ops*: "
              f"what each tool quantizes (evolq also quantizes LayerNorm inputs, q/k/v and the attention "
              f"probabilities, which the peers leave in float).", ""]
    rows = []
    for r in sorted(d["rows"].values(), key=lambda r: (r["model"], -r.get("w_bits", 99), r["tool"],
                                                        r.get("config", ""))):
        if r.get("status", "ok") != "ok" or "metrics" not in r:
            continue
        m = r["metrics"]
        ops = ", ".join(f"{k} {v}" for k, v in (r.get("ops") or {}).items())
        rows.append([r["model"].split("_patch")[0], r["tool"], r.get("config", ""), f2(m["top1"]),
                     f2(m.get("agreement", 100)), f"{m.get('kl', 0):.4f}",
                     f"{r['ptq_seconds']:.0f}" if r.get("ptq_seconds") else "", ops])
    lines += [table(["model", "tool", "config", "top-1", "agreement", "KL", "PTQ s", "ops quantized"], rows), "",
              "`INT8_DEFAULT_CFG:w4` is not a ModelOpt recipe: it is INT8_DEFAULT_CFG with 4-bit weights, since "
              "ModelOpt has no integer W4A8 config (its W4A8 uses FP8 activations); ModelOpt's docs support only "
              "INT8 for CNNs. In the W4A8_AWQ_BETA_CFG row, `SequentialQuantizer 0/1` are its int4-then-fp8 weight "
              "quantizers. ModelOpt leaves timm's `Conv2dSame` convolutions unquantized (44 of EfficientNet-Lite0's "
              "49). Brevitas W3A8/W4A4, Brevitas on EfficientNet and the Evol-Q search rows were not run.", ""]


def _ms(xs, fmt="{:.1f}"):
    """mean (and +- standard deviation over seeds where there are several)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    s = _stats(xs)
    return fmt.format(s["mean"]) + (" +- " + fmt.format(s["std"]) if len(xs) > 1 else "")


def _ofq_label(start: str, runs: list, model: str) -> str:
    """An ofq row's name with the options in which its recorded recipe differs from today's
    defaults. QKR by what the run did (``qkr_used``; older runs: their ``qkr`` option) against
    what the default ``qkr="auto"`` does on ``model`` (on for timm ViT/DeiT)."""
    if not start.startswith("ofq"):
        return start
    from evolq.start_options import OFQOptions

    rep = runs[0].get("start_report", {})
    # older runs: no block term, and QKR without the q-bias term
    used = {"block_weight": 0, "qkr_bias": "drop", **rep.get("options", {})}
    used["qkr"] = bool(rep.get("qkr_used", used.get("qkr") is True))
    ref = {**vars(OFQOptions()), "qkr": model.startswith(("vit_", "deit"))}
    keys = ("epochs", "augment", "block_weight", "lr", "statsq", "cga", "init", "qkr") + (
        ("qkr_bias",) if used["qkr"] else ())
    diff = [f"{k} {used[k]:g}" if isinstance(used[k], float) else f"{k} {used[k]}"
            for k in keys if k in used and used[k] != ref[k]]
    return "ofq" + (f" ({', '.join(diff)})" if diff else "")


def _final_holdout(log):
    """The final model's hold-out score: a kept pass moves it, a reverted one does not."""
    score = log[0]["holdout_before"]
    for p in log:
        score = p["holdout_after"] if p["kept"] else score
    return score


def section_start_points(lines):
    files = sorted(RES.glob("start_points_*.json"))
    if not files:
        return
    rows, sets, curve = [], [], []
    for f in files:
        d = json.loads(f.read_text())
        st = d["settings"]
        sets.append((f.name, st))
        groups = {}
        for name, r in d["runs"].items():
            groups.setdefault(name.split("/")[0], []).append(r)
        for start, rs in groups.items():
            base, _, iters = start.partition("@")
            if iters and not iters.isdigit():  # not a brecq iteration count: part of the name
                base, iters = start, ""
            if iters or (base.startswith("brecq") and any(k.startswith(base + "@") for k in groups)):
                it = int(iters) if iters else (rs[0].get("start_report", {}).get("options", {}).get("iters") or 200)
                curve.append([st["model"].split("_patch")[0], f"W{st['w_bits']}A{st['a_bits']}", base, str(it),
                              f2(rs[0]["start"]["top1"]), f"{rs[0]['start']['kl']:.3f}",
                              f"{rs[0]['start_seconds']:.0f}"])
                if iters:
                    continue
            ev = [r for r in rs if r.get("evolq")]
            budget = {(r.get("population", st["population"]), r.get("samples", st["samples"])) for r in ev}
            other = [b for b in budget if b != (st["population"], st["samples"])]
            name, tag = start.partition(" [")[::2]  # start_points --tag " [scope block]": another search of a start
            label = (_ofq_label(name, rs, st["model"]) + (f" [{tag}" if tag else "")
                     + "".join(f" (search population {p}, sample {s})" for p, s in other))
            rows.append([st["model"].split("_patch")[0], f"W{st['w_bits']}A{st['a_bits']}",
                         st.get("preset", "fq-vit") + (f", edge {st['edge_bits']}" if st.get("edge_bits") else ""),
                         label, str(len(rs)), _ms([r["start"]["top1"] for r in rs]),
                         _ms([r["start"]["agreement"] for r in rs]), _ms([r["start"]["kl"] for r in rs], "{:.3f}"),
                         _ms([r["evolq"]["top1"] for r in ev]), _ms([r["evolq"]["kl"] for r in ev], "{:.3f}"),
                         _ms([r["evolq"]["top1"] - r["start"]["top1"] for r in ev]),
                         _ms([max(0.0, r["evolq"]["top1"] - r["start"]["top1"]) for r in ev]),
                         _ms([r["start_seconds"] for r in rs], "{:.0f}"),
                         _ms([r.get("search_seconds") for r in ev], "{:.0f}")])
    st = sets[0][1]
    lines += ["## Start points: rtn / gptq / brecq / ofq, with and without Evol-Q (`benchmarks/start_points.py`)", "",
              f"2 CPU cores. The hold-out ({st.get('holdout', 0.1):.0%}) is split off the {st['calib']} calibration "
              f"images first (by the seed); the start is calibrated (and GPTQ's Hessians collected) on the rest. "
              f"{st['eval']} evaluation images. Evol-Q on top: {st['passes']} pass x {st['cycles']} cycles over the "
              f"last {st['last']} blocks, population {st['population']}, sample {st['samples']}: a short search, "
              f"far below the paper's budget. Mean +- standard deviation over the seeds (column *seeds*); a seed "
              f"changes the hold-out split, hence the calibration images, and the search draws. *gain* = Evol-Q "
              f"top-1 - start top-1 per seed. Times in seconds on 2 cores of the machine in each run's `cpu` "
              f"field (model, int8 flags, load; absent in runs made before it existed): rows of several "
              f"sessions and machines sit together. The regime's strength follows "
              f"`QuantConfig.outlier_strength` (0.625 at W4 and 0.5 at W3 under gptq, 0.25 under rtn) and "
              f"`edge_bits=8` keeps the first layer and the classifier at 8 bits (both chosen on the calibration "
              f"pool, next section). brecq runs at its CPU default (200 Adam steps per block, batch 16, lr 1e-2, "
              f"QDrop 0.5); *brecq+gptq* is brecq with `init='gptq'` (AdaRound learns the rounding of GPTQ's "
              f"compensated weights). *ofq* is the OFQ fine-tune (GPTQ init, lr 2e-5, CGA in the last epoch, StatsQ "
              f"off; chosen on calibration-pool dev KL, see *The ofq start* below), trained on the same fitness "
              f"images; its hold-out KL is in the JSON. A row names the options in which its recipe differs from "
              f"today's defaults (`OFQOptions`: 12 epochs, mixed views, block term 1, QKR with the exact q-bias "
              f"term where the model has q and k, i.e. on ViT-Tiny, not on EfficientNet): *ofq (epochs 6, augment "
              f"flip, block_weight 0, qkr False)* is the first recipe, *ofq (qkr False)* the second. A row marked "
              f"*[scope block]* searched the same start models (loaded from `--start-cache`) over every scale of "
              f"the block, activations included, instead of the attention's weight scales; *[scope activations]* "
              f"over the block's activation scales only, with relative steps (`noise='relative'`, 2%); *[loss kl]* "
              f"and *[loss mse]* with that fitness loss instead of infoNCE, and *[loss infonce]* is the untagged "
              f"search again, run to record its hold-out scores. *test-selected gain*: "
              f"the gain if the better of start and final model were picked on the evaluation split per seed (what "
              f"picking checkpoints on test data, as the authors' code does, would report at this one-pass "
              f"budget); *gain* is the honest one.", "",
              table(["model", "bits", "regime", "start", "seeds", "start top-1", "agreement", "KL",
                     "+ Evol-Q top-1", "+ Evol-Q KL", "gain", "test-selected gain", "start s", "search s"], rows), "",
              "The brecq, brecq+gptq and W4A4 rows, and seed 0 of the W4A8 *ofq* row (1104 s; a test run shared "
              "the cores), ran while another job shared the same 2 cores, so their "
              "times are longer than on an idle machine. At W4A4 the regime puts every activation the FQ-ViT way "
              "at 4 bits, LayerNorm inputs (the residual stream), q/k/v and the softmax output included, and "
              "ViT-Tiny's start collapses whatever the weights' start. The published W4A4 ViT figures (APHQ-ViT, "
              "FIMA-Q) come from regimes that quantize fewer operations. The brecq and brecq+gptq rows were "
              "made before BRECQ's activation steps took the shared `lsq_quant` form (clamp before rounding; "
              "the range's two edge bins had half the gradient) and were not re-run.", ""]
    gaps = []
    for f in sorted(RES.glob("start_gap_*.json")) + files:
        d = json.loads(f.read_text())
        st = d["settings"]
        for name, r in d["runs"].items():
            if r.get("gap"):
                key = name.partition("/")[0]
                label = f"{_ofq_label(key, [r], st['model'])}, seed {r.get('seed', 0)}"
                gaps.append([st["model"].split("_patch")[0], f"W{st['w_bits']}A{st['a_bits']}", label,
                             f2(r["start"]["top1"]), f2(r["gap"]["weights_only"]["top1"]),
                             f"{r['gap']['weights_only']['kl']:.3f}", f2(r["gap"]["activations_only"]["top1"]),
                             f"{r['gap']['activations_only']['kl']:.3f}"])
    if gaps:
        lines += ["What the remaining error is made of (`start_points.py --gap`, in `start_gap_*.json` and "
                  "`start_points_*.json`): the "
                  "same start with float activations (*weights only*) and with float weights (*activations only*).",
                  "", table(["model", "bits", "start", "both top-1", "weights only", "KL", "activations only", "KL"],
                            gaps), ""]
    losses = []
    for f in files:
        d = json.loads(f.read_text())
        st, groups = d["settings"], {}
        for name, r in d["runs"].items():
            if r.get("pass_log"):  # runs that recorded the hold-out score of each pass
                groups.setdefault(name.split("/")[0], []).append(r)
        for start, rs in groups.items():
            name, tag = start.partition(" [")[::2]
            before = [r["pass_log"][0]["holdout_before"] for r in rs]
            after = [_final_holdout(r["pass_log"]) for r in rs]
            losses.append([st["model"].split("_patch")[0], f"W{st['w_bits']}A{st['a_bits']}",
                           _ofq_label(name, rs, st["model"]) + (f" [{tag}" if tag else ""),
                           rs[0].get("loss", "infonce"), " ".join(str(r["seed"]) for r in rs),
                           _ms(before, "{:.4f}"), _ms(after, "{:.4f}"),
                           _ms([a - b for a, b in zip(after, before)], "{:.4f}"),
                           " ".join(f"{sum(p['kept'] for p in r['pass_log'])}/{len(r['pass_log'])}" for r in rs),
                           _ms([r["evolq"]["top1"] - r["start"]["top1"] for r in rs]),
                           _ms([r["evolq"]["kl"] - r["start"]["kl"] for r in rs], "{:.4f}")])
    if losses:
        lines += ["The search's fitness loss and scope on the same start models (`start_points.py --loss`, tags "
                  "*[loss kl]*, *[loss mse]*, *[loss infonce]*; `--scope activations --noise relative`, tag *[scope "
                  "activations]*, infoNCE; untagged rows are infoNCE on the attention's weight scales; the start is "
                  "loaded from `--start-cache`, so every search starts from the same model per seed). "
                  "The choice is made on the calibration pool: the "
                  "hold-out's KL to the float model before the search and after it (the hold-out is 10% of the "
                  "calibration pool, split off first; it also decides whether the pass is kept, so it is not an "
                  "unbiased dev set, but it is calibration data). The evaluation split only reports: *gain* is "
                  "the honest top-1 gain and *eval KL change* the change of the evaluation KL.", "",
                  table(["model", "bits", "start", "loss", "seeds", "hold-out KL before", "after",
                         "change", "passes kept", "gain (eval)", "eval KL change"], losses), ""]
    for name, s in sets:
        lines += [f"- `{name}`: calibration {s['calib']}, search last {s['last']} blocks, threads {s['threads']}, "
                  f"device {s['device']}"]
    lines.append("")
    if curve:
        curve.sort(key=lambda r: (r[0], r[1], r[2], int(r[3])))
        lines += ["brecq's start point against its Adam steps per block (first seed, no search; the other settings "
                  "at their CPU defaults). Both runs shared the 2 cores with other benchmarks (the 50-step run with "
                  "a brecq+gptq run whose threads oversubscribed the cores), so *start s* does not scale with the "
                  "steps here; the 100- and 400-step points were not run for lack of time.", "",
                  table(["model", "bits", "start", "steps per block", "start top-1", "KL", "start s"], curve), ""]


def section_start_choices(lines):
    files = sorted(RES.glob("start_choices_*.json"))
    if not files:
        return
    lines += ["## Start-point choices, on the calibration pool only (`benchmarks/start_choices.py`)", "",
              "The 500 calibration-pool images split into images that calibrate (and feed GPTQ) and a *dev* set "
              "that scores; the evaluation split is not read. These decide `QuantConfig.outlier_strength` under a "
              "gptq start, whether `edge_bits=8` is used in the start-point benchmarks, and the start of "
              "`evolq demo` (W3A8). `wobs=omse`: the weights' per-channel range clipped to the least squared "
              "error (OMSE) instead of min/max under GPTQ; not adopted: slightly lower KL at W3A8, much higher at "
              "W4A8. `init=gptq`: brecq starting from GPTQ's weights.", ""]
    for f in files:
        d = json.loads(f.read_text())
        s = d["settings"]
        rows = [[k, r["start"], f"{r['linear_input_strength']:g}" if r["preset"] == "outlier-aware" else "",
                 str(r["edge_bits"] or ""), f2(r["top1"]),
                 f2(r["agreement"]), f"{r['kl']:.4f}" + (" (lowest)" if k == d.get("best_kl") else ""),
                 f"{r['seconds']:.0f}"] for k, r in d["variants"].items()]
        lines += [f"{s['model']} W{s['w_bits']}A{s['a_bits']}: {s['calib']} calibrate, {s['dev']} dev images "
                  f"(FP32 dev top-1 {d['fp32_dev_top1']:.1f}).", "",
                  table(["variant", "start", "strength", "edge bits", "dev top-1", "agreement", "KL", "s"], rows),
                  ""]


def section_ofq(lines):
    dev, ev = load("ofq_dev_vit_tiny_w3a8"), load("ofq_eval_vit_tiny_w3a8")
    if not dev and not ev:
        return
    lines += ["## The ofq start: a short OFQ fine-tune (`benchmarks/ofq_start.py`)", "",
              "ViT-Tiny W3A8, outlier-aware preset, edge bits 8, seed 0, 2 CPU cores. A variant is the start and "
              "its `start_options`; the dev variants ran with the defaults of that time for the options they do "
              "not name (3 epochs, batch 16, lr 1e-4, cosine, flips, init gptq, StatsQ on, CGA off, AdamW without "
              "decay); the lowest dev KL of that round became the first recipe (lr 2e-5, StatsQ off, CGA on, "
              "then 6 epochs, flips). The second round's variants (`augment=mix`, `block_weight`, 12 epochs) "
              "ran with that recipe for the options they do not name, so *ofq+augment=mix* is 6 epochs of mixed "
              "views without the block term; its lowest dev KL (mixed views + block term, 12 epochs) became "
              "the second recipe. The third round's variants (`epochs=24`; `qkr=true+qkr_bias=exact`, QKR "
              "with the q bias's exact term) ran with the second recipe; QKR had the lowest dev KL and is on "
              "by default since (`qkr=auto`; *ofq+qkr=true* above it is OFQ's bias-dropping form with the "
              "first round's defaults). The recipe is "
              "chosen on the *dev* table only (calibration pool: the first 300 images "
              "calibrate and train, the other 200 score; the evaluation split is not read); the evaluation "
              "table then reports the chosen recipe beside rtn and gptq (the calibration pool's 10% hold-out is "
              "split off first and never calibrates nor trains; *hold-out KL* is the fine-tune's own report, before "
              "-> after). *train KL*: mean distillation loss per epoch. StatsQ here is on the layers at w_bits only, "
              "except the row marked superseded (StatsQ on the 8-bit edge layers too).", ""]
    for name, d, col in (("dev", dev, "dev"), ("evaluation", ev, "eval")):
        if not d:
            continue
        rows = []
        for k, r in d["variants"].items():
            hist = r.get("history") or []
            hk = r.get("holdout_kl") or r.get("fitness_kl")
            rows.append([k, f2(r["top1"]), f2(r["agreement"]),
                         f"{r['kl']:.4f}" + (" (lowest)" if k == d.get("best_kl") else ""),
                         " / ".join(f"{h['train_kl']:.3f}" for h in hist),
                         f"{hk['before']:.3f} -> {hk['after']:.3f}" if hk else "",
                         r.get("status", ""), f"{r['seconds']:.0f}"])
        kl_what = "hold-out KL" if col == "eval" else "fitness KL (train images)"
        lines += [f"{name}: {d['settings']['split']} (FP32 top-1 {d['fp32_top1']:.1f}).", "",
                  table(["variant", f"{col} top-1", "agreement", "KL", "train KL per epoch", kl_what, "status",
                         "start s"], rows), ""]
    for f in sorted(RES.glob("ofq_dev_*.json")):  # other models and bit widths: today's defaults + a variant
        if f.stem == "ofq_dev_vit_tiny_w3a8":
            continue
        d = json.loads(f.read_text())
        st = d["settings"]
        rows = [[k, f2(r["top1"]), f2(r["agreement"]),
                 f"{r['kl']:.4f}" + (" (lowest)" if k == d.get("best_kl") else ""),
                 " / ".join(f"{h['train_kl']:.3f}" for h in r.get("history") or []),
                 f"{r['fitness_kl']['before']:.3f} -> {r['fitness_kl']['after']:.3f}" if r.get("fitness_kl") else "",
                 r.get("status", ""), f"{r['seconds']:.0f}"] for k, r in d["variants"].items()]
        lines += [f"{st['model']} W{st['w_bits']}A{st['a_bits']}, {st['preset']} preset, edge bits "
                  f"{st['edge_bits']}, seed {st['seed']} (`{f.name}`): dev, {st['split']} (FP32 top-1 "
                  f"{d['fp32_top1']:.1f}); variants with today's defaults for the options they do not name.", "",
                  table(["variant", "dev top-1", "agreement", "KL", "train KL per epoch", "fitness KL (train images)",
                         "status", "start s"], rows), ""]


def _peer_speed(lat, key):
    r = (lat or {}).get(key)
    if not r:
        return ""
    s = r["speedup"]["int8"]
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def _evolq_speed(bench, batch, threads):
    for r in (bench or {}).get("runs", []):
        if r["batch"] == batch and r["threads"] == threads:
            s = r["speedup"]
            return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"
    return ""


def _deploy_rows(doc):
    """The deploy table's evolq rows of one ``deploy.py`` JSON file."""
    rows = []
    for name, r in ((doc or {}).get("configs") or {}).items():
        t = r["torch"]
        for key in ("pt2", "onnx", "openvino"):  # deploy.py's row keys: pt2/inductor, onnx/onnxruntime, onnx/openvino
            e = r.get(key)
            if not e:
                continue
            ck = e["check"]
            rows.append([r["arch"], f"evolq {name} ({ck.get('format', key)}, {ck['runtime']})", f2(ck["top1_runtime"]),
                         f2(t["top1"]), f2(t["agreement"]), f"{ck['agreement']:.1f} (floor {ck['floor']:.1f})",
                         f"{t['kl']:.4f}",
                         _evolq_speed(e["bench"], 32, 2), _evolq_speed(e["bench"], 1, 2),
                         f"{sum(ck['integer_kernels'].values())} / {sum(ck['float_kernels'].values())}",
                         f"{r['start_seconds']:.0f}"])
        if not any(r.get(key) for key in ("pt2", "onnx", "openvino")):
            rows.append([r["arch"], f"evolq {name} (PyTorch only)", "", f2(t["top1"]), f2(t["agreement"]), "",
                         f"{t['kl']:.4f}", "", "", "", f"{r['start_seconds']:.0f}"])
    return rows


def section_deploy(lines):
    ours = load("deploy")
    peers = {a: load(f"deploy_peers_{a}") for a in ("vit_tiny", "efficientnet_lite0")}
    if not ours and not any(peers.values()):
        return
    lines += ["## Deployed int8: evolq's deploy regime and peer tools (`benchmarks/deploy.py`, "
              "`benchmarks/deploy_peers.py`)", "",
              "500 calibration-pool images (evolq: the 450 left after its 10% hold-out), 500 evaluation images. "
              "*speedup* is the median "
              "ratio (min-max) of alternating timed pairs against the same model's FP32 in the same runtime with the "
              "same settings (pt2: both compiled by inductor with freezing); *int / float* counts the integer and "
              "float matmul/convolution kernels the runtime executes (attention matmuls included where the runtime "
              "reports them). Peers ran with their own recommended recipes (`recipe` and `doc` in their JSON); "
              "the cores were shared with other jobs during parts of these runs: the load averages are in the "
              "JSON files.", ""]
    rows = _deploy_rows(ours)
    for d in peers.values():
        if not d:
            continue
        for name, p in d["peers"].items():
            if "int8" not in p:
                rows.append([d["model"], name, "failed: " + str(p.get("error", ""))[:80]] + [""] * 8)
                continue
            k = p["kernels"]["int8"]
            rows.append([d["model"], name, f2(p["int8"]["top1"]), "", f2(p["int8"]["agreement"]), "",
                         f"{p['int8']['kl']:.4f}", _peer_speed(p.get("latency"), "b32_t2"),
                         _peer_speed(p.get("latency"), "b1_t2"),
                         f"{k.get('integer_compute_total', k.get('integer_total', ''))} / {k.get('float_total', '')}",
                         f"{p['quant_seconds']:.0f}"])
    cpu = (ours or {}).get("configs", {})
    cpu = next(iter(cpu.values()))["cpu"] if cpu else next(d for d in peers.values() if d)["cpu"]
    other = [f"{n} ({r['cpu']['model']}, int8 flags {', '.join(r['cpu']['flags'])})"
             for n, r in ((ours or {}).get("configs") or {}).items() if r.get("cpu", cpu)["model"] != cpu["model"]]
    lines += [f"CPU: {cpu['model']}, {cpu['cores']} cores, int8 flags: {', '.join(cpu['flags'])}"
              + (f"; except the evolq rows of {'; '.join(other)}" if other else "") + ".", "",
              table(["model", "tool", "top-1 (runtime)", "top-1 (PyTorch)", "agreement to FP32",
                     "runtime vs PyTorch (floor)", "KL to FP32", "speedup b32 2t", "speedup b1 2t",
                     "int / float kernels", "quantize s"], rows), "",
              "evolq rows: *agreement to FP32* and *KL* are the PyTorch model's (the model the runtime must match); "
              "*runtime vs PyTorch* is the runtime's top-1 agreement with it, beside the float floor (the PyTorch "
              "model in float32 against itself in float64). Peer rows: the runtime's own agreement and KL to FP32. "
              "The large maxima of evolq's pt2 spreads are one FP32 round each: a recompile in the first timed round "
              "(`rounds_s` in the JSON), since fixed by interleaving the warm-up; the medians are unaffected.", ""]
    for f in sorted(RES.glob("deploy_on_*.json")):  # the same configurations measured on another machine
        other_doc = json.loads(f.read_text())
        cpus = sorted({(c["cpu"]["model"], c["cpu"]["cores"], ", ".join(c["cpu"]["flags"]))
                       for c in other_doc["configs"].values()})
        loads = [f"{c['cpu']['load_1m']:.1f}" for c in other_doc["configs"].values() if c["cpu"].get("load_1m")]
        lines += [f"The same evolq configurations on another machine (`benchmarks/deploy.py --out {f.name}`): "
                  + "; ".join(f"{m}, {n} cores, int8 flags {fl}" for m, n, fl in cpus)
                  + (f"; 1-minute load {' / '.join(loads)} at the end of each configuration" if loads else "")
                  + ".", "",
                  table(["model", "tool", "top-1 (runtime)", "top-1 (PyTorch)", "agreement to FP32",
                         "runtime vs PyTorch (floor)", "KL to FP32", "speedup b32 2t", "speedup b1 2t",
                         "int / float kernels", "quantize s"], _deploy_rows(other_doc)), ""]
    sizes = [[n, r["bytes"]["fp32_onnx"] / 1e6, r["bytes"]["onnx"] / 1e6, f"{100 * r['bytes']['onnx_vs_fp32']:.0f}%",
              r["bytes"]["pt2"] / 1e6] for n, r in ((ours or {}).get("configs") or {}).items() if "bytes" in r]
    if sizes:
        lines += ["File sizes (MB; the ONNX export packs weights of 4 bits or fewer as int4, the pt2 program holds "
                  "int8 containers):", "",
                  table(["config", "FP32 ONNX", "ONNX", "ONNX / FP32", "pt2"],
                        [[s[0], f"{s[1]:.1f}", f"{s[2]:.1f}", s[3], f"{s[4]:.1f}"] for s in sizes]), ""]
    gaps = [[n, f2(r["torch"]["top1"]), f2(r["gap"]["weights_only"]["top1"]), f2(r["gap"]["activations_only"]["top1"])]
            for n, r in ((ours or {}).get("configs") or {}).items() if "gap" in r]
    if gaps:
        lines += ["What the gap is made of (PyTorch, evaluation split): the same model with only its weights "
                  "quantized (activations float), and with only its activations quantized (weights float).", "",
                  table(["config", "both", "weights only", "activations only"], gaps), ""]
    strengths = [json.loads(f.read_text()) for f in sorted(RES.glob("deploy_strengths_*.json"))]
    if strengths:
        cols = sorted({r["strength"] for d in strengths for r in d["rows"]})
        rows = []
        for d in sorted(strengths, key=lambda d: (-d["w_bits"], d.get("start", "rtn"))):
            by = {r["strength"]: r for r in d["rows"]}
            rows.append([f"W{d['w_bits']}A{d['a_bits']}", d.get("start", "rtn"),
                         d.get("deploy_weights", "symmetric"), str(d.get("edge_bits") or "")]
                        + [f"{by[c]['kl']:.4f} ({by[c]['agreement']:.1f})" if c in by else "" for c in cols])
        lines += ["SmoothQuant strength and weight grid of the deploy regime, calibration pool only (256 images "
                  "calibrate, 244 score; `benchmarks/deploy.py --strengths`): dev KL (agreement %) per strength.",
                  "", table(["bits", "start", "weight grid", "edge bits"] + [f"{c:g}" for c in cols], rows), ""]
    for f in sorted(RES.glob("deploy_search_*.json"), key=lambda f: f.name, reverse=True):  # w4a8 first
        search = json.loads(f.read_text())
        st = search["settings"]
        grid = next((a.partition("=")[2] for a in st.get("quant_arg", []) if a.startswith("deploy_weights=")),
                    "the default asymmetric")
        rows, gains = [], {}
        for k, r in search["runs"].items():
            e = r.get("evolq") or {}
            scope = r.get("scope", st["scope"])
            rows.append([k, scope, f2(r["start"]["top1"]), f"{r['start']['kl']:.4f}",
                         f2(e.get("top1", float("nan"))), f"{e.get('kl', float('nan')):.4f}", r.get("evaluations", ""),
                         f"{r['start_seconds']:.0f} + {r.get('search_seconds', 0):.0f}"])
            if e:
                gains.setdefault(k.split("/")[0], []).append(e["top1"] - r["start"]["top1"])
        mean = "; ".join(f"{g}: {_ms(v)} over {len(v)} seed{'s' if len(v) > 1 else ''}" for g, v in gains.items())
        cpus = sorted({(c["model"], ", ".join(c["flags"])) for r in search["runs"].values() if (c := r.get("cpu"))})
        where = ("; ".join(f"{m}, int8 flags {fl}" for m, fl in cpus) if cpus
                 else "not recorded (runs made before the field existed)")
        lines += [f"Evol-Q in the deploy regime (ViT-Tiny W{st['w_bits']}A{st['a_bits']}, edge bits "
                  f"{st['edge_bits']}, {grid} {st['w_bits']}-bit grid, `benchmarks/start_points.py --preset deploy "
                  f"--out {f.name}`, short budget: {st['passes']} pass x {st['cycles']} cycles over the last "
                  f"{st['last']} blocks, population {st['population']}, sample {st['samples']}, hold-out 10%; honest: "
                  f"the final model, no selection on the evaluation split; scope attn-weights: the attention's "
                  f"weight scales, block: every scale of the block, activations included; 2 cores; CPU: {where}). "
                  f"Mean top-1 gain: {mean}.", "",
                  table(["run", "scope", "start top-1", "start KL", "+ Evol-Q top-1", "+ Evol-Q KL", "evaluations",
                         "seconds (start + search)"], rows), ""]
        gaps = [f"{k}: {f2(r['start']['top1'])} with both quantized, {f2(r['gap']['weights_only']['top1'])} with "
                f"float activations (weights only), {f2(r['gap']['activations_only']['top1'])} with float weights "
                f"(activations only)" for k, r in search["runs"].items() if r.get("gap")]
        if gaps:
            lines += ["What the start's error is made of (`--gap`, evaluation split): " + "; ".join(gaps) + ".", ""]


def section_holdout(lines):
    d = load("holdout")
    if not d:
        return
    st, s = d["settings"], d["summary"]
    lines += ["## How often the hold-out decides right (`benchmarks/holdout.py`)", "",
              f"Calibration pool only: per seed {st['fit']} fitness images, a hold-out pool of {st['hold']} and an "
              f"independent judge pool of {st['judge']} images, all disjoint. ViT-Tiny "
              f"W{'/W'.join(map(str, st['bits']))}A8, seeds {', '.join(map(str, st['seeds']))}, "
              f"{st['passes']} passes x {st['cycles']} cycles with "
              f"every pass kept; before and after each pass the hold-outs and the judge score the model. *Right* = "
              f"the hold-out's keep/revert decision equals the judge's (keep if the judge's mean KL to the float "
              f"outputs did not rise). {s['decisions']} pass decisions; the judge keeps {s['judge_keeps']}, so "
              f"always keeping is right {s['always_keep']:.0%} of the time.", "",
              table(["criterion"] + [f"n={n}" for n in st["sizes"]],
                    [[c] + [f"{s[f'{c}@{n}']:.0%}" for n in st["sizes"]] for c in ("kl", "agreement", "infonce")]),
              ""]


# -- benchmarks/README.md: the scripts and the time each JSON records ------------------------
BENCH_README = ROOT / "benchmarks" / "README.md"
# JSON files written by earlier sessions' code and not re-run since
EARLIER = "an earlier session's code"
STALE = {n: EARLIER for n in ("search", "efficientnet", "efficientnet_seed1", "efficientnet_calib160_cycles4",
                              "searchers", "scaling", "landscape_vit_tiny_w4a8", "landscape_efficientnet_lite0_w4a8",
                              "accuracy", "accuracy_outlier-aware", "start_point", "preset_strength", "losses",
                              "deploy_w4a8_intel_xeon")}
SCRIPTS = [  # script, what, command, result files
    ("deploy.py", "the deploy regime: PyTorch and runtime top-1, kernels, speed vs the same runtime's FP32; "
     "SmoothQuant strength sweep on the calibration pool",
     "python benchmarks/deploy.py --configs vit-w8a8 effnet-w8a8 --onnx --threads 2 1 --batches 32 1",
     ["deploy", "deploy_strengths_vit_tiny_w8a8", "deploy_strengths_vit_tiny_w4a8",
      "deploy_strengths_vit_tiny_w4a8_gptq_symmetric", "deploy_strengths_vit_tiny_w4a8_gptq_asymmetric",
      "deploy_search_vit_tiny_w4a8", "deploy_search_vit_tiny_w4a4", "deploy_w4a8_intel_xeon",
      "deploy_on_amd_epyc_zen4"]),
    ("deploy_peers.py", "peer int8 tools (onnxruntime static/dynamic, NNCF+OpenVINO, PT2E X86Inductor, torchao) in "
     "their own venv, same images", "/work/peer-venv/bin/python benchmarks/deploy_peers.py --model "
     "vit_tiny_patch16_224 --peers ... (see its docstring)",
     ["deploy_peers_vit_tiny", "deploy_peers_efficientnet_lite0"]),
    ("paper_budget.py", "honest vs test-selected Evol-Q at the paper's budget (10 passes x 3 cycles), searchers",
     "python benchmarks/paper_budget.py --device cuda --max-batch 4096", ["paper_budget"]),
    ("holdout.py", "how often the hold-out's keep/revert decision is right, calibration pool only",
     "python benchmarks/holdout.py --device cuda --max-batch 4096 --bits 3 4 --passes 6 --last 0", ["holdout"]),
    ("demo.py", "the demo (`evolq demo`) in a fresh process: wall time and figures", "python benchmarks/demo.py",
     ["demo"]),
    ("faults.py", "the reliability test cases, reported (bad input, degenerate candidates, SIGKILL/resume, "
     "tampering, OOM)", "python benchmarks/faults.py --kills 12", ["faults"]),
    ("export.py", "ONNX QDQ export: size, onnxruntime latency, agreement with PyTorch, fused integer kernels",
     "python benchmarks/export.py --configs vit-w8a8-outlier vit-w4a8 (and effnet-w8a8 effnet-w4a8 "
     "effnet-w8a8-no-bias-correction --out /tmp/cnn.json, then --merge); --profile FILES for export_profile.json",
     ["export", "export_profile"]),
    ("speed.py", "evolq vs the authors' loop at equal evaluations, alternating pairs, profile",
     "python benchmarks/speed.py", ["speed"]),
    ("start_points.py", "start points rtn / gptq / brecq, each alone and with a short Evol-Q search, seeds",
     "python benchmarks/start_points.py --model vit_tiny_patch16_224 --w-bits 4 --a-bits 8 --preset outlier-aware "
     "--edge-bits 8 --calib 500 --starts gptq --seeds 0,1,2 --last 4 --population 6 --samples 3 --cycles 3 "
     "--threads 2 (and --starts rtn --seeds 0; W3A8 with --starts brecq, brecq+gptq --seeds 0,1,2 and --curve 50 "
     "--no-search; W4A4; EfficientNet-Lite0 W4A4 --preset fq-vit)",
     ["start_points_vit_tiny_w4a8", "start_points_vit_tiny_w3a8", "start_points_vit_tiny_w4a4",
      "start_points_efficientnet_lite0_w4a4", "start_points_vit_tiny_w2a8", "start_gap_vit_tiny_w3a8"]),
    ("start_choices.py", "start-point choices (outlier-aware strength under gptq, edge bits, weight observer, brecq "
     "init), calibration pool only",
     "python benchmarks/start_choices.py --model vit_tiny_patch16_224 --w-bits 3 --a-bits 8 --variants ...",
     ["start_choices_vit_tiny_w3a8", "start_choices_vit_tiny_w4a8", "start_choices_efficientnet_lite0_w4a4"]),
    ("ofq_start.py", "the ofq start (OFQ fine-tune) variants on the calibration pool's dev split, then the chosen "
     "recipe beside rtn and gptq on the evaluation split",
     "python benchmarks/ofq_start.py --mode dev --variants gptq,ofq+epochs=3+statsq=false,... ; then --mode eval "
     "--variants rtn,gptq,<lowest dev KL>", ["ofq_dev_vit_tiny_w3a8", "ofq_eval_vit_tiny_w3a8"]),
    ("cli_eval.py", "an `evolq eval --json` command run as a user would, its last line kept with the wall time, "
     "CPU and load", "python benchmarks/cli_eval.py --out cli_eval_ofq_vit_tiny_w3a8.json -- evolq eval --model "
     "vit_tiny_patch16_224 --w-bits 3 --a-bits 8 --preset outlier-aware --edge-bits 8 --start ofq --json",
     ["cli_eval_ofq_vit_tiny_w3a8"]),
    ("peers.py", "Brevitas and NVIDIA ModelOpt beside evolq on the same images (own venvs)",
     "python benchmarks/peers.py", ["peers"]),
    ("accuracy.py", "FP32 / start / Evol-Q for ViT-Tiny and EfficientNet-Lite0, seeds 0-2",
     "python benchmarks/accuracy.py [--preset outlier-aware --out ...]", ["accuracy", "accuracy_outlier-aware"]),
    ("start_point.py", "start point without search: bit widths, ablations, presets", "python benchmarks/start_point.py",
     ["start_point"]),
    ("search.py", "Evol-Q vs start point per bit width and seed",
     "python benchmarks/search.py --bits 3 4 --passes 2 --cycles 3 --calib 300 --eval 500", ["search"]),
    ("efficientnet.py", "EfficientNet-Lite0 W4A8 / W4A4 start point vs Evol-Q", "python benchmarks/efficientnet.py",
     ["efficientnet", "efficientnet_seed1", "efficientnet_calib160_cycles4"]),
    ("landscape.sh", "loss surfaces, ViT-Tiny block vs EfficientNet-Lite0 layer", "sh benchmarks/landscape.sh",
     ["landscape_vit_tiny_w4a8", "landscape_efficientnet_lite0_w4a8"]),
    ("searchers.py", "tournament vs CMA-ES vs SNES vs PGPE at equal budgets (last blocks)",
     "python benchmarks/searchers.py --bits 3 --budget 16 --popsize 8 --last 3 --calib 100 --eval 200",
     ["searchers"]),
    ("preset_strength.py", "outlier-aware migration strength per bit width (calibration pool only)",
     "python benchmarks/preset_strength.py", ["preset_strength"]),
    ("losses.py", "infoNCE vs MSE vs cosine vs KL", "python benchmarks/losses.py --bits 3 --passes 3 --cycles 3 "
     "--last 4 --calib 100 --eval 200", ["losses"]),
    ("scaling.py", "seconds per fitness call vs calibration size, population, block; profiler",
     "python benchmarks/scaling.py", ["scaling"]),
]


def recorded_seconds(d) -> str:
    """What a results file records about time: its own total, else the sum over its runs."""
    if d is None:
        return "no file"
    if isinstance(d.get("rows"), dict):
        rs = [r for r in d["rows"].values() if isinstance(r, dict)]
        tot = sum(r.get("wall_seconds", 0) or 0 for r in rs)
        return f"{tot:.0f} s over {len(rs)} rows" if tot else "not recorded"
    for key in ("wall_seconds", "seconds"):
        if isinstance(d.get(key), (int, float)):
            return f"{d[key]:.0f} s"
    runs = d.get("runs")
    if isinstance(runs, dict):
        runs = list(runs.values())
    if isinstance(runs, list) and runs and isinstance(runs[0], dict):
        tot = sum(r.get("seconds", r.get("calib_seconds", 0) + r.get("search_seconds", 0)) or 0 for r in runs)
        if tot:
            return f"{tot:.0f} s over {len(runs)} runs"
    for k in ("evolq", "naive"):
        if isinstance(d.get(k), dict) and "seconds" in d[k]:
            return " + ".join(f"{n} {d[n]['seconds']:.0f} s" for n in ("naive", "evolq") if n in d)
    return "not recorded"


def device_of(d) -> str:
    if not d:
        return ""
    runs = d.get("runs") if isinstance(d.get("runs"), list) else []
    devs = sorted({r.get("device") for r in runs if isinstance(r, dict) and r.get("device")})
    return ", ".join(devs) or "2-core CPU"


def bench_readme():
    rows = []
    for script, what, cmd, files in SCRIPTS:
        for f in files:
            d = load(f)
            rows.append([f"`{script}`" if f == files[0] else "", what if f == files[0] else "",
                         f"`{cmd}`" if f == files[0] else "", f"`results/{f}.json`", recorded_seconds(d),
                         device_of(d), STALE.get(f, "this code")])
    text = "\n".join([
        "# Benchmarks", "",
        "Generated by `benchmarks/make_results.py` (with `docs/results.md`); edit the script, not this file.", "",
        "Every script uses the real assets (ViT-Tiny / EfficientNet-Lite0 ImageNet weights, the bundled ImageNet "
        "sample: calibration = even labels, evaluation = odd labels), prints a table and writes JSON (and a PNG "
        "where there is a curve) to `benchmarks/results/`. Accuracy and time claims in the docs come only from "
        "these files. `python benchmarks/make_cli_docs.py` regenerates `docs/cli.md` and `docs/api.md`.", "",
        "The time column is what each JSON file itself records (its run's seconds; for multi-run files the sum "
        "over runs), on the device it names; CPU runs here shared 2 cores with other jobs, so expect less on an "
        "idle machine. *Code* says whether the file was written by this code or by an earlier session's code "
        "and not re-run since.", "",
        table(["script", "what", "command", "results", "time recorded", "device", "code"], rows), "",
        "Options common to the newer scripts: `--last N` searches only the last N blocks (0 = all), `--threads`, "
        "`--calib`, `--eval`, `--out NAME` (writes `results/NAME.json`); `--device cuda --max-batch 4096` on a "
        "GPU. Run one at a time (`nohup python benchmarks/X.py ... > /tmp/X.log 2>&1 &`): they are CPU bound.", "",
        (ROOT / "benchmarks" / "NOTES.md").read_text().rstrip(), ""])
    BENCH_README.write_text(text)
    print("wrote", BENCH_README)

def _kernels(ops):
    ints = ", ".join(f"{k} x{v}" for k, v in ops["integer_kernels"].items()) or "none"
    flt = ", ".join(f"{k} x{v}" for k, v in ops["float_compute"].items()) or "none"
    return ints, flt


def section_export(lines):
    d = load("export")
    if not d:
        return
    lines += ["## ONNX QDQ export (`export.json`)", "",
              f"`benchmarks/export.py`: start points calibrated on {d['calib_images']} calibration images, checked on "
              f"{d['eval_images']} evaluation images; onnxruntime {d['onnxruntime']} CPU, {d['threads']} thread(s), "
              f"opset {d['opset']}, latency = median of {d['latency_runs']} runs per image on a shared machine. "
              f"Agreement = top-1 agreement of onnxruntime with evolq's PyTorch model; floor = agreement of the "
              f"PyTorch model with itself with oneDNN off (the same arithmetic summed in another order).", ""]
    rows = []
    for arch, m in d["models"].items():
        fp = m["fp32_onnx"]
        rows.append([arch, "FP32", "", f"{fp['bytes'] / 1e6:.2f}", "", "", "", "",
                     f"{fp['latency_b1']['median_ms']:.1f}", f"{fp['latency_b32']['median_ms']:.1f}", "", ""])
    for c in d["configs"].values():
        for form in ("weights", "output"):
            r = c.get(f"bias_correction_{form}")
            if not r:
                continue
            k = r["check"]
            ints, flt = _kernels(r["ops"])
            rows.append([c["arch"], f"W{c['w_bits']}A{c['a_bits']} {c['preset']}"
                         + (" no bias corr." if c.get("quant", {}).get("bias_correction") is False else ""),
                         form, f"{r['bytes'] / 1e6:.2f} ({r['size_vs_fp32'] * 100:.0f}%)", f2(k["agreement"]),
                         f2(c["pytorch_floor"]["agreement"]), f"{k['max_abs_diff']:.3g} / {k['mean_abs_diff']:.3g}",
                         f"{f2(k['top1_torch'])} / {f2(k['top1_onnx'])}", f"{r['latency_b1']['median_ms']:.1f}",
                         f"{r['latency_b32']['median_ms']:.1f}", ints, flt])
    lines += [table(["model", "config", "bias corr. form", "MB (vs FP32)", "agreement %", "floor %",
                     "logit diff max / mean", "top-1 PyTorch / ORT", "ms/img b1", "ms/img b32",
                     "integer kernels", "float compute"], rows), ""]
    p = load("export_profile")
    if p:
        q = p["qdq_pair_ms"]
        lines += [f"Where the time goes (`export_profile.json`, `benchmarks/export.py --profile`: onnxruntime's "
                  f"profiler, batch 1, {p['threads']} thread(s), mean of {p['runs'] + 1} runs; same loaded machine). "
                  f"One QuantizeLinear+DequantizeLinear pair on a (32, 197, 192) tensor: {q['per_tensor']:.1f} ms "
                  f"per tensor, {q['per_axis_last']:.1f} ms per channel on the last axis.", ""]
        rows = [[f, f"{r['total_ms']:.1f}", ", ".join(f"{k} {v:.1f}" for k, v in list(r["ms_per_op_type"].items())[:5])]
                for f, r in p["files"].items()]
        lines += [table(["file", "ms per image (b1)", "largest op types (ms)"], rows), ""]


def main():
    lines = ["# Results", "",
             "Generated by `benchmarks/make_results.py` from `benchmarks/results/*.json`; do not edit by hand.",
             "All numbers: ImageNet sample bundled with the assets (calibration = even labels, evaluation = odd "
             "labels, disjoint), on 2 CPU cores with small settings unless a section names a GPU. Accuracy on a few "
             "hundred images moves in steps of "
             "100/N points: treat differences of a point or two as noise. Which JSON files were produced with "
             "earlier code and not re-run (search, efficientnet*, searchers, scaling, landscapes) is "
             "listed in `benchmarks/README.md`.", ""]
    for sec in (section_deploy, section_paper_budget, section_holdout, section_start_points, section_start_choices,
                section_ofq,
                section_peers,
                section_export,
                section_accuracy,
                section_start_point, section_preset_strength, section_search, section_speed,
                section_efficientnet, section_searchers, section_losses, section_scaling,
                section_landscape):
        sec(lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("wrote", OUT)
    bench_readme()


if __name__ == "__main__":
    main()
