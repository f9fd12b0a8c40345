"""Timing an exported model against its float baseline: the machine it ran on (CPU
model, int8 instruction flags, load) and alternating timed pairs with a median ratio.

Every runtime module (``evolq.export.runtimes``) and the peer benchmarks time through
``time_alternating`` so that all speed ratios are measured the same way: warm-up calls,
then ``pairs`` rounds in which each candidate runs once (the order alternates from round
to round, so drift in clock or load hits both sides alike), the ratio
``baseline time / candidate time`` taken within each round, and its median, min and max.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

__all__ = ["INT8_FLAGS", "cpu_info", "time_alternating"]

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """``{"model", "flags"`` (the int8-relevant ones of ``INT8_FLAGS``), ``"cores"``, ``"load_1m"``}``
    from /proc/cpuinfo (Linux) or ``platform``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    return {"model": model, "flags": [f for f in INT8_FLAGS if f in flags], "cores": os.cpu_count(),
            "load_1m": load}


def time_alternating(candidates: dict[str, Callable[[], object]], baseline: str, *, pairs: int = 5,
                     warmup: int = 2, repeat: int = 1) -> dict:
    """Time each callable in ``candidates`` in alternating rounds.

    Each callable runs ``warmup`` times untimed (interleaved), then ``pairs`` rounds; in each round every
    callable runs ``repeat`` times back to back and the round's time is their mean. The order
    within a round alternates (forward, then reversed). Returns, per name, ``{"median_s",
    "min_s", "max_s", "rounds_s"}`` and for every name but ``baseline`` a ``"speedup"`` entry:
    ``{"median", "min", "max"}`` of the per-round ratio ``baseline / name``; plus the load
    average before and after.
    """
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates")
    if pairs < 1 or repeat < 1 or warmup < 0:
        raise ValueError("pairs and repeat must be positive, warmup non-negative")
    names = list(candidates)
    for _ in range(warmup):  # interleaved like the timed rounds: whatever a switch between candidates costs once
        for name in names:   # (a recompile, a cache refill) is paid here
            candidates[name]()
    load_before = cpu_info()["load_1m"]
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(pairs):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = candidates[name]
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            rounds[name].append((time.perf_counter() - t0) / repeat)
    out: dict = {"pairs": pairs, "warmup": warmup, "repeat": repeat, "baseline": baseline,
                 "load_1m_before": load_before, "load_1m_after": cpu_info()["load_1m"], "times": {}, "speedup": {}}
    for name in names:
        ts = rounds[name]
        out["times"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "rounds_s": ts}
        if name != baseline:
            ratios = [b / t for b, t in zip(rounds[baseline], ts)]
            out["speedup"][name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out
