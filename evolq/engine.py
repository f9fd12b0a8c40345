"""The block-wise schedule (Algorithm 1): P passes over the searched blocks, last
block first, a budget of ``cycles`` fitness evaluations per block, a checkpoint
after every block, and a hold-out check after every pass that keeps or reverts it.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CKPT_NAME, RunLock, clean_stale_tmp, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError
from .fitness import BlockFitness, chunked_forward, reference_outputs
from .losses import get_loss
from .problems.block_scale import PENALTY
from .scales import ScaleSpace

__all__ = ["SearchEngine", "block_seed"]


def block_seed(seed: int, pass_idx: int, block_idx: int) -> int:
    """Independent, reproducible seed for one block search (so resuming needs no RNG state)."""
    return int(np.random.SeedSequence([int(seed), int(pass_idx), int(block_idx)]).generate_state(1)[0])


class SearchEngine:
    """Runs the search on a calibrated ``QModel``.

    Args:
        qmodel: quantized, calibrated model (block view).
        fit_inputs: inputs whose float outputs the fitness matches.
        hold_inputs: held-out inputs that decide whether a pass is kept (may be empty).
        cfg: ``SearchConfig``.
        w_bits: weight bit width (sets the default mutation range).
        checkpoint_dir: folder for ``checkpoint.safetensors`` (None: no checkpoints).
        run_id: fingerprint of everything that must match to resume.
        config_summary: the settings behind ``run_id``, stored in checkpoints so a
            resume with other settings can say which ones differ.
    """

    def __init__(self, qmodel, fit_inputs, hold_inputs, cfg, w_bits: int, checkpoint_dir=None, run_id: str = "",
                 config_summary: dict | None = None):
        self.qmodel, self.cfg = qmodel, cfg
        self.config_summary = config_summary or {}
        self._snap, self._snap_saved = None, True
        self.fit_inputs, self.hold_inputs = fit_inputs, hold_inputs
        loss = get_loss(cfg.loss)
        if cfg.loss == "infonce":
            loss = functools.partial(loss, batch_size=cfg.infonce_batch, temperature=cfg.temperature)
        self.loss = loss
        self.sigma = cfg.eps_for(w_bits)
        self.order = [i for i, b in enumerate(qmodel.blocks) if b.scopes.get(cfg.scope)]
        if cfg.order == "last-first":
            self.order.reverse()
        if not self.order:
            raise ConfigError(f"no block of this model has scales under scope {cfg.scope!r}")
        self.spaces = {i: ScaleSpace(qmodel.blocks[i].searched(cfg.scope)) for i in self.order}
        everything = {}
        for i in sorted(self.order):
            everything.update(self.spaces[i].quantizers)
        self.all_space = ScaleSpace(everything)
        self.ckpt = Path(checkpoint_dir) / CKPT_NAME if checkpoint_dir is not None else None
        self.run_id = run_id
        self.ref = reference_outputs(qmodel, fit_inputs, batch_size=min(256, cfg.max_batch))
        self.hold_ref = (reference_outputs(qmodel, hold_inputs, batch_size=min(256, cfg.max_batch))
                         if hold_inputs.shape[0] else None)
        self.fitness = BlockFitness(qmodel, fit_inputs, self.ref, self.loss, cfg.max_batch)
        self.history: list[dict] = []  # fitness after every evaluation batch, for curves

    # -- helpers ---------------------------------------------------------------
    @torch.no_grad()
    def holdout_loss(self) -> float | None:
        if self.hold_ref is None:
            return None
        out = chunked_forward(lambda xb: self.qmodel.run_blocks(xb).float(), self.hold_inputs,
                              min(256, self.fitness.max_batch))
        return float(self.loss(out.unsqueeze(0), self.hold_ref)[0])

    def current_fitness(self, index: int) -> float:
        space = self.spaces[index]
        return float(self.fitness(index, space, space.vector().unsqueeze(0))[0])

    def _quantizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, q in self.qmodel.quantizers().items():
            for bname, buf in q.named_buffers(recurse=False):
                out[f"q/{name}.{bname}"] = buf.detach().clone()
        return out

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        qs = self.qmodel.quantizers()
        for key, t in tensors.items():
            if not key.startswith("q/"):
                continue
            name, _, bname = key[2:].rpartition(".")
            if name not in qs:
                raise CheckpointError(f"checkpoint names unknown quantizer {name!r}")
            old = getattr(qs[name], bname, None)
            device = old.device if isinstance(old, torch.Tensor) else t.device
            setattr(qs[name], bname, t.clone().to(device))
        self.fitness.invalidate()

    # -- consistent snapshots ----------------------------------------------------
    # After every finished block (and at the end of every pass) the progress record,
    # every quantizer buffer and the pre-pass scales are snapshotted together and
    # written as one atomic checkpoint. On Ctrl-C the model is put back to the last
    # snapshot (the block being searched is discarded) and that snapshot is saved if
    # its write was cut short, so memory, disk and the report agree.
    def _snapshot(self, state: dict, prepass: torch.Tensor) -> None:
        snap = (json.loads(json.dumps(state)), self._quantizer_state(), prepass.detach().clone())
        self._snap_saved = False  # (this order: an interrupt in between re-saves the older snapshot, harmlessly)
        self._snap = snap
        self._save_snapshot()

    def _save_snapshot(self) -> None:
        if self.ckpt is None or self._snap is None or self._snap_saved:
            return
        state, tensors, prepass = self._snap
        tensors = dict(tensors)
        tensors["prepass"] = prepass
        save_checkpoint(self.ckpt, tensors, {"run_id": self.run_id, "config": self.config_summary,
                                             "state": state})
        self._snap_saved = True

    def _restore(self) -> tuple[dict, torch.Tensor]:
        tensors, meta = load_checkpoint(self.ckpt)
        if meta.get("run_id") != self.run_id:
            raise CheckpointError(f"checkpoint {str(self.ckpt)!r} belongs to another run (different model, data "
                                  f"or settings); use another output folder")
        scales = [t for k, t in tensors.items() if k.startswith("q/") and k.endswith(".scale")]
        if "prepass" not in tensors or not all(bool(torch.isfinite(t).all() and (t > 0).all()) for t in scales):
            raise CheckpointError(f"checkpoint {str(self.ckpt)!r} holds invalid scales; delete it to start over")
        state = meta["state"]
        if not all(k in state for k in ("pass", "pos", "blocks", "passes", "evaluations")):
            raise CheckpointError(f"checkpoint {str(self.ckpt)!r} has an incomplete progress record")
        self._install(tensors)
        return state, tensors["prepass"].to(self.all_space.vector().device)

    # -- the schedule -------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Run (or, with ``resume``, continue) the schedule; returns the progress record.

        On ``KeyboardInterrupt`` the model is reset to the last finished block, whose
        checkpoint is on disk, and the interrupt is re-raised.
        """
        if self.ckpt is None:
            return self._run(resume)
        with RunLock(self.ckpt.parent):
            clean_stale_tmp(self.ckpt.parent)
            return self._run(resume)

    def _run(self, resume: bool) -> dict:
        from .problems import BlockScaleProblem
        from .search.registry import make_searcher

        cfg = self.cfg
        n_blocks = len(self.order)
        if resume and self.ckpt is not None and self.ckpt.exists():
            state, prepass = self._restore()
        else:
            state = {"pass": 0, "pos": 0, "known": None, "pass_start_fitness": None, "hold_before": None,
                     "blocks": [], "passes": [], "evaluations": 0, "seconds": 0.0}
            prepass = self.all_space.vector()
        self._snap = (json.loads(json.dumps(state)), self._quantizer_state(), prepass.detach().clone())
        self._snap_saved = True  # the start (or what was just loaded) needs no write
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.passes * n_blocks, initial=min(state["pass"] * n_blocks + state["pos"],
                                                                 cfg.passes * n_blocks),
                       desc="evol-q", unit="block")
        t_run = time.perf_counter() - state["seconds"]
        try:
            while state["pass"] < cfg.passes:
                p = state["pass"]
                if state["pos"] == 0:  # a new pass: snapshot for the hold-out decision
                    self.fitness.invalidate()
                    prepass = self.all_space.vector()
                    state["hold_before"] = self.holdout_loss()
                    state["pass_start_fitness"] = state["known"]
                while state["pos"] < n_blocks:
                    idx = self.order[state["pos"]]
                    rec = self._search_block(p, idx, state["known"], BlockScaleProblem, make_searcher)
                    state["known"] = rec["final_fitness"] if cfg.reuse_fitness else None
                    state["evaluations"] += rec["evaluations"]
                    state["blocks"].append(rec)
                    state["pos"] += 1
                    state["seconds"] = time.perf_counter() - t_run
                    self._snapshot(state, prepass)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(block=self.qmodel.blocks[idx].name, fitness=f"{rec['final_fitness']:.4f}")
                hold_after = self.holdout_loss()
                before = state["hold_before"]
                keep = (hold_after is None or before is None
                        or (math.isfinite(hold_after) and (not math.isfinite(before) or hold_after <= before)))
                if not keep:
                    self.all_space.write(prepass)
                    self.fitness.invalidate()
                    state["known"] = state["pass_start_fitness"]
                state["passes"].append({"pass": p, "holdout_before": before,
                                        "holdout_after": hold_after, "kept": keep})
                state["pass"] += 1
                state["pos"] = 0
                state["seconds"] = time.perf_counter() - t_run
                self._snapshot(state, self.all_space.vector())
        except KeyboardInterrupt:
            # back to the last finished block (memory == checkpoint), then let the caller stop
            self._install(self._snap[1])
            self._save_snapshot()
            raise
        finally:
            if bar is not None:
                bar.close()
        state["seconds"] = time.perf_counter() - t_run
        return state

    def _search_block(self, p: int, idx: int, known, problem_cls, make_searcher) -> dict:
        cfg = self.cfg
        space = self.spaces[idx]
        t0 = time.perf_counter()
        evals0 = self.fitness.evaluations
        start_f = known if known is not None else self.current_fitness(idx)
        if not math.isfinite(start_f):  # a model that is already broken: any finite candidate is better
            start_f = PENALTY
        seed = block_seed(cfg.seed, p, idx)
        problem = problem_cls(space.vector(), lambda c: self.fitness(idx, space, c),
                              parameterization=cfg.noise, start_fitness=start_f, seed=seed)
        plan = make_searcher(cfg.searcher, problem, budget=cfg.cycles, sigma=self.sigma,
                             population=cfg.population, samples=cfg.samples, popsize=cfg.popsize,
                             start_fitness=start_f, seed=seed)
        for _ in range(plan.steps):
            plan.searcher.step()
        final, best = problem.best_scales, problem.best_fitness
        # never install a degenerate candidate: non-finite or non-positive scales, a penalised
        # (NaN/inf) loss, or a loss no better than the start's
        if (not bool(torch.isfinite(final).all()) or not bool((final > 0).all()) or not math.isfinite(best)
                or not best < PENALTY or not best <= start_f):
            final, best = space.vector(), start_f
        space.write(final)
        self.fitness.invalidate(after=idx)
        return {"pass": p, "block": self.qmodel.blocks[idx].name, "start_fitness": start_f,
                "final_fitness": best, "evaluations": self.fitness.evaluations - evals0,
                "seconds": time.perf_counter() - t0, "history": problem.history}
