"""The deploy runtime's latency table for the bit allocation (``evolq.allocation.latency``), measured.

The deploy runtime is PyTorch's x86 int8 path (``evolq.export.pt2``, compiled by inductor with
freezing as ``evolq.export.runtimes.inductor`` compiles a pt2 file). There a quantized layer is
one oneDNN int8 kernel whatever its width (2..8-bit weights run in int8 containers) and a
``"float"`` layer a float one, so a layer's latency has two values. ``measure_latency_table``
times both for every layer of a calibrated deploy-regime ``QModel`` (the allocation's proxy):

* the input each layer sees on one forward of ``batch`` images is captured with hooks;
* layers with the same signature (kind, weight shape, stride..., input shape) are timed once;
* each signature's int8 lowering and float lowering are exported and compiled alone, and timed
  in alternating rounds (``evolq.export.bench.time_alternating``) together with an empty
  compiled program, whose time (the call overhead of a compiled program, which the whole model
  pays once) is subtracted round by round;
* every integer menu width of a layer costs its int8 time, ``"float"`` its float time;
* the whole lowered model is compiled and timed at the all-int8 and the all-float allocation;
  ``fit="scaled"`` (the default) scales every layer's float - int8 gap by one factor and adds a
  constant (attention, norms, residual adds, one call) so that both are exact; ``fit="raw"``
  keeps the layers' times and takes the constant as the mean over the two of their measured
  time less the layers' sum (the fallback where the gaps disagree in sign with the whole model's);
* the additive model is validated against whole-model timings of ``mixed`` allocations with
  a seeded random fraction of the layers in float, which it was not fitted on: the record
  holds predicted and measured milliseconds and the relative error of each, for both fits.

Fusion makes the plain sum inexact: in a whole int8 model inductor fuses each layer's input
quantize into the op before it, which a layer timed alone cannot show, so the layers' own
float - int8 gaps understate the whole model's. On ViT-Tiny (batch 1, 2 threads,
``benchmarks/results/latency_table_vit_tiny.json``) the raw sum missed the uniform allocations
by up to 2.7% (8.7% in another run) and the scaled fit the mixed ones by up to 2.3%; an
allocation chosen by the search under a budget, by 10.6% (docs/bit-allocation.md).

``LatencyTable`` (``evolq.allocation.latency``) is the result: ``table`` (layers, options) in ms and ``constant`` make a
``Cost``; ``record`` is JSON-able (per-layer and per-signature times, kernels, validation rows,
CPU, threads, batch, load). ``evolq.allocation.latency.load_or_measure`` caches it in a run folder (``latency.json``)
so that a resumed run uses the very table it started with.

This module registers itself as the ``"inductor"`` latency runtime
(``evolq.allocation.latency.LATENCY_RUNTIMES``) when ``evolq.export`` is imported.
"""
from __future__ import annotations

import copy
import math
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from ..allocation.latency import LatencyTable, LatencyWarning, register_latency_runtime
from ..errors import ConfigError, ExportError
from ..problems.menu import Menu
from ..qnn.layer_bits import FLOAT, quantized_layers, tied_layer

__all__ = ["measure_latency_table", "InductorLatency"]

FIT = ("all-int8", "all-float")  # the whole-model timings the constant (and scale) are fitted on
FITS = ("raw", "scaled")


# -- measuring ---------------------------------------------------------------------------
def _signature(m, shape) -> str:
    from ..qnn.layers import QConv2d

    w = tuple(m.weight.shape)
    bias = m.bias is not None
    if isinstance(m, QConv2d):
        c = m.conv
        same = type(m).__name__ == "QConv2dSame"
        return (f"conv{w} s{tuple(c.stride)} p{'same' if same else tuple(c.padding)} d{tuple(c.dilation)} "
                f"g{c.groups} bias={bias} in{tuple(shape)}")
    scaled = getattr(m, "input_scale", None) is not None
    return f"linear{w} bias={bias} scaled={scaled} in{tuple(shape)}"


