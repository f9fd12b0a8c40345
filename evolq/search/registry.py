"""Searchers by name. Each factory takes a ``BlockScaleProblem`` and returns an
EvoTorch ``SearchAlgorithm`` started at the problem's current scales, plus the
number of steps that spends the fitness-evaluation budget."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["SearchPlan", "make_searcher", "SEARCHER_NAMES"]

SEARCHER_NAMES = ("tournament", "cmaes", "snes", "pgpe")


@dataclass
class SearchPlan:
    searcher: object
    steps: int


def _steps(budget: int, popsize: int) -> int:
    return max(1, budget // popsize)


def make_searcher(name, problem, *, budget: int, sigma: float, population: int = 15, samples: int = 10,
                  popsize: int | None = None, start_fitness: float | None = None, seed: int = 0) -> SearchPlan:
    """Build searcher ``name`` for ``problem``.

    Args:
        name: tournament, cmaes, snes, pgpe, or a callable
            ``factory(problem, budget=..., sigma=..., seed=...) -> (searcher, steps)``.
        budget: fitness evaluations to spend (the tournament: one per step).
        sigma: mutation range / initial standard deviation in decision space.
    """
    from evotorch.algorithms import CMAES, PGPE, SNES

    center = problem.center
    if callable(name):
        searcher, steps = name(problem, budget=budget, sigma=sigma, seed=seed)
        return SearchPlan(searcher, int(steps))
    if name == "tournament":
        from .tournament import Tournament

        return SearchPlan(Tournament(problem, popsize=population, samples=samples, eps=sigma, center_init=center,
                                     start_fitness=start_fitness, seed=seed), budget)
    if name == "cmaes":
        ps = popsize or 8
        # full covariance is O(D^2) per step: separable beyond a few hundred dimensions
        s = CMAES(problem, stdev_init=sigma, popsize=ps, center_init=center, separable=len(center) > 200)
        return SearchPlan(s, _steps(budget, ps))
    if name == "snes":
        ps = popsize or 8
        return SearchPlan(SNES(problem, stdev_init=sigma, popsize=ps, center_init=center), _steps(budget, ps))
    if name == "pgpe":
        ps = popsize or 8
        ps += ps % 2  # symmetric sampling needs an even population
        s = PGPE(problem, popsize=ps, center_learning_rate=sigma, stdev_learning_rate=0.1, stdev_init=sigma,
                 center_init=center, optimizer="clipup", optimizer_config={"max_speed": 2 * sigma})
        return SearchPlan(s, _steps(budget, ps))
    raise ConfigError(f"unknown searcher {name!r}; choose one of: {', '.join(SEARCHER_NAMES)}")
