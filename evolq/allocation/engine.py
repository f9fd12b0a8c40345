"""The bit-allocation schedule: sensitivities (when the searcher needs them), then generations of
the searcher until the evaluation budget is spent, a checkpoint after every generation, and the
choice of one allocation under the budget by the hold-out.

``AllocationEngine.run(resume=True)`` continues a killed run from its last generation: the
problem's archive and random state, the searcher's population and the fitness memo come back,
so the front is identical to an uninterrupted run's. Progress bars and logs subscribe to the
hooks, as for the scale search (``evolq.hooks``).

With a problem on Ray actors (``BitAllocationProblem(placement=...)``) the schedule, the
searcher and its randomness, the repair, the archive, the memo and the checkpoint stay here;
the actors compute the losses of new allocations and end with the run.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checkpoint import RunFolder, fingerprint, load_checkpoint, save_checkpoint
from ..errors import CheckpointError
from ..hooks import Hook
from ..search.allocators import NEEDS_SENSITIVITY, allocator_state, load_allocator_state, make_allocator

__all__ = ["AllocationEngine", "ALLOC_CKPT_NAME"]

ALLOC_CKPT_NAME = "allocation.safetensors"


class AllocationEngine:
    """Runs ``searcher`` on ``problem`` for ``evaluations`` fitness evaluations (distinct allocations
    evaluated, ``problem.evaluations``: the same count in one process or on Ray actors; for a
    searcher with a ``spent`` property, the staged ones, its full-fitness equivalents by images
    seen, ``evolq.search.staged``).

    Args:
        problem: a ``BitAllocationProblem`` whose quality callable is ``fitness``.
        fitness: the ``AllocationFitness`` (its evaluation count is the budget's unit).
        holdout: a callable scoring allocations on held-out inputs (``(P, L) -> (P,)``), or None.
        reference: the allocation the sensitivities are measured around.
        compare_additive: the additive answer (``additive``: sensitivity + ILP at the budget) joins
            the hold-out's candidates for the final choice (else it is only reported).
        folder: where the checkpoint goes (None: memory only); ``settings``: what a resumed run
            must share with the run it continues.
    """

    def __init__(self, problem, fitness, *, searcher="nsga2", searcher_kwargs=None, popsize: int = 24,
                 evaluations: int = 500, seed: int = 0, holdout=None, reference=None, select: int = 6,
                 compare_additive: bool = False, folder=None, settings: dict | None = None):
        self.problem, self.fitness, self.holdout = problem, fitness, holdout
        self.searcher_name, self.searcher_kwargs = searcher, dict(searcher_kwargs or {})
        self.popsize, self.evaluations, self.seed, self.select = int(popsize), int(evaluations), int(seed), int(select)
        self.reference, self.compare_additive = reference, bool(compare_additive)
        self.path = Path(folder) / ALLOC_CKPT_NAME if folder is not None else None
        self.run_id = fingerprint(settings or {})
        self.run_start_hook, self.generation_hook, self.run_end_hook = Hook(), Hook(), Hook()
        self.searcher = None
        self.sensitivity = None
        self.actor_counters: dict = {}  # the actors' fitness counters at the end of the run (block reuse)

    @property
    def needs_sensitivity(self) -> bool:
        return isinstance(self.searcher_name, str) and self.searcher_name in NEEDS_SENSITIVITY

    # -- checkpoint -----------------------------------------------------------------------
    def _save(self, state: dict) -> None:
        if self.path is None:
            return
        tensors, meta = allocator_state(self.searcher) if self.searcher is not None else ({}, {})
        p = self.problem
        keys = list(p.archive)
        if keys:
            tensors["archive_genes"] = torch.tensor(keys, dtype=torch.int64)
            tensors["archive_values"] = torch.tensor([p.archive[k] for k in keys], dtype=torch.float64)
        mkeys = list(self.fitness.memo)
        if mkeys:
            tensors["memo_genes"] = torch.tensor(mkeys, dtype=torch.int64)
            tensors["memo_losses"] = torch.tensor([self.fitness.memo[k] for k in mkeys], dtype=torch.float64)
        if self.sensitivity is not None:
            tensors["sensitivity"] = self.sensitivity
        if p.generator is not None:
            tensors["problem_rng"] = p.generator.get_state()
        counters = {"evaluations": self.fitness.evaluations, "requests": self.fitness.requests,
                    "repairs": p.repairs, "sample_evaluations": getattr(self.fitness, "sample_evaluations", 0),
                    "sample_images": getattr(self.fitness, "sample_images", 0)}
        save_checkpoint(self.path, tensors, {"run_id": self.run_id, "state": state, "searcher": meta,
                                             "counters": counters})

    def _restore(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        tensors, meta = load_checkpoint(self.path)
        if meta.get("run_id") != self.run_id:
            raise CheckpointError(f"{str(self.path)!r} belongs to another allocation run (other model, data or "
                                  f"settings); use another folder")
        p = self.problem
        if "archive_genes" in tensors:
            p.archive = {tuple(g.tolist()): tuple(v.tolist())
                         for g, v in zip(tensors["archive_genes"], tensors["archive_values"])}
        if "memo_genes" in tensors:
            self.fitness.memo = {tuple(g.tolist()): float(v)
                                 for g, v in zip(tensors["memo_genes"], tensors["memo_losses"])}
        self.sensitivity = tensors.get("sensitivity")
        self._rng = tensors.get("problem_rng")  # set once the searcher is built (building it draws numbers)
        c = meta.get("counters", {})
        self.fitness.evaluations, self.fitness.requests = c.get("evaluations", 0), c.get("requests", 0)
        if hasattr(self.fitness, "sample_evaluations"):
            self.fitness.sample_evaluations = c.get("sample_evaluations", 0)
            self.fitness.sample_images = c.get("sample_images", 0)
        p.repairs = c.get("repairs", 0)
        self._searcher_state = (tensors, meta.get("searcher") or {})
        return meta["state"]

    # -- the run ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Search, then choose; returns the result record (see ``result``)."""
        with _Folder(self.path):
            return self._run(resume)

    def _run(self, resume: bool) -> dict:
        t0 = time.perf_counter()
        self._searcher_state = self._rng = None
        state = self._restore() if resume else None
        if state is None and self.path is not None and self.path.exists():
            raise CheckpointError(f"{str(self.path.parent)!r} already holds an allocation run: resume it or choose "
                                  f"another folder")
        state = state or {"generation": 0, "done": False, "seconds": 0.0, "sensitivity_evaluations": 0}
        t0 -= state["seconds"]
        self.run_start_hook(state)
        if self.needs_sensitivity and self.sensitivity is None:
            before = self.problem.evaluations
            self.sensitivity = self.problem.sensitivity(self.reference)
            state["sensitivity_evaluations"] = self.problem.evaluations - before
            state["seconds"] = time.perf_counter() - t0
            self._save(state)
        if self.sensitivity is not None:
            self.problem.priority = torch.where(torch.isfinite(self.sensitivity), self.sensitivity,
                                                torch.zeros((), dtype=torch.float64))
        self.searcher = make_allocator(self.searcher_name, self.problem, popsize=self.popsize,
                                       sensitivity=self.sensitivity, seed=self.seed,
                                       searcher_kwargs=self.searcher_kwargs, holdout=self.holdout)
        if self._searcher_state is not None and state["generation"] > 0:
            load_allocator_state(self.searcher, *self._searcher_state)
        if self._rng is not None and self.problem.generator is not None:
            self.problem.generator.set_state(self._rng)
        try:
            while not state["done"] and self.spent < self.evaluations:
                self.searcher.step()
                state["generation"] += 1
                state["done"] = bool(getattr(self.searcher, "done", False))
                state["seconds"] = time.perf_counter() - t0
                self._save(state)
                self.generation_hook(self.progress(state))
            if not self.problem.front():  # a searcher that ended above the budget (greedy on a small budget)
                from ..search.baselines import evaluate_values

                evaluate_values(self.problem, self.problem.repair(self.reference[None]))
                state["fallback"] = "the searcher found nothing under the budget: the repaired reference"
            if self.scale_out is not None:
                self.actor_counters = self.problem.actor_counters()
        finally:
            if self.scale_out is not None:
                self.problem.close()  # the actors end with the run
            self.run_end_hook(state)
        state["seconds"] = time.perf_counter() - t0
        return self.result(state)

    @property
    def spent(self):
        """The budget used: the searcher's ``spent`` where it has one, else ``problem.evaluations``."""
        spent = getattr(self.searcher, "spent", None)
        return self.problem.evaluations if spent is None else spent

    @property
    def scale_out(self):
        """The problem when it evaluates on Ray actors (``stats``, ``actor_info``, ``dispatch_hook``), else None."""
        return self.problem if getattr(self.problem, "placement", None) is not None else None

    def progress(self, state: dict) -> dict:
        front = self.problem.front()
        best = min((v[0] for _, v in front), default=math.inf)
        return {"generation": state["generation"], "evaluations": self.problem.evaluations,
                "spent": self.spent, "budget_evaluations": self.evaluations, "front": len(front), "best_loss": best,
                "seconds": state["seconds"]}

    def additive(self) -> dict | None:
        """The additive answer, for searchers that measured sensitivities: the ILP point at the budget
        (``evolq.search.ilp``), its fitness loss and costs, and its hold-out loss; None otherwise."""
        if self.sensitivity is None:
            return None
        from ..search.ilp import ilp_points

        pts = ilp_points(self.problem, self.sensitivity, 1)
        if pts.shape[0] == 0:
            return None
        g = pts[:1]
        p = self.problem
        out = {"genes": g[0].tolist(), "loss": float(self.fitness(g)[0])}
        out.update({c.name: float(c(g)[0]) for c in p.costs})
        if self.holdout is not None:
            out["holdout_loss"] = float(self.holdout(g)[0])
        return out

    def result(self, state: dict) -> dict:
        """The front under the budget (allocation, costs, proxy loss; hold-out loss for the
        ``select`` lowest-loss points), the chosen index (lowest hold-out loss) and the additive
        answer (``additive``; with ``compare_additive`` a candidate too, appended to the points with
        ``"additive": True`` where the front does not hold it)."""
        p = self.problem
        front = p.front()
        names = ["loss"] + [c.name for c in p.costs]
        points = [{"genes": list(k), **dict(zip(names, v))} for k, v in front]
        stats = self.fitness.stats(self.actor_counters)  # the search's work, before the additive point's
        additive = self.additive()
        chosen = None
        if points:
            ranked = sorted(range(len(points)), key=lambda i: points[i]["loss"])[: self.select]
            if self.holdout is not None:
                scores = self.holdout(torch.tensor([points[i]["genes"] for i in ranked]))
                for i, s in zip(ranked, scores.tolist()):
                    points[i]["holdout_loss"] = s
                if self.compare_additive and additive is not None:
                    at = next((i for i, q in enumerate(points) if q["genes"] == additive["genes"]), None)
                    if at is None:
                        points.append({**additive, "additive": True})
                        at = len(points) - 1
                    points[at]["holdout_loss"] = additive["holdout_loss"]
                    ranked = ranked + [at] if at not in ranked else ranked
                chosen = min(ranked, key=lambda i: (points[i]["holdout_loss"], points[i]["loss"]))
            else:
                chosen = ranked[0]
        if additive is not None and chosen is not None:
            additive["chosen"] = points[chosen]["genes"] == additive["genes"]
        staged = self.searcher.report() if hasattr(self.searcher, "report") else None
        return {"front": points, "chosen": chosen, "generations": state["generation"],
                "evaluations": self.problem.evaluations, "spent": self.spent, "staged": staged,
                "sensitivity_evaluations": state.get("sensitivity_evaluations", 0),
                "fallback": state.get("fallback"), "additive": additive,
                "seconds": state["seconds"], "fitness": stats, "repairs": p.repairs,
                "archive_size": len(p.archive)}


class _Folder(RunFolder):
    """The run folder's lock and stale temporary files, around a run."""

    def __init__(self, path):
        self.path = path
