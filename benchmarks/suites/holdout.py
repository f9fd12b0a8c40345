"""How often the hold-out takes the right keep/revert decision, on the calibration pool only.
Per seed the 500 pool images split into a fitness set (``--fit``), a hold-out pool (``--hold``;
its first 5, 10, 25, ... images are the hold-outs compared) and a judge pool (the rest). The
search keeps every pass; before and after each pass the hold-outs and the judge score the model.
A hold-out's decision (keep if its score did not get worse) is right when it equals the judge's
(keep if the judge's mean KL to the float outputs did not rise). Criteria: ``kl`` (evolq's
default), ``agreement`` and ``infonce`` (the fitness loss). Resumable."""
from __future__ import annotations

import copy
import time

import torch

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.fitness import chunked_forward, reference_outputs
from evolq.losses import infonce, kl

from ..common import search_last_blocks
from ..report import Col, Pivot, Section
from ..runner import Suite, register

CRITERIA = ("kl", "agreement", "infonce")
SETTINGS = ("model", "bits", "seeds", "passes", "cycles", "last", "fit", "hold", "sizes", "device", "max_batch")


def scores(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Lower is better for each."""
    return {"kl": float(kl(out.unsqueeze(0), ref)[0]),
            "agreement": -100.0 * float((out.argmax(-1) == ref.argmax(-1)).double().mean()),
            "infonce": float(infonce(out.unsqueeze(0), ref, batch_size=min(100, out.shape[0]))[0])}


class PassScorer:
    """A subscriber: scores the model on each hold-out size and the judge pool at the start and
    after every pass."""

    def __init__(self, hold, judge, sizes, max_batch=64):
        self.hold, self.judge, self.sizes, self.max_batch = hold, judge, sizes, max_batch
        self.states: list[dict] = []

    def subscribe(self, engine):
        self.qmodel = engine.qmodel
        self.ref_h = reference_outputs(engine.qmodel, self.hold, self.max_batch)
        self.ref_j = reference_outputs(engine.qmodel, self.judge, self.max_batch)
        engine.run_start_hook.append(lambda state: self.score())
        engine.pass_end_hook.append(lambda rec: self.score())

    @torch.no_grad()
    def score(self):
        run = lambda xb: self.qmodel.run_blocks(xb).float()
        out_h = chunked_forward(run, self.hold, self.max_batch)
        out_j = chunked_forward(run, self.judge, self.max_batch)
        self.states.append({"judge_kl": float(kl(out_j.unsqueeze(0), self.ref_j)[0]),
                            "hold": {str(n): scores(out_h[:n], self.ref_h[:n]) for n in self.sizes}})


def decisions(states: list[dict], sizes) -> list[dict]:
    out = []
    for before, after in zip(states[:-1], states[1:]):
        delta = after["judge_kl"] - before["judge_kl"]
        d = {"judge_keep": delta <= 0, "judge_delta": delta}
        for n in sizes:
            for c in CRITERIA:
                d[f"{c}@{n}"] = after["hold"][str(n)][c] <= before["hold"][str(n)][c]
        out.append(d)
    return out


def summary(runs: list[dict], sizes) -> dict:
    ds = [d for r in runs for d in r["decisions"]]
    res = {"decisions": len(ds), "judge_keeps": sum(d["judge_keep"] for d in ds)}
    for c in CRITERIA:
        for n in sizes:
            res[f"{c}@{n}"] = sum(d[f"{c}@{n}"] == d["judge_keep"] for d in ds) / max(1, len(ds))
    res["always_keep"] = res["judge_keeps"] / max(1, len(ds))
    return res


def run(run):
    a = run.args
    pool, _ = run.images(a.model, "calib")
    base = run.model()
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    runs = [r for r in run.doc.get("runs", []) if r.get("passes") == a.passes]
    settings = {**{k: getattr(a, k) for k in SETTINGS}, "judge": int(pool.shape[0] - a.fit - a.hold)}
    for bits in a.bits:
        for seed in a.seeds:
            if any((r["bits"], r["seed"]) == (bits, seed) for r in runs):
                continue
            perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
            fit = pool[perm[:a.fit]]
            hold = pool[perm[a.fit:a.fit + a.hold]].to(a.device)
            judge = pool[perm[a.fit + a.hold:]].to(a.device)
            config = EvolQConfig.make(w_bits=bits, a_bits=8, passes=a.passes, cycles=a.cycles, holdout=0.0,
                                      seed=seed, infonce_batch=min(100, a.fit), progress=False, device=a.device,
                                      max_batch=a.max_batch)
            t0 = time.perf_counter()
            qmodel = prepare_model(copy.deepcopy(base), fit, config.quant, arch=a.model)
            blocks = search_last_blocks(qmodel, a.last)
            scorer = PassScorer(hold, judge, a.sizes, max_batch=min(256, a.max_batch))
            quantize_model(qmodel, fit, config, subscribers=[scorer])
            runs.append({"bits": bits, "seed": seed, "passes": a.passes, "blocks": blocks, "states": scorer.states,
                         "decisions": decisions(scorer.states, a.sizes), "seconds": time.perf_counter() - t0,
                         "device": device})
            s = summary([runs[-1]], a.sizes)
            print(f"W{bits}A8 seed {seed}: {s['decisions']} passes, judge keeps {s['judge_keeps']}", flush=True)
            run.save({**run.doc, "settings": settings, "runs": runs, "summary": summary(runs, a.sizes)})


def cells(d):
    return [{"criterion": c, "n": n, "right": d["summary"][f"{c}@{n}"]} for c in CRITERIA
            for n in d["settings"]["sizes"]]


register(Suite(
    name="holdout", doc=__doc__, run=run, order=30, resume=True,
    what="how often the hold-out's keep/revert decision is right, calibration pool only",
    common={"model": "vit_tiny_patch16_224", "seeds": [0, 1, 2], "device": "cpu", "max_batch": 32},
    args=[(("--bits",), {"type": int, "nargs": "+", "default": [3, 4]}),
          (("--passes",), {"type": int, "default": 6}), (("--cycles",), {"type": int, "default": 3}),
          (("--last",), {"type": int, "default": 4, "help": "search only the last N blocks (0: all)"}),
          (("--fit",), {"type": int, "default": 100}), (("--hold",), {"type": int, "default": 50}),
          (("--sizes",), {"type": int, "nargs": "+", "default": [5, 10, 25, 50]})],
    results={"holdout": "--device cuda --max-batch 4096 --bits 3 4 --passes 6 --last 0"},
    smoke={"bits": [4], "seeds": [0], "passes": 1, "cycles": 1, "last": 1, "fit": 16, "hold": 8, "sizes": [4, 8]},
    report=[Section("holdout", [
        "## How often the hold-out decides right (`benchmarks/suites/holdout.py`)",
        lambda d: f"Calibration pool only: per seed {d['settings']['fit']} fitness images, a hold-out pool of "
                  f"{d['settings']['hold']} and an independent judge pool of {d['settings']['judge']} images, all "
                  f"disjoint. ViT-Tiny W{'/W'.join(map(str, d['settings']['bits']))}A8, seeds "
                  f"{', '.join(map(str, d['settings']['seeds']))}, {d['settings']['passes']} passes x "
                  f"{d['settings']['cycles']} cycles with every pass kept; before and after each pass the hold-outs "
                  f"and the judge score the model. *Right* = the hold-out's keep/revert decision equals the judge's "
                  f"(keep if the judge's mean KL to the float outputs did not rise). {d['summary']['decisions']} pass "
                  f"decisions; the judge keeps {d['summary']['judge_keeps']}, so always keeping is right "
                  f"{d['summary']['always_keep']:.0%} of the time.",
        Pivot(cells, [Col("criterion", "criterion")], "n", "n={}".format, lambda c: f"{c['right']:.0%}")])]))
