"""How often the hold-out takes the right keep/revert decision, measured on the
calibration pool only (the evaluation split is not used).

Per seed, the 500 calibration-pool images are split into three disjoint parts: a
fitness set (``--fit``), a hold-out pool (``--hold``, of which the first 5, 10, 25, ...
images are the hold-outs compared) and a judge pool (the rest, e.g. 350 images). The
search runs with every pass kept (``holdout=0``), and before and after every pass the
quantized model is scored on the hold-outs and the judge pool. A hold-out's decision
(keep the pass if its score did not get worse) is *right* when it equals the judge's
decision: keep if the mean KL to the float outputs on the judge pool did not rise.
Criteria compared: ``kl`` (evolq's default), ``agreement`` (top-1 agreement with the
float model) and ``infonce`` (the fitness loss, the previous rule).

    python benchmarks/holdout.py --bits 3 4 --seeds 0 1 2 --passes 6 --last 4

Writes benchmarks/results/holdout.json (resumable: finished runs are kept).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, load_data, search_last_blocks, setup, write_json

from evolq import EvolQConfig, prepare_model, quantize_model
from evolq.fitness import chunked_forward, reference_outputs
from evolq.losses import infonce, kl

CRITERIA = ("kl", "agreement", "infonce")


def scores(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Lower is better for each."""
    return {"kl": float(kl(out.unsqueeze(0), ref)[0]),
            "agreement": -100.0 * float((out.argmax(-1) == ref.argmax(-1)).double().mean()),
            "infonce": float(infonce(out.unsqueeze(0), ref, batch_size=min(100, out.shape[0]))[0])}


class PassScorer:
    """A subscriber: scores the model on each hold-out size and the judge pool at the
    start and after every pass."""

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--last", type=int, default=4, help="search only the last N blocks (0: all)")
    ap.add_argument("--fit", type=int, default=100)
    ap.add_argument("--hold", type=int, default=50)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 25, 50])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", default="holdout.json")
    args = ap.parse_args()
    setup(1)
    base, pool, _, _ = load_data(args.model, 500, 1)
    path = RESULTS / args.out
    import json

    doc = json.loads(path.read_text()) if path.exists() else {}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    runs = [r for r in doc.get("runs", []) if r.get("passes") == args.passes]
    done = {(r["bits"], r["seed"]) for r in runs}
    for bits in args.bits:
        for seed in args.seeds:
            if (bits, seed) in done:
                continue
            perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
            fit = pool[perm[:args.fit]]
            hold = pool[perm[args.fit:args.fit + args.hold]].to(args.device)
            judge = pool[perm[args.fit + args.hold:]].to(args.device)
            config = EvolQConfig.make(w_bits=bits, a_bits=8, passes=args.passes, cycles=args.cycles, holdout=0.0,
                                      seed=seed, infonce_batch=min(100, args.fit), progress=False,
                                      device=args.device, max_batch=args.max_batch)
            t0 = time.perf_counter()
            qmodel = prepare_model(copy.deepcopy(base), fit, config.quant, arch=args.model)
            blocks = search_last_blocks(qmodel, args.last)
            scorer = PassScorer(hold, judge, args.sizes, max_batch=min(256, args.max_batch))
            quantize_model(qmodel, fit, config, subscribers=[scorer])
            runs.append({"bits": bits, "seed": seed, "passes": args.passes, "blocks": blocks,
                         "states": scorer.states, "decisions": decisions(scorer.states, args.sizes),
                         "seconds": time.perf_counter() - t0, "device": device})
            s = summary([runs[-1]], args.sizes)
            print(f"W{bits}A8 seed {seed}: {s['decisions']} passes, judge keeps {s['judge_keeps']}; right: "
                  + ", ".join(f"{c}@{n} {s[f'{c}@{n}']:.2f}" for c in CRITERIA for n in args.sizes)
                  + f"  ({runs[-1]['seconds']:.0f} s)", flush=True)
            write_json(args.out, {"settings": vars(args) | {"judge": int(pool.shape[0] - args.fit - args.hold)},
                                  "runs": runs, "summary": summary(runs, args.sizes)})
    s = summary(runs, args.sizes)
    print(f"\n{s['decisions']} pass decisions, the judge pool keeps {s['judge_keeps']} "
          f"(always keeping would be right {s['always_keep']:.0%})")
    print(f"{'criterion':<12}" + "".join(f"{'n=' + str(n):>9}" for n in args.sizes))
    for c in CRITERIA:
        print(f"{c:<12}" + "".join(f"{s[f'{c}@{n}']:9.0%}" for n in args.sizes))
    write_json(args.out, {"settings": vars(args) | {"judge": int(pool.shape[0] - args.fit - args.hold)},
                          "runs": runs, "summary": s})


if __name__ == "__main__":
    main()
