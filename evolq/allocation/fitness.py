"""The bit-allocation fitness: a candidate allocation's loss against cached float outputs.

A candidate is a vector of option indices, one per quantized layer (``WeightTables`` gene
order). Evaluating it swaps the layers' table weights in and runs the calibration subset
through the model's blocks; the loss (KL by default, any ``evolq.losses`` loss) compares the
output with the float model's, computed once.

What does not change is not recomputed:

* the float outputs (once);
* each distinct allocation's loss (memoised: a searcher that proposes an allocation twice
  pays once);
* the activations entering block b depend only on the options of the layers before it, so
  they are cached (LRU, ``cache_mb``) under that prefix and a candidate runs only from the
  deepest cached block on. Candidates of one call are evaluated in lexicographic order of
  their genes, so those that share a prefix (children of one parent, one-point crossovers)
  run the shared part once.

Every block runs on fixed chunks of ``chunk`` images, cached or not, so a candidate's loss
is bit-identical whatever else is evaluated with it, in whatever order, and whatever the
cache holds: on one process or split over Ray actors (``compute=``, below), each with its own
cache, the losses are the same.

**Fidelities** (the staged fitness, ``evolq.search.staged``): ``fitness(genes, sample=idx)``
scores allocations on the fitness images ``idx`` only (a sorted subset of ``range(n_images)``,
drawn by the searcher's seed; never hold-out or evaluation images, which this object does not
hold). The prefix cache and the memo are keyed by the sample too, so a loss on a sample is as
bit-identical as a full one; ``sample=None`` (or every image) is the full fitness, its memo
and counts unchanged. The sampled memo keeps the last ``sample_memos`` samples and is emptied
by ``clear_samples()`` (a staged searcher calls it at each generation's start, so a resumed
run holds what an uninterrupted one holds); sampled work is counted apart
(``sample_evaluations``, ``sample_images``: images seen by computed sampled allocations).

On Ray actors (``BitAllocationProblem(placement=...)``) the driver's fitness keeps the memo
and the counts, and hands the allocations it has not seen to ``compute`` (the actors, each
with a copy of this object loaded once: pickling drops the cache, the memo and the progress
callbacks).
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from ..losses import LOSSES
from ..quant import Quantizer
from .tables import WeightTables

__all__ = ["AllocationFitness"]


class AllocationFitness:
    """Losses of allocations on ``inputs`` against ``ref`` (float outputs of ``inputs``).

    Args:
        tables: the per-layer, per-option weights (their ``qmodel`` is run).
        inputs: fitness inputs (N, ...).
        ref: float outputs of ``inputs`` (N, K); computed when None.
        loss: a registered loss name (``"kl"`` default) or ``fn(out (P, N, K), ref (N, K)) -> (P,)``.
        chunk: images per block forward.
        cache_mb: memory for cached block inputs.
    """

    sample_memos = 16  # samples whose memo is kept (a staged generation uses one per stage)

    def __init__(self, tables: WeightTables, inputs: torch.Tensor, ref: torch.Tensor | None = None, loss="kl",
                 chunk: int = 32, cache_mb: float = 1024.0):
        self.tables, self.qmodel = tables, tables.qmodel
        self.inputs = inputs
        self.loss = LOSSES.get(loss) if isinstance(loss, str) else loss
        self.chunk = max(1, int(chunk))
        self.cache_bytes = int(cache_mb * 2**20)
        blocks = self.qmodel.blocks
        owner = {}
        for b, blk in enumerate(blocks):
            for q in blk.quantizers.values():
                owner.setdefault(id(q), b)
        mods = tables._mods
        # the block that runs each layer (0, i.e. "changes everything", when no block owns its quantizer)
        self.block_of = [owner.get(id(mods[n].weight_quant), 0) if isinstance(mods[n].weight_quant, Quantizer)
                         else 0 for n in tables.layers]
        self.layers_of = [[i for i, b in enumerate(self.block_of) if b == j] for j in range(len(blocks))]
        self.prefix_len = [sum(1 for b in self.block_of if b < j) for j in range(len(blocks) + 1)]
        order = sorted(range(len(tables.layers)), key=lambda i: (self.block_of[i], i))
        self.order = torch.tensor(order)  # genes in block order: the prefix of block j is order[:prefix_len[j]]
        self.ref = ref if ref is not None else self._float_outputs()
        self.memo: dict[tuple, float] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self.evaluations = 0  # allocations whose loss was computed (memo misses)
        self.requests = 0  # allocations asked for
        self.blocks_run = 0
        self.blocks_full = 0  # blocks a run without any cache would have run
        self.seconds = 0.0
        self._sample_memo: OrderedDict = OrderedDict()  # sample key -> {genes: loss}
        self.sample_evaluations = 0  # allocations computed on a sample (memo misses)
        self.sample_images = 0  # images those computations saw
        self.last_computed = 0  # allocations the last call computed (memo misses)
        self.on_evaluation: list = []  # callables f(fitness) after each computed allocation (progress bars)
        self._router = None  # the driver's PrefixRouter on Ray actors (``route``)

    @property
    def n_images(self) -> int:
        """The fitness images (the largest fidelity)."""
        return int(self.inputs.shape[0])

    @torch.no_grad()
    def _float_outputs(self) -> torch.Tensor:
        from ..fitness import reference_outputs

        return reference_outputs(self.qmodel, self.inputs, self.chunk)

    def _key(self, genes_sorted: tuple, j: int, sample: tuple | None = None) -> tuple:
        if sample is None:
            return j, genes_sorted[: self.prefix_len[j]]
        return sample, j, genes_sorted[: self.prefix_len[j]]

    def sample_key(self, sample) -> tuple | None:
        """The memo and cache key of ``sample`` (image indices); None for the full fitness."""
        if sample is None:
            return None
        idx = tuple(int(i) for i in torch.as_tensor(sample).long().reshape(-1).tolist())
        n = self.n_images
        if not idx or any(not 0 <= i < n for i in idx):
            raise ValueError(f"a fitness sample holds indices in 0..{n - 1}, got {list(idx)[:8]}")
        if len(set(idx)) != len(idx) or list(idx) != sorted(idx):
            raise ValueError("a fitness sample is a sorted set of distinct image indices")
        return None if len(idx) == n else idx

    def _get(self, key):
        x = self._cache.get(key)
        if x is not None:
            self._cache.move_to_end(key)
        return x

    def _put(self, key, x: torch.Tensor) -> None:
        if key in self._cache:
            return
        n = x.numel() * x.element_size()
        if n > self.cache_bytes:
            return
        self._cache[key] = x
        self._cached += n
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached = 0

    def clear_samples(self) -> None:
        """Forget the sampled memo and the sampled prefixes (the full fitness's are kept)."""
        self._sample_memo.clear()
        for k in [k for k in self._cache if len(k) == 3]:
            x = self._cache.pop(k)
            self._cached -= x.numel() * x.element_size()

    @torch.no_grad()
    def _run_block(self, j: int, x: torch.Tensor) -> torch.Tensor:
        run = self.qmodel.blocks[j].run
        outs = [run(x[i:i + self.chunk]) for i in range(0, x.shape[0], self.chunk)]
        return torch.cat(outs)

    @torch.no_grad()
    def _compute(self, genes: torch.Tensor, sample: tuple | None = None) -> float:
        gs = tuple(int(v) for v in genes[self.order])
        nb = len(self.qmodel.blocks)
        if sample is None:
            x0, ref = self.inputs, self.ref
        else:
            idx = torch.tensor(sample, dtype=torch.long)
            x0, ref = self.inputs[idx], self.ref[idx]
        start, x = 0, x0
        for j in range(nb - 1, 0, -1):
            hit = self._get(self._key(gs, j, sample))
            if hit is not None:
                start, x = j, hit
                break
        self.tables.set(genes)
        for j in range(start, nb):
            x = self._run_block(j, x)
            if j + 1 < nb:
                self._put(self._key(gs, j + 1, sample), x)
        self.blocks_run += nb - start
        self.blocks_full += nb
        return float(self.loss(x.float().unsqueeze(0), ref)[0])

    def work(self, genes: torch.Tensor) -> list[float]:
        """The blocks each allocation of ``genes`` (P, layers), computed in this order, would run:
        all of them for the first, then those after the first block whose prefix differs from the
        allocation before it (the cache holds that one). The cost estimate that splits a batch over
        Ray actors into pieces of equal work."""
        nb = len(self.qmodel.blocks)
        out, prev = [], None
        for g in torch.as_tensor(genes).long().reshape(-1, len(self.tables.layers)):
            gs = tuple(int(v) for v in g[self.order])
            start = 0
            if prev is not None:
                start = next((j for j in range(nb - 1, 0, -1) if gs[:self.prefix_len[j]] == prev[:self.prefix_len[j]]),
                             0)
            out.append(float(nb - start))
            prev = gs
        return out

    def prefix_keys(self, genes, sample=None) -> list:
        """The cache keys of the inputs of blocks 1..n-1 when allocation ``genes`` (layers,) runs
        (on ``sample``: image indices, None for the full fitness)."""
        skey = self.sample_key(sample)
        gs = tuple(int(v) for v in torch.as_tensor(genes).long()[self.order])
        return [self._key(gs, j, skey) for j in range(1, len(self.qmodel.blocks))]

    @torch.no_grad()
    def route(self, genes: torch.Tensor, actors: int, sample=None) -> list[int]:
        """The actor of each allocation of ``genes`` (P, layers) (on ``sample``), by the prefixes
        each actor's cache holds (``evolq.allocation.affinity.PrefixRouter``: the driver's router
        remembers what it sent where)."""
        if self._router is None:
            from .affinity import PrefixRouter

            one = self.qmodel.blocks[0].run(self.inputs[:1])  # a block input's size, per image
            entry = max(1, one.numel() * one.element_size() * self.inputs.shape[0])
            self._router = PrefixRouter(len(self.qmodel.blocks), capacity=max(1, self.cache_bytes // entry))
        keys = [self.prefix_keys(g, sample) for g in torch.as_tensor(genes).long()]
        return self._router.route(keys, actors)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(memo={}, _cache=OrderedDict(), _cached=0, on_evaluation=[], _sample_memo=OrderedDict(),
                     _router=None)
        return state

    def __call__(self, genes: torch.Tensor, compute=None, sample=None) -> torch.Tensor:
        """Losses (P,) float64 of allocations ``genes`` (P, layers) (option indices).

        ``compute``: ``f(todo (Q, layers)) -> (Q,)`` computes the allocations the memo does not
        hold (in block order, so neighbours share prefixes) instead of this process (Ray actors);
        the memo and the counts stay here. ``sample``: the fitness images to score on (sorted
        indices; None: all of them), see the module docstring."""
        skey = self.sample_key(sample)
        if skey is not None:
            return self._sampled(genes, compute, skey)
        t0 = time.perf_counter()
        genes = torch.as_tensor(genes).long().reshape(-1, len(self.tables.layers))
        keys = [tuple(int(v) for v in g) for g in genes]
        self.requests += len(keys)
        todo = sorted({k for k in keys if k not in self.memo}, key=lambda k: tuple(k[i] for i in self.order))
        self.last_computed = len(todo)
        if todo and compute is not None:
            losses = compute(torch.tensor(todo, dtype=torch.long)).tolist()
            for k, v in zip(todo, losses):
                self.memo[k] = float(v)
                self.evaluations += 1
                for f in self.on_evaluation:
                    f(self)
        elif todo:
            with self.tables.installed():
                for k in todo:
                    self.memo[k] = self._compute(torch.tensor(k))
                    self.evaluations += 1
                    for f in self.on_evaluation:
                        f(self)
        self.seconds += time.perf_counter() - t0
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float64)

    def _sampled(self, genes, compute, skey: tuple) -> torch.Tensor:
        """``__call__`` on the sample ``skey``: its own memo; counted in ``sample_*``."""
        t0 = time.perf_counter()
        genes = torch.as_tensor(genes).long().reshape(-1, len(self.tables.layers))
        keys = [tuple(int(v) for v in g) for g in genes]
        memo = self._sample_memo.get(skey)
        if memo is None:
            memo = self._sample_memo[skey] = {}
            while len(self._sample_memo) > self.sample_memos:
                self._sample_memo.popitem(last=False)
        else:
            self._sample_memo.move_to_end(skey)
        todo = sorted({k for k in keys if k not in memo}, key=lambda k: tuple(k[i] for i in self.order))
        self.last_computed = len(todo)
        if todo and compute is not None:
            for k, v in zip(todo, compute(torch.tensor(todo, dtype=torch.long)).tolist()):
                memo[k] = float(v)
        elif todo:
            with self.tables.installed():
                for k in todo:
                    memo[k] = self._compute(torch.tensor(k), skey)
        self.sample_evaluations += len(todo)
        self.sample_images += len(todo) * len(skey)
        self.seconds += time.perf_counter() - t0
        return torch.tensor([memo[k] for k in keys], dtype=torch.float64)

    def counters(self) -> dict:
        """The work counts of this process (an actor's share, summed by the driver)."""
        return {"blocks_run": self.blocks_run, "blocks_full": self.blocks_full, "computed": self.evaluations}

    def stats(self, actors: dict | None = None) -> dict:
        """Evaluations, requests, block reuse and time; ``actors``: the actors' summed ``counters()``
        (their block counts replace this process's, which then computed nothing)."""
        run, full = (actors.get("blocks_run", 0), actors.get("blocks_full", 0)) if actors else \
            (self.blocks_run, self.blocks_full)
        return {"evaluations": self.evaluations, "requests": self.requests, "blocks_run": run, "blocks_full": full,
                "block_reuse": 1 - run / full if full else 0.0, "seconds": self.seconds,
                "evaluations_per_s": self.evaluations / self.seconds if self.seconds else 0.0,
                "sample_evaluations": self.sample_evaluations, "sample_images": self.sample_images}
