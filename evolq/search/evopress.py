"""The ``evopress`` allocation searcher: EvoPress's (1+λ) elitist evolution over per-layer levels
(Sieberling, Kuznedelev, Kurtic, Alistarh, ICML 2025; IST-DASLab/EvoPress ``evo_quant_search.py``),
as an EvoTorch ``SearchAlgorithm`` on a ``BitAllocationProblem``.

* **Levels.** A layer's levels are its allowed options ordered by their cost under the budget
  (ties in menu order): widths, ``float``, group-wise options or anything else a menu holds.
* **Level-switch mutation, budget kept without repair.** A child is the parent after
  k = min(U{1..3}, U{1..3}) switches; a switch steps one layer down a level and another layer
  up a level, the layer going up drawn among those whose step up fits the budget after the step
  down (by the exact cost table, layers of unequal size included). So every candidate is within
  the budget by construction; the problem's repair is never needed (``sample_losses`` refuses
  one over the budget). Children are distinct from the parent and from each other.
* **Staged selection** (``evolq.search.staged``): ``offspring`` children on the first stage's
  fresh sample, the best ``survivors[0]`` of them on the second stage's, and so on; the last
  stage scores its survivors **and the parent** on the same fresh sample and the best of them
  is the next parent (the parent on a tie). A stage of every fitness image is the full fitness
  (archived: the front the engine chooses from); with a smaller last stage, each new parent is
  scored on the full fitness once, so the front holds it.
* **Warm start.** The first step evaluates the ILP point at the budget (sensitivity + ILP) and
  the uniform widths (each repaired to the budget, as nsga2's seeds are) on the full fitness,
  and starts from the one with the lowest hold-out loss (the fitness loss without a hold-out).

**The evaluations budget** (``AllocationConfig.evaluations``) is counted in full-fitness
equivalents by images seen: a full evaluation is 1, an allocation computed on k of the n fitness
images k / n (memo hits are free), the sensitivity pass included (``spent``). The defaults scale
the anchor's 128 offspring, survivors 16 -> 4 -> 1 and 2k -> 16k -> 131k tokens (1 : 8 : 64) to
ViT-Tiny's 50 layers (against Llama-8B's 224) and 64 fitness images: 32 offspring, survivors
4 -> 1, stages of 1/64, 1/8 and all of the fitness images (1, 8, 64), about 2 full evaluations a
generation. Randomness: the search's own generator (seeded by ``seed``), in ``state_dict``.
"""
from __future__ import annotations

import torch
from evotorch.algorithms.searchalgorithm import SearchAlgorithm, SinglePopulationAlgorithmMixin

from .._evotorch import evotorch  # noqa: F401  (quiet import)
from ..errors import ConfigError
from .baselines import evaluate_values
from .ilp import ilp_points, uniform_points
from .staged import StagedSelection

__all__ = ["EvoPress", "LevelSwitch"]

MUTATION_SEED = 104729  # the mutation generator's seed is the search's seed plus this


