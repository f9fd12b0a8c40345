"""Start points: rtn / gptq / brecq / ofq, each alone and with a short Evol-Q search on top, on a
real model; top-1, agreement and KL against the float model on the evaluation split, and wall
time. The hold-out is split off the calibration images first (``evolq.data.split_calibration`` with
the run's seed, as ``quantize_model`` does) and the start is calibrated and reconstructed on the
fitness part only; ``--seeds`` repeats a start with other seeds. ``--curve``: brecq's start for
several iteration counts; ``--gap``: the start with float activations and with float weights;
``--start-cache``: start models saved and reloaded, so other searches of the same start (``--tag``)
start from the same model. Resumable: finished runs are skipped."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from evolq.api import prepare_model, quantize_model
from evolq.config import EvolQConfig, QuantConfig, SearchConfig, field_default
from evolq.data import split_calibration
from evolq.evaluate import evaluate_qmodel, metrics, predict
from evolq.io import load_quantized, save_quantized, write_json

from ..common import gap, key_values, search_last_blocks, short
from ..report import Col, Section, Table, f2, mean_sd
from ..runner import RESULTS, Suite, cpu_info, register
from .ofq_start import parse_variant


def _cache_dir(args, quant, seed) -> Path | None:
    """The start cache's folder for one start (None: no cache): named by the model, the
    calibration split (images, hold-out, seed) and a hash of the whole QuantConfig (start and
    start options included), so any setting the start depends on gives another folder. The
    search settings are not part of it. Entries are not invalidated when evolq's code changes."""
    if not args.start_cache:
        return None
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(quant), sort_keys=True, default=str).encode()).hexdigest()
    return Path(args.start_cache) / (f"{args.model}_w{args.w_bits}a{args.a_bits}_{quant.start}_calib{args.calib}_"
                                     f"hold{args.holdout}_seed{seed}_{digest[:16]}")


def start_opts(a, start, iters, seed):
    """The ``start_options`` of a start name: ``ofq+key=value+...`` sets ofq's options, ``brecq+gptq``
    is brecq from GPTQ's weights, brecq takes ``--brecq-*`` and ``--qdrop``."""
    if start == "gptq":
        return {"device": a.device}
    if start.startswith("ofq"):  # the OFQOptions defaults, or "ofq+key=value+..." (a recipe variant)
        return {"device": a.device, "seed": seed, **parse_variant(start)[1]}
    if start.startswith("brecq"):
        o = {"device": a.device, "qdrop": a.qdrop, "seed": seed}
        if start == "brecq+gptq":
            o["init"] = "gptq"
        for k, v in (("iters", iters or a.brecq_iters), ("batch_size", a.brecq_batch), ("lr", a.brecq_lr)):
            if v is not None:
                o[k] = v
        return o
    return {}


def start_model(run, key, quant, seed, fit_x, hold_x):
    """The start (``prepare_model`` on the fitness part, the hold-out scored by ofq), or the one in the
    start cache; ``(qmodel, seconds, loaded)``."""
    a = run.args
    model = copy.deepcopy(run.model())
    cached = _cache_dir(a, quant, seed)
    if cached is not None and (cached / "run.json").is_file():
        qm = load_quantized(cached, model)
        meta = json.loads((cached / "run.json").read_text())
        qm.start_report = meta["start_report"]
        print(f"{key}: start loaded from {cached} (computed in {meta['start_seconds']:.0f} s)", flush=True)
        return qm, meta["start_seconds"], True
    t0 = time.perf_counter()
    qm = prepare_model(model, fit_x, quant, arch=a.model, progress=False, holdout=hold_x)
    secs = time.perf_counter() - t0
    if cached is not None:
        save_quantized(qm, cached)
        write_json(cached / "run.json", {"start_seconds": secs, "start_report": qm.start_report})
    return qm, secs, False


