"""Everything a bit-allocation search needs, built from a float model and calibration data.

``prepare_allocation`` builds the *proxy*: a copy of the model quantized in the user's regime
with round-to-nearest weights (the activation quantizers, smoothing and per-channel factors as
the final model will have them), its ``WeightTables`` (every layer at every menu width, by
GPTQ or round-to-nearest), the fitness on ``fitness_images`` calibration images, the hold-out
scorer, the size model, the budget as a cost constraint, and the ``BitAllocationProblem``.
For a ``latency-ms`` budget it also times the proxy's layers in the deploy runtime
(``evolq.allocation.latency``; cached in the run folder as ``latency.json``): the objectives
are then [loss, size, latency] and the latency carries the budget. The budget's range is
checked before the tables, the expensive part, are built.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..problems.bit_allocation import BitAllocationProblem, Cost
from ..problems.menu import Menu, SizeModel
from ..start import prepare_model
from .fitness import AllocationFitness
from .tables import WeightTables

__all__ = ["AllocationSetup", "prepare_allocation", "proxy_quant", "budget_cost", "reference_genes", "genes_to_bits"]


@dataclass
class AllocationSetup:
    proxy: object  # the proxy QModel
    tables: WeightTables
    fitness: AllocationFitness
    holdout: AllocationFitness | None
    sizes: SizeModel
    problem: BitAllocationProblem
    reference: torch.Tensor
    budget: dict  # {"kind", "value", "cost", "limit"}
    latency: object = None  # the LatencyTable of a latency-ms budget

    @property
    def layers(self) -> list[str]:
        return self.tables.layers

    @property
    def menu(self) -> Menu:
        return self.tables.menu


def proxy_quant(quant, method: str):
    """The proxy's ``QuantConfig``: the user's regime with round-to-nearest weights, no per-layer
    bits or groups (the tables give them) and no start (its strengths, already resolved, are kept)."""
    return dataclasses.replace(quant, start="rtn", start_options={}, layer_bits={}, w_group=None,
                               bias_correction=quant.bias_correction and method == "rtn" and not quant.deploy)


def genes_to_bits(layers: list[str], menu: Menu, genes) -> dict:
    """``{layer: option}`` (a ``QuantConfig.layer_bits`` mapping: a grouped option is its ``"3g64"``
    string, a bare width per channel) of an allocation."""
    return {n: menu.options[int(k)] for n, k in zip(layers, genes)}


def budget_cost(kind: str, value: float, sizes: SizeModel, front: float, latency=None) -> tuple[list[Cost], str, float]:
    """The costs of the problem (the size objective; for an ``avg-bits`` budget the mean-bits
    constraint; for ``latency-ms`` the latency objective of ``latency``, a ``LatencyTable``), the
    name of the budgeted one and its limit."""
    size = Cost("size_bytes", sizes.cost, sizes.fixed)
    if kind == "latency-ms":
        if latency is None:
            raise ConfigError("a latency-ms budget needs a latency table: not available for this run")
        if list(latency.layers) != list(sizes.layers) or latency.menu != sizes.menu:
            raise ConfigError("the latency table was measured for other layers or another menu")
        return [size, Cost("latency_ms", latency.table, latency.constant, floor=front * value)], "latency_ms", value
    if kind == "size-mb":
        limit = value * 1e6
        size.floor = front * limit
        return [size], "size_bytes", limit
    if kind == "avg-bits":  # mean bits per weight, a grouped option's extra scales counted (SizeModel.bits_table)
        bits = sizes.bits_table
        table = sizes.params[:, None] * bits / sizes.params.sum()
        avg = Cost("avg_bits", table, 0.0, objective=False)
        # the size objective stops improving where the mean bits reach front * budget
        over = (sizes.cost - sizes.params[:, None] * bits / 8.0).min(1).values.sum()
        size.floor = float(sizes.fixed + over + front * value * sizes.params.sum() / 8.0)
        return [size, avg], "avg_bits", float(value)
    raise ConfigError(f"unknown budget kind {kind!r}")


def _range_error(kind: str, value: float, lo: float, hi: float, menu: Menu) -> ConfigError:
    scale = 1e-6 if kind == "size-mb" else 1.0
    fmt = (lambda v: f"{v * scale:.4g}")
    where = "below the smallest" if value < lo * scale else "above the largest"
    what = " (predicted in the deploy runtime)" if kind == "latency-ms" else ""
    return ConfigError(f"the budget {kind}={value:g} is {where} allocation the menu {menu.label()} allows{what}: "
                       f"choose {kind} in {fmt(lo)}..{fmt(hi)}")


def reference_genes(problem, kind: str) -> torch.Tensor:
    """Where sensitivities are measured: ``"max"``, every layer at its widest allowed option (HAWQ,
    ModelOpt); ``"budget"``, the widest uniform option that fits the budget."""
    cost = problem.costs[problem.budget_index]
    # the menu is sorted by bits per weight, a group's scales counted (menu.option_key): the widest
    # allowed option is the last one (a latency table may price an int8 layer above its float form,
    # so the costliest is not always the widest)
    idx = torch.arange(problem.allowed.shape[1])
    widest = torch.where(problem.allowed, idx, -1).argmax(1)
    if kind == "max":
        return widest
    for k in reversed(range(problem.allowed.shape[1])):
        g = problem.repair(torch.full((problem.n_layers,), k, dtype=torch.long)[None])[0]
        if float(cost(g)[0]) <= problem.budget:
            return g
    return problem.repair(widest[None])[0]


def prepare_allocation(model, fit_x: torch.Tensor, hold_x: torch.Tensor, quant, config, arch: str = "",
                       progress: bool = False, placement=None, folder=None, resume: bool = False) -> AllocationSetup:
    """Build the proxy, its tables, the fitness and the problem (see the module docstring).
    ``model`` is not modified (a copy is quantized). ``placement`` (``evolq.scaleout.connect``):
    the problem's fitness runs on those Ray actors (each loads the fitness once). ``folder``/``resume``:
    the run folder, where a latency table is cached and, resuming, read back."""
    menu = config.menu_options
    if quant.weight_only:
        from ..quant.nbits import nbits_group_error

        for g in {g for g in menu.groups if g is not None}:
            why = nbits_group_error(g)
            if why is not None:
                raise ConfigError(f"the bit menu's groups in the weight-only regime: {why}")
    method = config.table_method(quant.start)
    kind, value = config.budget_kind
    if kind == "latency-ms":
        from .latency import check_latency_budget

        check_latency_budget(quant, config)
    proxy = prepare_model(copy.deepcopy(model), fit_x, proxy_quant(quant, method), arch=arch, progress=progress)
    deploy_sym = quant.deploy_symmetric if quant.deploy else None
    sizes = SizeModel(proxy.model, menu, asymmetric=(lambda o: not deploy_sym(o)) if deploy_sym else True)
    latency = None
    if kind == "latency-ms":
        from .latency import load_or_measure

        latency = load_or_measure(proxy, menu, fit_x, threads=config.latency_threads, batch=config.latency_batch,
                                  folder=folder, resume=resume, progress=progress)
    costs, name, limit = budget_cost(kind, value, sizes, config.front, latency)
    bud = next(c for c in costs if c.name == name)
    allowed = sizes.allowed  # a grouped option only where its group divides the layer's input
    lo, hi = bud.range(allowed)
    if limit < lo or limit > hi * (1 + 1e-12):
        raise _range_error(kind, value, lo, hi, menu)
    tables = WeightTables.build(proxy, fit_x, menu, method, quant=quant, progress=progress)
    n = min(config.fitness_images, fit_x.shape[0])
    fitness = AllocationFitness(tables, fit_x[:n], loss=config.loss, chunk=config.chunk, cache_mb=config.cache_mb)
    holdout = AllocationFitness(tables, hold_x, loss="kl", chunk=config.chunk, cache_mb=0) \
        if hold_x.shape[0] else None
    problem = BitAllocationProblem(fitness, costs, limit, budget_cost=name, allowed=allowed, seed=config.seed,
                                   placement=placement)
    ref = reference_genes(problem, config.sensitivity)
    return AllocationSetup(proxy, tables, fitness, holdout, sizes, problem, ref,
                           {"kind": kind, "value": value, "cost": name, "limit": limit}, latency)
