"""The ofq start's spread over seeds with ``keep="last"`` (the last epoch's weights, the default)
against ``keep="holdout"`` (the weights of the epoch, the GPTQ init counted as 0, with the lowest
KL on the calibration pool's hold-out; never the evaluation split). Per seed: the hold-out (10%,
by the seed) is split off the calibration pool, the start is calibrated and fine-tuned on the
rest with ``OFQOptions(seed=SEED, keep="holdout")``, and the final model is scored on the
evaluation split. Both choices follow the same training trajectory (same seed, same steps; the
choice is made after the last epoch), so one fine-tune per seed gives both: a ``StartHooks``
subscriber scores the model on the evaluation split at the end of the last epoch (what
``keep="last"`` ends with) and of every epoch whose hold-out KL is a new lowest (so the kept
epoch's in-training score is recorded too and must equal the final model's: ``check`` in the
JSON). The evaluation scores are recorded, never read by the fine-tune. Resumable per seed; seeds may
run as invocations of their own at the same time (``--plan``): each save merges the seeds already in
the file."""
from __future__ import annotations

import copy
import json
import time

import torch

from evolq.config import QuantConfig
from evolq.data import split_calibration

from ..common import key_values, short
from ..report import Col, Section, Table, mean_sd
from ..runner import Suite, cpu_info, register


class EpochProbe:
    """Scores the model on the evaluation split at the end of the last epoch and of every epoch
    whose hold-out KL is a new lowest (``StartHooks`` subscriber)."""

    def __init__(self, model, xe, ye, fp):
        self.model, self.xe, self.ye, self.fp = model, xe, ye, fp
        self.epochs, self.best, self.scores = None, float("inf"), {}

    def subscribe(self, hooks):
        hooks.epoch_start_hook.append(lambda r: setattr(self, "epochs", r["epochs"]))
        hooks.epoch_end_hook.append(self.end)

    def end(self, rec):
        from evolq.evaluate import metrics, predict

        kl = rec.get("holdout_kl")
        new_low = kl is not None and kl < self.best
        if new_low:
            self.best = kl
        if new_low or rec["epoch"] == self.epochs:
            with torch.no_grad():
                m = metrics(predict(self.model, self.xe, 50), self.ye, self.fp)
            self.scores[rec["epoch"]] = short(m)
            print(f"  epoch {rec['epoch']}: hold-out KL {kl:.4f}, eval top-1 {m['top1']:.2f}", flush=True)


def _save(run):
    """Save, keeping the seeds (and invocation records) that other invocations wrote to the file meanwhile."""
    if run.path.exists():
        disk = json.loads(run.path.read_text())
        for k, v in disk.get("runs", {}).items():
            run.doc["runs"].setdefault(k, v)
        mine = {b.get("command") for b in run.doc.get("bench", [])} | {run.record["command"]}
        run.doc["bench"] = run.doc.get("bench", []) + [b for b in disk.get("bench", []) if b.get("command") not in mine]
    done = [run.doc["runs"][k] for k in sorted(run.doc["runs"], key=int)]
    run.doc["runs"] = {str(r["seed"]): r for r in done}
    run.doc["summary"] = {k: {"top1": mean_sd([x[k]["top1"] for x in done if x.get(k)], "{:.2f}"),
                              "kl": mean_sd([x[k]["kl"] for x in done if x.get(k)], "{:.4f}"),
                              "seeds": len(done)} for k in ("last", "holdout")}
    run.save()


