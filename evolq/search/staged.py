"""Staged selection on a bit-allocation problem: many candidates scored on a few fitness
images, the best of them on more, the last few on the largest stage (EvoPress's multi-step
selection; ``evolq.search.evopress``, and the pre-screen of ``nsga2(screen=...)``).

``StagedSelection(problem, images, seed)`` holds the stages' fidelities (images per stage,
cheapest first), runs candidates through them (``run``: each stage passes its best on) and,
every generation (``begin()``), draws each stage a fresh sample of the
fitness images by its own seeded generator (sorted indices into the fitness set; the hold-out
and the evaluation split are not in it). A stage whose fidelity is every fitness image is the
full fitness: it goes through ``problem.evaluate`` (archive, memo, front, Ray actors); the
others through ``problem.sample_losses`` (sampled memo and prefix cache, never archived).

Work is counted by images seen: a stage's computed allocations (memo misses) times its images.
``spent`` is the search's budget in full-fitness equivalents, ``problem.evaluations`` (the
archive: every full evaluation, the sensitivity pass included) plus the sampled stages' images
seen divided by the fitness images; ``report()`` gives each stage's requests, computations,
images seen, seconds and evaluations per second. The generator and the counts are part of
``state_dict()``, so a resumed search draws the samples an uninterrupted one draws.
"""
from __future__ import annotations

import time

import torch

from ..errors import ConfigError

__all__ = ["StagedSelection", "stage_images"]

SAMPLE_SEED = 7919  # the sample generator's seed is the search's seed plus this (apart from the operators')


def stage_images(images, n: int) -> list[int]:
    """Images per stage from ``images`` (ints; floats in (0, 1] are fractions of the ``n`` fitness
    images, rounded up), each clipped to ``n``."""
    out = []
    for k in images:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
            raise ConfigError(f"images per stage are positive counts or fractions, got {k!r}")
        v = -int(-k * n // 1) if isinstance(k, float) and k <= 1.0 else int(k)
        out.append(max(1, min(n, v)))
    return out


class StagedSelection:
    """The stages of one staged search on ``problem`` (see the module docstring).

    Args:
        problem: a ``BitAllocationProblem`` whose quality takes ``sample=`` (``AllocationFitness``).
        images: images per stage (counts or fractions of the fitness images), cheapest first.
        seed: the search's seed (the samples' generator).
    """

    def __init__(self, problem, images, seed: int = 0):
        n = problem.fitness_images
        if n is None:
            raise ConfigError("a staged search needs a fitness that scores samples of its images "
                              "(evolq.allocation.fitness.AllocationFitness)")
        if not images:
            raise ConfigError("a staged search needs at least one stage")
        self.problem, self.n = problem, int(n)
        self.images = stage_images(images, self.n)
        self.generator = torch.Generator().manual_seed(int(seed) + SAMPLE_SEED)
        self.samples: list = [None] * len(self.images)
        self.stats = [{"images": k, "requested": 0, "computed": 0, "images_seen": 0, "seconds": 0.0}
                      for k in self.images]
        self.generations = 0
        self.first: dict | None = None  # the latest generation's first-stage genes and losses (diagnostics)

    # -- samples ----------------------------------------------------------------------------
    def begin(self) -> None:
        """A new generation: forget the last one's sampled memo, draw each stage's sample."""
        clear = getattr(self.problem.quality, "clear_samples", None)
        if clear is not None:
            clear()
        self.samples = [self._draw(k) for k in self.images]
        self.generations += 1

    def _draw(self, k: int) -> torch.Tensor | None:
        if k >= self.n:
            return None
        return torch.randperm(self.n, generator=self.generator)[:k].sort().values

    # -- scoring ----------------------------------------------------------------------------
    def score(self, stage: int, genes: torch.Tensor):
        """Losses (P,) of ``genes`` (P, L) on ``stage``'s sample, and the evaluated batch when the
        stage is the full fitness (else None)."""
        from .baselines import evaluate_values

        genes = torch.as_tensor(genes).long().reshape(-1, self.problem.n_layers)
        st = self.stats[stage]
        t0 = time.perf_counter()
        if self.samples[stage] is None:
            before = self.problem.evaluations
            batch = evaluate_values(self.problem, genes)
            losses = batch.evals.as_subclass(torch.Tensor)[:, 0].double().clone()
            computed = self.problem.evaluations - before
        else:
            batch = None
            losses, computed = self.problem.sample_losses(genes, self.samples[stage])
        st["seconds"] += time.perf_counter() - t0
        st["requested"] += genes.shape[0]
        st["computed"] += computed
        st["images_seen"] += computed * st["images"]
        if stage == 0:
            self.first = {"genes": genes.clone(), "losses": losses.clone()}
        return losses, batch

    def run(self, genes: torch.Tensor, survivors, last: torch.Tensor | None = None):
        """``genes`` (P, L) through every stage: stage s scores what reached it and passes its best
        ``survivors[s]`` on; the last stage also scores ``last`` (rows after the survivors: EvoPress's
        parent). Returns the last stage's (genes, losses, batch) (batch: None unless it is the full
        fitness)."""
        survivors = list(survivors)
        if len(survivors) != len(self.images) - 1:
            raise ConfigError(f"{len(self.images)} stages pass survivors on {len(self.images) - 1} times, got "
                              f"survivors {survivors}")
        genes = torch.as_tensor(genes).long().reshape(-1, self.problem.n_layers)
        for stage in range(len(self.images)):
            if stage == len(self.images) - 1 and last is not None:
                genes = torch.cat([genes, torch.as_tensor(last).long().reshape(-1, genes.shape[1])])
            losses, batch = self.score(stage, genes)
            if stage < len(self.images) - 1:
                genes = genes[self.best(losses, survivors[stage])]
        return genes, losses, batch

    @staticmethod
    def best(losses: torch.Tensor, n: int) -> torch.Tensor:
        """Indices of the ``n`` lowest losses, ties to the earlier candidate."""
        order = sorted(range(losses.shape[0]), key=lambda i: (float(losses[i]), i))
        return torch.tensor(order[:n], dtype=torch.long)

    # -- accounting -------------------------------------------------------------------------
    @property
    def images_seen(self) -> int:
        """Images seen by the sampled (not full) stages' computed allocations."""
        return sum(st["images_seen"] for st in self.stats if st["images"] < self.n)

    @property
    def spent(self) -> float:
        """The search's budget used, in full-fitness evaluations by images seen."""
        seen = self.images_seen
        return self.problem.evaluations + (seen / self.n if seen else 0)

    def report(self) -> list[dict]:
        """Per stage: images, requested, computed, images seen, seconds, evaluations per second."""
        return [dict(st, evaluations_per_s=st["computed"] / st["seconds"] if st["seconds"] else 0.0)
                for st in self.stats]

    def state_dict(self) -> tuple[dict, dict]:
        return {"sample_rng": self.generator.get_state()}, {"stats": self.stats, "generations": self.generations}

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        if "sample_rng" in tensors:
            self.generator.set_state(tensors["sample_rng"])
        if meta.get("stats"):
            self.stats = [dict(st) for st in meta["stats"]]
        self.generations = int(meta.get("generations", 0))
