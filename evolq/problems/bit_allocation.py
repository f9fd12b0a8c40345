"""``BitAllocationProblem``: per-layer bit widths as a multi-objective EvoTorch ``Problem``.

One integer gene per layer, an index into that layer's options (``evolq.problems.menu``:
widths such as {2, 3, 4, 8}, optionally "float"), cheapest first. The objectives, minimised
together:

* ``quality``: a batched loss of allocations, ``(P, L) genes -> (P,)`` (the library's
  ``AllocationFitness``: a forward against cached float outputs), and
* one or more additive *costs*, ``sum_l table[l, gene_l] + constant``: the packed size in
  bytes, and optionally a latency from a per-layer table.

One cost carries the **budget**: no allocation above it is ever evaluated. Before a batch is
evaluated, every candidate over the budget is *repaired*: genes step down to a cheaper option,
the step with the least ``priority`` increase per unit of cost saved first (``priority`` is a
per-layer, per-option score such as a sensitivity; by default the largest saving goes first),
until the candidate fits. The repaired genes replace the candidate's, so the searcher sees
what was evaluated. Below ``floor`` a cost no longer improves (the objective is clipped
there): the front concentrates between ``floor`` and the budget.

Like ``BlockScaleProblem`` it knows nothing about the model behind the quality callable, so it
serves ViTs, CNNs, LSTMs and GNNs alike. NaN/inf losses become ``penalty`` (EvoTorch's sorting
cannot take NaN). Every evaluated allocation is recorded in ``archive`` on the main process
(genes -> objective values), from which the engine takes its Pareto front.

On Ray actors (``placement=``, ``evolq.scaleout``): the quality callable goes to Ray's object
store once and each actor loads it once (for ``AllocationFitness``: the proxy model, its
weight tables, the fitness inputs and their float outputs); a generation then sends only the
genes of the allocations the driver has not evaluated yet (the quality's memo stays on the
driver when it takes ``compute=``, as ``AllocationFitness`` does) and receives their losses.
The repair (``before_eval_hook``), the costs, the archive (``after_eval_hook``), the random
generator and so ``evaluations`` stay on the driver: the same in one process or on actors.

**Lower fidelities** (``sample_losses``, for the staged searchers of ``evolq.search.staged``):
a quality that takes ``sample=`` (image indices; ``AllocationFitness``) scores allocations on
part of its images. Those scores never enter the archive or the front (they are not the
fitness) and are never asked of an allocation over the budget. On actors the sample travels
with the genes, as indices appended to each row: the driver draws it, the actors only use it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .._evotorch import evotorch
from ..scaleout import ActorProblem, Placement
from .block_scale import PENALTY

__all__ = ["BitAllocationProblem", "Cost", "pareto_front"]


class Cost:
    """An additive cost: ``table`` (L, M) per layer and option, plus ``constant``; ``floor``: the
    value below which it no longer improves (0: never clipped); ``objective``: minimised beside
    the loss (else only a budget's constraint, e.g. the mean bits when the size is the objective)."""

    def __init__(self, name: str, table: torch.Tensor, constant: float = 0.0, floor: float = 0.0,
                 objective: bool = True):
        self.name = name
        self.table = torch.as_tensor(table, dtype=torch.float64)
        self.constant, self.floor, self.objective = float(constant), float(floor), bool(objective)

    def __call__(self, genes: torch.Tensor) -> torch.Tensor:
        g = genes.long().reshape(-1, self.table.shape[0])
        return self.table.gather(1, g.T).sum(0) + self.constant

    def range(self, allowed: torch.Tensor) -> tuple[float, float]:
        t = self.table.masked_fill(~allowed, float("inf"))
        lo = float(t.min(1).values.sum()) + self.constant
        t = self.table.masked_fill(~allowed, float("-inf"))
        return lo, float(t.max(1).values.sum()) + self.constant


def pareto_front(points: torch.Tensor) -> torch.Tensor:
    """Indices of the non-dominated rows of ``points`` (N, objectives), all minimised; ties kept once."""
    n = points.shape[0]
    keep = []
    for i in range(n):
        p = points[i]
        dominated = ((points <= p).all(1) & (points < p).any(1)).any()
        dup = any(bool((points[j] == p).all()) for j in keep)
        if not bool(dominated) and not dup:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


class BitAllocationProblem(ActorProblem, evotorch.Problem):
    """Minimise ``[quality, *costs]`` over one option index per layer, under ``budget``.

    Args:
        quality: batched loss ``(P, L) long -> (P,)``.
        costs: the additive costs (at least one); ``budget_cost`` names the constrained one.
        budget: the largest allowed value of that cost.
        allowed: (L, M) bool, the options each layer may take (default: all).
        priority: (L, M) repair priority (lower means cheaper to take); default zeros.
        seeds: allocations (K, L) that start the population (the rest is random).
        affinity: on Ray actors, send each allocation to the actor whose cache holds most of its
            block prefix (the quality's ``route(genes, actors)``, e.g. ``AllocationFitness.route``)
            instead of contiguous pieces of equal work; the losses are the same either way.
        penalty: objective value of a NaN/inf loss.
        seed: the problem's random generator seed (initial population, operators).
        placement: Ray actors for the quality (``evolq.scaleout.connect``); None: this process.
        **problem_kwargs: further EvoTorch ``Problem`` arguments.
    """

    driver_only = ("quality", "archive")  # the quality reaches actors through the object store

    def __init__(self, quality: Callable[[torch.Tensor], torch.Tensor], costs: list[Cost], budget: float, *,
                 budget_cost: str | None = None, allowed: torch.Tensor | None = None,
                 priority: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
                 penalty: float = PENALTY, seed: int | None = None, placement: Placement | None = None,
                 affinity: bool = True, **problem_kwargs):
        if not costs:
            raise ValueError("a bit allocation needs at least one cost (the size)")
        self.costs = list(costs)
        n_layers, n_options = self.costs[0].table.shape
        self.quality, self.penalty, self.budget = quality, float(penalty), float(budget)
        self.affinity = bool(affinity)  # on actors: route by the quality's cached prefixes (its ``route``)
        names = [c.name for c in self.costs]
        self.budget_index = names.index(budget_cost) if budget_cost is not None else 0
        self.allowed = torch.ones(n_layers, n_options, dtype=torch.bool) if allowed is None else allowed.bool()
        if not bool(self.allowed.any(1).all()):
            raise ValueError("every layer needs at least one allowed option")
        self.priority = torch.zeros(n_layers, n_options, dtype=torch.float64) if priority is None \
            else torch.as_tensor(priority, dtype=torch.float64)
        lo, _ = self.costs[self.budget_index].range(self.allowed)
        if lo > self.budget:
            raise ValueError(f"the smallest allocation costs {lo:g}, above the budget {self.budget:g}")
        self.seeds = None if seeds is None else torch.as_tensor(seeds).long().reshape(-1, n_layers)
        self.archive: dict[tuple, tuple] = {}
        self.repairs = 0
        self._constrained = True
        self.objective_costs = [c for c in self.costs if c.objective]
        try:
            self._computes = "compute" in inspect.signature(quality).parameters
        except (TypeError, ValueError):  # a callable without a signature
            self._computes = False
        super().__init__(["min"] * (1 + len(self.objective_costs)), solution_length=n_layers, dtype=torch.int64,
                         bounds=(0, n_options - 1), eval_dtype=torch.float64, seed=seed, placement=placement,
                         **problem_kwargs)
        self.quality = quality
        self.share("quality", quality)
        self.before_eval_hook.append(self._repair_batch)
        self.after_eval_hook.append(self._record)

    @property
    def evaluations(self) -> int:
        """Distinct allocations evaluated so far (the search budget's unit; memoised repeats are free)."""
        return len(self.archive)

    @property
    def n_layers(self) -> int:
        return self.allowed.shape[0]

    @property
    def fitness_images(self) -> int | None:
        """The quality's images (its ``n_images``) when it can score a sample of them, else None."""
        n = getattr(self.quality, "n_images", None)
        try:
            takes = "sample" in inspect.signature(self.quality).parameters
        except (TypeError, ValueError):
            takes = False
        return int(n) if n is not None and takes else None

    def sample_losses(self, genes: torch.Tensor, sample) -> tuple[torch.Tensor, int]:
        """(Driver) the losses (P,) of allocations ``genes`` (P, L) on the fitness images ``sample``
        (sorted indices), NaN/inf as ``penalty``, and how many the quality computed (its memo
        misses). Not archived; every allocation must be within the budget (a ``ValueError`` if not:
        a searcher's bug, never repaired here)."""
        genes = torch.as_tensor(genes).long().reshape(-1, self.n_layers)
        cost = self.costs[self.budget_index](genes)
        if bool((cost > self.budget).any()):
            raise ValueError(f"an allocation over the budget was sent to the staged fitness "
                             f"({float(cost.max()):g} > {self.budget:g})")
        sample = torch.as_tensor(sample).long().reshape(-1)
        if self._actors is None:
            losses = self.quality(genes, sample=sample)
        else:
            losses = self.quality(genes, sample=sample, compute=lambda todo: self._actor_sample_losses(todo, sample))
        losses = torch.nan_to_num(torch.as_tensor(losses, dtype=torch.float64).reshape(-1), nan=self.penalty,
                                  posinf=self.penalty, neginf=self.penalty).clamp(-self.penalty, self.penalty)
        return losses, int(getattr(self.quality, "last_computed", genes.shape[0]))

    # -- feasibility -----------------------------------------------------------------
    def _moves(self, genes: torch.Tensor):
        """For one allocation: (layer, cheaper option, score) of every single downward step."""
        c = self.costs[self.budget_index].table
        out = []
        for layer in range(self.n_layers):
            k = int(genes[layer])
            cheaper = [j for j in range(self.allowed.shape[1]) if self.allowed[layer, j] and c[layer, j] < c[layer, k]]
            if not cheaper:
                continue
            # the next cheaper option; among equally cheap ones (the integer widths of a latency
            # table) the one whose priority grows least, then the widest
            j = max(cheaper, key=lambda j: (float(c[layer, j]), -float(self.priority[layer, j]), j))
            saved = float(c[layer, k] - c[layer, j])
            out.append((float(self.priority[layer, j] - self.priority[layer, k]) / saved, -saved, layer, j))
        return out

    def repair(self, genes: torch.Tensor) -> torch.Tensor:
        """``genes`` (P, L) with every allocation over the budget stepped down until it fits, and
        options a layer may not take replaced by its nearest allowed one."""
        genes = genes.clone().long().reshape(-1, self.n_layers)
        cost = self.costs[self.budget_index]
        c = cost.table
        for p in range(genes.shape[0]):
            g = genes[p]
            for layer in range(self.n_layers):
                if not self.allowed[layer, int(g[layer])]:
                    ok = torch.nonzero(self.allowed[layer]).flatten()
                    g[layer] = ok[torch.argmin((c[layer, ok] - c[layer, int(g[layer])]).abs())]
            total = float(cost(g)[0])
            while total > self.budget:
                moves = self._moves(g)
                score, neg_saved, layer, j = min(moves)
                g[layer] = j
                total += neg_saved
                self.repairs += 1
        return genes

    @contextmanager
    def constrained(self, on: bool = True):
        """With ``on`` false, allocations over the budget are evaluated as they are (a sensitivity
        measurement, a greedy descent from above the budget); they never enter the front."""
        saved, self._constrained = self._constrained, bool(on)
        try:
            yield self
        finally:
            self._constrained = saved

    def _repair_batch(self, batch) -> None:
        if not self._constrained:
            return
        values = batch.values.as_subclass(torch.Tensor)
        fixed = self.repair(values)
        if not torch.equal(fixed, values.long()):
            batch.access_values(keep_evals=True)[:] = fixed.to(values.dtype)

    # -- initial population --------------------------------------------------------
    def _fill(self, values: torch.Tensor) -> None:
        n = values.shape[0]
        k = 0 if self.seeds is None else min(n, self.seeds.shape[0])
        if k:
            values[:k] = self.seeds[:k].to(values)
        if n > k:
            self.fill_random(values[k:])

    def fill_random(self, values: torch.Tensor) -> None:
        """Fill ``values`` (P, L) with options drawn uniformly among each layer's allowed ones."""
        u = self.make_uniform((values.shape[0], self.n_layers), dtype=torch.float64, device=values.device)
        counts = self.allowed.sum(1).to(u)
        idx = torch.clamp((u * counts).long(), max=counts.long() - 1)
        opts = [torch.nonzero(self.allowed[layer]).flatten() for layer in range(self.n_layers)]
        values[:] = torch.stack([opts[layer][idx[:, layer]] for layer in range(self.n_layers)], dim=1).to(values)

    def sensitivity(self, reference: torch.Tensor) -> torch.Tensor:
        """(L, M) loss change of moving one layer of ``reference`` to each allowed option, the others
        kept (0 at the reference's own option, +inf where not allowed): the additive model of the
        ILP baseline, the repair order and the greedy ranking. Costs L * (M - 1) evaluations."""
        reference = torch.as_tensor(reference).long().reshape(-1)
        variants, where = [reference.clone()], []
        for layer in range(self.n_layers):
            for j in range(self.allowed.shape[1]):
                if self.allowed[layer, j] and j != int(reference[layer]):
                    g = reference.clone()
                    g[layer] = j
                    variants.append(g)
                    where.append((layer, j))
        batch = self.generate_batch(len(variants))
        batch.set_values(torch.stack(variants))
        with self.constrained(False):
            self.evaluate(batch)
        losses = batch.evals.as_subclass(torch.Tensor)[:, 0]
        sens = torch.full(self.allowed.shape, float("inf"), dtype=torch.float64)
        sens[torch.arange(self.n_layers), reference] = 0.0
        for (layer, j), v in zip(where, losses[1:].tolist()):
            sens[layer, j] = v - float(losses[0])
        return sens

    # -- evaluation --------------------------------------------------------------------
    def objectives(self, genes: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(P, 1 + costs) objective values: the losses (NaN/inf as ``penalty``) and the clipped costs."""
        losses = torch.nan_to_num(torch.as_tensor(losses, dtype=torch.float64).reshape(-1), nan=self.penalty,
                                  posinf=self.penalty, neginf=self.penalty).clamp(-self.penalty, self.penalty)
        cols = [losses] + [c(genes).clamp_min(c.floor) for c in self.objective_costs]
        return torch.stack(cols, dim=1)

    def _evaluate_batch(self, batch) -> None:  # in this process, or on an actor
        genes = batch.values.as_subclass(torch.Tensor).long()
        batch.set_evals(self.objectives(genes, self.quality(genes)))

    # -- on Ray actors ---------------------------------------------------------------------
    def _prepare(self) -> None:
        self.quality = self.shared("quality")  # this process: the object itself; an actor: loaded once

    def _evaluate_all(self, batch) -> None:
        if self._actors is None:  # in this process, or on an actor
            return super()._evaluate_all(batch)
        genes = batch.values.as_subclass(torch.Tensor).long()
        if self._computes:  # the quality's memo decides what is new; the actors compute only that
            losses = self.quality(genes, compute=self._actor_losses)
        else:
            losses = self._actor_losses(genes)
        batch.set_evals(self.objectives(genes, losses))

    def _actor_losses(self, genes: torch.Tensor) -> torch.Tensor:
        """(Driver) the losses of ``genes`` (P, L), computed by the actors."""
        return self._map_losses("_losses_here", genes, genes.long())

    def _losses_here(self, genes: torch.Tensor) -> torch.Tensor:
        """(Actor) the losses of ``genes`` by this actor's quality (its own memo and caches)."""
        return torch.as_tensor(self.quality(genes), dtype=torch.float64).reshape(-1)

    def _actor_sample_losses(self, genes: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """(Driver) the losses of ``genes`` on ``sample``, computed by the actors: each row is the genes
        followed by the sample's indices, so a piece carries its sample."""
        rows = torch.cat([genes.long(), sample.long()[None].expand(genes.shape[0], -1)], 1)
        return self._map_losses("_sample_losses_here", genes, rows, sample)

    def _map_losses(self, method: str, genes: torch.Tensor, rows: torch.Tensor, sample=None) -> torch.Tensor:
        """(Driver) ``method`` on the actors over ``rows`` (one per allocation of ``genes``): with
        ``affinity``, each allocation to the actor whose cache holds most of its prefix (the quality's
        ``route``); else contiguous pieces of equal work (its ``work``: the blocks each one runs)."""
        if genes.shape[0] == 0:
            return torch.empty(0, dtype=torch.float64)
        route = getattr(self.quality, "route", None) if self.affinity else None
        if route is not None:
            return self.map_rows(method, rows, assign=route(genes, len(self._actors), sample=sample)).reshape(-1)
        work = getattr(self.quality, "work", None)
        return self.map_rows(method, rows, weights=work(genes) if work else None).reshape(-1)

    def _sample_losses_here(self, rows: torch.Tensor) -> torch.Tensor:
        """(Actor) the losses of the genes of ``rows`` on the sample the rows carry."""
        genes, sample = rows[:, : self.n_layers], rows[0, self.n_layers:]
        return torch.as_tensor(self.quality(genes, sample=sample), dtype=torch.float64).reshape(-1)

    def actor_counters(self) -> dict:
        """(Driver) the quality's ``counters()`` summed over the live actors ({} in this process); the counts
        of an actor that died are gone with it (a work figure, not part of the result)."""
        out: dict = {}
        for c in self.call_actors("_counters_here"):
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    def _counters_here(self) -> dict:
        f = getattr(self.quality, "counters", None)
        return f() if f is not None else {}

    def _record(self, batch) -> None:
        genes = batch.values.as_subclass(torch.Tensor).long()
        evals = batch.evals.as_subclass(torch.Tensor)
        for g, e in zip(genes, evals):
            key = tuple(int(v) for v in g)
            if key not in self.archive:
                raw = [float(e[0])] + [float(c(g)[0]) for c in self.costs]
                self.archive[key] = tuple(raw)

    def front(self, under_budget: bool = True) -> list[tuple[tuple, tuple]]:
        """The archive's non-dominated allocations (by loss and the objective costs, unclipped),
        cheapest first; values are ``(loss, *every cost)``."""
        items = [(k, v) for k, v in self.archive.items() if not under_budget or v[1 + self.budget_index] <= self.budget]
        if not items:
            return []
        cols = [0] + [1 + i for i, c in enumerate(self.costs) if c.objective]
        pts = torch.tensor([[v[i] for i in cols] for _, v in items], dtype=torch.float64)
        idx = pareto_front(pts)
        out = [items[i] for i in idx.tolist()]
        return sorted(out, key=lambda kv: kv[1][1:])
