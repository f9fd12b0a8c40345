"""Everything a bit-allocation search needs, built from a float model and calibration data.

``prepare_allocation`` builds the *proxy*: a copy of the model quantized in the user's regime
with round-to-nearest weights (the activation quantizers, smoothing and per-channel factors as
the final model will have them), its ``WeightTables`` (every layer at every menu width, by
GPTQ or round-to-nearest), the fitness on ``fitness_images`` calibration images, the hold-out
scorer, the size model, the budget as a cost constraint, and the ``BitAllocationProblem``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..problems.bit_allocation import BitAllocationProblem, Cost
from .fitness import AllocationFitness
from .menu import Menu, SizeModel
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

    @property
    def layers(self) -> list[str]:
        return self.tables.layers

    @property
    def menu(self) -> Menu:
        return self.tables.menu


def proxy_quant(quant, method: str):
    """The proxy's ``QuantConfig``: the user's regime with round-to-nearest weights, no per-layer
    bits (the tables give them) and no start (its strengths, already resolved, are kept)."""
    return dataclasses.replace(quant, start="rtn", start_options={}, layer_bits={},
                               bias_correction=quant.bias_correction and method == "rtn" and not quant.deploy)


def genes_to_bits(layers: list[str], menu: Menu, genes) -> dict:
    """``{layer: option}`` (a ``QuantConfig.layer_bits`` mapping) of an allocation."""
    return {n: menu.options[int(k)] for n, k in zip(layers, genes)}


def budget_cost(kind: str, value: float, sizes: SizeModel, front: float) -> tuple[list[Cost], str, float]:
    """The costs of the problem (the size objective and, for an ``avg-bits`` budget, the mean-bits
    constraint), the name of the budgeted one and its limit."""
    size = Cost("size_bytes", sizes.cost, sizes.fixed)
    if kind == "size-mb":
        limit = value * 1e6
        size.floor = front * limit
        return [size], "size_bytes", limit
    if kind == "avg-bits":
        bits = torch.tensor(sizes.menu.bits, dtype=torch.float64)
        table = sizes.params[:, None] * bits[None, :] / sizes.params.sum()
        avg = Cost("avg_bits", table, 0.0, objective=False)
        # the size objective stops improving where the mean bits reach front * budget
        over = (sizes.cost - sizes.params[:, None] * bits[None, :] / 8.0).min(1).values.sum()
        size.floor = float(sizes.fixed + over + front * value * sizes.params.sum() / 8.0)
        return [size, avg], "avg_bits", float(value)
    raise ConfigError(f"a {kind} budget needs a latency table: not available for this run")


def _range_error(kind: str, value: float, lo: float, hi: float, menu: Menu) -> ConfigError:
    scale = 1e-6 if kind == "size-mb" else 1.0
    fmt = (lambda v: f"{v * scale:.4g}")
    where = "below the smallest" if value < lo * scale else "above the largest"
    return ConfigError(f"the budget {kind}={value:g} is {where} allocation the menu {menu.label()} allows: "
                       f"choose {kind} in {fmt(lo)}..{fmt(hi)}")


def reference_genes(problem, kind: str) -> torch.Tensor:
    """Where sensitivities are measured: ``"max"``, every layer at its widest allowed option (HAWQ,
    ModelOpt); ``"budget"``, the widest uniform option that fits the budget."""
    cost = problem.costs[problem.budget_index]
    widest = cost.table.masked_fill(~problem.allowed, float("-inf")).argmax(1)
    if kind == "max":
        return widest
    for k in reversed(range(problem.allowed.shape[1])):
        g = problem.repair(torch.full((problem.n_layers,), k, dtype=torch.long)[None])[0]
        if float(cost(g)[0]) <= problem.budget:
            return g
    return problem.repair(widest[None])[0]


def prepare_allocation(model, fit_x: torch.Tensor, hold_x: torch.Tensor, quant, config, arch: str = "",
                       progress: bool = False, placement=None) -> AllocationSetup:
    """Build the proxy, its tables, the fitness and the problem (see the module docstring).
    ``model`` is not modified (a copy is quantized). ``placement`` (``evolq.scaleout.connect``):
    the problem's fitness runs on those Ray actors (each loads the fitness once)."""
    from ..api import prepare_model

    menu = config.menu_options
    method = config.table_method(quant.start)
    proxy = prepare_model(copy.deepcopy(model), fit_x, proxy_quant(quant, method), arch=arch, progress=progress)
    tables = WeightTables.build(proxy, fit_x, menu, method, quant=quant, progress=progress)
    n = min(config.fitness_images, fit_x.shape[0])
    fitness = AllocationFitness(tables, fit_x[:n], loss=config.loss, chunk=config.chunk, cache_mb=config.cache_mb)
    holdout = AllocationFitness(tables, hold_x, loss="kl", chunk=config.chunk, cache_mb=0) \
        if hold_x.shape[0] else None
    deploy_sym = quant.deploy_symmetric if quant.deploy else None
    sizes = SizeModel(proxy.model, menu, asymmetric=(lambda o: not deploy_sym(o)) if deploy_sym else True)
    kind, value = config.budget_kind
    costs, name, limit = budget_cost(kind, value, sizes, config.front)
    bud = next(c for c in costs if c.name == name)
    allowed = torch.ones(len(tables.layers), len(menu), dtype=torch.bool)
    lo, hi = bud.range(allowed)
    if limit < lo or limit > hi * (1 + 1e-12):
        raise _range_error(kind, value, lo, hi, menu)
    problem = BitAllocationProblem(fitness, costs, limit, budget_cost=name, allowed=allowed, seed=config.seed,
                                   placement=placement)
    ref = reference_genes(problem, config.sensitivity)
    return AllocationSetup(proxy, tables, fitness, holdout, sizes, problem, ref,
                           {"kind": kind, "value": value, "cost": name, "limit": limit})
