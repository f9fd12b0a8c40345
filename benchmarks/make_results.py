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
              f"`benchmarks/speed.py`: {d['model']} W{d['w_bits']}A8, {d['calib_images']} calibration images, "
              f"{d['passes']} pass x {d['cycles']} cycles, tournament, {d['threads']} torch threads, {d['device']}. "
              f"Same final scales: {d['same_final_scales']}.", ""]
    rows = [[k, f"{d[k]['seconds']:.1f}", d[k]["evaluations"], f"{d[k]['seconds_per_pass']:.1f}"]
            for k in ("naive", "evolq")]
    lines += [table(["loop", "seconds", "fitness evaluations", "seconds per pass"], rows), "",
              f"Ratio naive / evolq: {d['ratio']:.2f}x.", ""]


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
    for name, c in d["configs"].items():
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
             "labels, disjoint), CPU, small settings. Accuracy on a few hundred images moves in steps of "
             "100/N points: treat differences of a point or two as noise. Which JSON files were produced with "
             "earlier code and not re-run (search, speed, efficientnet*, searchers, scaling, landscapes) is "
             "listed in `benchmarks/README.md`.", ""]
    for sec in (section_accuracy, section_start_point, section_preset_strength, section_search, section_speed,
                section_efficientnet, section_export, section_searchers, section_losses, section_scaling,
                section_landscape):
        sec(lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