@torch.no_grad()
def _layer_inputs(qmodel, layers: dict, x: torch.Tensor):
    """Per layer its signature; per signature the first input seen (a forward of ``x``)."""
    sig, inputs, hooks = {}, {}, []

    def make(name):
        def hook(mod, args):
            s = _signature(mod, args[0].shape)
            sig[name] = s
            if s not in inputs:
                inputs[s] = args[0].detach().clone()
        return hook

    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(make(name)))
    try:
        qmodel.model(x)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in sig]
    if missing:
        raise ExportError(f"layer {missing[0]} did not run on a forward of the example: it cannot be timed")
    return sig, inputs


class _Empty(nn.Module):
    """Returns its input: compiled, what a call of a compiled program costs with no work in it."""

    def forward(self, x):
        return x


def _compile(module: nn.Module, x: torch.Tensor, threads: int):
    """``module`` exported at ``x``'s shape and compiled like a pt2 file (inductor, freezing):
    (the compiled callable, its kernels, compile seconds)."""
    from .runtimes.inductor import compile_module, count_kernels

    t0 = time.perf_counter()
    with torch.no_grad():
        try:
            ep = torch.export.export(module.eval(), (x,), strict=False)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExportError(f"torch.export could not trace a lowered layer or model for timing: {msg}") from None
        runner = compile_module(ep.module(), threads)
        runner(x)  # compiles
    return runner.compiled[tuple(x.shape)], count_kernels(runner.codes), time.perf_counter() - t0


def _repeat(fn, round_s: float) -> int:
    """Calls per timed round so that a round lasts about ``round_s``."""
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return max(1, min(1000, math.ceil(round_s / max(min(ts), 1e-7))))


@torch.no_grad()
def _time(cands: dict, baseline: str, pairs: int, warmup: int, round_s: float) -> dict:
    """``time_alternating`` with every candidate run the same number of times per round, sized so
    that the slowest one's round lasts about ``round_s``."""
    from .bench import time_alternating

    for fn in cands.values():  # warm before sizing the rounds
        fn()
    repeat = min(_repeat(fn, round_s) for fn in cands.values())
    return time_alternating(cands, baseline, pairs=pairs, warmup=warmup, repeat=repeat)


def _net_ms(r: dict, name: str, empty: str = "empty") -> float:
    """Median over rounds of ``name``'s time less the empty program's in the same round (ms, >= 0)."""
    d = [a - b for a, b in zip(r["times"][name]["rounds_s"], r["times"][empty]["rounds_s"])]
    return max(0.0, statistics.median(d) * 1e3)


