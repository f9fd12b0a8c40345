"""Cache affinity on Ray actors: which actor computes which allocation of a generation.

Each actor keeps its own prefix-activation cache (``AllocationFitness``): an allocation runs only
the blocks after the deepest block prefix the actor has already computed. Contiguous pieces of
the sorted batch keep neighbours together within one generation, but the next generation's
children land wherever the split puts them, so each actor recomputes prefixes that another one
holds. ``PrefixRouter`` remembers, per actor, the prefixes it sent there (a bounded LRU mirroring
the actor's cache) and routes each allocation of the next batch, in the batch's order, to the
actor where it is cheapest (the fewest blocks to run, its batch neighbour's prefix counted
too), as long as that actor's load stays within ``slack`` of an even share; otherwise to the
least-loaded actor. Where an allocation runs never changes its loss (every block runs on fixed
chunks), so routing changes only the time: the same seed gives the same result at any actor
count, routed or not.
"""
from __future__ import annotations

from collections import OrderedDict

__all__ = ["PrefixRouter"]


class PrefixRouter:
    """Routes allocations to actors by the block prefixes their caches hold.

    Args:
        n_blocks: blocks of the model (an allocation without any cached prefix runs all of them).
        capacity: prefixes remembered per actor (the actor's cache holds about as many).
        slack: an actor takes an allocation where it is cheapest while its load stays under
            ``(1 + slack)`` times an even share of the batch's estimated work.
    """

    def __init__(self, n_blocks: int, capacity: int = 4096, slack: float = 0.15):
        self.n_blocks = int(n_blocks)
        self.capacity = max(1, int(capacity))
        self.slack = float(slack)
        self.held: list[OrderedDict] = []

    def _depth(self, held: OrderedDict, ks: list) -> int:
        """The deepest block whose input ``held`` has for these keys (0: none)."""
        for j in range(len(ks), 0, -1):
            if ks[j - 1] in held:
                return j
        return 0

    def _hold(self, held: OrderedDict, ks: list) -> None:
        for k in ks:
            held[k] = None
            held.move_to_end(k)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def route(self, rows: list[list], actors: int) -> list[int]:
        """The actor index of each allocation, taken in order; ``rows``: per allocation the cache keys
        of its block inputs 1..n_blocks-1 (index ``j - 1`` for block ``j``), the prefixes an actor
        holds once it has run it."""
        if len(self.held) != actors:
            self.held = [OrderedDict() for _ in range(actors)]
        nb = self.n_blocks
        # estimated work: the blocks each row runs on the cheapest actor, its neighbour's prefix counted
        est, prev = [], None
        for ks in rows:
            d = max(self._depth(h, ks) for h in self.held)
            if prev is not None:
                d = max(d, next((j for j in range(len(ks), 0, -1) if ks[j - 1] == prev[j - 1]), 0))
            est.append(nb - d)
            prev = ks
        cap = (1 + self.slack) * sum(est) / max(1, actors)
        loads = [0.0] * actors
        out = []
        for ks in rows:
            cost = [nb - self._depth(h, ks) for h in self.held]
            fits = [a for a in range(actors) if loads[a] + cost[a] <= cap]
            a = min(fits, key=lambda i: (cost[i], loads[i], i)) if fits else \
                min(range(actors), key=lambda i: (loads[i] + cost[i], i))
            loads[a] += cost[a]
            self._hold(self.held[a], ks)
            out.append(a)
        return out
