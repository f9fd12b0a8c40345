"""EvoTorch problems: *what* to optimise. The searchers (``evolq.search``) say *how*."""
from .block_scale import PENALTY, BlockScaleProblem

__all__ = ["BlockScaleProblem", "PENALTY"]
