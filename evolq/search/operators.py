"""Variation operators for integer genes (the bit-allocation search), where EvoTorch has none.

EvoTorch's cross-over operators (``OnePointCrossOver``, ``TwoPointCrossOver``) recombine any
dtype; its mutations are for real numbers. ``IntegerMutation`` changes each gene with a small
probability, to a neighbouring option (one step up or down) or to any option, and always
changes at least one gene per child, so a child is never a copy of its parent. It draws its
randomness from the problem's generator, so a seeded problem gives the same children.
"""
from __future__ import annotations

from copy import deepcopy

import torch

from .._evotorch import evotorch

__all__ = ["IntegerMutation"]


class IntegerMutation(evotorch.operators.CopyingOperator):
    """Mutate integer genes within ``[lower, upper]`` (the problem's bounds).

    Args:
        problem: an integer-dtype EvoTorch problem with bounds.
        rate: probability that a gene mutates (default ``1 / solution_length``).
        neighbour: probability that a mutating gene moves by one step (else it is drawn anew).
        allowed: optional (L, M) bool: the options each gene may take (a move lands on the
            nearest allowed one).
    """

    def __init__(self, problem, *, rate: float | None = None, neighbour: float = 0.7,
                 allowed: torch.Tensor | None = None):
        super().__init__(problem)
        lo, hi = problem.lower_bounds, problem.upper_bounds
        if lo is None or hi is None:
            raise ValueError("IntegerMutation needs a problem with bounds")
        self.lo, self.hi = lo.long(), hi.long()
        n = problem.solution_length
        self.rate = 1.0 / n if rate is None else float(rate)
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        self.neighbour = float(neighbour)
        self.allowed = None if allowed is None else allowed.bool()

    @torch.no_grad()
    def _do(self, batch):
        result = deepcopy(batch)
        values = result.access_values()
        g = values.as_subclass(torch.Tensor).long()
        p, n = g.shape
        problem = self.problem
        mask = problem.make_uniform((p, n), dtype=torch.float64, device=g.device) < self.rate
        forced = problem.make_randint((p,), n=n, device=g.device)
        none = ~mask.any(1)
        mask[none, forced[none]] = True
        step = problem.make_uniform((p, n), dtype=torch.float64, device=g.device) < self.neighbour
        sign = torch.where(problem.make_uniform((p, n), dtype=torch.float64, device=g.device) < 0.5, -1, 1)
        lo, hi = self.lo.to(g.device), self.hi.to(g.device)
        near = g + sign
        near = torch.where(near < lo, g + 1, near)  # at an end: the one neighbour there is
        near = torch.where(near > hi, g - 1, near).clamp(lo, hi)
        span = (hi - lo + 1).to(torch.float64)
        fresh = lo + (problem.make_uniform((p, n), dtype=torch.float64, device=g.device) * span).long().clamp_max(
            hi - lo)
        new = torch.where(step, near, fresh)
        out = torch.where(mask, new, g)
        if self.allowed is not None:
            out = _nearest_allowed(out, self.allowed.to(g.device))
        values[:] = out.to(values.dtype)
        return result


def _nearest_allowed(g: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(allowed.shape[1], device=g.device)
    dist = (idx[None, None, :] - g[:, :, None]).abs().to(torch.float64)
    dist = dist.masked_fill(~allowed[None], float("inf"))
    return dist.argmin(-1)
