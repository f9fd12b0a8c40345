"""Searchers by name: *how* to optimise a ``BlockScaleProblem``.

A searcher is registered as a factory ``factory(problem, *, budget, sigma, popsize,
start_fitness, seed, **searcher_kwargs) -> SearchPlan``: an EvoTorch
``SearchAlgorithm`` started at the problem's current scales, plus the number of
``step()`` calls that spends ``budget`` fitness evaluations. Factories import
EvoTorch lazily, so listing or validating names stays cheap. This module imports no
searcher: the built-in ones (``builtin``) register themselves when the package
``evolq.search`` is imported, which any import of this module does first.

``SearchConfig.searcher`` may also be an EvoTorch ``SearchAlgorithm`` class that is
not registered (``evotorch.algorithms.XNES``, say): ``class_factory`` builds it with
``stdev_init``/``center_init``/``popsize`` where its constructor takes them, plus
``searcher_kwargs``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["SearchPlan", "SEARCHERS", "register_searcher", "list_searchers", "make_searcher", "class_factory",
           "is_search_algorithm"]

SEARCHERS: Registry = Registry("searcher")
DEFAULT_POPSIZE = 8


@dataclass
class SearchPlan:
    searcher: object
    steps: int


def register_searcher(name: str, factory=None):
    """Register a searcher factory (``@register_searcher("name")`` or ``register_searcher("name", f)``)."""
    return SEARCHERS.register(name, factory)


def list_searchers() -> tuple[str, ...]:
    return SEARCHERS.names()


def steps_for(budget: int, popsize: int) -> int:
    return max(1, budget // popsize)


def is_search_algorithm(obj) -> bool:
    """True for an EvoTorch ``SearchAlgorithm`` subclass (imports EvoTorch only for classes)."""
    if not isinstance(obj, type):
        return False
    from evotorch.algorithms.searchalgorithm import SearchAlgorithm

    from .._evotorch import evotorch  # noqa: F401  (quiet import)

    return issubclass(obj, SearchAlgorithm)


def class_factory(cls):
    """A factory for an EvoTorch ``SearchAlgorithm`` class: fills the constructor
    arguments it accepts among ``stdev_init``, ``center_init`` and ``popsize``."""
    params = inspect.signature(cls.__init__).parameters

    def factory(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, **kwargs):
        args = {"stdev_init": sigma, "center_init": problem.center}
        ps = popsize or (params["popsize"].default if "popsize" in params and
                         params["popsize"].default not in (None, inspect.Parameter.empty) else DEFAULT_POPSIZE)
        if "popsize" in params:
            args["popsize"] = ps
        args = {k: v for k, v in args.items() if k in params}
        args.update(kwargs)
        try:
            searcher = cls(problem, **args)
        except TypeError as e:
            raise ConfigError(f"cannot build searcher {cls.__name__}: {e}; pass its arguments in "
                              f"searcher_kwargs") from None
        return SearchPlan(searcher, steps_for(budget, ps))

    return factory


def make_searcher(searcher, problem, *, budget: int, sigma: float, popsize: int | None = None,
                  start_fitness: float | None = None, seed: int = 0, population: int = 15, samples: int = 10,
                  searcher_kwargs: dict | None = None) -> SearchPlan:
    """Build ``searcher`` for ``problem``.

    Args:
        searcher: a registered name, an EvoTorch ``SearchAlgorithm`` class, or a factory
            ``factory(problem, *, budget, sigma, popsize, start_fitness, seed, **kw)``
            returning a ``SearchPlan`` or ``(searcher, steps)``.
        budget: fitness evaluations to spend (the tournament: one per step).
        sigma: mutation range / initial standard deviation in decision space.
        population, samples: the tournament's K and S (given to factories that declare them).
        searcher_kwargs: further arguments for the searcher (``SearchConfig.searcher_kwargs``).
    """
    if isinstance(searcher, str):
        factory = SEARCHERS.get(searcher)
    elif isinstance(searcher, type):
        factory = class_factory(searcher)
    elif callable(searcher):
        factory = searcher
    else:
        raise ConfigError(f"searcher must be a name, an EvoTorch SearchAlgorithm class or a factory, got "
                          f"{type(searcher).__name__}")
    params = inspect.signature(factory).parameters
    args = dict(budget=budget, sigma=sigma, popsize=popsize, start_fitness=start_fitness, seed=seed)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        args = {k: v for k, v in args.items() if k in params}  # a factory takes what it declares
    args.update({k: v for k, v in (("population", population), ("samples", samples)) if k in params})
    args.update(searcher_kwargs or {})
    plan = factory(problem, **args)
    if isinstance(plan, tuple):  # a user factory may return (searcher, steps)
        plan = SearchPlan(plan[0], int(plan[1]))
    return plan