def search(run, qm, quant, seed, xc, xe, ye, fp) -> dict:
    a = run.args
    s = SearchConfig(passes=a.passes, cycles=a.cycles, scope=a.scope, unit=a.unit, loss=a.loss, noise=a.noise,
                     eps=a.eps, infonce_batch=a.infonce_batch, seed=seed, holdout=a.holdout, device=a.device,
                     progress=False, max_batch=32 if a.device == "cpu" else 512, population=a.population,
                     samples=min(a.samples, a.population))
    t1 = time.perf_counter()
    blocks = search_last_blocks(qm, a.last, a.scope)
    qm, rep = quantize_model(qm, xc, EvolQConfig(quant, s))
    m1, _ = evaluate_qmodel(qm, xe, ye, fp_logits=fp, batch_size=50)
    return {"searched_blocks": blocks, "evolq": short(m1["quantized"]),
            "search_seconds": round(time.perf_counter() - t1, 1), "evaluations": rep["evaluations"],
            "pass_log": rep["passes"]}  # hold-out score before / after each pass: calibration-pool data


def run(run):
    a = run.args
    res = run.doc
    res.setdefault("settings", {})
    res.setdefault("runs", {})
    res["settings"].update({k: v for k, v in vars(a).items() if k not in ("out", "smoke", "plan")})
    d = run.data()
    dev = a.device
    xe, ye = d.xe.to(dev), d.ye.to(dev)
    fp = None
    extra_quant = key_values(a.quant_arg)
    starts = [s for s in a.starts.split(",") if s]
    jobs = [(start, None, not a.no_search, seed) for seed in a.seeds for start in starts]
    curve_start = next((s for s in starts if s.startswith("brecq")), "brecq")
    jobs += [(curve_start, it, False, a.seeds[0]) for it in (int(v) for v in a.curve.split(",") if v)]
    for start, iters, do_search, seed in jobs:
        key = (start if iters is None else f"{start}@{iters}") + a.tag + (f"/seed{seed}" if seed else "")
        if key in res["runs"] and (not do_search or "evolq" in res["runs"][key]):
            print(f"{key}: done, skipped")
            continue
        quant = QuantConfig.preset(a.preset, w_bits=a.w_bits, a_bits=a.a_bits, start=start.split("+")[0],
                                   start_options=start_opts(a, start, iters, seed), edge_bits=a.edge_bits,
                                   **extra_quant)
        fit_x, hold_x = split_calibration(d.xc, a.holdout, seed)
        t0 = time.perf_counter()
        qm, t_start, loaded = start_model(run, key, quant, seed, fit_x, hold_x)
        qm.model.to(dev)
        if fp is None:
            qm.set_quant_enabled(False)
            fp = predict(qm.model, xe, 50)
            qm.set_quant_enabled(True)
            res["fp32"] = short(metrics(fp.cpu(), d.ye))
        m0, _ = evaluate_qmodel(qm, xe, ye, fp_logits=fp, batch_size=50)
        r = {"seed": seed, "start": short(m0["quantized"]), "start_seconds": round(t_start, 1), "cpu": cpu_info(),
             "start_loaded": loaded, "scope": a.scope, "loss": a.loss, "noise": a.noise, "eps": a.eps, "last": a.last,
             "passes": a.passes, "cycles": a.cycles, "population": a.population,
             "samples": min(a.samples, a.population), "calib_images": int(fit_x.shape[0]),
             "linear_input_strength": quant.linear_input_strength,
             "start_report": {k: v for k, v in (qm.start_report or {}).items() if k != "blocks"}}
        if qm.start_report:
            keep = ("block", "status", "error_start", "error_end", "seconds")
            r["start_blocks"] = [{k: v for k, v in b.items() if k in keep}
                                 for b in qm.start_report.get("blocks", [])]  # ofq reports epochs, not blocks
        print(f"{key}: start {r['start']} ({t_start:.0f} s)", flush=True)
        if a.gap:
            r["gap"] = gap(qm, xe, ye, fp)
        if do_search:
            r.update(search(run, qm, quant, seed, d.xc, xe, ye, fp))
            print(f"{key}: evol-q {r['evolq']} ({r['search_seconds']:.0f} s)", flush=True)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        res["runs"][key] = r
        res["device"] = str(torch.cuda.get_device_name(0)) if dev.startswith("cuda") else "cpu"
        run.save()


