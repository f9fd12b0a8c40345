"""Searchers of a ``BitAllocationProblem``, by name: *how* to choose bits per layer.

Each is an EvoTorch ``SearchAlgorithm`` whose ``step()`` evaluates one batch of allocations
through ``problem.evaluate`` (so the budget repair, the archive, the memo and Ray actors apply
to all alike), built by a factory registered in ``ALLOCATORS``:
``factory(problem, *, popsize, sensitivity, seed, **kwargs) -> SearchAlgorithm``.

* ``nsga2``: EvoTorch's ``GeneticAlgorithm`` (elitist; Pareto ranks and crowding on the
  objectives, NSGA-II), two-point cross-over and ``IntegerMutation``, its first population
  seeded with the sensitivity + ILP solutions across the front's range and uniform widths;
  with ``screen=k`` its children are pre-screened on k fitness images
  (``evolq.search.screened``; off by default).
* ``evopress``: EvoPress's (1+λ) elitist search, level-switch mutations that keep the budget,
  staged selection on growing samples of the fitness images (``evolq.search.evopress``).
* ``ilp``: the standard answer (HAWQ-V3, ModelOpt ``auto_quantize``): per-layer sensitivities
  summed as if they were additive, minimised by an integer linear program
  (``scipy.optimize.milp``) under each of ``popsize`` budgets spread over the front's range.
* ``greedy``: bit dropping from the widest allocation: each step evaluates the ``popsize``
  single-layer drops with the least sensitivity per byte saved and takes the one whose real
  loss grew least per byte, until the budget is met, then spends what is left raising layers
  the same way while they fit.
* ``random``: uniformly random options per layer, repaired to the budget.

Any other EvoTorch ``SearchAlgorithm`` class that takes ``(problem, operators=..., popsize=...)``
(``SteadyStateGA``, say) can be passed instead of a name. ``sensitivity`` is the (L, M) table
of single-layer loss changes (``BitAllocationProblem.sensitivity``): searchers that need it
name it in ``NEEDS_SENSITIVITY``; its evaluations count against their budget. A factory that
takes ``holdout`` gets the engine's hold-out scorer (``(P, L) -> (P,)`` or None).

The budget's unit: distinct full-fitness evaluations (``problem.evaluations``); a searcher
with a ``spent`` property (the staged ones: full-fitness equivalents by images seen) is
counted by it instead (``AllocationEngine``).
"""
from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError
from ..registry import Registry
from .ilp import budget_ladder, ilp_allocation, ilp_points, uniform_points

__all__ = ["ALLOCATORS", "NEEDS_SENSITIVITY", "register_allocator", "list_allocators", "make_allocator",
           "ilp_allocation", "budget_ladder"]

ALLOCATORS: Registry = Registry("allocation searcher")
NEEDS_SENSITIVITY = {"nsga2", "ilp", "greedy", "evopress"}


def register_allocator(name: str, factory=None, needs_sensitivity: bool = False):
    """Register an allocation searcher factory (decorator or direct call)."""
    if needs_sensitivity:
        NEEDS_SENSITIVITY.add(name)
    return ALLOCATORS.register(name, factory)


def list_allocators() -> tuple[str, ...]:
    return ALLOCATORS.names()


@register_allocator("nsga2", needs_sensitivity=True)
def nsga2(problem, *, popsize: int = 24, sensitivity=None, seed: int = 0, rate: float | None = None,
          neighbour: float = 0.7, tournament_size: int = 2, ilp_seeds: int | None = None, screen=None,
          screen_factor: int = 4):
    """EvoTorch ``GeneticAlgorithm`` (NSGA-II on [loss, size]) with two-point cross-over and
    ``IntegerMutation``; the first population holds ``ilp_seeds`` (default half the population)
    ILP solutions across the front's range and the uniform widths, the rest random. ``screen``
    (images, or a fraction of the fitness images; None: off): ``screen_factor`` times the children
    are drawn and pre-screened on that many images, the best of them evaluated
    (``evolq.search.screened.ScreenedGeneticAlgorithm``; the budget then counts images seen)."""
    from evotorch.algorithms import GeneticAlgorithm
    from evotorch.operators import TwoPointCrossOver

    from .._evotorch import evotorch  # noqa: F401  (quiet import)
    from .operators import IntegerMutation

    seeds = []
    if sensitivity is not None:
        k = popsize // 2 if ilp_seeds is None else int(ilp_seeds)
        seeds += list(ilp_points(problem, sensitivity, k))
    for u in uniform_points(problem):
        if not any(torch.equal(u, s) for s in seeds):
            seeds.append(u)
    problem.seeds = torch.stack(seeds[:popsize]) if seeds else None
    ops = [TwoPointCrossOver(problem, tournament_size=tournament_size),
           IntegerMutation(problem, rate=rate, neighbour=neighbour, allowed=problem.allowed)]
    if screen is not None:
        from .screened import ScreenedGeneticAlgorithm

        return ScreenedGeneticAlgorithm(problem, screen=screen, screen_factor=screen_factor, seed=seed,
                                        operators=ops, popsize=popsize)
    return GeneticAlgorithm(problem, operators=ops, popsize=popsize, re_evaluate=False)


