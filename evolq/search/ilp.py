"""The additive model of bit allocation: per-layer sensitivities summed and minimised by an
integer linear program under a budget (``ilp_allocation``), at a ladder of budgets over the
front's range (``ilp_points``), and the uniform-width points. Shared by the ``ilp`` baseline
(``evolq.search.baselines``) and the seeds of the evolutionary searchers
(``evolq.search.allocators``); it imports neither of them, nor EvoTorch."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["ilp_allocation", "budget_ladder", "ilp_points", "uniform_points"]


def ilp_allocation(sens: torch.Tensor, cost: torch.Tensor, budget: float, allowed: torch.Tensor | None = None,
                   constant: float = 0.0) -> torch.Tensor | None:
    """The option per layer minimising ``sum sens[l, k]`` subject to ``sum cost[l, k] + constant <=
    budget`` (one option per layer, only allowed ones): a binary integer linear program solved by
    ``scipy.optimize.milp`` (HiGHS). None when no allocation fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_opts = sens.shape
    allowed = torch.ones_like(sens, dtype=torch.bool) if allowed is None else allowed
    c = torch.where(allowed, sens.double(), torch.zeros((), dtype=torch.float64)).numpy().reshape(-1)
    one = np.zeros((n_layers, n_layers * n_opts))
    for i in range(n_layers):
        one[i, i * n_opts:(i + 1) * n_opts] = 1.0
    cons = [LinearConstraint(one, 1, 1),
            LinearConstraint(cost.double().numpy().reshape(1, -1), -np.inf, budget - constant)]
    upper = allowed.double().numpy().reshape(-1)
    res = milp(c, constraints=cons, integrality=np.ones_like(c), bounds=Bounds(0, upper))
    if res.x is None or res.status != 0:
        return None
    return torch.from_numpy(res.x.reshape(n_layers, n_opts).argmax(1)).long()


def budget_ladder(lo: float, hi: float, n: int) -> list[float]:
    """``n`` budgets from ``hi`` down to ``lo`` (the budget itself first)."""
    if n <= 1 or hi <= lo:
        return [hi]
    return [hi - (hi - lo) * i / (n - 1) for i in range(n)]


def ilp_points(problem, sens: torch.Tensor, n: int) -> torch.Tensor:
    cost = problem.costs[problem.budget_index]
    lo = max(cost.floor, cost.range(problem.allowed)[0])
    out = []
    for b in budget_ladder(lo, problem.budget, n):
        g = ilp_allocation(sens, cost.table, b, problem.allowed, cost.constant)
        if g is not None and not any(torch.equal(g, o) for o in out):
            out.append(g)
    return torch.stack(out) if out else torch.empty(0, problem.n_layers, dtype=torch.long)


def uniform_points(problem) -> list[torch.Tensor]:
    """Each option for every layer that allows it (the nearest allowed elsewhere), repaired."""
    n_opts = problem.allowed.shape[1]
    pts = []
    for k in range(n_opts):
        g = torch.full((problem.n_layers,), k, dtype=torch.long)
        pts.append(problem.repair(g[None])[0])
    uniq = []
    for g in pts:
        if not any(torch.equal(g, u) for u in uniq):
            uniq.append(g)
    return uniq
