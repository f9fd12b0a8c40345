"""The ofq start's hold-out choice (``OFQOptions.keep="holdout"``, ``HoldoutChoice``): which
epoch's trained tensors the fine-tune (``ofq.run_ofq``) ends with, and how that choice survives
a checkpoint and a resume."""
from __future__ import annotations

import torch

__all__ = ["HoldoutChoice"]


class HoldoutChoice:
    """``keep="holdout"``: the lowest hold-out KL so far, its epoch (the init counted as 0) and a
    copy of the trained tensors then (``best``); restored from the run's state and checkpoint on a
    resume, written to them after every epoch, put back at the end. Inactive (``best`` None) with
    ``keep="last"`` or without a hold-out."""

    def __init__(self, opts, hold, state: dict, extra: dict, named: list, params: list):
        self.on = opts.keep == "holdout" and hold is not None
        self.best = None  # (hold-out KL, epoch, the trained tensors)
        if self.on:
            if state["epoch"] > 0 and "best_epoch" in state:
                self.best = (state["best_holdout_kl"], state["best_epoch"],
                             [extra[f"B/{name}"].to(d) for name, d in named])
            elif state["epoch"] == 0 and state.get("holdout_kl_before") is not None:
                self.best = (state["holdout_kl_before"], 0, [d.detach().clone() for d in params])

    def offer(self, kl: float, epoch: int, params: list) -> None:
        """Epoch ``epoch`` (from 1) ended with hold-out KL ``kl`` and the tensors ``params``."""
        if self.on and (self.best is None or kl < self.best[0]):
            self.best = (kl, epoch, [d.detach().clone() for d in params])

    def save(self, state: dict, extra: dict, named: list) -> None:
        """The choice into the run's ``state`` and the checkpoint's ``extra`` tensors."""
        if self.best is not None:
            state["best_epoch"], state["best_holdout_kl"] = self.best[1], self.best[0]
            extra.update({f"B/{name}": b for (name, _), b in zip(named, self.best[2])})

    def apply(self, params: list, state: dict) -> None:
        """The chosen epoch's tensors back into ``params``; its number as ``state["kept_epoch"]``."""
        if self.best is None:
            return
        if self.best[1] != state["epoch"]:
            with torch.no_grad():
                for d, b in zip(params, self.best[2]):
                    d.copy_(b)
        state["kept_epoch"] = self.best[1]
