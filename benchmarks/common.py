"""What several suites measure the same way: a start point and Evol-Q on top of it (metrics on
the evaluation split), restricting the search to the last blocks, the fitness-vs-evaluations
curve of a search, the weights-only / activations-only view of a model, and a line plot."""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch

GAP_PARTS = (("weights_only", "weight"), ("activations_only", "activation"))


def key_values(items) -> dict:
    """``["key=value", ...]`` -> a dict, values read as JSON where they parse (``2``, ``false``, ``2e-05``)."""
    import json

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def short(m: dict) -> dict:
    """top-1, agreement and KL of a metrics record, rounded for the JSON."""
    return {k: round(float(m[k]), 4) for k in ("top1", "agreement", "kl")}


def search_last_blocks(qmodel, last: int, scope: str = "attn-weights") -> list[str]:
    """Leave only the last ``last`` searchable blocks in ``scope`` (0: all); returns their names."""
    idx = [i for i, b in enumerate(qmodel.blocks) if b.scopes.get(scope)]
    keep = idx[-last:] if last else idx
    for i in idx:
        if i not in keep:
            qmodel.blocks[i].scopes = {**qmodel.blocks[i].scopes, scope: []}
    return [qmodel.blocks[i].name for i in keep]


def quantized_metrics(qmodel, xe, ye, fp_logits, batch_size: int = 50) -> dict:
    """Metrics of ``qmodel`` on the evaluation images against the float logits."""
    from evolq.evaluate import metrics, predict

    return metrics(predict(qmodel.model, xe, batch_size), ye, fp_logits)


def start_and_search(base, xc, xe, ye, cfg, arch: str, fp_logits, last: int | None = None, subscribers=(),
                     calib_fit=None) -> dict:
    """The start point (``prepare_model`` on the fitness part of ``xc``, or on ``calib_fit``), its
    metrics, ``quantize_model`` and the final metrics: ``{"qmodel", "start", "final", "report",
    "calib_s", "search_s", "blocks"}`` (``blocks``: the searched blocks with ``last``)."""
    from evolq import prepare_model, quantize_model
    from evolq.data import fitness_part

    t = time.perf_counter()
    qmodel = prepare_model(copy.deepcopy(base), fitness_part(xc, cfg.search) if calib_fit is None else calib_fit,
                           cfg.quant, arch=arch)
    calib_s = time.perf_counter() - t
    blocks = search_last_blocks(qmodel, last, cfg.search.scope) if last is not None else None
    start = quantized_metrics(qmodel, xe, ye, fp_logits)
    t = time.perf_counter()
    qmodel, rep = quantize_model(qmodel, xc, cfg, subscribers=list(subscribers))
    return {"qmodel": qmodel, "start": start, "final": quantized_metrics(qmodel, xe, ye, fp_logits), "report": rep,
            "calib_s": calib_s, "search_s": time.perf_counter() - t, "blocks": blocks}


class CurveRecorder:
    """Records the fitness-vs-evaluations curve of a search: after every batch of
    candidates, (evaluations so far, best fitness of the block being searched); each
    block starts at its start fitness. A subscriber: ``quantize_model(...,
    subscribers=[rec])``."""

    def __init__(self):
        self.evals, self.x, self.y, self._best = 0, [], [], None

    def subscribe(self, engine):
        engine.block_start_hook.append(self.start)
        engine.fitness_hook.append(self.step)
        engine.block_end_hook.append(self.end)

    def start(self, info):
        self._best = float(info["start_fitness"])
        self.x.append(self.evals)
        self.y.append(self._best)

    def step(self, index, cands, losses):
        if self._best is None:  # a start evaluation, outside a block search
            return
        self.evals += losses.numel()
        finite = torch.nan_to_num(losses.double(), nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
        self._best = min(self._best, float(finite.min()))
        self.x.append(self.evals)
        self.y.append(self._best)

    def end(self, rec):
        self._best = None


@contextmanager
def only_kind(qmodel, kind: str):
    """Inside: only ``qmodel``'s quantizers of ``kind`` ("weight" or "activation") are on, the
    others pass through (what the remaining error is made of: weights vs activations)."""
    off = [q for q in qmodel.quantizers().values() if getattr(q, "kind", "activation") != kind]
    for q in off:
        q.enabled = False
    try:
        yield qmodel
    finally:
        for q in off:
            q.enabled = True


def gap(qmodel, xe, ye, fp_logits) -> dict:
    """The model with only its weights quantized and with only its activations quantized."""
    out = {}
    for part, kind in GAP_PARTS:
        with only_kind(qmodel, kind), torch.no_grad():
            out[part] = short(quantized_metrics(qmodel, xe, ye, fp_logits))
        print(f"  {part}: {out[part]}", flush=True)
    return out


def plot(path, panels, title: str, size=(6, 4), dpi: int = 80) -> None:
    """``panels``: ``[(xlabel, ylabel, [(label, xs, ys, plot keywords)])]``, side by side, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, (xlabel, ylabel, lines) in zip(axs[0], panels):
        for label, xs, ys, kw in lines:
            ax.plot(xs, ys, label=label, **kw)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7 if len(panels) > 1 else 8)
    (fig.suptitle if len(panels) > 1 else axs[0][0].set_title)(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print("wrote", path)


def score_variants(run, variants: list[str], quant_of, xc, xm, ym, hold=None, extra=None) -> None:
    """Each variant's start point (``quant_of(text)`` -> QuantConfig; ``prepare_model`` on ``xc``, the
    hold-out ``hold`` scored by an ofq start) scored on ``xm``/``ym`` against the float model: top-1,
    agreement, KL and seconds, plus ``extra(quant, text, qmodel)``, into ``run.doc["variants"]`` (with
    ``best_kl``), saved after each; variants already there are skipped."""
    from evolq.api import prepare_model
    from evolq.evaluate import evaluate_qmodel, predict

    base = run.model()
    fp = predict(base, xm, 50)
    run.doc.setdefault("variants", {})
    for text in variants:
        if text in run.doc["variants"]:
            print(f"{text}: done, skipped")
            continue
        quant = quant_of(text)
        t0 = time.perf_counter()
        qm = prepare_model(copy.deepcopy(base), xc, quant, arch=run.args.model, progress=False, holdout=hold)
        secs = time.perf_counter() - t0
        m, _ = evaluate_qmodel(qm, xm, ym, fp_logits=fp, batch_size=50)
        r = {**short(m["quantized"]), "seconds": round(secs, 1), **(extra(quant, text, qm) if extra else {})}
        run.doc["variants"][text] = r
        run.doc["best_kl"] = min(run.doc["variants"], key=lambda k: run.doc["variants"][k]["kl"])
        run.save()
        print(f"{text}: top1 {r['top1']} agreement {r['agreement']} KL {r['kl']} ({secs:.0f} s)", flush=True)
    return fp


def timed_command(cmd: list[str], **kw) -> dict:
    """Run ``cmd`` in a subprocess as a user would: ``{"proc", "wall", "load_before", "load_after"}``
    (1-minute load averages, all three)."""
    import os
    import subprocess

    load0, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    return {"proc": proc, "wall": time.perf_counter() - t0, "load_before": list(load0),
            "load_after": list(os.getloadavg())}