# -- report ---------------------------------------------------------------------------------
def ofq_label(start: str, runs: list, model: str) -> str:
    """An ofq row's name with the options in which its recorded recipe differs from today's
    defaults. QKR by what the run did (``qkr_used``; older runs: their ``qkr`` option) against
    what the default ``qkr="auto"`` does on ``model`` (on for timm ViT/DeiT)."""
    if not start.startswith("ofq"):
        return start
    from evolq.start_options import OFQOptions

    rep = runs[0].get("start_report", {})
    used = {"block_weight": 0, "qkr_bias": "drop", **rep.get("options", {})}  # older runs: no block term, no q-bias
    used["qkr"] = bool(rep.get("qkr_used", used.get("qkr") is True))
    ref = {**vars(OFQOptions()), "qkr": model.startswith(("vit_", "deit"))}
    keys = ("epochs", "augment", "block_weight", "lr", "statsq", "cga", "init", "qkr") + (
        ("qkr_bias",) if used["qkr"] else ())
    diff = [f"{k} {used[k]:g}" if isinstance(used[k], float) else f"{k} {used[k]}"
            for k in keys if k in used and used[k] != ref[k]]
    return "ofq" + (f" ({', '.join(diff)})" if diff else "")


def final_holdout(log):
    """The final model's hold-out score: a kept pass moves it, a reverted one does not."""
    score = log[0]["holdout_before"]
    for p in log:
        score = p["holdout_after"] if p["kept"] else score
    return score


def where(st) -> dict:
    return {"model": st["model"].split("_patch")[0], "bits": f"W{st['w_bits']}A{st['a_bits']}"}


def groups(d, keep=lambda r: True):
    out = {}
    for name, r in d["runs"].items():
        if keep(r):
            out.setdefault(name.split("/")[0], []).append(r)
    return out


def is_curve(start, gs):
    base, _, iters = start.partition("@")
    if iters and not iters.isdigit():  # not a brecq iteration count: part of the name
        base, iters = start, ""
    return base, iters, bool(iters) or (base.startswith("brecq") and any(k.startswith(base + "@") for k in gs))


def start_rows(docs):
    rows = []
    for d in docs.values():
        st, gs = d["settings"], groups(d)
        for start, rs in gs.items():
            if is_curve(start, gs)[1]:
                continue
            ev = [r for r in rs if r.get("evolq")]
            other = [b for b in {(r.get("population", st["population"]), r.get("samples", st["samples"])) for r in ev}
                     if b != (st["population"], st["samples"])]
            name, tag = start.partition(" [")[::2]  # --tag " [scope block]": another search of a start
            gain = [r["evolq"]["top1"] - r["start"]["top1"] for r in ev]
            rows.append({**where(st), "regime": st.get("preset", "fq-vit") + (
                f", edge {st['edge_bits']}" if st.get("edge_bits") else ""),
                "label": ofq_label(name, rs, st["model"]) + (f" [{tag}" if tag else "") + "".join(
                    f" (search population {p}, sample {s})" for p, s in other), "seeds": str(len(rs)),
                "start": [r["start"] for r in rs], "evolq": [r["evolq"] for r in ev], "gain": gain,
                "selected": [max(0.0, g) for g in gain], "start_s": [r["start_seconds"] for r in rs],
                "search_s": [r.get("search_seconds") for r in ev]})
    return rows


