"""``AllocationConfig``: a per-layer bit allocation (``evolq.allocate_bits``): the menu, the budget
(``parse_budget``), the searcher and its fitness."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .checks import check_choice, check_int

__all__ = ["AllocationConfig", "parse_budget", "BUDGET_KINDS", "TABLE_METHODS"]

BUDGET_KINDS = ("avg-bits", "size-mb", "latency-ms")
TABLE_METHODS = ("auto", "gptq", "rtn")


def parse_budget(text) -> tuple[str, float]:
    """``"avg-bits=3.3"`` / ``"size-mb=2.7"`` / ``"latency-ms=12"`` -> (kind, value)."""
    if isinstance(text, tuple) and len(text) == 2:
        kind, value = text
    else:
        kind, sep, value = str(text).partition("=")
        if not sep:
            raise ConfigError(f"a budget is KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, got {text!r}")
    kind = kind.strip()
    check_choice("budget kind", kind, BUDGET_KINDS)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"the {kind} budget must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"the {kind} budget must be positive, got {value!r}")
    return kind, v


@dataclass
class AllocationConfig:
    """Per-layer bit allocation (``evolq.allocate_bits``, ``evolq allocate``): which widths a layer
    may take, under what budget, searched how.

    ``menu``: the options, e.g. ``"2,3,4,8"`` (widths 2..8 per output channel, ``BITSgGROUP`` such as
    ``3g64`` for group-wise weights, optionally ``float``). ``budget``:
    ``"avg-bits=3.3"`` (parameter-weighted mean weight bits, a grouped option's extra scales counted:
    ``SizeModel.bits_table``), ``"size-mb=2.7"`` (the packed size, scales included,
    ``evolq.problems.menu.SizeModel``) or ``"latency-ms=12"`` (a per-layer latency table measured
    in the deploy runtime, ``evolq.allocation.latency``: the deploy regime only, ``"float"`` on the
    menu, timed at ``latency_batch`` images and ``latency_threads`` threads). ``searcher``: a
    registered allocation searcher (``evolq.search.allocators``: nsga2, ilp, greedy, random) or an
    EvoTorch ``SearchAlgorithm`` class. ``evaluations``: the fitness evaluations the search may spend, the sensitivity
    measurement included. The fitness is the ``loss`` (KL to the float logits by default) on
    ``fitness_images`` calibration images; ``holdout`` of the calibration images is kept out of
    everything (calibration, tables, fitness) and chooses the allocation among the ``select``
    best front points under the budget; with ``compare_additive`` the additive answer
    (sensitivity + ILP at the budget, for the searchers that measure sensitivities) competes too,
    so an evolutionary search never ships an allocation the hold-out rates below the ILP's (the
    report's ``additive`` holds that point either way). ``tables``: how each layer is quantized at each width for
    the fitness (``"gptq"``, ``"rtn"``; ``"auto"``: rtn for the rtn start, gptq otherwise). The
    front spans ``[front * budget, budget]``: below it, the cost no longer counts as better.
    ``actors``/``ray_address``: the fitness on Ray actors, as ``SearchConfig``'s (docs/scale-out.md);
    the result is the same.
    """

    menu: str = "2,3,4,8"
    budget: str = "avg-bits=3.3"
    searcher: object = "nsga2"
    searcher_kwargs: dict = field(default_factory=dict)
    evaluations: int = 500
    popsize: int = 24
    fitness_images: int = 64
    holdout: float = 0.2
    loss: str = "kl"
    tables: str = "auto"
    sensitivity: str = "max"  # reference of the single-layer sensitivities: "max" (HAWQ/ModelOpt) or "budget"
    front: float = 0.95  # chosen on the hold-out KL (calibration pool): 0.95 < 1.0 < 0.85 < ilp, benchmarks dev
    select: int = 6
    compare_additive: bool = False  # the ILP point at the budget joins the hold-out's candidates
    chunk: int = 32
    cache_mb: float = 1024.0
    latency_batch: int = 1  # images per call the latency-ms table is timed at
    latency_threads: int = 2  # threads inductor compiles for and the table is timed with
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    actors: int | str = 0  # Ray actors computing the fitness: 0 (in-process), N, "max" or "num_gpus"
    ray_address: str | None = None  # None: a local Ray (the machine's cores); "auto" or HOST:PORT: join a cluster

    def __post_init__(self):
        self.validate()

    def validate(self):
        from ..losses import LOSSES
        from ..problems.menu import parse_menu
        from ..scaleout import check_actors

        menu = parse_menu(self.menu)
        kind, _ = parse_budget(self.budget)
        if kind == "latency-ms" and "float" not in menu.options:
            raise ConfigError(f"a latency-ms budget needs \"float\" on the menu (e.g. {menu.label()},float): every "
                              f"integer width runs the same int8 kernels, so without it all allocations take the same "
                              f"time")
        if kind == "latency-ms" and menu.grouped:
            raise ConfigError(f"a latency-ms budget cannot time the grouped menu options {','.join(menu.grouped)}: the "
                              f"deploy runtime runs per-channel int8 weights only; use size-mb or avg-bits")
        check_int("latency_batch", self.latency_batch, 1, 4096)
        check_int("latency_threads", self.latency_threads, 1, 1024)
        if isinstance(self.searcher, str):
            from ..search.allocators import ALLOCATORS

            check_choice("allocation searcher", self.searcher, ALLOCATORS.names())
        elif not isinstance(self.searcher, type):
            raise ConfigError(f"searcher must be an allocation searcher's name or an EvoTorch SearchAlgorithm "
                              f"class, got {type(self.searcher).__name__}")
        if not isinstance(self.searcher_kwargs, dict) or not all(isinstance(k, str) for k in self.searcher_kwargs):
            raise ConfigError("searcher_kwargs must be a dict with string keys")
        check_int("evaluations", self.evaluations, 1, 10_000_000)
        check_int("popsize", self.popsize, 2, 100_000)
        check_int("fitness_images", self.fitness_images, 1, 10_000_000)
        check_int("select", self.select, 1, 100_000)
        if not isinstance(self.compare_additive, bool):
            raise ConfigError(f"compare_additive must be True or False, got {self.compare_additive!r}")
        check_int("chunk", self.chunk, 1, 1 << 20)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_choice("loss", self.loss, LOSSES.names())
        check_choice("tables", self.tables, TABLE_METHODS)
        check_choice("sensitivity", self.sensitivity, ("max", "budget"))
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if isinstance(self.front, bool) or not isinstance(self.front, (int, float)) or not 0.0 <= self.front <= 1.0:
            raise ConfigError(f"front must be a fraction in [0, 1], got {self.front!r}")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or self.cache_mb < 0:
            raise ConfigError(f"cache_mb must be a non-negative number, got {self.cache_mb!r}")
        check_actors(self.actors, self.ray_address)

    @property
    def menu_options(self):
        from ..problems.menu import parse_menu

        return parse_menu(self.menu)

    @property
    def budget_kind(self) -> tuple[str, float]:
        return parse_budget(self.budget)

    def table_method(self, start: str) -> str:
        return ("rtn" if start == "rtn" else "gptq") if self.tables == "auto" else self.tables

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.searcher, str):
            d["searcher"] = getattr(self.searcher, "__name__", "custom")
        return d
