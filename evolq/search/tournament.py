"""The paper's steady-state tournament search as an EvoTorch ``SearchAlgorithm``.

Population: K copies of the start vector, evaluated once (or given a known loss).
Each step is one cycle: sample S members with replacement, the best of them is the
parent, the child is ``abs(parent + U(-eps, eps))`` (the authors' code; ``abs_child
=False`` gives the paper's plain ``parent + U(-eps, eps)``), the child is evaluated
and inserted, and the worst member is dropped (the oldest one among equals).
"""
from __future__ import annotations

import torch
from evotorch.algorithms.searchalgorithm import SearchAlgorithm, SinglePopulationAlgorithmMixin

from .._evotorch import evotorch

__all__ = ["Tournament", "BatchedTournament"]


class Tournament(SearchAlgorithm, SinglePopulationAlgorithmMixin):
    """Steady-state tournament search (Evol-Q, Algorithm 1).

    Args:
        problem: a single-objective EvoTorch problem (minimisation).
        popsize: K, population size.
        samples: S, tournament sample size (with replacement).
        eps: half-width of the uniform mutation.
        center_init: start vector (default: the problem's ``center`` if it has one).
        start_fitness: known loss of the start vector (skips its evaluation).
        abs_child: take the absolute value of children (authors' code).
        seed: seed of the sampling and mutation generator.
    """

    def __init__(self, problem, *, popsize: int = 15, samples: int = 10, eps: float = 1e-3,
                 center_init=None, start_fitness: float | None = None, abs_child: bool = True,
                 seed: int = 0):
        SearchAlgorithm.__init__(self, problem)
        if popsize < 1 or samples < 1 or not eps > 0:
            raise ValueError("popsize and samples must be >= 1 and eps > 0")
        self.popsize, self.samples, self.eps, self.abs_child = int(popsize), int(samples), float(eps), abs_child
        if center_init is None:
            center_init = problem.center
        center = torch.as_tensor(center_init, dtype=problem.dtype).reshape(-1)
        self._population = problem.generate_batch(self.popsize)
        self._population.set_values(center.unsqueeze(0).expand(self.popsize, -1).clone())
        self._start_fitness = start_fitness
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self._age = torch.arange(self.popsize)  # insertion order, for tie-breaking
        self._next_age = self.popsize
        SinglePopulationAlgorithmMixin.__init__(self)

    @property
    def population(self):
        return self._population

    def _initialize(self) -> None:
        pop = self._population
        if self._start_fitness is None:
            first = pop[:1].clone()
            self.problem.evaluate(first)
            f = first.evals[0, 0].item()
        else:
            f = float(self._start_fitness)
        pop.set_evals(torch.full((self.popsize,), f, dtype=pop.evals.dtype))

    def _step(self) -> None:
        pop = self._population
        if torch.isnan(pop.evals).any():
            self._initialize()
        evals = pop.evals[:, 0]
        idx = torch.randint(0, len(pop), (self.samples,), generator=self._gen)
        parent = pop.values[idx[torch.argmin(evals[idx])]]
        noise = (torch.rand(parent.shape, generator=self._gen, dtype=torch.float64) * 2 - 1) * self.eps
        child_vals = parent.double() + noise
        if self.abs_child:
            child_vals = child_vals.abs()
        child = self.problem.generate_batch(1)
        child.set_values(child_vals.to(parent.dtype).unsqueeze(0))
        self.problem.evaluate(child)
        merged = evotorch.SolutionBatch.cat([pop, child])
        ages = torch.cat([self._age, torch.tensor([self._next_age])])
        self._next_age += 1
        ev = merged.evals[:, 0]
        worst = ev == ev.max()
        # drop the oldest of the worst members
        drop = int(torch.nonzero(worst).flatten()[torch.argmin(ages[worst])])
        keep = [i for i in range(len(merged)) if i != drop]
        self._population = merged.take(keep)
        self._age = ages[keep]


class BatchedTournament(Tournament):
    """The tournament with ``children`` children per step, evaluated in one batched call.

    Each step samples ``children`` independent tournaments (S members with replacement
    each, the best is the parent), mutates each parent as the tournament does, evaluates
    the children together, merges them into the population and drops the worst
    ``children`` members (the oldest among equals). ``children=1`` is the tournament.
    """

    def __init__(self, problem, *, children: int = 4, **kwargs):
        if children < 1:
            raise ValueError("children must be >= 1")
        self.children = int(children)
        super().__init__(problem, **kwargs)

    def _step(self) -> None:
        pop = self._population
        if torch.isnan(pop.evals).any():
            self._initialize()
        evals = pop.evals[:, 0]
        idx = torch.randint(0, len(pop), (self.children, self.samples), generator=self._gen)
        parents = pop.values[idx.gather(1, torch.argmin(evals[idx], dim=1, keepdim=True)).squeeze(1)]
        noise = (torch.rand(parents.shape, generator=self._gen, dtype=torch.float64) * 2 - 1) * self.eps
        child_vals = parents.double() + noise
        if self.abs_child:
            child_vals = child_vals.abs()
        child = self.problem.generate_batch(self.children)
        child.set_values(child_vals.to(parents.dtype))
        self.problem.evaluate(child)
        merged = evotorch.SolutionBatch.cat([pop, child])
        ages = torch.cat([self._age, torch.arange(self._next_age, self._next_age + self.children)])
        self._next_age += self.children
        # keep the best popsize: sort by (loss, -age) so the oldest of equals goes first
        ev = merged.evals[:, 0].double()
        order = sorted(range(len(merged)), key=lambda i: (float(ev[i]), -int(ages[i])))
        keep = sorted(order[:self.popsize])
        self._population = merged.take(keep)
        self._age = ages[keep]
