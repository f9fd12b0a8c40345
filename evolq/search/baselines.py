"""The baseline allocation searchers (``evolq.search.allocators``) as EvoTorch ``SearchAlgorithm``s:
each ``step()`` proposes one batch of allocations and evaluates it through the problem, as the
evolutionary searcher does, so every searcher is counted, repaired, archived and distributed
the same way. Imported when one is built (it imports EvoTorch)."""
from __future__ import annotations

import math

import torch
from evotorch.algorithms.searchalgorithm import SearchAlgorithm, SinglePopulationAlgorithmMixin

from .._evotorch import evotorch  # noqa: F401  (quiet import)
from .ilp import ilp_points

__all__ = ["BatchBaseline", "RandomAllocation", "ILPAllocation", "GreedyAllocation", "evaluate_values"]


def evaluate_values(problem, values: torch.Tensor, constrained: bool = True):
    """Evaluate allocations ``values`` (P, L) through ``problem``; returns the evaluated batch."""
    batch = problem.generate_batch(values.shape[0])
    batch.set_values(values.to(torch.int64))
    with problem.constrained(constrained):
        problem.evaluate(batch)
    return batch


class BatchBaseline(SearchAlgorithm, SinglePopulationAlgorithmMixin):
    """Proposes one batch of allocations per step (``propose``; None when it has no more)."""

    constrained = True

    def __init__(self, problem, popsize: int):
        SearchAlgorithm.__init__(self, problem)
        self._popsize = int(popsize)
        self._population = None
        self.done = False
        SinglePopulationAlgorithmMixin.__init__(self)

    @property
    def population(self):
        return self._population

    def propose(self) -> torch.Tensor | None:
        raise NotImplementedError

    def observe(self, batch) -> None:
        """Called with each evaluated batch."""

    def state_dict(self) -> tuple[dict, dict]:
        """(tensors, JSON meta) of what the baseline carries between steps."""
        return {}, {"done": self.done}

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        self.done = bool(meta.get("done", False))

    def _step(self):
        values = None if self.done else self.propose()
        if values is None or values.shape[0] == 0:
            self.done = True
            return
        batch = evaluate_values(self.problem, values, self.constrained)
        self._population = batch
        self.observe(batch)


class RandomAllocation(BatchBaseline):
    """``popsize`` allocations per step, each layer's option drawn uniformly (then repaired)."""

    def propose(self):
        values = torch.empty(self._popsize, self.problem.n_layers, dtype=torch.int64)
        self.problem.fill_random(values)
        return values


class ILPAllocation(BatchBaseline):
    """The ILP on the additive sensitivities at ``popsize`` budgets over the front's range; the
    ladder is deterministic, so it has one batch to evaluate."""

    def __init__(self, problem, popsize, sensitivity):
        super().__init__(problem, popsize)
        self.sensitivity = sensitivity

    def propose(self):
        return None if self.step_count > 1 else ilp_points(self.problem, self.sensitivity, self._popsize)


class GreedyAllocation(BatchBaseline):
    """Bit dropping from the widest allocation: each step evaluates the ``popsize`` single-layer
    drops with the least sensitivity per byte saved (over the budget: evaluated as they are) and
    takes the one whose real loss grew least per byte saved; once under the budget it raises
    layers the same way (the most loss removed per byte added) while a raise fits and helps."""

    def __init__(self, problem, popsize, sensitivity):
        super().__init__(problem, popsize)
        self.sensitivity = sensitivity
        cost = problem.costs[problem.budget_index]
        self.cost = cost
        self.current = cost.table.masked_fill(~problem.allowed, float("-inf")).argmax(1)
        self.loss = None
        self.phase = "drop" if float(cost(self.current)[0]) > problem.budget else "raise"
        self.moves = []

    @property
    def constrained(self):
        return self.phase == "raise"

    def _moves(self, direction: int):
        p, c, s = self.problem, self.cost.table, self.sensitivity
        total = float(self.cost(self.current)[0])
        out = []
        for layer in range(p.n_layers):
            k = int(self.current[layer])
            opts = [j for j in range(c.shape[1]) if p.allowed[layer, j]
                    and (c[layer, j] < c[layer, k] if direction < 0 else c[layer, j] > c[layer, k])]
            if not opts:
                continue
            j = max(opts, key=lambda j: float(c[layer, j])) if direction < 0 else \
                min(opts, key=lambda j: float(c[layer, j]))
            dc = float(c[layer, j] - c[layer, k])
            if direction > 0 and total + dc > p.budget:
                continue
            out.append((float(s[layer, j] - s[layer, k]) / abs(dc), layer, j, dc))
        out.sort()
        return out[: self._popsize]

    def propose(self):
        if self.loss is None:
            self.moves = []
            return self.current[None].clone()
        self.moves = self._moves(-1 if self.phase == "drop" else 1)
        if not self.moves:
            return None
        vals = []
        for _, layer, j, _ in self.moves:
            g = self.current.clone()
            g[layer] = j
            vals.append(g)
        return torch.stack(vals)

    def state_dict(self):
        t, m = super().state_dict()
        t["current"] = self.current.clone()
        m.update(loss=self.loss, phase=self.phase)
        return t, m

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.current = tensors["current"].long().clone()
        self.loss, self.phase = meta["loss"], meta["phase"]

    def observe(self, batch):
        losses = batch.evals.as_subclass(torch.Tensor)[:, 0].tolist()
        if not self.moves:
            self.loss = losses[0]
            return
        rates = [(e - self.loss) / abs(dc) for e, (_, _, _, dc) in zip(losses, self.moves)]
        i = min(range(len(rates)), key=rates.__getitem__)
        if self.phase == "raise" and not (math.isfinite(rates[i]) and rates[i] < 0):
            self.done = True  # no raise that fits lowers the loss
            return
        _, layer, j, _ = self.moves[i]
        self.current[layer] = j
        self.loss = losses[i]
        if self.phase == "drop" and float(self.cost(self.current)[0]) <= self.problem.budget:
            self.phase = "raise"