class LevelSwitch:
    """EvoPress's level-switch mutation on ``problem``'s budget cost (see the module docstring).

    ``levels[l]``: layer ``l``'s allowed options ordered by budget cost (ties in menu order);
    ``pos[l, k]``: the level of option ``k`` (-1 where not allowed)."""

    def __init__(self, problem, max_switches: int = 3, tries: int = 64):
        self.problem = problem
        cost = problem.costs[problem.budget_index]
        self.table, self.constant, self.budget = cost.table, cost.constant, problem.budget
        self.max_switches, self.tries = int(max_switches), int(tries)
        m = problem.allowed.shape[1]
        self.levels = [sorted((k for k in range(m) if problem.allowed[layer, k]),
                              key=lambda k, layer=layer: (float(self.table[layer, k]), k))
                       for layer in range(problem.n_layers)]
        self.pos = torch.full(problem.allowed.shape, -1, dtype=torch.long)
        for layer, lv in enumerate(self.levels):
            for i, k in enumerate(lv):
                self.pos[layer, k] = i

    def cost(self, genes: torch.Tensor) -> float:
        return float(self.table.gather(1, genes.long().reshape(-1, 1)).sum()) + self.constant

    def _rand(self, n: int, generator) -> int:
        return int(torch.randint(n, (1,), generator=generator))

    def switch(self, genes: torch.Tensor, generator) -> bool:
        """One level switch on ``genes`` (in place, kept within the budget); False if none fits."""
        t, lv = self.table, self.levels
        total = self.cost(genes)
        downs = [layer for layer in range(len(lv)) if int(self.pos[layer, int(genes[layer])]) > 0]
        for _ in range(self.tries):
            if not downs:
                return False
            d = downs[self._rand(len(downs), generator)]
            kd = int(genes[d])
            lower = lv[d][int(self.pos[d, kd]) - 1]
            after = total - float(t[d, kd] - t[d, lower])
            ups = []
            for layer in range(len(lv)):
                if layer == d:
                    continue
                p = int(self.pos[layer, int(genes[layer])])
                if p + 1 < len(lv[layer]):
                    up = lv[layer][p + 1]
                    if after + float(t[layer, up] - t[layer, int(genes[layer])]) <= self.budget:
                        ups.append((layer, up))
            if ups:
                u, ku = ups[self._rand(len(ups), generator)]
                genes[d], genes[u] = lower, ku
                return True
            downs.remove(d)  # no step up fits beside this step down: another layer goes down
        return False

    def __call__(self, parent: torch.Tensor, generator) -> torch.Tensor | None:
        """A child of ``parent``: k = min(U{1..m}, U{1..m}) switches (m = ``max_switches``); None if
        not one switch fits."""
        m = self.max_switches
        k = min(self._rand(m, generator), self._rand(m, generator)) + 1
        child = parent.clone()
        done = sum(self.switch(child, generator) for _ in range(k))
        return child if done else None