def curve_rows(docs):
    rows = []
    for d in docs.values():
        st, gs = d["settings"], groups(d)
        for start, rs in gs.items():
            base, iters, curve = is_curve(start, gs)
            if curve:
                it = int(iters) if iters else (rs[0].get("start_report", {}).get("options", {}).get("iters") or 200)
                rows.append({**where(st), "start": base, "iters": it, "r": rs[0]})
    return sorted(rows, key=lambda r: (r["model"], r["bits"], r["start"], r["iters"]))


def gap_rows(docs):
    from ..report import load

    out = []
    for d in [load(s) for s in sorted(p.stem for p in RESULTS.glob("start_gap_*.json"))] + list(docs.values()):
        st = d["settings"]
        out += [{**where(st), **r, "label": f"{ofq_label(n.partition('/')[0], [r], st['model'])}, seed "
                                           f"{r.get('seed', 0)}"} for n, r in d["runs"].items() if r.get("gap")]
    return out


def loss_rows(docs):
    rows = []
    for d in docs.values():
        st = d["settings"]
        for start, rs in groups(d, lambda r: r.get("pass_log")).items():
            name, tag = start.partition(" [")[::2]
            before = [r["pass_log"][0]["holdout_before"] for r in rs]
            after = [final_holdout(r["pass_log"]) for r in rs]
            rows.append({**where(st), "label": ofq_label(name, rs, st["model"]) + (f" [{tag}" if tag else ""),
                         "loss": rs[0].get("loss", "infonce"), "seeds": " ".join(str(r["seed"]) for r in rs),
                         "before": before, "after": after, "change": [x - y for x, y in zip(after, before)],
                         "kept": " ".join(f"{sum(p['kept'] for p in r['pass_log'])}/{len(r['pass_log'])}" for r in rs),
                         "gain": [r["evolq"]["top1"] - r["start"]["top1"] for r in rs],
                         "kl_change": [r["evolq"]["kl"] - r["start"]["kl"] for r in rs]})
    return rows


def sd(head, key, sub=None, fmt="{:.1f}"):
    """A column of mean +- sd over a row's list ``key`` (of records: their ``sub``)."""
    return Col(head, key, lambda v: mean_sd([x[sub] for x in v] if sub else v, fmt))


MODEL_BITS = [Col("model", "model"), Col("bits", "bits")]
INTRO = (
    "2 CPU cores. The hold-out ({holdout:.0%}) is split off the {calib} calibration images first (by the seed); the "
    "start is calibrated (and GPTQ's Hessians collected) on the rest. {eval} evaluation images. Evol-Q on top: "
    "{passes} pass x {cycles} cycles over the last {last} blocks, population {population}, sample {samples}: a short "
    "search, far below the paper's budget. Mean +- standard deviation over the seeds (column *seeds*); a seed changes "
    "the hold-out split, hence the calibration images, and the search draws. *gain* = Evol-Q top-1 - start top-1 per "
    "seed. Times in seconds on 2 cores of the machine in each run's `cpu` field (model, int8 flags, load; absent in "
    "runs made before it existed): rows of several sessions and machines sit together. The regime's strength follows "
    "`QuantConfig.outlier_strength` (0.625 at W4 and 0.5 at W3 under gptq, 0.25 under rtn) and `edge_bits=8` keeps "
    "the first layer and the classifier at 8 bits (both chosen on the calibration pool, next section). brecq runs at "
    "its CPU default (200 Adam steps per block, batch 16, lr 1e-2, QDrop 0.5); *brecq+gptq* is brecq with "
    "`init='gptq'` (AdaRound learns the rounding of GPTQ's compensated weights). *ofq* is the OFQ fine-tune (GPTQ "
    "init, lr 2e-5, CGA in the last epoch, StatsQ off; chosen on calibration-pool dev KL, see *The ofq start* below), "
    "trained on the same fitness images; its hold-out KL is in the JSON. A row names the options in which its recipe "
    "differs from today's defaults (`OFQOptions`: 12 epochs, mixed views, block term 1, QKR with the exact q-bias "
    "term where the model has q and k, i.e. on ViT-Tiny, not on EfficientNet): *ofq (epochs 6, augment flip, "
    "block_weight 0, qkr False)* is the first recipe, *ofq (qkr False)* the second. A row marked *[scope block]* "
    "searched the same start models (loaded from `--start-cache`) over every scale of the block, activations "
    "included, instead of the attention's weight scales; *[scope activations]* over the block's activation scales "
    "only, with relative steps (`noise='relative'`, 2%); *[loss kl]* and *[loss mse]* with that fitness loss instead "
    "of infoNCE, and *[loss infonce]* is the untagged search again, run to record its hold-out scores. "
    "*test-selected gain*: the gain if the better of start and final model were picked on the evaluation split per "
    "seed (what picking checkpoints on test data, as the authors' code does, would report at this one-pass budget); "
    "*gain* is the honest one.")
