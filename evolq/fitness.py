"""The fitness hot loop: cached, batched evaluation of candidate scale vectors.

* Full-precision outputs of the calibration set are computed once (``reference_outputs``).
* The quantized activations entering each block are cached; while block i is searched
  nothing before it changes, so candidates run only from block i to the output.
  With the default last-block-first order one forward pass at the start of a pass
  fills the cache for every block of that pass.
* Candidates are evaluated together: the block's quantizers hold a group of scale
  vectors at once (population mode), and the rest of the model runs on
  group x images samples, chunked so no forward sees more than ``max_batch`` samples.
* A candidate's loss does not depend on the other candidates of its call (so a population
  split over Ray actors, ``evolq.scaleout``, gives the in-process losses bit for bit): the
  image chunks and the group size are fixed for the run, a last, partial group is padded
  with copies of its last candidate, and the loss is computed one candidate at a time.

Works on any object with ``blocks`` (each with ``run``), ``run_blocks`` and
``set_quant_enabled``: a ``QModel`` from any adapter.
"""
from __future__ import annotations

import torch

from .qnn.scales import ScaleSpace

__all__ = ["reference_outputs", "chunked_forward", "is_oom", "BlockFitness", "fitness_chunks"]


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error: CUDA's, or the CPU allocator's."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def chunked_forward(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of ``batch_size`` samples, concatenated. On an
    out-of-memory error the chunk size is halved and the failed chunk retried."""
    outs, i, bs = [], 0, max(1, int(batch_size))
    while i < x.shape[0]:
        try:
            outs.append(fn(x[i:i + bs]))
        except Exception as e:
            if not is_oom(e) or bs <= 1:
                raise
            bs //= 2
            _free_cache()
            continue
        i += bs
    return torch.cat(outs)


@torch.no_grad()
def reference_outputs(qmodel, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Outputs of the float model (quantizers off) for ``inputs``."""
    qmodel.set_quant_enabled(False)
    try:
        return chunked_forward(lambda xb: qmodel.run_blocks(xb).float(), inputs, batch_size)
    finally:
        qmodel.set_quant_enabled(True)


def fitness_chunks(n: int, max_batch: int, group: int | None = None) -> tuple[int, int]:
    """(candidates, images) per forward of ``BlockFitness`` on ``n`` images: image chunks of
    ``min(n, max_batch)``, and as many candidates as ``max_batch`` then allows (at most ``group``)."""
    ic = max(1, min(n, int(max_batch)))
    pc = max(1, int(max_batch) // ic)
    return (pc if group is None else min(pc, max(1, int(group)))), ic


class BlockFitness:
    """Batched fitness of candidate scale vectors for one block at a time.

    Args:
        qmodel: the quantized model (block view).
        inputs: model inputs of the fitness set, (N, ...).
        ref: cached float outputs for ``inputs``, (N, K).
        loss: ``loss(out (P, N, K), ref (N, K)) -> (P,)``.
        max_batch: most samples (candidates x images) in one forward.
        group: candidates per forward at most (None: as many as ``max_batch`` allows). A
            steady-state searcher, which evaluates one candidate per call, takes 1, so its
            calls are not padded to a whole group.
    """

    def __init__(self, qmodel, inputs: torch.Tensor, ref: torch.Tensor, loss, max_batch: int = 512,
                 group: int | None = None):
        self.qmodel, self.inputs, self.ref, self.loss = qmodel, inputs, ref, loss
        self.max_batch = int(max_batch)
        self.group = None if group is None else max(1, int(group))
        self._acts: dict[int, torch.Tensor] = {}  # block index -> quantized input of that block
        self.calls = 0
        self.evaluations = 0
        self.oom_retries = 0  # times an out-of-memory error halved max_batch

    # -- activation cache --------------------------------------------------------
    def invalidate(self, after: int = -1) -> None:
        """Forget cached inputs of blocks after ``after`` (their upstream changed)."""
        self._acts = {i: a for i, a in self._acts.items() if i <= after}

    @torch.no_grad()
    def block_input(self, index: int) -> torch.Tensor:
        """Quantized activations entering block ``index`` (cached)."""
        if index == 0:
            return self.inputs
        if index in self._acts:
            return self._acts[index]
        j = max([i for i in self._acts if i < index], default=0)
        x = self.inputs if j == 0 else self._acts[j]
        for b in range(j, index):
            x = chunked_forward(self.qmodel.blocks[b].run, x, self.max_batch)
            self._acts[b + 1] = x
        return x

    # -- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, index: int, space: ScaleSpace, cands: torch.Tensor) -> torch.Tensor:
        """Model outputs (P, N, K) with candidate p's scales in block ``index``.

        Forwards see at most ``max_batch`` samples: a group of candidates (``chunks``) on
        one image chunk at a time, whole image sets for several candidates while they fit,
        else one candidate on image chunks. A last group with fewer candidates is padded
        with copies of its last one, so every forward of the run has the same shape and a
        candidate's outputs are the same alone or in any population. On an out-of-memory
        error ``max_batch`` is halved for the rest of the run and the call is redone: the
        same losses up to float rounding (chunk sizes change the summation order of some
        kernels; see docs/reliability.md).
        """
        x_in = self.block_input(index)
        p_total, n = cands.shape[0], x_in.shape[0]
        while True:
            try:
                return self._outputs(index, space, cands, x_in, p_total, n)
            except Exception as e:
                if not is_oom(e) or self.max_batch <= 1:
                    raise
                self.max_batch //= 2  # smaller chunks, same candidates and images
                self.oom_retries += 1
                _free_cache()

    def chunks(self, n: int) -> tuple[int, int]:
        """(candidates, images) per forward on ``n`` images: fixed for the run (``n``, ``max_batch``
        and ``group`` decide them, never the number of candidates in a call)."""
        return fitness_chunks(n, self.max_batch, self.group)

    def _outputs(self, index, space, cands, x_in, p_total, n):
        pc, ic = self.chunks(n)
        out = None
        for p0 in range(0, p_total, pc):
            sub = cands[p0:p0 + pc]
            k = sub.shape[0]
            if k < pc:  # a partial group: same shapes as a whole one
                sub = torch.cat([sub, sub[-1:].expand(pc - k, -1)])
            with space.population(sub):
                for i0 in range(0, n, ic):
                    xb = x_in[i0:i0 + ic]
                    b = xb.shape[0]
                    xb = xb.unsqueeze(0).expand(pc, *xb.shape).reshape(pc * b, *xb.shape[1:])
                    y = self.qmodel.run_blocks(xb, index).float()
                    if out is None:
                        out = torch.empty(p_total, n, y.shape[-1], dtype=y.dtype, device=y.device)
                    out[p0:p0 + k, i0:i0 + b] = y.reshape(pc, b, -1)[:k]
        return out

    def __call__(self, index: int, space: ScaleSpace, cands: torch.Tensor) -> torch.Tensor:
        """Losses (P,) of candidate scale vectors ``cands`` (P, dim) for block ``index``."""
        if cands.ndim == 1:
            cands = cands.unsqueeze(0)
        out = self.outputs(index, space, cands)
        self.calls += 1
        self.evaluations += cands.shape[0]
        # one candidate at a time: a batched loss (a (P*b, K) matmul) would round by P
        return torch.cat([self.loss(out[p:p + 1], self.ref).reshape(1) for p in range(out.shape[0])])
