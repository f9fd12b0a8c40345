"""The latency objective of the bit allocation: a per-layer table measured in the deploy runtime.

``LatencyTable`` holds, for every layer and menu option, its milliseconds in the deploy runtime
plus a constant for the rest of the model; it makes the allocation's latency ``Cost``. How the
table is measured belongs to the runtime, a layer above this one: the runtime registers a
measurer in ``LATENCY_RUNTIMES`` (``evolq.export.latency`` registers ``"inductor"``, PyTorch's x86
int8 path, when ``evolq.export`` is imported, as ``import evolq`` does), and
``measure_latency_table`` calls the one named ``DEPLOY_RUNTIME``. ``load_or_measure`` caches the
table in a run folder (``latency.json``) so that a resumed run uses the very table it started
with; ``check_latency_budget`` refuses a ``latency-ms`` budget that cannot be measured before any
expensive work. How the measurement works and how well the sum predicts whole models:
``evolq.export.latency``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..problems.menu import Menu
from ..qnn.layer_bits import quantized_layers
from ..registry import Registry

__all__ = ["LatencyTable", "measure_latency_table", "load_or_measure", "check_latency_budget", "LATENCY_NAME",
           "LatencyWarning", "LATENCY_RUNTIMES", "register_latency_runtime", "DEPLOY_RUNTIME"]

LATENCY_NAME = "latency.json"
DEPLOY_RUNTIME = "inductor"  # the runtime a latency-ms budget is timed in
LATENCY_RUNTIMES: Registry = Registry("latency runtime")


def register_latency_runtime(name: str, entry=None):
    """Register a latency measurer: an object with ``require()`` (a one-line ``ConfigError`` when
    its runtime cannot run here) and ``measure(qmodel, menu, example, **kw) -> LatencyTable``."""
    return LATENCY_RUNTIMES.register(name, entry)


def deploy_runtime():
    """The registered measurer of ``DEPLOY_RUNTIME``."""
    if DEPLOY_RUNTIME not in LATENCY_RUNTIMES:
        raise ConfigError(f"no latency runtime {DEPLOY_RUNTIME!r} is registered: import evolq.export (import evolq "
                          f"does) before a latency-ms budget")
    return LATENCY_RUNTIMES.get(DEPLOY_RUNTIME)


def measure_latency_table(qmodel, menu: Menu, example: torch.Tensor, **kw) -> LatencyTable:
    """The table of ``qmodel`` at every option of ``menu``, measured by the deploy runtime's
    measurer (``evolq.export.latency.measure_latency_table``: its arguments)."""
    return deploy_runtime().measure(qmodel, menu, example, **kw)


class LatencyWarning(UserWarning):
    """A layer whose int8 lowering ran no integer kernel when compiled alone."""


@dataclass
class LatencyTable:
    """Milliseconds of every (layer, option) in the deploy runtime, plus a constant.

    Attributes:
        layers: gene order (``quantized_layers``).
        menu: the options.
        table: (layers, options) float64 ms: a layer's int8 time under every integer width, its
            float time under ``"float"``.
        constant: ms of everything that is not a gene's layer.
        record: how it was measured and how well the additive model predicts whole-model times.
    """

    layers: list
    menu: Menu
    table: torch.Tensor
    constant: float
    record: dict

    def predict(self, genes) -> torch.Tensor:
        """Predicted ms (P,) of allocations ``genes`` (P, layers)."""
        g = torch.as_tensor(genes).long().reshape(-1, len(self.layers))
        return self.table.gather(1, g.T).sum(0) + self.constant

    def range(self) -> tuple[float, float]:
        return (float(self.table.min(1).values.sum()) + self.constant,
                float(self.table.max(1).values.sum()) + self.constant)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "menu": list(self.menu.options), "table_ms": self.table.tolist(),
                "constant_ms": self.constant, "record": self.record}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        return cls(list(d["layers"]), Menu(tuple(d["menu"])), torch.tensor(d["table_ms"], dtype=torch.float64),
                   float(d["constant_ms"]), dict(d["record"]))


# -- checks, before any expensive work ---------------------------------------------------
def check_latency_budget(quant, config) -> None:
    """One-line ``ConfigError`` unless a ``latency-ms`` budget can be measured: the deploy regime
    (the only one the int8 runtime runs) and the runtime's package (torchao, the deploy extra).
    A no-op for other budgets. The menu's ``"float"`` is checked by ``AllocationConfig``."""
    kind, _ = config.budget_kind
    if kind != "latency-ms":
        return
    if not getattr(quant, "deploy", False):
        raise ConfigError(f"a latency-ms budget is timed in the deploy runtime (PyTorch's x86 int8 kernels), which "
                          f"runs the deploy regime only: use --preset deploy (QuantConfig.preset('deploy')), not "
                          f"the {getattr(quant, 'regime', '?')} regime")
    deploy_runtime().require()


# -- the run folder's copy ----------------------------------------------------------------
def load_or_measure(qmodel, menu: Menu, example: torch.Tensor, *, threads: int, batch: int, folder=None,
                    resume: bool = False, progress: bool = False, **kw) -> LatencyTable:
    """The table of a run: with ``resume``, the one in ``folder/latency.json`` (a resumed run
    must price allocations as the run it continues did); else measured, and written there."""
    import json

    from ..fsio import write_json

    path = Path(folder) / LATENCY_NAME if folder is not None else None
    names = list(quantized_layers(qmodel.model))
    if resume and path is not None and path.exists():
        try:
            t = LatencyTable.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the latency table {str(path)!r}: {e}") from None
        rec = t.record
        if t.layers != names or t.menu != menu or rec.get("threads") != threads or rec.get("batch") != batch:
            raise CheckpointError(f"{str(path)!r} was measured for another model, menu, batch or thread count; "
                                  f"use another folder")
        t.record = {**rec, "cached": True}
        return t
    t = measure_latency_table(qmodel, menu, example, threads=threads, batch=batch, progress=progress, **kw)
    if path is not None:
        write_json(path, t.to_dict())
    return t
