"""``BlockScaleProblem``: the scales of one block as an EvoTorch ``Problem``.

It is given a start scale vector and a batched fitness (N candidate vectors in,
N losses out, in one call) and knows nothing about the model behind them, so the
same class serves ViTs, CNNs, LSTMs and GNNs.

Decision vectors are either the scales themselves (``"absolute"``) or ratios to the
start scales (``"relative"``, start = all ones). Either way candidates are decoded
to positive, finite scales (absolute value, floored at ``min_scale``, a non-finite
coordinate replaced by its start value), non-finite losses
are mapped to ``penalty`` (EvoTorch searchers crash on NaN/inf), and the best
candidate ever evaluated is remembered.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._evotorch import evotorch

__all__ = ["BlockScaleProblem", "PENALTY"]

PENALTY = 1e6


class BlockScaleProblem(evotorch.Problem):
    """Minimise ``fitness(scales)`` over one block's scale vector.

    Args:
        start: the current scales (1-D).
        fitness: batched loss, ``(P, D) scales -> (P,) losses``.
        parameterization: ``"absolute"`` or ``"relative"``.
        start_fitness: the loss of ``start`` if already known (not re-evaluated).
        min_scale: floor of decoded scales.
        penalty: loss given to NaN/inf outcomes.
        seed: seed of the problem's generator (used by EvoTorch searchers).
    """

    def __init__(self, start: torch.Tensor, fitness: Callable[[torch.Tensor], torch.Tensor], *,
                 parameterization: str = "absolute", start_fitness: float | None = None,
                 min_scale: float = 1e-8, penalty: float = PENALTY, seed: int | None = None,
                 spread: float = 1e-3):
        if parameterization not in ("absolute", "relative"):
            raise ValueError(f"parameterization must be absolute or relative, got {parameterization!r}")
        start = torch.as_tensor(start, dtype=torch.float32).reshape(-1).clone()
        if start.numel() == 0:
            raise ValueError("empty scale vector: nothing to search")
        if not torch.isfinite(start).all() or (start <= 0).any():
            raise ValueError("start scales must be positive and finite")
        self.start = start
        self.fitness = fitness
        self.parameterization = parameterization
        self.min_scale, self.penalty = float(min_scale), float(penalty)
        center = self.center
        lo, hi = center - spread * center.abs(), center + spread * center.abs()
        super().__init__("min", solution_length=start.numel(), initial_bounds=(lo, hi),
                         dtype=torch.float32, eval_dtype=torch.float64, seed=seed)
        self.evaluations = 0
        self.best_values = center.clone()
        if start_fitness is not None and not math.isfinite(float(start_fitness)):
            start_fitness = self.penalty  # a broken start: any finite candidate beats it
        self.best_fitness = float("inf") if start_fitness is None else float(start_fitness)
        self.start_fitness = start_fitness
        self.history: list[float] = []  # best-so-far after each batch

    @property
    def center(self) -> torch.Tensor:
        """The decision vector of the start scales."""
        return self.start.clone() if self.parameterization == "absolute" else torch.ones_like(self.start)

    def decode(self, values: torch.Tensor) -> torch.Tensor:
        """Decision vectors -> positive scales."""
        values = values.to(self.start)
        scales = values.abs() if self.parameterization == "absolute" else self.start * values.abs()
        # a NaN/inf coordinate (a diverged searcher) falls back to the start scale there
        scales = torch.where(torch.isfinite(scales), scales, self.start.expand_as(scales))
        return scales.clamp_min(self.min_scale)

    def sanitize(self, losses: torch.Tensor) -> torch.Tensor:
        losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
        return torch.nan_to_num(losses, nan=self.penalty, posinf=self.penalty, neginf=self.penalty).clamp(
            -self.penalty, self.penalty)

    def evaluate_values(self, values: torch.Tensor) -> torch.Tensor:
        """Evaluate decision vectors (P, D) -> sanitized losses (P,), tracking the best."""
        values = values.as_subclass(torch.Tensor)  # EvoTorch hands read-only tensors
        losses = self.sanitize(self.fitness(self.decode(values)))
        self.evaluations += losses.numel()
        i = int(torch.argmin(losses))
        if losses[i].item() < self.best_fitness:
            self.best_fitness = losses[i].item()
            self.best_values = values[i].detach().to(self.start).clone()
        self.history.append(self.best_fitness)
        return losses

    def _evaluate_batch(self, batch) -> None:
        losses = self.evaluate_values(batch.values)
        batch.set_evals(losses)

    @property
    def best_scales(self) -> torch.Tensor:
        return self.decode(self.best_values.unsqueeze(0))[0]

    def outcome(self, start_fitness: float) -> tuple[torch.Tensor, float]:
        """``(scales, fitness)`` to install: the best candidate, or the start when the best
        is degenerate (non-finite or non-positive scales, a penalised NaN/inf loss) or no
        better than ``start_fitness``: a degenerate candidate is never installed."""
        final, best = self.best_scales, self.best_fitness
        if (not bool(torch.isfinite(final).all()) or not bool((final > 0).all()) or not math.isfinite(best)
                or not best < self.penalty or not best <= start_fitness):
            return self.start.clone(), float(start_fitness)
        return final, best