def run(run):
    from evolq.api import prepare_model
    from evolq.evaluate import metrics, predict

    a = run.args
    base = run.model()
    pool, _ = run.images(a.model, "calib", a.calib)
    xe, ye = run.images(a.model, "eval", a.eval)
    fp = predict(base, xe, 50)
    opts = key_values([o for o in a.options.split("+") if o])
    run.doc["settings"] = {"model": a.model, "w_bits": a.w_bits, "a_bits": a.a_bits, "preset": a.preset,
                           "edge_bits": a.edge_bits, "calib": int(pool.shape[0]), "eval": int(xe.shape[0]),
                           "holdout": a.holdout, "threads": a.threads, "options": opts}
    run.doc["fp32_top1"] = round(float((fp.argmax(1) == ye).float().mean()) * 100, 3)
    run.doc.setdefault("runs", {})
    for seed in a.seeds:
        if str(seed) in run.doc["runs"]:
            print(f"seed {seed}: done, skipped")
            continue
        xc, hold = split_calibration(pool, a.holdout, seed)
        quant = QuantConfig.preset(a.preset, w_bits=a.w_bits, a_bits=a.a_bits, start="ofq", edge_bits=a.edge_bits,
                                   start_options={**opts, "seed": seed, "keep": "holdout", "progress": False})
        model = copy.deepcopy(base)
        probe = EpochProbe(model, xe, ye, fp)
        t0 = time.perf_counter()
        qm = prepare_model(model, xc, quant, arch=a.model, holdout=hold, subscribers=[probe])
        secs = time.perf_counter() - t0
        rep = qm.start_report or {}
        final = short(metrics(predict(qm.model, xe, 50), ye, fp))
        kept = rep.get("kept_epoch")
        last_epoch = max(probe.scores) if probe.scores else None
        r = {"seed": seed, "holdout": final, "last": probe.scores.get(last_epoch), "kept_epoch": kept,
             "last_epoch": last_epoch, "epoch_scores": {str(k): v for k, v in probe.scores.items()},
             "history": rep.get("history"), "holdout_kl": rep.get("holdout_kl"), "status": rep.get("status"),
             "fit_images": int(xc.shape[0]), "holdout_images": int(hold.shape[0]), "seconds": round(secs, 1),
             "threads": torch.get_num_threads(), "cpu": cpu_info()}
        # the in-training score of the kept epoch must be the final model's (the init: not scored in training)
        r["check"] = (None if kept == 0 or kept not in probe.scores else
                      {"in_training_top1": probe.scores[kept]["top1"], "final_top1": final["top1"],
                       "equal": abs(probe.scores[kept]["top1"] - final["top1"]) < 1e-6})
        run.doc["runs"][str(seed)] = r
        _save(run)
        print(f"seed {seed}: keep=last top-1 {r['last']['top1'] if r['last'] else float('nan'):.2f}, keep=holdout "
              f"top-1 {final['top1']:.2f} (kept epoch {kept}), {secs:.0f} s", flush=True)


def _hold_kl(r, k):
    """The hold-out KL (calibration data) of the weights ``k`` ends with."""
    hist = [h["holdout_kl"] for h in r.get("history") or [] if h.get("holdout_kl") is not None]
    if not hist:
        return None
    if k == "last":
        return hist[-1]
    before = (r.get("holdout_kl") or {}).get("before")
    return min(hist + ([before] if before is not None else []))


def _rows(d):
    out = []
    for k in ("last", "holdout"):
        rs = [r for r in d["runs"].values() if r.get(k)]
        out.append({"keep": k, "top1": mean_sd([r[k]["top1"] for r in rs], "{:.2f}"),
                    "per_seed": ", ".join(f"{r[k]['top1']:.1f}" for r in rs),
                    "range": f"{min(r[k]['top1'] for r in rs):.1f}..{max(r[k]['top1'] for r in rs):.1f}",
                    "kl": mean_sd([r[k]["kl"] for r in rs], "{:.4f}"),
                    "hold_kl": mean_sd([_hold_kl(r, k) for r in rs], "{:.4f}"),
                    "kept": ", ".join(str(r["kept_epoch"] if k == "holdout" else r["last_epoch"]) for r in rs),
                    "seeds": " ".join(str(r["seed"]) for r in rs)})
    return out


def _recipe(d):
    opts = d["settings"].get("options") or {}
    return "with " + ", ".join(f"{k}={v}" for k, v in opts.items()) if opts else "of today's defaults"


