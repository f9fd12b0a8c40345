"""Searchers: *how* to optimise a ``BlockScaleProblem``.

``tournament`` (the paper's steady-state search) and EvoTorch's ``cmaes``, ``snes``,
``pgpe`` are registered by name (``evolq.search.builtin``); any other EvoTorch
``SearchAlgorithm`` class can be passed as ``SearchConfig.searcher`` directly, and a
new searcher is one file plus ``register_searcher``. EvoTorch loads only when a
search runs.
"""
from . import builtin  # noqa: F401  (registers tournament, cmaes, snes, pgpe)
from .registry import SEARCHERS, SearchPlan, is_steady_state, list_searchers, make_searcher, register_searcher

__all__ = ["SEARCHERS", "SearchPlan", "is_steady_state", "list_searchers", "make_searcher", "register_searcher",
           "Tournament"]


def __getattr__(name):
    if name == "Tournament":
        from .tournament import Tournament

        return Tournament
    raise AttributeError(name)
