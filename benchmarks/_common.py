"""Shared helpers of the benchmark scripts: one thread, the ViT-Tiny assets, restricting
the search to the last blocks, the fitness-vs-evaluations curve of a report, and the
weights-only / activations-only view of a model."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def setup(threads: int = 1) -> None:
    torch.set_num_threads(threads)


def load_data(model_name: str, calib: int, n_eval: int):
    from evolq.data import assets_dir, load_images
    from evolq.models import load_model, model_transform

    base = load_model(model_name)
    tf = model_transform(base)
    data = assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=calib)
    xe, ye = load_images(data, tf, "eval", limit=n_eval)
    return base, xc, xe, ye


def search_last_blocks(qmodel, last: int, scope: str = "attn-weights") -> list[str]:
    """Leave only the last ``last`` searchable blocks in ``scope`` (0: all); returns their names."""
    idx = [i for i, b in enumerate(qmodel.blocks) if b.scopes.get(scope)]
    keep = idx[-last:] if last else idx
    for i in idx:
        if i not in keep:
            qmodel.blocks[i].scopes = {**qmodel.blocks[i].scopes, scope: []}
    return [qmodel.blocks[i].name for i in keep]


class CurveRecorder:
    """Records the fitness-vs-evaluations curve of a search: after every batch of
    candidates, (evaluations so far, best fitness of the block being searched); each
    block starts at its start fitness. A subscriber: ``quantize_model(...,
    subscribers=[rec])``."""

    def __init__(self):
        self.evals, self.x, self.y, self._best = 0, [], [], None

    def subscribe(self, engine):
        engine.block_start_hook.append(self.start)
        engine.fitness_hook.append(self.step)
        engine.block_end_hook.append(self.end)

    def start(self, info):
        self._best = float(info["start_fitness"])
        self.x.append(self.evals)
        self.y.append(self._best)

    def step(self, index, cands, losses):
        if self._best is None:  # a start evaluation, outside a block search
            return
        self.evals += losses.numel()
        finite = torch.nan_to_num(losses.double(), nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
        self._best = min(self._best, float(finite.min()))
        self.x.append(self.evals)
        self.y.append(self._best)

    def end(self, rec):
        self._best = None


def write_json(target: str | Path, obj) -> Path:
    """Write ``obj`` atomically (a reader or a crash never sees half a file): a ``str``
    is a file name in ``benchmarks/results/``, a ``Path`` is used as it is."""
    from evolq.io import write_json as _write

    return _write(RESULTS / target if isinstance(target, str) else Path(target), obj, indent=1)


GAP_PARTS = (("weights_only", "weight"), ("activations_only", "activation"))


@contextmanager
def only_kind(qmodel, kind: str):
    """Inside: only ``qmodel``'s quantizers of ``kind`` ("weight" or "activation") are on, the
    others pass through (what the remaining error is made of: weights vs activations)."""
    off = [q for q in qmodel.quantizers().values() if getattr(q, "kind", "activation") != kind]
    for q in off:
        q.enabled = False
    try:
        yield qmodel
    finally:
        for q in off:
            q.enabled = True
