"""Scale spaces: a flat vector view over the scale tensors of some quantizers.

A ``ScaleSpace`` is how search code reads and writes a block's scales as one vector,
and how a population of candidate vectors is installed for one batched forward.
It knows quantizers only through their ``scale`` buffer and ``pop_scale`` slot.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["ScaleSpace"]


class ScaleSpace:
    """Flat view over ``scale`` buffers.

    Args:
        quantizers: mapping name -> quantizer (anything with a ``scale`` tensor and a
            ``pop_scale`` attribute), in vector order.
    """

    def __init__(self, quantizers: dict):
        self.quantizers = dict(quantizers)
        self.names = list(self.quantizers)
        self.sizes = [q.scale.numel() for q in self.quantizers.values()]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def dim(self) -> int:
        return len(self)

    def vector(self) -> torch.Tensor:
        """The current scales, concatenated (a copy)."""
        if not self.quantizers:
            return torch.zeros(0)
        return torch.cat([q.scale.detach().reshape(-1).float() for q in self.quantizers.values()]).clone()

    def slices(self):
        yield from zip(self.names, self.quantizers.values(), self.offsets[:-1], self.offsets[1:])

    def write(self, vec: torch.Tensor) -> None:
        """Install ``vec`` as the scales (in place, so caches keyed on versions refresh)."""
        vec = torch.as_tensor(vec).reshape(-1)
        if vec.numel() != len(self):
            raise ValueError(f"scale vector has {vec.numel()} values, space has {len(self)}")
        with torch.no_grad():
            for _, q, a, b in self.slices():
                q.scale.copy_(vec[a:b].reshape(q.scale.shape).to(q.scale))

    def set_population(self, pop: torch.Tensor) -> None:
        """Install P candidate vectors, shape (P, dim), for a batched forward."""
        if pop.ndim != 2 or pop.shape[1] != len(self):
            raise ValueError(f"population must be (P, {len(self)}), got {tuple(pop.shape)}")
        for _, q, a, b in self.slices():
            q.pop_scale = pop[:, a:b].to(q.scale)

    def clear_population(self) -> None:
        for q in self.quantizers.values():
            q.pop_scale = None

    @contextmanager
    def population(self, pop: torch.Tensor):
        self.set_population(pop)
        try:
            yield
        finally:
            self.clear_population()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: q.scale.detach().clone() for n, q in self.quantizers.items()}
