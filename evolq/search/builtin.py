"""The built-in searchers: the paper's tournament and EvoTorch's CMA-ES, SNES and
PGPE, each started at the current scales. One registration each; EvoTorch is
imported only when a searcher is built."""
from __future__ import annotations

from .registry import DEFAULT_POPSIZE, SearchPlan, register_searcher, steps_for

__all__: list[str] = []


@register_searcher("tournament")
def tournament(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, population=15, samples=10,
               abs_child=True):
    """Steady-state tournament (Evol-Q): one evaluation per step; ``population`` (K),
    ``samples`` (S) and ``abs_child`` come from ``SearchConfig``/``searcher_kwargs``."""
    from .tournament import Tournament

    return SearchPlan(Tournament(problem, popsize=population, samples=samples, eps=sigma, center_init=problem.center,
                                 start_fitness=start_fitness, abs_child=abs_child, seed=seed), budget)


tournament.steady_state = True  # one candidate per step: nothing for Ray actors to share (evolq.scaleout)


@register_searcher("cmaes")
def cmaes(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, **kwargs):
    """EvoTorch CMA-ES; separable above 200 dimensions (full covariance is O(D^2) per step)."""
    from evotorch.algorithms import CMAES

    from .._evotorch import evotorch  # noqa: F401

    ps = popsize or DEFAULT_POPSIZE
    kwargs.setdefault("separable", len(problem.center) > 200)
    return SearchPlan(CMAES(problem, stdev_init=sigma, popsize=ps, center_init=problem.center, **kwargs),
                      steps_for(budget, ps))


@register_searcher("snes")
def snes(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, **kwargs):
    """EvoTorch SNES (separable natural evolution strategy)."""
    from evotorch.algorithms import SNES

    from .._evotorch import evotorch  # noqa: F401

    ps = popsize or DEFAULT_POPSIZE
    return SearchPlan(SNES(problem, stdev_init=sigma, popsize=ps, center_init=problem.center, **kwargs),
                      steps_for(budget, ps))


@register_searcher("pgpe")
def pgpe(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, **kwargs):
    """EvoTorch PGPE with ClipUp (symmetric sampling: an even population)."""
    from evotorch.algorithms import PGPE

    from .._evotorch import evotorch  # noqa: F401

    ps = popsize or DEFAULT_POPSIZE
    ps += ps % 2
    args = dict(center_learning_rate=sigma, stdev_learning_rate=0.1, stdev_init=sigma, optimizer="clipup",
                optimizer_config={"max_speed": 2 * sigma})
    args.update(kwargs)
    return SearchPlan(PGPE(problem, popsize=ps, center_init=problem.center, **args), steps_for(budget, ps))


@register_searcher("batched-tournament")
def batched_tournament(problem, *, budget, sigma, popsize=None, start_fitness=None, seed=0, population=15,
                       samples=10, children=None, abs_child=True):
    """Beyond the paper: each step draws ``children`` tournament parents, mutates each and
    evaluates all children in one batched fitness call (what a GPU needs), then keeps the
    best ``population`` members. ``children`` defaults to ``popsize`` or, failing that,
    the whole budget in one step."""
    from .tournament import BatchedTournament

    k = int(children or popsize or budget)
    return SearchPlan(BatchedTournament(problem, popsize=population, samples=samples, eps=sigma, children=k,
                                        center_init=problem.center, start_fitness=start_fitness,
                                        abs_child=abs_child, seed=seed), steps_for(budget, k))
