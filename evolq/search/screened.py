"""NSGA-II with its children pre-screened on a small fidelity (``nsga2(screen=k)``,
``evolq.search.allocators``): each generation draws ``screen_factor`` times the usual children
(EvoTorch's operators, repaired to the budget as every nsga2 child is), scores them on a fresh
sample of ``k`` fitness images (``evolq.search.staged``), keeps the usual number of them by
NSGA-II's own order (Pareto rank, then crowding) on [sample loss, costs], and evaluates only
those on the full fitness; selection then proceeds as in ``GeneticAlgorithm``. The budget is
counted in full-fitness equivalents by images seen (``spent``), as for ``evopress``. Imported
when built (it imports EvoTorch); without ``screen`` the nsga2 searcher is EvoTorch's plain
``GeneticAlgorithm``, unchanged."""
from __future__ import annotations

import torch
from evotorch import SolutionBatch
from evotorch.algorithms import GeneticAlgorithm
from evotorch.algorithms.ga import _use_operators

from .._evotorch import evotorch  # noqa: F401  (quiet import)
from ..errors import ConfigError
from .staged import StagedSelection

__all__ = ["ScreenedGeneticAlgorithm"]


class ScreenedGeneticAlgorithm(GeneticAlgorithm):
    """``GeneticAlgorithm`` (not re-evaluating) whose children are pre-screened (module docstring).

    Args:
        problem: a ``BitAllocationProblem`` whose quality scores samples (``AllocationFitness``).
        screen: images of the pre-screen stage (a count, or a fraction of the fitness images).
        screen_factor: children drawn per child kept.
        seed: the search's seed (the samples).
        **kwargs: ``GeneticAlgorithm``'s (``operators``, ``popsize``, ...).
    """

    def __init__(self, problem, *, screen, screen_factor: int = 4, seed: int = 0, **kwargs):
        if isinstance(screen_factor, bool) or not isinstance(screen_factor, int) or screen_factor < 1:
            raise ConfigError(f"screen_factor must be a positive count, got {screen_factor!r}")
        super().__init__(problem, re_evaluate=False, **kwargs)
        self.screen_factor = int(screen_factor)
        self.staged = StagedSelection(problem, [screen, 1.0], seed)

    @property
    def spent(self) -> float:
        return self.staged.spent

    def report(self) -> dict:
        return {"stages": self.staged.report(), "generations": self.staged.generations, "spent": self.spent}

    def _make_extended_population(self, split: bool = False):
        problem, population = self.problem, self.population
        if self._first_iter:
            self._first_iter = False
            problem.evaluate(population)
        self.staged.begin()
        drawn = [_use_operators(population, self._operators) for _ in range(self.screen_factor)]
        n_keep = len(drawn[0])
        values = problem.repair(torch.cat([b.values.as_subclass(torch.Tensor) for b in drawn]).long())
        losses, _ = self.staged.score(0, values)
        screened = problem.generate_batch(values.shape[0])
        screened.set_values(values)
        screened.set_evals(problem.objectives(values, losses))
        kept = screened.take_best(n_keep).values.as_subclass(torch.Tensor).long()
        _, children = self.staged.score(1, kept)
        if split:
            return population, children
        return SolutionBatch.cat([population, children])

    def state_dict(self) -> tuple[dict, dict]:
        t, m = self.staged.state_dict()
        return {f"staged.{k}": v for k, v in t.items()}, {"staged": m}

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        self.staged.load_state_dict({k[len("staged."):]: v for k, v in tensors.items() if k.startswith("staged.")},
                                    meta.get("staged") or {})
