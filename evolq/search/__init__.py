"""Searchers: *how* to optimise a ``BlockScaleProblem``.

``tournament`` (the paper's steady-state search) and EvoTorch's ``cmaes``, ``snes``,
``pgpe``, swappable by name. Import is lazy: EvoTorch loads only when a search runs.
"""

__all__ = ["make_searcher", "SEARCHER_NAMES", "Tournament"]


def __getattr__(name):
    if name in ("make_searcher", "SEARCHER_NAMES"):
        from . import registry

        return getattr(registry, name)
    if name == "Tournament":
        from .tournament import Tournament

        return Tournament
    raise AttributeError(name)
