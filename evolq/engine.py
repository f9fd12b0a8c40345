"""The block-wise schedule (Algorithm 1): P passes over the searched blocks, last
block first, a budget of ``cycles`` fitness evaluations per block, a checkpoint after
every block, and a hold-out check after every pass that keeps or reverts it.
Progress bars, curves and reports subscribe to the hooks (``evolq.hooks``).

The fitness runs in this process (``BlockFitness``) or, given a ``Placement``
(``evolq.scaleout``), on Ray actors (``BlockFitnessProblem``): the schedule, the searchers
and their randomness, the hold-out and the checkpoints stay here either way.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .checkpoint import RunCheckpoint, new_state
from .errors import ConfigError
from .fitness import BlockFitness, reference_outputs
from .holdout import HoldOut
from .hooks import Hook
from .losses import make_loss
from .problems.block_scale import PENALTY
from .qnn.qmodel import search_units, unit_block

__all__ = ["SearchEngine", "block_seed"]


def block_seed(seed: int, pass_idx: int, key) -> int:
    """Independent, reproducible seed for one unit's search (so resuming needs no RNG state);
    ``key`` is a block index, or (block index, j) for layer unit j."""
    parts = [key] if isinstance(key, int) else [key[0], 1 + key[1]]
    return int(np.random.SeedSequence([int(seed), int(pass_idx), *map(int, parts)]).generate_state(1)[0])


class SearchEngine:
    """Searches a calibrated ``QModel`` against cached float outputs of ``fit_inputs``;
    ``hold_inputs`` (may be empty) decide whether each pass is kept; ``checkpoint``
    holds the run state (default: in memory only); ``placement`` (``evolq.scaleout.connect``)
    puts the fitness on Ray actors."""

    def __init__(self, qmodel, fit_inputs, hold_inputs, search, w_bits: int, checkpoint: RunCheckpoint | None = None,
                 placement=None):
        from .problems.block_fitness import unit_spaces
        from .search import is_steady_state

        self.qmodel, self.search = qmodel, search
        self.loss, self.sigma = make_loss(search), search.eps_for(w_bits)
        units = search_units(qmodel, search.scope, search.unit)  # key -> (name or None, quantizers)
        if not units:
            raise ConfigError(f"no block of this model has scales under scope {search.scope!r}")
        self.spaces, self.all_space = unit_spaces(qmodel, search.scope, search.unit)
        self.unit_names = {k: name for k, (name, _) in units.items()}
        self.order = list(self.spaces)
        if search.order == "last-first":
            self.order.reverse()
        bs = min(256, search.max_batch)
        ref = reference_outputs(qmodel, fit_inputs, bs)
        group = 1 if is_steady_state(search.searcher) else None  # one candidate per call: no padded groups
        if placement is None:
            self.fitness = BlockFitness(qmodel, fit_inputs, ref, self.loss, search.max_batch, group)
        else:
            from .problems.block_fitness import BlockFitnessProblem

            self.fitness = BlockFitnessProblem(qmodel, fit_inputs, ref, search, placement, group=group)
        self.holdout = HoldOut(qmodel, hold_inputs, self.loss, search.max_batch, search.holdout_metric)
        self.ckpt = checkpoint or RunCheckpoint(qmodel)
        self.ckpt.on_install.append(self.fitness.invalidate)
        (self.run_start_hook, self.block_start_hook, self.block_end_hook, self.pass_end_hook, self.run_end_hook,
         self.fitness_hook) = (Hook() for _ in range(6))

    @property
    def scale_out(self):
        """The Ray side of the run (``ActorProblem``: ``stats``, ``actor_info``, ``dispatch_hook``), or None."""
        return self.fitness if hasattr(self.fitness, "stats") else None

    def evaluate(self, index: int, cands: torch.Tensor) -> torch.Tensor:
        """Losses of candidate scale vectors for block ``index`` (subscribers may replace them)."""
        losses = self.fitness(unit_block(index), self.spaces[index], cands)
        for f in list(self.fitness_hook):
            out = f(index, cands, losses)
            losses = losses if out is None else out
        return losses

    def run(self, resume: bool = False) -> dict:
        """Run (or, with ``resume``, continue) the schedule; returns the progress record.
        On ``KeyboardInterrupt`` the model goes back to the last finished block, whose
        checkpoint is on disk, and the interrupt is re-raised."""
        with self.ckpt:
            restored = self.ckpt.restore(self.all_space.vector().device) if resume else None
            state, prepass = restored or (new_state(), self.all_space.vector())
            self.ckpt.begin(state, prepass)
            self.run_start_hook(state)
            t_run = time.perf_counter() - state["seconds"]
            try:
                while state["pass"] < self.search.passes:
                    if state["pos"] == 0:  # a new pass: remember where it started, for the hold-out decision
                        self.fitness.invalidate()
                        prepass = self.all_space.vector()
                        # the model's hold-out score is known after a pass (after if kept, before if reverted)
                        before = state["hold_now"] if "hold_now" in state else self.holdout.score()
                        state["hold_before"], state["pass_start_fitness"] = before, state["known"]
                    while state["pos"] < len(self.order):
                        rec = self._search_block(state["pass"], self.order[state["pos"]], state["known"])
                        state["known"] = rec["final_fitness"] if self.search.reuse_fitness else None
                        state["evaluations"] += rec["evaluations"]
                        state["blocks"].append(rec)
                        state["pos"] += 1
                        state["seconds"] = time.perf_counter() - t_run
                        self.ckpt.snapshot(state, prepass)
                        self.block_end_hook(rec)
                    before, after = state["hold_before"], self.holdout.score()
                    keep = self.holdout.keep(before, after)
                    if not keep:
                        self.all_space.write(prepass)
                        self.fitness.invalidate()
                        state["known"] = state["pass_start_fitness"]
                    state["hold_now"] = after if keep else before
                    rec = {"pass": state["pass"], "holdout_before": before, "holdout_after": after, "kept": keep}
                    state["passes"].append(rec)
                    state["pass"], state["pos"] = state["pass"] + 1, 0
                    state["seconds"] = time.perf_counter() - t_run
                    self.ckpt.snapshot(state, self.all_space.vector())
                    self.pass_end_hook(rec)
            except KeyboardInterrupt:
                self.ckpt.rollback()  # back to the last finished block (memory == checkpoint)
                raise
            finally:
                if self.scale_out is not None:
                    self.fitness.close()  # the actors end with the run
                self.run_end_hook(state)
        state["seconds"] = time.perf_counter() - t_run
        return state

    def _search_block(self, p: int, idx: int, known) -> dict:
        from ._evotorch import quiet
        from .problems import BlockScaleProblem
        from .search import make_searcher
        space, t0, evals0 = self.spaces[idx], time.perf_counter(), self.fitness.evaluations
        b, unit, s = unit_block(idx), self.unit_names[idx], self.search
        extra = {"unit": unit} if unit else {}
        start_f = known if known is not None else float(self.evaluate(idx, space.vector().unsqueeze(0))[0])
        if not math.isfinite(start_f):  # a model that is already broken: any finite candidate is better
            start_f = PENALTY
        self.block_start_hook({"pass": p, "block": self.qmodel.blocks[b].name, "index": b,
                               "position": self.order.index(idx), "start_fitness": start_f, **extra})
        seed = block_seed(s.seed, p, idx)
        with quiet():
            problem = BlockScaleProblem(space.vector(), lambda c: self.evaluate(idx, c), parameterization=s.noise,
                                        start_fitness=start_f, seed=seed)
            plan = make_searcher(s.searcher, problem, budget=s.cycles, sigma=self.sigma, popsize=s.popsize,
                                 start_fitness=start_f, seed=seed, population=s.population, samples=s.samples,
                                 searcher_kwargs=s.searcher_kwargs)
            for _ in range(plan.steps):
                plan.searcher.step()
        final, best = problem.outcome(start_f)  # the start again if the best is degenerate or no better
        space.write(final)
        self.fitness.invalidate(after=b)
        return {"pass": p, "block": self.qmodel.blocks[b].name, "start_fitness": start_f, "final_fitness": best,
                "evaluations": self.fitness.evaluations - evals0, "seconds": time.perf_counter() - t0,
                "history": problem.history, **extra}
