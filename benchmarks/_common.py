"""Shared helpers of the benchmark scripts: one thread, the ViT-Tiny assets, restricting
the search to the last blocks, and the fitness-vs-evaluations curve of a report."""
from __future__ import annotations

import json
import os
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
    candidates, (evaluations so far, best fitness of the block being searched).
    Each block starts at its start fitness. Patches ``BlockScaleProblem.evaluate_values``
    while active (benchmarks only)."""

    def __enter__(self):
        from evolq.problems.block_scale import BlockScaleProblem

        self.cls, self.orig = BlockScaleProblem, BlockScaleProblem.evaluate_values
        self.evals, self.x, self.y, self._seen = 0, [], [], set()
        rec = self

        def evaluate_values(problem, values):
            if id(problem) not in rec._seen:
                rec._seen.add(id(problem))
                if problem.start_fitness is not None:
                    rec.x.append(rec.evals)
                    rec.y.append(float(problem.start_fitness))
            out = rec.orig(problem, values)
            rec.evals += out.numel()
            rec.x.append(rec.evals)
            rec.y.append(float(problem.best_fitness))
            return out

        BlockScaleProblem.evaluate_values = evaluate_values
        return self

    def __exit__(self, *exc):
        self.cls.evaluate_values = self.orig
        return False


def write_json(target: str | Path, obj) -> Path:
    """Write ``obj`` atomically (a reader or a crash never sees half a file): a ``str``
    is a file name in ``benchmarks/results/``, a ``Path`` is used as it is."""
    p = RESULTS / target if isinstance(target, str) else Path(target)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, p)
    return p