AFTER = (
    "The brecq, brecq+gptq and W4A4 rows, and seed 0 of the W4A8 *ofq* row (1104 s; a test run shared the cores), "
    "ran while another job shared the same 2 cores, so their times are longer than on an idle machine. At W4A4 the "
    "regime puts every activation the FQ-ViT way at 4 bits, LayerNorm inputs (the residual stream), q/k/v and the "
    "softmax output included, and ViT-Tiny's start collapses whatever the weights' start. The published W4A4 ViT "
    "figures (APHQ-ViT, FIMA-Q) come from regimes that quantize fewer operations. The brecq and brecq+gptq rows were "
    "made before BRECQ's activation steps took the shared `lsq_quant` form (clamp before rounding; the range's two "
    "edge bins had half the gradient) and were not re-run.")
LOSSES = (
    "The search's fitness loss and scope on the same start models (`start_points --loss`, tags *[loss kl]*, *[loss "
    "mse]*, *[loss infonce]*; `--scope activations --noise relative`, tag *[scope activations]*, infoNCE; untagged "
    "rows are infoNCE on the attention's weight scales; the start is loaded from `--start-cache`, so every search "
    "starts from the same model per seed). The choice is made on the calibration pool: the hold-out's KL to the float "
    "model before the search and after it (the hold-out is 10% of the calibration pool, split off first; it also "
    "decides whether the pass is kept, so it is not an unbiased dev set, but it is calibration data). The evaluation "
    "split only reports: *gain* is the honest top-1 gain and *eval KL change* the change of the evaluation KL.")
CURVE = (
    "brecq's start point against its Adam steps per block (first seed, no search; the other settings at their CPU "
    "defaults). Both runs shared the 2 cores with other benchmarks (the 50-step run with a brecq+gptq run whose "
    "threads oversubscribed the cores), so *start s* does not scale with the steps here; the 100- and 400-step points "
    "were not run for lack of time.")
def deploy_search_text(d) -> str:
    st, gains = d["settings"], {}
    for k, r in d["runs"].items():
        if r.get("evolq"):
            gains.setdefault(k.split("/")[0], []).append(r["evolq"]["top1"] - r["start"]["top1"])
    grid = next((a.partition("=")[2] for a in st.get("quant_arg", []) if a.startswith("deploy_weights=")),
                "the default asymmetric")
    cpus = sorted({(c["model"], ", ".join(c["flags"])) for r in d["runs"].values() if (c := r.get("cpu"))})
    where = "; ".join(f"{m}, int8 flags {fl}" for m, fl in cpus) if cpus else \
        "not recorded (runs made before the field existed)"
    mean = "; ".join(f"{g}: {mean_sd(v)} over {len(v)} seed{'s' if len(v) > 1 else ''}" for g, v in gains.items())
    return (f"Evol-Q in the deploy regime (ViT-Tiny W{st['w_bits']}A{st['a_bits']}, edge bits {st['edge_bits']}, "
            f"{grid} {st['w_bits']}-bit grid, `python -m benchmarks start_points --preset deploy --out "
            f"{d['file']}.json`, "
            f"short budget: {st['passes']} pass x {st['cycles']} cycles over the last {st['last']} blocks, population "
            f"{st['population']}, sample {st['samples']}, hold-out 10%; honest: the final model, no selection on the "
            f"evaluation split; scope attn-weights: the attention's weight scales, block: every scale of the block, "
            f"activations included; 2 cores; CPU: {where}). Mean top-1 gain: {mean}.")