@register_allocator("evopress", needs_sensitivity=True)
def evopress(problem, *, popsize: int = 24, sensitivity=None, seed: int = 0, holdout=None, offspring: int = 32,
             survivors=(4, 1), images=(1 / 64, 1 / 8, 1.0), generations: int | None = None, max_switches: int = 3):
    """EvoPress: (1+λ) elitist, level-switch mutations within the budget, staged selection
    (``offspring`` on the first stage, ``survivors`` on the next ones, ``images`` per stage: counts
    or fractions of the fitness images), warm-started from the better of the ILP point and the
    uniform widths on the hold-out; ``popsize`` is not used. The budget counts full-fitness
    equivalents by images seen (``evolq.search.evopress``)."""
    from .evopress import EvoPress

    return EvoPress(problem, offspring=offspring, survivors=survivors, images=images, generations=generations,
                    max_switches=max_switches, sensitivity=sensitivity, holdout=holdout, seed=seed)


@register_allocator("random")
def random_search(problem, *, popsize: int = 24, sensitivity=None, seed: int = 0):
    """Random allocations (uniform options per layer), repaired to the budget."""
    from .baselines import RandomAllocation

    return RandomAllocation(problem, popsize)


@register_allocator("ilp", needs_sensitivity=True)
def ilp(problem, *, popsize: int = 24, sensitivity=None, seed: int = 0):
    """Sensitivity + integer linear program at ``popsize`` budgets over the front's range."""
    if sensitivity is None:
        raise ConfigError("the ilp allocator needs a sensitivity table")
    from .baselines import ILPAllocation

    return ILPAllocation(problem, popsize, sensitivity)


@register_allocator("greedy", needs_sensitivity=True)
def greedy(problem, *, popsize: int = 24, sensitivity=None, seed: int = 0):
    """Greedy bit dropping with the real loss, ``popsize`` sensitivity-ranked moves per step."""
    if sensitivity is None:
        raise ConfigError("the greedy allocator needs a sensitivity table")
    from .baselines import GreedyAllocation

    return GreedyAllocation(problem, popsize, sensitivity)


def make_allocator(searcher, problem, *, popsize: int, sensitivity=None, seed: int = 0, searcher_kwargs=None,
                   holdout=None):
    """Build ``searcher`` (a registered name or an EvoTorch ``SearchAlgorithm`` class) on ``problem``;
    ``holdout`` goes to a factory that takes it."""
    kwargs = dict(searcher_kwargs or {})
    if isinstance(searcher, str):
        factory = ALLOCATORS.get(searcher)
        params = inspect.signature(factory).parameters
        unknown = [k for k in kwargs if k not in params or k == "holdout"]
        if unknown:
            raise ConfigError(f"the {searcher} allocator takes no argument {', '.join(unknown)}")
        if "holdout" in params:
            kwargs["holdout"] = holdout
        return factory(problem, popsize=popsize, sensitivity=sensitivity, seed=seed, **kwargs)
    if isinstance(searcher, type):
        from evotorch.operators import TwoPointCrossOver

        from .operators import IntegerMutation

        ops = [TwoPointCrossOver(problem, tournament_size=2), IntegerMutation(problem, allowed=problem.allowed)]
        try:
            return searcher(problem, operators=ops, popsize=popsize, **kwargs)
        except TypeError as e:
            raise ConfigError(f"cannot build {searcher.__name__} on a bit allocation: {e}") from None
    raise ConfigError(f"an allocation searcher is a name ({', '.join(ALLOCATORS.names())}) or an EvoTorch "
                      f"SearchAlgorithm class, got {type(searcher).__name__}")


def allocator_state(searcher) -> tuple[dict, dict]:
    """(tensors, JSON-able meta) that ``load_allocator_state`` needs to continue ``searcher``
    exactly: its step count, population (values and evaluations) and its own ``state_dict``."""
    tensors, meta = {}, {"steps": int(searcher.step_count)}
    pop = getattr(searcher, "population", None)
    if pop is not None and len(pop) and not bool(torch.isnan(pop.evals.as_subclass(torch.Tensor)).any()):
        tensors["population_values"] = pop.values.as_subclass(torch.Tensor).clone()
        tensors["population_evals"] = pop.evals.as_subclass(torch.Tensor).clone()
    if hasattr(searcher, "_first_iter"):
        meta["first_iter"] = bool(searcher._first_iter)
    if hasattr(searcher, "state_dict"):
        t, m = searcher.state_dict()
        tensors.update({f"searcher.{k}": v for k, v in t.items()})
        meta["own"] = m
    return tensors, meta


def load_allocator_state(searcher, tensors: dict, meta: dict) -> None:
    """Put ``searcher`` back in the state ``allocator_state`` saved."""
    searcher._steps_count = int(meta.get("steps", 0))
    if "population_values" in tensors:
        vals = tensors["population_values"]
        batch = searcher.problem.generate_batch(vals.shape[0])
        batch.set_values(vals)
        batch.set_evals(tensors["population_evals"])
        searcher._population = batch
    if "first_iter" in meta:
        searcher._first_iter = bool(meta["first_iter"])
    if hasattr(searcher, "load_state_dict"):
        own = {k[len("searcher."):]: v for k, v in tensors.items() if k.startswith("searcher.")}
        searcher.load_state_dict(own, meta.get("own") or {})
