"""``BlockFitnessProblem``: the block-scale fitness of a whole run, on Ray actors.

The searchers see one ``BlockScaleProblem`` per block and pass, on the driver (their
randomness stays there). Its fitness, with ``SearchConfig(actors=...)``, is this run-long
EvoTorch ``Problem``: EvoTorch's actors hold it (``evolq.scaleout.ActorProblem``), and each
actor loads once per run what the fitness needs: the quantized model, the fitness inputs and
the cached float outputs (``share``), then builds its own ``BlockFitness`` with its own cache
of the quantized activations entering each block.

Per call the driver sends only what changed: the search unit's key and the installed scales
of every searched unit (ViT-Tiny, attn-weights: 9216 floats, 37 KB), once per block and
only to actors that do not hold them yet; then the candidate vectors, split over the actors.
An actor compares the scales it receives with the ones it holds and forgets the cached
activations downstream of the first block whose scales changed, which is what the
in-process engine does. A solution is one unit's candidate scale vector (already decoded
to positive scales), zero-padded to the longest unit of the run.

A candidate's loss does not depend on which actor or sub-batch evaluates it
(``BlockFitness`` groups of a fixed size; pieces that start at multiples of that size), so
0, 1 or N actors give the same losses bit for bit at the same thread count.
"""
from __future__ import annotations

import copy
import functools

import torch

from .._evotorch import evotorch
from ..fitness import BlockFitness, fitness_chunks
from ..losses import get_loss
from ..qnn.qmodel import search_units, unit_block
from ..qnn.scales import ScaleSpace
from ..scaleout import ActorProblem, Placement

__all__ = ["BlockFitnessProblem", "unit_spaces"]


def unit_spaces(qmodel, scope: str, unit: str = "block") -> tuple[dict, ScaleSpace]:
    """The search units of ``qmodel`` (key -> ``ScaleSpace``, block order) and one space over all
    of them, their vectors concatenated in that order."""
    units = search_units(qmodel, scope, unit)
    spaces = {k: ScaleSpace(qs) for k, (_, qs) in units.items()}
    return spaces, ScaleSpace({n: q for k in spaces for n, q in spaces[k].quantizers.items()})


class BlockFitnessProblem(ActorProblem, evotorch.Problem):
    """``(index, space, candidates) -> losses`` like ``BlockFitness``, evaluated by Ray actors.

    Args:
        qmodel: the driver's quantized model (its installed scales are read at every call).
        inputs: the fitness inputs (N, ...); ref: their float outputs (N, K).
        search: the ``SearchConfig`` (scope, unit, loss and its settings, ``max_batch``).
        placement: the actors (``evolq.scaleout.connect``); None evaluates in this process.
        group: ``BlockFitness``'s candidates per forward (1 for a steady-state searcher).
    """

    driver_only = ("qmodel", "spaces", "all_space", "fitness")

    def __init__(self, qmodel, inputs: torch.Tensor, ref: torch.Tensor, search, placement: Placement | None, *,
                 group: int | None = None):
        spaces, all_space = unit_spaces(qmodel, search.scope, search.unit)
        self.keys = list(spaces)
        self.dims = [len(spaces[k]) for k in self.keys]
        self.key_of = {tuple(spaces[k].names): k for k in self.keys}  # a unit's quantizer names -> its key
        super().__init__("min", solution_length=max(self.dims), dtype=torch.float32, eval_dtype=torch.float64,
                         placement=placement)
        self.qmodel, self.spaces, self.all_space, self.fitness = qmodel, spaces, all_space, None
        self.settings = {"scope": search.scope, "unit": search.unit, "loss": search.loss,
                         "batch_size": search.infonce_batch, "temperature": search.temperature,
                         "max_batch": search.max_batch, "group": group}
        self.piece_multiple = fitness_chunks(inputs.shape[0], search.max_batch, group)[0]  # whole groups per actor
        model = qmodel
        if any(t.device.type != "cpu" for t in qmodel.model.state_dict().values()):
            model = copy.deepcopy(qmodel)  # actors receive a CPU copy and move it to their own device
            model.model.to("cpu")
        self.share("qmodel", model)
        self.share("inputs", inputs.detach().cpu())
        self.share("ref", ref.detach().cpu())
        self.unit, self.scales, self._installed = None, None, None
        self.calls, self.evaluations = 0, 0

    # -- driver ---------------------------------------------------------------------------
    def __call__(self, index: int, space: ScaleSpace, cands: torch.Tensor) -> torch.Tensor:
        """Losses (P,) of decoded candidate scales ``cands`` (P, dim) in ``space`` (a search unit of
        block ``index``), as ``BlockFitness`` gives them."""
        if cands.ndim == 1:
            cands = cands.unsqueeze(0)
        self.unit, self.scales = self.key_of[tuple(space.names)], self.all_space.vector().cpu()
        p, d = cands.shape
        vals = torch.zeros(p, self.solution_length, dtype=torch.float32)
        vals[:, :d] = cands.detach().float().cpu()
        batch = self.generate_batch(p, empty=True)
        batch.set_values(vals)
        self.evaluate(batch)
        self.calls += 1
        self.evaluations += p
        return batch.evals[:, 0].as_subclass(torch.Tensor).clone().to(cands.device)

    def invalidate(self, after: int = -1) -> None:
        """(No-op: actors compare the installed scales they receive with theirs.)"""

    def _make_sync_data_for_actors(self):
        return {"unit": self.unit, "scales": self.scales}

    # -- actor (or this process without a placement) -----------------------------------------
    def _prepare(self) -> None:
        qm = self.shared("qmodel")
        dev = self.actor_device
        inputs, ref = self.shared("inputs"), self.shared("ref")
        if dev is not None:
            qm.model.to(dev)
            inputs, ref = inputs.to(dev), ref.to(dev)
        s = self.settings
        self.qmodel = qm
        self.spaces, self.all_space = unit_spaces(qm, s["scope"], s["unit"])
        loss = functools.partial(get_loss(s["loss"]), batch_size=s["batch_size"], temperature=s["temperature"])
        self.fitness = BlockFitness(qm, inputs, ref, loss, s["max_batch"], s["group"])
        self._installed = None

    def _use_sync_data_from_main(self, state) -> None:
        new = state["scales"]
        old = self._installed if self._installed is not None else self.all_space.vector().cpu()
        changed, a = [], 0
        for k, d in zip(self.keys, self.dims):
            if not torch.equal(new[a:a + d], old[a:a + d]):
                changed.append(unit_block(k))
            a += d
        if changed:  # the cached inputs of the blocks after the first changed one are stale
            self.fitness.invalidate(after=min(changed))
            self.all_space.write(new)
        self._installed = new.clone()
        self.unit = state["unit"]

    def _evaluate_batch(self, batch) -> None:
        if self.fitness is None:  # in this process (no placement)
            self._prepare()
        if self.is_main and self.scales is not None and self._actors is None:
            self._use_sync_data_from_main({"unit": self.unit, "scales": self.scales})
        i = self.keys.index(self.unit)
        vals = batch.values.as_subclass(torch.Tensor)[:, :self.dims[i]]
        dev = self.fitness.inputs.device
        losses = self.fitness(unit_block(self.unit), self.spaces[self.unit], vals.to(dev))
        batch.set_evals(losses.double().cpu())