VIT = "--model vit_tiny_patch16_224 --preset outlier-aware --edge-bits 8 --calib 500 --last 4 --threads 2"
EFF = "--model tf_efficientnet_lite0 --preset fq-vit --edge-bits 8 --calib 500 --last 4 --threads 2"
SMALL, CACHE = "--population 6 --samples 3", "--start-cache /tmp/startcache"
QKR3 = f"--starts ofq+qkr=auto --seeds 0,1,2 {CACHE}"
DEPLOY = f"--preset deploy --edge-bits 8 --calib 500 --last 4 --threads 2 {SMALL} --w-bits 4"
W3 = f"{VIT} --w-bits 3 --a-bits 8"
W4A4 = (f"{DEPLOY} --a-bits 4 --quant-arg deploy_weights=symmetric {CACHE} --seeds 0,1,2 "
        f"--out deploy_search_vit_tiny_w4a4")

register(Suite(
    name="start_points", doc=__doc__, run=run, order=40, resume=True, out="start_points_{short}_w{w_bits}a{a_bits}",
    what="start points rtn / gptq / brecq / ofq, each alone and with a short Evol-Q search, seeds",
    common={"model": "vit_tiny_patch16_224", "calib": 128, "eval": 500, "seeds": [0], "threads": 1, "device": "cpu"},
    args=[(("--w-bits",), {"type": int, "default": 4}), (("--a-bits",), {"type": int, "default": 8}),
          (("--preset",), {"default": "fq-vit"}),
          (("--edge-bits",), {"type": int, "default": None, "help": "QuantConfig.edge_bits (first layer, classifier)"}),
          (("--holdout",), {"type": float, "default": 0.1, "help": "SearchConfig.holdout (split off first)"}),
          (("--starts",), {"default": "rtn,gptq,brecq", "help": "comma-separated: rtn, gptq, brecq, brecq+gptq, ofq, "
                                                                "ofq+KEY=VALUE+... (ofq with these start_options)"}),
          (("--brecq-iters",), {"type": int, "default": None}), (("--brecq-batch",), {"type": int, "default": None}),
          (("--brecq-lr",), {"type": float, "default": None}), (("--qdrop",), {"type": float, "default": 0.5}),
          (("--curve",), {"default": "", "help": "brecq iteration counts for an accuracy-vs-iterations curve"}),
          (("--no-search",), {"action": "store_true", "help": "start points only"}),
          (("--gap",), {"action": "store_true", "help": "also the start with float activations and float weights"}),
          (("--passes",), {"type": int, "default": 1}), (("--cycles",), {"type": int, "default": 3}),
          (("--population",), {"type": int, "default": 15, "help": "tournament population K (paper 15)"}),
          (("--samples",), {"type": int, "default": 10, "help": "tournament sample size S (paper 10)"}),
          (("--last",), {"type": int, "default": 0, "help": "search only the last N searchable blocks (0: all)"}),
          (("--scope",), {"default": "attn-weights"}), (("--unit",), {"default": "block"}),
          (("--noise",), {"default": field_default(SearchConfig, "noise"), "help": "SearchConfig.noise"}),
          (("--eps",), {"type": float, "default": None, "help": "SearchConfig.eps (default: the noise's own)"}),
          (("--loss",), {"default": field_default(SearchConfig, "loss"), "help": "the search's fitness loss"}),
          (("--infonce-batch",), {"type": int, "default": 50}),
          (("--quant-arg",), {"action": "append", "default": [], "metavar": "KEY=VALUE",
                              "help": "another QuantConfig field (value read as JSON where it parses); repeatable"}),
          (("--start-cache",), {"default": "", "help": "folder: start models saved there and loaded instead of "
                                                       "recomputed by a later run asking for the same start"}),
          (("--tag",), {"default": "", "help": "suffix of the run's key, for the same start searched another way "
                                               "(e.g. ' [scope block]')"})],
    results={
        "start_points_vit_tiny_w4a8": [f"{VIT} --w-bits 4 --a-bits 8 {SMALL} --starts gptq,ofq --seeds 0,1,2",
                                       f"{VIT} --w-bits 4 --a-bits 8 {SMALL} --starts rtn,"
                                       f"ofq+augment=mix+block_weight=1+epochs=12",
                                       f"{VIT} --w-bits 4 --a-bits 8 {SMALL} {QKR3} --gap"],
        "start_points_vit_tiny_w3a8": [f"{W3} {SMALL} --starts gptq,brecq+gptq --seeds 0,1,2",
                                       f"{W3} {SMALL} --starts rtn,brecq --curve 50",
                                       f"{W3} --starts ofq,ofq+augment=mix+block_weight=1+epochs=12 --seeds 0,1,2",
                                       f"{W3} {QKR3} --gap", f"{W3} {QKR3} --scope block --tag ' [scope block]'",
                                       *[f"{W3} {QKR3} --loss {x} --tag ' [loss {x}]'" for x in ("kl", "mse",
                                                                                                 "infonce")],
                                       f"{W3} {QKR3} --scope activations --noise relative "
                                       f"--tag ' [scope activations]'"],
        "start_points_vit_tiny_w4a4": f"{VIT} --w-bits 4 --a-bits 4 {SMALL} --starts gptq,rtn",
        "start_points_vit_tiny_w2a8": [f"{VIT} --w-bits 2 --a-bits 8 {SMALL} --starts gptq,ofq",
                                       f"{VIT} --w-bits 2 --a-bits 8 {QKR3} --gap"],
        "start_points_efficientnet_lite0_w4a4": [f"{EFF} --w-bits 4 --a-bits 4 {SMALL} --starts gptq,rtn,ofq",
                                                 f"{EFF} --w-bits 4 --a-bits 4 {QKR3} --gap"],
        "start_points_efficientnet_lite0_w3a8": f"{EFF} --w-bits 3 --a-bits 8 --starts gptq,rtn,ofq+qkr=auto --gap "
                                                f"{CACHE}",
        "start_gap_vit_tiny_w3a8": f"{W3} --starts ofq --no-search --gap --out start_gap_vit_tiny_w3a8",
        "deploy_search_vit_tiny_w4a8": f"{DEPLOY} --a-bits 8 --starts gptq --seeds 0,1,2 --out "
                                       f"deploy_search_vit_tiny_w4a8",
        "deploy_search_vit_tiny_w4a8_zen4": f"{DEPLOY} --a-bits 8 --starts gptq --seeds 0,1,2 --gap --out "
                                            f"deploy_search_vit_tiny_w4a8_zen4",
        "deploy_search_vit_tiny_w4a4": [f"{W4A4} --starts gptq", f"{W4A4} --starts gptq --scope block --tag @block",
                                        f"{W4A4} --starts ofq --gap"]},
    smoke={"starts": "gptq", "calib": 24, "eval": 8, "last": 1, "cycles": 1, "population": 2, "samples": 2,
           "infonce_batch": 8, "gap": True},
    report=[Section("deploy_search_*", order=12, reverse=True, blocks=[deploy_search_text, Table([
        Col("run", "key"), Col("scope", "scope"), Col("start top-1", "start.top1", f2),
        Col("start KL", "start.kl", "{:.4f}"),
        Col("+ Evol-Q top-1", lambda r: (r.get("evolq") or {}).get("top1", float("nan")), f2),
        Col("+ Evol-Q KL", lambda r: (r.get("evolq") or {}).get("kl", float("nan")), "{:.4f}"),
        Col("evaluations", lambda r: r.get("evaluations", "")),
        Col("seconds (start + search)", lambda r: f"{r['start_seconds']:.0f} + {r.get('search_seconds', 0):.0f}")],
        lambda d: [{**r, "key": k, "scope": r.get("scope", d["settings"]["scope"])} for k, r in d["runs"].items()]),
        lambda d: "What the start's error is made of (`--gap`, evaluation split): " + "; ".join(
            f"{k}: {f2(r['start']['top1'])} with both quantized, {f2(r['gap']['weights_only']['top1'])} with float "
            f"activations (weights only), {f2(r['gap']['activations_only']['top1'])} with float weights (activations "
            f"only)" for k, r in d["runs"].items() if r.get("gap")) + "." if any(
            r.get("gap") for r in d["runs"].values()) else None]),
        Section("start_points_*", each=False, blocks=[
        "## Start points: rtn / gptq / brecq / ofq, with and without Evol-Q (`benchmarks/suites/start_points.py`)",
        lambda docs: INTRO.format(**{"holdout": 0.1, **next(iter(docs.values()))["settings"]}),
        Table(MODEL_BITS + [Col("regime", "regime"), Col("start", "label"), Col("seeds", "seeds"),
                            sd("start top-1", "start", "top1"), sd("agreement", "start", "agreement"),
                            sd("KL", "start", "kl", "{:.3f}"), sd("+ Evol-Q top-1", "evolq", "top1"),
                            sd("+ Evol-Q KL", "evolq", "kl", "{:.3f}"), sd("gain", "gain"),
                            sd("test-selected gain", "selected"), sd("start s", "start_s", fmt="{:.0f}"),
                            sd("search s", "search_s", fmt="{:.0f}")], start_rows),
        AFTER,
        lambda docs: "What the remaining error is made of (`start_points --gap`, in `start_gap_*.json` and "
                     "`start_points_*.json`): the same start with float activations (*weights only*) and with float "
                     "weights (*activations only*)." if gap_rows(docs) else None,
        Table(MODEL_BITS + [Col("start", "label"), Col("both top-1", "start.top1", f2),
                            Col("weights only", "gap.weights_only.top1", f2),
                            Col("KL", "gap.weights_only.kl", "{:.3f}"),
                            Col("activations only", "gap.activations_only.top1", f2),
                            Col("KL", "gap.activations_only.kl", "{:.3f}")], gap_rows),
        lambda docs: LOSSES if loss_rows(docs) else None,
        Table(MODEL_BITS + [Col("start", "label"), Col("loss", "loss"), Col("seeds", "seeds"),
                            sd("hold-out KL before", "before", fmt="{:.4f}"), sd("after", "after", fmt="{:.4f}"),
                            sd("change", "change", fmt="{:.4f}"), Col("passes kept", "kept"),
                            sd("gain (eval)", "gain"), sd("eval KL change", "kl_change", fmt="{:.4f}")], loss_rows),
        lambda docs: [f"- `{s}.json`: calibration {d['settings']['calib']}, search last {d['settings']['last']} "
                      f"blocks, threads {d['settings']['threads']}, device {d['settings']['device']}"
                      for s, d in docs.items()],
        lambda docs: CURVE if curve_rows(docs) else None,
        Table(MODEL_BITS + [Col("start", "start"), Col("steps per block", "iters"),
                            Col("start top-1", "r.start.top1", f2), Col("KL", "r.start.kl", "{:.3f}"),
                            Col("start s", "r.start_seconds", "{:.0f}")], curve_rows)])]))
