"""The deterministic work split of one generation over the actors: ``split_work`` (contiguous
pieces, each a multiple of ``piece_multiple`` solutions, so an actor's chunks are the in-process
chunks) and ``split_weighted`` (pieces of about equal estimated cost). The same inputs always
give the same split.
"""
from __future__ import annotations

import math

__all__ = ["split_work", "split_weighted"]


def split_work(n: int, actors: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Contiguous ranges ``(start, stop)`` covering ``0..n``, at most one per actor, each starting
    at a multiple of ``multiple`` (so a piece's chunks of ``multiple`` are the chunks the whole
    batch has), as even as that allows. The same inputs always give the same split."""
    multiple = max(1, int(multiple))
    groups = math.ceil(n / multiple)
    k = max(1, min(actors, groups))
    base, extra = divmod(groups, k)
    out, g0 = [], 0
    for i in range(k):
        g = base + (i < extra)
        if g:
            out.append((g0 * multiple, min(n, (g0 + g) * multiple)))
        g0 += g
    return out


def split_weighted(weights, actors: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``(start, stop)`` covering the rows of ``weights`` (each row's estimated
    cost), at most one per actor, of about equal total cost: the cuts fall where the running total
    crosses ``i / k`` of the whole. The same inputs always give the same split."""
    w = [max(0.0, float(v)) for v in weights]
    n = len(w)
    k = max(1, min(actors, n))
    total = sum(w)
    if n == 0:
        return []
    if total <= 0:
        return split_work(n, k)
    cuts, run = [0], 0.0
    for piece in range(1, k):
        target, i = total * piece / k, cuts[-1]
        run += w[i]  # every piece holds at least one row
        i += 1
        while i < n - (k - piece) and run + w[i] / 2 < target:  # a row goes where most of it falls
            run += w[i]
            i += 1
        cuts.append(i)
    bounds = cuts + [n]
    return list(zip(bounds, bounds[1:]))
