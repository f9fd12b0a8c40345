"""EvoTorch problems: *what* to optimise. The searchers (``evolq.search``) say *how*.

``BlockScaleProblem`` is one block's scales (one per block and pass, on the driver);
``BlockFitnessProblem`` is the run's fitness held by Ray actors (``SearchConfig(actors=...)``).
"""
from .block_scale import PENALTY, BlockScaleProblem

__all__ = ["BlockScaleProblem", "BlockFitnessProblem", "PENALTY", "unit_spaces"]


def __getattr__(name):
    if name in ("BlockFitnessProblem", "unit_spaces"):
        from . import block_fitness

        return getattr(block_fitness, name)
    raise AttributeError(name)
