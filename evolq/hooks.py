"""Hooks and the subscribers evolq attaches to them (EvoTorch's style: an algorithm
fires hooks in ``step()``, loggers append themselves to them).

``SearchEngine`` fires:

* ``run_start_hook(state)``: the progress record at the start (restored on resume);
* ``block_start_hook(info)``: ``{"pass", "block", "index", "position", "start_fitness"}`` once a
  block's start is known, before its search;
* ``block_end_hook(record)``: the block record (start/final fitness, evaluations,
  seconds, ``history`` = best fitness after each evaluation batch);
* ``pass_end_hook(record)``: ``{"pass", "holdout_before", "holdout_after", "kept"}``;
* ``run_end_hook(state)``: the final progress record (also after Ctrl-C);
* ``fitness_hook(index, candidates, losses)``: after every fitness call; a subscriber
  may return replacement losses (fault injection, logging).

A subscriber is any callable; ``subscribe(engine)`` methods below append themselves.

A start point fires ``StartHooks`` (``prepare_model(..., subscribers=[...])``); the ``ofq``
fine-tune fires:

* ``epoch_start_hook(info)``: ``{"epoch", "epochs"}`` (``epoch`` counts from 1: the epoch about to
  run) before its first step; an exception raised here stops the run as a kill would, with the
  checkpoint of the epoch before;
* ``cga_start_hook(info)``: ``{"epoch", "layers", "deltas", "masks"}`` as CGA's phase begins: the
  trained layers' names, their weight changes at that point and CGA's masks (True: a confident
  weight, frozen from here on); for reading only;
* ``epoch_end_hook(record)``: the epoch's history record, once its checkpoint is written;
* ``train_end_hook(qmodel)``: after the last step, before the trained changes are frozen into the
  quantizers: ``qmodel`` still runs the training forwards (which the frozen model reproduces).
"""
from __future__ import annotations

import time

__all__ = ["Hook", "StartHooks", "ProgressBar", "FitnessCurve", "BlockLog", "AllocationProgress"]


class Hook(list):
    """A list of callables, called in order with the same arguments."""

    def __call__(self, *args, **kwargs):
        for f in list(self):
            f(*args, **kwargs)


class StartHooks:
    """The hooks a start point fires (see the module docstring); subscribers append to them."""

    def __init__(self):
        self.epoch_start_hook, self.cga_start_hook = Hook(), Hook()
        self.epoch_end_hook, self.train_end_hook = Hook(), Hook()


class ProgressBar:
    """A tqdm bar over the blocks of all passes (its time left is tqdm's estimate from the block
    rate); the postfix shows the block, its fitness, the evaluations per second since the start
    and, when the fitness runs on Ray actors, the actors alive (and restarted)."""

    def __init__(self, desc: str = "evol-q", every: float = 1.0):
        self.desc, self.bar, self.engine, self.every = desc, None, None, every
        self._t0, self._e0, self._last, self._block = 0.0, 0, 0.0, {}

    def subscribe(self, engine) -> ProgressBar:
        self.engine = engine
        engine.run_start_hook.append(self.start)
        engine.block_end_hook.append(self.update)
        engine.fitness_hook.append(self.tick)
        engine.run_end_hook.append(self.close)
        return self

    def start(self, state):
        from tqdm.auto import tqdm

        n, total = len(self.engine.order), self.engine.search.passes * len(self.engine.order)
        self.bar = tqdm(total=total, initial=min(state["pass"] * n + state["pos"], total), desc=self.desc,
                        unit="block")
        self._t0, self._e0 = time.perf_counter(), self.engine.fitness.evaluations

    def postfix(self) -> dict:
        """What the bar shows after the block name and fitness."""
        out = dict(self._block)
        dt = time.perf_counter() - self._t0
        if dt > 0 and self.engine is not None:
            out["evals/s"] = f"{(self.engine.fitness.evaluations - self._e0) / dt:.1f}"
        so = getattr(self.engine, "scale_out", None)
        if so is not None:
            out["actors"] = _actors_text(so.stats)
        return out

    def tick(self, index, cands, losses):
        now = time.perf_counter()
        if self.bar is not None and now - self._last >= self.every:
            self._last = now
            self.bar.set_postfix(self.postfix())

    def update(self, rec):
        if self.bar is not None:
            self._block = {"block": rec["block"], "fitness": f"{rec['final_fitness']:.4f}"}
            self.bar.update(1)
            self.bar.set_postfix(self.postfix())

    def close(self, state=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BlockLog:
    """The report's per-block and per-pass records (seeded from a restored run)."""

    def __init__(self):
        self.blocks: list[dict] = []
        self.passes: list[dict] = []

    def subscribe(self, engine) -> BlockLog:
        engine.run_start_hook.append(self.start)
        engine.block_end_hook.append(lambda rec: self.blocks.append({k: v for k, v in rec.items() if k != "history"}))
        engine.pass_end_hook.append(lambda rec: self.passes.append(dict(rec)))
        return self

    def start(self, state):
        self.blocks = [{k: v for k, v in b.items() if k != "history"} for b in state["blocks"]]
        self.passes = list(state["passes"])


class FitnessCurve:
    """Best fitness after every evaluation batch, block after block (seeded from a restored run)."""

    def __init__(self):
        self.values: list[float] = []

    def subscribe(self, engine) -> FitnessCurve:
        engine.run_start_hook.append(lambda state: setattr(self, "values", [h for b in state["blocks"]
                                                                             for h in b["history"]]))
        engine.block_end_hook.append(lambda rec: self.values.extend(rec["history"]))
        return self


def _actors_text(stats) -> str:
    """``alive/asked`` actors, and how many were restarted."""
    return f"{stats.alive}/{stats.actors}" + (f" ({stats.restarts} restarted)" if stats.restarts else "")


class AllocationProgress:
    """A tqdm bar over the fitness evaluations of a bit-allocation run (``AllocationEngine``):
    generation, front size, best loss under the budget and, on Ray actors, the actors alive (and
    restarted); tqdm shows the evaluations per second and estimates the time left."""

    def __init__(self, desc: str = "allocate"):
        self.desc, self.bar = desc, None

    def subscribe(self, engine) -> AllocationProgress:
        self.engine = engine
        engine.run_start_hook.append(self.start)
        engine.generation_hook.append(self.update)
        engine.run_end_hook.append(self.close)
        engine.fitness.on_evaluation.append(self.tick)
        return self

    def start(self, state):
        from tqdm.auto import tqdm

        e = self.engine
        self.bar = tqdm(total=e.evaluations, initial=min(e.problem.evaluations, e.evaluations), desc=self.desc,
                        unit="eval")

    def tick(self, fitness):
        if self.bar is not None and self.bar.n < self.bar.total:
            self.bar.update(1)

    def update(self, info):
        if self.bar is not None:
            self.bar.n = min(int(info.get("spent", info["evaluations"])), self.bar.total)  # staged: images seen
            self.bar.set_postfix(self.postfix(info))
            self.bar.refresh()

    def postfix(self, info: dict) -> dict:
        out = {"gen": info["generation"], "front": info["front"], "best": f"{info['best_loss']:.4f}"}
        so = getattr(self.engine, "scale_out", None)
        if so is not None:
            out["actors"] = _actors_text(so.stats)
        return out

    def close(self, state=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