def _mixed_allocations(n_layers: int, mixed: int, seed: int) -> list[tuple[str, list[bool]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(mixed):
        frac = (i + 1) / (mixed + 1)
        k = min(n_layers - 1, max(1, round(frac * n_layers))) if n_layers > 1 else 0
        chosen = set(torch.randperm(n_layers, generator=g)[:k].tolist())
        out.append((f"mixed-{round(100 * frac)}%-float", [j in chosen for j in range(n_layers)]))
    return out


def _whole(low8: nn.Module, lowf: nn.Module, names: list, flt: list[bool], followers: dict) -> nn.Module:
    """The int8-lowered model with the layers flagged in ``flt`` replaced by their float lowering."""
    swap = [n for n, f in zip(names, flt) if f]
    swap += [t for n in swap for t in followers.get(n, ())]
    memo = {id(low8.get_submodule(n)): lowf.get_submodule(n) for n in swap}
    return copy.deepcopy(low8, memo)


def measure_latency_table(qmodel, menu: Menu, example: torch.Tensor, *, threads: int = 2, batch: int = 1,
                          pairs: int = 15, model_pairs: int = 40, warmup: int = 3, round_ms: float = 20.0,
                          mixed: int = 3, seed: int = 0, fit: str = "scaled", progress: bool = False) -> LatencyTable:
    """Time every layer of the deploy-regime ``qmodel`` in int8 and in float (see the module
    docstring). ``example``: input images (the first ``batch`` are used, repeated if fewer);
    ``threads``: the threads inductor compiles for and runs with; ``pairs`` (layers),
    ``model_pairs`` (whole models), ``warmup``: the alternating rounds of the timings; a round
    runs each layer about ``round_ms``; ``mixed``: the whole-model allocations (``seed``: which
    layers are float) beyond the uniform ones that validate the additive model; ``fit``: the
    additive model, ``"scaled"`` (every layer's float - int8 gap scaled so that both uniform
    allocations are exact; ``"raw"`` where no positive scale fits) or ``"raw"`` (the layers' times
    and a constant). Raises ``ExportError``
    for a model the x86 int8 path cannot express."""
    if fit not in FITS:
        raise ConfigError(f"unknown latency fit {fit!r}; choose one of: {', '.join(FITS)}")
    from .bench import cpu_info
    from .pt2 import lower_deploy

    t_start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    x = example[:batch]
    if x.shape[0] < batch:
        x = x[:1].expand(batch, *x.shape[1:]).contiguous()
    layers = quantized_layers(qmodel.model)
    names = list(layers)
    every = quantized_layers(qmodel.model, tied=True)
    followers = {}
    for n in every:
        if tied_layer(n) is not None:
            followers.setdefault(tied_layer(n), []).append(n)
    cpu = cpu_info()
    try:
        torch.set_num_threads(threads)
        sig, inputs = _layer_inputs(qmodel, layers, x)
        low8, lowf = lower_deploy(qmodel, True), lower_deploy(qmodel, False)
        sigs = list(dict.fromkeys(sig[n] for n in names))
        per_sig, warns = {}, []
        it = sigs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(sigs, desc="latency: layers", leave=False)
        for s in it:
            rep = next(n for n in names if sig[n] == s)
            xin = inputs[s]
            f8, k8, c8 = _compile(copy.deepcopy(low8.get_submodule(rep)), xin, threads)
            ff, kf, cf = _compile(copy.deepcopy(lowf.get_submodule(rep)), xin, threads)
            fe, _, _ = _compile(_Empty(), xin, threads)
            if not k8["integer"]:
                warns.append(f"{rep}: the int8 lowering ran no integer kernel ({', '.join(k8['float']) or '?'})")
                warnings.warn(f"latency table: {warns[-1]}", LatencyWarning, stacklevel=2)
            r = _time({"int8": lambda f=f8, xin=xin: f(xin), "float": lambda f=ff, xin=xin: f(xin),
                       "empty": lambda f=fe, xin=xin: f(xin)}, "float", pairs, warmup, round_ms / 1e3)
            per_sig[s] = {"signature": s, "example_layer": rep, "layers": sum(sig[n] == s for n in names),
                          "int8_ms": _net_ms(r, "int8"), "float_ms": _net_ms(r, "float"),
                          "call_ms": r["times"]["empty"]["median_s"] * 1e3,
                          "int8_gross_ms": r["times"]["int8"]["median_s"] * 1e3,
                          "float_gross_ms": r["times"]["float"]["median_s"] * 1e3,
                          "repeat": r["repeat"], "compile_s": {"int8": c8, "float": cf},
                          "kernels": {"int8": k8, "float": kf},
                          "load_1m": [r["load_1m_before"], r["load_1m_after"]]}
            per_sig[s]["int8_speedup"] = per_sig[s]["float_ms"] / per_sig[s]["int8_ms"] \
                if per_sig[s]["int8_ms"] > 0 else None
            del f8, ff, fe
        t8 = torch.tensor([per_sig[sig[n]]["int8_ms"] for n in names], dtype=torch.float64)
        tf = torch.tensor([per_sig[sig[n]]["float_ms"] for n in names], dtype=torch.float64)
        layers_s = time.perf_counter() - t_start

        # whole models: the uniform allocations fit the constant, the mixed ones validate
        allocs = [("all-int8", [False] * len(names)), ("all-float", [True] * len(names))]
        allocs += _mixed_allocations(len(names), mixed, seed)
        runners, compile_s, kernels = {}, {}, {}
        it = allocs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(allocs, desc="latency: whole models", leave=False)
        for a, flt in it:
            runners[a], kernels[a], compile_s[a] = _compile(_whole(low8, lowf, names, flt, followers), x, threads)
        r = _time({a: (lambda fn=fn: fn(x)) for a, fn in runners.items()}, "all-float", model_pairs, warmup,
                  round_ms / 1e3)
        del runners
    finally:
        torch.set_num_threads(saved_threads)
    measured = {a: r["times"][a]["median_s"] * 1e3 for a, _ in allocs}
    flags = {a: torch.tensor(flt, dtype=torch.bool) for a, flt in allocs}
    # raw: the measured layer times and a constant, the mean over both uniform allocations of the rest
    raw_constant = statistics.fmean(measured[a] - float(torch.where(flags[a], tf, t8).sum()) for a in FIT)
    # scaled: every layer's float - int8 gap scaled by one factor so that both uniform allocations are exact
    gap = float((tf - t8).sum())
    scale = (measured["all-float"] - measured["all-int8"]) / gap if gap else 0.0
    models = {"raw": (tf, raw_constant)}
    if scale > 0:  # else the layers' int8/float gap and the whole model's disagree in sign: no scale fits
        models["scaled"] = (t8 + scale * (tf - t8), measured["all-int8"] - float(t8.sum()))
    model = fit if fit in models else "raw"
    tf_model, constant = models[model]
    table = torch.stack([tf_model if o == FLOAT else t8 for o in menu.options], dim=1)
    rows = []
    for a, flt in allocs:
        row = {"allocation": a, "float_layers": int(sum(flt)), "measured_ms": measured[a], "fitted": a in FIT}
        for m, (tfm, c) in models.items():
            pred = float(torch.where(flags[a], tfm, t8).sum()) + c
            row[f"predicted_{m}_ms"], row[f"error_{m}"] = pred, (pred - measured[a]) / measured[a]
        row["predicted_ms"], row["error"] = row[f"predicted_{model}_ms"], row[f"error_{model}"]
        row.update({"measured_min_ms": r["times"][a]["min_s"] * 1e3, "measured_max_ms": r["times"][a]["max_s"] * 1e3,
                    "compile_s": compile_s[a], "integer_kernels": sum(kernels[a]["integer"].values()),
                    "float_kernels": sum(kernels[a]["float"].values()),
                    "float_layer_names": [n for n, f in zip(names, flt) if f] if 0 < sum(flt) < len(names)
                    else None})
        rows.append(row)
    held = [w for w in rows if not w["fitted"]]
    record = {
        "runtime": "inductor (pt2 lowering, freezing)", "threads": threads, "batch": batch, "pairs": pairs,
        "model_pairs": model_pairs, "warmup": warmup, "round_ms": round_ms, "menu": menu.label(), "seed": seed,
        "cpu": cpu, "load_1m": {"start": cpu["load_1m"], "end": cpu_info()["load_1m"]},
        "torch": torch.__version__, "python": platform.python_version(),
        "model": model, "constant_ms": constant, "raw_constant_ms": raw_constant, "scale": scale,
        "layers": [{"name": n, "signature": sig[n], "int8_ms": float(t8[i]), "float_ms": float(tf[i]),
                    "float_model_ms": float(tf_model[i])} for i, n in enumerate(names)],
        "signatures": list(per_sig.values()),
        "validation": rows,
        "validation_timing": {"repeat": r["repeat"], "load_1m": [r["load_1m_before"], r["load_1m_after"]]},
        "max_abs_error_mixed": max((abs(w["error"]) for w in held), default=None),
        "mean_abs_error_mixed": statistics.fmean(abs(w["error"]) for w in held) if held else None,
        "max_abs_error": max(abs(w["error"]) for w in rows),
        "max_abs_error_mixed_by_model": {m: max((abs(w[f"error_{m}"]) for w in held), default=None) for m in models},
        "warnings": warns,
        "seconds": {"layers": layers_s, "total": time.perf_counter() - t_start},
    }
    return LatencyTable(names, menu, table, float(constant), record)


class InductorLatency:
    """The ``"inductor"`` latency runtime: PyTorch's x86 int8 path, as a pt2 file runs."""

    @staticmethod
    def require() -> None:
        """One-line ``ConfigError`` unless inductor's int8 lowering (torchao) is installed."""
        from .runtimes.inductor import InductorRuntime

        try:
            InductorRuntime().require()
        except ExportError:
            rt = InductorRuntime
            raise ConfigError(f"a latency-ms budget times layers in the deploy runtime (inductor), which needs the "
                              f"package {rt.package}, not installed: pip install 'evolq[{rt.extra}]'") from None

    measure = staticmethod(measure_latency_table)


register_latency_runtime("inductor", InductorLatency)