def _cpus(d):
    cpus = sorted({r["cpu"]["model"] for r in d["runs"].values() if r.get("cpu")})
    return ", ".join(cpus)


def _spread(d):
    """What the spread is made of: how far the kept epoch moves a seed, against how far the seeds are apart."""
    rs = [d["runs"][k] for k in sorted(d["runs"], key=int)]
    if len(rs) < 2:
        return None
    moved = [r for r in rs if r["kept_epoch"] != r["last_epoch"]]
    hold = [r["holdout_kl"]["after"] for r in rs]
    first = [r["epoch_scores"].get("1", {}).get("top1") for r in rs]
    return (f"The hold-out chose an earlier epoch in {len(moved)} of {len(rs)} seeds, moving those seeds' top-1 by "
            + (", ".join(f"{r['holdout']['top1'] - r['last']['top1']:+.1f}" for r in moved) or "nothing")
            + f"; the seeds are {max(r['last']['top1'] for r in rs) - min(r['last']['top1'] for r in rs):.1f} "
            f"points apart at the end and already apart after the first epoch (in-training top-1 "
            f"{', '.join(f'{x:.1f}' for x in first if x is not None)}), and their kept epochs' hold-out KL ranges "
            f"{min(hold):.3f}..{max(hold):.3f} (each seed's hold-out is a different 10% of the pool, so these are not "
            f"comparable across seeds). The spread is made of the seeds' trajectories (the split, the data order and "
            f"the views), not of where a trajectory stops: choosing the stopping epoch did not narrow it.")


register(Suite(
    name="ofq_keep", doc=__doc__, run=run, order=61, resume=True, out="ofq_keep_{short}_w{w_bits}a{a_bits}",
    what="the ofq start's top-1 over seeds with keep='last' vs keep='holdout' (one fine-tune per seed gives both)",
    common={"model": "vit_tiny_patch16_224", "calib": None, "eval": 500, "seeds": [0, 1, 2], "threads": 2},
    args=[(("--w-bits",), {"type": int, "default": 3}), (("--a-bits",), {"type": int, "default": 8}),
          (("--preset",), {"default": "outlier-aware"}), (("--edge-bits",), {"type": int, "default": 8}),
          (("--holdout",), {"type": float, "default": 0.1, "help": "hold-out share of the calibration pool"}),
          (("--options",), {"default": "", "help": "other ofq start_options, key=value joined by +"})],
    results={"ofq_keep_vit_tiny_w3a8": ""},
    smoke={"calib": 24, "eval": 8, "seeds": [0], "options": "epochs=2+batch_size=8"},
    report=[Section("ofq_keep_*", [
        "## The ofq start's spread: keep the last epoch or the hold-out's best (`benchmarks/suites/ofq_keep.py`)",
        lambda d: f"{d['settings']['model']} W{d['settings']['w_bits']}A{d['settings']['a_bits']}, "
                  f"{d['settings']['preset']} preset, edge bits {d['settings']['edge_bits']}, the ofq recipe "
                  f"{_recipe(d)}; "
                  f"per seed the hold-out ({d['settings']['holdout']:.0%} of the {d['settings']['calib']}-image "
                  f"calibration pool) is split off by the seed and the fine-tune uses the same seed; top-1 on "
                  f"{d['settings']['eval']} evaluation images (FP32 {d['fp32_top1']:.1f}), mean ± std over the seeds, "
                  f"on {_cpus(d)} (`{d['file']}.json`). One fine-tune per seed gives both rows: *last* is the model "
                  f"at the end of the last epoch, *holdout* the weights of the epoch with the lowest hold-out KL "
                  f"(*epoch*: the epoch each row ends with, per seed).",
        Table([Col("keep", "keep"), Col("top-1", "top1"), Col("per seed", "per_seed"), Col("range", "range"),
               Col("KL (evaluation)", "kl"), Col("hold-out KL (calibration)", "hold_kl"), Col("epoch", "kept"),
               Col("seeds", "seeds")], _rows),
        _spread])]))