class EvoPress(SearchAlgorithm, SinglePopulationAlgorithmMixin):
    """(1+λ) elitist search with level-switch mutations and staged selection (module docstring).

    Args:
        problem: a ``BitAllocationProblem`` whose quality scores samples (``AllocationFitness``).
        offspring: children per generation (λ), scored on the first stage.
        survivors: how many of each stage go on to the next (one entry per stage after the first).
        images: images per stage (counts, or fractions of the fitness images), cheapest first;
            ``len(survivors) + 1`` entries.
        generations: stop after this many generations (None: when the budget is spent).
        max_switches: the m of k = min(U{1..m}, U{1..m}).
        sensitivity: the (L, M) table of the ILP warm start (None: uniform widths only).
        holdout: scores the warm-start candidates (``(P, L) -> (P,)``; None: the fitness loss).
        seed: the search's seed (mutations and samples).
    """

    def __init__(self, problem, *, offspring: int = 32, survivors=(4, 1), images=(1 / 64, 1 / 8, 1.0),
                 generations: int | None = None, max_switches: int = 3, sensitivity=None, holdout=None,
                 seed: int = 0):
        SearchAlgorithm.__init__(self, problem)
        survivors = [survivors] if isinstance(survivors, int) else list(survivors)
        images = [images] if isinstance(images, (int, float)) else list(images)
        if isinstance(offspring, bool) or not isinstance(offspring, int) or offspring < 1:
            raise ConfigError(f"offspring must be a positive count, got {offspring!r}")
        if len(images) != len(survivors) + 1:
            raise ConfigError(f"evopress needs one images entry per stage: {len(survivors) + 1} for survivors "
                              f"{survivors}, got {len(images)}")
        prev = offspring
        for s in survivors:
            if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= prev:
                raise ConfigError(f"survivors must be counts that shrink from offspring={offspring}, got {survivors}")
            prev = s
        if generations is not None and (isinstance(generations, bool) or not isinstance(generations, int)
                                        or generations < 1):
            raise ConfigError(f"generations must be a positive count or None, got {generations!r}")
        if isinstance(max_switches, bool) or not isinstance(max_switches, int) or max_switches < 1:
            raise ConfigError(f"max_switches must be a positive count, got {max_switches!r}")
        self.offspring, self.survivors, self.generations = int(offspring), survivors, generations
        self.staged = StagedSelection(problem, images, seed)
        self.mutation = LevelSwitch(problem, max_switches)
        self.generator = torch.Generator().manual_seed(int(seed) + MUTATION_SEED)
        self.sensitivity, self.holdout = sensitivity, holdout
        self.parent: torch.Tensor | None = None
        self.parent_loss: float | None = None  # on the last stage's sample of the latest generation
        self.history: list[dict] = []  # per generation: the parent's re-score, the winner's, whether it changed
        self.done = False
        self._population = None
        SinglePopulationAlgorithmMixin.__init__(self)

    @property
    def population(self):
        return self._population

    @property
    def spent(self) -> float:
        """The budget used, in full-fitness equivalents by images seen (``StagedSelection.spent``)."""
        return self.staged.spent

    def report(self) -> dict:
        """The stages' work (``StagedSelection.report``), the generations and how often the parent changed."""
        gens = [h for h in self.history if "changed" in h]
        return {"stages": self.staged.report(), "generations": len(gens),
                "parent_changes": sum(h["changed"] for h in gens), "spent": self.spent,
                "start": self.history[0]["start"] if self.history else None}

    # -- warm start ---------------------------------------------------------------------------
    def _start(self) -> None:
        p = self.problem
        cands = list(ilp_points(p, self.sensitivity, 1)) if self.sensitivity is not None else []
        n_ilp = len(cands)
        for u in uniform_points(p):
            if not any(torch.equal(u, c) for c in cands):
                cands.append(u)
        values = torch.stack(cands)
        batch = evaluate_values(p, values)  # the full fitness: archived, counted
        values = batch.values.as_subclass(torch.Tensor).long()
        full = batch.evals.as_subclass(torch.Tensor)[:, 0]
        score = full if self.holdout is None else torch.as_tensor(self.holdout(values), dtype=torch.float64)
        i = int(StagedSelection.best(score, 1)[0])
        self.parent, self.parent_loss = values[i].clone(), float(full[i])
        self._population = batch[[i]]
        self.history.append({"start": "ilp" if i < n_ilp else "uniform", "loss": self.parent_loss})

    # -- a generation ---------------------------------------------------------------------------
    def _children(self) -> torch.Tensor:
        seen = {tuple(self.parent.tolist())}
        out = []
        for _ in range(self.offspring * 8):  # duplicates are drawn again, a bounded number of times
            if len(out) == self.offspring:
                break
            c = self.mutation(self.parent, self.generator)
            if c is None:
                break
            key = tuple(c.tolist())
            if key not in seen:
                seen.add(key)
                out.append(c)
        return torch.stack(out) if out else torch.empty(0, self.problem.n_layers, dtype=torch.long)

    def _step(self):
        if self.done:
            return
        if self.parent is None:
            self._start()
            return
        st = self.staged
        st.begin()
        cands = self._children()
        if cands.shape[0] == 0:  # no level switch fits (a one-option menu, a budget at the floor)
            self.done = True
            return
        cands, losses, batch = st.run(cands, self.survivors, last=self.parent[None])  # the parent re-scored
        n = cands.shape[0] - 1
        parent_loss = float(losses[n])
        best = int(st.best(torch.cat([losses[n:], losses[:n]]), 1)[0])  # the parent first: it wins a tie
        best = n if best == 0 else best - 1
        changed = best != n
        self.parent, self.parent_loss = cands[best].clone(), float(losses[best])
        if batch is not None:
            self._population = batch[[best]]
        elif changed:  # a sampled last stage: the new parent's full fitness, for the front
            self._population = evaluate_values(self.problem, self.parent[None])
        self.history.append({"parent_rescored": parent_loss, "winner": self.parent_loss, "changed": changed})
        if self.generations is not None and st.generations >= self.generations:
            self.done = True

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        t, m = self.staged.state_dict()
        t = {f"staged.{k}": v for k, v in t.items()}
        t["mutation_rng"] = self.generator.get_state()
        if self.parent is not None:
            t["parent"] = self.parent.clone()
        return t, {"staged": m, "parent_loss": self.parent_loss, "history": self.history, "done": self.done}

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        self.staged.load_state_dict({k[len("staged."):]: v for k, v in tensors.items() if k.startswith("staged.")},
                                    meta.get("staged") or {})
        if "mutation_rng" in tensors:
            self.generator.set_state(tensors["mutation_rng"])
        self.parent = tensors["parent"].long().clone() if "parent" in tensors else None
        self.parent_loss = meta.get("parent_loss")
        self.history = list(meta.get("history") or [])
        self.done = bool(meta.get("done", False))
